//! Secret key files.
//!
//! A key file holds one secret key in the text form of [`shroud_proto::keys`]: one line
//! of canonical, padded standard base64 encoding the 32 raw bytes (44 characters),
//! optionally followed by a single `"\n"` — the form `wg genkey` writes. The same
//! format holds identity (ed25519 seed) and onion (x25519) secrets; nothing in the
//! bytes says which, so the caller chooses with [`KeyKind`].
//!
//! # Guarantees
//!
//! - [`read_secret_key_file`] returns a key only from a *regular* file whose mode
//!   grants nothing to group or others (`mode & 0o077 == 0`), checked on the opened
//!   file descriptor (so a file swapped between the check and the read is still
//!   checked). Symbolic links are followed; the target is what is checked.
//! - [`write_secret_key_file`] creates the file with `O_CREAT | O_EXCL` and mode
//!   0600 in the `open` call itself (the process umask can only narrow it), so the
//!   secret is never in a file with wider permissions, not even for an instant. It
//!   refuses to replace an existing file unless asked to, and then replaces it with
//!   `rename` from a new 0600 file in the same directory.
//! - Secret bytes are held in [`Zeroizing`] buffers and never appear in errors or
//!   `Debug` output.
//!
//! These functions are shared by `shroudctl` and the relay daemon.

use std::fs::{self, File, Metadata, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand_core::OsRng;
use shroud_proto::keys::{decode_key, IdentityKey, KeyError, OnionSecret, KEY_LEN};
use zeroize::Zeroizing;

use crate::exit;

/// Largest key file read, in bytes. A key file is 44 or 45 bytes; anything much
/// larger is not a key file and is refused without being read whole.
pub const MAX_KEY_FILE_BYTES: u64 = 1024;

/// The permission bits a key file must not have: any access by group or others.
pub const FORBIDDEN_MODE_BITS: u32 = 0o077;

/// The kind of a key: which algorithm its 32 secret bytes are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum KeyKind {
    /// A long-term ed25519 identity key (a relay's or a directory authority's); it
    /// signs descriptors and peer lists. The secret is the 32-byte ed25519 seed.
    Identity,
    /// An x25519 onion (circuit-setup) key; rotated, listed in the peer list with
    /// an expiry.
    Onion,
}

impl KeyKind {
    /// Generates a fresh secret of this kind from the operating system's CSPRNG.
    pub fn generate(self) -> Zeroizing<[u8; KEY_LEN]> {
        match self {
            Self::Identity => IdentityKey::generate(&mut OsRng).to_bytes(),
            Self::Onion => OnionSecret::generate(&mut OsRng).to_bytes(),
        }
    }

    /// The public key of `secret`, interpreted as a secret of this kind, as one
    /// base64 line without the newline.
    pub fn public_base64(self, secret: &[u8; KEY_LEN]) -> String {
        match self {
            Self::Identity => IdentityKey::from_bytes(secret).public().to_base64(),
            Self::Onion => OnionSecret::from_bytes(secret).public().to_base64(),
        }
    }

    /// `"identity"` or `"onion"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::Onion => "onion",
        }
    }
}

/// Why a key file could not be read or written.
///
/// Messages name the path and what is wrong; they never contain key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// The operating system refused an operation (missing file, permission denied,
    /// disk full, ...).
    #[error("cannot {action} key file {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done (`"open"`, `"read"`, `"create"`, ...).
        action: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The path names something other than a regular file.
    #[error("key file {} is not a regular file (it is a {file_type})", path.display())]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is instead (`"directory"`, `"FIFO"`, ...).
        file_type: &'static str,
    },
    /// The file may be read or written by group or others.
    #[error(
        "key file {p} has mode {mode:04o}: a secret key file must not be accessible by \
         group or others; fix it with `chmod 600 {p}`",
        p = path.display()
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits (`st_mode & 0o7777`).
        mode: u32,
    },
    /// The file is larger than [`MAX_KEY_FILE_BYTES`].
    #[error(
        "key file {} is larger than {max} bytes: a key file is one line of 44 base64 characters",
        path.display()
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit.
        max: u64,
    },
    /// The content is not one strict base64 key line.
    #[error("key file {} does not hold a key", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with the text (never quotes it).
        #[source]
        source: KeyError,
    },
    /// Creating a key file: the path exists and replacing was not asked for.
    #[error("key file {} already exists; refusing to overwrite it", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
}

impl KeyFileError {
    /// The process exit code for this error: [`exit::FAILURE`] for I/O errors and an
    /// existing file, [`exit::CONFIG`] for a file that is not an acceptable key file.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Io { .. } | Self::Exists { .. } => exit::FAILURE,
            Self::NotRegular { .. }
            | Self::Permissions { .. }
            | Self::TooLarge { .. }
            | Self::Format { .. } => exit::CONFIG,
        }
    }

    /// A short, stable snake_case name for the error case.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Io { .. } => "io",
            Self::NotRegular { .. } => "not_regular",
            Self::Permissions { .. } => "permissions",
            Self::TooLarge { .. } => "too_large",
            Self::Format { .. } => "format",
            Self::Exists { .. } => "exists",
        }
    }

    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::Io { path, .. }
            | Self::NotRegular { path, .. }
            | Self::Permissions { path, .. }
            | Self::TooLarge { path, .. }
            | Self::Format { path, .. }
            | Self::Exists { path } => path,
        }
    }
}

fn io_error<'a>(
    path: &'a Path,
    action: &'static str,
) -> impl FnOnce(io::Error) -> KeyFileError + 'a {
    move |source| KeyFileError::Io {
        path: path.to_owned(),
        action,
        source,
    }
}

/// Parses secret key text (one strict base64 line, optionally `"\n"`-terminated)
/// into a zeroizing buffer. Bytes that are not UTF-8 are reported as
/// [`KeyError::Base64`].
pub fn parse_secret_key(text: &[u8]) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyError> {
    let text = std::str::from_utf8(text).map_err(|_| KeyError::Base64)?;
    decode_key(text).map(Zeroizing::new)
}

/// Checks that `meta` describes a regular file with no group or other access.
fn check_metadata(path: &Path, meta: &Metadata) -> Result<(), KeyFileError> {
    let ft = meta.file_type();
    if !ft.is_file() {
        let file_type = if ft.is_dir() {
            "directory"
        } else if ft.is_fifo() {
            "FIFO"
        } else if ft.is_socket() {
            "socket"
        } else if ft.is_block_device() {
            "block device"
        } else if ft.is_char_device() {
            "character device"
        } else {
            "special file"
        };
        return Err(KeyFileError::NotRegular {
            path: path.to_owned(),
            file_type,
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & FORBIDDEN_MODE_BITS != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Reads a secret key file and returns its 32 secret bytes.
///
/// The file must be a regular file (symbolic links are followed) whose mode grants
/// no access to group or others, and must contain exactly one strict base64 key
/// line (see the [module docs](self)). In order, it refuses with:
///
/// - [`KeyFileError::Io`] when the file cannot be opened or read;
/// - [`KeyFileError::NotRegular`] for a directory, FIFO, device or socket (checked
///   before opening, so a FIFO cannot block the caller, and again on the opened
///   descriptor);
/// - [`KeyFileError::Permissions`] when `mode & 0o077 != 0`; the message names the
///   path, the mode and the fix (`chmod 600 PATH`);
/// - [`KeyFileError::TooLarge`] beyond [`MAX_KEY_FILE_BYTES`];
/// - [`KeyFileError::Format`] when the text is not one strict key line.
///
/// The result is zeroized when dropped; it dereferences to `[u8; 32]`, so
/// `IdentityKey::from_bytes(&key)` and `OnionSecret::from_bytes(&key)` take it as is.
/// Whether the bytes are an identity or an onion secret is the caller's choice: see
/// [`read_identity_key_file`] and [`read_onion_key_file`].
pub fn read_secret_key_file(
    path: impl AsRef<Path>,
) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyFileError> {
    let path = path.as_ref();
    let meta = fs::metadata(path).map_err(io_error(path, "open"))?;
    check_metadata(path, &meta)?;
    let file = File::open(path).map_err(io_error(path, "open"))?;
    let meta = file.metadata().map_err(io_error(path, "inspect"))?;
    check_metadata(path, &meta)?;

    // Preallocated so that reading never reallocates (which would leave an
    // unzeroized copy of the secret behind).
    let cap = usize::try_from(MAX_KEY_FILE_BYTES).unwrap_or(1024) + 1;
    let mut buf = Zeroizing::new(Vec::with_capacity(cap));
    file.take(MAX_KEY_FILE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(io_error(path, "read"))?;
    if buf.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(KeyFileError::TooLarge {
            path: path.to_owned(),
            max: MAX_KEY_FILE_BYTES,
        });
    }
    parse_secret_key(&buf).map_err(|source| KeyFileError::Format {
        path: path.to_owned(),
        source,
    })
}

/// [`read_secret_key_file`], interpreted as an ed25519 identity seed.
pub fn read_identity_key_file(path: impl AsRef<Path>) -> Result<IdentityKey, KeyFileError> {
    read_secret_key_file(path).map(|seed| IdentityKey::from_bytes(&seed))
}

/// [`read_secret_key_file`], interpreted as an x25519 onion secret.
pub fn read_onion_key_file(path: impl AsRef<Path>) -> Result<OnionSecret, KeyFileError> {
    read_secret_key_file(path).map(|bytes| OnionSecret::from_bytes(&bytes))
}

/// Writes `secret` as a key file at `path` (one base64 line and `"\n"`), mode 0600.
///
/// Without `replace`, the file is created with `O_CREAT | O_EXCL` and mode 0600
/// ([`KeyFileError::Exists`] if the path exists, even as a dangling symbolic link).
/// With `replace`, a new file is created the same way in the same directory and
/// renamed over `path`, so readers see the old key or the new one, never a mix, and
/// an existing file's wider permissions are not inherited. The data is `fsync`ed
/// before the function returns; if writing fails, the partial file is removed.
pub fn write_secret_key_file(
    path: impl AsRef<Path>,
    secret: &[u8; KEY_LEN],
    replace: bool,
) -> Result<(), KeyFileError> {
    let path = path.as_ref();
    let text = Zeroizing::new(shroud_proto::keys::encode_key(secret));
    if !replace {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| {
                if source.kind() == io::ErrorKind::AlreadyExists {
                    KeyFileError::Exists {
                        path: path.to_owned(),
                    }
                } else {
                    io_error(path, "create")(source)
                }
            })?;
        let written = file
            .write_all(text.as_bytes())
            .and_then(|()| file.sync_all());
        if let Err(source) = written {
            drop(file);
            let _ = fs::remove_file(path);
            return Err(io_error(path, "write")(source));
        }
    } else {
        if let Ok(meta) = fs::symlink_metadata(path) {
            if meta.is_dir() {
                return Err(KeyFileError::NotRegular {
                    path: path.to_owned(),
                    file_type: "directory",
                });
            }
        }
        let dir = parent_dir(path);
        let mut tmp = tempfile::Builder::new()
            .prefix(".shroud-key-")
            .suffix(".tmp")
            .permissions(Permissions::from_mode(0o600))
            .tempfile_in(dir)
            .map_err(io_error(path, "create a temporary file beside"))?;
        tmp.write_all(text.as_bytes())
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(io_error(path, "write"))?;
        tmp.persist(path)
            .map_err(|e| io_error(path, "replace")(e.error))?;
    }
    sync_dir(parent_dir(path));
    Ok(())
}

/// The directory holding `path` (`.` for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Best-effort `fsync` of a directory so that a new or renamed entry survives a
/// crash. Failure is ignored: some filesystems refuse to sync directories.
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shroud_proto::keys::encode_key;

    fn write_mode(path: &Path, text: &str, mode: u32) {
        fs::write(path, text).expect("write");
        fs::set_permissions(path, Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn reads_a_0600_key_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k");
        write_mode(&path, &encode_key(&[7; 32]), 0o600);
        assert_eq!(*read_secret_key_file(&path).expect("key"), [7; 32]);
        // Without the newline too; and 0400 is fine.
        write_mode(&path, encode_key(&[8; 32]).trim_end(), 0o400);
        assert_eq!(*read_secret_key_file(&path).expect("key"), [8; 32]);
    }

    #[test]
    fn refuses_group_or_world_access() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k");
        for mode in [0o644, 0o640, 0o604, 0o660, 0o601, 0o610] {
            write_mode(&path, &encode_key(&[7; 32]), mode);
            let e = read_secret_key_file(&path).expect_err("refused");
            assert_eq!(e.kind(), "permissions");
            assert_eq!(e.exit_code(), exit::CONFIG);
            let msg = e.to_string();
            assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
            assert!(
                msg.contains(&format!("chmod 600 {}", path.display())),
                "{msg}"
            );
        }
    }

    #[test]
    fn refuses_bad_content_without_quoting_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k");
        let good = encode_key(&[9; 32]);
        for bad in [
            format!("{good}\n"),
            good.replace('\n', "\r\n"),
            format!(" {good}"),
            String::new(),
            "x".repeat(44),
        ] {
            write_mode(&path, &bad, 0o600);
            let e = read_secret_key_file(&path).expect_err("refused");
            assert_eq!(e.kind(), "format", "{bad:?}");
            assert_eq!(e.exit_code(), exit::CONFIG);
            let full = format!("{e} {e:?} {}", std::error::Error::source(&e).expect("src"));
            assert!(!full.contains(good.trim_end()), "{full}");
        }
        fs::write(&path, [0xff, 0xfe]).expect("write");
        assert_eq!(
            read_secret_key_file(&path).expect_err("binary").kind(),
            "format"
        );
        write_mode(&path, &"A".repeat(5000), 0o600);
        assert_eq!(
            read_secret_key_file(&path).expect_err("large").kind(),
            "too_large"
        );
    }

    #[test]
    fn refuses_non_regular_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = read_secret_key_file(dir.path()).expect_err("dir");
        assert_eq!(e.kind(), "not_regular");
        assert!(e.to_string().contains("directory"), "{e}");
        let e = read_secret_key_file(dir.path().join("missing")).expect_err("missing");
        assert_eq!(e.kind(), "io");
        assert_eq!(e.exit_code(), exit::FAILURE);
    }

    #[test]
    fn writes_0600_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k");
        write_secret_key_file(&path, &[1; 32], false).expect("create");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(*read_secret_key_file(&path).expect("read"), [1; 32]);
        let e = write_secret_key_file(&path, &[2; 32], false).expect_err("exists");
        assert_eq!(e.kind(), "exists");
        assert_eq!(*read_secret_key_file(&path).expect("read"), [1; 32]);

        // Replacing a 0644 file yields a 0600 file.
        fs::set_permissions(&path, Permissions::from_mode(0o644)).expect("chmod");
        write_secret_key_file(&path, &[2; 32], true).expect("replace");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(*read_secret_key_file(&path).expect("read"), [2; 32]);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 1);
    }

    #[test]
    fn public_keys_match_shroud_proto() {
        let secret = [5; 32];
        assert_eq!(
            KeyKind::Identity.public_base64(&secret),
            IdentityKey::from_bytes(&secret).public().to_base64()
        );
        assert_eq!(
            KeyKind::Onion.public_base64(&secret),
            OnionSecret::from_bytes(&secret).public().to_base64()
        );
        assert_ne!(*KeyKind::Onion.generate(), *KeyKind::Onion.generate());
    }
}
