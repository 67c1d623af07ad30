//! Onion layers: one AES-256-GCM layer per hop, stripped (forward) or added (backward)
//! in place, with the cell size unchanged.
//!
//! A data cell carries a stack of `H_MAX` 16-byte slots after its header. Slot 0 holds
//! the tag of the hop that processes the cell next; the other slots hold the tags of
//! later hops, encrypted, and pseudo-random filler.
//!
//! Counters are per hop: each hop adds its secret shift (from its key schedule) to the
//! counter in the header it received and uses the sum, in both directions, as the
//! counter of its layer and of the header it sends. The client knows every shift.
//!
//! **Forward** (client to exit), at each hop, with the hop's forward keys `(kf, sf)`
//! and its counter `c`:
//! 1. open the body with AES-256-GCM under `kf`, nonce `(command, c)`, associated
//!    data = slots `1..H`, tag = slot 0 — so a change to any byte of the body or of the
//!    stack is caught by this hop;
//! 2. XOR slots `1..H` with `M[j] = AES-256(sf, counter || j)` and shift them down one
//!    slot;
//! 3. write the filler `M[H-1]` into the last slot.
//!
//! **Backward** (exit to client), at each hop, with `(kb, sb)`: shift slots `0..H-1` up
//! one slot (the last is dropped), XOR them with `N[j] = AES-256(sb, counter || j)`,
//! seal the body under `kb` and put the tag in slot 0. Relays cannot verify backward
//! cells (the layers are for the client); the client verifies every layer.
//!
//! Every byte of a cell changes at every hop, and the stack always has `H_MAX` slots of
//! random-looking bytes, so a hop learns neither its position nor the circuit length.
//! The client-side halves ([`seal_forward`], [`open_backward`]) build and peel the whole
//! onion; `docs/PROTOCOL.md` derives why the fillers make every hop's tag verifiable.

use aes::cipher::{BlockCipherEncrypt, KeyInit};
use aes::Aes256Enc as Aes256;

use crate::aead::{Aead, BadTag, NONCE_LEN, TAG_LEN};
use crate::cell::{counter_add, counter_sub, Command, Layout, H_MAX_LIMIT, SLOT_LEN};

/// The keys of one hop in one direction: the AEAD key, the stack key and the counter
/// shift.
pub struct LayerKeys<A: Aead> {
    aead: A,
    stack: Aes256,
    shift: u64,
}

impl<A: Aead> core::fmt::Debug for LayerKeys<A> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "LayerKeys<{}>(<keys>)", A::NAME)
    }
}

impl<A: Aead> LayerKeys<A> {
    /// Builds the key schedules from two 256-bit keys, with a counter shift of 0.
    pub fn new(aead: &[u8; 32], stack: &[u8; 32]) -> Self {
        LayerKeys {
            aead: A::new(aead),
            stack: Aes256::new(stack.into()),
            shift: 0,
        }
    }

    /// The same keys with counter shift `shift` (48 bits).
    pub fn with_shift(mut self, shift: u64) -> Self {
        self.shift = shift & crate::cell::COUNTER_MAX;
        self
    }

    /// This hop's counter for a cell that arrived with header counter `counter`.
    pub fn shifted(&self, counter: u64) -> u64 {
        counter_add(counter, self.shift)
    }

    /// The AEAD key schedule.
    pub fn aead(&self) -> &A {
        &self.aead
    }

    /// `AES-256(stack, counter || j)` for `j` in `0..h_max`.
    fn masks(&self, counter: u64, h_max: usize) -> [[u8; 16]; H_MAX_LIMIT] {
        let mut blocks = [aes::Block::default(); H_MAX_LIMIT];
        for (j, b) in blocks.iter_mut().enumerate().take(h_max) {
            b[..8].copy_from_slice(&counter.to_be_bytes());
            b[8..].copy_from_slice(&(j as u64).to_be_bytes());
        }
        self.stack.encrypt_blocks(&mut blocks[..h_max]);
        let mut out = [[0u8; 16]; H_MAX_LIMIT];
        for (o, b) in out.iter_mut().zip(blocks.iter()) {
            o.copy_from_slice(b);
        }
        out
    }
}

/// The raw keys of one hop in one direction (two 256-bit keys and the counter shift):
/// 72 bytes, against about 800 for their expanded schedules ([`LayerKeys`]). A relay
/// keeps these per circuit and expands them on demand into a fixed-size cache, so that
/// a circuit slot costs well under 1 KiB. Wiped on drop.
#[derive(Clone, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct LayerSecret {
    aead: [u8; 32],
    stack: [u8; 32],
    shift: u64,
}

impl core::fmt::Debug for LayerSecret {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("LayerSecret(<redacted>)")
    }
}

impl LayerSecret {
    /// The keys of a layer: AEAD key, stack key, counter shift (48 bits).
    pub fn new(aead: &[u8; 32], stack: &[u8; 32], shift: u64) -> Self {
        LayerSecret {
            aead: *aead,
            stack: *stack,
            shift: shift & crate::cell::COUNTER_MAX,
        }
    }

    /// This hop's counter for a cell that arrived with header counter `counter` (the
    /// same as [`LayerKeys::shifted`] of the expanded keys).
    pub fn shifted(&self, counter: u64) -> u64 {
        counter_add(counter, self.shift)
    }

    /// The key schedules.
    pub fn expand<A: Aead>(&self) -> LayerKeys<A> {
        LayerKeys::new(&self.aead, &self.stack).with_shift(self.shift)
    }
}

/// The GCM nonce of a cell: `0 0 0 command || counter` (big endian). Binding the
/// command into the nonce authenticates it without associated-data copies.
pub fn cell_nonce(command: Command, counter: u64) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[3] = command as u8;
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

fn xor16(dst: &mut [u8], m: &[u8; 16]) {
    for (d, m) in dst.iter_mut().zip(m) {
        *d ^= m;
    }
}

fn tag_at(cell: &[u8], at: usize) -> [u8; TAG_LEN] {
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(&cell[at..at + TAG_LEN]);
    t
}

/// Relay, forward direction: verify and strip this hop's layer from a data-shaped cell
/// in place. `counter` is this hop's counter ([`LayerKeys::shifted`] of the header's).
/// `cell` must be exactly `layout.cell` bytes. On `Err` the cell is garbage.
pub fn strip_forward<A: Aead>(
    layout: &Layout,
    keys: &LayerKeys<A>,
    command: Command,
    counter: u64,
    cell: &mut [u8],
) -> Result<(), BadTag> {
    let h = layout.h_max;
    let s0 = layout.stack_start();
    let se = layout.stack_end();
    let tag = tag_at(cell, s0);
    let (front, body) = cell.split_at_mut(se);
    keys.aead.open(
        &cell_nonce(command, counter),
        &front[s0 + SLOT_LEN..],
        body,
        &tag,
    )?;
    let m = keys.masks(counter, h);
    for j in 1..h {
        xor16(
            &mut cell[s0 + j * SLOT_LEN..s0 + (j + 1) * SLOT_LEN],
            &m[j - 1],
        );
    }
    cell.copy_within(s0 + SLOT_LEN..se, s0);
    cell[se - SLOT_LEN..se].copy_from_slice(&m[h - 1]);
    Ok(())
}

/// Strips one layer from every cell of a batch. `jobs` pairs each cell with its keys,
/// command and counter; the result for cell `i` lands in `results[i]`.
pub fn strip_forward_batch<A: Aead>(
    layout: &Layout,
    jobs: &mut [(&LayerKeys<A>, Command, u64, &mut [u8])],
    results: &mut [Result<(), BadTag>],
) {
    for ((keys, cmd, ctr, cell), r) in jobs.iter_mut().zip(results.iter_mut()) {
        *r = strip_forward(layout, keys, *cmd, *ctr, cell);
    }
}

/// Relay (and exit), backward direction: add this hop's layer in place. `counter` is
/// this hop's counter: [`LayerKeys::shifted`] of the counter received from the next
/// hop, or, at the hop originating the cell, of its own sequence number.
pub fn add_backward<A: Aead>(
    layout: &Layout,
    keys: &LayerKeys<A>,
    command: Command,
    counter: u64,
    cell: &mut [u8],
) {
    let h = layout.h_max;
    let s0 = layout.stack_start();
    let se = layout.stack_end();
    cell.copy_within(s0..se - SLOT_LEN, s0 + SLOT_LEN);
    let m = keys.masks(counter, h);
    for j in 1..h {
        xor16(
            &mut cell[s0 + j * SLOT_LEN..s0 + (j + 1) * SLOT_LEN],
            &m[j - 1],
        );
    }
    let tag = keys
        .aead
        .seal(&cell_nonce(command, counter), &[], &mut cell[se..]);
    cell[s0..s0 + SLOT_LEN].copy_from_slice(&tag);
}

/// Client, forward direction: wrap the body (already holding its plaintext) in one
/// layer per hop of `hops` (first hop first) and fill the tag stack. `counter` is the
/// header counter the first hop receives; hop `i` uses it plus the shifts of hops
/// `0..=i`. The header is not touched. `junk` supplies the random slots below the last
/// real tag.
pub fn seal_forward<A: Aead>(
    layout: &Layout,
    hops: &[LayerKeys<A>],
    command: Command,
    counter: u64,
    cell: &mut [u8],
    junk: &[[u8; 16]; H_MAX_LIMIT],
) {
    let h = layout.h_max;
    let l = hops.len();
    debug_assert!(l >= 1 && l <= h);
    let mut counters = [0u64; H_MAX_LIMIT];
    let mut c = counter;
    for (ci, k) in counters.iter_mut().zip(hops) {
        c = k.shifted(c);
        *ci = c;
    }
    let mut masks = [[[0u8; 16]; H_MAX_LIMIT]; H_MAX_LIMIT];
    for ((m, k), c) in masks.iter_mut().zip(hops).zip(counters) {
        *m = k.masks(c, h);
    }
    // Simulate what each hop sees below the real tags: start with the client's random
    // junk, then apply each hop's unmask-and-shift and filler.
    let mut slots = *junk;
    for m in masks.iter().take(l - 1) {
        let mut next = [[0u8; 16]; H_MAX_LIMIT];
        for j in 0..h - 1 {
            next[j] = slots[j + 1];
            xor_arr(&mut next[j], &m[j]);
        }
        next[h - 1] = m[h - 1];
        slots = next;
    }
    // `slots` is now the exit's view (slot 0 to be filled). Seal from the exit back.
    let se = layout.stack_end();
    let mut aad = [0u8; SLOT_LEN * H_MAX_LIMIT];
    for i in (0..l).rev() {
        for j in 1..h {
            aad[(j - 1) * SLOT_LEN..j * SLOT_LEN].copy_from_slice(&slots[j]);
        }
        slots[0] = hops[i].aead.seal(
            &cell_nonce(command, counters[i]),
            &aad[..SLOT_LEN * (h - 1)],
            &mut cell[se..],
        );
        if i > 0 {
            let mut prev = [[0u8; 16]; H_MAX_LIMIT];
            for j in 1..h {
                prev[j] = slots[j - 1];
                xor_arr(&mut prev[j], &masks[i - 1][j - 1]);
            }
            slots = prev;
        }
    }
    let s0 = layout.stack_start();
    for (j, s) in slots.iter().enumerate().take(h) {
        cell[s0 + j * SLOT_LEN..s0 + (j + 1) * SLOT_LEN].copy_from_slice(s);
    }
}

fn xor_arr(d: &mut [u8; 16], m: &[u8; 16]) {
    for (d, m) in d.iter_mut().zip(m) {
        *d ^= m;
    }
}

/// Client, backward direction: peel one layer (hop `i` in order, first hop first).
/// After `Ok`, the body holds the next layer's ciphertext (or plaintext after the
/// originating hop) and slot 0 holds the next hop's tag.
pub fn peel_backward<A: Aead>(
    layout: &Layout,
    keys: &LayerKeys<A>,
    command: Command,
    counter: u64,
    cell: &mut [u8],
) -> Result<(), BadTag> {
    let h = layout.h_max;
    let s0 = layout.stack_start();
    let se = layout.stack_end();
    let tag = tag_at(cell, s0);
    keys.aead
        .open(&cell_nonce(command, counter), &[], &mut cell[se..], &tag)?;
    let m = keys.masks(counter, h);
    for j in 1..h {
        xor16(
            &mut cell[s0 + j * SLOT_LEN..s0 + (j + 1) * SLOT_LEN],
            &m[j - 1],
        );
    }
    cell.copy_within(s0 + SLOT_LEN..se, s0);
    Ok(())
}

/// What [`open_backward`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// Layers removed; the originating hop is `layers - 1`.
    pub layers: usize,
    /// The originating hop's own sequence number for this cell (its counter minus its
    /// shift): 0 for setup replies, then 1, 2, … for the cells it originates.
    pub sequence: u64,
}

/// Client: peel the backward layers of `hops` in order until the body starts with the
/// 16-byte zero origin marker (control cells) or, for data-shaped cells, after all
/// hops, then check the originator's zero stack. `counter` is the header counter from
/// the first hop; the layer of hop `i + 1` used that counter minus the shifts of hops
/// `0..=i`.
pub fn open_backward<A: Aead>(
    layout: &Layout,
    hops: &[LayerKeys<A>],
    command: Command,
    counter: u64,
    cell: &mut [u8],
) -> Result<Opened, BadTag> {
    let se = layout.stack_end();
    let mut c = counter;
    for (i, k) in hops.iter().enumerate() {
        peel_backward(layout, k, command, c, cell)?;
        let marked = cell[se..se + ORIGIN_MARKER_LEN].iter().all(|&b| b == 0);
        let last = match command {
            Command::Data => i + 1 == hops.len(),
            _ => marked,
        };
        if last {
            // The originating hop started from an all-zero stack; after peeling its
            // layer and every layer before it, the first `H - n` slots must be zero
            // again. This covers the slots below the real tags, so a flip anywhere
            // in a backward cell is caught here.
            let n = i + 1;
            let s0 = layout.stack_start();
            let clean_end = s0 + SLOT_LEN * (layout.h_max - n);
            if cell[s0..clean_end].iter().any(|&b| b != 0) {
                return Err(BadTag);
            }
            return Ok(Opened {
                layers: n,
                sequence: counter_sub(c, k.shift),
            });
        }
        c = counter_sub(c, k.shift);
    }
    Err(BadTag)
}

/// Length of the zero marker at the start of a backward control cell's plaintext body:
/// it tells the client which hop originated the cell (a ciphertext begins with 16 zero
/// bytes with probability 2^-128).
pub const ORIGIN_MARKER_LEN: usize = 16;

/// Body type of a data-shaped cell carrying application payload.
pub const BODY_DATA: u8 = 1;
/// Body type of a cover cell: the end that receives it discards it.
pub const BODY_COVER: u8 = 2;
/// Body type of a loop cover cell (forward only): the exit discards it and sends a
/// cover cell back on the same circuit, so the cell loops back to the client.
pub const BODY_LOOP: u8 = 3;

/// Offset, inside a cell, of the first payload byte (after the body's 1-byte type and
/// 2-byte length).
pub fn payload_offset(layout: &Layout) -> usize {
    layout.stack_end() + 3
}

/// Writes `payload` as the plaintext of a data body: `type (1) || len (u16 BE) ||
/// payload || zeros`. Returns `false` (and writes nothing) if it does not fit.
pub fn write_payload(layout: &Layout, cell: &mut [u8], payload: &[u8]) -> bool {
    if payload.len() > layout.payload_max() {
        return false;
    }
    let se = layout.stack_end();
    cell[se] = BODY_DATA;
    cell[se + 1..se + 3].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    cell[se + 3..se + 3 + payload.len()].copy_from_slice(payload);
    cell[se + 3 + payload.len()..].fill(0);
    true
}

/// Writes the plaintext of a cover body: `type = BODY_COVER`, length 0, zeros.
pub fn write_cover(layout: &Layout, cell: &mut [u8]) {
    write_body_type(layout, cell, BODY_COVER);
}

/// Writes the plaintext of a loop cover body: `type = BODY_LOOP`, length 0, zeros.
pub fn write_loop_cover(layout: &Layout, cell: &mut [u8]) {
    write_body_type(layout, cell, BODY_LOOP);
}

fn write_body_type(layout: &Layout, cell: &mut [u8], kind: u8) {
    let se = layout.stack_end();
    cell[se..].fill(0);
    cell[se] = kind;
}

/// What a decrypted data-shaped body holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Application payload at this range of the cell.
    Data(core::ops::Range<usize>),
    /// Cover: discard.
    Cover,
    /// Loop cover (at the exit): discard, and send a cover cell back.
    Loop,
}

/// Reads a decrypted data-shaped body, or `None` if its type or length is invalid.
pub fn read_body(layout: &Layout, cell: &[u8]) -> Option<Body> {
    let se = layout.stack_end();
    match cell[se] {
        BODY_DATA => {
            let len = u16::from_be_bytes([cell[se + 1], cell[se + 2]]) as usize;
            (len <= layout.payload_max()).then(|| Body::Data(se + 3..se + 3 + len))
        }
        BODY_COVER => Some(Body::Cover),
        BODY_LOOP => Some(Body::Loop),
        _ => None,
    }
}

/// Writes the plaintext of a backward control body: the origin marker, then `info`.
pub fn write_control(layout: &Layout, cell: &mut [u8], info: &[u8]) {
    let se = layout.stack_end();
    cell[se..].fill(0);
    let n = info.len().min(layout.body_len() - ORIGIN_MARKER_LEN);
    cell[se + ORIGIN_MARKER_LEN..se + ORIGIN_MARKER_LEN + n].copy_from_slice(&info[..n]);
}
