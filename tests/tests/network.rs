//! Real `shroud-relay` processes on loopback, real sockets, real crypto: circuits of
//! 1, 3 and H_MAX hops, bad input of every kind, a relay killed mid-stream, reload
//! and key rotation under traffic.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use serde_json::json;
use shroud_client::{udp_echo_server, Client, ClientError};
use shroud_tests::{write_key, NetOpts, TestNet};

const T: Duration = Duration::from_secs(5);

fn echo(net: u8) -> (SocketAddr, shroud_client::EchoHandle) {
    udp_echo_server(SocketAddr::from(([127, 0, net, 250], 0))).expect("echo server")
}

/// Sends `n` distinct payloads on circuit `id` and checks every one comes back intact.
fn round_trips(c: &mut Client, id: shroud_client::CircuitId, n: usize, tag: u8) {
    let max = c.payload_max();
    for k in 0..n {
        let len = [0, 1, 100, max][k % 4];
        let payload: Vec<u8> = (0..len).map(|i| (i as u8) ^ (k as u8) ^ tag).collect();
        c.send(id, &payload).expect("send");
        let (got_id, got) = c.recv(T).expect("reply");
        assert_eq!(got_id, id);
        assert_eq!(got, payload, "payload {k} intact both ways");
    }
}

fn check_circuits(driver: &'static str, net_no: u8) {
    check_circuits_with(driver, false, net_no)
}

fn check_circuits_with(driver: &'static str, zero_copy_send: bool, net_no: u8) {
    let mut opts = NetOpts::new(net_no, 8);
    opts.driver = driver;
    opts.zero_copy_send = zero_copy_send;
    let net = TestNet::start(opts);
    let (dest, echo) = echo(net_no);
    let mut c = net.client();
    for hops in [1usize, 3, 8] {
        let path: Vec<usize> = (0..hops).collect();
        let id = c
            .build_circuit(&net.path(&path), dest, T)
            .unwrap_or_else(|e| panic!("{hops} hops: {e}\n{}", net.log(0)));
        round_trips(&mut c, id, 12, hops as u8);
    }
    assert_eq!(echo.datagrams(), 36);
    for i in 0..8 {
        let s = net.admin(i, json!({"cmd": "status"}));
        let w = &s["result"]["workers"][0]["stats"];
        assert_eq!(
            w["driver"],
            if driver == "mmsg" {
                "recvmmsg"
            } else {
                "io_uring"
            }
        );
        // Every datagram that reached a relay was a whole number of cells.
        assert_eq!(s["result"]["drops"]["malformed"], 0, "relay {i}: {s}");
        assert_eq!(s["result"]["drops"]["bad_tag"], 0, "relay {i}: {s}");
    }
}

#[test]
fn circuits_of_1_3_and_h_max_hops_deliver_both_ways_io_uring() {
    check_circuits("uring", 11);
}

#[test]
fn circuits_deliver_both_ways_with_zero_copy_sends() {
    check_circuits_with("uring", true, 19);
}

#[test]
fn circuits_of_1_3_and_h_max_hops_deliver_both_ways_fallback_driver() {
    check_circuits("mmsg", 12);
}

#[test]
fn every_datagram_on_a_relay_link_is_a_whole_number_of_cells() {
    // A user-space tap between the client and the first relay sees every datagram of
    // that link in both directions.
    let net = TestNet::start(NetOpts::new(13, 3));
    let (dest, _echo) = echo(13);
    let tap = UdpSocket::bind("127.0.13.150:0").unwrap();
    tap.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let tap_addr = tap.local_addr().unwrap();
    let relay0 = SocketAddr::new(net.relays[0].addr, net.relays[0].ports.0);
    let mut path = net.path(&[0, 1, 2]);
    path[0].addr = tap_addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sizes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let t = {
        let (stop, sizes) = (stop.clone(), sizes.clone());
        std::thread::spawn(move || {
            let mut client: Option<SocketAddr> = None;
            let mut buf = vec![0u8; 65536];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((n, from)) = tap.recv_from(&mut buf) else {
                    continue;
                };
                sizes.lock().unwrap().push(n);
                if from == relay0 {
                    if let Some(c) = client {
                        tap.send_to(&buf[..n], c).unwrap();
                    }
                } else {
                    client = Some(from);
                    tap.send_to(&buf[..n], relay0).unwrap();
                }
            }
        })
    };
    // The relay sees the tap as its client: it links to the tap's address.
    let mut c = net.client();
    let id = c
        .build_circuit(&path, dest, T)
        .expect("circuit through the tap");
    round_trips(&mut c, id, 20, 1);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    t.join().unwrap();
    let sizes = sizes.lock().unwrap();
    assert!(sizes.len() >= 42, "{} datagrams", sizes.len());
    assert!(
        sizes.iter().all(|n| n.is_multiple_of(1024) && *n > 0),
        "{sizes:?}"
    );
}

#[test]
fn bad_input_is_dropped_and_counted_while_a_circuit_keeps_delivering() {
    let mut opts = NetOpts::new(14, 3);
    opts.setup_rate = 50;
    opts.setup_burst = 50;
    let net = TestNet::start(opts);
    let (dest, _echo) = echo(14);
    let mut good = net.client();
    let id = good
        .build_circuit(&net.path(&[0, 1, 2]), dest, T)
        .expect("circuit");
    let relay0 = SocketAddr::new(net.relays[0].addr, net.relays[0].ports.0);
    let attacker = UdpSocket::bind("127.0.14.201:0").unwrap();

    // Garbage datagrams: wrong sizes and random cells.
    for len in [1usize, 100, 1023, 1025, 3000] {
        attacker.send_to(&vec![0x5a; len], relay0).unwrap();
    }
    for k in 0..20u8 {
        attacker.send_to(&[k; 1024], relay0).unwrap();
    }
    round_trips(&mut good, id, 5, 2);

    // A setup naming a next hop outside the peer list: refused at hop 0.
    let mut rogue_list = net.list.clone();
    let outsider = shroud_proto::keys::IdentityKey::generate(&mut rand_core::OsRng);
    let outsider_onion = shroud_proto::keys::OnionSecret::generate(&mut rand_core::OsRng);
    rogue_list
        .relays
        .push(shroud_proto::peerlist::RelayDescriptor {
            identity: outsider.public(),
            addr: "127.0.14.99".parse().unwrap(),
            ports: (9000, 9000),
            onion_keys: vec![shroud_proto::peerlist::OnionKeyEntry {
                key: outsider_onion.public(),
                valid_until: shroud_tests::now_s() + 3600,
            }],
            exit: true,
            weight: 1,
        });
    rogue_list.normalize();
    let mut path = net.path(&[0]);
    path.extend(
        shroud_client::path_from_ids(
            &rogue_list,
            &[outsider.public().relay_id()],
            shroud_tests::now_s(),
        )
        .unwrap(),
    );
    let mut rogue = net.client();
    match rogue.build_circuit(&path, dest, T) {
        Err(ClientError::Refused { hop, .. }) => assert_eq!(hop, 0),
        other => panic!("expected a refusal at hop 0, got {other:?}"),
    }
    round_trips(&mut good, id, 5, 3);

    // A flood of 300 valid setup cells from one source, sent back to back: its
    // prefix's bucket (burst 50, 50/s) admits at most the burst plus what refills
    // while the flood lasts, the rest is refused as rate_limited before any
    // public-key work, and the good circuit keeps delivering.
    let layout = shroud_proto::Layout::default();
    let flood_path = net.path(&[0, 1]);
    let link = shroud_proto::client::ClientLink::new(
        &flood_path[0].id,
        flood_path[0].addr,
        &mut rand_core::OsRng,
    );
    let cells: Vec<Vec<u8>> = (0..300)
        .map(|_| {
            let mut cell = vec![0u8; layout.cell];
            shroud_proto::client::ClientCircuit::<shroud_proto::RingAead>::build(
                &layout,
                &link,
                &flood_path,
                dest,
                shroud_tests::now_s() * 1000,
                &mut rand_core::OsRng,
                &mut cell,
            )
            .unwrap();
            cell
        })
        .collect();
    let flood = UdpSocket::bind("127.0.14.202:0").unwrap();
    let (setups_before, limited_before) =
        (net.worker_stat(0, "setups"), net.drops(0, "rate_limited"));
    let start = Instant::now();
    for c in &cells {
        flood.send_to(c, relay0).unwrap();
    }
    round_trips(&mut good, id, 5, 4);
    let admitted = net.worker_stat(0, "setups") - setups_before;
    let limited = net.drops(0, "rate_limited") - limited_before;
    // The relay works through the queued setups over a while after they were sent
    // (a budget per batch), and the bucket refills meanwhile: bound the refill by
    // the whole time until the counters were read.
    let spent = start.elapsed().as_secs_f64();
    let allowed = 50 + (50.0 * spent).ceil() as u64;
    assert!(
        admitted <= allowed,
        "{admitted} of 300 setups from one source admitted in {spent:.3} s (bucket allows {allowed})"
    );
    // (The garbage and the refused setup above came from the same /24 and took
    // some of its burst.)
    assert!(
        admitted >= 20,
        "only {admitted} setups admitted: the burst is 50"
    );
    assert!(
        limited >= 300 - allowed,
        "{limited} setups refused as rate_limited of the {} over the bucket",
        300 - admitted
    );

    let malformed =
        net.drops(0, "malformed") + net.drops(0, "bad_tag") + net.drops(0, "unknown_circuit");
    assert!(malformed >= 25, "garbage was not all counted: {malformed}");
    assert!(net.drops(0, "not_a_peer") >= 1);
}

#[test]
fn flipped_bits_and_replays_are_dropped_at_the_next_hop() {
    // A tap that forwards every datagram from the client to relay 0 twice (a replay)
    // and, for every fifth, a copy with one bit flipped first.
    let net = TestNet::start(NetOpts::new(15, 2));
    let (dest, _echo) = echo(15);
    let tap = UdpSocket::bind("127.0.15.150:0").unwrap();
    tap.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let tap_addr = tap.local_addr().unwrap();
    let relay0 = SocketAddr::new(net.relays[0].addr, net.relays[0].ports.0);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut client: Option<SocketAddr> = None;
            let mut buf = vec![0u8; 65536];
            let mut k = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((n, from)) = tap.recv_from(&mut buf) else {
                    continue;
                };
                if from == relay0 {
                    if let Some(c) = client {
                        tap.send_to(&buf[..n], c).unwrap();
                    }
                    continue;
                }
                client = Some(from);
                k += 1;
                if k > 1 && k.is_multiple_of(5) {
                    let mut bad = buf[..n].to_vec();
                    bad[(k * 37) % n] ^= 1 << (k % 8);
                    tap.send_to(&bad, relay0).unwrap();
                }
                tap.send_to(&buf[..n], relay0).unwrap();
                if k > 1 {
                    tap.send_to(&buf[..n], relay0).unwrap();
                }
            }
        })
    };
    let mut c = net.client();
    let mut path = net.path(&[0, 1]);
    path[0].addr = tap_addr;
    let id = c.build_circuit(&path, dest, T).expect("circuit");
    round_trips(&mut c, id, 30, 5);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    t.join().unwrap();
    let replays = net.drops(0, "replay");
    let tampered =
        net.drops(0, "bad_tag") + net.drops(0, "unknown_circuit") + net.drops(0, "malformed");
    assert!(replays >= 29, "replays counted: {replays}");
    assert!(tampered >= 5, "tampered counted: {tampered}");
    assert_eq!(
        net.drops(1, "bad_tag"),
        0,
        "nothing tampered got past hop 0"
    );
}

#[test]
fn a_relay_killed_mid_stream_is_detected_without_hanging() {
    let mut net = TestNet::start(NetOpts::new(16, 3));
    let (dest, _echo) = echo(16);
    let mut c = net.client();
    let id = c
        .build_circuit(&net.path(&[0, 1, 2]), dest, T)
        .expect("circuit");
    round_trips(&mut c, id, 5, 6);
    net.kill(1);
    c.send(id, b"into the void")
        .expect("send still works locally");
    let started = Instant::now();
    match c.recv(Duration::from_secs(2)) {
        Err(ClientError::Timeout) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    // Returned by its deadline rather than hanging; the margin is wide because a busy
    // 2-core machine can delay any thread by seconds.
    assert!(started.elapsed() < Duration::from_secs(30), "recv hung");
    assert!(
        !c.check_alive(id, Duration::from_secs(1)),
        "circuit still looks alive"
    );
    // A new circuit avoiding the dead relay works.
    let id2 = c
        .build_circuit(&net.path(&[0, 2]), dest, T)
        .expect("new circuit");
    round_trips(&mut c, id2, 3, 7);
}

#[test]
fn reload_and_key_rotation_under_traffic_lose_no_cells() {
    let net = TestNet::start(NetOpts::new(17, 3));
    let (dest, _echo) = echo(17);
    let mut c = net.client();
    let id = c
        .build_circuit(&net.path(&[0, 1, 2]), dest, T)
        .expect("circuit");
    let mut sent = 0usize;
    let mut got = 0usize;
    let mut step = |c: &mut Client, n: usize| {
        for _ in 0..n {
            c.send(id, &(sent as u32).to_be_bytes()).unwrap();
            sent += 1;
            let (_, p) = c.recv(T).expect("no cell lost");
            assert_eq!(p, ((sent - 1) as u32).to_be_bytes());
            got += 1;
        }
    };
    step(&mut c, 50);
    // SIGHUP reload on every relay.
    for i in 0..3 {
        net.signal(i, "HUP");
    }
    step(&mut c, 50);
    // Rotation on relay 1: a new onion key first, the old one kept for the grace
    // period, via the admin socket.
    let next = shroud_proto::keys::OnionSecret::generate(&mut rand_core::OsRng);
    write_key(&net.relays[1].onion_key_next, &next.to_bytes());
    net.write_config(1, &["onion-next.key", "onion.key"]);
    let r = net.admin(1, json!({"cmd": "rotate"}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["onion_keys"].as_array().unwrap().len(), 2);
    step(&mut c, 50);
    let r = net.admin(0, json!({"cmd": "reload"}));
    assert_eq!(r["ok"], true, "{r}");
    step(&mut c, 50);
    assert_eq!((sent, got), (200, 200));
    // New circuits still build through the rotated relay (with its old key, still
    // listed in the peer list and kept by the relay during the grace period).
    let id2 = c
        .build_circuit(&net.path(&[1, 2]), dest, T)
        .expect("circuit after rotation");
    round_trips(&mut c, id2, 3, 8);
}

#[test]
fn drain_refuses_new_circuits_and_shutdown_exits_cleanly() {
    let mut net = TestNet::start(NetOpts::new(18, 2));
    let (dest, _echo) = echo(18);
    let mut c = net.client();
    let id = c
        .build_circuit(&net.path(&[0, 1]), dest, T)
        .expect("circuit");
    let r = net.admin(0, json!({"cmd": "drain", "timeout_s": 30}));
    assert_eq!(r["ok"], true, "{r}");
    round_trips(&mut c, id, 5, 9);
    assert!(
        c.build_circuit(&net.path(&[0, 1]), dest, Duration::from_secs(1))
            .is_err(),
        "draining relay accepted a circuit"
    );
    let r = net.admin(1, json!({"cmd": "shutdown"}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        net.wait_exit(1, Duration::from_secs(5)),
        Some(0),
        "{}",
        net.log(1)
    );
    net.signal(0, "TERM");
    assert_eq!(
        net.wait_exit(0, Duration::from_secs(5)),
        Some(0),
        "{}",
        net.log(0)
    );
}

/// Sets relay process `pid`'s open-file limit (soft and hard) with util-linux's
/// `prlimit`.
fn set_nofile(pid: u32, soft: u64, hard: u64) {
    let ok = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={soft}:{hard}"))
        .status()
        .expect("prlimit (util-linux) runs")
        .success();
    assert!(ok, "prlimit --pid={pid} --nofile={soft}:{hard}");
}

/// The exit's socket is opened before its CREATED is sent: an exit that cannot open
/// it (here: out of file descriptors) answers REFUSED `capacity` instead, which
/// travels back through the middle hop (removing the circuit there too), so the
/// client learns at once rather than by timeout, and nothing is left behind. Sockets
/// made ready before (the exit's pool) still carry circuits until they run out. Once
/// the exit can open sockets again, circuits build as before.
#[test]
fn an_exit_that_cannot_open_its_socket_refuses_the_circuit() {
    let net = TestNet::start(NetOpts::new(76, 2));
    let (dest, _echo) = echo(76);
    let pid = net.relays[1].child.as_ref().expect("running").id();
    let (soft, hard) = nofile(pid);
    // The exit's worker is running (its first exit circuit carried data), and its
    // pool of ready exit sockets has had time to fill again.
    let mut c = net.client();
    let first = c
        .build_circuit(&net.path(&[0, 1]), dest, T)
        .expect("an exit circuit before the limit");
    round_trips(&mut c, first, 1, 9);
    std::thread::sleep(Duration::from_millis(300));
    // No new descriptor at all (the limit bounds descriptor numbers, and the
    // process's table may have gaps below its count).
    set_nofile(pid, 0, hard);
    // The exit's one worker holds a pool of 16 ready IPv4 exit sockets made before
    // the limit (and its helper one more, waiting for room); the helper cannot make
    // more now. The pool carries exits until it is empty, then the exit cannot open
    // a socket.
    let mut built = 0;
    let refused = loop {
        match c.build_circuit(&net.path(&[0, 1]), dest, T) {
            Ok(_) if built < 40 => built += 1,
            other => break other,
        }
    };
    set_nofile(pid, soft, hard);
    assert!(
        (16..=17).contains(&built),
        "the pooled sockets carried {built} exits, then {refused:?}"
    );
    match refused {
        Err(ClientError::Refused {
            hop: 1,
            reason_name: "capacity",
            ..
        }) => {}
        other => panic!("expected REFUSED capacity from the exit, got {other:?}"),
    }
    assert_eq!(
        net.circuits(0),
        built + 1,
        "the middle hop removed the refused circuit"
    );
    assert_eq!(net.circuits(1), built + 1, "the exit removed it");
    assert_eq!(net.drops(1, "capacity"), 1);
    assert_eq!(net.worker_stat(1, "exit_pool_misses"), 1);
    let id = c
        .build_circuit(&net.path(&[0, 1]), dest, T)
        .expect("builds once sockets can be opened");
    round_trips(&mut c, id, 4, 9);
}

/// Idle expiry: a circuit with no forward cell for `circuit_idle_secs` is removed at
/// every hop, and its first hop tells the client with a DESTROY (reason `expired`),
/// so the client learns it at once instead of by a timeout; backward traffic alone
/// does not keep it alive. Then the links, with no circuits left, are forgotten
/// after `link_idle_secs`, and the same client builds again through a new link.
#[test]
fn idle_circuits_expire_the_client_is_told_and_idle_links_are_forgotten() {
    let mut opts = NetOpts::new(77, 2);
    opts.circuit_idle_secs = 1;
    opts.link_idle_secs = 2;
    let net = TestNet::start(opts);
    let (dest, _echo) = echo(77);
    let mut c = net.client();
    let id = c.build_circuit(&net.path(&[0, 1]), dest, T).expect("build");
    round_trips(&mut c, id, 2, 3);
    // A 1-hop circuit too: there the first hop is the exit, whose DESTROY must pass
    // the client's window over the exit's sequence numbers.
    let one = c
        .build_circuit(&net.path(&[0]), dest, T)
        .expect("build 1 hop");
    round_trips(&mut c, one, 2, 5);
    assert_eq!(net.worker_stat(0, "client_links"), 1);
    assert_eq!(net.worker_stat(0, "peer_links"), 1);
    // No forward cell from now on: within a few ticks after one second the first hop
    // expires both circuits and says so.
    let mut closed = Vec::new();
    for _ in 0..2 {
        match c.recv(Duration::from_secs(10)) {
            Err(ClientError::CircuitClosed { circuit, hop: 0 }) => closed.push(circuit),
            other => panic!("expected the first hop's DESTROY, got {other:?}"),
        }
    }
    closed.sort();
    let mut want = vec![id, one];
    want.sort();
    assert_eq!(closed, want);
    assert_eq!(net.circuits(0), 0);
    assert_eq!(net.worker_stat(0, "expired_circuits"), 2);
    // The exit's own timer removes it there (no hop can forward a teardown).
    let deadline = Instant::now() + Duration::from_secs(10);
    while net.circuits(1) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(net.circuits(1), 0, "the exit expired the circuit too");
    assert_eq!(net.worker_stat(1, "expired_circuits"), 1);
    // Links idle out once they hold no circuits.
    let deadline = Instant::now() + Duration::from_secs(10);
    while (net.worker_stat(0, "client_links")
        + net.worker_stat(0, "peer_links")
        + net.worker_stat(1, "peer_links"))
        > 0
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        net.worker_stat(0, "client_links"),
        0,
        "client link forgotten"
    );
    assert_eq!(net.worker_stat(0, "peer_links"), 0, "peer link forgotten");
    assert_eq!(
        net.worker_stat(1, "peer_links"),
        0,
        "peer link forgotten at the exit"
    );
    // The client still believes in its link; the relay treats its next setup as a
    // new client's and installs the link again.
    let id = c
        .build_circuit(&net.path(&[0, 1]), dest, T)
        .expect("rebuild");
    round_trips(&mut c, id, 2, 4);
    assert_eq!(net.worker_stat(0, "client_links"), 1);
}

/// A client of protocol version 1 (its routing slot's version byte is 0; its key
/// schedule's first 192 bytes are those of version 2, and it knows no counter shifts)
/// gets a REFUSED with reason `version` that it can read: header counter 0, layer
/// sealed with the unshifted counter 0. The relay counts it, builds no circuit and
/// keeps no link.
#[test]
fn a_version_1_setup_gets_a_refusal_the_old_client_can_read() {
    use rand_core::{OsRng, RngCore};
    use shroud_proto::cell::Command;
    use shroud_proto::layer::{open_backward, LayerKeys, ORIGIN_MARKER_LEN};
    use shroud_proto::relay::{client_link_keys, DropReason};
    use shroud_proto::setup::{build_setup_with, Ephemeral, Next, SetupHop};
    use shroud_proto::{Layout, RingAead};

    let net = TestNet::start(NetOpts::new(78, 1));
    let (dest, _echo) = echo(78);
    let hop = net.path(&[0])[0];
    let layout = Layout::default();
    let mut seed = [0u8; 16];
    OsRng.fill_bytes(&mut seed);
    seed[0] |= 1;
    let in_id = OsRng.next_u64() | 1;
    let hops = [SetupHop {
        onion_pub: *hop.onion.as_bytes(),
        next: Next::Exit { dest },
        in_id,
        link_seed: seed,
        mix_mean_ms: 0,
    }];
    let mut cell = vec![0u8; layout.cell];
    let secrets = build_setup_with::<RingAead, _>(
        &layout,
        &hops,
        &[Ephemeral::generate(&mut OsRng)],
        0,
        shroud_tests::now_s(),
        &mut OsRng,
        &mut cell,
    )
    .unwrap();
    OsRng.fill_bytes(&mut cell[..16]);
    let sock = UdpSocket::bind("127.0.78.200:0").unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    sock.send_to(&cell, hop.addr).unwrap();
    let mut reply = vec![0u8; 2 * layout.cell];
    let (n, from) = sock.recv_from(&mut reply).expect("a reply, not silence");
    assert_eq!((n, from), (layout.cell, hop.addr));
    reply.truncate(n);
    let (_, down) = client_link_keys(&seed, &hop.id);
    let hdr = down.unprotect(&reply).expect("header under the link key");
    assert_eq!(hdr.command, Command::Refused);
    assert_eq!(hdr.counter, 0, "unshifted counter 0");
    assert_eq!(hdr.circuit, in_id);
    // Version 1 peeled with the plain keys and counter 0.
    let v1_keys = [LayerKeys::<RingAead>::new(&secrets[0].kb, &secrets[0].sb)];
    let opened = open_backward(&layout, &v1_keys, Command::Refused, 0, &mut reply)
        .expect("the layer opens with version 1's keys");
    assert_eq!(opened.layers, 1);
    let reason = reply[layout.stack_end() + ORIGIN_MARKER_LEN];
    assert_eq!(reason, DropReason::Version as u8);
    assert_eq!(net.drops(0, "version"), 1);
    assert_eq!(net.circuits(0), 0);
    assert_eq!(net.worker_stat(0, "client_links"), 0, "no link kept");
}

/// `queue_full`: an exit whose transmit arena (`[io] tx_cells`) is tiny gets bursts
/// of replies from many circuits' destinations at once; what does not fit is dropped
/// and counted, and every reply is accounted for: each one the destination sent
/// either reached the client or was counted as queue_full.
#[test]
fn exit_replies_beyond_the_transmit_arena_are_counted_as_queue_full() {
    let mut opts = NetOpts::new(79, 1);
    opts.tx_cells = 2;
    let net = TestNet::start(opts);
    let (dest, echo) = echo(79);
    let mut c = net.client();
    let ids: Vec<_> = (0..16)
        .map(|_| c.build_circuit(&net.path(&[0]), dest, T).expect("circuit"))
        .collect();
    let rounds = 20;
    for r in 0..rounds {
        for &id in &ids {
            c.send(id, &[r as u8; 64]).expect("send");
        }
    }
    let mut back = 0u64;
    while c.recv(Duration::from_secs(2)).is_ok() {
        back += 1;
    }
    let sent = (rounds * ids.len()) as u64;
    let echoed = echo.datagrams();
    let full = net.drops(0, "queue_full");
    eprintln!("{sent} sent, {echoed} echoed, {back} back, {full} queue_full");
    // (The echo server's receive buffer may overflow in a burst like this one; only
    // the replies are under test.)
    assert!(
        echoed > sent / 2,
        "{echoed} of {sent} payloads reached the destination"
    );
    assert!(
        full > 0,
        "a 2-cell arena never overflowed under {sent} replies"
    );
    assert_eq!(
        back + full,
        echoed,
        "every reply either arrived or was counted"
    );
}

/// The io_uring driver receives into a ring of `[io] recv_slots` buffers that are
/// given back only once the cells in them have been sent. With two buffers and
/// eight clients sending at once the ring runs dry again and again; receiving must
/// pause and resume without losing a datagram (they wait in the socket) and without
/// counting a receive error.
#[test]
fn a_receive_ring_that_runs_dry_pauses_and_loses_nothing() {
    let mut opts = NetOpts::new(83, 3);
    opts.recv_slots = 2;
    opts.driver = "uring";
    let net = TestNet::start(opts);
    let (dest, echo) = echo(83);
    let path = net.path(&[0, 1, 2]);
    let mut clients: Vec<(Client, shroud_client::CircuitId)> = (0..8)
        .map(|_| {
            let mut c = net.client();
            let id = c.build_circuit(&path, dest, T).expect("circuit");
            (c, id)
        })
        .collect();
    let (rounds, per_round) = (15, 20);
    let mut back = vec![0usize; clients.len()];
    for r in 0..rounds {
        for (c, id) in clients.iter_mut() {
            for k in 0..per_round {
                c.send(*id, &[r as u8, k as u8, 7, 7]).expect("send");
            }
        }
        for (i, (c, _)) in clients.iter_mut().enumerate() {
            while back[i] < (r + 1) * per_round {
                match c.recv(T) {
                    Ok((_, p)) => {
                        assert_eq!(&p[2..4], &[7, 7]);
                        back[i] += 1;
                    }
                    Err(e) => panic!(
                        "client {i}, round {r}: {} of {} back: {e}",
                        back[i],
                        (r + 1) * per_round
                    ),
                }
            }
        }
    }
    let sent = rounds * per_round;
    assert!(back.iter().all(|&b| b == sent), "{back:?} of {sent} each");
    assert_eq!(echo.datagrams(), (sent * clients.len()) as u64);
    let dry: u64 = (0..3).map(|i| net.worker_stat(i, "recv_ring_empty")).sum();
    let errors: u64 = (0..3).map(|i| net.worker_stat(i, "recv_errors")).sum();
    eprintln!("ring ran dry {dry} times, {errors} receive errors");
    assert!(
        dry > 0,
        "the 2-buffer ring never ran dry: the test did not test it"
    );
    assert_eq!(errors, 0);
    for i in 0..3 {
        assert_eq!(net.drops(i, "malformed"), 0);
        assert_eq!(net.drops(i, "queue_full"), 0);
    }
}

/// A relay listening on two IPv4 addresses answers a client on the address the client
/// used (not the first socket of the family), and still reaches its next hop from the
/// address the peer list names: a 3-hop circuit whose first hop is addressed at the
/// guard's second listen address delivers both ways, on both drivers.
fn replies_leave_from_the_address_the_client_used(driver: &'static str, net_no: u8) {
    let second = std::net::IpAddr::from([127, 0, net_no, 101]);
    let mut opts = NetOpts::new(net_no, 3);
    opts.driver = driver;
    opts.more_listen = vec![vec![second]];
    let net = TestNet::start(opts);
    let (dest, echo) = echo(net_no);
    let mut c = net.client();
    let mut path = net.path(&[0, 1, 2]);
    path[0].addr = SocketAddr::new(second, path[0].addr.port());
    let id = c.build_circuit(&path, dest, T).unwrap_or_else(|e| {
        panic!(
            "{driver}: circuit via the second address: {e}\n{}",
            net.log(0)
        )
    });
    round_trips(&mut c, id, 12, 7);
    assert_eq!(echo.datagrams(), 12);
    // Another client (its own link: a link is one client address to one relay)
    // reaching the same relay at its first address, while the first keeps going.
    let mut c2 = net.client();
    let id2 = c2
        .build_circuit(&net.path(&[0, 1, 2]), dest, T)
        .unwrap_or_else(|e| panic!("{driver}: circuit via the first address: {e}"));
    round_trips(&mut c2, id2, 2, 8);
    round_trips(&mut c, id, 2, 9);
    assert_eq!(echo.datagrams(), 16);
    let s = net.admin(0, json!({"cmd": "status"}));
    assert_eq!(s["result"]["drops"]["not_a_peer"], 0, "{s}");
}

#[test]
fn replies_leave_from_the_address_the_client_used_io_uring() {
    replies_leave_from_the_address_the_client_used("uring", 57);
}

#[test]
fn replies_leave_from_the_address_the_client_used_fallback_driver() {
    replies_leave_from_the_address_the_client_used("mmsg", 58);
}

/// `Client::build_circuits` sends every setup before waiting: 40 circuits through 3
/// relay processes all open in one call, each carries its own traffic, and in the same
/// batch a destination the exit refuses gets its refusal (hop 2, policy) and a first
/// hop that does not exist times out, without holding up the others' results.
#[test]
fn circuits_build_in_parallel_with_their_own_results() {
    let net = TestNet::start(NetOpts::new(59, 3));
    let (dest, echo) = echo(59);
    let mut c = net.client();
    let path = net.path(&[0, 1, 2]);
    let refused_dest = SocketAddr::from(([10, 0, 0, 1], 9));
    let mut nowhere = net.path(&[0, 1, 2]);
    nowhere[0].addr = SocketAddr::from(([127, 0, 59, 77], 9000));
    let mut requests: Vec<(&[shroud_client::PathHop], SocketAddr)> =
        (0..40).map(|_| (path.as_slice(), dest)).collect();
    requests.push((path.as_slice(), refused_dest));
    requests.push((nowhere.as_slice(), dest));
    let started = Instant::now();
    let results = c.build_circuits(&requests, Duration::from_secs(3));
    let took = started.elapsed();
    assert_eq!(results.len(), 42);
    let ids: Vec<_> = results[..40]
        .iter()
        .map(|r| {
            *r.as_ref()
                .unwrap_or_else(|e| panic!("a circuit failed: {e}\n{}", net.log(0)))
        })
        .collect();
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), 40, "every circuit has its own id");
    match &results[40] {
        Err(ClientError::Refused {
            hop, reason_name, ..
        }) => {
            assert_eq!((*hop, *reason_name), (2, "policy"));
        }
        other => panic!("a refused destination: {other:?}"),
    }
    assert!(
        matches!(
            results[41],
            Err(ClientError::SetupTimeout { attempts: 1, .. })
        ),
        "{:?}",
        results[41]
    );
    // The timeout bounds the whole call (the dead hop's setup waited it out).
    assert!(took < Duration::from_secs(10), "{took:?}");
    for (k, &id) in ids.iter().enumerate() {
        c.send(id, &[k as u8; 32]).expect("send");
    }
    let mut back = std::collections::HashMap::new();
    for _ in 0..40 {
        let (id, p) = c.recv(T).expect("reply");
        back.insert(id, p);
    }
    for (k, id) in ids.iter().enumerate() {
        assert_eq!(
            back[id],
            vec![k as u8; 32],
            "circuit {k} carried its own payload"
        );
    }
    assert_eq!(echo.datagrams(), 40);
    assert_eq!(
        net.circuits(0),
        40,
        "the refused and the dead setups hold nothing"
    );
}

/// An exit sends consecutive payloads of one circuit in one UDP GSO send: the
/// destination, a plain socket, still receives every payload as its own datagram,
/// byte for byte and in order, and the exit counts fewer sends than deliveries
/// (with `[io] gro_gso = false`, one send each).
fn exit_deliveries_leave_in_gso_sends(driver: &'static str, gro_gso: bool, net_no: u8) {
    let mut opts = NetOpts::new(net_no, 2);
    opts.driver = driver;
    opts.gro_gso = gro_gso;
    let net = TestNet::start(opts);
    let dest = UdpSocket::bind(SocketAddr::from(([127, 0, net_no, 250], 0))).expect("dest");
    dest.set_read_timeout(Some(T)).expect("timeout");
    let to = dest.local_addr().expect("addr");
    let mut c = net.client();
    let payload = |k: usize, len: usize| -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(7) ^ k as u8)
            .collect()
    };
    // Equal lengths then a shorter last one (one run); then lengths that must split
    // (a longer payload cannot follow in the same send).
    let lengths: Vec<usize> = [vec![600; 39], vec![100], vec![600, 600, 700, 700, 100]].concat();
    for (hops, path) in [(1, vec![1]), (2, vec![0, 1])] {
        let id = c
            .build_circuit(&net.path(&path), to, T)
            .unwrap_or_else(|e| panic!("{hops} hops: {e}"));
        let (sends0, delivered0) = (
            net.worker_stat(1, "exit_sends"),
            net.worker_stat(1, "exit_delivered"),
        );
        let payloads: Vec<Vec<u8>> = lengths
            .iter()
            .enumerate()
            .map(|(k, &l)| payload(k, l))
            .collect();
        let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_slice()).collect();
        c.send_batch(id, &refs[..40]).expect("first batch");
        c.send_batch(id, &refs[40..]).expect("second batch");
        let mut buf = [0u8; 2048];
        for (k, p) in payloads.iter().enumerate() {
            let (n, _) = dest
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("{hops} hops, payload {k}: {e}\n{}", net.log(1)));
            assert_eq!(
                &buf[..n],
                &p[..],
                "{hops} hops: payload {k} is its own datagram, intact"
            );
        }
        let delivered = net.worker_stat(1, "exit_delivered") - delivered0;
        let sends = net.worker_stat(1, "exit_sends") - sends0;
        assert_eq!(delivered, payloads.len() as u64);
        // At best 1 send for the first batch and 2 for the second; cells of a batch
        // that reach the exit in separate receives take more, but never one each.
        let want = if gro_gso {
            3..=10
        } else {
            delivered..=delivered
        };
        assert!(
            want.contains(&sends),
            "{hops} hops, {driver}, gro_gso {gro_gso}: {sends} sends for {delivered} deliveries"
        );
    }
    // Nothing more than the payloads arrived (no datagram twice, none merged away).
    dest.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let extra = dest.recv_from(&mut [0u8; 2048]);
    assert!(
        extra.is_err(),
        "an extra datagram at the destination: {extra:?}"
    );
}

#[test]
fn exit_deliveries_leave_in_gso_sends_io_uring() {
    exit_deliveries_leave_in_gso_sends("uring", true, 33);
}

#[test]
fn exit_deliveries_leave_in_gso_sends_fallback_driver() {
    exit_deliveries_leave_in_gso_sends("mmsg", true, 34);
}

#[test]
fn exit_deliveries_leave_one_send_each_without_gro_gso() {
    exit_deliveries_leave_in_gso_sends("uring", false, 35);
}

/// An exit's traffic leaves from the relay's own address (the one its peer-list entry
/// names), not from whatever address the kernel picks for an unbound socket.
#[test]
fn exit_traffic_leaves_from_the_relays_own_address() {
    let net = TestNet::start(NetOpts::new(85, 2));
    let dest = UdpSocket::bind(SocketAddr::from(([127, 0, 85, 250], 0))).expect("destination");
    dest.set_read_timeout(Some(T)).expect("timeout");
    let mut c = net.client();
    let id = c
        .build_circuit(&net.path(&[0, 1]), dest.local_addr().expect("addr"), T)
        .expect("circuit");
    c.send(id, b"from where?").expect("send");
    let mut buf = [0u8; 64];
    let (n, from) = dest.recv_from(&mut buf).expect("delivery");
    assert_eq!(&buf[..n], b"from where?");
    assert_eq!(from.ip(), net.relays[1].addr, "the exit's address");
    // And the reply goes back through the same socket.
    dest.send_to(b"back", from).expect("reply");
    assert_eq!(c.recv(T).expect("reply").1, b"back");
    // More exit circuits, one after another: every socket came ready-made from the
    // exit's pool (made off its worker thread), none was made on the worker.
    for _ in 0..20 {
        let id = c
            .build_circuit(&net.path(&[0, 1]), dest.local_addr().expect("addr"), T)
            .expect("circuit");
        c.send(id, b"again").expect("send");
        assert_eq!(dest.recv_from(&mut buf).expect("delivery").0, 5);
    }
    assert_eq!(net.worker_stat(1, "exit_pool_misses"), 0);
}

/// Open-file limit of process `pid` (soft, hard) from /proc.
fn nofile(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let l = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let v: Vec<u64> = l
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (v[0], v[1])
}

/// Every exit circuit holds a socket: a relay started under a low soft limit on open
/// files raises it to what its exit sockets need (here 256, the test configuration,
/// plus its pools and a margin), within the hard limit; under a hard limit too low for
/// that it takes the hard limit and says so in its log, and still carries traffic.
#[test]
fn the_relay_raises_its_open_file_limit_to_what_its_exits_need() {
    let mut opts = NetOpts::new(86, 2);
    let under = |soft: u32, hard: u32| {
        ["prlimit", &format!("--nofile={soft}:{hard}"), "--"]
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    };
    // A child may keep at most our own hard limit.
    let ours = nofile(std::process::id()).1.min(u64::from(u32::MAX)) as u32;
    assert!(
        ours >= 2048,
        "this test needs a hard limit of 2048 open files or more"
    );
    opts.launchers = vec![under(64, ours), under(64, 200)];
    let net = TestNet::start(opts);
    let pid = |i: usize| net.relays[i].child.as_ref().expect("running").id();
    let (soft, hard) = nofile(pid(0));
    assert_eq!(hard, u64::from(ours));
    assert!((256 + 2 * 16..=2048).contains(&soft), "soft limit {soft}");
    assert_eq!(nofile(pid(1)), (200, 200));
    assert!(
        net.log(1).contains("open-file limit is below"),
        "{}",
        net.log(1)
    );
    let (dest, _echo) = echo(86);
    let mut c = net.client();
    for path in [[0, 1], [1, 0]] {
        let id = c.build_circuit(&net.path(&path), dest, T).expect("circuit");
        round_trips(&mut c, id, 4, 3);
    }
}
