//! The setup journal: every setup a relay accepts is appended to a file before the
//! relay acts on it, and the next process loads the file at start, so that no setup is
//! accepted twice across a restart or a crash (`docs/PROTOCOL.md`, "setup replay").
//!
//! A record is 32 bytes: the first 8 bytes of the onion public key, the setup's id (16
//! bytes, [`shroud_proto::replay::SetupFilter::id_of`]) and its timestamp (u64, big
//! endian). Each record is one `write(2)` on a file opened with `O_APPEND`, so workers
//! append concurrently without tearing records, and a record survives the process
//! being killed as soon as the write returns (not a power loss: the file is not
//! synced). The journal has two generations, `PATH` and `PATH.old`: every
//! `2 * setup_skew_s` the current one becomes the old one, so the files hold at most
//! the setups of the last `4 * setup_skew_s`, the span in which a replay could still
//! pass the timestamp check.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use shroud_proto::keys::OnionPublic;
use shroud_proto::relay::{OnionKeyring, SetupJournal};

use crate::sys;

/// Bytes per record.
pub const RECORD_LEN: usize = 32;

/// A setup journal on disk.
#[derive(Debug)]
pub struct FileJournal {
    path: PathBuf,
    period_s: u64,
    current: Mutex<Generation>,
    /// Last time (unix s) a write error was logged.
    last_error_log: AtomicU64,
}

#[derive(Debug)]
struct Generation {
    file: File,
    since_s: u64,
}

/// Why the journal could not be opened or read.
#[derive(Debug, thiserror::Error)]
#[error("setup journal {path}")]
pub struct JournalError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

fn old_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".old");
    PathBuf::from(p)
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// Reads the records of one journal file; a missing file has none. A torn last
/// record (the process died mid-write) is ignored.
fn read_records(path: &Path) -> std::io::Result<Vec<[u8; RECORD_LEN]>> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    }
    Ok(bytes
        .chunks_exact(RECORD_LEN)
        .map(|c| {
            let mut r = [0u8; RECORD_LEN];
            r.copy_from_slice(c);
            r
        })
        .collect())
}

impl FileJournal {
    /// Loads the journal at `path` (both generations) into `keyring`'s filters, then
    /// opens it for appending. Records stamped outside `now ± skew_s` are skipped.
    /// Returns the journal and the number of setups remembered.
    pub fn open(
        path: &Path,
        skew_s: u64,
        keyring: &OnionKeyring,
        now_ms: u64,
    ) -> Result<(FileJournal, usize), JournalError> {
        let err = |source| JournalError {
            path: path.to_path_buf(),
            source,
        };
        let now_s = now_ms / 1000;
        let mut remembered = 0;
        for p in [old_path(path), path.to_path_buf()] {
            for r in read_records(&p).map_err(err)? {
                let mut prefix = [0u8; 8];
                prefix.copy_from_slice(&r[..8]);
                let mut id = [0u8; 16];
                id.copy_from_slice(&r[8..24]);
                let mut ts = [0u8; 8];
                ts.copy_from_slice(&r[24..]);
                let ts = u64::from_be_bytes(ts);
                if ts.abs_diff(now_s) <= skew_s {
                    keyring.remember(&prefix, id, ts, now_ms);
                    remembered += 1;
                }
            }
        }
        let file = open_append(path).map_err(err)?;
        Ok((
            FileJournal {
                path: path.to_path_buf(),
                period_s: 2 * skew_s.max(1),
                current: Mutex::new(Generation {
                    file,
                    since_s: now_s,
                }),
                last_error_log: AtomicU64::new(0),
            },
            remembered,
        ))
    }

    fn append(&self, record: &[u8; RECORD_LEN], now_s: u64) -> std::io::Result<()> {
        let mut g = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if now_s >= g.since_s + self.period_s {
            std::fs::rename(&self.path, old_path(&self.path))?;
            g.file = open_append(&self.path)?;
            g.since_s = now_s;
        }
        g.file.write_all(record)
    }
}

impl SetupJournal for FileJournal {
    fn record(&self, key: &OnionPublic, id: &[u8; 16], ts: u64) -> bool {
        let mut r = [0u8; RECORD_LEN];
        r[..8].copy_from_slice(&key.as_bytes()[..8]);
        r[8..24].copy_from_slice(id);
        r[24..].copy_from_slice(&ts.to_be_bytes());
        let now_s = sys::now_ms() / 1000;
        match self.append(&r, now_s) {
            Ok(()) => true,
            Err(e) => {
                // At most one log line a minute; every refused setup is counted.
                let last = self.last_error_log.load(Ordering::Relaxed);
                if now_s >= last + 60
                    && self
                        .last_error_log
                        .compare_exchange(last, now_s, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::error!(path = %self.path.display(), error = %e, "cannot write the setup journal: refusing new circuits (counted as capacity drops)");
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;
    use shroud_proto::keys::OnionSecret;

    #[test]
    fn records_survive_a_reopen_and_old_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let key = OnionSecret::generate(&mut OsRng);
        let public = key.public();
        let mut keyring = OnionKeyring::new(120, 16);
        let now_ms = 1_800_000_000_000;
        keyring.update(vec![key], now_ms);
        let (j, n) = FileJournal::open(&path, 120, &keyring, now_ms).unwrap();
        assert_eq!(n, 0);
        assert!(j.record(&public, &[1; 16], 1_800_000_000));
        assert!(j.record(&public, &[2; 16], 1_799_999_000)); // far too old by reopen
        drop(j);
        // A torn record at the end is ignored.
        let mut f = open_append(&path).unwrap();
        f.write_all(&[7; 10]).unwrap();
        let (_j, n) = FileJournal::open(&path, 120, &keyring, now_ms + 5000).unwrap();
        assert_eq!(n, 1);
        let meta = std::fs::metadata(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn an_unreadable_journal_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be.
        let path = dir.path().join("journal");
        std::fs::create_dir(&path).unwrap();
        let keyring = OnionKeyring::new(120, 16);
        let e = FileJournal::open(&path, 120, &keyring, 0).unwrap_err();
        assert!(e.to_string().contains("setup journal"), "{e}");
        // The OS error is said once, by the chain.
        let full = format!("{:#}", anyhow::Error::new(e));
        assert_eq!(full.matches("Is a directory").count(), 1, "{full}");
    }
}
