//! # shroud-proxy
//!
//! Real applications through Shroud: a local SOCKS5 proxy ([`socks`]) whose TCP
//! streams are QUIC streams ([`tls`], quinn) carried through circuits ([`circuit`])
//! to a stream gateway beside an exit ([`gateway`]), which opens the TCP connections
//! under its exit policy. QUIC packets are larger than a cell's payload, so they
//! travel as fragments ([`frag`]). UDP ASSOCIATE datagrams go through circuits whose
//! destination is the datagram's, one cell each. [`pool`] keeps the circuits
//! (isolation per credentials, rotation, dead relays avoided); [`probe`] is the
//! operator's check of a path; [`config`] reads the TOML files. The design and its
//! reasons are in docs/ARCHITECTURE.md and the wire format in docs/PROTOCOL.md §11.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod circuit;
pub mod config;
pub mod frag;
pub mod gateway;
pub mod metrics;
pub mod pool;
pub mod probe;
pub mod socks;
pub mod tls;
pub mod wire;
