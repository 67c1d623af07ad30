//! The cells of one received datagram, handled as a batch ([`Relay::handle_batch`]).
//!
//! A datagram's cells share their source, so their link. The batch makes three passes:
//!
//! 1. the header masks of all cells, in one pipelined AES call under the link's
//!    receive key ([`HeaderMasks`]);
//! 2. each cell in order: link, header, circuit. A forward DATA cell whose counter is
//!    new to its circuit's window becomes a *stripping job* (its keys brought into the
//!    key cache); any other cell first finishes the jobs gathered so far (step 3), then
//!    is handled on its own, so effects keep the cells' order;
//! 3. the jobs' layers are stripped together (at most [`STRIP_BATCH`] at a time:
//!    [`strip_forward_batch`]), then each job is finished in order: its counter enters
//!    the replay window (checked again, since a copy of the cell may be earlier in the
//!    same batch), and the cell goes on. The headers of the cells sent on are then
//!    protected per run of cells on one link, one pipelined AES call a run.
//!
//! Two jobs never need the same key-cache entry for different circuits: the second
//! finishes the first ones before loading its keys. The result of every cell is the
//! one [`Relay::handle`] gives it alone, in order; the test
//! `a_batch_acts_as_its_cells_one_by_one` checks that for mixed datagrams.

use std::net::SocketAddr;

use crate::aead::{Aead, BadTag};
use crate::cell::{Command, Header};
use crate::layer::strip_forward_batch;

use super::circuits::{CircuitRef, Direction};
use super::{Action, Relay};

/// Most cells one [`Relay::handle_batch`] takes: UDP GRO's limit of 64 segments per
/// datagram (a larger datagram is handled in parts of this many cells).
pub const CELL_BATCH: usize = 64;

/// Most jobs whose layers are stripped together: their cells (16 KiB at the default
/// cell size) are still in the core's L1 cache when they are finished.
const STRIP_BATCH: usize = 16;

/// The header masks of one received datagram's cells, computed together, with the
/// link and link-table epoch they belong to.
pub(super) struct HeaderMasks {
    pub(super) link: u32,
    pub(super) epoch: u64,
    pub(super) n: usize,
    pub(super) blocks: [aes::Block; CELL_BATCH],
}

impl HeaderMasks {
    /// Cell `i`'s mask, if it was computed under `link`'s key as of `epoch`.
    pub(super) fn get(&self, link: u32, epoch: u64, i: usize) -> Option<&[u8]> {
        (i < self.n && self.link == link && self.epoch == epoch).then(|| self.blocks[i].as_slice())
    }
}

/// What the first half of handling a cell found ([`Relay::receive`]).
pub(super) enum Received {
    /// Handled already (dropped, or link padding).
    Done(Action),
    /// A setup cell, on this link if any.
    Setup(Option<u32>),
    /// A cell of the circuit in this slot, travelling forward.
    Forward(u32, Header),
    /// A cell of the circuit in this slot, travelling backward.
    Backward(u32, Header),
}

/// A forward cell that passed its checks and awaits the stripping of its layer.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stripping {
    /// Its circuit (the handle: the slot may not be reused under it unnoticed).
    pub(super) circuit: CircuitRef,
    /// Its header as received.
    pub(super) hdr: Header,
    /// This hop's counter for it.
    pub(super) counter: u64,
}

/// A header a batch protects after its jobs finished: cell `cell`, sent on `link`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Protect {
    pub(super) cell: usize,
    pub(super) link: u32,
    pub(super) hdr: Header,
}

/// A stripping job of a batch: which cell, and where its keys are.
#[derive(Debug, Clone, Copy)]
struct Job {
    cell: usize,
    entry: u32,
    s: Stripping,
}

/// The working space of [`Relay::handle_batch`], allocated once (a worker keeps one):
/// header masks, stripping jobs and their results, and the actions it hands back.
pub struct CellBatch {
    masks: HeaderMasks,
    jobs: Vec<Job>,
    /// Bit `e mod 64` set for the key-cache entry `e` of every job.
    entries: u64,
    results: [Result<(), BadTag>; STRIP_BATCH],
    /// The headers the finished jobs send on, protected together per link.
    protects: Vec<Protect>,
    send_masks: [aes::Block; STRIP_BATCH],
    actions: Vec<Action>,
}

impl Default for CellBatch {
    fn default() -> Self {
        CellBatch {
            masks: HeaderMasks {
                link: 0,
                epoch: 0,
                n: 0,
                blocks: [aes::Block::default(); CELL_BATCH],
            },
            jobs: Vec::with_capacity(CELL_BATCH),
            entries: 0,
            results: [Ok(()); STRIP_BATCH],
            protects: Vec::with_capacity(STRIP_BATCH),
            send_masks: [aes::Block::default(); STRIP_BATCH],
            actions: Vec::with_capacity(CELL_BATCH),
        }
    }
}

impl core::fmt::Debug for CellBatch {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CellBatch")
            .field("actions", &self.actions)
            .finish_non_exhaustive()
    }
}

impl CellBatch {
    /// Cells of the last batch (one action each).
    pub fn len(&self) -> usize {
        self.actions.len()
    }

    /// True if the last batch held no cell.
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    /// The action for cell `i` of the last batch, taken out (a second take gives
    /// `Consumed` without an event).
    pub fn take(&mut self, i: usize) -> Action {
        core::mem::replace(&mut self.actions[i], Action::Consumed { event: None })
    }
}

impl<A: Aead> Relay<A> {
    /// Handles the cells of one received datagram from `src` (`cells`: a whole number
    /// of cells, at most [`CELL_BATCH`]), rewriting each in place; the action for cell
    /// `i` is then `batch.take(i)`. The same as [`Relay::handle`] on each cell in
    /// order, but the header masks are computed in one call and the layers of
    /// consecutive forward DATA cells are stripped together (see the module docs).
    ///
    /// # Panics
    /// If `cells` is not a whole number of cells or holds more than [`CELL_BATCH`].
    pub fn handle_batch(
        &mut self,
        src: SocketAddr,
        cells: &mut [u8],
        now_ms: u64,
        batch: &mut CellBatch,
    ) {
        let size = self.layout.cell;
        assert!(
            cells.len().is_multiple_of(size) && cells.len() / size <= CELL_BATCH,
            "a batch is a whole number of cells, at most {CELL_BATCH}"
        );
        batch.actions.clear();
        batch.jobs.clear();
        batch.entries = 0;
        self.header_masks(src, cells, &mut batch.masks);
        for i in 0..cells.len() / size {
            let cell = &mut cells[i * size..(i + 1) * size];
            let received = self.receive(src, cell, now_ms, Some((&batch.masks, i)));
            let action = match received {
                Received::Forward(slot, hdr) if hdr.command == Command::Data => {
                    match self.forward_check(slot, hdr) {
                        Ok(s) => {
                            self.add_job(cells, i, s, now_ms, batch);
                            // A placeholder, replaced when the job finishes.
                            Action::Consumed { event: None }
                        }
                        Err(a) => a,
                    }
                }
                Received::Done(a) => a,
                other => {
                    self.finish_jobs(cells, now_ms, batch);
                    let cell = &mut cells[i * size..(i + 1) * size];
                    self.finish(other, src, cell, now_ms)
                }
            };
            batch.actions.push(action);
        }
        self.finish_jobs(cells, now_ms, batch);
    }

    /// Adds the stripping job of cell `i`, after finishing the jobs so far if one of
    /// them has its keys in the key-cache entry this one needs.
    fn add_job(
        &mut self,
        cells: &mut [u8],
        i: usize,
        s: Stripping,
        now_ms: u64,
        batch: &mut CellBatch,
    ) {
        let slot = s.circuit.slot;
        let entry = self.circuits.key_entry(slot, Direction::Forward);
        // The jobs so far that share an entry are of one circuit (a second circuit
        // would have finished them), so a cell of the last job's circuit never
        // conflicts; `entries` has bit `e mod 64` set for every entry `e` in use, so
        // most other cells are cleared without a search.
        let bit = 1u64 << (entry % 64);
        let same_as_last = batch.jobs.last().is_some_and(|j| j.s.circuit == s.circuit);
        if batch.jobs.len() == STRIP_BATCH
            || !same_as_last
                && batch.entries & bit != 0
                && batch
                    .jobs
                    .iter()
                    .any(|j| j.entry == entry && j.s.circuit != s.circuit)
        {
            self.finish_jobs(cells, now_ms, batch);
        }
        batch.entries |= bit;
        let misses = &mut self.stats.key_cache_misses;
        // The slot holds the circuit: forward_check just found it.
        let loaded = self.circuits.load_keys(slot, Direction::Forward, misses);
        debug_assert_eq!(loaded, Some(entry));
        batch.jobs.push(Job { cell: i, entry, s });
    }

    /// Strips the layers of the batch's jobs together, then finishes each job in
    /// order, its action replacing the placeholder.
    fn finish_jobs(&mut self, cells: &mut [u8], now_ms: u64, batch: &mut CellBatch) {
        if batch.jobs.is_empty() {
            return;
        }
        let size = self.layout.cell;
        // add_job keeps at most STRIP_BATCH jobs, one result each.
        debug_assert!(batch.jobs.len() <= batch.results.len());
        let jobs = batch.jobs.iter().map(|j| {
            (
                self.circuits.keys_at(j.entry),
                Command::Data,
                j.s.counter,
                j.cell,
            )
        });
        strip_forward_batch(&self.layout, cells, jobs, &mut batch.results);
        for (j, stripped) in batch.jobs.iter().zip(batch.results) {
            let cell = &mut cells[j.cell * size..(j.cell + 1) * size];
            let later = Some((&mut batch.protects, j.cell));
            batch.actions[j.cell] = self.forward_finish(&j.s, stripped, cell, now_ms, later);
        }
        // The headers of the cells sent on: one AES call per run of cells on the same
        // link (finishing a job removes no link and changes no key, so each link is
        // the one its cells were planned for).
        let mut k = 0;
        while k < batch.protects.len() {
            let link = batch.protects[k].link;
            let run = batch.protects[k..]
                .iter()
                .take_while(|p| p.link == link)
                .count();
            let run = &batch.protects[k..k + run];
            k += run.len();
            let Some(l) = self.links.get(link) else {
                debug_assert!(false, "a link went away while a batch finished");
                continue;
            };
            let which = run.iter().map(|p| p.cell);
            l.tx.masks_of(cells, size, which, &mut batch.send_masks);
            for (p, m) in run.iter().zip(&batch.send_masks) {
                let cell = &mut cells[p.cell * size..(p.cell + 1) * size];
                l.tx.protect_with(cell, &p.hdr, m);
            }
        }
        batch.protects.clear();
        batch.jobs.clear();
        batch.entries = 0;
    }
}
