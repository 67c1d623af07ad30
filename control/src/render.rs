//! Human and machine renderings of a peer list.
//!
//! - [`relay_table`]: the `peers list` table, one relay per line;
//! - [`ListJson`]: the `peers list --json` document (stable field names, numbers as
//!   JSON numbers, keys as base64 strings, times as Unix seconds);
//! - [`show`]: the `peers show` dump: parameters, validity as dates and relative
//!   times, every relay, every signature and whether it verifies.
//!
//! Only public keys are ever rendered. `now` is an argument.

use std::fmt::Write as _;

use serde::Serialize;
use shroud_proto::peerlist::{PeerList, RelayDescriptor};

use crate::check::check_signatures;
use crate::time::{format_date_relative, format_relative};

/// The `peers list --json` document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListJson {
    /// Serial number.
    pub serial: u64,
    /// Start of validity, Unix seconds (inclusive).
    pub valid_after: u64,
    /// End of validity, Unix seconds (exclusive).
    pub valid_until: u64,
    /// Network parameters.
    pub params: ParamsJson,
    /// Signers' identity keys (base64), in document order; not checked.
    pub signers: Vec<String>,
    /// Relays in document order (sorted by identity key).
    pub relays: Vec<RelayJson>,
}

/// Network parameters in [`ListJson`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ParamsJson {
    /// Cell size in bytes.
    pub cell: u16,
    /// Maximum hops per circuit.
    pub h_max: u8,
}

/// One relay in [`ListJson`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RelayJson {
    /// Relay id, 32 hex digits.
    pub relay_id: String,
    /// Identity public key, base64.
    pub identity: String,
    /// IP address.
    pub addr: String,
    /// First listening port.
    pub port_first: u16,
    /// Last listening port (inclusive).
    pub port_last: u16,
    /// Whether the relay may be an exit.
    pub exit: bool,
    /// Selection weight.
    pub weight: u32,
    /// Onion keys, sorted by expiry.
    pub onion_keys: Vec<OnionKeyJson>,
}

/// One onion key in [`RelayJson`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OnionKeyJson {
    /// x25519 public key, base64.
    pub key: String,
    /// Unix seconds after which the key must not be used.
    pub valid_until: u64,
}

impl ListJson {
    /// The JSON view of `list`.
    pub fn new(list: &PeerList) -> Self {
        Self {
            serial: list.serial,
            valid_after: list.valid_after,
            valid_until: list.valid_until,
            params: ParamsJson {
                cell: list.params.cell,
                h_max: list.params.h_max,
            },
            signers: list
                .signatures
                .iter()
                .map(|s| s.signer.to_string())
                .collect(),
            relays: list
                .relays
                .iter()
                .map(|r| RelayJson {
                    relay_id: r.relay_id().to_string(),
                    identity: r.identity.to_string(),
                    addr: r.addr.to_string(),
                    port_first: r.ports.0,
                    port_last: r.ports.1,
                    exit: r.exit,
                    weight: r.weight,
                    onion_keys: r
                        .onion_keys
                        .iter()
                        .map(|k| OnionKeyJson {
                            key: k.key.to_string(),
                            valid_until: k.valid_until,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

fn ports(r: &RelayDescriptor) -> String {
    format!("{}-{}", r.ports.0, r.ports.1)
}

/// The latest onion-key expiry of a relay: when it runs out of keys.
fn last_onion_expiry(r: &RelayDescriptor) -> Option<u64> {
    r.onion_keys.iter().map(|k| k.valid_until).max()
}

/// The `peers list` table: relay id, address, ports, exit, weight, onion keys and
/// the expiry of the last one (date and relative to `now`). Ends with `"\n"`.
pub fn relay_table(list: &PeerList, now: u64) -> String {
    let header = [
        "RELAY ID",
        "ADDRESS",
        "PORTS",
        "EXIT",
        "WEIGHT",
        "ONION KEYS",
        "LAST ONION KEY EXPIRES",
    ];
    let rows: Vec<[String; 7]> = list
        .relays
        .iter()
        .map(|r| {
            [
                r.relay_id().to_string(),
                r.addr.to_string(),
                ports(r),
                if r.exit { "yes" } else { "no" }.to_owned(),
                r.weight.to_string(),
                r.onion_keys.len().to_string(),
                last_onion_expiry(r).map_or_else(String::new, |t| format_date_relative(t, now)),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    if rows.is_empty() {
        out.push_str("(no relays)\n");
    }
    out
}

/// The `peers show` dump of `list` (read from `source`, a name to print), at `now`.
///
/// Lists the header fields, the validity window as dates and relative times with a
/// one-word status, every relay with its onion keys, and every signature with its
/// signer's key and relay id and whether it verifies over the current body. Does
/// not judge trust: that needs a policy (`peers verify`).
pub fn show(list: &PeerList, source: &str, now: u64) -> String {
    let mut o = String::new();
    let status = if now < list.valid_after {
        format!(
            "NOT YET VALID (becomes valid {})",
            format_relative(list.valid_after, now)
        )
    } else if now >= list.valid_until {
        format!("EXPIRED ({})", format_relative(list.valid_until, now))
    } else {
        format!(
            "current (expires {})",
            format_relative(list.valid_until, now)
        )
    };
    let exits = list.relays.iter().filter(|r| r.exit).count();
    let _ = writeln!(o, "peer list {source}");
    let _ = writeln!(o, "  version      {}", list.version);
    let _ = writeln!(o, "  serial       {}", list.serial);
    let _ = writeln!(
        o,
        "  params       cell={} h-max={}{}",
        list.params.cell,
        list.params.h_max,
        match list.params.validate() {
            Ok(()) => String::new(),
            Err(e) => format!("  INVALID: {e}"),
        }
    );
    let _ = writeln!(
        o,
        "  valid after  {}  [{}]",
        format_date_relative(list.valid_after, now),
        list.valid_after
    );
    let _ = writeln!(
        o,
        "  valid until  {}  [{}]",
        format_date_relative(list.valid_until, now),
        list.valid_until
    );
    let _ = writeln!(o, "  status       {status}");
    let _ = writeln!(o, "  relays       {} ({exits} exit)", list.relays.len());
    let _ = writeln!(o, "  signatures   {}", list.signatures.len());

    for r in &list.relays {
        let _ = writeln!(o);
        let _ = writeln!(o, "relay {}", r.relay_id());
        let _ = writeln!(o, "  identity  {}", r.identity);
        let _ = writeln!(o, "  address   {} ports {}", r.addr, ports(r));
        let _ = writeln!(o, "  flags     {}", if r.exit { "exit" } else { "-" });
        let _ = writeln!(o, "  weight    {}", r.weight);
        for k in &r.onion_keys {
            let state = if k.valid_until <= now {
                "  EXPIRED"
            } else {
                ""
            };
            let _ = writeln!(
                o,
                "  onion     {} until {}{state}",
                k.key,
                format_date_relative(k.valid_until, now)
            );
        }
    }

    let _ = writeln!(o);
    if list.signatures.is_empty() {
        let _ = writeln!(o, "signatures: none (unsigned)");
    }
    for check in check_signatures(list) {
        let _ = writeln!(
            o,
            "signature by {} (id {}): {}",
            check.signer,
            check.signer.relay_id(),
            if check.valid {
                "valid"
            } else {
                "INVALID (does not verify over this body)"
            }
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use shroud_proto::keys::{IdentityKey, OnionPublic};
    use shroud_proto::peerlist::{NetworkParams, OnionKeyEntry};

    fn list() -> PeerList {
        let mut list = PeerList::new(42, 1_764_000_000, 1_764_086_400, NetworkParams::default());
        list.relays.push(RelayDescriptor {
            identity: IdentityKey::from_bytes(&[1; 32]).public(),
            addr: "127.0.0.2".parse().expect("addr"),
            ports: (9000, 9001),
            onion_keys: vec![OnionKeyEntry {
                key: OnionPublic([2; 32]),
                valid_until: 1_764_090_000,
            }],
            exit: true,
            weight: 100,
        });
        list.sign(&IdentityKey::from_bytes(&[3; 32])).expect("sign");
        list
    }

    #[test]
    fn table_has_one_line_per_relay() {
        let l = list();
        let t = relay_table(&l, 1_764_043_200);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2, "{t}");
        assert!(lines[0].starts_with("RELAY ID"));
        let id = l.relays[0].relay_id().to_string();
        assert!(lines[1].starts_with(&id), "{t}");
        assert!(lines[1].contains("127.0.0.2"), "{t}");
        assert!(lines[1].contains("9000-9001  yes   100"), "{t}");
        assert!(lines[1].ends_with("2025-11-25T17:00:00Z (in 13h)"), "{t}");
        let empty = PeerList::new(1, 0, 1, NetworkParams::default());
        assert!(relay_table(&empty, 0).ends_with("(no relays)\n"));
    }

    #[test]
    fn show_reports_signatures_and_times() {
        let mut l = list();
        let s = show(&l, "x", 1_764_043_200);
        assert!(s.contains("serial       42"), "{s}");
        assert!(s.contains("2025-11-24T16:00:00Z (12h ago)"), "{s}");
        assert!(s.contains("current (expires in 12h)"), "{s}");
        assert!(s.contains("): valid"), "{s}");
        l.relays[0].weight = 1;
        let s = show(&l, "x", 1_764_086_400);
        assert!(s.contains("INVALID"), "{s}");
        assert!(s.contains("EXPIRED (now)"), "{s}");
    }
}
