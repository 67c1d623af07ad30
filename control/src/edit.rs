//! Editing a peer list in memory: adding, replacing and removing relays, bumping the
//! serial.
//!
//! # Invariants
//!
//! Every function here either leaves the list untouched and returns an error, or
//! returns with a list that satisfies every invariant of [`shroud_proto::peerlist`]
//! (normalized and validated). Any change to the body removes all signatures, since
//! none of them could verify any more: an edited list must be signed again.
//!
//! The `parse_*` functions are the command-line value parsers for relay fields; they
//! refuse on their own everything the peer-list format would refuse for a single
//! relay, so that errors name the argument rather than a line of the encoded list.

use std::net::IpAddr;

use shroud_proto::keys::{IdentityKey, IdentityPublic, OnionPublic, RelayId};
use shroud_proto::peerlist::{
    OnionKeyEntry, ParamsError, PeerList, PeerListError, RelayDescriptor, MAX_ONION_KEYS,
};

use crate::exit;

/// Why an edit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EditError {
    /// No relay matches the selector.
    #[error("no relay with {0} in the peer list")]
    NotFound(RelaySelector),
    /// The relay is unacceptable on its own (bad onion keys).
    #[error("invalid relay: {reason}")]
    InvalidRelay {
        /// What is wrong.
        reason: String,
    },
    /// The relay's address and port range overlap another relay's.
    #[error(
        "address {addr} ports {first}-{last} overlap relay {other} (ports {other_first}-{other_last}); \
         every port must belong to one relay"
    )]
    Overlap {
        /// The address.
        addr: IpAddr,
        /// First port of the new relay.
        first: u16,
        /// Last port of the new relay.
        last: u16,
        /// The relay already listed there.
        other: RelayId,
        /// Its first port.
        other_first: u16,
        /// Its last port.
        other_last: u16,
    },
    /// The edited list would break another invariant (for example the relay limit).
    #[error("the edited peer list would be invalid")]
    Invalid(#[source] PeerListError),
    /// The network parameters are unusable; authorities do not sign such a list.
    #[error("refusing to sign: the peer list has invalid network parameters")]
    InvalidParams(#[source] ParamsError),
    /// A new serial must be above the current one (relays refuse to go back).
    #[error("serial {requested} is not above the current serial {current}")]
    SerialNotIncreasing {
        /// The list's serial.
        current: u64,
        /// The serial asked for.
        requested: u64,
    },
}

impl EditError {
    /// [`exit::USAGE`] for a relay that is invalid on its own (the arguments are
    /// wrong), [`exit::FAILURE`] otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::InvalidRelay { .. } => exit::USAGE,
            _ => exit::FAILURE,
        }
    }

    /// A short, stable snake_case name for the error case.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "not_found",
            Self::InvalidRelay { .. } => "invalid_relay",
            Self::Overlap { .. } => "overlap",
            Self::Invalid(_) => "invalid",
            Self::InvalidParams(_) => "invalid_params",
            Self::SerialNotIncreasing { .. } => "serial_not_increasing",
        }
    }
}

/// Names one relay of a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelaySelector {
    /// By identity public key.
    Identity(IdentityPublic),
    /// By relay id.
    Id(RelayId),
}

impl RelaySelector {
    /// Whether `relay` is the one named.
    pub fn matches(&self, relay: &RelayDescriptor) -> bool {
        match self {
            Self::Identity(identity) => relay.identity == *identity,
            Self::Id(id) => relay.relay_id() == *id,
        }
    }
}

impl std::fmt::Display for RelaySelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Identity(identity) => write!(f, "identity {identity}"),
            Self::Id(id) => write!(f, "relay id {id}"),
        }
    }
}

/// What [`upsert_relay`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    /// The relay was not listed and has been added.
    Added,
    /// A relay with the same identity was listed and has been replaced.
    Replaced,
}

/// Adds `relay` to `list`, or replaces the relay with the same identity.
///
/// Onion keys are sorted; the list is normalized and validated; all signatures are
/// removed (their number is returned). On error `list` is unchanged.
pub fn upsert_relay(
    list: &mut PeerList,
    mut relay: RelayDescriptor,
) -> Result<(Upsert, usize), EditError> {
    check_onion_keys(&relay.onion_keys)?;
    relay.onion_keys.sort_by_key(|k| (k.valid_until, k.key));
    for other in list.relays.iter().filter(|r| r.identity != relay.identity) {
        let overlaps = other.addr == relay.addr
            && relay.ports.0 <= other.ports.1
            && other.ports.0 <= relay.ports.1;
        if overlaps {
            return Err(EditError::Overlap {
                addr: relay.addr,
                first: relay.ports.0,
                last: relay.ports.1,
                other: other.relay_id(),
                other_first: other.ports.0,
                other_last: other.ports.1,
            });
        }
    }
    let mut next = list.clone();
    let change = match next
        .relays
        .iter_mut()
        .find(|r| r.identity == relay.identity)
    {
        Some(slot) => {
            *slot = relay;
            Upsert::Replaced
        }
        None => {
            next.relays.push(relay);
            Upsert::Added
        }
    };
    let removed = commit_body_change(list, next)?;
    Ok((change, removed))
}

/// Removes the relay named by `selector` and returns it with the number of
/// signatures removed. On error `list` is unchanged.
pub fn remove_relay(
    list: &mut PeerList,
    selector: &RelaySelector,
) -> Result<(RelayDescriptor, usize), EditError> {
    let index = list
        .relays
        .iter()
        .position(|r| selector.matches(r))
        .ok_or(EditError::NotFound(*selector))?;
    let mut next = list.clone();
    let relay = next.relays.remove(index);
    let removed = commit_body_change(list, next)?;
    Ok((relay, removed))
}

/// Sets a new serial, which must be above the current one, and removes all
/// signatures (their number is returned). On error `list` is unchanged.
pub fn set_serial(list: &mut PeerList, serial: u64) -> Result<usize, EditError> {
    if serial <= list.serial {
        return Err(EditError::SerialNotIncreasing {
            current: list.serial,
            requested: serial,
        });
    }
    let mut next = list.clone();
    next.serial = serial;
    commit_body_change(list, next)
}

/// Signs `list` with `key`, replacing an earlier signature by the same key.
///
/// Refuses a list whose network parameters are invalid (relays would refuse it
/// whoever signed it) or that breaks an invariant. Returns whether an earlier
/// signature by `key` was replaced. On error `list` is unchanged.
pub fn sign_list(list: &mut PeerList, key: &IdentityKey) -> Result<bool, EditError> {
    list.params.validate().map_err(EditError::InvalidParams)?;
    let signer = key.public();
    let replaced = list.signatures.iter().any(|s| s.signer == signer);
    list.sign(key).map_err(EditError::Invalid)?;
    Ok(replaced)
}

/// Drops the signatures of `next`, normalizes and validates it, and stores it in
/// `list`. Returns how many signatures `list` had.
fn commit_body_change(list: &mut PeerList, mut next: PeerList) -> Result<usize, EditError> {
    next.signatures.clear();
    next.normalize();
    next.validate().map_err(EditError::Invalid)?;
    let removed = list.signatures.len();
    *list = next;
    Ok(removed)
}

fn check_onion_keys(keys: &[OnionKeyEntry]) -> Result<(), EditError> {
    let invalid = |reason: String| Err(EditError::InvalidRelay { reason });
    if keys.is_empty() {
        return invalid("a relay needs at least one onion key".to_owned());
    }
    if keys.len() > MAX_ONION_KEYS {
        return invalid(format!(
            "a relay may list at most {MAX_ONION_KEYS} onion keys, {} given",
            keys.len()
        ));
    }
    for (i, k) in keys.iter().enumerate() {
        if keys[..i].iter().any(|earlier| earlier.key == k.key) {
            return invalid(format!("onion key {} is given twice", k.key));
        }
    }
    Ok(())
}

/// Parses a relay address as the peer list accepts it: an IPv4 or IPv6 address that
/// is not unspecified, multicast, broadcast or IPv4-mapped. IPv6 is returned in its
/// canonical form (the list writes that form).
pub fn parse_relay_addr(text: &str) -> Result<IpAddr, String> {
    let addr: IpAddr = text
        .parse()
        .map_err(|_| format!("`{text}` is not an IP address"))?;
    let refused = match addr {
        IpAddr::V4(a) if a.is_unspecified() => Some("unspecified"),
        IpAddr::V4(a) if a.is_multicast() => Some("multicast"),
        IpAddr::V4(a) if a.is_broadcast() => Some("broadcast"),
        IpAddr::V6(a) if a.is_unspecified() => Some("unspecified"),
        IpAddr::V6(a) if a.is_multicast() => Some("multicast"),
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => {
            Some("an IPv4-mapped IPv6 address (give the IPv4 form)")
        }
        _ => None,
    };
    match refused {
        Some(why) => Err(format!("{addr} is {why}; a relay needs a routable address")),
        None => Ok(addr),
    }
}

/// Parses a port range `FIRST-LAST` (or a single `PORT`) with `0 < FIRST <= LAST`.
pub fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let (first, last) = text.split_once('-').unwrap_or((text, text));
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|&n| n != 0)
            .ok_or_else(|| format!("`{p}` is not a port number (1-65535)"))
    };
    let (first, last) = (port(first)?, port(last)?);
    if first > last {
        return Err(format!(
            "the range {first}-{last} is empty (FIRST must not exceed LAST)"
        ));
    }
    Ok((first, last))
}

/// An onion key given on the command line: `PUB` or `PUB@UNTIL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnionArg {
    /// The x25519 public key.
    pub key: OnionPublic,
    /// End of the key's validity (Unix seconds); `None` means "the list's
    /// `valid-until`".
    pub until: Option<u64>,
}

impl OnionArg {
    /// The peer-list entry, with `default_until` for a key given without `@UNTIL`.
    pub fn entry(&self, default_until: u64) -> OnionKeyEntry {
        OnionKeyEntry {
            key: self.key,
            valid_until: self.until.unwrap_or(default_until),
        }
    }
}

/// Parses `PUB[@UNTIL]`: an onion public key in base64 and, optionally, the end of
/// its validity as Unix seconds or an RFC 3339 UTC date.
pub fn parse_onion_arg(text: &str) -> Result<OnionArg, String> {
    let (key, until) = match text.split_once('@') {
        Some((key, until)) => (key, Some(crate::time::parse_instant(until)?)),
        None => (text, None),
    };
    let key = key
        .parse::<OnionPublic>()
        .map_err(|e| format!("not an onion public key: {e}"))?;
    Ok(OnionArg { key, until })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shroud_proto::keys::IdentityKey;
    use shroud_proto::peerlist::NetworkParams;

    fn relay(seed: u8, addr: &str, ports: (u16, u16)) -> RelayDescriptor {
        RelayDescriptor {
            identity: IdentityKey::from_bytes(&[seed; 32]).public(),
            addr: addr.parse().expect("addr"),
            ports,
            onion_keys: vec![OnionKeyEntry {
                key: OnionPublic([seed; 32]),
                valid_until: 100,
            }],
            exit: false,
            weight: 1,
        }
    }

    fn signed_list() -> PeerList {
        let mut list = PeerList::new(1, 0, 50, NetworkParams::default());
        upsert_relay(&mut list, relay(1, "10.0.0.1", (1, 10))).expect("add");
        list.sign(&IdentityKey::from_bytes(&[9; 32])).expect("sign");
        list
    }

    #[test]
    fn add_replace_remove() {
        let mut list = signed_list();
        assert_eq!(
            upsert_relay(&mut list, relay(2, "10.0.0.1", (11, 20))),
            Ok((Upsert::Added, 1))
        );
        assert!(list.signatures.is_empty());
        let mut moved = relay(2, "10.0.0.2", (11, 20));
        moved.exit = true;
        assert_eq!(
            upsert_relay(&mut list, moved.clone()),
            Ok((Upsert::Replaced, 0))
        );
        assert_eq!(list.relays.len(), 2);
        list.validate().expect("valid");
        let sel = RelaySelector::Id(moved.relay_id());
        assert_eq!(remove_relay(&mut list, &sel), Ok((moved, 0)));
        assert_eq!(remove_relay(&mut list, &sel), Err(EditError::NotFound(sel)));
    }

    #[test]
    fn refusals_leave_the_list_unchanged() {
        let mut list = signed_list();
        let before = list.clone();
        let e = upsert_relay(&mut list, relay(2, "10.0.0.1", (5, 5))).expect_err("overlap");
        assert_eq!(e.kind(), "overlap");
        let mut keyless = relay(3, "10.0.0.3", (1, 1));
        keyless.onion_keys.clear();
        assert_eq!(
            upsert_relay(&mut list, keyless)
                .expect_err("no keys")
                .exit_code(),
            exit::USAGE
        );
        let mut twice = relay(3, "10.0.0.3", (1, 1));
        twice.onion_keys.push(twice.onion_keys[0]);
        assert!(upsert_relay(&mut list, twice).is_err());
        assert!(set_serial(&mut list, 1).is_err());
        assert_eq!(list, before);
        assert_eq!(set_serial(&mut list, 2), Ok(1));
        assert_eq!(list.serial, 2);
    }

    #[test]
    fn argument_parsers() {
        assert_eq!(parse_port_range("9000-9003"), Ok((9000, 9003)));
        assert_eq!(parse_port_range("443"), Ok((443, 443)));
        for bad in ["0-1", "2-1", "1-", "-", "x", "1-70000"] {
            assert!(parse_port_range(bad).is_err(), "{bad}");
        }
        assert!(parse_relay_addr("127.0.0.1").is_ok());
        assert_eq!(
            parse_relay_addr("2001:DB8:0::7").map(|a| a.to_string()),
            Ok("2001:db8::7".to_owned())
        );
        for bad in [
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
            "::ffff:1.2.3.4",
            "x",
        ] {
            assert!(parse_relay_addr(bad).is_err(), "{bad}");
        }
        let key = OnionPublic([4; 32]);
        assert_eq!(
            parse_onion_arg(&key.to_string()),
            Ok(OnionArg { key, until: None })
        );
        assert_eq!(
            parse_onion_arg(&format!("{key}@1764090000")),
            Ok(OnionArg {
                key,
                until: Some(1_764_090_000)
            })
        );
        assert!(parse_onion_arg(&format!("{key}@")).is_err());
        assert!(parse_onion_arg("AAAA@1").is_err());
    }
}
