//! # shroud-relay
//!
//! The relay daemon's library half: thread-per-core workers that forward Shroud cells
//! with io_uring (UDP GRO in, one GSO send per next hop out), the recvmmsg fallback,
//! configuration, and the glue to the control plane.
//!
//! Layout: [`engine`] runs datagrams through `shroud_proto::relay::Relay` and plans
//! the sends; [`uring`] and [`mmsg`] do the I/O; [`worker`] owns a thread, its
//! sockets and its control channel; [`config`] reads the TOML configuration. Unsafe
//! code lives only in [`sys`], [`uring`] and [`mmsg`], each block with a SAFETY note.
#![warn(missing_docs)]

pub mod bufring;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod exits;
pub mod journal;
pub mod logging;
pub mod metrics;
pub mod mixer;
pub mod mmsg;
pub mod spec;
pub mod stats;
pub mod sys;
pub mod uring;
pub mod worker;
