//! # shroud-client
//!
//! The client's I/O half: a blocking UDP driver around the sans-IO client of
//! `shroud-proto` (`shroud_proto::client`), shared by integration tests, the
//! benchmark and applications.
//!
//! - [`Client`] owns one UDP socket and every circuit built through it: it builds
//!   circuits in one round trip (with retries, since UDP may lose the setup), sends
//!   and receives payloads, and tears circuits down.
//! - [`choose_path`] and [`path_from_ids`] turn a [`PeerList`](shroud_proto::peerlist::PeerList)
//!   into a path of [`PathHop`]s.
//! - [`udp_echo_server`] is a tiny UDP echo service, the usual destination behind the
//!   exit in tests and demos.
//!
//! - [`udp`] sends a run of cells in one system call (GSO) and reads a run of
//!   datagrams in one (GRO), on Linux, falling back to one datagram per call.
//!
//! No async runtime: everything is `std::net::UdpSocket` with read timeouts, and every
//! blocking call takes a timeout it never exceeds by more than one scheduling delay.
//! The protocol core reads no clock; this crate does (`SystemTime` for setup
//! timestamps, `Instant` for deadlines and liveness).
//!
//! Each module's documentation states the invariants it keeps: [`client`] (links,
//! demultiplexing, what is dropped and counted, bounded waits), [`path`] (what every
//! path satisfies) and [`echo`]. Their items are re-exported here.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod echo;
pub mod path;
pub mod udp;

pub use client::{
    cover_interval, reason_name, CircuitId, Client, ClientConfig, ClientError, ClientStats,
    CoverKind,
};
pub use echo::{udp_echo_server, EchoHandle};
pub use path::{choose_path, choose_path_with, path_from_ids, subnet, PathError, PathRules};
pub use shroud_proto::client::{CircuitState, PathHop};
