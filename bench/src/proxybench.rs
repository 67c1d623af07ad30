//! `shroud-bench proxy`: one TCP stream through `shroud-proxy` (SOCKS5 → QUIC over a
//! 3-hop circuit → stream gateway → TCP), against the same transfer over direct
//! loopback TCP in the same run; and `parallel` streams at once, each on its own
//! circuit (distinct SOCKS credentials).
//!
//! The source is a TCP server in this process that writes as many bytes as each
//! connection asks for (a u64 it sends first) and closes it. Time to first byte is measured from the start of the
//! TCP connect (to the source, or to the proxy: SOCKS handshake and CONNECT
//! included) to the first byte of data; throughput over the whole transfer from
//! there. The first stream through the proxy (which may wait for its circuit) is
//! reported apart as the cold time to first byte. Relays, gateway and proxy are
//! release processes on `127.0.<net>.x`; everything shares this machine's cores.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};

use crate::net::{relay_binary, RelayCommand, RelaySpec};
use crate::report::{machine, median};

/// What to run.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Bytes per stream.
    pub size: u64,
    /// Single-stream runs (median reported).
    pub runs: usize,
    /// Streams at once in the parallel step (0: skip it).
    pub parallel: usize,
    /// Third octet of the loopback block.
    pub net: u8,
    /// The relays' I/O driver (`auto`, `uring`, `mmsg`).
    pub driver: String,
}

/// C Tor's single-stream figure on this machine (docs/BENCHMARKING.md), MB/s.
pub const TOR_SINGLE_STREAM_MBPS: f64 = 8.0;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `shroud-proxy` next to `shroud-relay` (built with cargo when run by cargo).
fn proxy_binary(relay: &Path) -> anyhow::Result<PathBuf> {
    let bin = relay.with_file_name("shroud-proxy");
    if let Ok(cargo) = std::env::var("CARGO") {
        let release = relay
            .parent()
            .and_then(|d| d.file_name())
            .is_some_and(|n| n == "release");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "shroud-proxy"]);
        if release {
            cmd.arg("--release");
        }
        if !cmd.status().context("cannot run cargo")?.success() {
            bail!("building shroud-proxy failed");
        }
    }
    if !bin.exists() {
        bail!(
            "{} not found: cargo build --release -p shroud-proxy",
            bin.display()
        );
    }
    Ok(bin)
}

fn spawn(bin: &Path, args: &[&str], log: &Path) -> anyhow::Result<Killed> {
    let mut c = Command::new(bin);
    c.args(args)
        .env(
            "SHROUD_LOG",
            std::env::var("SHROUD_BENCH_PROXY_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent; it
    // makes the kernel kill the child when the benchmark dies.
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    Ok(Killed(
        c.spawn()
            .with_context(|| format!("start {}", bin.display()))?,
    ))
}

/// A source: every connection sends a byte count (u64, big endian) and gets that
/// many bytes, then EOF.
fn source(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind(addr)?;
    let local = l.local_addr()?;
    std::thread::spawn(move || {
        let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 31 + 7) as u8).collect();
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let chunk = chunk.clone();
            std::thread::spawn(move || {
                let mut want = [0u8; 8];
                if s.read_exact(&mut want).is_err() {
                    return;
                }
                let mut left = u64::from_be_bytes(want);
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    if s.write_all(&chunk[..n]).is_err() {
                        return;
                    }
                    left -= n as u64;
                }
            });
        }
    });
    Ok(local)
}

/// One transfer's figures.
#[derive(Debug, Clone, Copy)]
struct Transfer {
    ttfb: Duration,
    total: Duration,
    bytes: u64,
}

impl Transfer {
    fn mbps(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.total.saturating_sub(self.ttfb).as_secs_f64().max(1e-9)
    }
}

fn read_all(mut s: TcpStream, start: Instant, expect: u64) -> anyhow::Result<Transfer> {
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(&expect.to_be_bytes())?;
    let mut buf = vec![0u8; 1 << 18];
    let mut got = 0u64;
    let mut first = None;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        first.get_or_insert_with(|| start.elapsed());
        got += n as u64;
    }
    if got != expect {
        bail!("received {got} bytes of {expect}");
    }
    Ok(Transfer {
        ttfb: first.unwrap_or_default(),
        total: start.elapsed(),
        bytes: got,
    })
}

fn direct(src: SocketAddr, size: u64) -> anyhow::Result<Transfer> {
    let start = Instant::now();
    let s = TcpStream::connect(src)?;
    read_all(s, start, size)
}

fn via_proxy(
    socks: SocketAddr,
    src: SocketAddr,
    size: u64,
    user: &str,
) -> anyhow::Result<Transfer> {
    let start = Instant::now();
    let mut s = TcpStream::connect(socks)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(&[5, 1, 2])?;
    let mut m = [0u8; 2];
    s.read_exact(&mut m)?;
    if m != [5, 2] {
        bail!("proxy chose method {m:?}");
    }
    let mut auth = vec![1, user.len() as u8];
    auth.extend_from_slice(user.as_bytes());
    auth.extend_from_slice(&[1, b'x']);
    s.write_all(&auth)?;
    s.read_exact(&mut m)?;
    let SocketAddr::V4(a) = src else {
        bail!("IPv4 source expected")
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&a.ip().octets());
    req.extend_from_slice(&a.port().to_be_bytes());
    s.write_all(&req)?;
    let mut r = [0u8; 10];
    s.read_exact(&mut r)?;
    if r[1] != 0 {
        bail!("SOCKS reply {}", r[1]);
    }
    read_all(s, start, size)
}

fn stats(v: &[Transfer]) -> Value {
    let mut mbps: Vec<f64> = v.iter().map(Transfer::mbps).collect();
    let mut ttfb: Vec<f64> = v.iter().map(|t| t.ttfb.as_secs_f64() * 1e3).collect();
    json!({
        "runs": v.len(),
        "mbytes_per_s": median(&mut mbps),
        "mbytes_per_s_all": mbps,
        "ttfb_ms": median(&mut ttfb),
    })
}

/// Runs the benchmark; returns the report.
pub fn run(o: &Opts) -> anyhow::Result<Value> {
    let relay = relay_binary()?;
    let proxy = proxy_binary(&relay)?;
    let n = o.net;
    let net = crate::net::start(
        n,
        &[
            RelaySpec::default(),
            RelaySpec::default(),
            RelaySpec::default(),
        ],
        &[],
        &RelayCommand::Binary(relay),
        1024,
    )?;
    let dir = net.dir.join("proxy");
    std::fs::create_dir_all(&dir)?;
    let src = source(format!("127.0.{n}.251:0").parse()?)?;
    let out = Command::new(&proxy)
        .arg("gen-cert")
        .arg("--cert")
        .arg(dir.join("gw.cert"))
        .arg("--key")
        .arg(dir.join("gw.key"))
        .output()?;
    if !out.status.success() {
        bail!("gen-cert: {}", String::from_utf8_lossy(&out.stderr));
    }
    let fp = String::from_utf8(out.stdout)?.trim().to_owned();
    let gw = format!("127.0.{n}.250:4433");
    std::fs::write(
        dir.join("gateway.toml"),
        format!(
            "[gateway]\nlisten = \"{gw}\"\ncert = \"gw.cert\"\nkey = \"gw.key\"\nexit_policy = [\"accept {}:*\"]\n",
            src.ip()
        ),
    )?;
    let gw_cfg = dir.join("gateway.toml");
    let _gateway = spawn(
        &proxy,
        &["gateway", "--config", &gw_cfg.display().to_string()],
        &dir.join("gateway.log"),
    )?;
    let socks: SocketAddr = format!("127.0.{n}.100:1080").parse()?;
    let cfg = dir.join("proxy.toml");
    std::fs::write(
        &cfg,
        format!(
            "[proxy]\nlisten = \"{socks}\"\npeer_list = {list:?}\nauthorities = [{auth:?}]\nbind = \"127.0.{n}.200:0\"\n\n\
             [gateway]\naddr = \"{gw}\"\ncert_sha256 = \"{fp}\"\n\n[circuits]\ndistinct_subnets = false\nprebuild = 1\n",
            list = net.list_path.display().to_string(),
            auth = net.authority.public().to_base64(),
        ),
    )?;
    let _proxy = spawn(
        &proxy,
        &["run", "--config", &cfg.display().to_string()],
        &dir.join("proxy.log"),
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(socks).is_err() {
        if Instant::now() > deadline {
            bail!(
                "shroud-proxy did not start: {}",
                std::fs::read_to_string(dir.join("proxy.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = || std::fs::read_to_string(dir.join("proxy.log")).unwrap_or_default();
    let cold = via_proxy(socks, src, 1000, "warmup").map_err(|e| anyhow!("{e}: {}", log()))?;
    let mut direct_runs = Vec::new();
    let mut proxy_runs = Vec::new();
    for r in 0..o.runs {
        direct_runs.push(direct(src, o.size)?);
        proxy_runs.push(
            via_proxy(socks, src, o.size, "warmup")
                .map_err(|e| anyhow!("run {r}: {e}: {}", log()))?,
        );
    }
    let mut parallel = Value::Null;
    if o.parallel > 0 {
        // Warm one circuit per stream first, then start every stream together.
        for i in 0..o.parallel {
            via_proxy(socks, src, 1000, &format!("p{i}"))?;
        }
        let start = Instant::now();
        let handles: Vec<_> = (0..o.parallel)
            .map(|i| {
                let size = o.size;
                std::thread::spawn(move || via_proxy(socks, src, size, &format!("p{i}")))
            })
            .collect();
        let mut total = 0u64;
        for h in handles {
            total += h
                .join()
                .map_err(|_| anyhow!("stream thread panicked"))??
                .bytes;
        }
        let secs = start.elapsed().as_secs_f64();
        parallel = json!({
            "streams": o.parallel,
            "mbytes_per_s": total as f64 / 1e6 / secs,
        });
    }
    // Where cells were dropped on the way (non-zero drop counters per relay).
    let drops: Vec<Value> = (0..net.relays.len())
        .map(|i| {
            let st = net
                .request(i, &shroud_admin::Request::Status)
                .unwrap_or(Value::Null);
            let nz: serde_json::Map<String, Value> = st["result"]["drops"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter(|(_, v)| v.as_u64().unwrap_or(0) > 0)
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default();
            Value::Object(nz)
        })
        .collect();
    let d = stats(&direct_runs);
    let p = stats(&proxy_runs);
    let pm = p["mbytes_per_s"].as_f64().unwrap_or(0.0);
    let dm = d["mbytes_per_s"].as_f64().unwrap_or(0.0);
    if std::env::var_os("SHROUD_BENCH_PROXY_LOG").is_some() {
        std::thread::sleep(Duration::from_millis(500));
        eprintln!(
            "--- proxy log:\n{}\n--- gateway log:\n{}",
            log(),
            std::fs::read_to_string(dir.join("gateway.log")).unwrap_or_default()
        );
    }
    drop(net);
    Ok(json!({
        "schema": "shroud-bench/proxy/1",
        "machine": machine(),
        "bytes_per_stream": o.size,
        "hops": 3,
        "driver": o.driver,
        "direct_loopback": d,
        "proxy": p,
        "proxy_cold_ttfb_ms": cold.ttfb.as_secs_f64() * 1e3,
        "parallel": parallel,
        "relay_drops": drops,
        "ratio_to_direct": pm / dm.max(1e-9),
        "tor_single_stream_mbytes_per_s": TOR_SINGLE_STREAM_MBPS,
        "ratio_to_tor": pm / TOR_SINGLE_STREAM_MBPS,
    }))
}

/// Prints the report as text.
pub fn print(r: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    println!(
        "one stream of {} bytes through 3 hops, relay driver {} (median of {} runs)",
        r["bytes_per_stream"], r["driver"], r["proxy"]["runs"]
    );
    println!(
        "  direct loopback TCP : {:>8.1} MB/s   time to first byte {:>7.3} ms",
        f(&r["direct_loopback"]["mbytes_per_s"]),
        f(&r["direct_loopback"]["ttfb_ms"])
    );
    println!(
        "  through shroud-proxy: {:>8.1} MB/s   time to first byte {:>7.3} ms (cold circuit: {:.3} ms)",
        f(&r["proxy"]["mbytes_per_s"]),
        f(&r["proxy"]["ttfb_ms"]),
        f(&r["proxy_cold_ttfb_ms"])
    );
    println!(
        "  ratio to direct {:.3}; to C Tor's single stream ({} MB/s): {:.1}x (goal 10x)",
        f(&r["ratio_to_direct"]),
        r["tor_single_stream_mbytes_per_s"],
        f(&r["ratio_to_tor"])
    );
    println!("  relay drop counters (non-zero): {}", r["relay_drops"]);
    if !r["parallel"].is_null() {
        println!(
            "  {} parallel streams, one circuit each: {:.1} MB/s in all",
            r["parallel"]["streams"],
            f(&r["parallel"]["mbytes_per_s"])
        );
    }
}
