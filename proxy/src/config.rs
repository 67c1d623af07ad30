//! The proxy's and the gateway's TOML configuration: parsed strictly (unknown keys
//! are errors), every default written out in `deploy/proxy.toml` and
//! `deploy/gateway.toml`, relative paths taken from the config file's directory.
//! [`ProxyConfig::load`] / [`GatewayConfig::load`] return either a value whose every
//! field was checked, or an error naming the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use shroud_proto::keys::{IdentityPublic, RelayId};
use shroud_proto::peerlist::{PeerList, TrustPolicy};
use shroud_proto::policy::ExitPolicy;

/// A configuration error: the key and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {msg}")]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// The key (`section.name`), or `-` for the whole file.
    pub key: String,
    /// What is wrong.
    pub msg: String,
}

fn err(file: &Path, key: &str, msg: impl ToString) -> ConfigError {
    ConfigError {
        file: file.display().to_string(),
        key: key.to_owned(),
        msg: msg.to_string(),
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| err(path, "-", e))
}

fn rel(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// `[proxy]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySection {
    /// SOCKS5 listen address (default `127.0.0.1:1080`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The signed peer list file.
    pub peer_list: PathBuf,
    /// Trusted authority keys (base64).
    pub authorities: Vec<String>,
    /// Signatures required (default 1).
    #[serde(default = "one")]
    pub threshold: usize,
    /// Local address of circuit sockets (default `0.0.0.0:0`).
    #[serde(default = "default_bind")]
    pub bind: SocketAddr,
    /// Prometheus endpoint (`GET /metrics`), e.g. `127.0.0.1:9102`; none by default.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
}

/// `[gateway]` in the proxy's config: the stream gateway it uses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayRef {
    /// The gateway's UDP address (the circuits' destination behind the exit).
    pub addr: SocketAddr,
    /// SHA-256 of its certificate (`shroud-proxy gen-cert` prints it).
    pub cert_sha256: String,
    /// The exit relay every stream circuit ends at (the one beside the gateway);
    /// default: any exit.
    #[serde(default)]
    pub exit: Option<String>,
}

/// `[circuits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitSection {
    /// Hops per circuit (default 3).
    #[serde(default = "three")]
    pub hops: usize,
    /// Stream circuits kept built ahead (default 1).
    #[serde(default = "one")]
    pub prebuild: usize,
    /// New streams go to a new circuit once one is this old (default 600).
    #[serde(default = "default_rotate")]
    pub rotate_after_secs: u64,
    /// Time allowed for one circuit setup (default 5000).
    #[serde(default = "default_build")]
    pub build_timeout_ms: u64,
    /// No two relays of a path in one IPv4 /16 or IPv6 /32 (default true).
    #[serde(default = "yes")]
    pub distinct_subnets: bool,
    /// How long a relay noticed dead is avoided (default 600).
    #[serde(default = "default_rotate")]
    pub dead_relay_secs: u64,
    /// A circuit that carried nothing back for this long is dead (QUIC idle
    /// timeout; keep-alives are sent at a quarter of it) (default 6000).
    #[serde(default = "default_idle")]
    pub idle_timeout_ms: u64,
}

/// `[streams]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSection {
    /// Circuits a CONNECT tries before answering general failure (default 3).
    #[serde(default = "three")]
    pub attempts: usize,
    /// Time for the gateway's answer to a stream request (default 20).
    #[serde(default = "default_answer")]
    pub answer_timeout_secs: u64,
    /// Time for a client's SOCKS handshake (default 10).
    #[serde(default = "default_handshake")]
    pub handshake_timeout_secs: u64,
    /// UDP ASSOCIATE sessions' circuits, one per destination, at most this many
    /// per session (default 16).
    #[serde(default = "default_udp_dests")]
    pub udp_destinations: usize,
    /// Streams to different destination hosts never share a circuit (as Tor's
    /// `IsolateDestAddr`; default false: isolation by SOCKS credentials only).
    #[serde(default)]
    pub isolate_destination: bool,
}

/// A proxy's configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyFile {
    /// `[proxy]`.
    pub proxy: ProxySection,
    /// `[gateway]`.
    pub gateway: GatewayRef,
    /// `[circuits]`.
    #[serde(default = "default_circuits")]
    pub circuits: CircuitSection,
    /// `[streams]`.
    #[serde(default = "default_streams")]
    pub streams: StreamSection,
}

/// A checked proxy configuration.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The file as written.
    pub file: ProxyFile,
    /// The verified peer list.
    pub list: PeerList,
    /// The pinned certificate hash.
    pub cert_sha256: [u8; 32],
    /// The pinned exit.
    pub exit: Option<RelayId>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1080))
}
fn default_bind() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}
fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn yes() -> bool {
    true
}
fn default_rotate() -> u64 {
    600
}
fn default_build() -> u64 {
    5000
}
fn default_idle() -> u64 {
    6000
}
fn default_answer() -> u64 {
    20
}
fn default_handshake() -> u64 {
    10
}
fn default_udp_dests() -> usize {
    16
}
fn default_circuits() -> CircuitSection {
    CircuitSection {
        hops: 3,
        prebuild: 1,
        rotate_after_secs: 600,
        build_timeout_ms: 5000,
        distinct_subnets: true,
        dead_relay_secs: 600,
        idle_timeout_ms: 6000,
    }
}
fn default_streams() -> StreamSection {
    StreamSection {
        attempts: 3,
        answer_timeout_secs: 20,
        handshake_timeout_secs: 10,
        udp_destinations: 16,
        isolate_destination: false,
    }
}

/// Loads and verifies a peer list file against base64 authority keys.
pub fn load_peer_list(
    cfg: &Path,
    path: &Path,
    authorities: &[String],
    threshold: usize,
    now: u64,
) -> Result<PeerList, ConfigError> {
    let keys = authorities
        .iter()
        .map(|a| a.parse::<IdentityPublic>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(cfg, "proxy.authorities", e))?;
    if keys.is_empty() {
        return Err(err(cfg, "proxy.authorities", "at least one key is needed"));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| err(cfg, "proxy.peer_list", format!("{}: {e}", path.display())))?;
    PeerList::parse_and_verify(&text, &TrustPolicy::new(keys, threshold), now, None)
        .map_err(|e| err(cfg, "proxy.peer_list", format!("{}: {e}", path.display())))
}

impl ProxyConfig {
    /// Reads, parses and checks `path` (the peer list is verified at `now`).
    pub fn load(path: &Path, now: u64) -> Result<ProxyConfig, ConfigError> {
        let file: ProxyFile = toml::from_str(&read(path)?).map_err(|e| err(path, "-", e))?;
        let c = &file.circuits;
        if c.hops == 0 || c.hops > 8 {
            return Err(err(path, "circuits.hops", "must be 1 to 8"));
        }
        if c.build_timeout_ms == 0 {
            return Err(err(path, "circuits.build_timeout_ms", "must be positive"));
        }
        if c.idle_timeout_ms < 1000 {
            return Err(err(
                path,
                "circuits.idle_timeout_ms",
                "must be at least 1000",
            ));
        }
        if c.rotate_after_secs == 0 {
            return Err(err(path, "circuits.rotate_after_secs", "must be positive"));
        }
        if file.streams.attempts == 0 {
            return Err(err(path, "streams.attempts", "must be at least 1"));
        }
        if file.streams.udp_destinations == 0 {
            return Err(err(path, "streams.udp_destinations", "must be at least 1"));
        }
        let cert_sha256 = crate::tls::parse_fingerprint(&file.gateway.cert_sha256)
            .map_err(|m| err(path, "gateway.cert_sha256", m))?;
        let exit = match &file.gateway.exit {
            None => None,
            Some(s) => Some(
                s.parse::<RelayId>()
                    .map_err(|e| err(path, "gateway.exit", e))?,
            ),
        };
        let list = load_peer_list(
            path,
            &rel(path, &file.proxy.peer_list),
            &file.proxy.authorities,
            file.proxy.threshold,
            now,
        )?;
        if usize::from(list.params.h_max) < c.hops {
            return Err(err(
                path,
                "circuits.hops",
                format!("the network allows at most {} hops", list.params.h_max),
            ));
        }
        if let Some(e) = exit {
            match list.relay_by_id(&e) {
                None => return Err(err(path, "gateway.exit", "not in the peer list")),
                Some(r) if !r.exit => {
                    return Err(err(path, "gateway.exit", "that relay has no exit flag"))
                }
                Some(_) => {}
            }
        }
        Ok(ProxyConfig {
            file,
            list,
            cert_sha256,
            exit,
        })
    }

    /// `[circuits] build_timeout_ms`.
    pub fn build_timeout(&self) -> Duration {
        Duration::from_millis(self.file.circuits.build_timeout_ms)
    }

    /// `[circuits] idle_timeout_ms`.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.file.circuits.idle_timeout_ms)
    }
}

/// `[gateway]` in a gateway's config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// UDP listen address (default `127.0.0.1:4433`, beside the exit).
    #[serde(default = "default_gw_listen")]
    pub listen: SocketAddr,
    /// Certificate (DER), from `shroud-proxy gen-cert`.
    pub cert: PathBuf,
    /// Its PKCS#8 key (DER), mode 0600.
    pub key: PathBuf,
    /// Destinations streams may connect to (the relay's rule syntax).
    pub exit_policy: Vec<String>,
    /// Largest datagram the exit carries (its network's cell payload; default 877).
    #[serde(default = "default_datagram")]
    pub max_datagram: usize,
    /// Time for a stream's request, name resolution and TCP connect, each
    /// (default 10).
    #[serde(default = "default_handshake")]
    pub connect_timeout_secs: u64,
    /// QUIC idle timeout (default 6000, as the proxy's).
    #[serde(default = "default_idle")]
    pub idle_timeout_ms: u64,
    /// Prometheus endpoint (`GET /metrics`), e.g. `127.0.0.1:9103`; none by default.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
}

/// A gateway's configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    /// `[gateway]`.
    pub gateway: GatewaySection,
}

/// A checked gateway configuration.
#[derive(Debug)]
pub struct GatewayConfig {
    /// The file as written.
    pub file: GatewayFile,
    /// The parsed policy.
    pub policy: ExitPolicy,
    /// Certificate DER.
    pub cert: Vec<u8>,
    /// Key DER.
    pub key: Vec<u8>,
}

fn default_gw_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4433))
}
fn default_datagram() -> usize {
    877
}

impl GatewayConfig {
    /// Reads, parses and checks `path`.
    pub fn load(path: &Path) -> Result<GatewayConfig, ConfigError> {
        let file: GatewayFile = toml::from_str(&read(path)?).map_err(|e| err(path, "-", e))?;
        let g = &file.gateway;
        let policy =
            ExitPolicy::parse(&g.exit_policy).map_err(|e| err(path, "gateway.exit_policy", e))?;
        if !policy.is_exit() {
            return Err(err(
                path,
                "gateway.exit_policy",
                "empty: the gateway would refuse every stream",
            ));
        }
        if !(1200usize.div_ceil(crate::frag::SEND_FRAGMENTS) + crate::frag::HEADER..=8192)
            .contains(&g.max_datagram)
        {
            return Err(err(
                path,
                "gateway.max_datagram",
                "must be 607 to 8192 (two fragments must hold a 1200-byte QUIC packet)",
            ));
        }
        if g.idle_timeout_ms < 1000 {
            return Err(err(
                path,
                "gateway.idle_timeout_ms",
                "must be at least 1000",
            ));
        }
        if g.connect_timeout_secs == 0 {
            return Err(err(
                path,
                "gateway.connect_timeout_secs",
                "must be positive",
            ));
        }
        let cert_path = rel(path, &g.cert);
        let key_path = rel(path, &g.key);
        let cert = std::fs::read(&cert_path).map_err(|e| {
            err(
                path,
                "gateway.cert",
                format!("{}: {e}", cert_path.display()),
            )
        })?;
        let key = read_secret(&key_path)
            .map_err(|e| err(path, "gateway.key", format!("{}: {e}", key_path.display())))?;
        Ok(GatewayConfig {
            file,
            policy,
            cert,
            key,
        })
    }
}

/// Reads a secret file, refusing one that group or others can read.
pub fn read_secret(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(std::io::Error::other(format!(
            "mode {:o}: group or others can read it (chmod 600)",
            meta.permissions().mode() & 0o777
        )));
    }
    std::fs::read(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_examples_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        // Everything up to the certificate file is valid.
        let e = GatewayConfig::load(&root.join("deploy/gateway.toml")).unwrap_err();
        assert_eq!(e.key, "gateway.cert", "{e}");
        let text = std::fs::read_to_string(root.join("deploy/proxy.toml")).unwrap();
        let f: ProxyFile = toml::from_str(&text).unwrap();
        assert_eq!(f.proxy.listen, default_listen());
        assert_eq!(f.circuits.hops, default_circuits().hops);
        assert_eq!(
            f.circuits.idle_timeout_ms,
            default_circuits().idle_timeout_ms
        );
        assert_eq!(f.streams.attempts, default_streams().attempts);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let dir = std::env::temp_dir().join(format!("shroud-proxy-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("gw.toml");
        std::fs::write(
            &p,
            "[gateway]\ncert = \"c\"\nkey = \"k\"\nexit_policy = []\nbogus = 1\n",
        )
        .unwrap();
        let e = GatewayConfig::load(&p).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        std::fs::write(
            &p,
            "[gateway]\ncert = \"c\"\nkey = \"k\"\nexit_policy = []\n",
        )
        .unwrap();
        let e = GatewayConfig::load(&p).unwrap_err();
        assert_eq!(e.key, "gateway.exit_policy", "{e}");
        std::fs::write(
            &p,
            "[gateway]\ncert = \"c\"\nkey = \"k\"\nexit_policy = [\"accept *:80\"]\nmax_datagram = 100\n",
        )
        .unwrap();
        assert_eq!(
            GatewayConfig::load(&p).unwrap_err().key,
            "gateway.max_datagram"
        );
        std::fs::write(
            &p,
            "[gateway]\ncert = \"c\"\nkey = \"k\"\nexit_policy = [\"accept *:80\"]\n",
        )
        .unwrap();
        assert_eq!(GatewayConfig::load(&p).unwrap_err().key, "gateway.cert");
        let q = dir.join("proxy.toml");
        std::fs::write(
            &q,
            "[proxy]\npeer_list = \"x\"\nauthorities = []\n[gateway]\naddr = \"127.0.0.1:1\"\ncert_sha256 = \"00\"\n",
        )
        .unwrap();
        assert_eq!(
            ProxyConfig::load(&q, 0).unwrap_err().key,
            "gateway.cert_sha256"
        );
        std::fs::write(
            &q,
            format!(
                "[proxy]\npeer_list = \"x\"\nauthorities = []\n[gateway]\naddr = \"127.0.0.1:1\"\ncert_sha256 = \"{}\"\n[circuits]\nhops = 9\n",
                "00".repeat(32)
            ),
        )
        .unwrap();
        assert_eq!(ProxyConfig::load(&q, 0).unwrap_err().key, "circuits.hops");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
