//! A worker: one pinned thread running one I/O driver over one [`Engine`]. This module
//! only starts it: the driver (io_uring, or recvmmsg as the fallback) arms, submits
//! and reaps; the engine decides what happens to every cell.
//!
//! The control plane talks to a worker only through [`Control`] messages, which the
//! engine polls between batches; nothing on the data path takes a lock.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Receiver;
use shroud_proto::aead::Aead;
use shroud_proto::relay::Relay;

use crate::engine::{Control, Engine, WorkerEnd};
use crate::spec::{DriverChoice, WorkerSpec};
use crate::stats::{DriverKind, WorkerStats};

/// Starts a worker thread. Returns its handle; the thread's result says how it ended.
pub fn spawn<A: Aead>(
    spec: WorkerSpec,
    relay: Relay<A>,
    ctl: Receiver<Control>,
    stats: Arc<WorkerStats>,
) -> std::io::Result<JoinHandle<std::io::Result<WorkerEnd>>> {
    std::thread::Builder::new()
        .name(format!("shroud-worker-{}", spec.index))
        .spawn(move || {
            if let Some(cpu) = spec.cpu {
                if let Err(e) = crate::sys::pin_to_cpu(cpu) {
                    tracing::warn!(worker = spec.index, cpu, error = %e, "could not pin worker to its CPU");
                }
            }
            let ipv4 = crate::sys::ipv4_flags(&spec.sockets)?;
            let mut engine = Engine::new(relay, spec.layout, stats.clone(), ctl, ipv4, &spec.io);
            let want_uring = spec.io.driver != DriverChoice::Mmsg;
            if want_uring {
                match crate::uring::Driver::new(&spec) {
                    Ok(mut d) => {
                        stats.set_driver(DriverKind::Uring);
                        tracing::info!(worker = spec.index, "worker running on io_uring (UDP GRO/GSO)");
                        return d.run(&mut engine);
                    }
                    Err(e) if spec.io.driver == DriverChoice::Auto => {
                        tracing::warn!(worker = spec.index, error = %e, "io_uring unavailable: falling back to the recvmmsg/sendmmsg driver");
                    }
                    Err(e) => return Err(e),
                }
            }
            stats.set_driver(DriverKind::Mmsg);
            tracing::info!(worker = spec.index, "worker running on recvmmsg/sendmmsg (UDP GRO/GSO)");
            crate::mmsg::Driver::new(&spec)?.run(&mut engine)
        })
}

/// The local address of a worker's first socket (for logs).
pub fn first_addr(spec: &WorkerSpec) -> Option<SocketAddr> {
    spec.sockets.first().and_then(|s| s.local_addr().ok())
}
