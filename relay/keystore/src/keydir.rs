//! Onion-key directories: the files a relay loads its onion keys from and that
//! `shroudctl daemon` rotates.
//!
//! A key directory holds secret onion key files (see [`crate::keyfile`]) named
//! `onion-<UNIX_SECONDS>.key`, where the number is the time the key was created and
//! became usable by the relay. The newest key is the one with the largest number;
//! the relay loads the [`MAX_LOADED_KEYS`] newest. Nothing else belongs in the
//! directory: [`scan_key_dir`] reports every other entry (so that the relay and the
//! daemon can warn about it) and never treats it as a key.
//!
//! # Invariants
//!
//! - A name is a key file name if and only if [`parse_key_file_name`] accepts it:
//!   `onion-`, a canonical decimal number (no sign, no leading zero, fits `u64`),
//!   `.key`. [`key_file_name`] produces exactly those names, so
//!   `parse_key_file_name(&key_file_name(t)) == Some(t)`.
//! - [`KeyDirListing::keys`] is sorted newest first (largest number first); two
//!   entries never share a number, since the number determines the name.
//! - [`erase_key_file`] overwrites a file's bytes with zeros and `fsync`s them
//!   before unlinking it, so the secret does not survive in the file's blocks on a
//!   filesystem that writes in place (copy-on-write filesystems and SSD wear
//!   levelling may keep old blocks: use full-disk encryption as well).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::keyfile::{parent_dir, sync_dir};

/// How many onion keys a relay holds at once (the newest of its key directory);
/// the same limit as the peer list's onion keys per relay.
pub const MAX_LOADED_KEYS: usize = shroud_proto::peerlist::MAX_ONION_KEYS;

/// The file name of the key created at `created` (Unix seconds):
/// `onion-<created>.key`.
pub fn key_file_name(created: u64) -> String {
    format!("onion-{created}.key")
}

/// The creation time in a key file name, or `None` if `name` is not a key file name
/// (see the [module docs](self)).
pub fn parse_key_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("onion-")?.strip_suffix(".key")?;
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    if !canonical {
        return None;
    }
    digits.parse().ok()
}

/// One key file of a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyDirEntry {
    /// The number in its name: when the key was created (Unix seconds).
    pub created: u64,
    /// The file.
    pub path: PathBuf,
}

/// What a key directory holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyDirListing {
    /// Key files, newest (largest number) first.
    pub keys: Vec<KeyDirEntry>,
    /// Every other entry (files with other names, subdirectories, ...), sorted.
    pub ignored: Vec<PathBuf>,
}

impl KeyDirListing {
    /// The keys a relay loads: the [`MAX_LOADED_KEYS`] newest, newest first.
    pub fn loaded(&self) -> &[KeyDirEntry] {
        &self.keys[..self.keys.len().min(MAX_LOADED_KEYS)]
    }

    /// The newest key, if any.
    pub fn newest(&self) -> Option<&KeyDirEntry> {
        self.keys.first()
    }
}

/// Lists a key directory (see the [module docs](self)). Fails only if the
/// directory cannot be read; entries are not opened (reading a key file checks its
/// type and permissions).
pub fn scan_key_dir(dir: &Path) -> io::Result<KeyDirListing> {
    let mut listing = KeyDirListing::default();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        match name.to_str().and_then(parse_key_file_name) {
            Some(created) => listing.keys.push(KeyDirEntry {
                created,
                path: entry.path(),
            }),
            None => listing.ignored.push(entry.path()),
        }
    }
    listing.keys.sort_by_key(|k| std::cmp::Reverse(k.created));
    listing.ignored.sort();
    Ok(listing)
}

/// Prefix of a key file being erased (see [`erase_key_file`]); such a name is never
/// a key file name, so a relay never loads a half-erased key.
pub const ERASING_PREFIX: &str = ".erasing-";

/// Erases a secret key file: renames it to [`ERASING_PREFIX`]`<name>` (so that it
/// stops being a key file at once, even if the process dies before the end),
/// overwrites its contents with zeros, `fsync`s, removes it and `fsync`s its
/// directory. A name that already starts with [`ERASING_PREFIX`] (a leftover of an
/// interrupted erasure) is erased in place. See the [module docs](self) for what
/// this can and cannot guarantee.
pub fn erase_key_file(path: &Path) -> io::Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let path = if name.starts_with(ERASING_PREFIX) {
        path.to_owned()
    } else {
        let doomed = parent_dir(path).join(format!("{ERASING_PREFIX}{name}"));
        fs::rename(path, &doomed)?;
        doomed
    };
    let path = path.as_path();
    let mut file = OpenOptions::new().write(true).open(path)?;
    let len = file.metadata()?.len();
    let zeros = [0u8; 4096];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(zeros.len() as u64)).unwrap_or(zeros.len());
        file.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    file.sync_all()?;
    drop(file);
    fs::remove_file(path)?;
    sync_dir(parent_dir(path));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn names_round_trip_and_only_canonical_names_are_keys() {
        for t in [0, 1, 1_764_000_000, u64::MAX] {
            assert_eq!(parse_key_file_name(&key_file_name(t)), Some(t));
        }
        for bad in [
            "onion-.key",
            "onion-01.key",
            "onion--1.key",
            "onion-+1.key",
            "onion-1.key.tmp",
            "onion-1.KEY",
            "Onion-1.key",
            "onion-1",
            "onion-18446744073709551616.key",
            "onion-1 .key",
            "onion.key",
            ".shroud-key-x.tmp",
        ] {
            assert_eq!(parse_key_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn scan_sorts_newest_first_and_reports_other_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in [
            "onion-5.key",
            "onion-100.key",
            "onion-20.key",
            "onion-7.key",
            "notes.txt",
            "onion-007.key",
        ] {
            fs::write(dir.path().join(name), "x").expect("write");
        }
        fs::create_dir(dir.path().join("old")).expect("mkdir");
        let l = scan_key_dir(dir.path()).expect("scan");
        let created: Vec<u64> = l.keys.iter().map(|k| k.created).collect();
        assert_eq!(created, vec![100, 20, 7, 5]);
        let loaded: Vec<u64> = l.loaded().iter().map(|k| k.created).collect();
        assert_eq!(loaded, vec![100, 20, 7]);
        assert_eq!(l.newest().map(|k| k.created), Some(100));
        let ignored: Vec<String> = l
            .ignored
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(ignored, vec!["notes.txt", "old", "onion-007.key"]);
        assert!(scan_key_dir(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn erase_zeroes_then_removes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("onion-1.key");
        fs::write(&path, "secret secret secret").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        // Keep a second link to watch the blocks being overwritten.
        let witness = dir.path().join("witness");
        fs::hard_link(&path, &witness).expect("link");
        erase_key_file(&path).expect("erase");
        assert!(!path.exists());
        assert_eq!(fs::read(&witness).expect("read"), vec![0u8; 20]);
        assert!(erase_key_file(&path).is_err());
        // Only the witness is left: no `.erasing-` file.
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 1);
        // A leftover of an interrupted erasure is erased in place.
        let leftover = dir.path().join(".erasing-onion-2.key");
        fs::write(&leftover, "secret").expect("write");
        erase_key_file(&leftover).expect("erase leftover");
        assert!(!leftover.exists());
    }
}
