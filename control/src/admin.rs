//! The client side of a relay's admin socket.
//!
//! The relay serves line-delimited JSON on a Unix socket (`[admin] socket` in its
//! configuration, owner-only): one request object per line (`{"cmd":"status"}`,
//! `{"cmd":"drain","timeout_s":30}`, ...), one reply per line, either
//! `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`. Requests, replies and
//! result documents are the `shroud-admin` types the relay itself uses.
//! [`AdminClient`] sends requests and turns replies into `Result`s; every error names
//! the socket path.
//!
//! The socket path is chosen by [`socket_path`]: the command-line value, else the
//! environment variable [`SOCKET_ENV`], else [`DEFAULT_SOCKET`].

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;
use shroud_admin::{Reply, Request};

use crate::exit;

/// The relay's default admin socket (`[admin] socket` in deploy/relay.toml).
pub const DEFAULT_SOCKET: &str = "/run/shroud/admin.sock";

/// Environment variable naming the admin socket when `--socket` is not given.
pub const SOCKET_ENV: &str = "SHROUD_ADMIN_SOCKET";

/// How long to wait for a reply (the relay answers within 10 s or says it could
/// not).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// Longest reply accepted, in bytes (a status document of 256 workers is ~200 KiB).
const MAX_REPLY: u64 = 16 << 20;

/// The admin socket to use: `arg` if given, else `$SHROUD_ADMIN_SOCKET` if set and
/// non-empty, else [`DEFAULT_SOCKET`].
pub fn socket_path(arg: Option<&Path>) -> PathBuf {
    if let Some(p) = arg {
        return p.to_owned();
    }
    match std::env::var_os(SOCKET_ENV) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(DEFAULT_SOCKET),
    }
}

/// An admin-socket failure. Every case names the socket.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// Nothing answers at the path (no relay, wrong path, no permission).
    #[error("cannot reach the relay's admin socket {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The connection failed or timed out after connecting.
    #[error("admin socket {}: {action} failed", path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// `"sending the request"` or `"reading the reply"`.
        action: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The relay closed the connection or sent something that is not a reply.
    #[error("admin socket {}: unexpected reply: {reason}", path.display())]
    BadReply {
        /// The socket.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The relay answered `ok:false`.
    #[error("the relay at {} refused `{cmd}`: {message}", path.display())]
    Refused {
        /// The socket.
        path: PathBuf,
        /// The command.
        cmd: String,
        /// The relay's error message.
        message: String,
    },
}

impl AdminError {
    /// Always [`exit::FAILURE`]: the relay could not be reached or refused.
    pub fn exit_code(&self) -> u8 {
        exit::FAILURE
    }

    /// A short, stable snake_case name for the error case.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::Io { .. } => "io",
            Self::BadReply { .. } => "bad_reply",
            Self::Refused { .. } => "refused",
        }
    }

    /// What the operator can do about it, when something obvious applies.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            Self::Connect { source, .. } => Some(match source.kind() {
                io::ErrorKind::PermissionDenied => {
                    "the admin socket is owner-only: run shroudctl as the relay's user (e.g. \
                     `sudo -u shroud shroudctl ...`)"
                }
                _ => {
                    "is shroud-relay running? The path is `[admin] socket` in its \
                     configuration; pass --socket PATH or set SHROUD_ADMIN_SOCKET"
                }
            }),
            _ => None,
        }
    }
}

/// A connection to a relay's admin socket.
#[derive(Debug)]
pub struct AdminClient {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl AdminClient {
    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> Result<Self, AdminError> {
        let connect = |source| AdminError::Connect {
            path: path.to_owned(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(connect)?;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)))
            .map_err(connect)?;
        let writer = stream.try_clone().map_err(connect)?;
        Ok(Self {
            path: path.to_owned(),
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends `request` and returns the reply's `result` as JSON (null when absent), or
    /// [`AdminError::Refused`] with the relay's message when it answers `ok:false`.
    pub fn call(&mut self, request: &Request) -> Result<Value, AdminError> {
        let cmd = request.name().to_owned();
        let mut line = request.to_line();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| AdminError::Io {
                path: self.path.clone(),
                action: "sending the request",
                source,
            })?;
        let mut reply = String::new();
        let n = io::Read::take(&mut self.reader, MAX_REPLY)
            .read_line(&mut reply)
            .map_err(|source| AdminError::Io {
                path: self.path.clone(),
                action: "reading the reply",
                source,
            })?;
        let bad = |reason: String| AdminError::BadReply {
            path: self.path.clone(),
            reason,
        };
        if n == 0 {
            return Err(bad(
                "the relay closed the connection without answering".into()
            ));
        }
        if !reply.ends_with('\n') {
            return Err(bad("the reply is truncated or too long".into()));
        }
        let reply: Reply =
            serde_json::from_str(&reply).map_err(|e| bad(format!("not a reply: {e}")))?;
        reply.into_result().map_err(|message| AdminError::Refused {
            path: self.path.clone(),
            cmd,
            message,
        })
    }

    /// [`Self::call`], with the result read as the command's document `T`; also
    /// returns the raw JSON (for `--json` output, which keeps fields this shroudctl
    /// does not know).
    pub fn call_as<T: DeserializeOwned>(
        &mut self,
        request: &Request,
    ) -> Result<(T, Value), AdminError> {
        let raw = self.call(request)?;
        let doc = document(&self.path, request, &raw)?;
        Ok((doc, raw))
    }
}

/// Reads `raw`, the result of `request`, as its document `T`.
fn document<T: DeserializeOwned>(
    path: &Path,
    request: &Request,
    raw: &Value,
) -> Result<T, AdminError> {
    T::deserialize(raw).map_err(|e| AdminError::BadReply {
        path: path.to_owned(),
        reason: format!("the {} document is not understood: {e}", request.name()),
    })
}

/// Connects to `path`, sends one request and returns the result.
pub fn request(path: &Path, request: &Request) -> Result<Value, AdminError> {
    AdminClient::connect(path)?.call(request)
}

/// Connects to `path`, sends one request and returns its result as document `T`, with
/// the raw JSON.
pub fn request_as<T: DeserializeOwned>(
    path: &Path,
    request: &Request,
) -> Result<(T, Value), AdminError> {
    AdminClient::connect(path)?.call_as(request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use shroud_admin::Reloaded;
    use std::os::unix::net::UnixListener;

    /// A one-connection fake relay answering each request line with `replies[i]`.
    fn fake_relay(replies: Vec<&'static str>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("admin.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        std::thread::spawn(move || {
            let (conn, _) = listener.accept().expect("accept");
            let mut out = conn.try_clone().expect("clone");
            let mut lines = BufReader::new(conn).lines();
            for r in replies {
                if lines.next().is_none() {
                    return;
                }
                out.write_all(r.as_bytes()).expect("write");
            }
        });
        (dir, path)
    }

    #[test]
    fn replies_become_results_or_errors_naming_the_socket() {
        let (_d, path) = fake_relay(vec![
            "{\"ok\":true,\"result\":{\"serial\":3}}\n",
            "{\"ok\":false,\"error\":\"peer list refused: expired\"}\n",
            "{\"result\":1}\n",
            "not json\n",
        ]);
        let mut c = AdminClient::connect(&path).expect("connect");
        let (doc, raw) = c.call_as::<Reloaded>(&Request::Reload).expect("ok");
        assert_eq!(raw, json!({"serial": 3}));
        assert_eq!((doc.serial, doc.peers), (3, 0));
        let e = c.call(&Request::Reload).expect_err("refused");
        assert_eq!(e.kind(), "refused");
        let msg = e.to_string();
        assert!(
            msg.contains("admin.sock") && msg.contains("expired"),
            "{msg}"
        );
        assert!(msg.contains("`reload`"), "{msg}");
        let e = c.call(&Request::Status).expect_err("no ok");
        assert_eq!(e.kind(), "bad_reply");
        assert!(e.to_string().contains("missing field `ok`"), "{e}");
        assert_eq!(
            c.call(&Request::Status).expect_err("not json").kind(),
            "bad_reply"
        );
        // The fake relay has hung up: either sending or reading fails.
        let e = c.call(&Request::Status).expect_err("closed");
        assert!(["io", "bad_reply"].contains(&e.kind()), "{e}");
    }

    #[test]
    fn unreachable_socket_is_a_failure_with_a_hint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nobody.sock");
        let e = request(&path, &Request::Status).expect_err("unreachable");
        assert_eq!(e.kind(), "connect");
        assert_eq!(e.exit_code(), exit::FAILURE);
        assert!(e.to_string().contains("nobody.sock"), "{e}");
        assert!(e.hint().expect("hint").contains("--socket"));
        // The OS error is said once, by the chain (it once repeated itself).
        let full = format!("{:#}", anyhow::Error::new(e));
        assert_eq!(
            full.matches("No such file or directory").count(),
            1,
            "{full}"
        );
    }

    #[test]
    fn socket_path_prefers_the_argument() {
        assert_eq!(
            socket_path(Some(Path::new("/x/a.sock"))),
            PathBuf::from("/x/a.sock")
        );
    }
}
