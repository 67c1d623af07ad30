//! Prometheus text exposition of the relay's counters on `GET /metrics`, served by
//! its own thread off the data path (127.0.0.1 by default in deploy/relay.toml).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::stats::WorkerStats;

/// Serves Prometheus text on `GET /metrics`.
pub fn serve_metrics(addr: SocketAddr, stats: Vec<(u16, Arc<WorkerStats>)>) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot bind metrics on {addr}"))?;
    std::thread::Builder::new()
        .name("shroud-metrics".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = metrics_conn(conn, &stats);
            }
        })?;
    Ok(())
}

fn metrics_conn(
    mut conn: std::net::TcpStream,
    stats: &[(u16, Arc<WorkerStats>)],
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let body = if request.starts_with("GET /metrics") {
        render_metrics(stats)
    } else {
        let msg = "not found: try /metrics\n";
        write!(conn, "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{msg}", msg.len())?;
        return Ok(());
    };
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The Prometheus text exposition of the worker counters.
pub fn render_metrics(stats: &[(u16, Arc<WorkerStats>)]) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let snaps: Vec<_> = stats.iter().map(|(p, s)| (p, s.snapshot())).collect();
    let mut family =
        |name: &str,
         kind: &str,
         help: &str,
         f: &dyn Fn(&crate::stats::StatsSnapshot) -> Vec<(String, u64)>| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (i, (port, s)) in snaps.iter().enumerate() {
                for (labels, v) in f(s) {
                    let sep = if labels.is_empty() { "" } else { "," };
                    let _ = writeln!(
                        o,
                        "{name}{{worker=\"{i}\",port=\"{port}\"{sep}{labels}}} {v}"
                    );
                }
            }
        };
    family(
        "shroud_cells_total",
        "counter",
        "Cells received (rx) and sent (tx) on relay sockets.",
        &|s| {
            vec![
                ("direction=\"rx\"".into(), s.cells_rx),
                ("direction=\"tx\"".into(), s.cells_tx),
            ]
        },
    );
    family(
        "shroud_datagrams_total",
        "counter",
        "UDP datagrams received (rx) and sent (tx); a GSO send counts once.",
        &|s| {
            vec![
                ("direction=\"rx\"".into(), s.datagrams_rx),
                ("direction=\"tx\"".into(), s.datagrams_tx),
            ]
        },
    );
    family(
        "shroud_circuit_cells_total",
        "counter",
        "Cells processed per circuit direction.",
        &|s| {
            vec![
                ("direction=\"forward\"".into(), s.cells_forward),
                ("direction=\"backward\"".into(), s.cells_backward),
            ]
        },
    );
    family(
        "shroud_exit_datagrams_total",
        "counter",
        "Datagrams delivered to exit destinations (out) and received from them (in).",
        &|s| {
            vec![
                ("direction=\"out\"".into(), s.exit_delivered),
                ("direction=\"in\"".into(), s.exit_replies),
            ]
        },
    );
    family(
        "shroud_drops_total",
        "counter",
        "Cells dropped, by reason.",
        &|s| {
            s.drops
                .iter()
                .map(|(r, v)| (format!("reason=\"{r}\""), *v))
                .collect()
        },
    );
    family(
        "shroud_setups_total",
        "counter",
        "Circuit setups accepted.",
        &|s| vec![(String::new(), s.setups)],
    );
    family("shroud_circuits", "gauge", "Live circuits.", &|s| {
        vec![(String::new(), s.circuits)]
    });
    family(
        "shroud_send_errors_total",
        "counter",
        "Send operations the kernel failed.",
        &|s| vec![(String::new(), s.send_errors)],
    );
    family(
        "shroud_driver_info",
        "gauge",
        "The I/O driver a worker runs (1 for the active one).",
        &|s| vec![(format!("driver=\"{}\"", s.driver), 1)],
    );
    o
}
