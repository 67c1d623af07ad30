//! The real `shroudctl` binary against real `shroud-relay` processes: live status
//! (table and JSON), `top`, reload/rotate/drain/shutdown, exit codes, onion-key
//! rotation with `shroudctl daemon --once` under traffic (no cell lost), the
//! Prometheus endpoint checked by a real parser, the admin socket's permissions and
//! peer-credential check against another user, the peer-list rollback state across
//! restarts, and a peer list expiring while the relay runs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shroud_client::{udp_echo_server, CircuitId, Client, EchoHandle};
use shroud_proto::keys::OnionPublic;
use shroud_proto::peerlist::PeerList;
use shroud_tests::{now_s, shroudctl_bin, write_key, NetOpts, TestNet};

const T: Duration = Duration::from_secs(5);
const H: u64 = 3_600;

fn echo(net: u8) -> (SocketAddr, EchoHandle) {
    udp_echo_server(SocketAddr::from(([127, 0, net, 250], 0))).expect("echo server")
}

/// What a run of `shroudctl` produced.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().expect("shroudctl killed by a signal"),
            stdout: String::from_utf8(out.stdout).expect("stdout UTF-8"),
            stderr: String::from_utf8(out.stderr).expect("stderr UTF-8"),
        }
    }

    fn ok(self) -> String {
        assert_eq!(self.code, 0, "expected success: {self:#?}");
        self.stdout
    }

    fn fails(self, code: i32, needles: &[&str]) -> String {
        assert_eq!(self.code, code, "expected exit {code}: {self:#?}");
        for n in needles {
            assert!(self.stderr.contains(n), "stderr lacks {n:?}: {self:#?}");
        }
        self.stderr
    }
}

fn ctl() -> Command {
    let mut c = Command::new(shroudctl_bin());
    c.env_remove("SHROUD_ADMIN_SOCKET").stdin(Stdio::null());
    c
}

fn run(args: &[&str]) -> Run {
    Run::from(ctl().args(args).output().expect("run shroudctl"))
}

fn sock(net: &TestNet, i: usize) -> String {
    net.relays[i].admin.display().to_string()
}

/// Keeps a circuit busy from a thread: sends numbered payloads and checks each one
/// comes back through the echo server, in order and intact.
struct Traffic {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, Vec<String>)>,
}

impl Traffic {
    fn start(mut client: Client, id: CircuitId) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            let mut errors = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let payload = n.to_be_bytes();
                if let Err(e) = client.send(id, &payload) {
                    errors.push(format!("send {n}: {e}"));
                    break;
                }
                match client.recv(T) {
                    Ok((got_id, got)) if got_id == id && got == payload => {}
                    Ok((got_id, got)) => errors.push(format!("{n}: got {got:?} on {got_id:?}")),
                    Err(e) => errors.push(format!("{n}: lost ({e})")),
                }
                n += 1;
            }
            (n, errors)
        });
        Traffic { stop, thread }
    }

    /// Stops and returns how many payloads made the round trip.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let (n, errors) = self.thread.join().expect("traffic thread");
        assert!(errors.is_empty(), "cells lost or damaged: {errors:?}");
        n
    }
}

/// A 1-hop circuit through relay `i` to the echo server, busy in a thread.
fn traffic(net: &TestNet, i: usize, dest: SocketAddr) -> Traffic {
    let mut c = net.client();
    let id = c
        .build_circuit(&net.path(&[i]), dest, T)
        .unwrap_or_else(|e| panic!("circuit: {e}\n{}", net.log(i)));
    Traffic::start(c, id)
}

#[test]
fn status_prints_a_table_and_json_with_rates() {
    let mut opts = NetOpts::new(40, 1);
    opts.workers = 2;
    let net = TestNet::start(opts);
    let (dest, _echo) = echo(40);
    let busy = traffic(&net, 0, dest);
    let s = sock(&net, 0);

    let table = run(&["status", "--socket", &s, "--interval", "0.5"]).ok();
    let id = net.relays[0].id.to_string();
    let onion = net.list.relays[0].onion_keys[0].key.to_string();
    for want in [
        &format!("relay {id}"),
        "accepting circuits",
        "peer list serial 1, 1 relays, expires ",
        &format!("  {onion}  expires "),
        "workers (rates over 0.5 s)",
        "WORKER  PORT  DRIVER",
        "drops by reason",
        "bad_tag",
    ] {
        assert!(table.contains(want), "{want:?} missing:\n{table}");
    }
    let row = |port: &str| -> Vec<String> {
        table
            .lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .find(|cells| cells.get(1).map(String::as_str) == Some(port))
            .unwrap_or_else(|| panic!("no row for port {port}:\n{table}"))
    };
    // The circuit uses the relay's first port: worker 0 forwards cells, both ways.
    let w0 = row("9000");
    assert_eq!(w0[0], "0");
    assert!(["io_uring", "recvmmsg"].contains(&w0[2].as_str()), "{w0:?}");
    let rx: f64 = w0[3].parse().expect("rx cells/s");
    let tx: f64 = w0[4].parse().expect("tx cells/s");
    assert!(rx > 0.0 && tx > 0.0, "{w0:?}\n{table}");
    assert_eq!(w0[7], "1", "one circuit on worker 0: {w0:?}");
    assert_eq!(row("9001")[3], "0.0");
    assert!(table.lines().any(|l| l.trim_start().starts_with("total")));

    let out = run(&["status", "--socket", &s, "--json", "--interval", "0.3"]).ok();
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["status"]["relay_id"], id.as_str());
    assert_eq!(v["status"]["workers"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["status"]["onion_keys"][0]["public"], onion.as_str());
    let interval = v["rates"]["interval_s"].as_f64().expect("interval");
    assert!((0.3..2.0).contains(&interval), "{interval}");
    assert!(
        v["rates"]["workers"][0]["cells_rx_per_s"].as_f64() > Some(0.0),
        "{v}"
    );
    assert!(
        v["rates"]["total"]["cells_tx_per_s"].as_f64() > Some(0.0),
        "{v}"
    );
    assert!(v["rates"]["drops_per_s"]["bad_tag"].is_number(), "{v}");
    // Batch latency is observed while cells flow.
    assert!(
        v["status"]["workers"][0]["stats"]["batch_latency"]["count"].as_u64() > Some(0),
        "{v}"
    );

    // One sample, no rates; the socket from the environment.
    let out = Run::from(
        ctl()
            .args(["status", "--json", "--interval", "0"])
            .env("SHROUD_ADMIN_SOCKET", &s)
            .output()
            .expect("run"),
    )
    .ok();
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["rates"], Value::Null);
    assert_eq!(v["status"]["relay_id"], id.as_str());
    assert!(busy.finish() > 0);

    // Once the traffic has stopped, every cell the relay received has its time in
    // the relay observed, once: the kernel stamped each datagram on arrival.
    std::thread::sleep(Duration::from_millis(200));
    let out = run(&["status", "--socket", &s, "--json", "--interval", "0"]).ok();
    let v: Value = serde_json::from_str(&out).expect("JSON");
    let w0 = &v["status"]["workers"][0]["stats"];
    let rx = w0["cells_rx"].as_u64().expect("cells_rx");
    let residence = &w0["cell_residence"];
    assert!(rx > 0, "{v}");
    assert_eq!(residence["count"].as_u64(), Some(rx), "{v}");
    let buckets = residence["buckets"].as_array().expect("buckets");
    let cumulative: Vec<u64> = buckets.iter().filter_map(|b| b[1].as_u64()).collect();
    assert_eq!(cumulative.len(), buckets.len(), "{residence}");
    assert!(cumulative.windows(2).all(|w| w[0] <= w[1]), "{residence}");
    assert!(residence["sum_s"].as_f64() > Some(0.0), "{residence}");
}

#[test]
fn top_redraws_the_given_number_of_frames() {
    let net = TestNet::start(NetOpts::new(41, 1));
    let s = sock(&net, 0);
    let started = Instant::now();
    let out = run(&[
        "top",
        "--socket",
        &s,
        "--iterations",
        "2",
        "--interval",
        "0.2",
    ])
    .ok();
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(out.matches("shroudctl top: ").count(), 2, "{out}");
    assert_eq!(
        out.matches("workers (rates over 0.2 s)").count(),
        2,
        "{out}"
    );
    // Not a terminal: no escape sequences, frames one after the other.
    assert!(!out.contains('\x1b'), "{out:?}");
    run(&["top", "--socket", &s, "--iterations", "0"]).fails(2, &["iterations"]);
}

#[test]
fn reload_rotate_drain_and_shutdown() {
    let mut net = TestNet::start(NetOpts::new(42, 1));
    let (dest, _echo) = echo(42);
    let s = sock(&net, 0);
    let busy = traffic(&net, 0, dest);

    let out = run(&["reload", "--socket", &s]).ok();
    assert_eq!(
        out,
        "reloaded: peer list serial 1, 1 relay(s); 1 onion key(s)\n"
    );
    let out = run(&["reload", "--socket", &s, "--json"]).ok();
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["serial"], 1);

    let out = run(&["rotate", "--socket", &s]).ok();
    let onion = net.list.relays[0].onion_keys[0].key.to_string();
    assert!(
        out.starts_with("rotated: the relay holds 1 onion key(s), newest first\n"),
        "{out}"
    );
    assert!(out.contains(&format!("  {onion}  expires ")), "{out}");

    // A refused reload: exit 1, the relay's reason and the socket named; the relay
    // keeps its peer list and keeps forwarding.
    let good = std::fs::read_to_string(&net.list_path).expect("list");
    std::fs::write(&net.list_path, good.replace("weight 100", "weight 101")).expect("write");
    let err = run(&["reload", "--socket", &s]).fails(1, &["refused `reload`", &s]);
    assert!(err.contains("forged") || err.contains("signature"), "{err}");
    std::fs::write(&net.list_path, &good).expect("write");

    // The running relay's peer list, as `peers list` prints a file's.
    let out = run(&["peers", "list", "--running", "--socket", &s]).ok();
    let first = out.lines().next().unwrap_or_default();
    assert_eq!(
        first,
        format!("peer list in use by the relay at {s}: serial 1"),
        "{out}"
    );
    assert!(out.contains(&net.relays[0].id.to_string()), "{out}");
    let out = run(&["peers", "list", "--running", "--socket", &s, "--json"]).ok();
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["serial"], 1, "{v}");
    assert_eq!(
        v["relays"][0]["relay_id"],
        net.relays[0].id.to_string(),
        "{v}"
    );

    let out = run(&["drain", "--socket", &s, "--timeout", "30"]).ok();
    assert!(
        out.starts_with("draining: the relay refuses new circuits"),
        "{out}"
    );
    let table = run(&["status", "--socket", &s, "--interval", "0"]).ok();
    assert!(table.contains("DRAINING"), "{table}");
    // The existing circuit still delivers while draining.
    assert!(busy.finish() > 0);

    let out = run(&["shutdown", "--socket", &s]).ok();
    assert_eq!(out, "stopping: the relay is shutting down\n");
    assert_eq!(
        net.wait_exit(0, Duration::from_secs(10)),
        Some(0),
        "{}",
        net.log(0)
    );
    // Now nothing answers: exit 1, naming the socket, with a hint.
    run(&["status", "--socket", &s]).fails(1, &[&s, "hint: is shroud-relay running?"]);
}

#[test]
fn exit_codes_for_usage_unreachable_and_config_errors() {
    let dir = shroud_tests::temp_dir("ctl-codes");
    let missing = dir.join("nobody.sock");
    let m = missing.display().to_string();
    for cmd in ["status", "top", "reload", "rotate", "drain", "shutdown"] {
        run(&[cmd, "--socket", &m]).fails(1, &["cannot reach the relay's admin socket", &m]);
    }
    // The environment variable, then the default path, name the socket tried.
    let r = Run::from(
        ctl()
            .args(["reload"])
            .env("SHROUD_ADMIN_SOCKET", &missing)
            .output()
            .expect("run"),
    );
    r.fails(1, &[&m]);

    run(&["status", "--interval=-1"]).fails(2, &["--interval"]);
    run(&["drain", "--timeout", "soon"]).fails(2, &["--timeout"]);
    run(&["frobnicate"]).fails(2, &[]);
    let kd = dir.join("keys");
    let k = kd.display().to_string();
    run(&["daemon", "--key-dir", &k, "--now", "5"]).fails(2, &["--once"]);
    run(&["daemon", "--key-dir", &k, "--descriptor-out", "d"]).fails(2, &["--identity-key"]);
    run(&["daemon", "--key-dir", &k, "--lead", "30h", "--once"]).fails(2, &["--lead"]);

    // A key file with group/other access in the key directory: 78, with the fix.
    std::fs::create_dir_all(&kd).expect("mkdir");
    let bad = kd.join(format!("onion-{}.key", now_s()));
    write_key(&bad, &[4; 32]);
    std::fs::set_permissions(&bad, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    run(&["daemon", "--key-dir", &k, "--socket", &m, "--once"]).fails(78, &["chmod 600"]);
    // A correct directory but no relay: 1.
    std::fs::remove_file(&bad).expect("rm");
    run(&["daemon", "--key-dir", &k, "--socket", &m, "--once"])
        .fails(1, &["cannot reach the relay's admin socket"]);

    // Descriptors: malformed is 78, a bad signature is 1; the list is untouched.
    let list = dir.join("list");
    run(&[
        "peers",
        "new",
        "--out",
        &list.display().to_string(),
        "--serial",
        "1",
        "--valid-for",
        "1d",
    ])
    .ok();
    let before = std::fs::read(&list).expect("list");
    let desc = dir.join("d");
    std::fs::write(&desc, "shroud-descriptor 1\nnonsense\n").expect("write");
    let l = list.display().to_string();
    let d = desc.display().to_string();
    run(&["peers", "import", &l, "--descriptor", &d]).fails(78, &["not a valid relay descriptor"]);
    assert_eq!(std::fs::read(&list).expect("list"), before);
    let _ = std::fs::remove_dir_all(&dir);
}

fn daemon_args<'a>(
    net: &'a TestNet,
    i: usize,
    out: &'a str,
    addr: &'a str,
    now: &'a str,
) -> Vec<String> {
    let r = &net.relays[i];
    vec![
        "daemon".into(),
        "--key-dir".into(),
        r.key_dir.display().to_string(),
        "--socket".into(),
        r.admin.display().to_string(),
        "--descriptor-out".into(),
        out.into(),
        "--identity-key".into(),
        r.identity_key.display().to_string(),
        "--addr".into(),
        addr.into(),
        "--ports".into(),
        format!("{}-{}", r.ports.0, r.ports.1),
        "--exit".into(),
        "--once".into(),
        "--now".into(),
        now.into(),
    ]
}

fn key_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("key dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn onion_keys(net: &TestNet, i: usize) -> Vec<String> {
    let s = net.admin(i, json!({"cmd": "status"}));
    s["result"]["onion_keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["public"].as_str().expect("public").to_owned())
        .collect()
}

#[test]
fn daemon_rotation_under_traffic_loses_no_cells() {
    let mut opts = NetOpts::new(43, 3);
    opts.onion_key_dir = true;
    let mut net = TestNet::start(opts);
    let (dest, echo) = echo(43);
    let r1 = &net.relays[1];
    let key_dir = r1.key_dir.clone();
    // The harness named the first key after its start time minus 60 s.
    let files = key_files(&key_dir);
    assert_eq!(files.len(), 1, "{files:?}");
    let first_key = files[0].clone();
    let t0: u64 = first_key
        .strip_prefix("onion-")
        .and_then(|s| s.strip_suffix(".key"))
        .and_then(|s| s.parse().ok())
        .expect("onion-<T>.key");
    assert!(now_s().abs_diff(t0 + 60) < 60, "{first_key}");
    let old_public = net
        .list
        .relays
        .iter()
        .find(|r| r.relay_id() == r1.id)
        .expect("r1")
        .onion_keys[0]
        .key;

    // A 3-hop circuit through relay 1, kept busy for the whole test.
    let mut c = net.client();
    let id = c
        .build_circuit(&net.path(&[0, 1, 2]), dest, T)
        .expect("circuit");
    let busy = Traffic::start(c, id);
    std::thread::sleep(Duration::from_millis(200));

    // Step 1, an hour before the first key's lifetime (24 h) ends: a new key, the
    // relay told to rotate, then the descriptor written.
    let desc = net.dir.join("relay1.descriptor");
    let d = desc.display().to_string();
    let addr = net.relays[1].addr.to_string();
    let t1 = t0 + 23 * H;
    let out = Run::from(
        ctl()
            .args(daemon_args(&net, 1, &d, &addr, &t1.to_string()))
            .output()
            .expect("daemon"),
    )
    .ok();
    let second_key = format!("onion-{t1}.key");
    assert!(
        out.contains(&format!(
            "created onion key {}",
            key_dir.join(&second_key).display()
        )),
        "{out}"
    );
    assert!(
        out.contains("relay rotated: it holds 2 onion key(s)"),
        "{out}"
    );
    assert!(out.contains(&format!("wrote descriptor {d}")), "{out}");
    assert!(
        out.contains("next: drop an expired key from the descriptor at "),
        "{out}"
    );
    assert_eq!(
        key_files(&key_dir),
        vec![first_key.clone(), second_key.clone()]
    );
    let held = onion_keys(&net, 1);
    assert_eq!(held.len(), 2);
    assert_eq!(held[1], old_public.to_string());
    let new_public: OnionPublic = held[0].parse().expect("public");
    // Nothing more is due at the same time.
    let out = Run::from(
        ctl()
            .args(daemon_args(&net, 1, &d, &addr, &(t1 + 60).to_string()))
            .output()
            .expect("daemon"),
    )
    .ok();
    assert!(out.starts_with("nothing due\n"), "{out}");

    // The authority imports the descriptor, signs, publishes; relays reload.
    let list_path = net.list_path.display().to_string();
    let authority = net.dir.join("authority.key");
    write_key(&authority, &net.authority.to_bytes());
    // A descriptor altered in transit is refused (exit 1) and the list untouched.
    let tampered = net.dir.join("tampered.descriptor");
    let text = std::fs::read_to_string(&desc).expect("descriptor");
    std::fs::write(&tampered, text.replace("weight 100", "weight 1000")).expect("write");
    let before = std::fs::read(&net.list_path).expect("list");
    run(&[
        "peers",
        "import",
        &list_path,
        "--descriptor",
        &tampered.display().to_string(),
    ])
    .fails(1, &["does not verify"]);
    assert_eq!(std::fs::read(&net.list_path).expect("list"), before);
    let out = run(&["peers", "import", &list_path, "--descriptor", &d]).ok();
    assert!(
        out.starts_with(&format!("replaced relay {}", net.relays[1].id)),
        "{out}"
    );
    run(&[
        "peers",
        "sign",
        &list_path,
        "--key",
        &authority.display().to_string(),
        "--serial",
        "2",
    ])
    .ok();
    let list = PeerList::parse(&std::fs::read_to_string(&net.list_path).expect("list"))
        .expect("list parses");
    let listed = list.relay_by_id(&net.relays[1].id).expect("relay 1 listed");
    assert_eq!(listed.onion_keys.len(), 2);
    assert_eq!(listed.onion_keys[1].key, new_public);
    assert_eq!(listed.onion_keys[1].valid_until, t1 + 24 * H);
    net.set_list(list);
    for i in 0..3 {
        assert_eq!(net.admin(i, json!({"cmd": "reload"}))["ok"], true);
    }
    // New circuits use the new key (the listed key with the latest expiry).
    let mut c2 = net.client();
    let path = net.path(&[1, 2]);
    assert_eq!(path[0].onion, new_public);
    let id2 = c2
        .build_circuit(&path, dest, T)
        .expect("circuit with the new key");
    c2.send(id2, b"new key").expect("send");
    assert_eq!(c2.recv(T).expect("reply").1, b"new key");

    // Step 2, after the first key's lifetime and grace: it is erased and the
    // relay forgets it.
    let t2 = t0 + 26 * H;
    let out = Run::from(
        ctl()
            .args(daemon_args(&net, 1, &d, &addr, &t2.to_string()))
            .output()
            .expect("daemon"),
    )
    .ok();
    assert!(
        out.contains(&format!(
            "erased onion key {}",
            key_dir.join(&first_key).display()
        )),
        "{out}"
    );
    assert!(
        out.contains("relay rotated: it holds 1 onion key(s)"),
        "{out}"
    );
    assert_eq!(key_files(&key_dir), vec![second_key]);
    assert_eq!(onion_keys(&net, 1), vec![new_public.to_string()]);

    // Every payload of the busy circuit came back, through both rotations.
    std::thread::sleep(Duration::from_millis(200));
    let n = busy.finish();
    assert!(n > 10, "only {n} round trips");
    assert_eq!(net.drops(1, "bad_tag"), 0);
    assert_eq!(net.drops(1, "unknown_circuit"), 0);
    // The new-key circuit still works; a setup with the erased key is refused.
    c2.send(id2, b"still").expect("send");
    assert_eq!(c2.recv(T).expect("reply").1, b"still");
    let mut stale = net.path(&[1, 2]);
    stale[0].onion = old_public;
    let mut c3 = net.client();
    assert!(
        c3.build_circuit(&stale, dest, Duration::from_secs(1))
            .is_err(),
        "the relay still accepts the erased key"
    );
    assert!(echo.datagrams() > n);

    // The relay's own status shows the key directory and creation times.
    let table = run(&["status", "--socket", &sock(&net, 1), "--interval", "0"]).ok();
    assert!(
        table.contains(&format!("from {}", key_dir.display())),
        "{table}"
    );
    assert!(
        table.contains(&format!("  {new_public}  expires ")),
        "{table}"
    );
}

/// GET /metrics, returning the body.
fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(T)).expect("timeout");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("GET");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let (head, body) = resp.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    body.to_owned()
}

/// Runs the reference OpenMetrics parser (Python's `prometheus_client`, from PyPI;
/// .ci/run installs it) over `text`. `None` when it is not installed.
fn check_with_real_parser(text: &str) -> Option<(String, Output)> {
    let probe = Command::new("python3")
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .output()
        .ok()?;
    if !probe.status.success() {
        return None;
    }
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as p\n\
             n = sum(len(f.samples) for f in p(sys.stdin.read()))\nprint(n, 'samples')",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed the parser");
    let out = child.wait_with_output().expect("parser output");
    Some(("python3 prometheus_client.openmetrics.parser".into(), out))
}

#[test]
fn metrics_endpoint_serves_valid_prometheus_text() {
    let mut opts = NetOpts::new(44, 1);
    opts.metrics = true;
    opts.workers = 2;
    let net = TestNet::start(opts);
    let (dest, _echo) = echo(44);
    let busy = traffic(&net, 0, dest);
    std::thread::sleep(Duration::from_millis(300));
    assert!(busy.finish() > 0);
    let addr = net.relays[0].metrics.expect("metrics address");
    let text = scrape(addr);

    let onion = net.list.relays[0].onion_keys[0];
    let label: String = onion.key.to_string().chars().take(8).collect();
    for want in [
        format!(
            "shroud_onion_key_expiry_timestamp_seconds{{key=\"{label}\"}} {}\n",
            onion.valid_until
        ),
        "shroud_peer_list_serial 1\n".to_owned(),
        format!(
            "shroud_peer_list_expiry_timestamp_seconds {}\n",
            net.list.valid_until
        ),
        "shroud_onion_keys 1\n".to_owned(),
        "# TYPE shroud_batch_latency_seconds histogram\n".to_owned(),
        "shroud_batch_latency_seconds_bucket{le=\"+Inf\",worker=\"1\",port=\"9001\"} ".to_owned(),
        "# TYPE shroud_cell_residence_seconds histogram\n".to_owned(),
        "shroud_cell_residence_seconds_bucket{le=\"0.001\",worker=\"0\",port=\"9000\"} ".to_owned(),
        "shroud_build_info{version=\"0.1.0\",".to_owned(),
        "shroud_reloads_total{result=\"failure\"} 0\n".to_owned(),
        "shroud_last_reload_successful 1\n".to_owned(),
        "shroud_accepting 1\n".to_owned(),
        "shroud_cells_total{worker=\"0\",port=\"9000\",direction=\"rx\"} ".to_owned(),
        "shroud_drops_total{worker=\"0\",port=\"9000\",reason=\"bad_tag\"} 0\n".to_owned(),
        "shroud_setups_total{worker=\"0\",port=\"9000\"} 1\n".to_owned(),
        "shroud_draining 0\n".to_owned(),
    ] {
        assert!(text.contains(&want), "{want:?} missing:\n{text}");
    }
    let count: u64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("shroud_batch_latency_seconds_count{worker=\"0\",port=\"9000\"} ")
        })
        .and_then(|v| v.parse().ok())
        .expect("batch latency count");
    assert!(count > 0, "no batch latency observed:\n{text}");
    // Other paths are 404.
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(s, "GET / HTTP/1.1\r\n\r\n").expect("GET");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");

    match check_with_real_parser(&text) {
        Some((parser, out)) => {
            assert!(
                out.status.success(),
                "{parser} rejected the exposition:\n{}{}\n{text}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            eprintln!(
                "{parser}: accepted ({})",
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        // CI (`.ci/run`) installs a parser and sets SHROUD_REQUIRE_METRICS_PARSER, so
        // there a missing parser fails the test instead of skipping it.
        None if std::env::var_os("SHROUD_REQUIRE_METRICS_PARSER").is_some() => panic!(
            "SHROUD_REQUIRE_METRICS_PARSER is set but python3's prometheus_client \
             (the OpenMetrics parser) is not installed"
        ),
        None => eprintln!(
            "SKIPPED: python3's prometheus_client (PyPI) is not installed, so the \
             exposition was not checked by the OpenMetrics parser; .ci/run installs it \
             and requires it"
        ),
    }
}

#[test]
fn daemon_without_once_runs_steps_in_a_loop() {
    let mut opts = NetOpts::new(45, 1);
    opts.onion_key_dir = true;
    let net = TestNet::start(opts);
    let r = &net.relays[0];
    // The first key was created a minute ago; with a 120 s lifetime and a 61 s lead
    // the next key is due at once.
    let mut child = ctl()
        .args(["daemon", "--key-dir"])
        .arg(&r.key_dir)
        .arg("--socket")
        .arg(&r.admin)
        .args(["--lifetime", "120s", "--lead", "61s", "--grace", "1s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the daemon");
    let deadline = Instant::now() + Duration::from_secs(20);
    while onion_keys(&net, 0).len() < 2 {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the daemon exited with {status}");
        }
        assert!(Instant::now() < deadline, "no rotation:\n{}", net.log(0));
        std::thread::sleep(Duration::from_millis(50));
    }
    // Still running: it sleeps until the next event.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "the daemon exited"
    );
    child.kill().expect("kill");
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("shroudctl daemon: keeping onion keys in "),
        "{stdout}"
    );
    assert!(
        stdout.contains("shroudctl daemon: created onion key "),
        "{stdout}"
    );
    assert!(
        stdout.contains("shroudctl daemon: relay rotated: it holds 2 onion key(s)"),
        "{stdout}"
    );
    assert!(stdout.contains("shroudctl daemon: next: "), "{stdout}");
    assert_eq!(key_files(&r.key_dir).len(), 2);
}

/// `shroudctl` run as user nobody (65534), with `setpriv` or `runuser`; `None` when
/// this test does not run as root (it cannot switch users then).
fn ctl_as_nobody() -> Option<Command> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return None;
    }
    let setpriv = Command::new("setpriv").arg("--version").output();
    let mut c = if setpriv.is_ok_and(|o| o.status.success()) {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
        c
    } else {
        let mut c = Command::new("runuser");
        c.args(["-u", "nobody", "--"]);
        c
    };
    c.arg(shroudctl_bin())
        .env_remove("SHROUD_ADMIN_SOCKET")
        .stdin(Stdio::null());
    Some(c)
}

fn admin_refused(net: &TestNet, i: usize) -> u64 {
    let s = net.admin(i, json!({"cmd": "status"}));
    s["result"]["admin_refused"]
        .as_u64()
        .unwrap_or_else(|| panic!("no admin_refused in {s}"))
}

#[test]
fn admin_socket_is_owner_only_and_refuses_other_users() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let net = TestNet::start(NetOpts::new(46, 1));
    let path = &net.relays[0].admin;
    let meta = std::fs::symlink_metadata(path).expect("admin socket");
    assert!(meta.file_type().is_socket(), "{meta:?}");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    let Some(mut nobody) = ctl_as_nobody() else {
        eprintln!("SKIPPED: not root, so no client can be run as another user");
        return;
    };
    let s = sock(&net, 0);
    let status_as_nobody = |c: &mut Command| {
        Run::from(
            c.args(["status", "--json", "--interval", "0", "--socket", &s])
                .output()
                .expect("run shroudctl as nobody"),
        )
    };
    // Mode 0600: another user cannot even connect.
    let r = status_as_nobody(&mut nobody);
    assert!(r.stdout.is_empty(), "{r:#?}");
    r.fails(
        1,
        &["cannot reach the relay's admin socket", "Permission denied"],
    );
    assert_eq!(admin_refused(&net, 0), 0);

    // Loosened by mistake, the socket lets nobody connect: the relay reads its peer
    // credentials and closes the connection unanswered.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let mut nobody = ctl_as_nobody().expect("as nobody");
    let r = status_as_nobody(&mut nobody);
    assert!(r.stdout.is_empty(), "{r:#?}");
    let err = r.fails(1, &[&s]);
    assert!(!err.contains("relay_id"), "{err}");
    assert_eq!(admin_refused(&net, 0), 1);
    let log = net.log(0);
    assert_eq!(
        log.matches("refused an admin connection").count(),
        1,
        "{log}"
    );
    // The peer's identity stays out of the log above debug level.
    assert!(!log.contains("65534"), "{log}");
    // The relay's own user (root here) is still served.
    let out = run(&["status", "--socket", &s, "--json", "--interval", "0"]).ok();
    assert!(out.contains("relay_id"), "{out}");
}

#[test]
fn peer_list_state_survives_restarts_and_must_be_usable() {
    let mut net = TestNet::start(NetOpts::new(47, 1));
    let state = net.relays[0].peer_list_state.clone();
    let read_state = || std::fs::read_to_string(&state).expect("state file");
    // Missing at the first start: created with the serial in force.
    assert_eq!(read_state(), "1\n");
    let with_serial = |net: &mut TestNet, serial: u64| {
        let mut l = net.list.clone();
        l.serial = serial;
        net.set_list(l);
    };
    with_serial(&mut net, 3);
    assert_eq!(net.admin(0, json!({"cmd": "reload"}))["ok"], true);
    assert_eq!(read_state(), "3\n");

    // After a restart, an older (validly signed) list is refused: exit 78.
    with_serial(&mut net, 2);
    let start_fails = |net: &mut TestNet, needles: &[&str]| {
        net.kill(0);
        net.spawn(0);
        let code = net.wait_exit(0, Duration::from_secs(20));
        let log = net.log(0);
        assert_eq!(code, Some(78), "{log}");
        for n in needles {
            assert!(log.contains(n), "{n:?} missing: {log}");
        }
    };
    start_fails(
        &mut net,
        &["serial 2 is older than the last accepted serial 3"],
    );
    assert_eq!(read_state(), "3\n");

    // A corrupt or unreadable state file stops the start, naming the file.
    with_serial(&mut net, 3);
    let name = state.display().to_string();
    std::fs::write(&state, "three\n").expect("write");
    start_fails(&mut net, &["relay.peer_list_state", &name, "corrupt"]);
    std::fs::remove_file(&state).expect("rm");
    std::fs::create_dir(&state).expect("mkdir");
    start_fails(&mut net, &["relay.peer_list_state", &name]);
    std::fs::remove_dir(&state).expect("rmdir");
    std::fs::write(&state, "3\n").expect("write");
    net.restart(0);

    // A reload whose serial cannot be recorded is refused: the relay keeps its list.
    let cfg = std::fs::read_to_string(&net.relays[0].config).expect("config");
    let moved = cfg.replace(
        "peer_list_state = \"peer-list.serial\"",
        "peer_list_state = \"missing/peer-list.serial\"",
    );
    assert_ne!(cfg, moved);
    std::fs::write(&net.relays[0].config, moved).expect("config");
    with_serial(&mut net, 4);
    let r = net.admin(0, json!({"cmd": "reload"}));
    assert_eq!(r["ok"], false, "{r}");
    let e = r["error"].as_str().expect("error");
    assert!(e.contains("cannot record peer-list serial 4"), "{e}");
    let s = net.admin(0, json!({"cmd": "status"}));
    assert_eq!(s["result"]["peer_list"]["serial"], 3, "{s}");
}

#[test]
fn an_expired_peer_list_stops_new_circuits_until_a_reload() {
    let mut opts = NetOpts::new(48, 1);
    opts.metrics = true;
    opts.list_valid_for = 8;
    let mut net = TestNet::start(opts);
    let (dest, _echo) = echo(48);
    let s = sock(&net, 0);
    let metrics = net.relays[0].metrics.expect("metrics");
    let status = |net: &TestNet| net.admin(0, json!({"cmd": "status"}))["result"].clone();
    let mut c = net.client();
    let id = c
        .build_circuit(&net.path(&[0]), dest, T)
        .unwrap_or_else(|e| panic!("circuit before expiry: {e}\n{}", net.log(0)));
    let v = status(&net);
    assert_eq!(v["peer_list"]["expired"], false, "{v}");
    assert_eq!(v["accepting"], true, "{v}");
    assert!(scrape(metrics).contains("shroud_peer_list_expired 0\n"));

    // Past valid_until (plus two daemon ticks).
    let expires = net.list.valid_until;
    while now_s() < expires + 2 {
        std::thread::sleep(Duration::from_millis(200));
    }
    let v = status(&net);
    assert_eq!(v["peer_list"]["expired"], true, "{v}");
    assert_eq!(v["accepting"], false, "{v}");
    assert!(scrape(metrics).contains("shroud_peer_list_expired 1\n"));
    let table = run(&["status", "--socket", &s, "--interval", "0"]).ok();
    assert!(table.contains("PEER LIST EXPIRED"), "{table}");
    // The existing circuit keeps working.
    c.send(id, b"after expiry").expect("send");
    assert_eq!(c.recv(T).expect("reply").1, b"after expiry");
    // A new one is refused by the relay.
    let refused = net.drops(0, "capacity");
    let mut c2 = net.client();
    assert!(
        c2.build_circuit(&net.path(&[0]), dest, Duration::from_secs(2))
            .is_err(),
        "a circuit was built on an expired peer list"
    );
    assert!(net.drops(0, "capacity") > refused);
    // Logged once, not at every tick.
    std::thread::sleep(Duration::from_millis(1500));
    let log = net.log(0);
    assert_eq!(
        log.matches("the peer list in force has expired").count(),
        1,
        "{log}"
    );

    // Restarted on its expired list, the relay comes back (it used to exit 78 and
    // stay down) and still refuses new circuits, saying why.
    net.restart(0);
    let v = status(&net);
    assert_eq!(v["peer_list"]["expired"], true, "{v}");
    assert_eq!(v["accepting"], false, "{v}");
    assert!(scrape(metrics).contains("shroud_peer_list_expired 1\n"));
    assert!(
        net.log(0)
            .contains("the peer list has expired: starting on it"),
        "{}",
        net.log(0)
    );
    let mut c2 = net.client();
    assert!(
        c2.build_circuit(&net.path(&[0]), dest, Duration::from_secs(2))
            .is_err(),
        "a circuit was built on an expired peer list after a restart"
    );

    // A reload of the same, expired list changes nothing.
    assert_eq!(net.admin(0, json!({"cmd": "reload"}))["ok"], false);
    assert_eq!(status(&net)["accepting"], false);
    let m = scrape(metrics);
    for want in [
        "shroud_reloads_total{result=\"failure\"} 1\n",
        "shroud_reloads_total{result=\"success\"} 0\n",
        "shroud_last_reload_successful 0\n",
        "shroud_accepting 0\n",
    ] {
        assert!(m.contains(want), "{want:?} missing:\n{m}");
    }
    // A fresh list and a reload: new circuits again.
    let mut l = net.list.clone();
    l.serial = 2;
    l.valid_until = now_s() + 3600;
    net.set_list(l);
    assert_eq!(net.admin(0, json!({"cmd": "reload"}))["ok"], true);
    let v = status(&net);
    assert_eq!(v["peer_list"]["expired"], false, "{v}");
    assert_eq!(v["accepting"], true, "{v}");
    let m = scrape(metrics);
    for want in [
        "shroud_peer_list_expired 0\n",
        "shroud_reloads_total{result=\"success\"} 1\n",
        "shroud_last_reload_successful 1\n",
        "shroud_accepting 1\n",
    ] {
        assert!(m.contains(want), "{want:?} missing:\n{m}");
    }
    let mut c3 = net.client();
    let id3 = c3
        .build_circuit(&net.path(&[0]), dest, T)
        .unwrap_or_else(|e| panic!("circuit after the reload: {e}\n{}", net.log(0)));
    c3.send(id3, b"fresh").expect("send");
    assert_eq!(c3.recv(T).expect("reply").1, b"fresh");
    assert!(net.log(0).contains("a valid peer list is in force again"));
}

/// Kills the process on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET `path` from `addr`, returning the body of a 200 answer.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(T)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// Percent-encodes a query-string value.
fn url_encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of an instant query's single sample, from Prometheus's HTTP API.
fn prometheus_value(api: SocketAddr, query: &str) -> Option<f64> {
    let body = http_get(api, &format!("/api/v1/query?query={}", url_encode(query)))?;
    let v: Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[test]
fn a_real_prometheus_scrapes_a_relay_carrying_traffic() {
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "SKIPPED: no prometheus server (Debian package `prometheus`, which .ci/run installs)"
        );
        return;
    }
    let mut opts = NetOpts::new(82, 1);
    opts.metrics = true;
    opts.workers = 2;
    let net = TestNet::start(opts);
    let (dest, _echo) = echo(82);
    let busy = traffic(&net, 0, dest);
    let target = net.relays[0].metrics.expect("metrics");
    let api: SocketAddr = "127.0.82.9:9090".parse().unwrap();
    let dir = net.dir.join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: shroud\n    static_configs:\n      - targets: [\"{target}\"]\n\
             rule_files: [\"{rules}\"]\n",
            rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../deploy/monitoring/shroud.rules.yml")
                .display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={api}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus"),
    );
    // Until Prometheus has scraped the relay and stored non-zero cell counters.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let cells = loop {
        let rx = prometheus_value(
            api,
            "sum(shroud_cells_total{job=\"shroud\",direction=\"rx\"})",
        );
        if let Some(v) = rx.filter(|v| *v > 0.0) {
            break v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Prometheus never reported cells: {:?}\n{}",
            rx,
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(cells > 0.0);
    assert_eq!(prometheus_value(api, "up{job=\"shroud\"}"), Some(1.0));
    // The OpenMetrics exposition's families arrive with their names and labels.
    assert_eq!(
        prometheus_value(
            api,
            "count(shroud_batch_latency_seconds_bucket{le=\"+Inf\"})"
        ),
        Some(2.0)
    );
    assert_eq!(
        prometheus_value(api, "shroud_build_info{job=\"shroud\"}"),
        Some(1.0)
    );
    // The shipped rules loaded, and none fires for this healthy relay.
    let rules = http_get(api, "/api/v1/rules").expect("rules API");
    assert!(rules.contains("ShroudRelayDown"), "{rules}");
    let alerts = http_get(api, "/api/v1/alerts").expect("alerts API");
    assert!(!alerts.contains("\"state\":\"firing\""), "{alerts}");
    assert!(busy.finish() > 0);
}
