//! Path selection over in-memory peer lists (no sockets).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use rand_core::OsRng;
use shroud_client::{choose_path, choose_path_with, path_from_ids, subnet, PathError, PathRules};
use shroud_proto::keys::{IdentityKey, OnionSecret, RelayId};
use shroud_proto::peerlist::{NetworkParams, OnionKeyEntry, PeerList, RelayDescriptor};

struct Spec {
    exit: bool,
    weight: u32,
}

/// Relay `i` listens on 10.0.0.(i+1), ports 9000..=9000+i, with two onion keys (the
/// second expiring later).
fn list(specs: &[Spec]) -> PeerList {
    let mut l = PeerList::new(7, 1_000, 2_000, NetworkParams::default());
    for (i, s) in specs.iter().enumerate() {
        let mut keys: Vec<OnionKeyEntry> = [5_000, 9_000]
            .iter()
            .map(|&until| OnionKeyEntry {
                key: OnionSecret::generate(&mut OsRng).public(),
                valid_until: until,
            })
            .collect();
        keys.sort_by_key(|k| (k.valid_until, k.key));
        l.relays.push(RelayDescriptor {
            identity: IdentityKey::generate(&mut OsRng).public(),
            addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, i as u8 + 1)),
            ports: (9000, 9000 + i as u16),
            onion_keys: keys,
            exit: s.exit,
            weight: s.weight,
        });
    }
    l.normalize();
    l.validate().unwrap();
    l
}

/// The clock the tests build paths at: every listed onion key is still valid.
const NOW: u64 = 1_500;

fn spec(exit: bool, weight: u32) -> Spec {
    Spec { exit, weight }
}

#[test]
fn paths_are_distinct_end_in_an_exit_and_use_listed_endpoints_and_newest_keys() {
    let l = list(&[
        spec(false, 100),
        spec(false, 100),
        spec(true, 100),
        spec(false, 0),
        spec(true, 0),
        spec(false, 50),
        spec(true, 10),
    ]);
    let by_id: HashMap<RelayId, &RelayDescriptor> =
        l.relays.iter().map(|r| (r.relay_id(), r)).collect();
    let mut seen_last = HashSet::new();
    let mut seen_ports = HashSet::new();
    for hops in 1..=5 {
        for _ in 0..200 {
            let p = choose_path(&l, hops, true, NOW, &mut OsRng).unwrap();
            assert_eq!(p.len(), hops);
            let ids: HashSet<RelayId> = p.iter().map(|h| h.id).collect();
            assert_eq!(ids.len(), hops, "distinct relays");
            for h in &p {
                let r = by_id[&h.id];
                assert!(r.weight > 0, "zero weight never chosen");
                assert!(r.serves(h.addr), "{} outside {:?}", h.addr, r.ports);
                assert_eq!(h.onion, r.onion_keys.last().unwrap().key, "newest key");
                seen_ports.insert(h.addr);
            }
            let last = by_id[&p[hops - 1].id];
            assert!(last.exit, "last hop has the exit flag");
            seen_last.insert(p[hops - 1].id);
        }
    }
    // Both usable exits get picked, and ports beyond the first of each range are used.
    assert_eq!(seen_last.len(), 2);
    assert!(seen_ports.iter().any(|a| a.port() > 9000));
}

#[test]
fn without_exit_requirement_any_usable_relay_may_be_last() {
    let l = list(&[
        spec(false, 1),
        spec(false, 1),
        spec(false, 1),
        spec(true, 0),
    ]);
    for _ in 0..100 {
        let p = choose_path(&l, 3, false, NOW, &mut OsRng).unwrap();
        let ids: HashSet<RelayId> = p.iter().map(|h| h.id).collect();
        assert_eq!(ids.len(), 3);
        assert!(p.iter().all(|h| !l.relay_by_id(&h.id).unwrap().exit));
    }
    assert_eq!(
        choose_path(&l, 3, true, NOW, &mut OsRng),
        Err(PathError::NoExit),
        "the only exit has weight 0"
    );
}

#[test]
fn impossible_paths_are_errors() {
    let l = list(&[spec(true, 1), spec(false, 1), spec(false, 0)]);
    assert_eq!(
        choose_path(&l, 0, true, NOW, &mut OsRng),
        Err(PathError::Length { got: 0, max: 8 })
    );
    assert_eq!(
        choose_path(&l, 9, true, NOW, &mut OsRng),
        Err(PathError::Length { got: 9, max: 8 })
    );
    assert_eq!(
        choose_path(&l, 3, true, NOW, &mut OsRng),
        Err(PathError::NotEnoughRelays {
            hops: 3,
            usable: 2,
            expired: 0
        })
    );
    let p = choose_path(&l, 2, true, NOW, &mut OsRng).unwrap();
    assert!(l.relay_by_id(&p[1].id).unwrap().exit);
    let msg = choose_path(&l, 3, false, NOW, &mut OsRng)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("only 2 usable"), "{msg}");
}

#[test]
fn path_from_ids_follows_the_ids() {
    let l = list(&[spec(true, 1), spec(false, 1), spec(false, 0)]);
    let ids: Vec<RelayId> = l.relays.iter().map(|r| r.relay_id()).rev().collect();
    let p = path_from_ids(&l, &ids, NOW).unwrap();
    for (h, id) in p.iter().zip(&ids) {
        let r = l.relay_by_id(id).unwrap();
        assert_eq!(h.id, *id);
        assert_eq!(h.addr.ip(), r.addr);
        assert_eq!(h.addr.port(), r.ports.0);
        assert_eq!(h.onion, r.onion_keys.last().unwrap().key);
    }
    assert_eq!(
        path_from_ids(&l, &[ids[0], ids[1], ids[0]], NOW),
        Err(PathError::Duplicate(ids[0]))
    );
    let stranger = IdentityKey::generate(&mut OsRng).public().relay_id();
    assert_eq!(
        path_from_ids(&l, &[ids[0], stranger], NOW),
        Err(PathError::UnknownRelay(stranger))
    );
    assert_eq!(
        path_from_ids(&l, &[], NOW),
        Err(PathError::Length { got: 0, max: 8 })
    );
}

#[test]
fn expired_onion_keys_are_never_used() {
    let mut l = list(&[spec(false, 1), spec(false, 1), spec(true, 1)]);
    // A non-exit relay's keys expire at 4_000 and 7_000, the others' at 5_000 and
    // 9_000. (The list is sorted by identity, so find a non-exit one: with the exit
    // stale, no path with an exit would remain.)
    let s = l
        .relays
        .iter()
        .position(|r| !r.exit)
        .expect("a non-exit relay");
    for (k, until) in l.relays[s].onion_keys.iter_mut().zip([4_000, 7_000]) {
        k.valid_until = until;
    }
    let stale = l.relays[s].relay_id();
    let ids: Vec<RelayId> = l.relays.iter().map(|r| r.relay_id()).collect();
    let key_until = |id: &RelayId, key| {
        let r = l.relay_by_id(id).unwrap();
        r.onion_keys
            .iter()
            .find(|k| k.key == key)
            .unwrap()
            .valid_until
    };

    // Until 7_000 (exclusive) the stale relay is used with its 7_000 key, the others with their
    // 9_000 keys; an expired key is never picked.
    for now in [3_999, 4_000, 6_999] {
        for _ in 0..50 {
            for h in choose_path(&l, 3, false, now, &mut OsRng).unwrap() {
                let until = key_until(&h.id, h.onion);
                assert!(now < until, "key valid until {until} used at {now}");
                assert_eq!(until, if h.id == stale { 7_000 } else { 9_000 });
            }
        }
        let p = path_from_ids(&l, &ids, now).unwrap();
        assert_eq!(key_until(&stale, p[s].onion), 7_000);
    }

    // From 7_000 relay 0 has no valid key: never chosen, and a clear error by id.
    let now = 7_000;
    for _ in 0..50 {
        let p = choose_path(&l, 2, true, now, &mut OsRng).unwrap();
        assert!(
            p.iter().all(|h| h.id != stale),
            "relay with expired keys chosen"
        );
    }
    assert_eq!(
        choose_path(&l, 3, false, now, &mut OsRng),
        Err(PathError::NotEnoughRelays {
            hops: 3,
            usable: 2,
            expired: 1
        })
    );
    assert_eq!(
        path_from_ids(&l, &ids, now),
        Err(PathError::OnionKeysExpired {
            relay: stale,
            valid_until: 7_000,
            now
        })
    );
    let fresh: Vec<RelayId> = ids.iter().copied().filter(|id| *id != stale).collect();
    assert!(path_from_ids(&l, &fresh, now).is_ok());

    // From 9_000 nothing is usable.
    let err = choose_path(&l, 1, false, 9_000, &mut OsRng).unwrap_err();
    assert_eq!(
        err,
        PathError::NotEnoughRelays {
            hops: 1,
            usable: 0,
            expired: 3
        }
    );
    assert!(
        err.to_string()
            .contains("3 relays list only expired onion keys"),
        "{err}"
    );
    let msg = path_from_ids(&l, &ids[1..2], 9_000)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("has no valid onion key"), "{msg}");
}

#[test]
fn distinct_subnets_never_put_two_relays_of_one_slash_16_on_a_path() {
    // Relays 0-2 share 10.0.0.0/16, 3-4 share 10.1.0.0/16, 5 is alone in 10.2.0.0/16.
    let mut l = list(&[
        spec(false, 100),
        spec(false, 100),
        spec(true, 100),
        spec(false, 100),
        spec(true, 100),
        spec(false, 100),
    ]);
    let subnets = [[10, 0], [10, 0], [10, 0], [10, 1], [10, 1], [10, 2]];
    for (i, r) in l.relays.iter_mut().enumerate() {
        r.addr = IpAddr::V4(Ipv4Addr::new(subnets[i][0], subnets[i][1], 7, i as u8 + 1));
    }
    let rules = PathRules {
        distinct_subnets: true,
        ..PathRules::default()
    };
    for _ in 0..300 {
        let p = choose_path_with(&l, 3, true, &rules, NOW, &mut OsRng).unwrap();
        let nets: HashSet<[u8; 5]> = p.iter().map(|h| subnet(h.addr.ip())).collect();
        assert_eq!(nets.len(), 3, "{p:?}");
    }
    // Four hops cannot be placed in three subnets.
    assert_eq!(
        choose_path_with(&l, 4, true, &rules, NOW, &mut OsRng),
        Err(PathError::Subnets {
            hops: 4,
            subnets: 3
        })
    );
    // Without the rule, the same list gives 4-hop paths.
    assert_eq!(
        choose_path_with(&l, 4, true, &PathRules::default(), NOW, &mut OsRng)
            .unwrap()
            .len(),
        4
    );
    // IPv4-mapped IPv6 is the IPv4 subnet; IPv6 compares /32.
    assert_eq!(
        subnet("::ffff:10.0.9.9".parse().unwrap()),
        subnet("10.0.1.1".parse().unwrap())
    );
    assert_eq!(
        subnet("2001:db8:1::1".parse().unwrap()),
        subnet("2001:db8:ffff::2".parse().unwrap())
    );
    assert_ne!(
        subnet("2001:db8::1".parse().unwrap()),
        subnet("2001:db9::1".parse().unwrap())
    );
}

#[test]
fn avoided_relays_are_never_used_and_a_pinned_exit_is_always_last() {
    let l = list(&[
        spec(false, 100),
        spec(false, 100),
        spec(true, 100),
        spec(true, 100),
        spec(false, 100),
    ]);
    let ids: Vec<RelayId> = l.relays.iter().map(|r| r.relay_id()).collect();
    let exit_ids: Vec<RelayId> = l
        .relays
        .iter()
        .filter(|r| r.exit)
        .map(|r| r.relay_id())
        .collect();
    let avoided = l.relays.iter().find(|r| !r.exit).unwrap().relay_id();
    let rules = PathRules {
        exit: Some(exit_ids[1]),
        avoid: vec![avoided],
        ..PathRules::default()
    };
    for _ in 0..300 {
        let p = choose_path_with(&l, 3, false, &rules, NOW, &mut OsRng).unwrap();
        assert_eq!(p[2].id, exit_ids[1]);
        assert!(p.iter().all(|h| h.id != avoided), "{p:?}");
        assert!(p.iter().all(|h| ids.contains(&h.id)));
    }
    // Avoiding the pinned exit, or pinning a non-exit, is an error.
    let bad = PathRules {
        exit: Some(exit_ids[0]),
        avoid: vec![exit_ids[0]],
        ..PathRules::default()
    };
    assert_eq!(
        choose_path_with(&l, 3, true, &bad, NOW, &mut OsRng),
        Err(PathError::PinnedExit(exit_ids[0]))
    );
    let non_exit = PathRules {
        exit: Some(avoided),
        ..PathRules::default()
    };
    assert_eq!(
        choose_path_with(&l, 3, true, &non_exit, NOW, &mut OsRng),
        Err(PathError::PinnedExit(avoided))
    );
    // Avoiding so many relays that too few remain is NotEnoughRelays.
    let most = PathRules {
        avoid: ids[..3].to_vec(),
        ..PathRules::default()
    };
    assert!(matches!(
        choose_path_with(&l, 3, false, &most, NOW, &mut OsRng),
        Err(PathError::NotEnoughRelays { usable: 2, .. })
    ));
}
