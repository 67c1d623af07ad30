//! Mix mode against real `shroud-relay` processes: a mixed and a plain circuit share
//! the relays and only the mixed one's cells are held; a relay refuses delays it does
//! not offer; a full delay queue drops and counts; cover ends at the exit and loop
//! cover comes back.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shroud_client::{udp_echo_server, ClientError, CoverKind};
use shroud_tests::{NetOpts, TestNet};

const T: Duration = Duration::from_secs(5);

fn echo(net: u8) -> (SocketAddr, shroud_client::EchoHandle) {
    udp_echo_server(SocketAddr::from(([127, 0, net, 250], 0))).expect("echo server")
}

fn held(net: &TestNet, relays: usize) -> u64 {
    (0..relays).map(|i| net.worker_stat(i, "mix_delayed")).sum()
}

#[test]
fn only_mixed_circuits_are_held_and_their_round_trips_take_the_delay_io_uring() {
    only_mixed_circuits_are_held("uring", 20);
}

#[test]
fn only_mixed_circuits_are_held_and_their_round_trips_take_the_delay_fallback_driver() {
    only_mixed_circuits_are_held("mmsg", 25);
}

fn only_mixed_circuits_are_held(driver: &'static str, net_no: u8) {
    let mut opts = NetOpts::new(net_no, 3);
    opts.driver = driver;
    let net = TestNet::start(opts);
    let (dest, echo) = echo(net_no);
    let mut c = net.client();
    let path = net.path(&[0, 1, 2]);
    let plain = c.build_circuit(&path, dest, T).expect("plain circuit");
    let mixed = c
        .build_mixed_circuit(&path, &[20, 20, 20], dest, T)
        .expect("mixed circuit");
    let rounds = 30;
    let mut rtt = |id, tag: u8| -> Vec<Duration> {
        (0..rounds)
            .map(|k| {
                let payload = [tag, k as u8];
                let t = Instant::now();
                c.send(id, &payload).expect("send");
                let (got_id, got) = c.recv(T).expect("reply");
                assert_eq!((got_id, got.as_slice()), (id, &payload[..]));
                t.elapsed()
            })
            .collect()
    };
    let plain_rtt = rtt(plain, 1);
    assert_eq!(held(&net, 3), 0, "a plain circuit's cells are never held");
    let mixed_rtt = rtt(mixed, 2);
    // Each round trip is held six times: forward at hops 0 and 1 and the exit's
    // delivery, backward the exit's reply and hops 1 and 0.
    assert_eq!(held(&net, 3), 6 * rounds);
    assert_eq!(echo.datagrams(), 2 * rounds);
    for i in 0..3 {
        assert_eq!(net.worker_stat(i, "mix_held"), 0, "relay {i} released all");
        assert_eq!(net.worker_stat(i, "mix_overflow"), 0);
    }
    // The sum of six exponential delays of mean 20 ms (a gamma of mean 120 ms) is
    // below 60 ms with probability 0.08, so the median of 30 is above it for sure; a
    // busy machine only adds time.
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (p, m) = (median(plain_rtt), median(mixed_rtt));
    eprintln!("median round trip: plain {p:?}, mixed {m:?}");
    assert!(
        m >= Duration::from_millis(60),
        "mixed round trips were not delayed: median {m:?}"
    );
}

#[test]
fn a_relay_refuses_a_mean_delay_it_does_not_offer() {
    let mut opts = NetOpts::new(21, 2);
    opts.mix_max_mean_ms = 100;
    let net = TestNet::start(opts);
    let (dest, _echo) = echo(21);
    let mut c = net.client();
    let path = net.path(&[0, 1]);
    match c.build_mixed_circuit(&path, &[100, 101], dest, T) {
        Err(ClientError::Refused {
            hop, reason_name, ..
        }) => assert_eq!((hop, reason_name), (1, "mix")),
        other => panic!("expected a refusal at hop 1: {other:?}"),
    }
    assert_eq!(net.drops(1, "mix"), 1);
    assert_eq!(net.circuits(0) + net.circuits(1), 0);
    // At the maximum it builds and carries data.
    let id = c
        .build_mixed_circuit(&path, &[100, 100], dest, T)
        .expect("mixed circuit");
    c.send(id, b"at the maximum").expect("send");
    assert_eq!(c.recv(T).expect("reply").1, b"at the maximum");
}

#[test]
fn a_relay_without_mix_mode_refuses_every_mixed_circuit() {
    let mut opts = NetOpts::new(22, 1);
    opts.mix_max_mean_ms = 0;
    opts.mix_queue_cells = 0;
    let net = TestNet::start(opts);
    let (dest, _echo) = echo(22);
    let mut c = net.client();
    let err = c
        .build_mixed_circuit(&net.path(&[0]), &[1], dest, T)
        .expect_err("no mix mode offered");
    assert!(
        matches!(
            err,
            ClientError::Refused {
                reason_name: "mix",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(net.drops(0, "mix"), 1);
    // Plain circuits are unaffected.
    let id = c.build_circuit(&net.path(&[0]), dest, T).expect("plain");
    c.send(id, b"plain").expect("send");
    assert_eq!(c.recv(T).expect("reply").1, b"plain");
}

#[test]
fn a_full_delay_queue_drops_and_counts_every_cell_it_cannot_hold() {
    let mut opts = NetOpts::new(23, 1);
    opts.mix_max_mean_ms = 60_000;
    opts.mix_queue_cells = 8;
    let net = TestNet::start(opts);
    let (dest, echo) = echo(23);
    let mut c = net.client();
    // One hop holding each delivery for a minute on average.
    let id = c
        .build_mixed_circuit(&net.path(&[0]), &[60_000], dest, T)
        .expect("mixed circuit");
    let sent = 40u64;
    for k in 0..sent {
        c.send(id, &[k as u8; 32]).expect("send");
    }
    // Wait until the relay has seen every cell.
    let deadline = Instant::now() + T;
    let (mut delayed, mut overflow) = (0, 0);
    while Instant::now() < deadline {
        delayed = net.worker_stat(0, "mix_delayed");
        overflow = net.worker_stat(0, "mix_overflow");
        if delayed + overflow >= sent {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let released = echo.datagrams();
    eprintln!("{delayed} held, {overflow} overflowed, {released} released early");
    assert_eq!(delayed + overflow, sent, "every cell held or counted");
    // Eight places; a place frees early only if a delay of mean 60 s is shorter than
    // the test (probability under 1% each).
    assert!(delayed <= 8 + released, "{delayed} held in 8 places");
    assert!(net.worker_stat(0, "mix_held") <= 8);
    assert_eq!(net.drops(0, "queue_full"), overflow);
}

#[test]
fn cover_ends_at_the_exit_and_loop_cover_comes_back_looking_like_data() {
    let net = TestNet::start(NetOpts::new(24, 3));
    let (dest, echo) = echo(24);
    let mut c = net.client();
    let id = c
        .build_mixed_circuit(&net.path(&[0, 1, 2]), &[5, 5, 5], dest, T)
        .expect("mixed circuit");
    let n = 20u64;
    for _ in 0..n {
        c.send_padding(id).expect("cover");
        c.send_loop_cover(id).expect("loop cover");
    }
    // Loops come back as padding, which recv skips: wait until all are counted.
    let deadline = Instant::now() + T;
    while c.stats().padding_received < n && Instant::now() < deadline {
        match c.recv(Duration::from_millis(200)) {
            Err(ClientError::Timeout) => {}
            other => panic!("nothing but padding comes back: {other:?}"),
        }
    }
    assert_eq!(c.stats().padding_received, n, "every loop came back");
    assert_eq!((c.stats().cover_sent, c.stats().loop_cover_sent), (n, n));
    assert_eq!(echo.datagrams(), 0, "no cover reaches the destination");
    assert_eq!(net.worker_stat(2, "cover_received"), 2 * n);
    assert_eq!(net.worker_stat(2, "loop_cover_returned"), n);
    // The middle relay forwarded all of it as data cells, and relayed the loops back.
    assert_eq!(net.worker_stat(1, "cells_forward"), 2 * n);
    assert_eq!(
        net.worker_stat(1, "cells_backward"),
        n + 1,
        "loops and the CREATED"
    );
}

#[test]
fn constant_rate_links_pad_peer_links_and_the_peer_drops_the_padding() {
    let rate = 1000u64;
    let mut opts = NetOpts::new(26, 2);
    opts.link_cells_per_sec = rate as u32;
    let net = TestNet::start(opts);
    let (dest, echo) = echo(26);
    let mut c = net.client();
    // No circuit yet: no link is padded.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(net.worker_stat(0, "link_padding_sent"), 0);
    let built = Instant::now();
    let id = c
        .build_circuit(&net.path(&[0, 1]), dest, T)
        .expect("circuit");
    std::thread::sleep(Duration::from_millis(1500));
    // Data still flows, and counts toward the rate.
    for k in 0..20u8 {
        c.send(id, &[k; 100]).expect("send");
        assert_eq!(c.recv(T).expect("reply").1, vec![k; 100]);
    }
    let sent0 = net.worker_stat(0, "link_padding_sent");
    let sent1 = net.worker_stat(1, "link_padding_sent");
    let secs = built.elapsed().as_secs_f64();
    let recv1 = net.worker_stat(1, "link_padding_received");
    let recv0 = net.worker_stat(0, "link_padding_received");
    eprintln!(
        "{secs:.2} s: relay 0 padded {sent0}, relay 1 padded {sent1}, received {recv1} and {recv0}"
    );
    // Both ends pad the link (it carries the circuit both ways), never above the rate.
    for (sent, who) in [(sent0, 0), (sent1, 1)] {
        assert!(
            sent as f64 <= rate as f64 * (secs + 0.05),
            "relay {who} padded {sent} cells in {secs:.2} s at {rate}/s"
        );
        assert!(
            sent as f64 >= rate as f64 * 0.3 * (secs - 0.5),
            "relay {who} padded only {sent} cells in {secs:.2} s at {rate}/s"
        );
    }
    // What one sent, the other receives and drops (padding keeps flowing, so the
    // receiver's count catches up with the sender's earlier one), and nothing else
    // is dropped.
    let deadline = Instant::now() + T;
    let (mut r1, mut r0) = (recv1, recv0);
    while (r1 < sent0 || r0 < sent1) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        r1 = net.worker_stat(1, "link_padding_received");
        r0 = net.worker_stat(0, "link_padding_received");
    }
    assert!(r1 >= sent0 && r0 >= sent1, "{r1}/{sent0}, {r0}/{sent1}");
    for i in 0..2 {
        for reason in ["unknown_circuit", "malformed", "bad_tag"] {
            assert_eq!(net.drops(i, reason), 0, "relay {i}: {reason}");
        }
    }
    assert_eq!(echo.datagrams(), 20);
}

#[test]
fn a_circuit_sends_poisson_cover_on_its_own_while_the_client_waits() {
    let net = TestNet::start(NetOpts::new(27, 3));
    let (dest, echo) = echo(27);
    let mut c = net.client();
    let id = c
        .build_circuit(&net.path(&[0, 1, 2]), dest, T)
        .expect("circuit");
    let rate = 200.0;
    c.set_cover(id, rate, CoverKind::Loop).expect("cover on");
    // The application only waits; loops go out and come back meanwhile.
    let start = Instant::now();
    let wait = Duration::from_millis(1500);
    while start.elapsed() < wait {
        match c.recv(wait.saturating_sub(start.elapsed())) {
            Err(ClientError::Timeout) => {}
            other => panic!("nothing but cover comes back: {other:?}"),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    c.set_cover(id, 0.0, CoverKind::Loop).expect("cover off");
    let sent = c.stats().loop_cover_sent;
    eprintln!("{sent} loop cover cells in {secs:.2} s at {rate}/s");
    // A Poisson count of mean 300: far inside these bounds unless the process starved.
    assert!(
        (sent as f64) >= 0.4 * rate * secs && (sent as f64) <= 1.6 * rate * secs + 20.0,
        "{sent} cells in {secs:.2} s at {rate}/s"
    );
    // Every loop comes back once cover stops.
    let deadline = Instant::now() + T;
    while c.stats().padding_received < sent && Instant::now() < deadline {
        let _ = c.recv(Duration::from_millis(100));
    }
    assert_eq!(c.stats().padding_received, sent);
    assert_eq!(net.worker_stat(2, "loop_cover_returned"), sent);
    // Drop cover, sent by an application that never receives.
    c.set_cover(id, rate, CoverKind::Drop)
        .expect("drop cover on");
    let start = Instant::now();
    let mut drops = 0;
    while start.elapsed() < Duration::from_millis(500) {
        std::thread::sleep(Duration::from_millis(20));
        drops += c.send_due_cover().expect("cover");
    }
    assert!(drops > 0);
    assert_eq!(c.stats().cover_sent, drops as u64);
    let deadline = Instant::now() + T;
    while net.worker_stat(2, "cover_received") < sent + drops as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(net.worker_stat(2, "cover_received"), sent + drops as u64);
    assert_eq!(echo.datagrams(), 0);
}
