//! Several hosts: three relays and the client (with the echo destination) each in a
//! network namespace of its own, with its own address on a shared bridge, so that
//! nothing depends on every process sharing one loopback. A 3-hop circuit crosses
//! all four namespaces both ways.
//!
//! Needs root and `ip` (iproute2): otherwise it says SKIPPED and passes. Addresses:
//! 10.231.80.0/24 (relays .1 to .3, client .100), on a bridge in a fourth "hub"
//! namespace; every namespace is removed at the end, also when the test fails.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use shroud_client::{udp_echo_server, Client};
use shroud_tests::{NetOpts, TestNet};

const T: Duration = Duration::from_secs(5);

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Namespaces `<prefix>-hub` (with bridge `br0`) and one per host, each host with
/// `eth0` on the bridge; deleted on drop.
struct Hosts {
    names: Vec<String>,
}

impl Hosts {
    fn create(prefix: &str, hosts: &[(&str, Ipv4Addr)]) -> Result<Hosts, String> {
        let hub = format!("{prefix}-hub");
        let mut me = Hosts {
            names: vec![hub.clone()],
        };
        // Left over by an earlier run that was killed.
        let _ = ip(&["netns", "del", &hub]);
        ip(&["netns", "add", &hub])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        for (i, (name, addr)) in hosts.iter().enumerate() {
            let ns = format!("{prefix}-{name}");
            let _ = ip(&["netns", "del", &ns]);
            ip(&["netns", "add", &ns])?;
            me.names.push(ns.clone());
            let port = format!("p{i}");
            ip(&[
                "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &hub, "link", "set", &port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(me)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for n in self.names.iter().rev() {
            let _ = ip(&["netns", "del", n]);
        }
    }
}

/// Moves the calling thread (only) into network namespace `name`.
fn enter(name: &str) -> Result<(), String> {
    let f = std::fs::File::open(format!("/run/netns/{name}"))
        .map_err(|e| format!("/run/netns/{name}: {e}"))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("setns {name}: {e}"))
}

#[test]
fn a_three_hop_circuit_crosses_four_network_namespaces() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: needs root to create network namespaces");
        return;
    }
    let net_of = |last: u8| Ipv4Addr::new(10, 231, 80, last);
    let prefix = format!("shroud{}", std::process::id() % 100_000);
    let hosts = match Hosts::create(
        &prefix,
        &[
            ("r0", net_of(1)),
            ("r1", net_of(2)),
            ("r2", net_of(3)),
            ("client", net_of(100)),
        ],
    ) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("SKIPPED: cannot build the namespaces here: {e}");
            return;
        }
    };
    let mut opts = NetOpts::new(80, 3);
    opts.addrs = (1..=3).map(|i| IpAddr::V4(net_of(i))).collect();
    opts.launchers = (0..3)
        .map(|i| {
            ["ip", "netns", "exec", &format!("{prefix}-r{i}")]
                .map(String::from)
                .to_vec()
        })
        .collect();
    // The echo destination is in the client's namespace, on the bridge's network:
    // not a global address, so the exit must name its block.
    opts.exit_policy = vec!["accept 10.231.80.0/24:*".into()];
    let net = TestNet::start(opts);

    // The relays really are elsewhere: this namespace cannot reach their addresses.
    assert!(
        std::net::UdpSocket::bind(SocketAddr::new(IpAddr::V4(net_of(1)), 0)).is_err(),
        "10.231.80.1 is an address of the test's own namespace"
    );

    // The client side runs on a thread that has entered the client's namespace.
    let list = net.list.clone();
    let path = net.path(&[0, 1, 2]);
    let client_ns = format!("{prefix}-client");
    let delivered = std::thread::spawn(move || -> Result<u64, String> {
        enter(&client_ns)?;
        let (dest, echo) = udp_echo_server(SocketAddr::new(IpAddr::V4(net_of(100)), 0))
            .map_err(|e| format!("echo server: {e}"))?;
        let mut c = Client::new(SocketAddr::new(IpAddr::V4(net_of(100)), 0), &list)
            .map_err(|e| format!("client: {e}"))?;
        let id = c
            .build_circuit(&path, dest, T)
            .map_err(|e| format!("3-hop circuit: {e}"))?;
        for k in 0..20u8 {
            let payload: Vec<u8> = (0..200).map(|i| (i as u8) ^ k).collect();
            c.send(id, &payload).map_err(|e| format!("send: {e}"))?;
            let (got_id, got) = c.recv(T).map_err(|e| format!("reply {k}: {e}"))?;
            if got_id != id || got != payload {
                return Err(format!("reply {k} differs"));
            }
        }
        Ok(echo.datagrams())
    })
    .join()
    .expect("client thread");
    let delivered = delivered.unwrap_or_else(|e| {
        panic!(
            "{e}\nrelay 0:\n{}\nrelay 1:\n{}\nrelay 2:\n{}",
            net.log(0),
            net.log(1),
            net.log(2)
        )
    });
    assert_eq!(delivered, 20);
    // Every relay forwarded the circuit's cells through its own interface.
    for i in 0..3 {
        let s = net.admin(i, json!({"cmd": "status"}));
        let w = &s["result"]["workers"][0]["stats"];
        assert!(w["cells_rx"].as_u64().unwrap_or(0) >= 21, "relay {i}: {s}");
        assert_eq!(s["result"]["drops"]["bad_tag"], 0, "relay {i}: {s}");
        assert_eq!(s["result"]["drops"]["malformed"], 0, "relay {i}: {s}");
    }
    drop(net);
    drop(hosts);
}
