//! "No allocation on the data path", checked rather than claimed: a counting global
//! allocator around every relay call a forwarded cell makes, forward through three
//! hops (strip, deliver at the exit) and back (the exit's reply, add a layer at each
//! hop), plus the drops a flood causes (bad tags, replays, unknown circuits, garbage).
//! Setups are excluded: they are budgeted, not per cell.

mod common;

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::cell::Cell;

use common::*;
use shroud_proto::client::ClientLink;
use shroud_proto::relay::{Action, CellBatch, DropReason, CELL_BATCH};
use shroud_proto::{Layout, RingAead};

/// Counts allocations made by the current thread while `COUNTING` is set.
struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
    /// Bytes allocated less bytes freed while counting.
    static BYTES: Cell<i64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counters
// are thread-local `Cell`s (no allocation, no locking).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        note(layout.size() as i64);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: AllocLayout) -> *mut u8 {
        note(layout.size() as i64);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new: usize) -> *mut u8 {
        note(new as i64 - layout.size() as i64);
        // SAFETY: as above; `ptr` came from this allocator, i.e. from System.
        unsafe { System.realloc(ptr, layout, new) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        freed(layout.size() as i64);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn note(bytes: i64) {
    // `try_with`: the thread-locals may be gone while a thread shuts down.
    let _ = COUNTING.try_with(|c| {
        if c.get() {
            let _ = ALLOCS.try_with(|a| a.set(a.get() + 1));
            let _ = BYTES.try_with(|b| b.set(b.get() + bytes));
        }
    });
}

fn freed(bytes: i64) {
    let _ = COUNTING.try_with(|c| {
        if c.get() {
            let _ = BYTES.try_with(|b| b.set(b.get() - bytes));
        }
    });
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` and returns its result with the allocations it made on this thread.
fn counted<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let (out, allocs, _) = counted_bytes(f);
    (out, allocs)
}

/// Runs `f` and returns its result, the allocations it made on this thread and the
/// bytes it left allocated (what it returns holds them).
fn counted_bytes<T>(f: impl FnOnce() -> T) -> (T, u64, i64) {
    ALLOCS.with(|a| a.set(0));
    BYTES.with(|b| b.set(0));
    COUNTING.with(|c| c.set(true));
    let out = f();
    COUNTING.with(|c| c.set(false));
    (out, ALLOCS.with(Cell::get), BYTES.with(Cell::get))
}

#[test]
fn the_counter_sees_an_allocation() {
    let (v, n) = counted(|| vec![1u8; 100]);
    assert_eq!(v.len(), 100);
    assert!(n >= 1, "the counting allocator does not count");
}

#[test]
fn forwarding_delivering_replying_and_dropping_cells_allocates_nothing() {
    let layout = Layout::default();
    let mut r = rng(9);
    let mut net = Net::<RingAead>::new(layout, 3, &mut r);
    let mut link = ClientLink::new(&net.hops[0].id, net.addrs[0], &mut r);
    let mut c = net.open_circuit(&[0, 1, 2], &mut link, &mut r);
    // A first data cell through the whole network warms every table up.
    let mut cell = vec![0u8; layout.cell];
    c.seal_data(&link, b"warm-up", &mut cell, &mut r).unwrap();
    net.send(CLIENT, net.addrs[0], cell);
    assert_eq!(net.delivered.len(), 1);

    // Cells sealed ahead (the client may allocate; the relays may not).
    let n = 256;
    let mut cells: Vec<Vec<u8>> = (0..n)
        .map(|k| {
            let mut cell = vec![0u8; layout.cell];
            c.seal_data(&link, &[k as u8; 700], &mut cell, &mut r)
                .unwrap();
            cell
        })
        .collect();
    let mut replayed: Vec<Vec<u8>> = cells[..16].to_vec();
    let mut replies: Vec<Vec<u8>> = vec![vec![0u8; layout.cell]; n];
    let mut exits = Vec::with_capacity(n);
    let mut garbage = vec![0x5au8; layout.cell];
    let mut short = vec![0u8; 100];
    let echo = [7u8; 700];
    let a = net.addrs.clone();
    let from = [CLIENT, a[0], a[1]];
    let relays = &mut net.relays;

    let ((), allocs) = counted(|| {
        // Forward: each hop in turn over the whole batch; the exit delivers.
        for hop in 0..3 {
            for cell in cells.iter_mut() {
                match relays[hop].handle(from[hop], cell, NOW_MS) {
                    Action::Send { to, .. } => assert_eq!(to, a[hop + 1]),
                    Action::Deliver {
                        circuit, payload, ..
                    } => {
                        assert_eq!((hop, payload.len()), (2, 700));
                        exits.push(circuit);
                    }
                    other => panic!("hop {hop}: {other:?}"),
                }
            }
        }
        // Backward: the exit wraps a reply per delivered cell, the middle and first
        // hops add their layers.
        for (reply, &circuit) in replies.iter_mut().zip(&exits) {
            let back = relays[2].exit_reply(circuit, &echo, reply, NOW_MS).unwrap();
            assert_eq!(back, a[1]);
        }
        for (hop, src, next) in [(1, a[2], a[0]), (0, a[1], CLIENT)] {
            for reply in replies.iter_mut() {
                match relays[hop].handle(src, reply, NOW_MS) {
                    Action::Send { to, .. } => assert_eq!(to, next),
                    other => panic!("backward at hop {hop}: {other:?}"),
                }
            }
        }
        // The drops a flood causes: replays, garbage on a peer link, short datagrams.
        for cell in replayed.iter_mut() {
            let got = relays[0].handle(CLIENT, cell, NOW_MS);
            assert_eq!(got, Action::Drop(DropReason::Replay));
        }
        for _ in 0..64 {
            let got = relays[1].handle(a[0], &mut garbage, NOW_MS);
            assert!(matches!(got, Action::Drop(_)), "{got:?}");
            let got = relays[0].handle(CLIENT, &mut short, NOW_MS);
            assert!(matches!(got, Action::Drop(_)), "{got:?}");
        }
    });
    assert_eq!(exits.len(), n);
    assert_eq!(allocs, 0, "{allocs} allocations on the data path");
    // And the client can read every reply: the cells really went through.
    for reply in &mut replies {
        let hdr = link.read_header(reply).unwrap();
        match c.open(&hdr, reply).unwrap() {
            shroud_proto::client::Received::Data(p) => assert_eq!(reply[p], echo),
            other => panic!("reply read as {other:?}"),
        }
    }
}

/// The engine's way: each hop takes datagrams of up to 64 cells as one batch
/// (`Relay::handle_batch`), with a replayed cell and garbage inside the batches.
#[test]
fn handling_datagrams_as_batches_allocates_nothing() {
    let layout = Layout::default();
    let cell = layout.cell;
    let mut r = rng(10);
    let mut net = Net::<RingAead>::new(layout, 3, &mut r);
    let mut link = ClientLink::new(&net.hops[0].id, net.addrs[0], &mut r);
    let mut c = net.open_circuit(&[0, 1, 2], &mut link, &mut r);
    let mut warm = vec![0u8; cell];
    c.seal_data(&link, b"warm-up", &mut warm, &mut r).unwrap();
    net.send(CLIENT, net.addrs[0], warm);
    assert_eq!(net.delivered.len(), 1);

    // Four datagrams of 63 data cells, each ending with a copy of its first cell.
    let per = CELL_BATCH - 1;
    let mut datagrams: Vec<Vec<u8>> = (0..4)
        .map(|d| {
            let mut v = Vec::with_capacity(CELL_BATCH * cell);
            for k in 0..per {
                let mut x = vec![0u8; cell];
                c.seal_data(&link, &[(d * per + k) as u8; 500], &mut x, &mut r)
                    .unwrap();
                v.extend_from_slice(&x);
            }
            let first = v[..cell].to_vec();
            v.extend_from_slice(&first);
            v
        })
        .collect();
    let mut garbage = vec![0x5au8; 8 * cell];
    let a = net.addrs.clone();
    let from = [CLIENT, a[0], a[1]];
    let relays = &mut net.relays;
    let mut batch = CellBatch::default();
    let mut delivered = 0;

    let ((), allocs) = counted(|| {
        for hop in 0..3 {
            for d in datagrams.iter_mut() {
                relays[hop].handle_batch(from[hop], d, NOW_MS, &mut batch);
                assert_eq!(batch.len(), if hop == 0 { CELL_BATCH } else { per });
                for i in 0..per {
                    match batch.take(i) {
                        Action::Send { to, .. } => assert_eq!(to, a[hop + 1]),
                        Action::Deliver { payload, .. } => {
                            assert_eq!((hop, payload.len()), (2, 500));
                            delivered += 1;
                        }
                        other => panic!("hop {hop}, cell {i}: {other:?}"),
                    }
                }
                if hop == 0 {
                    // The copy of the first cell, later in the same batch.
                    assert_eq!(batch.take(per), Action::Drop(DropReason::Replay));
                    d.truncate(per * cell);
                }
            }
        }
        relays[1].handle_batch(a[0], &mut garbage, NOW_MS, &mut batch);
        assert!((0..8).all(|i| matches!(batch.take(i), Action::Drop(_))));
    });
    assert_eq!(delivered, 4 * per);
    assert_eq!(allocs, 0, "{allocs} allocations on the data path");
}

#[test]
fn the_idle_expiry_tick_allocates_nothing_even_when_it_expires_circuits_and_links() {
    let layout = Layout::default();
    let mut r = rng(10);
    let mut net = Net::<RingAead>::new(layout, 3, &mut r);
    let mut link = ClientLink::new(&net.hops[0].id, net.addrs[0], &mut r);
    // Eight circuits through the same three relays, each carrying a cell so that
    // every table has entries.
    for _ in 0..8 {
        let mut c = net.open_circuit(&[0, 1, 2], &mut link, &mut r);
        let mut cell = vec![0u8; layout.cell];
        c.seal_data(&link, b"x", &mut cell, &mut r).unwrap();
        net.send(CLIENT, net.addrs[0], cell);
        net.to_client.clear();
    }
    assert_eq!(net.delivered.len(), 8);
    let live = |net: &Net<RingAead>| -> Vec<u64> {
        net.relays
            .iter()
            .map(|r| r.circuit_count() as u64)
            .collect()
    };
    assert_eq!(live(&net), vec![8, 8, 8]);
    let idle = shroud_proto::relay::RelayLimits::default().circuit_idle_ms;
    let link_idle = shroud_proto::relay::RelayLimits::default().link_idle_ms;
    let mut notice = vec![0u8; layout.cell];
    let mut closed = 0u32;
    let mut told = 0u32;

    let ((), allocs) = counted(|| {
        for relay in net.relays.iter_mut() {
            // A tick with nothing idle yet.
            relay.expire(
                NOW_MS + 1,
                |_| closed += 1,
                |w| {
                    told += u32::from(w(&mut notice).is_some());
                },
            );
            // A tick after the idle time: every circuit expires (the first hop tells
            // the client); a tick after the link idle time: the links close too.
            relay.expire(
                NOW_MS + idle + 1,
                |_| closed += 1,
                |w| {
                    told += u32::from(w(&mut notice).is_some());
                },
            );
            relay.expire(
                NOW_MS + idle + link_idle + 2,
                |_| closed += 1,
                |w| {
                    told += u32::from(w(&mut notice).is_some());
                },
            );
        }
    });
    assert_eq!(allocs, 0, "{allocs} allocations in the expiry tick");
    assert_eq!((closed, told), (24, 8), "circuits closed, clients told");
    assert_eq!(live(&net), vec![0, 0, 0]);
    for relay in &net.relays {
        assert_eq!(relay.stats().expired_circuits, 8);
        assert_eq!(
            relay.link_counts(),
            (0, 0),
            "links left after their idle time"
        );
    }
}

#[test]
fn the_mix_delay_queue_allocates_nothing_after_it_is_built() {
    use shroud_proto::mix::{exponential_delay_ms, DelayQueue};
    let mut q: DelayQueue<[u8; 32]> = DelayQueue::new(1024, 128, 1, 0);
    let mut released = 0u64;
    let (_, allocs) = counted(|| {
        let mut now = 0u64;
        let mut r = 0x1234_5678_9abc_def0u64;
        for _ in 0..20_000 {
            r = r.rotate_left(17).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let d = exponential_delay_ms(30.0, r) as u64;
            // Full: the value comes back (the caller drops and counts it).
            let _ = q.push(now + d, [7; 32]);
            now += 1;
            q.pop_due(now, |_| released += 1);
            let _ = q.next_deadline();
        }
        q.pop_due(now + 10_000, |_| released += 1);
    });
    assert_eq!(allocs, 0, "{allocs} allocations in the delay queue");
    assert_eq!(released + q.overflows(), 20_000);
}

/// What one circuit slot costs, all included: the bytes a relay worker allocates for
/// its tables at two sizes (`max_circuits`), less the part that does not grow with it
/// (the key cache, the link tables, the setup filter): the difference per slot covers
/// the circuit with its raw keys and replay windows, its two index entries, its
/// activity time, generation, free-list entry and expiry scratch.
#[test]
fn a_circuit_slot_costs_at_most_1_kib_all_included() {
    use shroud_proto::keys::{IdentityKey, OnionSecret};
    use shroud_proto::policy::ExitPolicy;
    use shroud_proto::relay::{Relay, RelayLimits};
    let mut r = rng(11);
    let identity = IdentityKey::generate(&mut r);
    let onion = OnionSecret::generate(&mut r);
    let bytes = |max_circuits: usize| {
        let (relay, _, bytes) = counted_bytes(|| {
            Relay::<RingAead>::new(
                Layout::default(),
                identity.clone(),
                vec![onion.clone()],
                Vec::new(),
                ExitPolicy::default(),
                RelayLimits {
                    max_circuits,
                    ..RelayLimits::default()
                },
                NOW_MS,
            )
        });
        drop(relay);
        bytes
    };
    let (small, large) = (4096usize, 65536usize);
    let (a, b) = (bytes(small), bytes(large));
    let per_slot = (b - a) as f64 / (large - small) as f64;
    let default = RelayLimits::default().max_circuits;
    let whole = bytes(default) as f64 / default as f64;
    eprintln!(
        "per circuit slot: {per_slot:.0} B; a worker with the default {default} slots: \
         {:.1} MB, {whole:.0} B a slot with the fixed part",
        bytes(default) as f64 / 1e6
    );
    assert!(per_slot <= 1024.0, "a circuit slot costs {per_slot:.0} B");
}
