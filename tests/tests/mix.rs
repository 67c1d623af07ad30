//! Mix mode against real `shroud-relay` processes: a mixed and a plain circuit share
//! the relays and only the mixed one's cells are held; a relay refuses delays it does
//! not offer; a full delay queue drops and counts; cover ends at the exit and loop
//! cover comes back.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shroud_client::{udp_echo_server, ClientError};
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
    only_mixed_circuits_are_held("uring", 90);
}

#[test]
fn only_mixed_circuits_are_held_and_their_round_trips_take_the_delay_fallback_driver() {
    only_mixed_circuits_are_held("mmsg", 95);
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
    let mut opts = NetOpts::new(91, 2);
    opts.mix_max_mean_ms = 100;
    let net = TestNet::start(opts);
    let (dest, _echo) = echo(91);
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
    let mut opts = NetOpts::new(92, 1);
    opts.mix_max_mean_ms = 0;
    opts.mix_queue_cells = 0;
    let net = TestNet::start(opts);
    let (dest, _echo) = echo(92);
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
    let mut opts = NetOpts::new(93, 1);
    opts.mix_max_mean_ms = 60_000;
    opts.mix_queue_cells = 8;
    let net = TestNet::start(opts);
    let (dest, echo) = echo(93);
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
    let net = TestNet::start(NetOpts::new(94, 3));
    let (dest, echo) = echo(94);
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
