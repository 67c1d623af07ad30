//! # shroud-bench
//!
//! The benchmark and local-network launcher: [`net`] starts relays as processes,
//! [`demo`] runs a local network with traffic ([`demo::Session`]), [`circuit`] sweeps
//! offered load through it,
//! [`flood`] measures the demo under a garbage flood, [`proxybench`] one TCP stream through shroud-proxy against direct loopback, [`flow`] generates and sinks traffic, [`relaybench`] measures one relay against
//! in-run baselines, [`report`] describes the machine and writes JSON. The criterion
//! micro-benchmarks live in `benches/`.

pub mod background;
pub mod circuit;
pub mod demo;
pub mod flood;
pub mod flow;
pub mod forward;
pub mod mixbench;
pub mod net;
pub mod plot;
pub mod proxybench;
pub mod relaybench;
pub mod report;
pub mod setupbench;
pub mod veth;
