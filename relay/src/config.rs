//! The relay's TOML configuration.
//!
//! One file, every key optional except the key files and the peer list; unknown keys
//! are refused (a typo must not silently fall back to a default). `deploy/relay.toml`
//! shows every key with its default. [`Config::load`] parses and validates; any error
//! there is a configuration error (exit code 78, `EX_CONFIG`).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use shroud_proto::policy::ExitPolicy;
use shroud_proto::relay::RelayLimits;

use shroud_keystore::keydir::{scan_key_dir, MAX_LOADED_KEYS};

use crate::spec::{CryptoChoice, DriverChoice, IoConfig};

/// Exit code for a bad configuration (sysexits.h `EX_CONFIG`).
pub const EX_CONFIG: i32 = 78;

/// Largest `[limits] max_circuits` (per worker): 16 M slots, about 10 GiB of circuit
/// table at ~630 bytes a slot.
pub const MAX_CIRCUITS: usize = 1 << 24;

/// Largest `[limits] key_cache` (per worker): 1 M entries, about 800 MiB.
pub const MAX_KEY_CACHE: usize = 1 << 20;

/// A configuration error, with the file and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML did not parse or has unknown or mistyped keys.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{path}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The offending key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// One onion key file to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnionKeyFile {
    /// The file.
    pub path: PathBuf,
    /// Its creation time (the number in its name) when it comes from
    /// `relay.onion_key_dir`.
    pub created: Option<u64>,
}

/// The onion key files selected by the configuration ([`Config::onion_key_files`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnionKeyFiles {
    /// The files to load, newest first (1 to 3).
    pub files: Vec<OnionKeyFile>,
    /// Entries of `relay.onion_key_dir` that are not key files (to warn about).
    pub ignored: Vec<PathBuf>,
    /// Key files of `relay.onion_key_dir` beyond the 3 newest (not loaded).
    pub unused: usize,
}

/// `[relay]`: identity, keys, directory, exit policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySection {
    /// Identity key file (ed25519, one base64 line, mode 0600).
    pub identity_key: PathBuf,
    /// Onion key files (x25519), newest first, at most 3. Exactly one of
    /// `onion_keys` and `onion_key_dir` must be given.
    #[serde(default)]
    pub onion_keys: Vec<PathBuf>,
    /// A directory of onion key files named `onion-<UNIX_SECONDS>.key` (the layout
    /// `shroudctl daemon` maintains): the relay loads the 3 newest (largest number)
    /// at start, on SIGHUP/`reload` and on `rotate`, and warns about other entries.
    #[serde(default)]
    pub onion_key_dir: Option<PathBuf>,
    /// The signed peer list file.
    pub peer_list: PathBuf,
    /// Authority public keys (base64) whose signatures count.
    pub authorities: Vec<String>,
    /// How many distinct authorities must have signed.
    #[serde(default = "one")]
    pub authority_threshold: usize,
    /// Where the last accepted peer-list serial is kept (rollback protection across
    /// restarts); default [`DEFAULT_PEER_LIST_STATE`]. A missing file is created at
    /// the first start; an unreadable or corrupt one is a configuration error, and so
    /// is failing to write it (see [`crate::daemon::load_peer_list`]).
    #[serde(default = "default_peer_list_state")]
    pub peer_list_state: PathBuf,
    /// Exit policy rules, first match wins; empty = not an exit.
    #[serde(default)]
    pub exit_policy: Vec<String>,
    /// The setup journal: every accepted setup is recorded here before it is acted on
    /// and reloaded at start, so no setup is accepted twice across restarts (also
    /// `PATH.old`). Must be on a filesystem that survives the relay's restarts.
    #[serde(default = "default_setup_journal")]
    pub setup_journal: PathBuf,
}

fn one() -> usize {
    1
}

fn default_setup_journal() -> PathBuf {
    PathBuf::from("/var/lib/shroud/setup-journal")
}

/// Default of `relay.peer_list_state`: beside the peer list in the relay's state
/// directory (systemd `StateDirectory=shroud`).
pub const DEFAULT_PEER_LIST_STATE: &str = "/var/lib/shroud/peer-list.serial";

fn default_peer_list_state() -> PathBuf {
    PathBuf::from(DEFAULT_PEER_LIST_STATE)
}

/// `[network]`: where to listen.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSection {
    /// Listen addresses (IPv4 and/or IPv6).
    pub listen: Vec<IpAddr>,
    /// First port; worker `i` listens on `base_port + i`.
    pub base_port: u16,
    /// Worker threads (one per core you give the relay).
    pub workers: usize,
    /// CPUs to pin workers to, one per worker (empty = no pinning).
    pub cpus: Vec<usize>,
    /// Requested `SO_RCVBUF`/`SO_SNDBUF` per socket.
    pub socket_buffer_bytes: usize,
}

impl Default for NetworkSection {
    fn default() -> Self {
        NetworkSection {
            listen: vec![IpAddr::from([127, 0, 0, 1])],
            base_port: 9000,
            workers: 1,
            cpus: Vec::new(),
            socket_buffer_bytes: 8 << 20,
        }
    }
}

/// `[limits]`: per-worker table sizes and rates.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Circuits per worker.
    pub max_circuits: usize,
    /// Entries of the cache of expanded layer keys per worker (one per circuit and
    /// direction carrying cells; rounded up to a power of two).
    pub key_cache: usize,
    /// Client links per worker (peer links have their own table, sized from the
    /// peer list).
    pub max_links: usize,
    /// Client links one source prefix (IPv4 /24, IPv6 /64) may hold per worker.
    pub links_per_prefix: u32,
    /// Circuits the clients of one source prefix may hold per worker.
    pub circuits_per_prefix: u32,
    /// Idle seconds before a circuit expires.
    pub circuit_idle_secs: u64,
    /// Idle seconds before a link with no circuits is forgotten.
    pub link_idle_secs: u64,
    /// Accepted setup clock skew, seconds.
    pub setup_skew_secs: u64,
    /// Setups remembered per onion key and filter generation.
    pub setup_filter_capacity: usize,
    /// Setups per second per source prefix.
    pub setup_rate: u32,
    /// Setup burst per source prefix.
    pub setup_burst: u32,
    /// Setups per second given public-key work from addresses without a link, all
    /// together.
    pub newcomer_setup_rate: u32,
    /// Once that is spent: RETRY replies per second per source prefix.
    pub retry_prefix_rate: u32,
    /// Once that is spent: RETRY replies per second, all prefixes together.
    pub retry_rate: u32,
    /// Exit sockets per worker (one per exit circuit).
    pub exit_sockets: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        let d = RelayLimits::default();
        LimitsSection {
            max_circuits: d.max_circuits,
            key_cache: d.key_cache,
            max_links: d.max_links,
            links_per_prefix: d.links_per_prefix,
            circuits_per_prefix: d.circuits_per_prefix,
            circuit_idle_secs: d.circuit_idle_ms / 1000,
            link_idle_secs: d.link_idle_ms / 1000,
            setup_skew_secs: d.setup_skew_s,
            setup_filter_capacity: d.setup_filter_capacity,
            setup_rate: d.setup_rate,
            setup_burst: d.setup_burst,
            newcomer_setup_rate: d.newcomer_setup_rate,
            retry_prefix_rate: d.retry_prefix_rate,
            retry_rate: d.retry_rate,
            exit_sockets: IoConfig::default().exit_sockets,
        }
    }
}

/// `[io]`: driver and batching.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IoSection {
    /// `auto` (io_uring, falling back to recvmmsg), `uring` or `mmsg`.
    pub driver: DriverChoice,
    /// Receive operations in flight per worker (64 KiB GRO buffer each).
    pub recv_slots: usize,
    /// Send operations in flight per worker.
    pub send_slots: usize,
    /// Cells a worker can originate and have in flight at once (exit replies,
    /// expiry notices); beyond it they are dropped as queue_full.
    pub tx_cells: usize,
    /// Setup cells given public-key work per batch (the rest are dropped as
    /// rate_limited so setups cannot starve data cells).
    pub setup_budget: u32,
    /// AES-GCM backend: `ring` or `rustcrypto`.
    pub crypto: CryptoChoice,
    /// UDP GRO/GSO batching (off = one datagram per cell).
    pub gro_gso: bool,
    /// Zero-copy sends (`SENDMSG_ZC`, io_uring driver only).
    pub zero_copy_send: bool,
    /// Microseconds an io_uring worker's wait gathers completions while small
    /// datagrams come in, as in a flood (0 = never; needs Linux 6.12, ignored before).
    pub batch_wait_us: u32,
}

impl Default for IoSection {
    fn default() -> Self {
        let d = IoConfig::default();
        IoSection {
            driver: d.driver,
            recv_slots: d.recv_slots,
            send_slots: d.send_slots,
            tx_cells: d.tx_cells,
            setup_budget: d.setup_budget,
            crypto: CryptoChoice::Ring,
            gro_gso: d.gro_gso,
            zero_copy_send: d.zero_copy_send,
            batch_wait_us: d.batch_wait_us,
        }
    }
}

/// `[mix]`: mix mode, which clients choose per circuit (docs/SECURITY.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MixSection {
    /// The largest mean delay (ms) a client may ask of this relay per hop; 0 offers no
    /// mix mode (setups asking for a delay are refused with reason `mix`).
    pub max_mean_delay_ms: u16,
    /// Cells each worker can hold for their delay (about 1 KiB each, allocated at
    /// start); a cell that finds the queue full is dropped (`queue_full`, and
    /// `shroud_mix_overflow`).
    pub queue_cells: usize,
    /// Constant-rate links: every link to a peer relay that carries circuits is padded
    /// to this many cells a second with link padding (0: off).
    pub link_cells_per_sec: u32,
}

impl Default for MixSection {
    fn default() -> Self {
        MixSection {
            max_mean_delay_ms: 2000,
            queue_cells: 16384,
            link_cells_per_sec: 0,
        }
    }
}

/// `[admin]`: the admin socket.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// Unix socket path (created owner-only).
    pub socket: PathBuf,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            socket: PathBuf::from("/run/shroud/admin.sock"),
        }
    }
}

/// `[metrics]`: Prometheus exposition.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Address of the `/metrics` HTTP endpoint; absent = disabled.
    pub listen: Option<SocketAddr>,
    /// A file holding the bearer token scrapers must send (`Authorization: Bearer
    /// TOKEN`) for `/metrics`; absent = no token.
    pub bearer_token_file: Option<PathBuf>,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `error`, `warn`, `info`, `debug` or `trace` (keys, payloads and client
    /// addresses are never logged above `debug`).
    pub level: String,
    /// `text` (one line per event, for people and journald) or `json` (one JSON
    /// object per line, for log shippers).
    pub format: LogFormat,
}

/// How log lines are written (`[log] format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (coloured only on a terminal, see [`crate::logging`]).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `fields` (with `message`),
    /// `target`.
    Json,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[relay]`.
    pub relay: RelaySection,
    /// `[network]`.
    #[serde(default)]
    pub network: NetworkSection,
    /// `[limits]`.
    #[serde(default)]
    pub limits: LimitsSection,
    /// `[io]`.
    #[serde(default)]
    pub io: IoSection,
    /// `[mix]`.
    #[serde(default)]
    pub mix: MixSection,
    /// `[admin]`.
    #[serde(default)]
    pub admin: AdminSection,
    /// `[metrics]`.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// `[log]`.
    #[serde(default)]
    pub log: LogSection,
    /// The file it came from (relative paths in it are relative to its directory).
    #[serde(skip)]
    pub path: PathBuf,
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text` as if read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        c.path = path.to_path_buf();
        let base = path.parent().unwrap_or(Path::new("."));
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut c.relay.identity_key);
        abs(&mut c.relay.peer_list);
        c.relay.onion_keys.iter_mut().for_each(abs);
        if let Some(p) = c.relay.onion_key_dir.as_mut() {
            abs(p);
        }
        abs(&mut c.relay.peer_list_state);
        abs(&mut c.relay.setup_journal);
        abs(&mut c.admin.socket);
        if let Some(p) = c.metrics.bearer_token_file.as_mut() {
            abs(p);
        }
        c.validate()?;
        Ok(c)
    }

    fn invalid(&self, key: &'static str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            key,
            message: message.into(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.mix.max_mean_delay_ms > 0 && self.mix.queue_cells == 0 {
            return Err(self.invalid(
                "mix.queue_cells",
                "must be positive while mix.max_mean_delay_ms offers mix mode",
            ));
        }
        if self.mix.link_cells_per_sec > 1_000_000 {
            return Err(self.invalid("mix.link_cells_per_sec", "at most 1000000"));
        }
        if self.mix.queue_cells > 1 << 22 {
            return Err(self.invalid("mix.queue_cells", "at most 4194304 (4 GiB of cells)"));
        }
        let n = &self.network;
        if n.workers == 0 || n.workers > 256 {
            return Err(self.invalid("network.workers", "must be between 1 and 256"));
        }
        if n.listen.is_empty() {
            return Err(self.invalid("network.listen", "needs at least one address"));
        }
        if n.base_port == 0 || usize::from(n.base_port) + n.workers - 1 > 65535 {
            return Err(self.invalid(
                "network.base_port",
                "base_port + workers - 1 must be a port (1..=65535)",
            ));
        }
        if !n.cpus.is_empty() && n.cpus.len() != n.workers {
            return Err(self.invalid(
                "network.cpus",
                format!(
                    "lists {} CPUs for {} workers (give one per worker, or none)",
                    n.cpus.len(),
                    n.workers
                ),
            ));
        }
        match (&self.relay.onion_key_dir, self.relay.onion_keys.len()) {
            (Some(_), n) if n > 0 => {
                return Err(self.invalid(
                    "relay.onion_key_dir",
                    "give either relay.onion_keys (key files) or relay.onion_key_dir (a key \
                     directory), not both",
                ))
            }
            (None, 0) => {
                return Err(self.invalid(
                    "relay.onion_keys",
                    "give relay.onion_keys (1 to 3 onion key files, newest first) or \
                     relay.onion_key_dir (a directory of onion-<UNIX_SECONDS>.key files)",
                ))
            }
            (None, n) if n > MAX_LOADED_KEYS => {
                return Err(self.invalid(
                    "relay.onion_keys",
                    "list 1 to 3 onion key files, newest first",
                ))
            }
            _ => {}
        }
        if self.relay.authorities.is_empty() {
            return Err(self.invalid(
                "relay.authorities",
                "list at least one authority public key",
            ));
        }
        if self.relay.authority_threshold == 0
            || self.relay.authority_threshold > self.relay.authorities.len()
        {
            return Err(self.invalid(
                "relay.authority_threshold",
                format!(
                    "must be between 1 and the number of authorities ({})",
                    self.relay.authorities.len()
                ),
            ));
        }
        ExitPolicy::parse(&self.relay.exit_policy)
            .map_err(|e| self.invalid("relay.exit_policy", e.to_string()))?;
        let l = &self.limits;
        if l.max_circuits == 0 || l.max_links == 0 || l.setup_filter_capacity == 0 {
            return Err(self.invalid(
                "limits",
                "max_circuits, max_links and setup_filter_capacity must be positive",
            ));
        }
        if l.max_circuits > MAX_CIRCUITS {
            return Err(self.invalid(
                "limits.max_circuits",
                format!("at most {MAX_CIRCUITS} per worker"),
            ));
        }
        if l.key_cache == 0 || l.key_cache > MAX_KEY_CACHE {
            return Err(self.invalid(
                "limits.key_cache",
                format!("between 1 and {MAX_KEY_CACHE} entries"),
            ));
        }
        if l.circuit_idle_secs == 0 || l.link_idle_secs == 0 {
            return Err(self.invalid(
                "limits",
                "circuit_idle_secs and link_idle_secs must be at least 1 (0 would expire every circuit at once)",
            ));
        }
        if self.io.recv_slots == 0 || self.io.send_slots == 0 || self.io.tx_cells == 0 {
            return Err(self.invalid("io", "recv_slots, send_slots and tx_cells must be positive"));
        }
        if self.io.batch_wait_us > 10_000 {
            return Err(self.invalid(
                "io.batch_wait_us",
                "at most 10000 (10 ms); it adds up to that much latency per hop",
            ));
        }
        if !["error", "warn", "info", "debug", "trace"].contains(&self.log.level.as_str()) {
            return Err(self.invalid("log.level", "one of error, warn, info, debug, trace"));
        }
        Ok(())
    }

    /// The onion key files to load now, newest first: the `onion_keys` list, or the
    /// [`MAX_LOADED_KEYS`] newest key files of `onion_key_dir` (read at each call).
    pub fn onion_key_files(&self) -> Result<OnionKeyFiles, ConfigError> {
        let Some(dir) = &self.relay.onion_key_dir else {
            return Ok(OnionKeyFiles {
                files: self
                    .relay
                    .onion_keys
                    .iter()
                    .map(|p| OnionKeyFile {
                        path: p.clone(),
                        created: None,
                    })
                    .collect(),
                ignored: Vec::new(),
                unused: 0,
            });
        };
        let listing = scan_key_dir(dir).map_err(|e| {
            self.invalid(
                "relay.onion_key_dir",
                format!("cannot read {}: {e}", dir.display()),
            )
        })?;
        if listing.keys.is_empty() {
            return Err(self.invalid(
                "relay.onion_key_dir",
                format!(
                    "{} holds no onion key file (named onion-<UNIX_SECONDS>.key); create one \
                     with `shroudctl daemon --once` or `shroudctl genkey --out`",
                    dir.display()
                ),
            ));
        }
        Ok(OnionKeyFiles {
            files: listing
                .loaded()
                .iter()
                .map(|k| OnionKeyFile {
                    path: k.path.clone(),
                    created: Some(k.created),
                })
                .collect(),
            unused: listing.keys.len() - listing.loaded().len(),
            ignored: listing.ignored,
        })
    }

    /// The exit policy (validated at load).
    pub fn exit_policy(&self) -> ExitPolicy {
        ExitPolicy::parse(&self.relay.exit_policy).unwrap_or_default()
    }

    /// Exit sockets per worker in force: `[limits] exit_sockets` when the exit policy
    /// accepts some destination, else 0 (a relay that is no exit holds no exit socket
    /// slots, no ready pool and no descriptors for them; changing the policy needs a
    /// restart anyway).
    pub fn exit_sockets(&self) -> usize {
        if self.exit_policy().is_exit() {
            self.limits.exit_sockets
        } else {
            0
        }
    }

    /// Per-worker protocol limits.
    pub fn relay_limits(&self) -> RelayLimits {
        let l = &self.limits;
        RelayLimits {
            max_circuits: l.max_circuits,
            key_cache: l.key_cache,
            max_exit_circuits: self.exit_sockets(),
            max_links: l.max_links,
            links_per_prefix: l.links_per_prefix,
            circuits_per_prefix: l.circuits_per_prefix,
            circuit_idle_ms: l.circuit_idle_secs * 1000,
            link_idle_ms: l.link_idle_secs * 1000,
            setup_skew_s: l.setup_skew_secs,
            setup_filter_capacity: l.setup_filter_capacity,
            setup_rate: l.setup_rate,
            setup_burst: l.setup_burst,
            newcomer_setup_rate: l.newcomer_setup_rate,
            retry_prefix_rate: l.retry_prefix_rate,
            retry_rate: l.retry_rate,
            max_mix_mean_ms: self.mix.max_mean_delay_ms,
            ..RelayLimits::default()
        }
    }

    /// Per-worker I/O sizing.
    pub fn io_config(&self) -> IoConfig {
        IoConfig {
            driver: self.io.driver,
            recv_slots: self.io.recv_slots,
            send_slots: self.io.send_slots,
            tx_cells: self.io.tx_cells,
            exit_sockets: self.exit_sockets(),
            setup_budget: self.io.setup_budget,
            gro_gso: self.io.gro_gso,
            zero_copy_send: self.io.zero_copy_send,
            batch_wait_us: self.io.batch_wait_us,
            mix_queue: if self.mix.max_mean_delay_ms > 0 {
                self.mix.queue_cells
            } else {
                0
            },
            link_cells_per_sec: self.mix.link_cells_per_sec,
            socket_buffer_bytes: self.network.socket_buffer_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[relay]
identity_key = "id.key"
onion_keys = ["onion.key"]
peer_list = "peers.list"
authorities = ["AAAA"]
"#;

    #[test]
    fn a_relay_that_is_no_exit_holds_no_exit_sockets() {
        let c = Config::parse(
            &format!("{MIN}\n[limits]\nexit_sockets = 300\n"),
            Path::new("r.toml"),
        )
        .unwrap();
        assert!(!c.exit_policy().is_exit());
        assert_eq!(c.io_config().exit_sockets, 0);
        assert_eq!(c.relay_limits().max_exit_circuits, 0);
        let c = Config::parse(
            &format!(
                "{}\n[limits]\nexit_sockets = 300\n",
                MIN.replace(
                    "authorities = [\"AAAA\"]",
                    "authorities = [\"AAAA\"]\nexit_policy = [\"accept 10.0.0.0/8:*\"]"
                )
            ),
            Path::new("r.toml"),
        )
        .unwrap();
        assert_eq!(c.io_config().exit_sockets, 300);
        assert_eq!(c.relay_limits().max_exit_circuits, 300);
    }

    #[test]
    fn minimal_config_gets_defaults_and_absolute_paths() {
        let c = Config::parse(MIN, Path::new("/etc/shroud/relay.toml")).unwrap();
        assert_eq!(c.network.workers, 1);
        assert_eq!(c.network.base_port, 9000);
        assert_eq!(c.relay.identity_key, PathBuf::from("/etc/shroud/id.key"));
        assert_eq!(
            c.relay.peer_list_state,
            PathBuf::from("/var/lib/shroud/peer-list.serial")
        );
        let c = Config::parse(
            &MIN.replace(
                "authorities",
                "peer_list_state = \"state/serial\"\nauthorities",
            ),
            Path::new("/etc/shroud/relay.toml"),
        )
        .unwrap();
        assert_eq!(
            c.relay.peer_list_state,
            PathBuf::from("/etc/shroud/state/serial")
        );
        assert_eq!(c.io.driver, DriverChoice::Auto);
    }

    #[test]
    fn shipped_example_parses_and_rotates_onion_keys() {
        // deploy/relay.toml leaves the authorities for the operator to fill in.
        let text = include_str!("../../deploy/relay.toml");
        let e = Config::parse(text, Path::new("/etc/shroud/relay.toml")).unwrap_err();
        assert!(e.to_string().contains("relay.authorities"), "{e}");
        let text = text.replace("authorities = []", "authorities = [\"AAAA\"]");
        let c = Config::parse(&text, Path::new("/etc/shroud/relay.toml")).unwrap();
        assert_eq!(
            c.relay.onion_key_dir,
            Some(PathBuf::from("/var/lib/shroud/onion-keys"))
        );
        assert!(c.relay.onion_keys.is_empty());
        assert_eq!(
            c.relay.peer_list_state,
            PathBuf::from(DEFAULT_PEER_LIST_STATE)
        );
        // Every value shown is the default, as the file says.
        let d = Config::parse(MIN, Path::new("/etc/shroud/relay.toml")).unwrap();
        assert_eq!(format!("{:?}", c.network), format!("{:?}", d.network));
        assert_eq!(format!("{:?}", c.limits), format!("{:?}", d.limits));
        assert_eq!(format!("{:?}", c.io), format!("{:?}", d.io));
        assert_eq!(c.admin.socket, d.admin.socket);
        assert_eq!(c.log.level, d.log.level);
        assert_eq!(c.log.format, d.log.format);
    }

    #[test]
    fn bad_configs_are_refused_with_the_key_named() {
        let cases = [
            (
                format!("{MIN}\n[network]\nworkers = 0\n"),
                "network.workers",
            ),
            (
                format!("{MIN}\n[network]\nbase_port = 65535\nworkers = 2\n"),
                "network.base_port",
            ),
            (
                format!("{MIN}\n[network]\nworkers = 2\ncpus = [0]\n"),
                "network.cpus",
            ),
            (MIN.replace("[\"onion.key\"]", "[]"), "relay.onion_keys"),
            (
                MIN.replace(
                    "authorities = [\"AAAA\"]",
                    "authorities = [\"AAAA\"]\nauthority_threshold = 2",
                ),
                "relay.authority_threshold",
            ),
            (
                MIN.replace(
                    "authorities = [\"AAAA\"]",
                    "authorities = [\"AAAA\"]\nexit_policy = [\"allow all\"]",
                ),
                "relay.exit_policy",
            ),
            (format!("{MIN}\n[log]\nlevel = \"loud\"\n"), "log.level"),
            (
                format!("{MIN}\n[limits]\ncircuit_idle_secs = 0\n"),
                "circuit_idle_secs",
            ),
            (
                format!("{MIN}\n[limits]\nlink_idle_secs = 0\n"),
                "link_idle_secs",
            ),
            (
                format!("{MIN}\n[limits]\nkey_cache = 0\n"),
                "limits.key_cache",
            ),
            (
                format!("{MIN}\n[limits]\nmax_circuits = 1000000000\n"),
                "limits.max_circuits",
            ),
            (
                format!("{MIN}\n[log]\nformat = \"xml\"\n"),
                "unknown variant `xml`, expected `text` or `json`",
            ),
        ];
        for (text, key) in cases {
            let e = Config::parse(&text, Path::new("r.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
        let e = Config::parse(
            &format!("{MIN}\n[network]\nworkerz = 2\n"),
            Path::new("r.toml"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e = Config::parse("not toml [", Path::new("r.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }));
    }

    #[test]
    fn onion_keys_and_onion_key_dir_are_mutually_exclusive() {
        let dir_only = MIN.replace("onion_keys = [\"onion.key\"]", "onion_key_dir = \"keys\"");
        let c = Config::parse(&dir_only, Path::new("/etc/shroud/relay.toml")).unwrap();
        assert_eq!(
            c.relay.onion_key_dir,
            Some(PathBuf::from("/etc/shroud/keys"))
        );
        assert!(c.relay.onion_keys.is_empty());
        let both = MIN.replace(
            "onion_keys = [\"onion.key\"]",
            "onion_keys = [\"onion.key\"]\nonion_key_dir = \"keys\"",
        );
        let e = Config::parse(&both, Path::new("r.toml")).unwrap_err();
        assert!(e.to_string().contains("relay.onion_key_dir"), "{e}");
        assert!(e.to_string().contains("not both"), "{e}");
        let neither = MIN.replace("onion_keys = [\"onion.key\"]\n", "");
        let e = Config::parse(&neither, Path::new("r.toml")).unwrap_err();
        assert!(e.to_string().contains("relay.onion_key_dir"), "{e}");
        let four = MIN.replace("[\"onion.key\"]", "[\"a\", \"b\", \"c\", \"d\"]");
        let e = Config::parse(&four, Path::new("r.toml")).unwrap_err();
        assert!(e.to_string().contains("relay.onion_keys"), "{e}");
    }

    #[test]
    fn onion_key_dir_selects_the_three_newest_key_files() {
        let tmp = std::env::temp_dir().join(format!(
            "shroud-config-keydir-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let keys = tmp.join("keys");
        std::fs::create_dir_all(&keys).unwrap();
        let text = MIN.replace("onion_keys = [\"onion.key\"]", "onion_key_dir = \"keys\"");
        let c = Config::parse(&text, &tmp.join("relay.toml")).unwrap();
        // An empty directory is a configuration error naming the directory.
        let e = c.onion_key_files().unwrap_err();
        assert!(e.to_string().contains("holds no onion key file"), "{e}");
        for name in [
            "onion-100.key",
            "onion-300.key",
            "onion-200.key",
            "onion-50.key",
            "README",
            "onion-0400.key",
        ] {
            std::fs::write(keys.join(name), "x").unwrap();
        }
        let f = c.onion_key_files().unwrap();
        let created: Vec<Option<u64>> = f.files.iter().map(|k| k.created).collect();
        assert_eq!(created, vec![Some(300), Some(200), Some(100)]);
        assert_eq!(f.files[0].path, keys.join("onion-300.key"));
        assert_eq!(f.unused, 1);
        assert_eq!(
            f.ignored,
            vec![keys.join("README"), keys.join("onion-0400.key")]
        );
        // A missing directory is an error too.
        std::fs::remove_dir_all(&tmp).unwrap();
        let e = c.onion_key_files().unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
        // Key files from the list come back as given.
        let c = Config::parse(MIN, Path::new("/etc/shroud/relay.toml")).unwrap();
        let f = c.onion_key_files().unwrap();
        assert_eq!(
            f.files,
            vec![OnionKeyFile {
                path: PathBuf::from("/etc/shroud/onion.key"),
                created: None
            }]
        );
    }
}
