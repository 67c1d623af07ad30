//! The cell: Shroud's one and only unit on the wire.
//!
//! A cell is exactly [`Layout::cell`] bytes (the network parameter `CELL`, 1024 by
//! default). Every datagram on every link carries a whole number of cells, and every
//! cell, whatever its command, is made of bytes that look uniformly random to anyone
//! without the link and circuit keys.
//!
//! Two shapes share that size (offsets in bytes, `H` = `H_MAX`):
//!
//! ```text
//! data   | header 16 | tag stack 16*H                  | body  (cell - 16 - 16*H) |
//! setup  | header 16 | E 32 | T 16 | routing 112*H     | rest                     |
//! ```
//!
//! The 16-byte header is *protected*: XORed with `AES-256(link key, sample)` where the
//! sample is bytes `16..32` of the same cell (a GCM tag or an Elligator2 string, both
//! pseudo-random). Unprotected, it reads `circuit id (u64) | counter (u48) | command
//! (u8) | zero (u8)`, all big endian. The circuit id is per link and the counter per
//! hop (each hop adds its own secret shift, [`counter_add`]): no header value is the
//! same on two links of one circuit. The command says only what relays must know
//! (a data-shaped cell, setup, teardown, setup replies); whether a data-shaped cell
//! carries payload or cover is inside the layers, for the ends alone.
//!
//! Invariants a caller may rely on: [`Layout::new`] only accepts parameters for which
//! every region above is non-empty, 16-byte aligned and inside the cell; every accessor
//! here takes a slice already checked by [`Layout::check`] and never panics on content.

use aes::cipher::{BlockCipherEncrypt, KeyInit};
use aes::Aes256Enc as Aes256;

/// Length of the protected cell header.
pub const HEADER_LEN: usize = 16;
/// Length of one tag-stack slot (one AES-GCM tag).
pub const SLOT_LEN: usize = 16;
/// Length of one routing slot in a setup cell.
pub const ROUTING_SLOT_LEN: usize = 112;
/// Length of an Elligator2-encoded x25519 ephemeral key.
pub const EPHEMERAL_LEN: usize = 32;
/// Default cell size (fits the IPv6 minimum MTU with UDP/IP headers).
pub const DEFAULT_CELL: usize = 1024;
/// Default most hops a circuit may have.
pub const DEFAULT_H_MAX: usize = 8;
/// Largest supported `H_MAX`.
pub const H_MAX_LIMIT: usize = 8;
/// Largest counter value (48 bits).
pub const COUNTER_MAX: u64 = (1 << 48) - 1;

/// `a + b` in the 48-bit counter space (counters wrap; comparisons are serial, see
/// [`crate::replay::ReplayWindow`]).
pub const fn counter_add(a: u64, b: u64) -> u64 {
    a.wrapping_add(b) & COUNTER_MAX
}

/// `a - b` in the 48-bit counter space.
pub const fn counter_sub(a: u64, b: u64) -> u64 {
    a.wrapping_sub(b) & COUNTER_MAX
}

/// The protocol version this crate speaks, carried in every setup routing slot.
pub const PROTOCOL_VERSION: u8 = 2;

/// What a cell is for. Carried only inside the protected header (and in the AEAD
/// associated data, so it cannot be changed in flight).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Command {
    /// A data-shaped end-to-end cell, both directions: application payload or cover
    /// (the body's type byte, visible only to the ends, tells which).
    Data = 1,
    /// Circuit setup (forward only).
    Setup = 2,
    /// Tear the circuit down (both directions).
    Destroy = 3,
    // 4 was PADDING in protocol version 1; cover is now a body type inside the layers.
    /// Setup reply from the exit (backward only).
    Created = 5,
    /// A hop refused or failed the circuit (backward only).
    Refused = 6,
}

impl Command {
    /// Parses a command byte.
    pub fn from_u8(b: u8) -> Option<Command> {
        Some(match b {
            1 => Command::Data,
            2 => Command::Setup,
            3 => Command::Destroy,
            5 => Command::Created,
            6 => Command::Refused,
            _ => return None,
        })
    }
}

/// The unprotected cell header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Circuit id on this link, chosen by the client for every segment.
    pub circuit: u64,
    /// Per-circuit, per-direction counter (48 bits), end to end: every hop forwards the
    /// counter it received. It is the AES-GCM nonce and the replay-window index.
    pub counter: u64,
    /// The command.
    pub command: Command,
}

/// Why a header did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// The check byte was not zero (wrong link key, or not a header at all).
    Check,
    /// Unknown command byte.
    Command,
}

impl Header {
    /// Encodes to 16 plaintext bytes. Counters above [`COUNTER_MAX`] are truncated to
    /// 48 bits; callers never produce them (circuits end before).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(&self.circuit.to_be_bytes());
        b[8..14].copy_from_slice(&self.counter.to_be_bytes()[2..]);
        b[14] = self.command as u8;
        b[15] = 0;
        b
    }

    /// Decodes 16 plaintext bytes.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, HeaderError> {
        if b[15] != 0 {
            return Err(HeaderError::Check);
        }
        let command = Command::from_u8(b[14]).ok_or(HeaderError::Command)?;
        let mut c = [0u8; 8];
        c.copy_from_slice(&b[..8]);
        let mut n = [0u8; 8];
        n[2..].copy_from_slice(&b[8..14]);
        Ok(Header {
            circuit: u64::from_be_bytes(c),
            counter: u64::from_be_bytes(n),
            command,
        })
    }
}

/// A one-direction header-protection key (AES-256).
#[derive(Clone)]
pub struct HeaderKey(Aes256);

impl core::fmt::Debug for HeaderKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("HeaderKey(<key>)")
    }
}

impl HeaderKey {
    /// Expands a 256-bit key.
    pub fn new(key: &[u8; 32]) -> HeaderKey {
        HeaderKey(Aes256::new(key.into()))
    }

    /// One AES-256 block encryption under this key.
    pub(crate) fn encrypt_block(&self, b: [u8; 16]) -> [u8; 16] {
        let mut block = aes::Block::from(b);
        self.0.encrypt_block(&mut block);
        block.into()
    }

    fn mask(&self, cell: &[u8]) -> [u8; 16] {
        let mut block = aes::Block::default();
        block.copy_from_slice(&cell[HEADER_LEN..HEADER_LEN + 16]);
        self.0.encrypt_block(&mut block);
        block.into()
    }

    /// Writes `hdr` into `cell[0..16]`, protected. The sample (`cell[16..32]`) must
    /// already hold its final bytes.
    pub fn protect(&self, cell: &mut [u8], hdr: &Header) {
        self.protect_with(cell, hdr, &self.mask(cell));
    }

    /// Removes the protection of `cell[0..16]` and decodes the header, leaving the cell
    /// untouched.
    pub fn unprotect(&self, cell: &[u8]) -> Result<Header, HeaderError> {
        self.unprotect_with(cell, &self.mask(cell))
    }

    /// The header masks of the `cell_len`-byte cells in `cells` (`AES-256(key,
    /// sample)` each), into `out[..n]` for the first `n = min(cells, out.len())` of
    /// them, in one pipelined AES call: a datagram's cells share their link, so one
    /// call serves all of them instead of one latency-bound call per cell. Returns `n`.
    pub fn masks(&self, cells: &[u8], cell_len: usize, out: &mut [aes::Block]) -> usize {
        let mut n = 0;
        for (c, o) in cells.chunks_exact(cell_len).zip(out.iter_mut()) {
            o.copy_from_slice(&c[HEADER_LEN..HEADER_LEN + 16]);
            n += 1;
        }
        self.0.encrypt_blocks(&mut out[..n]);
        n
    }

    /// The header masks of cells `which` of `cells` (`cell_len` bytes each), into
    /// `out[..n]` for the first `n` of them that fit, in one pipelined AES call (the
    /// cells a batch sends on one link). Returns `n`.
    pub fn masks_of(
        &self,
        cells: &[u8],
        cell_len: usize,
        which: impl IntoIterator<Item = usize>,
        out: &mut [aes::Block],
    ) -> usize {
        let mut n = 0;
        for (i, o) in which.into_iter().zip(out.iter_mut()) {
            let at = i * cell_len + HEADER_LEN;
            o.copy_from_slice(&cells[at..at + 16]);
            n += 1;
        }
        self.0.encrypt_blocks(&mut out[..n]);
        n
    }

    /// [`HeaderKey::protect`] with the cell's mask computed already
    /// ([`HeaderKey::masks_of`]).
    pub fn protect_with(&self, cell: &mut [u8], hdr: &Header, mask: &[u8]) {
        let plain = hdr.encode();
        for i in 0..HEADER_LEN {
            cell[i] = plain[i] ^ mask[i];
        }
    }

    /// [`HeaderKey::unprotect`] with the cell's mask computed already
    /// ([`HeaderKey::masks`]).
    pub fn unprotect_with(&self, cell: &[u8], mask: &[u8]) -> Result<Header, HeaderError> {
        let mut plain = [0u8; HEADER_LEN];
        for i in 0..HEADER_LEN {
            plain[i] = cell[i] ^ mask[i];
        }
        Header::decode(&plain)
    }
}

/// Why network parameters were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// `H_MAX` out of range.
    #[error("H_MAX must be between 1 and {H_MAX_LIMIT}, got {0}")]
    HMax(usize),
    /// `CELL` not a multiple of 16, too small for a setup cell at this `H_MAX`, or too
    /// large for one UDP datagram segment.
    #[error("CELL must be a multiple of 16 between {min} and 8192 for H_MAX {h_max}, got {cell}")]
    Cell {
        /// Offending size.
        cell: usize,
        /// Smallest size allowed for this H_MAX.
        min: usize,
        /// The H_MAX in force.
        h_max: usize,
    },
}

/// Offsets of every region of a cell for one choice of network parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// `CELL`: bytes per cell.
    pub cell: usize,
    /// `H_MAX`: the most hops a circuit may have (= tag-stack and routing-stack slots).
    pub h_max: usize,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            cell: DEFAULT_CELL,
            h_max: DEFAULT_H_MAX,
        }
    }
}

impl Layout {
    /// Smallest `CELL` for a given `H_MAX`: a setup cell plus at least 16 bytes of rest.
    pub const fn min_cell(h_max: usize) -> usize {
        HEADER_LEN + EPHEMERAL_LEN + SLOT_LEN + ROUTING_SLOT_LEN * h_max + 16
    }

    /// Checks and builds a layout.
    pub fn new(cell: usize, h_max: usize) -> Result<Layout, LayoutError> {
        if !(1..=H_MAX_LIMIT).contains(&h_max) {
            return Err(LayoutError::HMax(h_max));
        }
        let min = Self::min_cell(h_max);
        if !cell.is_multiple_of(16) || cell < min || cell > 8192 {
            return Err(LayoutError::Cell { cell, min, h_max });
        }
        Ok(Layout { cell, h_max })
    }

    /// Returns `Some(cell)` if `bytes` is exactly one cell.
    pub fn check<'a>(&self, bytes: &'a mut [u8]) -> Option<&'a mut [u8]> {
        (bytes.len() == self.cell).then_some(bytes)
    }

    /// Start of the tag stack.
    pub const fn stack_start(&self) -> usize {
        HEADER_LEN
    }
    /// End of the tag stack (= start of the body).
    pub const fn stack_end(&self) -> usize {
        HEADER_LEN + SLOT_LEN * self.h_max
    }
    /// Bytes of body in a data cell.
    pub const fn body_len(&self) -> usize {
        self.cell - self.stack_end()
    }
    /// Bytes a hop's forward layer opens as one AEAD ciphertext: tag-stack slots
    /// `1..H_MAX` and the body (992 with the defaults).
    pub const fn forward_sealed_len(&self) -> usize {
        self.cell - self.stack_start() - SLOT_LEN
    }
    /// Most application bytes one data cell carries (body minus the 1-byte type and
    /// the 2-byte length).
    pub const fn payload_max(&self) -> usize {
        self.body_len() - 3
    }
    /// Offset of the ephemeral key in a setup cell.
    pub const fn setup_e(&self) -> usize {
        HEADER_LEN
    }
    /// Offset of the setup tag.
    pub const fn setup_tag(&self) -> usize {
        HEADER_LEN + EPHEMERAL_LEN
    }
    /// Offset of the encrypted setup region (routing stack, then rest).
    pub const fn setup_region(&self) -> usize {
        HEADER_LEN + EPHEMERAL_LEN + SLOT_LEN
    }
    /// Length of the routing stack.
    pub const fn routing_len(&self) -> usize {
        ROUTING_SLOT_LEN * self.h_max
    }
}

/// Why bytes are not a cell, or a datagram not a whole number of cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CellError {
    /// Not exactly one cell.
    #[error("{got} bytes is not one {want}-byte cell")]
    Length {
        /// Bytes given.
        got: usize,
        /// CELL.
        want: usize,
    },
    /// A datagram that is empty or not a multiple of the cell size.
    #[error("datagram of {got} bytes is not a whole number of {cell}-byte cells")]
    Partial {
        /// Datagram length.
        got: usize,
        /// CELL.
        cell: usize,
    },
}

/// A checked view of one cell over any byte container (smoltcp style): the length is
/// checked once in [`Cell::new_checked`], after which every accessor is infallible and
/// never panics, whatever the content.
#[derive(Debug, Clone)]
pub struct Cell<T: AsRef<[u8]>> {
    buf: T,
    layout: Layout,
}

/// A fixed-size owned cell at the default `CELL`.
pub type CellBytes = [u8; DEFAULT_CELL];

impl<T: AsRef<[u8]>> Cell<T> {
    /// Wraps `buf` if it is exactly one cell of `layout`.
    pub fn new_checked(buf: T, layout: &Layout) -> Result<Cell<T>, CellError> {
        let got = buf.as_ref().len();
        if got != layout.cell {
            return Err(CellError::Length {
                got,
                want: layout.cell,
            });
        }
        Ok(Cell {
            buf,
            layout: *layout,
        })
    }

    /// The layout this cell was checked against.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// All bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.as_ref()
    }

    /// The (protected) header bytes.
    pub fn header(&self) -> &[u8] {
        &self.buf.as_ref()[..HEADER_LEN]
    }

    /// Tag-stack slot `j` of a data cell, `None` past `H_MAX`.
    pub fn slot(&self, j: usize) -> Option<&[u8]> {
        (j < self.layout.h_max).then(|| {
            let s = self.layout.stack_start() + j * SLOT_LEN;
            &self.buf.as_ref()[s..s + SLOT_LEN]
        })
    }

    /// The body of a data cell.
    pub fn body(&self) -> &[u8] {
        &self.buf.as_ref()[self.layout.stack_end()..]
    }

    /// The ephemeral representative of a setup cell.
    pub fn setup_ephemeral(&self) -> &[u8] {
        let s = self.layout.setup_e();
        &self.buf.as_ref()[s..s + EPHEMERAL_LEN]
    }

    /// The setup tag of a setup cell.
    pub fn setup_tag(&self) -> &[u8] {
        let s = self.layout.setup_tag();
        &self.buf.as_ref()[s..s + SLOT_LEN]
    }

    /// The encrypted region of a setup cell (routing stack, then rest).
    pub fn setup_region(&self) -> &[u8] {
        &self.buf.as_ref()[self.layout.setup_region()..]
    }

    /// Unwraps the container.
    pub fn into_inner(self) -> T {
        self.buf
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Cell<T> {
    /// All bytes, mutable (the layer functions work on this).
    pub fn as_mut_bytes(&mut self) -> &mut [u8] {
        self.buf.as_mut()
    }

    /// The body of a data cell, mutable.
    pub fn body_mut(&mut self) -> &mut [u8] {
        let s = self.layout.stack_end();
        &mut self.buf.as_mut()[s..]
    }
}

/// Splits a received datagram into its cells, refusing anything that is not a whole,
/// non-zero number of cells.
pub fn cells_mut<'a>(
    layout: &Layout,
    datagram: &'a mut [u8],
) -> Result<core::slice::ChunksExactMut<'a, u8>, CellError> {
    if datagram.is_empty() || !datagram.len().is_multiple_of(layout.cell) {
        return Err(CellError::Partial {
            got: datagram.len(),
            cell: layout.cell,
        });
    }
    Ok(datagram.chunks_exact_mut(layout.cell))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_and_protection() {
        let h = Header {
            circuit: 0x0102_0304_0506_0708,
            counter: COUNTER_MAX,
            command: Command::Destroy,
        };
        assert_eq!(Header::decode(&h.encode()), Ok(h));
        let k = HeaderKey::new(&[3u8; 32]);
        let mut cell = vec![0xabu8; 1024];
        k.protect(&mut cell, &h);
        assert_ne!(&cell[..16], &h.encode()[..]);
        assert_eq!(k.unprotect(&cell), Ok(h));
        let other = HeaderKey::new(&[4u8; 32]);
        // Another key sees garbage: the check byte or the command fails (almost surely).
        assert!(other.unprotect(&cell).map(|x| x != h).unwrap_or(true));
    }

    #[test]
    fn cell_view_checks_length_once() {
        let l = Layout::default();
        assert!(Cell::new_checked(vec![0u8; 1023], &l).is_err());
        assert!(Cell::new_checked(vec![0u8; 1025], &l).is_err());
        let mut c = Cell::new_checked([7u8; DEFAULT_CELL], &l).unwrap();
        assert_eq!(c.header().len(), 16);
        assert_eq!(c.slot(7).map(<[u8]>::len), Some(16));
        assert_eq!(c.slot(8), None);
        assert_eq!(c.body().len(), 880);
        assert_eq!(c.setup_ephemeral().len(), 32);
        assert_eq!(c.setup_tag().len(), 16);
        assert_eq!(c.setup_region().len(), 960);
        c.body_mut()[0] = 1;
        assert_eq!(c.as_bytes()[l.stack_end()], 1);
        let mut d = vec![0u8; 3 * 1024];
        assert_eq!(cells_mut(&l, &mut d).unwrap().count(), 3);
        let mut d = vec![0u8; 3 * 1024 + 1];
        assert!(cells_mut(&l, &mut d).is_err());
        assert!(cells_mut(&l, &mut []).is_err());
    }

    #[test]
    fn layout_limits() {
        assert!(Layout::new(1024, 8).is_ok());
        assert!(Layout::new(1000, 8).is_err());
        assert!(Layout::new(512, 8).is_err());
        assert!(Layout::new(512, 3).is_ok());
        assert!(Layout::new(1024, 0).is_err());
        assert!(Layout::new(1024, 9).is_err());
        let l = Layout::default();
        assert_eq!(l.body_len(), 880);
        assert_eq!(l.setup_region() + l.routing_len(), 960);
    }
}
