//! Setup admission at a relay: the onion keyring with its seen-filters, and the
//! handling of one setup cell (rate limit, open with an onion key, replay check, link
//! and circuit installation, CREATED/REFUSED replies or forwarding).
//!
//! The seen-filter belongs to the onion key, not to a worker: an [`OnionKeyring`] is
//! cloned into every worker of a process and the clones share each key's filter, so a
//! setup accepted by one worker is a replay at every other (`docs/PROTOCOL.md`,
//! "setup replay"). A process's keyring refuses setups stamped at or before the second
//! the process started ([`OnionKeyring::started_at`]), and every accepted setup is
//! written to a [`SetupJournal`] before it is acted on, from which the next process
//! refills its filters ([`OnionKeyring::remember`]): a restarted relay cannot accept a
//! setup the previous process saw, whatever its stamp.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use super::circuits::{Circuit, Direction, Hop};
use super::links::{client_link_keys, Link, LinkKind};
use super::{Action, DropReason, Event, Relay};
use crate::aead::Aead;
use crate::cell::{Command, Header, PROTOCOL_VERSION};
use crate::keys::{OnionPublic, OnionSecret};
use crate::layer::{add_backward, write_control};
use crate::replay::{ReplayWindow, SetupCheck, SetupFilter};
use crate::retry::{write_retry, RETRY_EPOCH_S};
use crate::setup::{forward_setup, open_setup, setup_ephemeral, Next, SetupError};

/// Onion keys held at once (current, next, previous).
pub const MAX_ONION_KEYS: usize = 3;

/// Where a relay process records every setup it accepts, before it acts on it, so that
/// a later process (after a restart or a crash) can refuse them: the data plane writes
/// it to a file and loads it at start ([`OnionKeyring::remember`]). The core calls it;
/// it does no I/O itself.
pub trait SetupJournal: Send + Sync {
    /// Records that the setup `id` ([`SetupFilter::id_of`]) stamped `ts` was accepted
    /// under the onion key `key`. `false` (it could not be recorded) refuses the setup.
    fn record(&self, key: &OnionPublic, id: &[u8; 16], ts: u64) -> bool;
}

#[derive(Clone)]
struct OnionEntry {
    secret: OnionSecret,
    public: OnionPublic,
    seen: Arc<Mutex<SetupFilter>>,
}

/// The onion keys of a relay process, newest first, each with the seen-filter of the
/// setups made to it. Clones share the filters: give every worker a clone of one
/// keyring.
#[derive(Clone)]
pub struct OnionKeyring {
    entries: Vec<OnionEntry>,
    /// Keys dropped by [`OnionKeyring::update`], with the second they were dropped
    /// (the most recent [`RETIRED_REMEMBERED`]).
    retired: Vec<(OnionPublic, u64)>,
    /// Setups stamped at or before this second may have been seen by an earlier
    /// process with the same keys.
    started_s: Option<u64>,
    journal: Option<Arc<dyn SetupJournal>>,
    skew_s: u64,
    filter_capacity: usize,
}

/// Retired keys whose drop time a keyring remembers.
const RETIRED_REMEMBERED: usize = 16;

impl core::fmt::Debug for OnionKeyring {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("OnionKeyring")
            .field("keys", &self.publics())
            .finish_non_exhaustive()
    }
}

impl OnionKeyring {
    /// An empty keyring whose filters accept setups stamped within `skew_s` seconds of
    /// the relay's clock and remember `filter_capacity` setups per generation.
    pub fn new(skew_s: u64, filter_capacity: usize) -> Self {
        OnionKeyring {
            entries: Vec::new(),
            retired: Vec::new(),
            started_s: None,
            journal: None,
            skew_s,
            filter_capacity,
        }
    }

    /// Marks the keyring as that of a process started at `start_ms`: every filter
    /// refuses setups stamped at or before that second, which an earlier process with
    /// the same keys may have accepted. The process must not accept setups before the
    /// next second begins (the daemon waits for it before it reports ready).
    pub fn started_at(mut self, start_ms: u64) -> Self {
        let s = start_ms / 1000;
        self.started_s = Some(s);
        for e in &self.entries {
            lock(&e.seen).refuse_up_to(s);
        }
        self
    }

    /// Records every accepted setup in `journal` before it is acted on.
    pub fn with_journal(mut self, journal: Arc<dyn SetupJournal>) -> Self {
        self.journal = Some(journal);
        self
    }

    /// Remembers a setup an earlier process accepted (from its journal) under the key
    /// whose public key starts with `key_prefix`; ignored for keys not held.
    pub fn remember(&self, key_prefix: &[u8; 8], id: [u8; 16], ts: u64, now_ms: u64) {
        for e in &self.entries {
            if e.public.as_bytes()[..8] == key_prefix[..] {
                lock(&e.seen).remember(id, ts, now_ms / 1000);
            }
        }
    }

    /// Replaces the keys (newest first; at most [`MAX_ONION_KEYS`] are kept). A key that
    /// stays keeps its filter, so a rotation never reopens a replay window. A key new to
    /// this keyring gets an empty filter; if the keyring held that key before, the
    /// filter refuses setups stamped at or before the second it was dropped.
    pub fn update(&mut self, keys: Vec<OnionSecret>, now_ms: u64) {
        let now_s = now_ms / 1000;
        let mut old = std::mem::take(&mut self.entries);
        for secret in keys.into_iter().take(MAX_ONION_KEYS) {
            let public = secret.public();
            let seen = match old.iter().position(|e| e.public == public) {
                Some(i) => old.swap_remove(i).seen,
                None => {
                    let mut f = SetupFilter::new(self.skew_s, self.filter_capacity, now_s);
                    if let Some(s) = self.started_s {
                        f.refuse_up_to(s);
                    }
                    if let Some(&(_, dropped)) = self.retired.iter().find(|r| r.0 == public) {
                        f.refuse_up_to(dropped);
                    }
                    Arc::new(Mutex::new(f))
                }
            };
            self.entries.push(OnionEntry {
                secret,
                public,
                seen,
            });
        }
        for e in old {
            self.retired.retain(|r| r.0 != e.public);
            if self.retired.len() >= RETIRED_REMEMBERED {
                self.retired.remove(0);
            }
            self.retired.push((e.public, now_s));
        }
    }

    /// The public keys, newest first.
    pub fn publics(&self) -> Vec<OnionPublic> {
        self.entries.iter().map(|e| e.public).collect()
    }

    /// Checks a setup to key `k` with ephemeral `e` stamped `ts`, and records it (in
    /// the shared filter, then in the journal) if it is fresh.
    fn check(&self, k: usize, e: &[u8; 32], ts: u64, now_s: u64) -> Result<(), DropReason> {
        let entry = &self.entries[k];
        match lock(&entry.seen).check_and_insert(e, ts, now_s) {
            SetupCheck::Fresh => {}
            SetupCheck::Replay => return Err(DropReason::Replay),
            SetupCheck::Expired => return Err(DropReason::Expired),
            SetupCheck::Full => return Err(DropReason::RateLimited),
        }
        match &self.journal {
            Some(j) if !j.record(&entry.public, &SetupFilter::id_of(e), ts) => {
                // Not recorded: a later process could accept it again. Refuse it (it
                // stays in the filter, so this process refuses it too).
                Err(DropReason::Capacity)
            }
            _ => Ok(()),
        }
    }
}

fn lock(f: &Mutex<SetupFilter>) -> std::sync::MutexGuard<'_, SetupFilter> {
    // A poisoned lock means a worker panicked during one insert; the set is still
    // consistent, so keep using it rather than stop accepting setups.
    f.lock().unwrap_or_else(|p| p.into_inner())
}

impl<A: Aead> Relay<A> {
    /// Replaces this worker's onion keys with (a clone of) a process-wide keyring.
    pub fn set_keyring(&mut self, keyring: OnionKeyring) {
        self.onion = keyring;
    }

    /// Replaces the onion keys (newest first, at most 3), keeping the filters of keys
    /// that stay (see [`OnionKeyring::update`]); circuits are untouched.
    pub fn set_onion_keys(&mut self, keys: Vec<OnionSecret>, now_ms: u64) {
        self.onion.update(keys, now_ms);
    }

    /// The onion public keys in use, newest first.
    pub fn onion_publics(&self) -> Vec<OnionPublic> {
        self.onion.publics()
    }

    /// Handles a setup cell from `src`, arriving on `link` if the address is known.
    ///
    /// Order of checks: drain, per-batch budget and (for clients) the per-prefix setup
    /// bucket, all before any public-key work; then the onion layer, the seen-filter
    /// and journal, the version; then everything that can refuse (next hop, policy,
    /// quotas, table space). A client link is created only once nothing refuses: a
    /// refused setup leaves no state behind.
    pub(super) fn setup(
        &mut self,
        src: SocketAddr,
        link: Option<u32>,
        cell: &mut [u8],
        now_ms: u64,
    ) -> Action {
        let layout = self.layout;
        if !self.accepting {
            return self.drop(DropReason::Capacity);
        }
        let from_peer = link
            .and_then(|l| self.links.get(l))
            .is_some_and(|l| l.kind == LinkKind::Peer);
        // Setups from peer relays (authenticated by their link's header key) carry
        // circuits another relay already admitted: client traffic, garbage included,
        // must not starve them, so only client setups spend the per-batch budget and
        // their prefix's tokens.
        // A setup from an address with no link yet (a new client, or garbage) also
        // needs a token of the budget all such addresses share, so that a flood
        // from many prefixes costs at most that much public-key work.
        // Under load (that budget spent), a new address must first prove that it
        // receives: it gets a RETRY with a token instead of the public-key work, and
        // a setup whose header is its address's token skips the shared budget and
        // starts a validated link (`retry`).
        let mut proven = false;
        if !from_peer {
            if !self.prefixes.allow_setup(src.ip(), now_ms) {
                return self.drop(DropReason::RateLimited);
            }
            if link.is_none() {
                proven = self.tokens.check(cell, src, now_ms);
                // (A batch whose budget is spent refuses below, token or not.)
                if !proven && self.setup_budget > 0 && !self.prefixes.allow_newcomer(now_ms) {
                    return self.retry(src, cell, now_ms);
                }
            }
            if self.setup_budget == 0 {
                return self.drop(DropReason::RateLimited);
            }
            self.setup_budget -= 1;
        }
        let mut opened = None;
        let mut bad_point = false;
        for (k, entry) in self.onion.entries.iter().enumerate() {
            self.stats.setup_dh += 1;
            match open_setup::<A>(&layout, &entry.secret, entry.public.as_bytes(), cell) {
                Ok(x) => {
                    opened = Some((k, x));
                    break;
                }
                Err(SetupError::BadPoint) => bad_point = true,
                Err(SetupError::Malformed) => return self.drop(DropReason::Malformed),
                Err(SetupError::BadTag) => {}
            }
        }
        let Some((k, (secrets, routing))) = opened else {
            // From an address with no link, a cell no onion key opens is garbage (or a
            // setup made with a retired key): `malformed`. `bad_tag` stays the signal of
            // tampering on a link the relay knows.
            return self.drop(if bad_point || link.is_none() {
                DropReason::Malformed
            } else {
                DropReason::BadTag
            });
        };
        let e = setup_ephemeral(&layout, cell);
        if let Err(reason) = self.onion.check(k, &e, routing.timestamp, now_ms / 1000) {
            return self.drop(reason);
        }
        // The incoming link: known, or a client introducing itself with a link seed
        // (installed only at the end, once nothing refused).
        let mut incoming = match link {
            Some(l) => Incoming::Known(l),
            None => {
                if routing.link_seed == [0; 16] {
                    return self.drop(DropReason::NotAPeer);
                }
                let (up, down) = client_link_keys(&routing.link_seed, &self.me);
                Incoming::New(Link {
                    addr: src,
                    kind: LinkKind::Client,
                    tx: down,
                    rx: up,
                    seed: routing.link_seed,
                    circuits: 0,
                    last_active: now_ms,
                    // A token proved that the address receives.
                    validated: proven,
                    // This setup cell is all the address has sent so far.
                    credit: cell.len() as u64,
                    sent: 0,
                })
            }
        };
        if let Incoming::Known(in_link) = incoming {
            if let Some(l) = self.links.get_mut(in_link) {
                if l.kind == LinkKind::Client
                    && l.circuits == 0
                    && routing.link_seed != [0; 16]
                    && routing.link_seed != l.seed
                {
                    // The client restarted with a new seed and holds no circuit here:
                    // adopt it, and make the address prove again that it receives (a
                    // spoofed setup must not inherit the real client's validation).
                    let (up, down) = client_link_keys(&routing.link_seed, &self.me);
                    l.tx = down;
                    l.rx = up;
                    l.seed = routing.link_seed;
                    l.validated = false;
                    l.credit = l.credit.min(cell.len() as u64);
                    self.links.rekeyed();
                }
            }
            if self.circuits.id_in_use(in_link, routing.in_id) {
                return self.drop(DropReason::Malformed);
            }
        }
        let fwd = secrets.forward_secret();
        let bwd = secrets.backward_secret();
        // A setup comes from a peer relay's link or from a client (new or known).
        let to_client = !from_peer;
        let refuse = |relay: &mut Self,
                      incoming: &mut Incoming,
                      cell: &mut [u8],
                      reason: DropReason|
         -> Action {
            relay.stats.drops[reason as usize] += 1;
            write_control(&layout, cell, &[reason as u8]);
            cell[layout.stack_start()..layout.stack_end()].fill(0);
            // A client of another version cannot know this version's counter shift:
            // its refusal uses the plain counter 0, which version 1 expects.
            let counter = if reason == DropReason::Version {
                0
            } else {
                bwd.shifted(0)
            };
            add_backward(&layout, &bwd.expand::<A>(), Command::Refused, counter, cell);
            let l = match incoming {
                Incoming::Known(i) => relay.links.get_mut(*i),
                Incoming::New(l) => Some(l),
            };
            if let Some(l) = l {
                if !l.spend(cell.len()) {
                    relay.stats.drops[DropReason::Unvalidated as usize] += 1;
                    return Action::Drop(reason);
                }
                l.protect(
                    cell,
                    &Header {
                        circuit: routing.in_id,
                        counter,
                        command: Command::Refused,
                    },
                );
            }
            Action::Refuse { to: src, reason }
        };
        if routing.version != PROTOCOL_VERSION {
            return refuse(self, &mut incoming, cell, DropReason::Version);
        }
        if routing.mix_mean_ms > self.limits.max_mix_mean_ms {
            return refuse(self, &mut incoming, cell, DropReason::Mix);
        }
        let next = match routing.next {
            Next::Relay { id, port, out_id } => {
                let Some(&p) = self.peer_by_id.get(&id) else {
                    return refuse(self, &mut incoming, cell, DropReason::NotAPeer);
                };
                let peer = &self.peers[p];
                if port < peer.ports.0 || port > peer.ports.1 {
                    return refuse(self, &mut incoming, cell, DropReason::NotAPeer);
                }
                let to = SocketAddr::new(peer.addr, port);
                let Some(out_link) = self.peer_link(to, now_ms) else {
                    return refuse(self, &mut incoming, cell, DropReason::Capacity);
                };
                if self.circuits.id_in_use(out_link, out_id) {
                    return refuse(self, &mut incoming, cell, DropReason::Malformed);
                }
                Hop::Relay {
                    link: out_link,
                    id: out_id,
                }
            }
            Next::Exit { dest } => {
                // The exit sends to the canonical form the policy judged (IPv4-mapped
                // IPv6 becomes IPv4), never to the form the client wrote.
                let Some(dest) = self.policy.permit(dest) else {
                    return refuse(self, &mut incoming, cell, DropReason::Policy);
                };
                if self.exit_circuits >= self.limits.max_exit_circuits {
                    return refuse(self, &mut incoming, cell, DropReason::Capacity);
                }
                Hop::Exit { dest }
            }
        };
        if to_client {
            let quota_ok = self.prefixes.circuit_allowed(src.ip())
                && (matches!(incoming, Incoming::Known(_)) || self.prefixes.link_allowed(src.ip()));
            if !quota_ok {
                return refuse(self, &mut incoming, cell, DropReason::Capacity);
            }
        }
        if self.circuits.is_full()
            || (matches!(incoming, Incoming::New(_)) && self.links.clients_full())
        {
            return refuse(self, &mut incoming, cell, DropReason::Capacity);
        }
        // Nothing refuses any more: install the client link if it is new.
        let in_link = match incoming {
            Incoming::Known(l) => l,
            Incoming::New(new) => {
                let l = self
                    .links
                    .insert(new)
                    .unwrap_or_else(|| unreachable!("the client table had room a moment ago"));
                self.prefixes.add_link(src.ip(), now_ms);
                l
            }
        };
        let cookie = if to_client { self.cookies.draw() } else { 0 };
        let Some(circuit) = self.circuits.insert(
            Circuit {
                prev_link: in_link,
                prev_id: routing.in_id,
                next,
                fwd,
                bwd,
                win_fwd: ReplayWindow::new(),
                win_bwd: ReplayWindow::new(),
                exit_counter: 1,
                cookie,
                mix_mean_ms: routing.mix_mean_ms,
            },
            now_ms,
        ) else {
            unreachable!("the table had a free slot a moment ago");
        };
        if let Some(l) = self.links.get_mut(in_link) {
            l.circuits += 1;
        }
        if to_client {
            self.prefixes.add_circuit(src.ip(), now_ms);
        }
        if matches!(next, Hop::Exit { .. }) {
            self.exit_circuits += 1;
        }
        self.stats.setups += 1;
        match next {
            Hop::Relay { link: out_link, id } => {
                let l = self
                    .links
                    .get_mut(out_link)
                    .unwrap_or_else(|| unreachable!("peer_link returned a live link"));
                l.circuits += 1;
                forward_setup(&layout, &secrets, &routing, cell);
                l.protect(
                    cell,
                    &Header {
                        circuit: id,
                        counter: 0,
                        command: Command::Setup,
                    },
                );
                Action::Send {
                    to: l.addr,
                    event: None,
                }
            }
            Hop::Exit { dest } => {
                let misses = &mut self.stats.key_cache_misses;
                let (_, bwd) = self
                    .circuits
                    .with_keys_ref(circuit, Direction::Backward, misses)
                    .unwrap_or_else(|| unreachable!("just inserted"));
                write_control(&layout, cell, &[]);
                cell[layout.stack_start()..layout.stack_end()].fill(0);
                let counter = bwd.shifted(0);
                add_backward(&layout, bwd, Command::Created, counter, cell);
                if let Some(l) = self.links.get_mut(in_link) {
                    // A 1-hop circuit: this relay is also the first hop. The CREATED
                    // costs the address no more than the setup it sent; to a client
                    // it carries the cookie in place of the counter.
                    if !l.spend(cell.len()) {
                        self.remove_circuit(circuit.slot);
                        return self.drop(DropReason::Unvalidated);
                    }
                    l.protect(
                        cell,
                        &Header {
                            circuit: routing.in_id,
                            counter: if to_client { cookie } else { counter },
                            command: Command::Created,
                        },
                    );
                }
                Action::Send {
                    to: src,
                    event: Some(Event::ExitOpened { circuit, dest }),
                }
            }
        }
    }
}

impl<A: Aead> Relay<A> {
    /// Answers a setup from a new address, under load and without a valid token, with
    /// a `RETRY` carrying the address's token, in the same buffer (one cell for one
    /// cell: no amplification), within the RETRY budgets of its prefix and of the
    /// relay (else `rate_limited`, unanswered). No public-key work is spent on it.
    fn retry(&mut self, src: SocketAddr, cell: &mut [u8], now_ms: u64) -> Action {
        if !self.prefixes.allow_retry(src.ip(), now_ms) {
            return self.drop(DropReason::RateLimited);
        }
        let token = self.tokens.token(src, now_ms / 1000 / RETRY_EPOCH_S);
        let r = self.cookies.retry_nonce();
        write_retry(&self.layout, &self.retry_key, &token, &r, cell);
        self.stats.retries_sent += 1;
        Action::Send {
            to: src,
            event: None,
        }
    }
}

/// Where a setup came from: a known link, or a new client (its link not installed
/// until the setup is accepted).
// One lives on the stack for the length of one setup; boxing the link would allocate
// per setup for nothing.
#[allow(clippy::large_enum_variant)]
enum Incoming {
    Known(u32),
    New(Link),
}
