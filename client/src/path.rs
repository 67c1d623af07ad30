//! Path selection: which relays, ports and onion keys a circuit goes through.
//!
//! Invariants of every path returned here:
//! - it has `1..=H_MAX` hops (`H_MAX` from the peer list's parameters);
//! - no relay appears twice (a relay never forwards to itself, and repeating a relay
//!   would let it correlate both positions);
//! - every hop's address is the relay's listed address with a port inside its listed
//!   range (the relays refuse anything else as `not_a_peer`);
//! - every hop's onion key is, among the relay's listed keys still valid at the
//!   caller's `now` (`now < valid_until`), the one with the latest `valid_until` (during
//!   rotation the newest key is the one that stays valid longest). A relay whose keys
//!   have all expired is never used.
//!
//! [`choose_path`] additionally picks relays at random, weighted by their `weight`
//! (zero weight: never picked), ports uniformly within each relay's range, and, when
//! asked, puts an exit-flagged relay last. Randomness comes from a caller-supplied
//! cryptographic generator: predictable paths would help an adversary place relays.
//! [`choose_path_with`] adds [`PathRules`]: a pinned exit, relays to avoid (noticed
//! dead), and no two relays of a path in the same IPv4 /16 or IPv6 /32 (Tor's
//! `EnforceDistinctSubnets`: one operator's or one network's relays are likely
//! observed together).

use rand_core::{CryptoRng, RngCore};
use std::net::{IpAddr, SocketAddr};

use shroud_proto::client::PathHop;
use shroud_proto::keys::{OnionPublic, RelayId};
use shroud_proto::peerlist::{PeerList, RelayDescriptor};

/// Why no path could be made from a peer list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The requested length is 0 or above the network's `H_MAX`.
    #[error("a path needs 1 to {max} hops (the network's H_MAX), got {got}")]
    Length {
        /// Hops requested.
        got: usize,
        /// The peer list's `H_MAX`.
        max: usize,
    },
    /// Fewer usable relays than hops.
    #[error(
        "a {hops}-hop path needs {hops} distinct relays, but the peer list has only {usable} \
         usable ones (non-zero weight, an unexpired onion key, a valid port range); \
         {expired} relays list only expired onion keys"
    )]
    NotEnoughRelays {
        /// Hops requested.
        hops: usize,
        /// Usable relays in the list.
        usable: usize,
        /// Relays left out because every onion key they list has expired.
        expired: usize,
    },
    /// An exit was required and no usable relay has the exit flag.
    #[error(
        "no usable exit relay in the peer list (exit flag, non-zero weight, an unexpired \
         onion key)"
    )]
    NoExit,
    /// A requested relay is not in the peer list.
    #[error("relay {0} is not in the peer list")]
    UnknownRelay(RelayId),
    /// A requested relay appears more than once.
    #[error("relay {0} appears more than once in the path")]
    Duplicate(RelayId),
    /// A requested relay cannot be used (no onion key or an empty port range).
    #[error("relay {0} is unusable: it lists no onion key or an empty port range")]
    Unusable(RelayId),
    /// Every onion key a requested relay lists has expired.
    #[error(
        "relay {relay} has no valid onion key: the latest expired at {valid_until}, now is \
         {now} (a newer peer list is needed)"
    )]
    OnionKeysExpired {
        /// The relay.
        relay: RelayId,
        /// The latest `valid_until` among its keys.
        valid_until: u64,
        /// The `now` the path was asked for.
        now: u64,
    },
    /// [`PathRules::distinct_subnets`] left too few relays (after the exit and the
    /// earlier hops, every remaining relay shares a /16 with one of them).
    #[error(
        "a {hops}-hop path needs relays in {hops} distinct subnets (IPv4 /16, IPv6 /32), \
         but only {subnets} are available"
    )]
    Subnets {
        /// Hops requested.
        hops: usize,
        /// Hops that could be placed.
        subnets: usize,
    },
    /// The pinned exit ([`PathRules::exit`]) is avoided, unusable or not an exit.
    #[error("the pinned exit {0} is unusable (avoided, no exit flag, zero weight or no valid onion key)")]
    PinnedExit(RelayId),
}

/// Extra rules for [`choose_path_with`]. The default adds nothing to
/// [`choose_path`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathRules {
    /// The exit must be this relay (e.g. the one a stream gateway runs beside). It
    /// must be usable and carry the exit flag.
    pub exit: Option<RelayId>,
    /// No two relays of the path in the same IPv4 /16 or IPv6 /32 ([`subnet`]).
    pub distinct_subnets: bool,
    /// Relays never to use (e.g. noticed dead).
    pub avoid: Vec<RelayId>,
}

/// The subnet [`PathRules::distinct_subnets`] compares: the first two bytes of an
/// IPv4 address (an IPv4-mapped IPv6 address counts as IPv4), the first four of an
/// IPv6 address, tagged so the two families never compare equal.
pub fn subnet(ip: IpAddr) -> [u8; 5] {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            [4, o[0], o[1], 0, 0]
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => subnet(IpAddr::V4(v4)),
            None => {
                let o = v6.octets();
                [6, o[0], o[1], o[2], o[3]]
            }
        },
    }
}

fn ports_ok(r: &RelayDescriptor) -> bool {
    r.ports.0 != 0 && r.ports.0 <= r.ports.1
}

/// Among `r`'s onion keys still valid at `now`, the one valid longest.
fn onion_key(r: &RelayDescriptor, now: u64) -> Option<OnionPublic> {
    r.onion_keys
        .iter()
        .filter(|k| now < k.valid_until)
        .max_by_key(|k| k.valid_until)
        .map(|k| k.key)
}

fn usable(r: &RelayDescriptor, now: u64) -> bool {
    ports_ok(r) && onion_key(r, now).is_some()
}

/// A uniform integer in `0..n` (`n > 0`), by rejection (no modulo bias).
fn below<R: RngCore + ?Sized>(rng: &mut R, n: u64) -> u64 {
    debug_assert!(n > 0);
    let n = u128::from(n);
    let span = 1u128 << 64;
    let limit = span - span % n;
    loop {
        let v = u128::from(rng.next_u64());
        if v < limit {
            // `v % n < n <= u64::MAX`, so the cast is lossless.
            return (v % n) as u64;
        }
    }
}

/// Picks and removes one index of `pool`, with probability proportional to its weight.
/// `pool` must be non-empty with a positive total weight.
fn take_weighted<R: RngCore + ?Sized>(
    rng: &mut R,
    list: &PeerList,
    pool: &mut Vec<usize>,
) -> usize {
    let total: u64 = pool.iter().map(|&i| u64::from(list.relays[i].weight)).sum();
    let mut r = below(rng, total);
    let mut k = pool.len() - 1;
    for (j, &i) in pool.iter().enumerate() {
        let w = u64::from(list.relays[i].weight);
        if r < w {
            k = j;
            break;
        }
        r -= w;
    }
    pool.remove(k)
}

fn hop(r: &RelayDescriptor, onion: OnionPublic, port: u16) -> PathHop {
    PathHop {
        id: r.relay_id(),
        onion,
        addr: SocketAddr::new(r.addr, port),
    }
}

fn check_len(list: &PeerList, hops: usize) -> Result<(), PathError> {
    let max = usize::from(list.params.h_max);
    if hops == 0 || hops > max {
        return Err(PathError::Length { got: hops, max });
    }
    Ok(())
}

/// Chooses a random path of `hops` distinct relays from `list`, weighted by `weight`.
///
/// With `exit_required`, the last hop is drawn (weighted) among relays with the exit
/// flag, the others among all remaining relays; without it, any relay may be last.
/// Each hop's port is uniform in the relay's port range (which spreads circuits over
/// the relay's workers) and its onion key is the key valid longest among those not
/// expired at `now` (Unix seconds); relays whose keys have all expired are left out.
pub fn choose_path<R: RngCore + CryptoRng + ?Sized>(
    list: &PeerList,
    hops: usize,
    exit_required: bool,
    now: u64,
    rng: &mut R,
) -> Result<Vec<PathHop>, PathError> {
    choose_path_with(list, hops, exit_required, &PathRules::default(), now, rng)
}

/// [`choose_path`] under `rules`: relays in `rules.avoid` are never used; with
/// `rules.exit` the last hop is that relay (which implies `exit_required`); with
/// `rules.distinct_subnets` every relay is drawn among those whose [`subnet`] no
/// earlier pick (the exit first) has.
pub fn choose_path_with<R: RngCore + CryptoRng + ?Sized>(
    list: &PeerList,
    hops: usize,
    exit_required: bool,
    rules: &PathRules,
    now: u64,
    rng: &mut R,
) -> Result<Vec<PathHop>, PathError> {
    check_len(list, hops)?;
    let mut pool: Vec<usize> = (0..list.relays.len())
        .filter(|&i| {
            let r = &list.relays[i];
            usable(r, now) && r.weight > 0 && !rules.avoid.contains(&r.relay_id())
        })
        .collect();
    if pool.len() < hops {
        let expired = list
            .relays
            .iter()
            .filter(|r| !r.onion_keys.is_empty() && onion_key(r, now).is_none())
            .count();
        return Err(PathError::NotEnoughRelays {
            hops,
            usable: pool.len(),
            expired,
        });
    }
    let exit = if let Some(id) = rules.exit {
        let e = pool
            .iter()
            .copied()
            .find(|&i| list.relays[i].relay_id() == id && list.relays[i].exit)
            .ok_or(PathError::PinnedExit(id))?;
        pool.retain(|&i| i != e);
        Some(e)
    } else if exit_required {
        let mut exits: Vec<usize> = pool
            .iter()
            .copied()
            .filter(|&i| list.relays[i].exit)
            .collect();
        if exits.is_empty() {
            return Err(PathError::NoExit);
        }
        let e = take_weighted(rng, list, &mut exits);
        pool.retain(|&i| i != e);
        Some(e)
    } else {
        None
    };
    let mut chosen = Vec::with_capacity(hops);
    let mut taken: Vec<[u8; 5]> = exit.iter().map(|&e| subnet(list.relays[e].addr)).collect();
    while chosen.len() + usize::from(exit.is_some()) < hops {
        if rules.distinct_subnets {
            pool.retain(|&i| !taken.contains(&subnet(list.relays[i].addr)));
            if pool.is_empty() {
                return Err(PathError::Subnets {
                    hops,
                    subnets: chosen.len() + usize::from(exit.is_some()),
                });
            }
        }
        let i = take_weighted(rng, list, &mut pool);
        taken.push(subnet(list.relays[i].addr));
        chosen.push(i);
    }
    chosen.extend(exit);
    Ok(chosen
        .into_iter()
        .map(|i| {
            let r = &list.relays[i];
            let span = u64::from(r.ports.1 - r.ports.0) + 1;
            // `below(span) < span <= 65535 - first + 1`, so the sum stays a u16.
            let port = r.ports.0 + below(rng, span) as u16;
            let onion = onion_key(r, now).unwrap_or_else(|| unreachable!("the pool is usable"));
            hop(r, onion, port)
        })
        .collect())
}

/// The path through the relays `ids` (first hop first), as listed in `list`.
///
/// Deterministic: each hop uses the first port of its relay's range (change
/// `PathHop::addr` to use another port of the range) and the onion key valid longest
/// among those not expired at `now` (Unix seconds); a relay whose keys have all expired
/// is an error. No flag is required of the last relay; a non-exit there refuses the
/// circuit with reason `policy`.
pub fn path_from_ids(
    list: &PeerList,
    ids: &[RelayId],
    now: u64,
) -> Result<Vec<PathHop>, PathError> {
    check_len(list, ids.len())?;
    for (i, id) in ids.iter().enumerate() {
        if ids[..i].contains(id) {
            return Err(PathError::Duplicate(*id));
        }
    }
    ids.iter()
        .map(|id| {
            let r = list.relay_by_id(id).ok_or(PathError::UnknownRelay(*id))?;
            if !ports_ok(r) || r.onion_keys.is_empty() {
                return Err(PathError::Unusable(*id));
            }
            let onion = onion_key(r, now).ok_or_else(|| PathError::OnionKeysExpired {
                relay: *id,
                valid_until: r
                    .onion_keys
                    .iter()
                    .map(|k| k.valid_until)
                    .max()
                    .unwrap_or(0),
                now,
            })?;
            Ok(hop(r, onion, r.ports.0))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::below;
    use rand_core::OsRng;

    #[test]
    fn below_stays_in_range() {
        for n in [1u64, 2, 3, 7, 1 << 40, u64::MAX] {
            for _ in 0..100 {
                assert!(below(&mut OsRng, n) < n);
            }
        }
    }
}
