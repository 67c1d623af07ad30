//! A worker: one pinned thread, its sockets, its protocol state, its I/O driver.
//!
//! The control plane talks to a worker only through [`Control`] messages, which the
//! worker polls between batches; nothing on the data path takes a lock.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Receiver;
use shroud_proto::aead::Aead;
use shroud_proto::relay::{OnionKeyring, Peer, Relay};
use shroud_proto::Layout;

use crate::engine::Engine;
use crate::stats::{DriverKind, WorkerStats};

/// A message from the control plane, applied between batches.
#[derive(Debug)]
pub enum Control {
    /// A new verified peer list: links and circuits of relays that stay are kept.
    SetPeers(Vec<Peer>),
    /// New onion keys (newest first), as the process-wide keyring whose seen-filters
    /// every worker shares: circuits are untouched.
    SetOnionKeys(OnionKeyring),
    /// Accept new circuits or refuse them (while the peer list in force has expired);
    /// existing circuits are untouched. Ignored once draining: a drain never resumes.
    SetAccepting(bool),
    /// Refuse new circuits; exit when the last circuit is gone or at the deadline
    /// (unix ms).
    Drain {
        /// Deadline, unix milliseconds.
        deadline_ms: u64,
    },
    /// Stop now.
    Stop,
}

/// Which AES-GCM backend the workers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CryptoChoice {
    /// `ring` (the default: fastest here, see docs/BENCHMARKING.md).
    Ring,
    /// RustCrypto `aes-gcm`.
    Rustcrypto,
    /// No cell crypto at all: only in builds with the `bench-no-crypto` feature, for
    /// the benchmark's no-crypto baseline.
    #[cfg(feature = "bench-no-crypto")]
    None,
}

/// Which driver to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverChoice {
    /// io_uring, falling back to recvmmsg if io_uring cannot be set up.
    Auto,
    /// io_uring only (fail if unavailable).
    Uring,
    /// recvmmsg/sendmmsg only.
    Mmsg,
}

/// I/O sizing of a worker.
#[derive(Debug, Clone)]
pub struct IoConfig {
    /// Driver choice.
    pub driver: DriverChoice,
    /// Receive operations kept in flight (each with a 64 KiB GRO buffer).
    pub recv_slots: usize,
    /// Send operations that may be in flight.
    pub send_slots: usize,
    /// Cells the worker can originate at once (exit replies).
    pub tx_cells: usize,
    /// Exit sockets (one per exit circuit).
    pub exit_sockets: usize,
    /// Setup cells given public-key work per batch.
    pub setup_budget: u32,
    /// UDP GRO on receive and GSO on send (off = one datagram per cell both ways,
    /// the per-datagram path; for debugging and as a benchmark baseline).
    pub gro_gso: bool,
    /// Send with `SENDMSG_ZC` (io_uring driver): the kernel reads cells straight
    /// from the receive buffers. Pays off with large GSO batches on a real NIC;
    /// loopback copies anyway.
    pub zero_copy_send: bool,
    /// io_uring driver: once woken by a first completion, wait up to this many
    /// microseconds for more before processing (`min_wait_usec`, Linux 6.12+), so a
    /// trickle of datagrams is handled in batches rather than one wake-up each. 0
    /// processes every completion at once.
    pub batch_wait_us: u32,
}

impl Default for IoConfig {
    fn default() -> Self {
        IoConfig {
            driver: DriverChoice::Auto,
            recv_slots: 32,
            send_slots: 256,
            tx_cells: 1024,
            exit_sockets: 1024,
            setup_budget: 16,
            gro_gso: true,
            zero_copy_send: false,
            batch_wait_us: 50,
        }
    }
}

/// Everything a worker thread needs.
#[derive(Debug)]
pub struct WorkerSpec {
    /// Worker index (0-based).
    pub index: usize,
    /// CPU to pin to, if any.
    pub cpu: Option<usize>,
    /// Bound sockets (one per listen address), all on this worker's port.
    pub sockets: Vec<UdpSocket>,
    /// Cell layout.
    pub layout: Layout,
    /// I/O sizing.
    pub io: IoConfig,
}

/// Why a worker loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Stopped by [`Control::Stop`] or the channel closing.
    Stopped,
    /// Drained: no circuits left, or the deadline passed.
    Drained,
}

/// The state shared by both drivers.
pub(crate) struct Shared<'a, A: Aead> {
    pub engine: Engine<A>,
    pub ctl: &'a Receiver<Control>,
    pub drain_deadline: Option<u64>,
}

impl<A: Aead> Shared<'_, A> {
    /// Applies pending control messages; `Some(exit)` when the loop must end.
    pub fn poll_control(&mut self, now_ms: u64) -> Option<Exit> {
        // The daemon's watchdog reads this to tell a live worker from a stuck one.
        self.engine
            .stats
            .loops
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        loop {
            match self.ctl.try_recv() {
                Ok(Control::SetPeers(p)) => self.engine.relay.set_peers(p),
                Ok(Control::SetOnionKeys(k)) => self.engine.relay.set_keyring(k),
                Ok(Control::SetAccepting(accepting)) => {
                    if self.drain_deadline.is_none() {
                        self.engine.relay.set_accepting(accepting);
                    }
                }
                Ok(Control::Drain { deadline_ms }) => {
                    self.engine.relay.set_accepting(false);
                    self.drain_deadline = Some(deadline_ms);
                }
                Ok(Control::Stop) => return Some(Exit::Stopped),
                Err(crossbeam_channel::TryRecvError::Empty) => break,
                Err(crossbeam_channel::TryRecvError::Disconnected) => return Some(Exit::Stopped),
            }
        }
        match self.drain_deadline {
            Some(d) if now_ms >= d || self.engine.relay.circuit_count() == 0 => Some(Exit::Drained),
            _ => None,
        }
    }
}

/// Starts a worker thread. Returns its handle; the thread's result says how it ended.
pub fn spawn<A: Aead>(
    spec: WorkerSpec,
    relay: Relay<A>,
    ctl: Receiver<Control>,
    stats: Arc<WorkerStats>,
) -> std::io::Result<JoinHandle<std::io::Result<Exit>>> {
    std::thread::Builder::new()
        .name(format!("shroud-worker-{}", spec.index))
        .spawn(move || {
            if let Some(cpu) = spec.cpu {
                if let Err(e) = crate::sys::pin_to_cpu(cpu) {
                    tracing::warn!(worker = spec.index, cpu, error = %e, "could not pin worker to its CPU");
                }
            }
            let mut shared = Shared {
                engine: Engine {
                    relay,
                    layout: spec.layout,
                    stats: stats.clone(),
                    setup_budget: spec.io.setup_budget,
                },
                ctl: &ctl,
                drain_deadline: None,
            };
            let want_uring = spec.io.driver != DriverChoice::Mmsg;
            if want_uring {
                match crate::uring::Driver::new(&spec) {
                    Ok(mut d) => {
                        stats.set_driver(DriverKind::Uring);
                        tracing::info!(worker = spec.index, "worker running on io_uring (UDP GRO/GSO)");
                        return d.run(&mut shared);
                    }
                    Err(e) if spec.io.driver == DriverChoice::Auto => {
                        tracing::warn!(worker = spec.index, error = %e, "io_uring unavailable: falling back to the recvmmsg/sendmmsg driver");
                    }
                    Err(e) => return Err(e),
                }
            }
            stats.set_driver(DriverKind::Mmsg);
            tracing::info!(worker = spec.index, "worker running on recvmmsg/sendmmsg (UDP GRO/GSO)");
            crate::mmsg::Driver::new(&spec)?.run(&mut shared)
        })
}

/// The local address of a worker's first socket (for logs).
pub fn first_addr(spec: &WorkerSpec) -> Option<SocketAddr> {
    spec.sockets.first().and_then(|s| s.local_addr().ok())
}
