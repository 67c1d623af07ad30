//! Onion-key rotation: what `shroudctl daemon` does, one step at a time.
//!
//! The daemon keeps a relay's key directory ([`crate::keydir`]) in this cycle, with
//! lifetime `L`, lead `D` and grace `G` ([`RotationPolicy`]):
//!
//! 1. A key `onion-T.key` is created at `T` and is *valid from then*: the relay
//!    is told to load it (`rotate`) at once, and only then is the relay's
//!    descriptor rewritten to list it, with `valid_until = T + L`. So no client can
//!    learn a key (from a peer list the authorities build from descriptors) before
//!    the relay holds it.
//! 2. At `T + L - D` the next key is created the same way (step 1). The
//!    authorities have `D` to publish it while the current key is still valid;
//!    clients pick the listed key with the latest expiry, so they move to the new
//!    key as their peer lists update.
//! 3. At `T + L` the key's validity ends and it leaves the descriptor, but the
//!    relay keeps it: a client with an older peer list may still use it.
//! 4. At `T + L + G` the key file is erased (renamed out of the key-file
//!    namespace, overwritten with zeros, removed) and the relay told to `rotate`,
//!    which drops the key from its memory (zeroized on drop).
//!
//! Circuits never depend on onion keys after setup, so none of this touches a cell
//! of an existing circuit. At most [`MAX_LOADED_KEYS`] keys exist at once when
//! `G + 3D <= 2L` ([`RotationPolicy::validate`]).
//!
//! Everything is derived from the directory (the number in each name) and the
//! relay's answers: the daemon keeps no state, so it can stop, restart, or run from
//! cron (`--once`) at any time. [`step`] performs everything due at `now`:
//! generating, erasing, reconciling the relay's loaded keys with the directory
//! (a `rotate` whenever they differ, so a failed or missed `rotate` is retried), and
//! rewriting the descriptor when its relay block would change. Time is an argument.
//!
//! Invariants of a successful step: the relay holds exactly the newest
//! [`MAX_LOADED_KEYS`] keys of the directory, and the descriptor (if configured)
//! lists only keys the relay holds.

use shroud_admin::{OnionKeyStatus, Request, Rotated, Status};
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use rand_core::OsRng;
use shroud_proto::keys::{OnionPublic, OnionSecret};
use shroud_proto::peerlist::{OnionKeyEntry, RelayDescriptor};

use crate::admin::AdminError;
use crate::descriptor::Descriptor;
use crate::exit;
use crate::keydir::{
    erase_key_file, key_file_name, scan_key_dir, KeyDirEntry, ERASING_PREFIX, MAX_LOADED_KEYS,
};
use crate::keyfile::{
    read_identity_key_file, read_onion_key_file, write_secret_key_file, KeyFileError,
};
use crate::peerfile::FileError;
use crate::time::format_date;

/// Why a rotation step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RotateError {
    /// A directory operation failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A key file could not be read or written.
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    /// The descriptor could not be written.
    #[error(transparent)]
    File(#[from] FileError),
    /// The relay could not be reached or refused.
    #[error(transparent)]
    Relay(#[from] AdminError),
    /// The relay does not hold the directory's keys after `rotate`.
    #[error(
        "after `rotate` the relay holds {held} onion key(s) that differ from the {want} newest \
         of {}: is its relay.onion_key_dir set to this directory?",
        dir.display()
    )]
    Mismatch {
        /// Keys the relay holds.
        held: usize,
        /// Keys it should hold.
        want: usize,
        /// The key directory.
        dir: PathBuf,
    },
}

impl RotateError {
    /// The exit code: that of the key-file, file or admin error, else
    /// [`exit::FAILURE`].
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::KeyFile(e) => e.exit_code(),
            Self::File(e) => e.exit_code(),
            Self::Relay(e) => e.exit_code(),
            Self::Io { .. } | Self::Mismatch { .. } => exit::FAILURE,
        }
    }

    /// A short, stable snake_case name for the error case.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Io { .. } => "io",
            Self::KeyFile(_) => "key_file",
            Self::File(_) => "file",
            Self::Relay(_) => "relay",
            Self::Mismatch { .. } => "mismatch",
        }
    }
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> RotateError + 'a {
    move |source| RotateError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// The durations of the cycle (seconds); see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationPolicy {
    /// How long a key is published as valid (`L`).
    pub lifetime: u64,
    /// How long after its validity ends a key is kept (`G`).
    pub grace: u64,
    /// How long before the current key's validity ends the next one is created
    /// (`D`).
    pub lead: u64,
}

impl RotationPolicy {
    /// Refuses durations that make no sense: a lead not shorter than the lifetime
    /// (keys would be created back to back), or a combination that keeps more than
    /// [`MAX_LOADED_KEYS`] keys alive at once (`G + 3D > 2L`).
    pub fn validate(&self) -> Result<(), String> {
        if self.lifetime == 0 || self.lead >= self.lifetime {
            return Err(format!(
                "--lead ({}s) must be shorter than --lifetime ({}s)",
                self.lead, self.lifetime
            ));
        }
        let need = u128::from(self.grace) + 3 * u128::from(self.lead);
        if need > 2 * u128::from(self.lifetime) {
            return Err(format!(
                "with --lifetime {}s, --lead {}s and --grace {}s more than {MAX_LOADED_KEYS} \
                 onion keys would exist at once (the relay holds {MAX_LOADED_KEYS}): make \
                 grace + 3 x lead at most 2 x lifetime",
                self.lifetime, self.lead, self.grace
            ));
        }
        Ok(())
    }

    /// End of validity of the key created at `created`.
    pub fn valid_until(&self, created: u64) -> u64 {
        created.saturating_add(self.lifetime)
    }

    /// When the next key is due while `created` is the newest.
    pub fn next_key_at(&self, created: u64) -> u64 {
        self.valid_until(created).saturating_sub(self.lead)
    }

    /// When the key created at `created` is erased (unless it is the newest).
    pub fn erase_at(&self, created: u64) -> u64 {
        self.valid_until(created).saturating_add(self.grace)
    }
}

/// What is due at a time, from the creation times of the keys present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Create a key with this creation time.
    pub generate: Option<u64>,
    /// Erase the keys with these creation times.
    pub erase: Vec<u64>,
}

/// The plan at `now` for keys created at `created` (newest first). The newest key
/// is never erased, and the key generated is always newer than every key present.
pub fn plan(created: &[u64], now: u64, policy: &RotationPolicy) -> Plan {
    let generate = match created.first() {
        None => Some(now),
        Some(&newest) if now >= policy.next_key_at(newest) => {
            Some(now.max(newest.saturating_add(1)))
        }
        Some(_) => None,
    };
    let keep_newest = if generate.is_some() { 0 } else { 1 };
    let erase = created
        .iter()
        .skip(keep_newest)
        .copied()
        .filter(|&c| now >= policy.erase_at(c))
        .collect();
    Plan { generate, erase }
}

/// Kinds of future events, for [`next_event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EventKind {
    /// The next key is created.
    Generate,
    /// A key's validity ends (it leaves the descriptor).
    Expire,
    /// A key is erased.
    Erase,
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Generate => "create the next onion key",
            Self::Expire => "drop an expired key from the descriptor",
            Self::Erase => "erase an old onion key",
        })
    }
}

/// The earliest event after `now` for keys created at `created` (newest first),
/// given that nothing is due at `now` (a [`plan`] was just carried out).
/// `descriptor` says whether expiries matter (they change the descriptor).
pub fn next_event(
    created: &[u64],
    now: u64,
    policy: &RotationPolicy,
    descriptor: bool,
) -> Option<(u64, EventKind)> {
    let mut events = Vec::new();
    if let Some(&newest) = created.first() {
        events.push((policy.next_key_at(newest), EventKind::Generate));
    }
    for (i, &c) in created.iter().enumerate() {
        if descriptor {
            events.push((policy.valid_until(c), EventKind::Expire));
        }
        if i > 0 {
            events.push((policy.erase_at(c), EventKind::Erase));
        }
    }
    events.into_iter().filter(|(t, _)| *t > now).min()
}

/// How the daemon talks to the relay (the admin socket in the binary, a fake in
/// tests).
pub trait RelayControl {
    /// The onion public keys the relay holds, newest first (from `status`).
    fn onion_keys(&mut self) -> Result<Vec<OnionPublic>, AdminError>;
    /// Asks the relay to re-read its keys; returns the keys it holds afterwards.
    fn rotate(&mut self) -> Result<Vec<OnionPublic>, AdminError>;
}

/// [`RelayControl`] over a relay's admin socket (one connection per request).
#[derive(Debug, Clone)]
pub struct AdminRelay {
    /// The admin socket.
    pub socket: PathBuf,
}

impl AdminRelay {
    fn keys_of(&self, keys: &[OnionKeyStatus]) -> Result<Vec<OnionPublic>, AdminError> {
        keys.iter()
            .map(|k| {
                k.public
                    .parse::<OnionPublic>()
                    .map_err(|_| AdminError::BadReply {
                        path: self.socket.clone(),
                        reason: "an onion key is not a base64 public key".into(),
                    })
            })
            .collect()
    }
}

impl RelayControl for AdminRelay {
    fn onion_keys(&mut self) -> Result<Vec<OnionPublic>, AdminError> {
        let (status, _) = crate::admin::request_as::<Status>(&self.socket, &Request::Status)?;
        self.keys_of(&status.onion_keys)
    }

    fn rotate(&mut self) -> Result<Vec<OnionPublic>, AdminError> {
        let (rotated, _) = crate::admin::request_as::<Rotated>(&self.socket, &Request::Rotate)?;
        self.keys_of(&rotated.onion_keys)
    }
}

/// What goes into the relay's descriptor besides its onion keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescriptorConfig {
    /// Where to write the descriptor.
    pub out: PathBuf,
    /// The relay's secret identity key file (signs the descriptor).
    pub identity_key: PathBuf,
    /// The relay's address.
    pub addr: IpAddr,
    /// Its port range.
    pub ports: (u16, u16),
    /// Exit flag.
    pub exit: bool,
    /// Selection weight.
    pub weight: u32,
}

/// The daemon's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// The relay's key directory (`relay.onion_key_dir`).
    pub key_dir: PathBuf,
    /// The cycle's durations.
    pub policy: RotationPolicy,
    /// The descriptor to maintain, if any.
    pub descriptor: Option<DescriptorConfig>,
}

/// Something a step did or noticed, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// A key was created.
    Generated {
        /// Its file.
        path: PathBuf,
        /// Its public key.
        public: OnionPublic,
        /// Its end of validity.
        valid_until: u64,
    },
    /// A key file was erased.
    Erased {
        /// Its file.
        path: PathBuf,
    },
    /// The relay was told to rotate and now holds these keys.
    Rotated {
        /// Keys held, newest first.
        keys: Vec<OnionPublic>,
    },
    /// The descriptor was written.
    Descriptor {
        /// Its file.
        path: PathBuf,
        /// Keys listed.
        keys: usize,
    },
    /// A directory entry that is not a key file.
    Ignored {
        /// The entry.
        path: PathBuf,
    },
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Generated {
                path,
                public,
                valid_until,
            } => write!(
                f,
                "created onion key {} (public {public}, valid until {})",
                path.display(),
                format_date(*valid_until)
            ),
            Self::Erased { path } => write!(
                f,
                "erased onion key {} (overwritten with zeros, removed)",
                path.display()
            ),
            Self::Rotated { keys } => write!(
                f,
                "relay rotated: it holds {} onion key(s), newest {}",
                keys.len(),
                keys.first().map(ToString::to_string).unwrap_or_default()
            ),
            Self::Descriptor { path, keys } => write!(
                f,
                "wrote descriptor {} ({keys} onion key(s)); authorities add it with \
                 `shroudctl peers import LIST --descriptor {}`",
                path.display(),
                path.display()
            ),
            Self::Ignored { path } => write!(
                f,
                "warning: ignoring {}: not named onion-<UNIX_SECONDS>.key",
                path.display()
            ),
        }
    }
}

/// The outcome of a successful [`step`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepReport {
    /// What was done, in order.
    pub notes: Vec<Note>,
    /// The next event, if any.
    pub next: Option<(u64, EventKind)>,
}

impl StepReport {
    /// Whether the step changed anything (keys, relay or descriptor).
    pub fn did_something(&self) -> bool {
        self.notes
            .iter()
            .any(|n| !matches!(n, Note::Ignored { .. }))
    }
}

/// Performs everything due at `now` (see the [module docs](self)). On error the
/// work done so far stays done (a created key stays; an erased key stays erased);
/// the next step picks up from the directory.
pub fn step(
    cfg: &DaemonConfig,
    now: u64,
    relay: &mut dyn RelayControl,
) -> Result<StepReport, RotateError> {
    let dir = &cfg.key_dir;
    let mut notes = Vec::new();
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_error("create the key directory", dir))?;
    }
    let listing = scan_key_dir(dir).map_err(io_error("read the key directory", dir))?;
    for p in &listing.ignored {
        let leftover = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(ERASING_PREFIX));
        if leftover {
            erase_key_file(p).map_err(io_error("finish erasing", p))?;
            notes.push(Note::Erased { path: p.clone() });
        } else {
            notes.push(Note::Ignored { path: p.clone() });
        }
    }
    let mut keys: Vec<KeyDirEntry> = listing.keys;
    let created: Vec<u64> = keys.iter().map(|k| k.created).collect();
    let todo = plan(&created, now, &cfg.policy);
    let mut changed = false;

    if let Some(t) = todo.generate {
        let path = dir.join(key_file_name(t));
        let secret = OnionSecret::generate(&mut OsRng);
        write_secret_key_file(&path, &secret.to_bytes(), true)?;
        notes.push(Note::Generated {
            path: path.clone(),
            public: secret.public(),
            valid_until: cfg.policy.valid_until(t),
        });
        keys.insert(0, KeyDirEntry { created: t, path });
        changed = true;
    }
    for c in &todo.erase {
        if let Some(i) = keys.iter().position(|k| k.created == *c) {
            let k = keys.remove(i);
            erase_key_file(&k.path).map_err(io_error("erase", &k.path))?;
            notes.push(Note::Erased { path: k.path });
            changed = true;
        }
    }

    // Public keys of what the relay should hold; the secrets are dropped
    // (zeroized) as soon as their public key is known.
    let mut held: Vec<(u64, OnionPublic)> = Vec::new();
    for k in keys.iter().take(MAX_LOADED_KEYS) {
        let public = read_onion_key_file(&k.path)?.public();
        held.push((k.created, public));
    }
    let want: Vec<OnionPublic> = held.iter().map(|(_, p)| *p).collect();

    let have = if changed {
        None
    } else {
        Some(relay.onion_keys()?)
    };
    if have.as_ref() != Some(&want) {
        let got = relay.rotate()?;
        if got != want {
            return Err(RotateError::Mismatch {
                held: got.len(),
                want: want.len(),
                dir: dir.clone(),
            });
        }
        notes.push(Note::Rotated { keys: got });
    }

    if let Some(d) = &cfg.descriptor {
        let listed: Vec<OnionKeyEntry> = held
            .iter()
            .map(|(c, key)| OnionKeyEntry {
                key: *key,
                valid_until: cfg.policy.valid_until(*c),
            })
            .filter(|e| e.valid_until > now)
            .collect();
        if let Some(n) = write_descriptor(d, listed, now)? {
            notes.push(Note::Descriptor {
                path: d.out.clone(),
                keys: n,
            });
        }
    }

    let created: Vec<u64> = keys.iter().map(|k| k.created).collect();
    Ok(StepReport {
        notes,
        next: next_event(&created, now, &cfg.policy, cfg.descriptor.is_some()),
    })
}

/// Writes the descriptor if its relay block would differ from the file's (or the
/// file is missing, unreadable or badly signed). Returns the number of keys listed
/// when it wrote.
fn write_descriptor(
    d: &DescriptorConfig,
    mut onion_keys: Vec<OnionKeyEntry>,
    now: u64,
) -> Result<Option<usize>, RotateError> {
    let identity = read_identity_key_file(&d.identity_key)?;
    onion_keys.sort_by_key(|k| (k.valid_until, k.key));
    let relay = RelayDescriptor {
        identity: identity.public(),
        addr: d.addr,
        ports: d.ports,
        onion_keys,
        exit: d.exit,
        weight: d.weight,
    };
    let current = std::fs::read_to_string(&d.out)
        .ok()
        .and_then(|t| Descriptor::parse_and_verify(&t).ok());
    if current.is_some_and(|c| c.relay == relay) {
        return Ok(None);
    }
    let n = relay.onion_keys.len();
    let desc = Descriptor::sign(relay, &identity, now);
    crate::peerfile::write_atomic(&d.out, desc.encode().as_bytes(), true)?;
    Ok(Some(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const H: u64 = 3_600;

    fn policy() -> RotationPolicy {
        RotationPolicy {
            lifetime: 24 * H,
            grace: 2 * H,
            lead: H,
        }
    }

    #[test]
    fn policy_limits() {
        assert!(policy().validate().is_ok());
        let p = |lifetime, grace, lead| RotationPolicy {
            lifetime,
            grace,
            lead,
        };
        assert!(p(H, 0, H).validate().is_err());
        assert!(p(24 * H, 0, 30 * H).validate().is_err());
        // grace + 3 lead <= 2 lifetime.
        assert!(p(24 * H, 45 * H, H).validate().is_ok());
        assert!(p(24 * H, 46 * H, H).validate().is_err());
    }

    #[test]
    fn the_cycle() {
        let p = policy();
        // No key: create one now.
        assert_eq!(
            plan(&[], 1_000, &p),
            Plan {
                generate: Some(1_000),
                erase: vec![]
            }
        );
        // A fresh key: nothing; next is the next key at T + L - D.
        assert_eq!(plan(&[1_000], 1_000 + H, &p).generate, None);
        assert_eq!(
            next_event(&[1_000], 1_000, &p, true),
            Some((1_000 + 23 * H, EventKind::Generate))
        );
        // At T + L - D the next key is created.
        let t1 = 1_000 + 23 * H;
        assert_eq!(plan(&[1_000], t1, &p).generate, Some(t1));
        // Then the old key expires at T + L (descriptor), is erased at T + L + G.
        assert_eq!(
            next_event(&[t1, 1_000], t1, &p, true),
            Some((1_000 + 24 * H, EventKind::Expire))
        );
        assert_eq!(
            next_event(&[t1, 1_000], 1_000 + 24 * H, &p, true),
            Some((1_000 + 26 * H, EventKind::Erase))
        );
        assert_eq!(
            next_event(&[t1, 1_000], 1_000 + 24 * H, &p, false),
            Some((1_000 + 26 * H, EventKind::Erase))
        );
        assert_eq!(
            plan(&[t1, 1_000], 1_000 + 26 * H, &p),
            Plan {
                generate: None,
                erase: vec![1_000]
            }
        );
        // The newest key is never erased, even long expired; a new one comes first.
        let late = 1_000 + 100 * H;
        assert_eq!(
            plan(&[1_000], late, &p),
            Plan {
                generate: Some(late),
                erase: vec![1_000]
            }
        );
        // A generated key is always newer than the newest present.
        assert_eq!(
            plan(&[5_000], 4_000 + 30 * H, &p).generate,
            Some(4_000 + 30 * H)
        );
        let q = RotationPolicy {
            lifetime: 10,
            grace: 0,
            lead: 5,
        };
        assert_eq!(plan(&[100], 90 + 20, &q).generate, Some(110));
        assert_eq!(plan(&[200], 205, &q).generate, Some(205));
        assert_eq!(plan(&[200], 205, &q).generate, Some(205));
        assert_eq!(plan(&[2_000], 1_000, &q).generate, None);
    }

    #[test]
    fn at_most_three_keys_through_many_cycles() {
        let p = policy();
        let mut keys: Vec<u64> = Vec::new();
        let mut now = 0;
        while now < 30 * 24 * H {
            let todo = plan(&keys, now, &p);
            if let Some(t) = todo.generate {
                keys.insert(0, t);
            }
            keys.retain(|k| !todo.erase.contains(k));
            assert!(keys.len() <= MAX_LOADED_KEYS, "{now}: {keys:?}");
            assert!(!keys.is_empty());
            // Never sleep past an event.
            now = next_event(&keys, now, &p, true).expect("next").0;
        }
    }

    /// A relay that loads the newest 3 keys of a directory, as shroud-relay does.
    struct FakeRelay {
        dir: PathBuf,
        held: Vec<OnionPublic>,
        rotations: usize,
        down: bool,
    }

    fn down(dir: &Path) -> AdminError {
        AdminError::Connect {
            path: dir.join("admin.sock"),
            source: io::Error::from(io::ErrorKind::NotFound),
        }
    }

    impl RelayControl for FakeRelay {
        fn onion_keys(&mut self) -> Result<Vec<OnionPublic>, AdminError> {
            if self.down {
                return Err(down(&self.dir));
            }
            Ok(self.held.clone())
        }
        fn rotate(&mut self) -> Result<Vec<OnionPublic>, AdminError> {
            if self.down {
                return Err(down(&self.dir));
            }
            let l = scan_key_dir(&self.dir).expect("scan");
            self.held = l
                .loaded()
                .iter()
                .map(|k| read_onion_key_file(&k.path).expect("key").public())
                .collect();
            self.rotations += 1;
            Ok(self.held.clone())
        }
    }

    #[test]
    fn steps_keep_the_relay_and_descriptor_in_line_with_the_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let key_dir = tmp.path().join("keys");
        let id_path = tmp.path().join("identity.key");
        write_secret_key_file(&id_path, &[7; 32], false).expect("identity");
        let out = tmp.path().join("relay.descriptor");
        let cfg = DaemonConfig {
            key_dir: key_dir.clone(),
            policy: policy(),
            descriptor: Some(DescriptorConfig {
                out: out.clone(),
                identity_key: id_path,
                addr: "192.0.2.7".parse().expect("addr"),
                ports: (9000, 9001),
                exit: false,
                weight: 10,
            }),
        };
        let mut relay = FakeRelay {
            dir: key_dir.clone(),
            held: Vec::new(),
            rotations: 0,
            down: false,
        };
        let t0 = 1_764_000_000;
        // First step: a key, the relay told, the descriptor written.
        let r = step(&cfg, t0, &mut relay).expect("step");
        assert!(matches!(r.notes[0], Note::Generated { .. }), "{r:?}");
        assert_eq!(relay.rotations, 1);
        let mode = std::fs::metadata(key_dir.join(key_file_name(t0)))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let d = Descriptor::parse_and_verify(&std::fs::read_to_string(&out).expect("desc"))
            .expect("valid descriptor");
        assert_eq!(d.relay.onion_keys.len(), 1);
        assert_eq!(d.relay.onion_keys[0].key, relay.held[0]);
        assert_eq!(d.relay.onion_keys[0].valid_until, t0 + 24 * H);
        assert_eq!(r.next, Some((t0 + 23 * H, EventKind::Generate)));
        // Nothing due: nothing done, no rotate.
        let r = step(&cfg, t0 + H, &mut relay).expect("step");
        assert!(!r.did_something(), "{r:?}");
        assert_eq!(relay.rotations, 1);
        // A relay restarted with other keys is brought back in line.
        relay.held.clear();
        let r = step(&cfg, t0 + H, &mut relay).expect("step");
        assert!(matches!(r.notes[..], [Note::Rotated { .. }]), "{r:?}");
        // The next key: created, loaded by the relay, then listed.
        let t1 = t0 + 23 * H;
        let r = step(&cfg, t1, &mut relay).expect("step");
        assert_eq!(r.notes.len(), 3, "{r:?}");
        assert_eq!(relay.held.len(), 2);
        let d = Descriptor::parse_and_verify(&std::fs::read_to_string(&out).expect("desc"))
            .expect("valid");
        assert_eq!(d.relay.onion_keys.len(), 2);
        // The old key leaves the descriptor at its expiry but stays with the relay.
        step(&cfg, t0 + 24 * H, &mut relay).expect("step");
        let d = Descriptor::parse_and_verify(&std::fs::read_to_string(&out).expect("desc"))
            .expect("valid");
        assert_eq!(d.relay.onion_keys.len(), 1);
        assert_eq!(relay.held.len(), 2);
        // After the grace period it is erased, and the relay drops it.
        let old = key_dir.join(key_file_name(t0));
        let r = step(&cfg, t0 + 26 * H, &mut relay).expect("step");
        assert!(
            r.notes.contains(&Note::Erased { path: old.clone() }),
            "{r:?}"
        );
        assert!(!old.exists());
        assert_eq!(relay.held.len(), 1);
        // A relay that is down: the step fails, the key stays, the descriptor does
        // not list it yet; the next step (relay up) catches up.
        relay.down = true;
        let t2 = t1 + 23 * H;
        let e = step(&cfg, t2, &mut relay).expect_err("relay down");
        assert_eq!(e.kind(), "relay");
        assert_eq!(e.exit_code(), exit::FAILURE);
        assert!(key_dir.join(key_file_name(t2)).exists());
        let d = Descriptor::parse_and_verify(&std::fs::read_to_string(&out).expect("desc"))
            .expect("valid");
        assert_eq!(d.relay.onion_keys.len(), 1);
        relay.down = false;
        let r = step(&cfg, t2 + 60, &mut relay).expect("step");
        assert!(
            r.notes.iter().any(|n| matches!(n, Note::Rotated { .. })),
            "{r:?}"
        );
        let d = Descriptor::parse_and_verify(&std::fs::read_to_string(&out).expect("desc"))
            .expect("valid");
        assert_eq!(d.relay.onion_keys.len(), 2);
        // Stray files are reported, leftovers of an interrupted erasure erased.
        std::fs::write(key_dir.join("notes.txt"), "x").expect("write");
        std::fs::write(key_dir.join(".erasing-onion-1.key"), "x").expect("write");
        let r = step(&cfg, t2 + 120, &mut relay).expect("step");
        assert!(r.notes.iter().any(|n| matches!(n, Note::Ignored { .. })));
        assert!(!key_dir.join(".erasing-onion-1.key").exists());
    }

    #[test]
    fn a_relay_that_does_not_use_the_directory_is_an_error() {
        struct Stubborn;
        impl RelayControl for Stubborn {
            fn onion_keys(&mut self) -> Result<Vec<OnionPublic>, AdminError> {
                Ok(vec![OnionPublic([1; 32])])
            }
            fn rotate(&mut self) -> Result<Vec<OnionPublic>, AdminError> {
                Ok(vec![OnionPublic([1; 32])])
            }
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let cfg = DaemonConfig {
            key_dir: tmp.path().join("keys"),
            policy: policy(),
            descriptor: None,
        };
        let e = step(&cfg, 1_000, &mut Stubborn).expect_err("mismatch");
        assert_eq!(e.kind(), "mismatch");
        assert!(e.to_string().contains("relay.onion_key_dir"), "{e}");
    }
}
