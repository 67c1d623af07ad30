//! The client against real `Relay` state machines over real UDP on 127.0.0.1, with
//! `udp_echo_server` as the destination behind the exit. Every wait is bounded by a
//! timeout of a few seconds at most.

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use shroud_client::{
    udp_echo_server, CircuitId, Client, ClientConfig, ClientError, EchoHandle, PathHop,
};
use shroud_proto::relay::DropReason;

const SETUP: Duration = Duration::from_secs(3);
const WAIT: Duration = Duration::from_secs(2);

fn client(net: &TestNet) -> Client {
    Client::new(local(0), &net.list).unwrap()
}

fn echo() -> (SocketAddr, EchoHandle) {
    udp_echo_server(local(0)).unwrap()
}

fn payload(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31) ^ tag).collect()
}

/// Sends payloads of several sizes (empty and full included) and checks each comes
/// back intact on the same circuit.
fn echo_roundtrips(c: &mut Client, id: CircuitId) {
    let max = c.payload_max();
    for (k, len) in [0, 1, 100, 512, max].into_iter().enumerate() {
        let p = payload(k as u8, len);
        c.send(id, &p).unwrap();
        let (got_id, got) = c.recv(WAIT).unwrap();
        assert_eq!(got_id, id);
        assert_eq!(got, p, "{len}-byte payload intact both ways");
    }
}

#[test]
fn one_hop_circuit_round_trips() {
    let net = TestNet::plain(1);
    let (dest, echo) = echo();
    let mut c = client(&net);
    let id = c.build_circuit(&net.path(&[0]), dest, SETUP).unwrap();
    assert_eq!(c.circuits(), vec![id]);
    echo_roundtrips(&mut c, id);
    assert_eq!(echo.datagrams(), 5);
    let s = c.stats();
    assert_eq!((s.setups_sent, s.setups_ok), (1, 1));
    assert_eq!(s.payloads_received, 5);
    assert_eq!(s.cells_sent, 6);
    assert_eq!(s.cells_received, 6, "CREATED + 5 replies");
    assert_eq!((s.rejected, s.unknown, s.malformed), (0, 0, 0));
    assert!(
        net.relays[0].drops().is_empty(),
        "{:?}",
        net.relays[0].drops()
    );
}

#[test]
fn three_hop_circuit_round_trips() {
    let net = TestNet::plain(3);
    let (dest, echo) = echo();
    let mut c = client(&net);
    let id = c.build_circuit(&net.path(&[0, 1, 2]), dest, SETUP).unwrap();
    echo_roundtrips(&mut c, id);
    assert_eq!(echo.datagrams(), 5);
    assert_eq!(net.relays[2].delivered(), 5, "the last hop is the exit");
    assert_eq!(net.relays[0].delivered() + net.relays[1].delivered(), 0);
    // A batch arrives complete and in one piece per payload.
    let batch: Vec<Vec<u8>> = (0..20u8).map(|k| payload(k, 10 + k as usize)).collect();
    let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
    c.send_batch(id, &refs).unwrap();
    let mut got: Vec<Vec<u8>> = (0..20).map(|_| c.recv(WAIT).unwrap().1).collect();
    got.sort();
    let mut want = batch.clone();
    want.sort();
    assert_eq!(got, want);
    for r in &net.relays {
        assert!(r.drops().is_empty(), "{:?}", r.drops());
    }
}

#[test]
fn recv_into_does_not_need_a_new_buffer() {
    let net = TestNet::plain(2);
    let (dest, _echo) = echo();
    let mut c = client(&net);
    let id = c.build_circuit(&net.path(&[1, 0]), dest, SETUP).unwrap();
    let mut small = [0u8; 10];
    assert!(matches!(
        c.recv_into(&mut small, WAIT),
        Err(ClientError::BufferTooSmall { got: 10, .. })
    ));
    let mut buf = vec![0u8; c.payload_max()];
    c.send(id, b"into").unwrap();
    let (got_id, n) = c.recv_into(&mut buf, WAIT).unwrap();
    assert_eq!((got_id, &buf[..n]), (id, &b"into"[..]));
}

#[test]
fn many_circuits_on_one_client_demultiplex() {
    let net = TestNet::plain(3);
    let (dest, _echo) = echo();
    let mut c = client(&net);
    // Shared first hops (one link, several circuits) and different ones.
    let paths: [&[usize]; 5] = [&[0], &[0, 1], &[0, 1, 2], &[1, 2, 0], &[2, 0]];
    let ids: Vec<CircuitId> = paths
        .iter()
        .map(|p| c.build_circuit(&net.path(p), dest, SETUP).unwrap())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "distinct circuit ids");
    assert_eq!(c.circuits(), sorted);
    // Interleave: round r sends "circuit k, message r" on every circuit k.
    let rounds = 8;
    for r in 0..rounds {
        for (k, &id) in ids.iter().enumerate() {
            c.send(id, format!("circuit {k} message {r}").as_bytes())
                .unwrap();
        }
    }
    let mut got: HashMap<CircuitId, Vec<String>> = HashMap::new();
    for _ in 0..rounds * ids.len() {
        let (id, p) = c.recv(WAIT).unwrap();
        got.entry(id)
            .or_default()
            .push(String::from_utf8(p).unwrap());
    }
    for (k, id) in ids.iter().enumerate() {
        let mut msgs = got.remove(id).unwrap_or_default();
        msgs.sort();
        let mut want: Vec<String> = (0..rounds)
            .map(|r| format!("circuit {k} message {r}"))
            .collect();
        want.sort();
        assert_eq!(msgs, want, "circuit {k} got exactly its own replies");
    }
    assert!(got.is_empty());
    assert!(matches!(
        c.recv(Duration::from_millis(100)),
        Err(ClientError::Timeout)
    ));
}

#[test]
fn recv_times_out_when_a_relay_stops_mid_stream() {
    let mut net = TestNet::plain(3);
    let (dest, _echo) = echo();
    let mut c = client(&net);
    let id = c.build_circuit(&net.path(&[0, 1, 2]), dest, SETUP).unwrap();
    c.send(id, b"before").unwrap();
    assert_eq!(c.recv(WAIT).unwrap().1, b"before");
    assert!(c.check_alive(id, Duration::from_secs(60)));
    net.relays[1].stop();
    c.send(id, b"after").unwrap();
    let t = Instant::now();
    let timeout = Duration::from_millis(300);
    assert!(matches!(c.recv(timeout), Err(ClientError::Timeout)));
    let took = t.elapsed();
    assert!(took >= timeout, "returned early: {took:?}");
    // (Wide margin: a busy 2-core machine can delay any thread by seconds.)
    assert!(took < timeout + Duration::from_secs(20), "hung: {took:?}");
    // A short wait (whose timeout stays on the socket) and then a longer one: the
    // longer one still waits its whole time, and a shorter one after it still
    // returns in time.
    for ms in [5u64, 250, 20] {
        let t = Instant::now();
        let timeout = Duration::from_millis(ms);
        assert!(matches!(c.recv(timeout), Err(ClientError::Timeout)));
        let took = t.elapsed();
        assert!(took >= timeout, "{ms} ms: returned early: {took:?}");
        assert!(took < timeout + Duration::from_secs(20), "hung: {took:?}");
    }
    // Nothing arrived for a while: the circuit looks dead for a short idle limit.
    assert!(!c.check_alive(id, Duration::from_millis(200)));
    assert!(c.check_alive(id, Duration::from_secs(60)));
}

#[test]
fn refusal_names_the_hop_and_the_reason() {
    let strict = RelayOpts {
        policy: vec!["accept 127.0.0.1:1"],
        ..RelayOpts::default()
    };
    let net = TestNet::new(&[RelayOpts::default(), RelayOpts::default(), strict]);
    let (dest, echo) = echo();
    let mut c = client(&net);
    let path = net.path(&[0, 1, 2]);
    match c.build_circuit(&path, dest, SETUP) {
        Err(ClientError::Refused {
            hop,
            relay,
            reason,
            reason_name,
        }) => {
            assert_eq!(hop, 2);
            assert_eq!(relay, path[2].id);
            assert_eq!(reason, DropReason::Policy as u8);
            assert_eq!(reason_name, "policy");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let msg = c
        .build_circuit(&net.path(&[2]), dest, SETUP)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("hop 0") && msg.contains("policy"), "{msg}");
    assert!(c.circuits().is_empty());
    assert_eq!(c.stats().setups_refused, 2);
    assert_eq!(echo.datagrams(), 0);
    // The other relays still exit fine.
    let id = c.build_circuit(&net.path(&[2, 1]), dest, SETUP).unwrap();
    c.send(id, b"ok").unwrap();
    assert_eq!(c.recv(WAIT).unwrap(), (id, b"ok".to_vec()));
}

#[test]
fn lost_setup_is_retried_with_a_fresh_circuit() {
    let lossy = RelayOpts {
        drop_first: 1,
        ..RelayOpts::default()
    };
    let net = TestNet::new(&[lossy, RelayOpts::default()]);
    let (dest, _echo) = echo();
    let mut c = client(&net);
    let id = c
        .build_circuit(&net.path(&[0, 1]), dest, Duration::from_secs(3))
        .unwrap();
    let s = c.stats().clone();
    assert_eq!((s.setups_sent, s.setups_timed_out, s.setups_ok), (2, 1, 1));
    c.send(id, b"second try").unwrap();
    assert_eq!(c.recv(WAIT).unwrap().1, b"second try");
}

#[test]
fn setup_to_nowhere_times_out_after_every_attempt() {
    let net = TestNet::plain(1);
    let mut c = Client::with_layout(
        local(0),
        net.layout,
        ClientConfig {
            setup_attempts: 2,
            ..ClientConfig::default()
        },
    )
    .unwrap();
    // A bound socket that never answers.
    let silent = UdpSocket::bind(local(0)).unwrap();
    let hop = PathHop {
        addr: silent.local_addr().unwrap(),
        ..net.hops[0]
    };
    let t = Instant::now();
    let timeout = Duration::from_millis(400);
    let err = c.build_circuit(&[hop], local(9), timeout).unwrap_err();
    assert!(
        matches!(err, ClientError::SetupTimeout { attempts: 2, .. }),
        "{err}"
    );
    // Returned by its deadline rather than waiting on; the margin is wide because a
    // busy 2-core machine can delay any thread by seconds.
    assert!(t.elapsed() < timeout + Duration::from_secs(20));
    assert_eq!(c.stats().setups_timed_out, 2);
    assert!(c.circuits().is_empty());
}

#[test]
fn cells_arriving_during_a_setup_are_queued_not_lost() {
    let net = TestNet::plain(3);
    let (dest, echo) = echo();
    let mut c = client(&net);
    let a = c.build_circuit(&net.path(&[0, 1]), dest, SETUP).unwrap();
    let msgs: Vec<Vec<u8>> = (0..10u8).map(|k| payload(k, 50)).collect();
    let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
    c.send_batch(a, &refs).unwrap();
    // Let the echoes reach the client's socket before the next setup is sent.
    let t = Instant::now();
    while echo.datagrams() < 10 && t.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    let b = c.build_circuit(&net.path(&[2, 1, 0]), dest, SETUP).unwrap();
    let mut got = Vec::new();
    for _ in 0..10 {
        // A zero timeout reads no socket: these were queued during the setup.
        let (id, p) = c.recv(Duration::ZERO).unwrap();
        assert_eq!(id, a);
        got.push(p);
    }
    got.sort();
    let mut want = msgs.clone();
    want.sort();
    assert_eq!(got, want);
    c.send(b, b"b").unwrap();
    assert_eq!(c.recv(WAIT).unwrap(), (b, b"b".to_vec()));
}

#[test]
fn forged_and_replayed_cells_are_counted_and_never_returned() {
    let dup = RelayOpts {
        duplicate: true,
        ..RelayOpts::default()
    };
    let net = TestNet::new(&[dup]);
    let (dest, _echo) = echo();
    let mut c = client(&net);
    let id = c.build_circuit(&net.path(&[0]), dest, SETUP).unwrap();
    for k in 0..5u8 {
        c.send(id, &[k; 7]).unwrap();
        assert_eq!(c.recv(WAIT).unwrap(), (id, vec![k; 7]));
    }
    // Garbage from an address that is no link: a whole cell (unknown source) and a
    // datagram that is not a whole number of cells.
    let spoof = UdpSocket::bind(local(0)).unwrap();
    spoof.send_to(&[0u8; 1024], c.local_addr()).unwrap();
    spoof.send_to(&[7u8; 1000], c.local_addr()).unwrap();
    assert!(matches!(
        c.recv(Duration::from_millis(300)),
        Err(ClientError::Timeout)
    ));
    let s = c.stats();
    // Every cell from the relay came twice (CREATED and 5 replies): each copy is
    // refused by the replay window.
    assert_eq!(s.rejected, 6, "{s:?}");
    assert_eq!(s.payloads_received, 5);
    assert_eq!(s.unknown, 1);
    assert_eq!(s.malformed, 1);
}

#[test]
fn destroy_forgets_the_circuit() {
    let net = TestNet::plain(2);
    let (dest, echo) = echo();
    let mut c = client(&net);
    let id = c.build_circuit(&net.path(&[0, 1]), dest, SETUP).unwrap();
    c.send(id, b"x").unwrap();
    c.recv(WAIT).unwrap();
    c.destroy(id).unwrap();
    assert!(c.circuits().is_empty());
    assert!(!c.check_alive(id, Duration::from_secs(60)));
    assert!(matches!(
        c.send(id, b"y"),
        Err(ClientError::UnknownCircuit(x)) if x == id
    ));
    assert!(matches!(c.destroy(id), Err(ClientError::UnknownCircuit(_))));
    assert_eq!(echo.datagrams(), 1);
}

#[test]
fn a_destroy_from_a_hop_closes_the_circuit() {
    let net = TestNet::plain(3);
    let (dest, _echo) = echo();
    let mut c = client(&net);
    let id = c.build_circuit(&net.path(&[0, 1, 2]), dest, SETUP).unwrap();
    let other = c.build_circuit(&net.path(&[1, 2]), dest, SETUP).unwrap();
    c.send(id, b"x").unwrap();
    c.recv(WAIT).unwrap();
    // The exit saw the last cell of `id` from relay 1: make relay 1 tear it down.
    net.relays[2].forge_destroy_from_last_peer();
    match c.recv(WAIT) {
        Err(ClientError::CircuitClosed { circuit, hop }) => {
            assert_eq!((circuit, hop), (id, 1));
        }
        other => panic!("expected CircuitClosed, got {other:?}"),
    }
    assert_eq!(c.circuits(), vec![other]);
    assert!(matches!(
        c.send(id, b"y"),
        Err(ClientError::UnknownCircuit(_))
    ));
    assert_eq!(c.stats().destroyed_received, 1);
    c.send(other, b"still here").unwrap();
    assert_eq!(c.recv(WAIT).unwrap(), (other, b"still here".to_vec()));
}

#[test]
fn oversized_payload_is_refused_before_sending() {
    let net = TestNet::plain(1);
    let (dest, echo) = echo();
    let mut c = client(&net);
    let id = c.build_circuit(&net.path(&[0]), dest, SETUP).unwrap();
    let max = c.payload_max();
    let big = vec![0u8; max + 1];
    assert!(matches!(
        c.send(id, &big),
        Err(ClientError::PayloadTooLarge { got, max: m }) if got == max + 1 && m == max
    ));
    let ok = [1u8; 3];
    assert!(matches!(
        c.send_batch(id, &[&ok, &big]),
        Err(ClientError::PayloadTooLarge { .. })
    ));
    let sent = c.stats().cells_sent;
    assert_eq!(sent, 1, "only the setup went out");
    assert!(matches!(
        c.recv(Duration::from_millis(100)),
        Err(ClientError::Timeout)
    ));
    assert_eq!(echo.datagrams(), 0);
}

#[test]
fn echo_server_counts_and_stops() {
    let (addr, echo) = echo();
    let s = UdpSocket::bind(local(0)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 16];
    for k in 0..3u8 {
        s.send_to(&[k, k], addr).unwrap();
        let (n, from) = s.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&[k, k][..], addr));
    }
    assert_eq!(echo.stop(), 3);
    // The port is free again.
    UdpSocket::bind(addr).unwrap();
}

#[test]
fn a_datagram_of_several_cells_is_split_into_cells() {
    let gso = RelayOpts {
        coalesce_replies: 4,
        ..RelayOpts::default()
    };
    let net = TestNet::new(&[gso]);
    let (dest, _echo) = echo();
    let mut c = client(&net);
    let id = c.build_circuit(&net.path(&[0]), dest, SETUP).unwrap();
    let msgs: Vec<Vec<u8>> = (0..8u8).map(|k| payload(k, 200)).collect();
    let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
    c.send_batch(id, &refs).unwrap();
    let mut got: Vec<Vec<u8>> = (0..8).map(|_| c.recv(WAIT).unwrap().1).collect();
    got.sort();
    let mut want = msgs.clone();
    want.sort();
    assert_eq!(got, want);
    let s = c.stats();
    assert_eq!((s.payloads_received, s.malformed, s.rejected), (8, 0, 0));
}

#[test]
fn the_client_can_move_to_another_thread() {
    fn assert_send<T: Send>() {}
    assert_send::<Client>();
    assert_send::<EchoHandle>();
}
