//! Shroud's files on disk, shared by the relay daemon (`shroud-relay`) and the
//! control plane (`shroudctl`), so that the daemon does not depend on the CLI crate:
//!
//! - [`keyfile`]: secret key files (owner-only, created atomically, refused when
//!   group- or world-readable);
//! - [`keydir`]: onion-key directories (`onion-<valid_until>.key`), as the rotation
//!   daemon writes them and the relay loads them;
//! - [`peerfile`]: signed peer-list files and the rollback state file.
//!
//! Errors carry the process exit code the tools use ([`exit`]).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod keydir;
pub mod keyfile;
pub mod peerfile;

pub use keyfile::{
    read_identity_key_file, read_onion_key_file, read_secret_key_file, write_secret_key_file,
    KeyFileError, KeyKind,
};

/// Process exit codes of the Shroud tools (`sysexits.h` where one fits).
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// The operation failed: verification failed, a file could not be read or
    /// written, a relay was not found, ...
    pub const FAILURE: u8 = 1;
    /// The command line is wrong (clap's own code for usage errors).
    pub const USAGE: u8 = 2;
    /// `EX_CONFIG`: an input file is malformed (a peer list that does not parse, a
    /// key file with a bad format or unsafe permissions, a corrupt state file).
    pub const CONFIG: u8 = 78;
}
