//! What a worker is made of: its sockets, layout and I/O sizing, and the choices of
//! crypto backend and I/O driver. Plain data, read by the worker launcher and the
//! drivers.

use std::net::UdpSocket;

use shroud_proto::Layout;

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
    /// io_uring driver: while small datagrams come in (see `Engine::gather`), a wait
    /// gathers completions for up to this many microseconds (`min_wait_usec`, Linux
    /// 6.12+), so a trickle of them is handled in batches rather than one wake-up each.
    /// 0 never gathers.
    pub batch_wait_us: u32,
    /// Mix mode: cells the worker can hold for their delay (0: no mix mode). The
    /// transmit arena holds them, on top of `tx_cells`.
    pub mix_queue: usize,
    /// Constant-rate links: cells a second every peer link that carries circuits is
    /// padded to (0: off).
    pub link_cells_per_sec: u32,
    /// SO_RCVBUF/SO_SNDBUF asked for exit sockets (`[network] socket_buffer_bytes`;
    /// 0: the kernel's default).
    pub socket_buffer_bytes: usize,
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
            mix_queue: 0,
            link_cells_per_sec: 0,
            socket_buffer_bytes: 0,
        }
    }
}

impl WorkerSpec {
    /// The addresses the worker's sockets are bound to (exit sockets bind the first of
    /// the destination's family, so exit traffic leaves from the relay's address).
    pub fn local_ips(&self) -> Vec<std::net::IpAddr> {
        self.sockets
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .map(|a| a.ip())
            .collect()
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
