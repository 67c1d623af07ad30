//! `shroud-proxy` with real processes: `shroud-relay`s from the harness, a
//! `shroud-proxy gateway` beside them, a `shroud-proxy run` SOCKS5 proxy, Python's
//! `http.server` as the destination and Debian's `curl` as the application. Every
//! check is on bytes, hashes and SOCKS reply codes.
//!
//! The binaries must be built first: `cargo build -p shroud-relay -p shroud-proxy`
//! (or set `SHROUD_PROXY_BIN`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use shroud_client::udp_echo_server;
use shroud_tests::{NetOpts, TestNet};

/// Path of the `shroud-proxy` binary (next to `shroud-relay`).
fn proxy_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SHROUD_PROXY_BIN") {
        return PathBuf::from(p);
    }
    let p = shroud_tests::relay_bin().with_file_name("shroud-proxy");
    assert!(
        p.exists(),
        "{} not built: run `cargo build -p shroud-proxy`",
        p.display()
    );
    p
}

/// Kills its process on drop.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(dir: &Path, name: &str, cmd: &mut Command) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let child = cmd
        .env("SHROUD_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    Proc { child, log }
}

/// Deterministic pseudo-random bytes (xorshift64*), fast enough for 100 MB.
fn file_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn wait_tcp(addr: SocketAddr, what: &str, logs: &dyn Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} not listening on {addr}: {}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Three or more relays, a gateway at `.250:4433`, an HTTP server at `.251:8080`
/// serving `small.bin` (64 KiB) and, when asked, `big.bin` (100 MB), and a proxy at
/// `.100:1080`.
struct ProxyNet {
    net: TestNet,
    dir: PathBuf,
    _http: Proc,
    gateway: Proc,
    proxy: Proc,
    socks: SocketAddr,
    http: SocketAddr,
    files: Vec<(String, String)>,
    config: PathBuf,
}

impl ProxyNet {
    fn start(n: u8, relays: usize, big: bool) -> ProxyNet {
        Self::start_with(n, relays, big, "")
    }

    /// [`ProxyNet::start`] with extra `[circuits]` settings.
    fn start_with(n: u8, relays: usize, big: bool, circuits: &str) -> ProxyNet {
        let net = TestNet::start(NetOpts::new(n, relays));
        let dir = net.dir.join("proxy");
        let www = dir.join("www");
        std::fs::create_dir_all(&www).unwrap();
        let mut files = Vec::new();
        let mut sizes = vec![("small.bin", 64 * 1024)];
        if big {
            sizes.push(("big.bin", 100_000_000));
        }
        for (i, (name, len)) in sizes.into_iter().enumerate() {
            let b = file_bytes(len, 0x5eed + i as u64);
            std::fs::write(www.join(name), &b).unwrap();
            files.push((name.to_owned(), sha256_hex(&b)));
        }
        let http: SocketAddr = format!("127.0.{n}.251:8080").parse().unwrap();
        let http_proc = spawn(
            &dir,
            "http",
            Command::new("python3")
                .args(["-m", "http.server", "8080", "--bind"])
                .arg(http.ip().to_string())
                .arg("--directory")
                .arg(&www),
        );
        // The gateway's certificate, pinned by the proxy.
        let out = Command::new(proxy_bin())
            .arg("gen-cert")
            .arg("--cert")
            .arg(dir.join("gw.cert"))
            .arg("--key")
            .arg(dir.join("gw.key"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let fingerprint = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        assert_eq!(fingerprint.len(), 64);
        let gw: SocketAddr = format!("127.0.{n}.250:4433").parse().unwrap();
        // Only the HTTP server's address and 127.0.0.1 are named: every other
        // loopback address (e.g. .252) is refused by the policy.
        std::fs::write(
            dir.join("gateway.toml"),
            format!(
                "[gateway]\nlisten = \"{gw}\"\ncert = \"gw.cert\"\nkey = \"gw.key\"\n\
                 exit_policy = [\"accept {}:*\", \"accept 127.0.0.1:*\"]\nidle_timeout_ms = 4000\n\
                 metrics = \"127.0.{n}.250:9103\"\n",
                http.ip()
            ),
        )
        .unwrap();
        let gateway = spawn(
            &dir,
            "gateway",
            Command::new(proxy_bin())
                .arg("gateway")
                .arg("--config")
                .arg(dir.join("gateway.toml")),
        );
        let socks: SocketAddr = format!("127.0.{n}.100:1080").parse().unwrap();
        let config = dir.join("proxy.toml");
        std::fs::write(
            &config,
            format!(
                "[proxy]\nlisten = \"{socks}\"\npeer_list = {list:?}\nauthorities = [{auth:?}]\n\
                 bind = \"127.0.{n}.200:0\"\nmetrics = \"127.0.{n}.100:9102\"\n\n[gateway]\naddr = \"{gw}\"\ncert_sha256 = \"{fingerprint}\"\n\n\
                 [circuits]\nhops = 3\nprebuild = 1\ndistinct_subnets = false\nidle_timeout_ms = 4000\n\
                 build_timeout_ms = 3000\n{circuits}",
                list = net.list_path.display().to_string(),
                auth = net.authority.public().to_base64(),
            ),
        )
        .unwrap();
        let proxy = spawn(
            &dir,
            "proxy",
            Command::new(proxy_bin())
                .arg("run")
                .arg("--config")
                .arg(&config),
        );
        let p = ProxyNet {
            net,
            dir,
            _http: http_proc,
            gateway,
            proxy,
            socks,
            http,
            files,
            config,
        };
        wait_tcp(http, "http.server", &|| String::new());
        wait_tcp(socks, "shroud-proxy", &|| p.logs());
        p
    }

    fn logs(&self) -> String {
        format!(
            "--- proxy log:\n{}\n--- gateway log:\n{}",
            self.proxy.log(),
            self.gateway.log()
        )
    }

    /// `curl --socks5-hostname` for `path`: (exit code, body file).
    fn curl(&self, path: &str, extra: &[&str]) -> (i32, PathBuf) {
        let out = self.dir.join(format!("out-{}", path.replace('/', "_")));
        let _ = std::fs::remove_file(&out);
        let status = Command::new("curl")
            .args(["-sS", "--fail", "--max-time", "120"])
            .arg("--socks5-hostname")
            .arg(self.socks.to_string())
            .args(extra)
            .arg("-o")
            .arg(&out)
            .arg(format!("http://{}/{path}", self.http))
            .status()
            .expect("curl");
        (status.code().unwrap_or(-1), out)
    }

    fn fetch_and_check(&self, name: &str, extra: &[&str]) {
        let (code, out) = self.curl(name, extra);
        assert_eq!(code, 0, "curl {name} exited {code}\n{}", self.logs());
        let body = std::fs::read(&out).unwrap();
        let want = &self.files.iter().find(|f| f.0 == name).unwrap().1;
        assert_eq!(&sha256_hex(&body), want, "{name}: {} bytes", body.len());
    }

    /// The paths (relay ids) and local addresses of every "circuit assigned" log line.
    fn assigned(&self) -> Vec<(Vec<String>, String)> {
        self.proxy
            .log()
            .lines()
            .filter(|l| l.contains("circuit assigned"))
            .map(|l| {
                let field = |k: &str| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix(k))
                        .unwrap_or_default()
                        .to_owned()
                };
                (
                    field("path=").split(',').map(str::to_owned).collect(),
                    field("local="),
                )
            })
            .collect()
    }
}

/// A SOCKS5 CONNECT by hand: the reply's code (None if the proxy closed without
/// one).
fn socks_connect(socks: SocketAddr, dest: SocketAddr) -> Option<u8> {
    let mut s = TcpStream::connect(socks).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 0]);
    let SocketAddr::V4(d) = dest else {
        panic!("IPv4 only here")
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&d.ip().octets());
    req.extend_from_slice(&d.port().to_be_bytes());
    s.write_all(&req).unwrap();
    let mut r = [0u8; 10];
    s.read_exact(&mut r).ok()?;
    assert_eq!((r[0], r[2]), (5, 0), "{r:?}");
    Some(r[1])
}

/// Sends `input`, half-closes, and returns everything the proxy answers before it
/// closes the connection.
fn raw_exchange(socks: SocketAddr, input: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(socks).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // The proxy may close before reading everything (a reset then is fine).
    let _ = s.write_all(input);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

#[test]
fn curl_fetches_a_small_and_a_100_mb_file_through_three_relays() {
    let p = ProxyNet::start(90, 3, true);
    p.fetch_and_check("small.bin", &[]);
    let t = Instant::now();
    p.fetch_and_check("big.bin", &[]);
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "100 MB through 3 relays in {secs:.2} s ({:.1} MB/s, debug build)",
        100.0 / secs
    );
    // Every stream went through a 3-hop circuit of listed relays.
    let assigned = p.assigned();
    assert!(!assigned.is_empty(), "{}", p.logs());
    let ids: Vec<String> = p.net.relays.iter().map(|r| r.id.to_string()).collect();
    for (path, _) in &assigned {
        assert_eq!(path.len(), 3);
        assert!(path.iter().all(|h| ids.contains(h)), "{path:?}");
    }
}

#[test]
fn refused_destinations_get_0x02_and_bad_socks_input_a_clean_close() {
    let p = ProxyNet::start(91, 3, false);
    // The gateway's policy names only the HTTP server's address.
    let refused: SocketAddr = format!("127.0.91.252:{}", p.http.port()).parse().unwrap();
    assert_eq!(socks_connect(p.socks, refused), Some(0x02), "{}", p.logs());
    // Nothing listens on this port of the allowed address: connection refused.
    let closed: SocketAddr = format!("{}:1", p.http.ip()).parse().unwrap();
    assert_eq!(socks_connect(p.socks, closed), Some(0x05), "{}", p.logs());
    // curl reports the refusal as a failed proxy handshake (exit code 97).
    let status = Command::new("curl")
        .args(["-sS", "--max-time", "30", "--socks5-hostname"])
        .arg(p.socks.to_string())
        .arg(format!("http://{refused}/small.bin"))
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(97));

    // Bad version: closed without a reply.
    assert_eq!(raw_exchange(p.socks, &[4, 1, 0, 80, 127, 0, 0, 1, 0]), b"");
    // No acceptable method: 0xFF.
    assert_eq!(raw_exchange(p.socks, &[5, 1, 0x80]), [5, 0xff]);
    // Truncated request: the method reply, then a close.
    assert_eq!(raw_exchange(p.socks, &[5, 1, 0, 5, 1, 0, 1, 127]), [5, 0]);
    // BIND (unknown to us): 0x07.
    let r = raw_exchange(p.socks, &[5, 1, 0, 5, 2, 0, 1, 127, 0, 0, 1, 0, 80]);
    assert_eq!(r, [5, 0, 5, 7, 0, 1, 0, 0, 0, 0, 0, 0]);
    // Unknown address type: 0x08.
    let r = raw_exchange(p.socks, &[5, 1, 0, 5, 1, 0, 7, 1, 2, 3]);
    assert_eq!(r, [5, 0, 5, 8, 0, 1, 0, 0, 0, 0, 0, 0]);
    // Oversized: 1 MB of garbage after a valid greeting (request version 0x41):
    // general failure, close.
    let mut big = vec![5, 1, 0];
    big.extend(std::iter::repeat_n(0x41u8, 1 << 20));
    let r = raw_exchange(p.socks, &big);
    assert_eq!(r, [5, 0, 5, 1, 0, 1, 0, 0, 0, 0, 0, 0]);
    // A bad RFC 1929 version: status 1.
    assert_eq!(raw_exchange(p.socks, &[5, 1, 2, 9, 1, b'u']), [5, 2, 1, 1]);
    // An empty host name: general failure.
    let r = raw_exchange(p.socks, &[5, 1, 0, 5, 1, 0, 3, 0, 0, 80]);
    assert_eq!(r, [5, 0, 5, 1, 0, 1, 0, 0, 0, 0, 0, 0]);
    // A client that connects and says nothing, and one that leaves mid-greeting.
    let idle = TcpStream::connect(p.socks).unwrap();
    drop(TcpStream::connect(p.socks).unwrap());

    // The proxy still serves.
    p.fetch_and_check("small.bin", &[]);
    drop(idle);
    assert!(!p.proxy.log().contains("panicked"), "{}", p.logs());

    // The same counters on the Prometheus endpoints, read by curl: the proxy's
    // replies per code, and the gateway's answers (two refusals by policy, one
    // connection refused, one success).
    let scrape = |addr: String, path: &str| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
            .arg(format!("http://{addr}{path}"))
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let proxy_metrics = scrape("127.0.91.100:9102".into(), "/metrics");
    for line in [
        "shroud_proxy_socks_replies_total{code=\"0\"} 1",
        "shroud_proxy_socks_replies_total{code=\"2\"} 2",
        "shroud_proxy_socks_replies_total{code=\"5\"} 1",
        "shroud_proxy_socks_replies_total{code=\"7\"} 1",
        "200",
    ] {
        assert!(
            proxy_metrics.lines().any(|l| l == line),
            "{line}\n{proxy_metrics}"
        );
    }
    assert!(
        proxy_metrics
            .lines()
            .any(|l| l.starts_with("shroud_proxy_circuits_built_total ") && !l.ends_with(" 0")),
        "{proxy_metrics}"
    );
    let gw_metrics = scrape("127.0.91.250:9103".into(), "/metrics");
    for line in [
        "shroud_gateway_stream_status_total{code=\"0\"} 1",
        "shroud_gateway_stream_status_total{code=\"2\"} 2",
        "shroud_gateway_stream_status_total{code=\"5\"} 1",
    ] {
        assert!(
            gw_metrics.lines().any(|l| l == line),
            "{line}\n{gw_metrics}"
        );
    }
    assert!(scrape("127.0.91.100:9102".into(), "/other").ends_with("404"));

    // SIGINT: the proxy logs its counters and exits. Replies per SOCKS code: one
    // success, two refusals by policy (by hand and curl's), one connection refused,
    // and the bad requests: 0x07, 0x08 and two general failures (oversized, empty
    // name).
    let mut p = p;
    let pid = p.proxy.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while p.proxy.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "no exit on SIGINT\n{}", p.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = p.proxy.log();
    let counters = log
        .lines()
        .rfind(|l| l.contains("counters"))
        .unwrap_or_else(|| panic!("no counters line\n{log}"));
    assert!(
        counters.contains("replies=[1, 2, 2, 0, 0, 1, 0, 1, 1]"),
        "{counters}"
    );
}

/// A SOCKS5 CONNECT to a host name (resolved at the gateway): the reply code and
/// the connection.
fn socks_connect_name(socks: SocketAddr, name: &str, port: u16) -> (u8, TcpStream) {
    let mut s = TcpStream::connect(socks).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    let mut req = vec![5, 1, 0, 3, name.len() as u8];
    req.extend_from_slice(name.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).unwrap();
    let mut r = [0u8; 10];
    s.read_exact(&mut r).unwrap();
    (r[1], s)
}

#[test]
fn credentials_isolate_streams_on_separate_circuits() {
    let p = ProxyNet::start(92, 3, false);
    let url_proxy = |user: &str| format!("socks5h://{user}:pw@{}", p.socks);
    p.fetch_and_check("small.bin", &["--proxy", &url_proxy("alice")]);
    p.fetch_and_check("small.bin", &["--proxy", &url_proxy("bob")]);
    p.fetch_and_check("small.bin", &["--proxy", &url_proxy("alice")]);
    p.fetch_and_check("small.bin", &[]);
    // alice, bob and no credentials: three circuits (three sockets); alice's second
    // stream reused hers.
    let a = p.assigned();
    assert_eq!(a.len(), 3, "{}", p.logs());
    assert_ne!(a[0].1, a[1].1);
    assert_ne!(a[1].1, a[2].1);
    assert_ne!(a[0].1, a[2].1);

    // Host names are resolved at the gateway (socks5h): "localhost" reaches a server
    // on 127.0.0.1 (which the gateway's policy names), and a name that does not
    // resolve is 0x04.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let (mut c, _) = server.accept().unwrap();
        c.write_all(b"hello by name").unwrap();
    });
    let (code, mut s) = socks_connect_name(p.socks, "localhost", port);
    assert_eq!(code, 0, "{}", p.logs());
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"hello by name");
    t.join().unwrap();
    let (code, _) = socks_connect_name(p.socks, "no-such-host.invalid", 80);
    assert_eq!(code, 4, "{}", p.logs());
}

#[test]
fn udp_associate_round_trips_datagrams_through_a_circuit() {
    let p = ProxyNet::start(93, 3, false);
    let (echo, echo_handle) = udp_echo_server("127.0.93.253:0".parse().unwrap()).unwrap();
    let mut tcp = TcpStream::connect(p.socks).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    tcp.write_all(&[5, 1, 0]).unwrap();
    let mut m = [0u8; 2];
    tcp.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 0]);
    tcp.write_all(&[5, 3, 0, 1, 0, 0, 0, 0, 0, 0]).unwrap();
    let mut r = [0u8; 10];
    tcp.read_exact(&mut r).unwrap();
    assert_eq!(&r[..4], [5, 0, 0, 1]);
    let relay = SocketAddr::from(([r[4], r[5], r[6], r[7]], u16::from_be_bytes([r[8], r[9]])));
    // The proxy takes datagrams only from the address of the client's TCP connection.
    let udp = UdpSocket::bind(SocketAddr::new(tcp.local_addr().unwrap().ip(), 0)).unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let SocketAddr::V4(e) = echo else { panic!() };
    let mut header = vec![0, 0, 0, 1];
    header.extend_from_slice(&e.ip().octets());
    header.extend_from_slice(&e.port().to_be_bytes());
    for k in 0..10u8 {
        let payload: Vec<u8> = (0..(100 + 70 * usize::from(k)))
            .map(|i| i as u8 ^ k)
            .collect();
        let mut d = header.clone();
        d.extend_from_slice(&payload);
        udp.send_to(&d, relay).unwrap();
        let mut buf = [0u8; 2048];
        let (n, from) = udp
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {k}: {e}\n{}", p.logs()));
        assert_eq!(from, relay);
        assert_eq!(
            &buf[..header.len()],
            &header[..],
            "reply names the echo server"
        );
        assert_eq!(&buf[header.len()..n], &payload[..], "datagram {k}");
    }
    assert_eq!(echo_handle.datagrams(), 10);
    // A datagram for a host name is dropped (names are not resolved for UDP), and the
    // association keeps working.
    let mut named = vec![0, 0, 0, 3, 9];
    named.extend_from_slice(b"localhost");
    named.extend_from_slice(&[0, 7, 1, 2, 3]);
    udp.send_to(&named, relay).unwrap();
    let mut d = header.clone();
    d.extend_from_slice(b"after");
    udp.send_to(&d, relay).unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = udp.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[header.len()..n], b"after");
}

#[test]
fn a_killed_middle_relay_is_avoided_and_the_next_request_succeeds() {
    let mut p = ProxyNet::start(94, 5, true);
    p.fetch_and_check("small.bin", &[]);
    let (path, _) = p.assigned().last().cloned().expect("a circuit");
    let middle = p
        .net
        .relays
        .iter()
        .position(|r| r.id.to_string() == path[1])
        .unwrap();
    // A slow download, the middle relay killed under it.
    let out = p.dir.join("partial");
    let mut curl = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "120", "--limit-rate", "2M"])
        .arg("--socks5-hostname")
        .arg(p.socks.to_string())
        .arg("-o")
        .arg(&out)
        .arg(format!("http://{}/big.bin", p.http))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&out).map_or(0, |m| m.len()) < 1_000_000 {
        assert!(
            Instant::now() < deadline,
            "download did not start\n{}",
            p.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p.net.kill(middle);
    let status = curl.wait().unwrap();
    assert!(
        !status.success(),
        "the download cannot complete without its middle relay"
    );
    let got = std::fs::metadata(&out).map_or(0, |m| m.len());
    assert!(got < 100_000_000, "{got}");
    // The next request: a new circuit that avoids the dead relay.
    let t = Instant::now();
    p.fetch_and_check("small.bin", &[]);
    eprintln!("recovered in {:.2} s", t.elapsed().as_secs_f64());
    let (new_path, _) = p.assigned().last().cloned().unwrap();
    assert_ne!(new_path, path);
    assert!(
        !new_path.contains(&path[1]),
        "{new_path:?} uses the dead relay"
    );
    let log = p.proxy.log();
    assert!(
        log.lines()
            .any(|l| l.contains("avoiding it") && l.contains(&path[1])),
        "{}",
        p.logs()
    );
}

#[test]
fn probe_reports_setup_times_and_echo_round_trips() {
    let p = ProxyNet::start(95, 3, false);
    let ids: Vec<String> = p.net.relays.iter().map(|r| r.id.to_string()).collect();
    let out = Command::new(proxy_bin())
        .arg("probe")
        .arg("--config")
        .arg(&p.config)
        .arg("--via")
        .arg(ids.join(","))
        .args(["--count", "20", "--interval-ms", "5", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}\n{}", p.logs());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["sent"], 20);
    assert_eq!(v["received"], 20, "{v}");
    assert_eq!(v["loss"], 0.0);
    let setups = v["setups"].as_array().unwrap();
    assert_eq!(setups.len(), 3);
    for (k, s) in setups.iter().enumerate() {
        assert_eq!(s["hops"], k + 1);
        assert_eq!(s["relay"], ids[k].as_str());
        // Every relay of the test network is an exit: each prefix is created.
        assert_eq!(s["outcome"], "created", "{v}");
        assert!(s["setup_ms"].as_f64().unwrap() > 0.0);
    }
    let rtt = v["rtt_ms"].as_array().unwrap();
    assert!(rtt[0].as_f64().unwrap() <= rtt[3].as_f64().unwrap());
    // A dead relay: the probe says which prefix stops answering.
    let mut p = p;
    p.net.kill(1);
    let out = Command::new(proxy_bin())
        .arg("probe")
        .arg("--config")
        .arg(&p.config)
        .arg("--via")
        .arg(ids.join(","))
        .args(["--count", "3", "--timeout-ms", "500"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[1].contains("created"), "{text}");
    assert!(lines[2].contains("timeout"), "{text}");
    assert!(lines[3].contains("timeout"), "{text}");
    assert!(text.contains("0 received"), "{text}");
}

#[test]
fn new_streams_move_to_a_new_circuit_after_the_rotation_time() {
    let p = ProxyNet::start_with(96, 3, false, "rotate_after_secs = 2\n");
    p.fetch_and_check("small.bin", &[]);
    p.fetch_and_check("small.bin", &[]);
    assert_eq!(
        p.assigned().len(),
        1,
        "one circuit within 2 s\n{}",
        p.logs()
    );
    std::thread::sleep(Duration::from_millis(2500));
    p.fetch_and_check("small.bin", &[]);
    let a = p.assigned();
    assert_eq!(a.len(), 2, "{}", p.logs());
    assert_ne!(a[0].1, a[1].1, "the stream after 2 s is on another circuit");
}

#[test]
fn destination_isolation_puts_each_host_on_its_own_circuit() {
    let p = ProxyNet::start_with(89, 3, false, "\n[streams]\nisolate_destination = true\n");
    // Two fetches from one host share a circuit.
    p.fetch_and_check("small.bin", &[]);
    p.fetch_and_check("small.bin", &[]);
    assert_eq!(p.assigned().len(), 1, "{}", p.logs());
    // Another host (by name, resolved at the gateway) gets another circuit.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let (mut c, _) = server.accept().unwrap();
        c.write_all(b"other host").unwrap();
    });
    let (code, mut s) = socks_connect_name(p.socks, "localhost", port);
    assert_eq!(code, 0, "{}", p.logs());
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"other host");
    t.join().unwrap();
    let a = p.assigned();
    assert_eq!(a.len(), 2, "{}", p.logs());
    assert_ne!(a[0].1, a[1].1, "separate circuits (sockets)");
}
