//! A wire-like path for `shroud-bench relay`: two network namespaces joined by a veth
//! pair, so that cells cross a network device as single frames, as from a NIC.
//!
//! Loopback never splits a GSO send and hands the receiver whole runs of cells, which
//! flatters every UDP path. Here:
//!
//! - the generator and the sink live in namespace `g` (`10.251.0.1`), the forwarder
//!   under test (a relay, or the bare forwarder) in namespace `f` (`10.251.0.2`, and
//!   `10.251.0.<10+k>` for the k-th variant);
//! - the generator's device may send at most one segment per frame (`gso_max_segs 1`:
//!   the kernel segments every GSO send before the device, as for a NIC without
//!   segmentation offload), so the forwarder receives single 1066-byte frames;
//! - both devices receive through NAPI (GRO on, TSO off, without which a veth
//!   receives on the sending CPU) in threaded mode, and the receiving
//!   device's NAPI thread is pinned to the forwarder's core (as a NIC's interrupt would
//!   be), so the kernel's receive work for the forwarder is paid on, and counted
//!   against, the forwarder's core; the sink side's NAPI thread runs on the other cores.
//!   GRO then coalesces only what arrives within one NAPI poll, as on a NIC.
//!
//! The forwarder's own sends keep the device's UDP segmentation (as a NIC with UDP
//! segmentation offload). Needs root and `ip` (iproute2); everything is removed on drop.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;

use anyhow::{bail, Context};
use nix::sched::{setns, CloneFlags};

/// The generator and sink side's address.
pub const GEN_ADDR: Ipv4Addr = Ipv4Addr::new(10, 251, 0, 1);
/// The forwarder side's first address (each variant adds one of its own).
pub const FWD_ADDR: Ipv4Addr = Ipv4Addr::new(10, 251, 0, 2);

/// Two namespaces and the veth pair between them (removed on drop).
#[derive(Debug)]
pub struct VethPair {
    /// Namespace of the generator and the sink.
    pub gen_ns: String,
    /// Namespace of the forwarder under test.
    pub fwd_ns: String,
    /// The generator side's device.
    pub gen_dev: String,
    /// The forwarder side's device.
    pub fwd_dev: String,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `f` on a thread that has entered network namespace `ns`: sockets it creates
/// belong to that namespace for their whole life.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> io::Result<T> + Send) -> anyhow::Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(move || -> io::Result<T> {
            let file = File::open(&path)?;
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread in namespace {ns} panicked"))?
        .with_context(|| format!("in network namespace {ns}"))
    })
}

/// `ETHTOOL_SGRO`: GRO (and with it a veth's NAPI) on or off.
const ETHTOOL_SGRO: u32 = 0x2c;
/// `ETHTOOL_STSO`: TCP segmentation offload on or off.
const ETHTOOL_STSO: u32 = 0x1f;

/// One legacy ethtool "set" command through `SIOCETHTOOL`.
fn ethtool_set(dev: &str, cmd: u32, on: bool) -> io::Result<()> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    let mut value = EthtoolValue {
        cmd,
        data: u32::from(on),
    };
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    // SAFETY: all-zero is a valid ifreq.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if dev.len() >= req.ifr_name.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(dev.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: SIOCETHTOOL reads the NUL-terminated name and the ethtool_value that
    // ifru_data points to; both live on this stack frame for the whole call.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Thread ids of the NAPI threads of device `dev` (threaded NAPI).
fn napi_threads(dev: &str) -> Vec<i32> {
    let prefix = format!("napi/{dev}-");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
            if comm.trim_end().starts_with(&prefix) {
                out.push(pid);
            }
        }
    }
    out
}

fn pin(tid: i32, cpus: &[usize]) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    for &c in cpus {
        set.set(c)?;
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set)
        .with_context(|| format!("pinning NAPI thread {tid}"))
}

impl VethPair {
    /// Creates the namespaces and the pair; the forwarder side's NAPI thread runs on
    /// `fwd_cpus`, the generator side's on `gen_cpus`.
    pub fn create(fwd_cpus: &[usize], gen_cpus: &[usize]) -> anyhow::Result<VethPair> {
        let id = std::process::id();
        let pair = VethPair {
            gen_ns: format!("shb{id}g"),
            fwd_ns: format!("shb{id}f"),
            gen_dev: format!("shb{id}g"),
            fwd_dev: format!("shb{id}f"),
        };
        let gen_dev = pair.gen_dev.clone();
        ip(&["netns", "add", &pair.gen_ns])?;
        ip(&["netns", "add", &pair.fwd_ns])?;
        ip(&[
            "link",
            "add",
            &gen_dev,
            "netns",
            &pair.gen_ns,
            "type",
            "veth",
            "peer",
            "name",
            &pair.fwd_dev,
            "netns",
            &pair.fwd_ns,
        ])?;
        for (ns, dev, addr) in [
            (&pair.gen_ns, &gen_dev, GEN_ADDR),
            (&pair.fwd_ns, &pair.fwd_dev, FWD_ADDR),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            // A veth hands a frame to the peer's NAPI only if the sending device has
            // no TSO (or the receiver forwards UDP GRO); otherwise the frame is
            // received on the sending CPU, and the receive work lands on the wrong
            // core. GRO on gives the device its NAPI.
            let d = dev.clone();
            in_netns(ns, move || {
                ethtool_set(&d, ETHTOOL_STSO, false)?;
                ethtool_set(&d, ETHTOOL_SGRO, true)
            })?;
            // sysfs shows the namespace's devices only to a process inside it.
            ip(&[
                "netns",
                "exec",
                ns,
                "sh",
                "-c",
                &format!("echo 1 > /sys/class/net/{dev}/threaded"),
            ])?;
        }
        // Single frames from the generator: the kernel segments before the device.
        ip(&[
            "-n",
            &pair.gen_ns,
            "link",
            "set",
            "dev",
            &gen_dev,
            "gso_max_segs",
            "1",
        ])?;
        let fwd_napi = napi_threads(&pair.fwd_dev);
        let gen_napi = napi_threads(&gen_dev);
        if fwd_napi.is_empty() || gen_napi.is_empty() {
            bail!("no NAPI threads for the veth pair (threaded NAPI unavailable?)");
        }
        for t in fwd_napi {
            pin(t, fwd_cpus)?;
        }
        if !gen_cpus.is_empty() {
            for t in gen_napi {
                pin(t, gen_cpus)?;
            }
        }
        Ok(pair)
    }

    /// Adds `10.251.0.<10 + k>` to the forwarder's device and returns it.
    pub fn add_fwd_addr(&self, k: u8) -> anyhow::Result<Ipv4Addr> {
        let a = Ipv4Addr::new(10, 251, 0, 10u8.saturating_add(k));
        ip(&[
            "-n",
            &self.fwd_ns,
            "addr",
            "add",
            &format!("{a}/24"),
            "dev",
            &self.fwd_dev,
        ])?;
        Ok(a)
    }

    /// The command prefix that runs a program in the forwarder's namespace.
    pub fn launcher(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.fwd_ns]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// CPU seconds the forwarder side's NAPI threads have used so far: the kernel's
    /// receive work for the forwarder.
    pub fn fwd_napi_cpu_seconds(&self) -> f64 {
        napi_threads(&self.fwd_dev)
            .into_iter()
            .map(|t| shroud_localnet::cpu_seconds(t as u32))
            .sum()
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Deleting a namespace destroys the veth end in it, and with it the pair.
        let _ = ip(&["netns", "del", &self.fwd_ns]);
        let _ = ip(&["netns", "del", &self.gen_ns]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddr, UdpSocket};
    use std::time::Duration;

    /// Frames the device `dev` in namespace `ns` has sent.
    fn tx_packets(ns: &str, dev: &str) -> u64 {
        let out = Command::new("ip")
            .args(["-n", ns, "-s", "-j", "link", "show", "dev", dev])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0]["stats64"]["tx"]["packets"].as_u64().unwrap()
    }

    #[test]
    fn a_gso_run_crosses_the_pair_as_single_frames_and_the_pair_is_removed() {
        if !nix::unistd::geteuid().is_root() || Command::new("ip").arg("-V").output().is_err() {
            eprintln!("skipped: needs root and iproute2");
            return;
        }
        let pair = VethPair::create(&[0], &[0]).unwrap();
        let fwd = pair.add_fwd_addr(0).unwrap();
        let rx = in_netns(&pair.fwd_ns, move || {
            UdpSocket::bind(SocketAddr::from((fwd, 9000)))
        })
        .unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let tx = in_netns(&pair.gen_ns, || {
            UdpSocket::bind(SocketAddr::from((GEN_ADDR, 0)))
        })
        .unwrap();
        let gen_dev = pair.gen_dev.clone();
        let before = tx_packets(&pair.gen_ns, &gen_dev);
        let cells = vec![7u8; 16 * 1024];
        shroud_client::udp::send_segments(&tx, &cells, 1024, SocketAddr::from((fwd, 9000)))
            .unwrap();
        let mut got = 0;
        let mut buf = vec![0u8; 2048];
        while got < 16 {
            let (n, from) = rx.recv_from(&mut buf).unwrap();
            assert_eq!((n, from.ip()), (1024, std::net::IpAddr::V4(GEN_ADDR)));
            got += 1;
        }
        // One GSO send left the generator's device as (at least) 16 frames.
        assert!(tx_packets(&pair.gen_ns, &gen_dev) - before >= 16);
        let names = (pair.gen_ns.clone(), pair.fwd_ns.clone());
        drop((rx, tx, pair));
        let list = String::from_utf8(
            Command::new("ip")
                .args(["netns", "list"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        assert!(
            !list.contains(&names.0) && !list.contains(&names.1),
            "{list}"
        );
    }
}
