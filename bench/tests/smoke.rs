//! Smoke runs of every subcommand: the report is complete and well-formed (no timing
//! thresholds), and `demo` leaves no process behind, also when interrupted.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn bench() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shroud-bench"));
    // No nested cargo build from inside the test run: use the relay binary the
    // workspace build left next to this one, or the benchmark's own relay mode.
    c.env_remove("CARGO");
    c
}

/// Runs the benchmark with `args`, `--json JSON`, then `more`; asserts that it
/// succeeded (its stderr in the message) and returns the JSON report and the output.
fn report(
    args: &[&str],
    json: &std::path::Path,
    more: &[&std::ffi::OsStr],
) -> (Value, std::process::Output) {
    let out = bench()
        .args(args)
        .arg("--json")
        .arg(json)
        .args(more)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    (r, out)
}

fn tmp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("shroud-bench-smoke-{}-{name}", std::process::id()))
}

fn alive(pid: u32) -> bool {
    // A zombie is not alive: check the state in /proc.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

fn pids_from(line: &str) -> Vec<u32> {
    let inner = line
        .split('[')
        .nth(1)
        .and_then(|s| s.split(']').next())
        .unwrap_or("");
    inner
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect()
}

#[test]
fn demo_reports_and_leaves_nothing_behind() {
    let json = tmp("demo.json");
    let (r, out) = report(
        &[
            "demo",
            "--duration",
            "2",
            "--net",
            "61",
            "--preseal-mb",
            "0",
        ],
        &json,
        &[std::ffi::OsStr::new("--plot"), tmp("demo.svg").as_os_str()],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(r["schema"], "shroud-bench/demo/1");
    assert_eq!(r["sealing"], "live");
    assert!(r["live_sealing"].is_null());
    assert!(r["payload_mb_per_sec"].is_f64());
    assert!(
        r["delivered_payloads"].as_u64().unwrap() > 0,
        "no traffic delivered: {r}"
    );
    for k in ["p50", "p99", "p999"] {
        assert!(r["latency_us"][k].is_u64(), "{k}");
    }
    let relays = r["relays"].as_array().unwrap();
    assert_eq!(relays.len(), 3);
    for rel in relays {
        assert!(rel["addr"]
            .as_str()
            .unwrap()
            .parse::<std::net::IpAddr>()
            .is_ok());
        let ports = rel["ports"].as_array().unwrap();
        assert_eq!(ports.len(), 2);
        assert!(ports[0].as_u64().unwrap() <= ports[1].as_u64().unwrap());
    }
    assert!(r["machine"]["cores"].is_u64());
    let svg = std::fs::read_to_string(tmp("demo.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("<polyline"),
        "latency CDF drawn"
    );
    let _ = std::fs::remove_file(tmp("demo.svg"));
    let line = stderr
        .lines()
        .find(|l| l.starts_with("relays started"))
        .expect("pids line");
    let pids = pids_from(line);
    assert_eq!(pids.len(), 3);
    for p in pids {
        assert!(!alive(p), "relay {p} still running");
    }
    let _ = std::fs::remove_file(json);
}

/// With a small presealed pool the demo sends every presealed cell, measures their
/// latency through the send book, and then runs the rest of the time sealing live.
#[test]
fn demo_sends_presealed_cells_then_seals_live() {
    let json = tmp("demo-preseal.json");
    let (r, _) = report(
        &[
            "demo",
            "--duration",
            "3",
            "--net",
            "66",
            "--preseal-mb",
            "48",
        ],
        &json,
        &[],
    );
    assert_eq!(r["sealing"], "ahead", "{r}");
    let presealed = r["presealed_cells"].as_u64().unwrap();
    // 48 MiB of 1024-byte cells over 6 circuits, whole batches of 32 per circuit.
    assert_eq!(presealed, (48 << 20) / 1024 / 6 / 32 * 32 * 6, "{r}");
    assert_eq!(r["sent_payloads"].as_u64().unwrap(), presealed, "{r}");
    assert_eq!(
        r["delivered_payloads"].as_u64().unwrap() + r["lost_payloads"].as_u64().unwrap(),
        presealed
    );
    assert!(
        r["delivered_payloads"].as_u64().unwrap() >= presealed * 99 / 100,
        "{r}"
    );
    // Every 16th delivered payload is a latency sample, found in the send book.
    let samples = r["latency_us"]["samples"].as_u64().unwrap();
    assert!(
        samples >= r["delivered_payloads"].as_u64().unwrap() / 16 - 1,
        "{r}"
    );
    assert!(r["latency_us"]["p99"].as_u64().unwrap() < 5_000_000, "{r}");
    let live = &r["live_sealing"];
    assert!(live["delivered_payloads"].as_u64().unwrap() > 0, "{r}");
    assert!(live["latency_us"]["samples"].as_u64().unwrap() > 0, "{r}");
    let _ = std::fs::remove_file(json);
}

#[test]
fn interrupted_demo_stops_every_relay() {
    let mut child = bench()
        .args(["demo", "--duration", "60", "--net", "62"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let pids = loop {
        let line = lines
            .next()
            .expect("demo ended before starting relays")
            .unwrap();
        if line.starts_with("relays started") {
            break pids_from(&line);
        }
    };
    assert_eq!(pids.len(), 3);
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY-free: kill(1) from the shell sends SIGINT as Ctrl-C would.
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "demo did not stop after SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    assert!(out.contains("payload"), "summary printed: {out}");
    for p in pids {
        assert!(!alive(p), "relay {p} still running after the interrupt");
    }
}

/// A short `relay` run of `variants`, its report written to `json`.
fn relay_report(variants: &str, json: &std::path::Path) -> Value {
    let args = [
        "relay",
        "--duration",
        "0.5",
        "--round-cells",
        "1024",
        "--variants",
        variants,
    ];
    report(&args, json, &[]).0
}

#[test]
fn relay_benchmark_reports_every_variant_and_ratio() {
    let json = tmp("relay.json");
    let r = relay_report("ring,none,per-datagram,bare", &json);
    assert_eq!(r["schema"], "shroud-bench/relay/1");
    assert!(r["cells_per_sec_per_core"].as_f64().unwrap() > 0.0);
    let v = r["variants"].as_array().unwrap();
    assert_eq!(v.len(), 4);
    for x in v {
        assert!(x["rounds"].as_u64().unwrap() >= 3, "{x}");
        assert!(x["cells_per_sec"].is_f64());
        assert!(x["core_cpu_ns_per_cell"].as_f64().unwrap() > 0.0, "{x}");
    }
    assert_eq!(v[3]["forwarder"], "bare");
    assert!(r["ratios"]["ring_vs_bare"].is_f64());
    assert!(r["ratios"]["ring_vs_no_crypto"].is_f64());
    assert!(r["ratios"]["ring_vs_per_datagram"].is_f64());
    assert!(r["raw_aes_gcm_opens_per_sec_per_core"]["ring"].is_f64());
    let _ = std::fs::remove_file(json);
}

/// The wire-like path: the relay and the bare forwarder each in a network namespace
/// behind a veth pair, single frames in, NAPI on the forwarder's core (root only).
#[test]
fn relay_benchmark_over_veth_against_the_bare_forwarder() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: the veth path needs root");
        return;
    }
    let namespaces = || {
        let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
        String::from_utf8_lossy(&list.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .filter(|n| n.starts_with("shb"))
            .collect::<Vec<_>>()
    };
    let before = namespaces();
    let json = tmp("relay-veth.json");
    let r = relay_report("veth-ring,veth-bare", &json);
    let v = r["variants"].as_array().unwrap();
    assert_eq!(v.len(), 2);
    for x in v {
        assert_eq!(x["path"], "veth", "{x}");
        assert!(x["rounds"].as_u64().unwrap() >= 1, "{x}");
        // The forwarder's NAPI thread did the receive work, on its core.
        assert!(x["napi_cpu_seconds"].as_f64().unwrap() >= 0.0, "{x}");
        assert!(x["core_cpu_ns_per_cell"].as_f64().unwrap() > 0.0, "{x}");
    }
    assert!(r["ratios"]["veth_ring_vs_veth_bare_core_cpu"].is_f64());
    // Nothing is left behind.
    let after = namespaces();
    assert!(after.iter().all(|n| before.contains(n)), "{after:?}");
    let _ = std::fs::remove_file(json);
}

#[test]
fn circuit_benchmark_reports_sweep_per_hop_latency_and_setups() {
    let json = tmp("circuit.json");
    let (r, _) = report(
        &["circuit", "--duration", "4.5", "--net", "63"],
        &json,
        &[
            std::ffi::OsStr::new("--plot"),
            tmp("circuit.svg").as_os_str(),
        ],
    );
    assert_eq!(r["schema"], "shroud-bench/circuit/1");
    assert_eq!(r["sealing"], "ahead");
    assert!(r["payload_mb_per_sec"].as_f64().unwrap() > 0.0);
    let sweep = r["sweep"].as_array().unwrap();
    assert_eq!(sweep.len(), 5);
    for p in sweep {
        // Paced: a step sends no more than its offered rate (plus one burst).
        let (offered, sent) = (
            p["offered_cells_per_sec"].as_f64().unwrap(),
            p["sent_cells_per_sec"].as_f64().unwrap(),
        );
        assert!(sent > 0.0 && sent <= offered * 1.05 + 1024.0, "{p}");
    }
    for p in sweep {
        for k in ["offered_cells_per_sec", "delivered_cells_per_sec"] {
            assert!(p[k].is_f64(), "{k}: {p}");
        }
        assert!(p["p99_us"].is_u64(), "{p}");
    }
    assert!(r["per_hop_latency_us"]["p50"].is_f64());
    assert!(r["per_hop_latency_us"]["p99"].is_f64());
    assert!(r["per_hop_latency_us"]["one_hop_p99_us_median"].is_f64());
    assert!(r["setups_per_sec"].as_f64().unwrap() > 0.0);
    assert!(r["setups_per_sec_per_relay_core"].is_f64());
    assert!(r["latency_cdf_us"].as_array().unwrap().len() > 10);
    let svg = std::fs::read_to_string(tmp("circuit.svg")).unwrap();
    assert!(svg.starts_with("<svg"), "not an SVG");
    assert_eq!(
        svg.matches("<circle").count(),
        5,
        "one marker per sweep point"
    );
    assert!(svg.contains("<polyline"), "no lines drawn");
    let _ = std::fs::remove_file(json);
    let _ = std::fs::remove_file(tmp("circuit.svg"));
}

#[test]
fn flood_reports_every_case_and_ratio() {
    let json = tmp("flood.json");
    let (r, out) = report(
        &[
            "flood",
            "--duration",
            "1",
            "--sources",
            "1",
            "--rate",
            "5000",
            "--net",
            "64",
        ],
        &json,
        &[],
    );
    assert_eq!(r["schema"], "shroud-bench/flood/1");
    let cases = r["cases"].as_array().expect("cases");
    // 1 source x {after, before} circuits x {sink, relays}.
    assert_eq!(cases.len(), 4, "{r}");
    for c in cases {
        assert!(c["flood_datagrams"].as_u64().unwrap() > 0, "{c}");
        assert!(c["payload_mb_per_sec"].as_f64().is_some(), "{c}");
        assert!(c["udp_rcvbuf_errors"].as_u64().is_some(), "{c}");
        if c["flood_at"] == "relays" && c.get("error").is_none() {
            let drops = c["relay_drops"].as_object().expect("relay drop counters");
            let counted: u64 = drops.values().filter_map(Value::as_u64).sum();
            assert!(counted > 0, "the relays counted none of the flood: {c}");
        }
    }
    let ratios = r["ratios"].as_array().expect("ratios");
    assert_eq!(ratios.len(), 2);
    for x in ratios {
        assert!(x["ratio"].as_f64().is_some(), "{x}");
    }
    assert!(r["min_ratio"].as_f64().is_some());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("lowest ratio"), "{stdout}");
    let _ = std::fs::remove_file(&json);
}

#[test]
fn proxy_reports_one_stream_against_direct_loopback() {
    // Needs shroud-proxy and shroud-relay next to this binary (`cargo build
    // -p shroud-proxy -p shroud-relay`, or any workspace build).
    let json = tmp("proxy.json");
    let (r, _) = report(
        &[
            "proxy",
            "--size",
            "1000000",
            "--runs",
            "1",
            "--parallel",
            "2",
            "--net",
            "97",
        ],
        &json,
        &[],
    );
    assert_eq!(r["schema"], "shroud-bench/proxy/1");
    assert_eq!(r["bytes_per_stream"], 1_000_000);
    for side in ["direct_loopback", "proxy"] {
        assert_eq!(r[side]["runs"], 1, "{r}");
        assert!(r[side]["mbytes_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r[side]["ttfb_ms"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(r["proxy_cold_ttfb_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(r["parallel"]["streams"], 2);
    assert!(r["parallel"]["mbytes_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(r["relay_drops"].as_array().unwrap().len(), 3);
    assert!(r["ratio_to_tor"].as_f64().unwrap() > 0.0);
    assert!(r["machine"]["cores"].as_u64().unwrap() > 0);
}

#[test]
fn setups_benchmark_reports_the_relay_against_its_baselines() {
    let json = tmp("setups.json");
    let (r, out) = report(
        &["setups", "--setups", "300", "--rounds", "2", "--net", "65"],
        &json,
        &[],
    );
    assert_eq!(r["schema"], "shroud-bench/setups/1");
    // Every setup sent in a window reaches the relay's budget, so all are accepted.
    assert_eq!(r["accepted"], 600, "{r}");
    for k in [
        "relay_cpu_us_per_setup",
        "setups_per_sec_per_relay_core",
        "bare_x25519_us",
        "decode_and_x25519_us",
        "share_of_bare_x25519",
        "share_of_decode_and_x25519",
    ] {
        assert!(r[k].as_f64().unwrap() > 0.0, "{k}: {r}");
    }
    assert_eq!(
        r["relay_cpu_us_per_setup_rounds"].as_array().unwrap().len(),
        2
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ratio relay_vs_bare_x25519"), "{text}");
    let _ = std::fs::remove_file(json);
}
