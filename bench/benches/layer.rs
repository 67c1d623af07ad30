//! Criterion micro-benchmarks of the cell crypto, with raw AES-GCM as the in-run
//! baseline.
//!
//! - `raw_aes_gcm/*`: one AES-256-GCM open of what one forward layer covers at
//!   CELL=1024 (992 B: tag-stack slots 1.. and the body), of a whole 1024-byte cell,
//!   and of 16 layers in one call (15,872 B: the per-byte cost once the per-call cost is spread, which bounds
//!   what interleaving several cells' AES-GCM could save), per backend;
//! - `strip_forward/{backend}/{batch}`: one forward layer stripped from batches of 1, 8,
//!   32 and 64 cells (one open of stack and body + stack shift + filler);
//! - `relay_handle/{backend}`: the whole per-cell relay path of a middle hop (header
//!   unprotect, circuit lookup, replay window, strip, header protect);
//! - `key_cache_miss/{backend}`: what a cell whose circuit's keys are not in the
//!   relay's key cache pays on top (expanding one direction's AEAD and stack keys);
//! - `setup/open_and_forward`: one hop's setup processing (Elligator2 decode, X25519,
//!   HKDF, setup layer, routing, shift);
//! - `client/seal_3_hops`: the client's cost to seal one data cell for 3 hops;
//! - `mix_queue/push_and_release`: mix mode's delay queue, per cell.
//!
//! Throughput is reported in bytes of cell.

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use rand_core::OsRng;
use std::hint::black_box;
use std::net::SocketAddr;

use shroud_proto::aead::{nonce_for, Aead, RingAead, RustCryptoAead};
use shroud_proto::cell::Command;
use shroud_proto::client::{ClientCircuit, ClientLink, PathHop, Received};
use shroud_proto::keys::{IdentityKey, OnionSecret};
use shroud_proto::layer::{seal_forward, strip_forward_batch, LayerKeys, LayerSecret};
use shroud_proto::policy::ExitPolicy;
use shroud_proto::relay::{Action, Peer, Relay, RelayLimits};
use shroud_proto::setup::{build_setup, forward_setup, open_setup, Next, SetupHop};
use shroud_proto::Layout;

const NOW_MS: u64 = 1_764_000_000_000;

fn raw<A: Aead>(c: &mut Criterion) {
    let mut g = c.benchmark_group("raw_aes_gcm");
    let key = A::new(&[7; 32]);
    let layer = Layout::default().forward_sealed_len();
    for len in [layer, 1024, 16 * layer] {
        let mut buf = vec![0x5a; len];
        let tag = key.seal(&nonce_for(1), &[], &mut buf);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(BenchmarkId::new(A::NAME, len), |b| {
            b.iter_batched_ref(
                || buf.clone(),
                |x| key.open(&nonce_for(1), &[], black_box(x), &tag).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn strip<A: Aead>(c: &mut Criterion) {
    let layout = Layout::default();
    let keys = LayerKeys::<A>::new(&[1; 32], &[2; 32]);
    let mut g = c.benchmark_group(format!("strip_forward/{}", A::NAME));
    for batch in [1usize, 8, 32, 64] {
        // Cells sealed for a 1-hop circuit: exactly one layer to strip each, laid out
        // back to back as in a received datagram.
        let cells: Vec<u8> = (0..batch as u64)
            .flat_map(|n| {
                let mut cell = vec![0x33u8; layout.cell];
                seal_forward(
                    &layout,
                    std::slice::from_ref(&keys),
                    Command::Data,
                    n,
                    &mut cell,
                    &[[9; 16]; 8],
                );
                cell
            })
            .collect();
        g.throughput(Throughput::Bytes((batch * layout.cell) as u64));
        g.bench_function(BenchmarkId::from_parameter(batch), |b| {
            b.iter_batched_ref(
                || cells.clone(),
                |cells| {
                    let jobs = (0..batch).map(|n| (&keys, Command::Data, n as u64, n));
                    let mut results = [Ok(()); 64];
                    strip_forward_batch(&layout, cells, jobs, &mut results[..batch]);
                    assert!(results[..batch].iter().all(|r| r.is_ok()));
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

struct TwoHops<A: Aead> {
    layout: Layout,
    r0: Relay<A>,
    link: ClientLink,
    circuit: ClientCircuit<A>,
    client: SocketAddr,
}

fn two_hops<A: Aead>() -> TwoHops<A> {
    let layout = Layout::default();
    let ids: Vec<IdentityKey> = (0..2).map(|_| IdentityKey::generate(&mut OsRng)).collect();
    let onions: Vec<OnionSecret> = (0..2).map(|_| OnionSecret::generate(&mut OsRng)).collect();
    let addrs: Vec<SocketAddr> = vec![
        "127.0.0.1:9000".parse().unwrap(),
        "127.0.0.2:9000".parse().unwrap(),
    ];
    let peers: Vec<Peer> = ids
        .iter()
        .zip(&addrs)
        .map(|(k, a)| Peer {
            id: k.public().relay_id(),
            identity: k.public(),
            addr: a.ip(),
            ports: (9000, 9000),
        })
        .collect();
    let policy = ExitPolicy::parse(&["accept 127.0.0.0/8:*"]).unwrap();
    let mut relays: Vec<Relay<A>> = (0..2)
        .map(|i| {
            Relay::new(
                layout,
                ids[i].clone(),
                vec![onions[i].clone()],
                peers.clone(),
                policy.clone(),
                RelayLimits::default(),
                NOW_MS,
            )
        })
        .collect();
    let hops: Vec<PathHop> = (0..2)
        .map(|i| PathHop {
            id: peers[i].id,
            onion: onions[i].public(),
            addr: addrs[i],
        })
        .collect();
    let client: SocketAddr = "127.0.0.100:4000".parse().unwrap();
    let mut link = ClientLink::new(&hops[0].id, addrs[0], &mut OsRng);
    let mut cell = vec![0u8; layout.cell];
    let mut circuit = ClientCircuit::<A>::build(
        &layout,
        &link,
        &hops,
        "127.0.0.9:7".parse().unwrap(),
        NOW_MS,
        &mut OsRng,
        &mut cell,
    )
    .unwrap();
    let Action::Send { to, .. } = relays[0].handle(client, &mut cell, NOW_MS) else {
        panic!("setup at hop 0")
    };
    assert_eq!(to, addrs[1]);
    let Action::Send { to, .. } = relays[1].handle(addrs[0], &mut cell, NOW_MS) else {
        panic!("setup at hop 1")
    };
    assert_eq!(to, addrs[0]);
    let Action::Send { to, .. } = relays[0].handle(addrs[1], &mut cell, NOW_MS) else {
        panic!("created at hop 0")
    };
    assert_eq!(to, client);
    let hdr = link.read_header(&cell).unwrap();
    assert_eq!(circuit.open(&hdr, &mut cell).unwrap(), Received::Created);
    let r0 = relays.swap_remove(0);
    TwoHops {
        layout,
        r0,
        link,
        circuit,
        client,
    }
}

fn relay_handle<A: Aead>(c: &mut Criterion) {
    let mut t = two_hops::<A>();
    let mut g = c.benchmark_group("relay_handle");
    g.throughput(Throughput::Bytes(t.layout.cell as u64));
    let layout = t.layout;
    g.bench_function(A::NAME, |b| {
        b.iter_batched_ref(
            || {
                let mut cell = vec![0u8; layout.cell];
                t.circuit
                    .seal_data(&t.link, &[1u8; 800], &mut cell, &mut OsRng)
                    .unwrap();
                cell
            },
            |cell| {
                let a = t.r0.handle(t.client, cell, NOW_MS);
                assert!(matches!(a, Action::Send { .. }));
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn setup(c: &mut Criterion) {
    let layout = Layout::default();
    let onion = OnionSecret::generate(&mut OsRng);
    let next = IdentityKey::generate(&mut OsRng).public().relay_id();
    let hops = vec![
        SetupHop {
            onion_pub: *onion.public().as_bytes(),
            next: Next::Relay {
                id: next,
                port: 9000,
                out_id: 2,
            },
            in_id: 1,
            link_seed: [1; 16],
            mix_mean_ms: 0,
        },
        SetupHop {
            onion_pub: *OnionSecret::generate(&mut OsRng).public().as_bytes(),
            next: Next::Exit {
                dest: "127.0.0.9:7".parse().unwrap(),
            },
            in_id: 2,
            link_seed: [0; 16],
            mix_mean_ms: 0,
        },
        SetupHop {
            onion_pub: *OnionSecret::generate(&mut OsRng).public().as_bytes(),
            next: Next::Exit {
                dest: "127.0.0.9:7".parse().unwrap(),
            },
            in_id: 3,
            link_seed: [0; 16],
            mix_mean_ms: 0,
        },
    ];
    let mut g = c.benchmark_group("setup");
    g.throughput(Throughput::Bytes(layout.cell as u64));
    // Baselines: the public-key work a setup cannot avoid.
    let peer = *OnionSecret::generate(&mut OsRng).public().as_bytes();
    g.bench_function("baseline_x25519", |b| {
        b.iter(|| onion.diffie_hellman(black_box(&peer)))
    });
    let e = shroud_proto::setup::Ephemeral::generate(&mut OsRng);
    g.bench_function("baseline_elligator2_decode_and_x25519", |b| {
        b.iter(|| shroud_proto::setup::relay_agree(&onion, black_box(&e.representative)))
    });
    // The relay keeps its onion public key beside the secret; deriving it here per
    // iteration would time a base-point multiplication the relay never makes.
    let onion_pub = *onion.public().as_bytes();
    g.bench_function("open_and_forward", |b| {
        b.iter_batched_ref(
            || {
                let mut cell = vec![0u8; layout.cell];
                build_setup::<RingAead, _>(&layout, &hops, NOW_MS / 1000, &mut OsRng, &mut cell)
                    .expect("valid onion keys");
                cell
            },
            |cell| {
                let (s, r) = open_setup::<RingAead>(&layout, &onion, &onion_pub, cell).unwrap();
                forward_setup(&layout, &s, &r, cell);
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("client_build_3_hops", |b| {
        let mut cell = vec![0u8; layout.cell];
        b.iter(|| build_setup::<RingAead, _>(&layout, &hops, NOW_MS / 1000, &mut OsRng, &mut cell))
    });
    g.finish();
}

fn client_seal(c: &mut Criterion) {
    let layout = Layout::default();
    // As a client holds them: with the AEAD keys' AES schedules for the stack keystream.
    let keys: Vec<LayerKeys<RingAead>> = (0..3u8)
        .map(|i| LayerSecret::new(&[i; 32], &[i + 10; 32], 0).expand_for_sealing())
        .collect();
    let mut g = c.benchmark_group("client");
    g.throughput(Throughput::Bytes(layout.cell as u64));
    let mut cell = vec![0u8; layout.cell];
    let mut n = 0u64;
    g.bench_function("seal_3_hops", |b| {
        b.iter(|| {
            n += 1;
            seal_forward(&layout, &keys, Command::Data, n, &mut cell, &[[0; 16]; 8]);
        })
    });
    g.finish();
}

/// Mix mode's per-cell queue cost: one push with an exponential delay (mean 20 ms)
/// and the pop that releases a cell, about 2,000 cells held at steady state, the clock moving
/// 1 ms every 100 cells (1 M cells a second of simulated load).
fn mix_queue(c: &mut Criterion) {
    use shroud_proto::mix::{exponential_delay_ms, DelayQueue};
    let mut g = c.benchmark_group("mix_queue");
    let mut q: DelayQueue<(u32, u32)> = DelayQueue::new(65_536, 1024, 1, 0);
    let mut now = 0u64;
    let mut r = 0x0123_4567_89ab_cdefu64;
    let mut k = 0u64;
    g.throughput(Throughput::Elements(1));
    g.bench_function("push_and_release", |b| {
        b.iter(|| {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            let d = exponential_delay_ms(20.0, r) as u64;
            let _ = q.push(now + d, (k as u32, 0));
            k += 1;
            if k.is_multiple_of(100) {
                now += 1;
                q.pop_due(now, |v| {
                    black_box(v);
                });
            }
        })
    });
    g.finish();
}

fn key_cache_miss<A: Aead>(c: &mut Criterion) {
    let secret = LayerSecret::new(&[7; 32], &[9; 32], 12345);
    let mut g = c.benchmark_group("key_cache_miss");
    g.bench_function(A::NAME, |b| b.iter(|| black_box(&secret).expand::<A>()));
    g.finish();
}

fn all(c: &mut Criterion) {
    raw::<RingAead>(c);
    raw::<RustCryptoAead>(c);
    strip::<RingAead>(c);
    strip::<RustCryptoAead>(c);
    relay_handle::<RingAead>(c);
    relay_handle::<RustCryptoAead>(c);
    key_cache_miss::<RingAead>(c);
    key_cache_miss::<RustCryptoAead>(c);
    setup(c);
    client_seal(c);
    mix_queue(c);
}

criterion_group!(benches, all);
criterion_main!(benches);
