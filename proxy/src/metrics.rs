//! Prometheus text endpoints of the proxy and the gateway (`[proxy] metrics`,
//! `[gateway] metrics`; off unless set).
//!
//! `GET /metrics` answers the counters in the Prometheus text format (0.0.4); any
//! other path is 404, any other method 405. The endpoint serves at most
//! [`MAX_CONNECTIONS`] connections at once, each for at most 30 s, with a 5 s limit on
//! reading the request head, so a slow or flooding scraper costs a bounded amount.
//! Bind it to loopback or a management address: it has no authentication. The server
//! is `shroud-httpd`, the relay's too.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context as _;

use crate::gateway::GatewayStats;
use crate::pool::PoolStats;
use crate::socks::SocksStats;

/// Connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 16;

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Appends one metric family: its help, type and samples (`labels`, value).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

fn one(v: u64) -> [(String, u64); 1] {
    [(String::new(), v)]
}

/// Per-code samples (`{code="N"}`) of a 9-entry SOCKS code table.
fn per_code(a: &[AtomicU64; 9]) -> Vec<(String, u64)> {
    a.iter()
        .enumerate()
        .map(|(c, v)| (format!("{{code=\"{c}\"}}"), load(v)))
        .collect()
}

/// The proxy's metrics: SOCKS front end and circuit pool. `relays_avoided` is the
/// number of relays currently left out of paths.
pub fn proxy_text(s: &SocksStats, p: &PoolStats, relays_avoided: usize) -> String {
    let mut o = String::new();
    let c = "counter";
    family(
        &mut o,
        "shroud_proxy_connections_total",
        c,
        "SOCKS connections accepted.",
        &one(load(&s.connections)),
    );
    family(
        &mut o,
        "shroud_proxy_bad_input_total",
        c,
        "SOCKS connections closed for malformed or unsupported input.",
        &one(load(&s.bad_input)),
    );
    family(&mut o, "shroud_proxy_socks_replies_total", c, "SOCKS replies sent, by reply code (RFC 1928: 0 succeeded, 2 not allowed by the exit policy, 4 host unreachable, 5 refused, 6 TTL expired, 1 general failure).", &per_code(&s.replies));
    family(
        &mut o,
        "shroud_proxy_udp_datagrams_total",
        c,
        "UDP ASSOCIATE datagrams relayed, by direction (out: toward the network).",
        &[
            ("{direction=\"out\"}".into(), load(&s.udp_out)),
            ("{direction=\"in\"}".into(), load(&s.udp_in)),
        ],
    );
    family(
        &mut o,
        "shroud_proxy_udp_dropped_total",
        c,
        "UDP ASSOCIATE datagrams dropped (malformed, fragmented, no circuit, full queue).",
        &one(load(&s.udp_dropped)),
    );
    family(
        &mut o,
        "shroud_proxy_circuits_built_total",
        c,
        "Circuits built.",
        &one(load(&p.built)),
    );
    family(
        &mut o,
        "shroud_proxy_circuit_build_failures_total",
        c,
        "Circuit builds that failed.",
        &one(load(&p.build_failures)),
    );
    family(
        &mut o,
        "shroud_proxy_circuits_died_total",
        c,
        "Circuits torn down by a hop or idle without an answer.",
        &one(load(&p.died)),
    );
    family(
        &mut o,
        "shroud_proxy_relays_found_dead_total",
        c,
        "Relays that did not answer a check after a circuit through them died.",
        &one(load(&p.relays_dead)),
    );
    family(
        &mut o,
        "shroud_proxy_relays_avoided",
        "gauge",
        "Relays currently left out of paths.",
        &one(relays_avoided as u64),
    );
    o
}

/// The gateway's metrics.
pub fn gateway_text(s: &GatewayStats) -> String {
    let mut o = String::new();
    let c = "counter";
    family(
        &mut o,
        "shroud_gateway_streams_total",
        c,
        "Streams accepted.",
        &one(load(&s.streams)),
    );
    family(
        &mut o,
        "shroud_gateway_stream_status_total",
        c,
        "Streams answered, by status code (the SOCKS reply codes).",
        &per_code(&s.status),
    );
    family(
        &mut o,
        "shroud_gateway_echoes_total",
        c,
        "Probe echo requests answered.",
        &one(load(&s.echoes)),
    );
    o
}

fn route(
    req: &shroud_httpd::Request,
    render: &(dyn Fn() -> String + Send + Sync),
) -> hyper::Response<shroud_httpd::Body> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.uri().path() != "/metrics" {
        shroud_httpd::reply(404, TEXT, "not found: GET /metrics\n".to_owned())
    } else if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        shroud_httpd::reply(405, TEXT, "method not allowed: GET /metrics\n".to_owned())
    } else {
        shroud_httpd::reply(200, "text/plain; version=0.0.4; charset=utf-8", render())
    }
}

/// Binds `addr` and serves `render` at `/metrics` on the current tokio runtime
/// (shroud-httpd: bounded connections and time limits); returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind metrics on {addr}"))?;
    let bound = listener.local_addr()?;
    let handler: shroud_httpd::Handler =
        Arc::new(move |req: &shroud_httpd::Request| route(req, &*render));
    tokio::spawn(shroud_httpd::serve(listener, MAX_CONNECTIONS, handler));
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_text_is_prometheus_and_carries_every_counter() {
        let s = SocksStats::default();
        s.connections.store(5, Ordering::Relaxed);
        s.replies[2].store(3, Ordering::Relaxed);
        s.udp_in.store(7, Ordering::Relaxed);
        let p = PoolStats::default();
        p.built.store(4, Ordering::Relaxed);
        let t = proxy_text(&s, &p, 1);
        for line in [
            "shroud_proxy_connections_total 5",
            "shroud_proxy_socks_replies_total{code=\"2\"} 3",
            "shroud_proxy_socks_replies_total{code=\"0\"} 0",
            "shroud_proxy_udp_datagrams_total{direction=\"in\"} 7",
            "shroud_proxy_circuits_built_total 4",
            "shroud_proxy_relays_avoided 1",
        ] {
            assert!(t.lines().any(|l| l == line), "{line} missing in\n{t}");
        }
        // Every sample line belongs to a family declared just before it.
        let mut declared = Vec::new();
        for l in t.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                declared.push(rest.split(' ').next().unwrap().to_owned());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                assert_eq!(declared.last().map(String::as_str), Some(name), "{l}");
                let v = l.rsplit(' ').next().unwrap();
                assert!(v.parse::<u64>().is_ok(), "{l}");
            }
        }
        let g = GatewayStats::default();
        g.status[0].store(9, Ordering::Relaxed);
        assert!(gateway_text(&g)
            .lines()
            .any(|l| l == "shroud_gateway_stream_status_total{code=\"0\"} 9"));
    }
}
