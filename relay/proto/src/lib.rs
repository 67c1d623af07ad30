//! # shroud-proto
//!
//! The sans-IO core of Shroud: everything about cells, onion layers, circuit setup,
//! replay protection, keys and the signed peer list, with no sockets, no threads and no
//! clock (time is always an argument). `docs/PROTOCOL.md` is the wire specification;
//! this crate is its reference implementation and the test vectors in `testdata/`
//! tie the two together.
//!
//! Modules:
//! - [`cell`]: layout of a cell, the protected header, commands;
//! - [`aead`]: AES-256-GCM behind one trait, `ring` and RustCrypto backends;
//! - [`layer`]: stripping and adding onion layers in place, in batches;
//! - [`setup`]: the one-round-trip, Sphinx-style circuit setup with Elligator2 keys;
//! - [`replay`]: data-cell sliding windows and the setup seen-filter;
//! - [`retry`]: the stateless retry token a relay under load asks new clients for;
//! - [`relay`]: the relay as a state machine, `handle(src, cell, now) -> Action`;
//! - [`client`]: building circuits, sealing and opening cells;
//! - [`keys`], [`peerlist`]: keys and the signed network directory;
//! - [`policy`]: exit policies;
//! - [`mix`]: mix mode's Poisson delay queue (sans-IO; time is an argument).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod aead;
pub mod cell;
pub mod client;
pub mod elligator;
pub mod keys;
pub mod layer;
pub mod mix;
pub mod peerlist;
pub mod policy;
pub mod relay;
pub mod replay;
pub mod retry;
pub mod setup;

pub use aead::{Aead, DefaultAead, RingAead, RustCryptoAead};
pub use cell::{Cell, Command, Header, Layout};
