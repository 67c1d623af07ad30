//! # shroud-control
//!
//! The library half of `shroudctl`, Shroud's control-plane CLI: key files, the signed
//! peer list on disk and the human and machine renderings of it, relay descriptors,
//! live administration of relays over their admin sockets, and onion-key rotation. The binary
//! (`src/main.rs`) only parses arguments, calls into these modules and maps errors to
//! exit codes; everything reusable lives here so that the relay daemon loads keys and
//! peer lists with exactly the same checks as the operator's tool.
//!
//! Modules:
//! - [`keydir`]: onion-key directories (`onion-<UNIX_SECONDS>.key` files), shared
//!   with the relay;
//! - [`keyfile`]: secret key files (one strict base64 line, mode 0600, refused when
//!   group- or world-accessible): [`read_secret_key_file`], [`write_secret_key_file`];
//! - [`peerfile`]: peer-list, verifier-state and authorities files, atomic replacement;
//! - [`edit`]: editing a peer list (add, replace, remove relays; bump the serial);
//! - [`check`]: verifying a peer list against a trust policy, with operator-facing
//!   explanations, and checking every signature on its own;
//! - [`render`]: the `list` table, the `list --json` document and the `show` dump;
//! - [`descriptor`]: relay descriptors (a relay's peer-list entry signed by the
//!   relay), which `peers import` verifies and adds to a list;
//! - [`admin`]: the client of a relay's admin socket (line-delimited JSON);
//! - [`status`]: the relay's `status` document, rates from two samples, and the
//!   `status`/`top` tables;
//! - [`rotate`]: onion-key rotation, one step at a time (`shroudctl daemon`);
//! - [`time`]: Unix-seconds parsing and human formatting (dates, "in 3h 20m");
//! - [`cli`]: the command-line grammar (clap) and its help texts.
//!
//! # Invariants
//!
//! - No secret key byte ever reaches an error message, a `Debug` output or a log:
//!   errors name files, modes and what is wrong, never contents.
//! - Every error type has `exit_code()` (see [`exit`]) and `kind()` (a stable
//!   snake_case name for scripts and metrics).
//! - Files that other processes read (peer lists, state files) are replaced atomically
//!   (temporary file in the same directory, `fsync`, `rename`); secret key files are
//!   created with mode 0600 by the `open` call itself and never widened.
//! - Nothing here reads the clock except [`time::now`]; functions that depend on the
//!   time take `now` as an argument (Unix seconds), as `shroud-proto` does.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod check;
pub mod cli;
pub mod descriptor;
pub mod edit;
pub mod render;
pub mod rotate;
pub mod status;
pub mod time;

// Key and peer-list files live in shroud-keystore (the relay daemon uses them too);
// re-exported here so `shroud_control::keyfile` and friends keep working.
pub use shroud_keystore::{
    exit, keydir, keyfile, peerfile, read_identity_key_file, read_onion_key_file,
    read_secret_key_file, write_secret_key_file, KeyFileError, KeyKind,
};
