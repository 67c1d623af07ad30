//! The operator's probe: a circuit through named relays, its setup time per prefix,
//! and round-trip times and loss of echo cells through it to a stream gateway.
//!
//! For a path `A,B,C` the probe builds one-hop `A`, two-hop `A,B` and three-hop
//! `A,B,C` circuits towards the gateway and reports each setup's round trip (a hop
//! that is not an exit answers with `REFUSED`, which still times the round trip:
//! either answer proves every hop up to it forwards). Then it sends `count` echo
//! requests ([`crate::frag::KIND_ECHO_REQUEST`], one cell each) through the full
//! circuit, spaced by `interval`, and waits up to `timeout` after the last one;
//! every reply is matched to its request by sequence number (a duplicate or unknown
//! reply is ignored). Blocking, no runtime.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use shroud_client::{Client, ClientError, PathHop};
use shroud_proto::peerlist::PeerList;

use crate::frag::{KIND_ECHO_REPLY, KIND_ECHO_REQUEST};

/// One prefix's setup.
#[derive(Debug, Clone, Serialize)]
pub struct HopReport {
    /// Hops in the prefix.
    pub hops: usize,
    /// Its last relay.
    pub relay: String,
    /// `created`, `refused <reason>` or `timeout`.
    pub outcome: String,
    /// Setup round trip in milliseconds (absent on timeout).
    pub setup_ms: Option<f64>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// Per prefix.
    pub setups: Vec<HopReport>,
    /// Echo requests sent.
    pub sent: usize,
    /// Replies received.
    pub received: usize,
    /// Lost fraction (0..=1).
    pub loss: f64,
    /// Round trips in milliseconds: min, median, p90, max (absent without replies).
    pub rtt_ms: Option<[f64; 4]>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs the probe (see the module docs).
pub fn probe(
    list: &PeerList,
    bind: SocketAddr,
    path: &[PathHop],
    gateway: SocketAddr,
    count: usize,
    interval: Duration,
    timeout: Duration,
) -> Result<ProbeReport, ClientError> {
    let mut setups = Vec::new();
    let mut client = Client::new(bind, list)?;
    let mut full = None;
    for k in 1..=path.len() {
        let t0 = Instant::now();
        let r = client.build_circuit(&path[..k], gateway, timeout);
        let took = t0.elapsed();
        let (outcome, setup_ms) = match &r {
            Ok(_) => ("created".to_owned(), Some(ms(took))),
            Err(ClientError::Refused { reason_name, .. }) => {
                (format!("refused {reason_name}"), Some(ms(took)))
            }
            Err(ClientError::SetupTimeout { .. }) => ("timeout".to_owned(), None),
            Err(e) => (format!("error: {e}"), None),
        };
        setups.push(HopReport {
            hops: k,
            relay: path[k - 1].id.to_string(),
            outcome,
            setup_ms,
        });
        match r {
            Ok(id) if k == path.len() => full = Some(id),
            Ok(id) => {
                let _ = client.destroy(id);
            }
            Err(_) => {}
        }
    }
    let Some(id) = full else {
        return Ok(ProbeReport {
            setups,
            sent: 0,
            received: 0,
            loss: 1.0,
            rtt_ms: None,
        });
    };
    let max = client.payload_max();
    let mut sent_at: Vec<Option<Instant>> = vec![None; count];
    let mut rtts: Vec<Duration> = Vec::new();
    let mut seen = vec![false; count];
    let mut next_send = Instant::now();
    let mut seq = 0usize;
    let mut last_sent = Instant::now();
    let mut buf = vec![0u8; max];
    loop {
        let now = Instant::now();
        if seq < count && now >= next_send {
            let mut req = vec![0u8; 64.min(max)];
            req[0] = KIND_ECHO_REQUEST;
            req[1..9].copy_from_slice(&(seq as u64).to_be_bytes());
            client.send(id, &req)?;
            sent_at[seq] = Some(Instant::now());
            last_sent = Instant::now();
            seq += 1;
            next_send = now + interval;
        }
        if seq == count && (rtts.len() == count || last_sent.elapsed() >= timeout) {
            break;
        }
        let wait = if seq < count {
            next_send.saturating_duration_since(Instant::now())
        } else {
            timeout.saturating_sub(last_sent.elapsed())
        }
        .max(Duration::from_millis(1));
        match client.recv_into(&mut buf, wait) {
            Ok((c, n)) if c == id && n >= 9 && buf[0] == KIND_ECHO_REPLY => {
                let s = u64::from_be_bytes(buf[1..9].try_into().unwrap_or([0xff; 8]));
                if let Some(i) = usize::try_from(s).ok().filter(|&i| i < count) {
                    if let (Some(t), false) = (sent_at[i], seen[i]) {
                        seen[i] = true;
                        rtts.push(t.elapsed());
                    }
                }
            }
            Ok(_) | Err(ClientError::Timeout) => {}
            Err(e) => return Err(e),
        }
    }
    let _ = client.destroy(id);
    rtts.sort();
    let pick = |q: f64| ms(rtts[((rtts.len() - 1) as f64 * q).round() as usize]);
    let rtt_ms = (!rtts.is_empty()).then(|| [pick(0.0), pick(0.5), pick(0.9), pick(1.0)]);
    Ok(ProbeReport {
        setups,
        sent: count,
        received: rtts.len(),
        loss: if count == 0 {
            0.0
        } else {
            1.0 - rtts.len() as f64 / count as f64
        },
        rtt_ms,
    })
}

impl std::fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "hops  relay                             setup      outcome"
        )?;
        for s in &self.setups {
            let t = s
                .setup_ms
                .map_or_else(|| "-".to_owned(), |m| format!("{m:.2} ms"));
            writeln!(f, "{:<5} {} {:<10} {}", s.hops, s.relay, t, s.outcome)?;
        }
        write!(
            f,
            "echo: {} sent, {} received, {:.1}% loss",
            self.sent,
            self.received,
            self.loss * 100.0
        )?;
        if let Some([min, med, p90, max]) = self.rtt_ms {
            write!(
                f,
                "; rtt min/median/p90/max {min:.3}/{med:.3}/{p90:.3}/{max:.3} ms"
            )?;
        }
        writeln!(f)
    }
}
