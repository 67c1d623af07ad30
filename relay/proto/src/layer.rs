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
//! 1. open slots `1..H` and the body, contiguous in the cell, as one AES-256-GCM
//!    ciphertext under `kf`, nonce `(command, c)`, tag = slot 0 — so a change to any
//!    byte of the body or of the stack is caught by this hop, and the decryption
//!    unmasks the stack (slot `j` is XORed with keystream block `j - 1`);
//! 2. shift slots `1..H` down one slot;
//! 3. write the filler `M[H-1] = AES-256(sf, counter || H-1)` into the last slot.
//!
//! One AEAD call per cell covers the stack, with no associated data: `ring` hashes
//! associated data one 16-byte block per call, which cost a relay more than the seven
//! mask blocks it replaces.
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
    /// The AEAD key's AES-256 schedule, for a client that seals forward layers: it
    /// computes the stack keystream block by block instead of through a sealing of
    /// zeros ([`LayerSecret::expand_for_sealing`]). Relays do not need it.
    keystream: Option<Box<Aes256>>,
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
            keystream: None,
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

    /// `AES-256(stack, counter || j)` for `j` in `0..n`: the backward stack masks.
    fn masks(&self, counter: u64, n: usize) -> [[u8; 16]; H_MAX_LIMIT] {
        encrypt_counter_blocks(&self.stack, n, |j, b| {
            b[..8].copy_from_slice(&counter.to_be_bytes());
            b[8..].copy_from_slice(&(j as u64).to_be_bytes());
        })
    }

    /// The forward filler `AES-256(stack, counter || h_max - 1)`.
    fn filler(&self, counter: u64, h_max: usize) -> [u8; 16] {
        let mut b = filler_block(counter, h_max);
        self.stack.encrypt_block(&mut b);
        b.into()
    }

    /// The first `h_max - 1` blocks of the AEAD's keystream under `nonce(command,
    /// counter)`: what a forward open XORs onto slots `1..h_max`. Computed from the
    /// AEAD key's AES schedule when these keys carry it
    /// ([`LayerSecret::expand_for_sealing`]), else as the encryption of zeros, whose
    /// tag is thrown away (client side only: it reuses the cell's nonce, and nothing
    /// of it is ever sent).
    fn stack_keystream(
        &self,
        command: Command,
        counter: u64,
        h_max: usize,
    ) -> [[u8; 16]; H_MAX_LIMIT] {
        if let Some(aes) = &self.keystream {
            // GCM's counter blocks for a 96-bit nonce: J0 = nonce || 1, and the
            // message's block j is encrypted with nonce || (j + 2).
            let nonce = cell_nonce(command, counter);
            return encrypt_counter_blocks(aes, h_max - 1, |j, b| {
                b[..NONCE_LEN].copy_from_slice(&nonce);
                b[NONCE_LEN..].copy_from_slice(&((j + 2) as u32).to_be_bytes());
            });
        }
        let mut z = [0u8; SLOT_LEN * H_MAX_LIMIT];
        let n = SLOT_LEN * (h_max - 1);
        if n > 0 {
            self.aead
                .seal(&cell_nonce(command, counter), &[], &mut z[..n]);
        }
        let mut out = [[0u8; 16]; H_MAX_LIMIT];
        for (o, b) in out.iter_mut().zip(z.chunks_exact(SLOT_LEN)) {
            o.copy_from_slice(b);
        }
        out
    }
}

/// The plaintext block of a forward filler: `counter || h_max - 1`.
fn filler_block(counter: u64, h_max: usize) -> aes::Block {
    let mut b = aes::Block::default();
    b[..8].copy_from_slice(&counter.to_be_bytes());
    b[8..].copy_from_slice(&((h_max - 1) as u64).to_be_bytes());
    b
}

/// `AES-256(aes, block_j)` for `j` in `0..n` (at most [`H_MAX_LIMIT`]), each counter
/// block written by `fill(j, block)`, encrypted in one pipelined call; the rest zero.
fn encrypt_counter_blocks(
    aes: &Aes256,
    n: usize,
    fill: impl Fn(usize, &mut [u8; 16]),
) -> [[u8; 16]; H_MAX_LIMIT] {
    let mut blocks = [aes::Block::default(); H_MAX_LIMIT];
    for (j, b) in blocks.iter_mut().enumerate().take(n) {
        fill(j, b.as_mut());
    }
    aes.encrypt_blocks(&mut blocks[..n]);
    let mut out = [[0u8; 16]; H_MAX_LIMIT];
    for (o, b) in out.iter_mut().zip(blocks.iter()).take(n) {
        o.copy_from_slice(b);
    }
    out
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

    /// The key schedules plus the AEAD key's AES schedule, with which a client sealing
    /// forward layers ([`seal_forward`]) computes the stack keystream directly (the
    /// same bytes as a sealing of zeros, without its per-call and tag cost).
    pub fn expand_for_sealing<A: Aead>(&self) -> LayerKeys<A> {
        let mut k = self.expand();
        k.keystream = Some(Box::new(Aes256::new((&self.aead).into())));
        k
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
    let s0 = layout.stack_start();
    let se = layout.stack_end();
    let tag = tag_at(cell, s0);
    keys.aead.open(
        &cell_nonce(command, counter),
        &[],
        &mut cell[s0 + SLOT_LEN..],
        &tag,
    )?;
    cell.copy_within(s0 + SLOT_LEN..se, s0);
    cell[se - SLOT_LEN..se].copy_from_slice(&keys.filler(counter, layout.h_max));
    Ok(())
}

/// Strips one layer from several cells of `cells` (a whole number of `layout.cell`-byte
/// cells), as [`strip_forward`] does each: job `(keys, command, counter, i)` strips
/// cell `i`, and the `k`-th job's result lands in `results[k]` (at most
/// `results.len()` jobs are done). Each cell's AES-GCM open is one call (the AEAD
/// backends open one message per call); the forward fillers of consecutive jobs under
/// the same keys are computed in one pipelined AES call.
pub fn strip_forward_batch<'k, A: Aead + 'k>(
    layout: &Layout,
    cells: &mut [u8],
    jobs: impl IntoIterator<Item = (&'k LayerKeys<A>, Command, u64, usize)>,
    results: &mut [Result<(), BadTag>],
) {
    let size = layout.cell;
    let s0 = layout.stack_start();
    let se = layout.stack_end();
    // The current run of jobs under one key: their cells and filler blocks.
    let mut run: Option<&LayerKeys<A>> = None;
    let mut run_cells = [0usize; FILLER_RUN];
    let mut fillers = [aes::Block::default(); FILLER_RUN];
    let mut n = 0;
    let flush =
        |keys: &LayerKeys<A>, run_cells: &[usize], fillers: &mut [aes::Block], cells: &mut [u8]| {
            keys.stack.encrypt_blocks(fillers);
            for (&i, f) in run_cells.iter().zip(fillers.iter()) {
                cells[i * size + se - SLOT_LEN..i * size + se].copy_from_slice(f);
            }
        };
    for ((keys, command, counter, i), r) in jobs.into_iter().zip(results.iter_mut()) {
        let cell = &mut cells[i * size..(i + 1) * size];
        let tag = tag_at(cell, s0);
        *r = keys.aead.open(
            &cell_nonce(command, counter),
            &[],
            &mut cell[s0 + SLOT_LEN..],
            &tag,
        );
        if r.is_err() {
            continue;
        }
        cell.copy_within(s0 + SLOT_LEN..se, s0);
        if let Some(k) = run {
            if !core::ptr::eq(k, keys) || n == FILLER_RUN {
                flush(k, &run_cells[..n], &mut fillers[..n], cells);
                n = 0;
            }
        }
        run = Some(keys);
        run_cells[n] = i;
        fillers[n] = filler_block(counter, layout.h_max);
        n += 1;
    }
    if let Some(k) = run {
        flush(k, &run_cells[..n], &mut fillers[..n], cells);
    }
}

/// Most forward fillers [`strip_forward_batch`] computes in one call.
const FILLER_RUN: usize = 64;

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
    let m = keys.masks(counter, h - 1);
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
    let mut keystream = [[[0u8; 16]; H_MAX_LIMIT]; H_MAX_LIMIT];
    for ((ks, k), c) in keystream.iter_mut().zip(hops).zip(counters) {
        *ks = k.stack_keystream(command, c, h);
    }
    // Simulate what each hop receives below the real tags: start with the client's
    // random junk, then apply each hop's decryption, shift and filler.
    let mut slots = *junk;
    for ((ks, k), c) in keystream.iter().zip(hops).zip(counters).take(l - 1) {
        let mut next = [[0u8; 16]; H_MAX_LIMIT];
        for j in 0..h - 1 {
            next[j] = slots[j + 1];
            xor_arr(&mut next[j], &ks[j]);
        }
        next[h - 1] = k.filler(c, h);
        slots = next;
    }
    // `slots` is now the exit's stack. Its slots 1.. must arrive as they are: write
    // the plaintext that encrypts to them, then seal from the exit back, each hop's
    // plaintext stack being the next hop's tag and slots.
    let s0 = layout.stack_start();
    let se = layout.stack_end();
    for j in 1..h {
        let at = s0 + j * SLOT_LEN;
        cell[at..at + SLOT_LEN].copy_from_slice(&slots[j]);
        xor16(&mut cell[at..at + SLOT_LEN], &keystream[l - 1][j - 1]);
    }
    for i in (0..l).rev() {
        if i + 1 < l {
            cell.copy_within(s0..se - SLOT_LEN, s0 + SLOT_LEN);
        }
        let tag = hops[i].aead.seal(
            &cell_nonce(command, counters[i]),
            &[],
            &mut cell[s0 + SLOT_LEN..],
        );
        cell[s0..s0 + SLOT_LEN].copy_from_slice(&tag);
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
    let m = keys.masks(counter, h - 1);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aead::{RingAead, RustCryptoAead};
    use aes_gcm::aead::AeadInOut;

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn key(seed: u8) -> [u8; 32] {
        bytes(32, seed).try_into().unwrap()
    }

    /// PROTOCOL.md §4: `K[j] = AES-256(k, nonce || (j + 2))`, computed from the block
    /// cipher alone.
    fn spec_keystream(k: &[u8; 32], nonce: &[u8; NONCE_LEN], j: usize) -> [u8; 16] {
        let mut b = aes::Block::default();
        b[..NONCE_LEN].copy_from_slice(nonce);
        b[NONCE_LEN..].copy_from_slice(&((j + 2) as u32).to_be_bytes());
        Aes256::new(k.into()).encrypt_block(&mut b);
        b.into()
    }

    #[test]
    fn the_stack_keystream_is_the_gcm_counter_stream_the_spec_names() {
        let secret = LayerSecret::new(&key(1), &key(2), 3);
        for h in [1, 2, 8, H_MAX_LIMIT] {
            // Through a sealing of zeros (ring and RustCrypto) and block by block.
            let a = secret.expand::<RingAead>();
            let b = secret.expand::<RustCryptoAead>();
            let c = secret.expand_for_sealing::<RingAead>();
            assert!(a.keystream.is_none() && c.keystream.is_some());
            for command in [Command::Data, Command::Destroy] {
                let nonce = cell_nonce(command, 0xabcdef);
                let want: Vec<[u8; 16]> = (0..H_MAX_LIMIT)
                    .map(|j| {
                        if j + 1 < h {
                            spec_keystream(&key(1), &nonce, j)
                        } else {
                            [0; 16]
                        }
                    })
                    .collect();
                for ks in [
                    a.stack_keystream(command, 0xabcdef, h),
                    b.stack_keystream(command, 0xabcdef, h),
                    c.stack_keystream(command, 0xabcdef, h),
                ] {
                    assert_eq!(ks.to_vec(), want, "h {h}");
                }
            }
        }
    }

    /// A forward strip computed from the spec's steps with RustCrypto's AES-GCM and
    /// AES directly (not through [`Aead`]) gives the relay's output byte for byte.
    #[test]
    fn a_forward_strip_is_one_gcm_open_of_the_stack_and_body_then_shift_and_filler() {
        let layout = Layout::default();
        let (h, s0, se) = (layout.h_max, layout.stack_start(), layout.stack_end());
        let (kf, sf) = (key(7), key(9));
        let hops = [
            LayerKeys::<RingAead>::new(&kf, &sf).with_shift(5),
            LayerKeys::<RingAead>::new(&key(3), &key(4)).with_shift(11),
        ];
        let mut cell = bytes(layout.cell, 0x5a);
        write_payload(&layout, &mut cell, b"one forward cell");
        let junk = [[0x33u8; 16]; H_MAX_LIMIT];
        seal_forward(&layout, &hops, Command::Data, 1000, &mut cell, &junk);
        let counter = hops[0].shifted(1000);

        let mut spec = cell.clone();
        let nonce = cell_nonce(Command::Data, counter);
        let tag: [u8; 16] = spec[s0..s0 + SLOT_LEN].try_into().unwrap();
        aes_gcm::Aes256Gcm::new((&kf).into())
            .decrypt_inout_detached(
                (&nonce).into(),
                &[],
                (&mut spec[s0 + SLOT_LEN..]).into(),
                (&tag).into(),
            )
            .expect("the spec's open verifies");
        spec.copy_within(s0 + SLOT_LEN..se, s0);
        let mut filler = aes::Block::default();
        filler[..8].copy_from_slice(&counter.to_be_bytes());
        filler[8..].copy_from_slice(&((h - 1) as u64).to_be_bytes());
        Aes256::new((&sf).into()).encrypt_block(&mut filler);
        spec[se - SLOT_LEN..se].copy_from_slice(&filler);

        strip_forward(&layout, &hops[0], Command::Data, counter, &mut cell).unwrap();
        assert_eq!(cell, spec);
        // And the next hop, the exit, verifies and reads the payload.
        let c1 = hops[1].shifted(counter);
        strip_forward(&layout, &hops[1], Command::Data, c1, &mut cell).unwrap();
        let Some(Body::Data(r)) = read_body(&layout, &cell) else {
            panic!("no payload at the exit");
        };
        assert_eq!(&cell[r], b"one forward cell");
    }

    /// Both backends build and strip the same onion, for every circuit length.
    #[test]
    fn ring_and_rustcrypto_seal_and_strip_the_same_bytes() {
        let layout = Layout::default();
        for l in 1..=layout.h_max {
            let keys = |i: usize| (key(i as u8 * 2), key(i as u8 * 2 + 1), i as u64 * 77);
            let ring: Vec<LayerKeys<RingAead>> = (0..l)
                .map(|i| {
                    let (a, s, d) = keys(i);
                    LayerKeys::new(&a, &s).with_shift(d)
                })
                .collect();
            let rc: Vec<LayerKeys<RustCryptoAead>> = (0..l)
                .map(|i| {
                    let (a, s, d) = keys(i);
                    LayerKeys::new(&a, &s).with_shift(d)
                })
                .collect();
            let junk = [[0x44u8; 16]; H_MAX_LIMIT];
            let mut a = bytes(layout.cell, 1);
            write_cover(&layout, &mut a);
            let mut b = a.clone();
            seal_forward(&layout, &ring, Command::Data, 9, &mut a, &junk);
            seal_forward(&layout, &rc, Command::Data, 9, &mut b, &junk);
            assert_eq!(a, b, "{l} hops");
            let mut c = 9;
            for (r, k) in ring.iter().zip(&rc) {
                c = r.shifted(c);
                strip_forward(&layout, r, Command::Data, c, &mut a).unwrap();
                strip_forward(&layout, k, Command::Data, c, &mut b).unwrap();
                assert_eq!(a, b, "{l} hops");
            }
            assert_eq!(read_body(&layout, &a), Some(Body::Cover));
        }
    }
}
