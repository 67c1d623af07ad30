//! Peer lists and the small files around them, on disk.
//!
//! - Peer-list files hold the canonical text of [`shroud_proto::peerlist`]; reading
//!   one ([`read_peer_list`]) parses it strictly, writing one ([`write_peer_list`])
//!   replaces the file atomically.
//! - A *state file* ([`read_state`], [`write_state`]) remembers the serial of the last
//!   peer list a verifier accepted, so that a rollback to an older list is detected
//!   across runs. It holds one decimal number and `"\n"`; a missing file means
//!   "nothing accepted yet".
//! - An *authorities file* ([`read_authorities_file`]) lists trusted authority
//!   identity keys, one base64 key per line; blank lines and lines starting with `#`
//!   are ignored.
//!
//! Every replacement goes through [`write_atomic`]: a temporary file in the same
//! directory, written and `fsync`ed, then renamed over the target, so a concurrent
//! reader (a relay, a web server) sees the old content or the new, never a torn file.

use std::fs::{self, File, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use shroud_proto::keys::{IdentityPublic, KeyError};
use shroud_proto::peerlist::{PeerList, PeerListError, MAX_DOCUMENT_BYTES};

use crate::exit;
use crate::keyfile::{parent_dir, sync_dir};

/// Mode of newly created peer-list and state files (before the umask): they are
/// public documents.
pub const PUBLIC_FILE_MODE: u32 = 0o644;

/// Errors reading or writing peer-list, state and authorities files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    /// The operating system refused an operation.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done (`"read"`, `"write"`, ...).
        action: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The file exists and replacing it was not asked for.
    #[error("{} already exists; refusing to overwrite it", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The peer list does not parse (it is not a canonical version-1 document).
    #[error("{} is not a valid peer list", path.display())]
    PeerList {
        /// The file.
        path: PathBuf,
        /// The parser's error, with a line number.
        #[source]
        source: PeerListError,
    },
    /// The state file does not hold one decimal serial.
    #[error("state file {} is corrupt: {reason}", path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A line of the authorities file is not an identity key.
    #[error("authorities file {}, line {line}: not an identity public key", path.display())]
    Authorities {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the key.
        #[source]
        source: KeyError,
    },
}

impl FileError {
    /// [`exit::FAILURE`] for I/O errors and refusals to overwrite, [`exit::CONFIG`]
    /// for malformed content.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Io { .. } | Self::Exists { .. } => exit::FAILURE,
            Self::PeerList { .. } | Self::State { .. } | Self::Authorities { .. } => exit::CONFIG,
        }
    }

    /// A short, stable snake_case name for the error case.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Io { .. } => "io",
            Self::Exists { .. } => "exists",
            Self::PeerList { .. } => "peer_list",
            Self::State { .. } => "state",
            Self::Authorities { .. } => "authorities",
        }
    }
}

fn io_error<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> FileError + 'a {
    move |source| FileError::Io {
        path: path.to_owned(),
        action,
        source,
    }
}

/// Reads at most `limit + 1` bytes of a file (enough to tell it is too large), and
/// returns them with the file's size.
fn read_limited(path: &Path, limit: usize) -> Result<(Vec<u8>, u64), FileError> {
    let file = File::open(path).map_err(io_error(path, "open"))?;
    let size = file.metadata().map_err(io_error(path, "inspect"))?.len();
    let mut buf = Vec::new();
    file.take(u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(io_error(path, "read"))?;
    Ok((buf, size))
}

/// Reads and parses a peer-list file.
///
/// Returns [`FileError::PeerList`] (exit code 78) for anything
/// [`PeerList::parse`] refuses, including a document over
/// [`MAX_DOCUMENT_BYTES`] and bytes that are not ASCII. Signatures, validity times
/// and parameters are *not* checked: see `shroud_control::check`.
pub fn read_peer_list(path: impl AsRef<Path>) -> Result<PeerList, FileError> {
    let path = path.as_ref();
    let (bytes, size) = read_limited(path, MAX_DOCUMENT_BYTES)?;
    let parsed = if bytes.len() > MAX_DOCUMENT_BYTES {
        Err(PeerListError::TooLarge {
            size: usize::try_from(size).unwrap_or(usize::MAX).max(bytes.len()),
            max: MAX_DOCUMENT_BYTES,
        })
    } else {
        match std::str::from_utf8(&bytes) {
            Ok(text) => PeerList::parse(text),
            Err(e) => {
                let line = bytes
                    .get(..e.valid_up_to())
                    .map_or(0, |ok| ok.iter().filter(|b| **b == b'\n').count())
                    + 1;
                Err(PeerListError::Malformed {
                    line,
                    reason: "non-ASCII character found: peer lists are ASCII only".to_owned(),
                })
            }
        }
    };
    parsed.map_err(|source| FileError::PeerList {
        path: path.to_owned(),
        source,
    })
}

/// Writes `list` in its canonical encoding to `path`, replacing it atomically.
///
/// The list is written as it is; callers that built or edited it should
/// [`PeerList::normalize`] and [`PeerList::validate`] it first (the functions of
/// `shroud_control::edit` do).
pub fn write_peer_list(
    path: impl AsRef<Path>,
    list: &PeerList,
    replace: bool,
) -> Result<(), FileError> {
    write_atomic(path.as_ref(), list.encode().as_bytes(), replace)
}

/// Replaces `path` with `data` atomically: writes a temporary file in the same
/// directory, `fsync`s it and renames it over `path`.
///
/// A new file gets mode [`PUBLIC_FILE_MODE`] less the umask; a replaced file keeps
/// its permission bits. Without `replace`, an existing `path` is refused with
/// [`FileError::Exists`], atomically where the kernel supports it
/// (`renameat2(RENAME_NOREPLACE)` or a hard link).
pub fn write_atomic(path: &Path, data: &[u8], replace: bool) -> Result<(), FileError> {
    let existing = match fs::metadata(path) {
        Ok(_) if !replace => {
            return Err(FileError::Exists {
                path: path.to_owned(),
            })
        }
        Ok(meta) => Some(meta.permissions()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_error(path, "inspect")(e)),
    };
    let dir = parent_dir(path);
    let mut tmp = tempfile::Builder::new()
        .prefix(".shroud-")
        .suffix(".tmp")
        .permissions(Permissions::from_mode(PUBLIC_FILE_MODE))
        .tempfile_in(dir)
        .map_err(io_error(path, "create a temporary file beside"))?;
    if let Some(perms) = existing {
        tmp.as_file()
            .set_permissions(perms)
            .map_err(io_error(path, "copy the permissions of"))?;
    }
    tmp.write_all(data)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(io_error(path, "write"))?;
    let persisted = if replace {
        tmp.persist(path)
    } else {
        tmp.persist_noclobber(path)
    };
    persisted.map_err(|e| {
        if e.error.kind() == io::ErrorKind::AlreadyExists {
            FileError::Exists {
                path: path.to_owned(),
            }
        } else {
            io_error(path, "replace")(e.error)
        }
    })?;
    sync_dir(dir);
    Ok(())
}

/// Reads a verifier state file: `Ok(None)` if it does not exist, the last accepted
/// serial otherwise.
pub fn read_state(path: impl AsRef<Path>) -> Result<Option<u64>, FileError> {
    let path = path.as_ref();
    let bytes = match read_limited(path, 64) {
        Ok((b, _)) => b,
        Err(FileError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let corrupt = |reason: &str| FileError::State {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let text = std::str::from_utf8(&bytes).map_err(|_| corrupt("not text"))?;
    let number = text
        .strip_suffix('\n')
        .ok_or_else(|| corrupt("expected one decimal serial followed by a newline"))?;
    let canonical = !number.is_empty()
        && number.bytes().all(|b| b.is_ascii_digit())
        && (number == "0" || !number.starts_with('0'));
    if !canonical {
        return Err(corrupt("expected one decimal serial followed by a newline"));
    }
    number
        .parse()
        .map(Some)
        .map_err(|_| corrupt("the serial does not fit in 64 bits"))
}

/// Records `serial` as the last accepted serial in the state file (atomically).
pub fn write_state(path: impl AsRef<Path>, serial: u64) -> Result<(), FileError> {
    write_atomic(path.as_ref(), format!("{serial}\n").as_bytes(), true)
}

/// Reads an authorities file: one identity public key (base64) per line; blank
/// lines and lines starting with `#` are skipped. Duplicates are kept (a
/// [`shroud_proto::peerlist::TrustPolicy`] counts distinct signers anyway).
pub fn read_authorities_file(path: impl AsRef<Path>) -> Result<Vec<IdentityPublic>, FileError> {
    let path = path.as_ref();
    let (bytes, _) = read_limited(path, MAX_DOCUMENT_BYTES)?;
    let text = String::from_utf8_lossy(&bytes);
    let mut keys = Vec::new();
    for (i, line) in text.split('\n').enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = line.parse().map_err(|source| FileError::Authorities {
            path: path.to_owned(),
            line: i + 1,
            source,
        })?;
        keys.push(key);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shroud_proto::keys::IdentityKey;
    use shroud_proto::peerlist::NetworkParams;

    #[test]
    fn state_file_round_trip_and_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state");
        assert_eq!(read_state(&path).expect("missing"), None);
        write_state(&path, 42).expect("write");
        assert_eq!(read_state(&path).expect("read"), Some(42));
        for bad in [
            "",
            "42",
            "042\n",
            "-1\n",
            "4 2\n",
            "x\n",
            "99999999999999999999\n",
        ] {
            fs::write(&path, bad).expect("write");
            let e = read_state(&path).expect_err(bad);
            assert_eq!(e.exit_code(), exit::CONFIG, "{bad:?}");
        }
    }

    #[test]
    fn peer_list_round_trip_keeps_mode_and_refuses_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("list");
        let list = PeerList::new(1, 10, 20, NetworkParams::default());
        write_peer_list(&path, &list, false).expect("write");
        assert_eq!(read_peer_list(&path).expect("read"), list);
        let e = write_peer_list(&path, &list, false).expect_err("exists");
        assert_eq!(e.kind(), "exists");
        fs::set_permissions(&path, Permissions::from_mode(0o640)).expect("chmod");
        write_peer_list(&path, &list, true).expect("replace");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 1);
    }

    #[test]
    fn unparseable_peer_lists_are_config_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("list");
        let text = PeerList::new(1, 10, 20, NetworkParams::default()).encode();
        fs::write(&path, &text[..text.len() / 2]).expect("write");
        let e = read_peer_list(&path).expect_err("truncated");
        assert_eq!(e.exit_code(), exit::CONFIG);
        fs::write(&path, b"shroud-peerlist 1\n\xff\n").expect("write");
        let e = read_peer_list(&path).expect_err("binary");
        assert!(
            matches!(
                &e,
                FileError::PeerList {
                    source: PeerListError::Malformed { line: 2, .. },
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn authorities_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("auth");
        let a = IdentityKey::from_bytes(&[1; 32]).public();
        let b = IdentityKey::from_bytes(&[2; 32]).public();
        fs::write(&path, format!("# authorities\n{a}\n\n{b}\n")).expect("write");
        assert_eq!(read_authorities_file(&path).expect("read"), vec![a, b]);
        fs::write(&path, format!("{a}\n{b} \n")).expect("write");
        let e = read_authorities_file(&path).expect_err("bad");
        assert!(matches!(e, FileError::Authorities { line: 2, .. }), "{e:?}");
        assert_eq!(e.exit_code(), exit::CONFIG);
    }
}
