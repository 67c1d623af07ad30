//! A UDP echo server on a thread: every datagram goes back, unchanged, to its sender.
//!
//! Used as the destination behind an exit in tests and demos. Invariants: the thread
//! owns the socket and answers until [`EchoHandle::stop`] is called or the handle is
//! dropped, and both return only after the thread has exited (so the port is free
//! again); [`EchoHandle::datagrams`] counts every datagram received, echoed or not.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the echo thread checks whether it should stop.
const POLL: Duration = Duration::from_millis(20);

/// Controls a running [`udp_echo_server`]. Dropping it stops the server.
#[derive(Debug)]
pub struct EchoHandle {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl EchoHandle {
    /// Datagrams received so far.
    pub fn datagrams(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Stops the server and waits for its thread; returns the datagrams received.
    pub fn stop(mut self) -> u64 {
        self.shutdown();
        self.datagrams()
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // The thread only loops on recv/send; a panic there is not ours to re-raise
            // from a destructor.
            let _ = t.join();
        }
    }
}

impl Drop for EchoHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Binds `bind` and echoes every datagram back to its sender from a new thread.
/// Returns the bound address (useful with port 0) and the handle that stops it.
pub fn udp_echo_server(bind: SocketAddr) -> io::Result<(SocketAddr, EchoHandle)> {
    let socket = UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(POLL))?;
    let addr = socket.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let thread = {
        let stop = Arc::clone(&stop);
        let count = Arc::clone(&count);
        std::thread::Builder::new()
            .name(format!("udp-echo-{addr}"))
            .spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    match socket.recv_from(&mut buf) {
                        Ok((n, from)) => {
                            count.fetch_add(1, Ordering::Relaxed);
                            // Best effort, like any UDP service: a failed echo is a
                            // lost datagram.
                            let _ = socket.send_to(&buf[..n], from);
                        }
                        // Timeouts: time to check `stop`.
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                            ) => {}
                        // ICMP errors from earlier sends and the like: keep serving, but
                        // never spin on a persistent error.
                        Err(_) => std::thread::sleep(Duration::from_millis(1)),
                    }
                }
            })?
    };
    Ok((
        addr,
        EchoHandle {
            stop,
            count,
            thread: Some(thread),
        },
    ))
}
