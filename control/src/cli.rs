//! The `shroudctl` command-line grammar and its help texts.
//!
//! The binary parses [`Cli`] and dispatches on [`Command`]; this module only
//! describes the grammar. Value parsers check each argument on its own (keys,
//! addresses, port ranges, durations, times), so that a bad value is a usage error
//! (exit code 2) naming the argument; checks that need several arguments or a file
//! happen when the command runs.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand};
use shroud_proto::keys::{IdentityPublic, RelayId};
use shroud_proto::peerlist::{DEFAULT_CELL, DEFAULT_H_MAX};

use crate::edit::{parse_onion_arg, parse_port_range, parse_relay_addr, OnionArg};
use crate::keyfile::KeyKind;
use crate::time::{parse_duration, parse_instant, parse_instant_or_now};

/// The exit-status table shown at the end of every `--help`.
macro_rules! exit_codes {
    () => {
        "Exit status:
  0   success
  1   failure: verification failed, I/O error, relay not found, refusal to overwrite,
      admin socket unreachable, or the relay answered with an error
  2   usage error: unknown command, missing or invalid argument
  78  malformed input (EX_CONFIG): a peer list that does not parse, a key file with
      a bad format or with group/other permissions, a corrupt state or authorities file"
    };
}

/// The exit-status table shown at the end of every `--help`, as a constant.
pub const EXIT_CODES: &str = exit_codes!();

/// `shroudctl`, the control plane of a Shroud network.
#[derive(Debug, Parser)]
#[command(
    name = "shroudctl",
    version,
    about = "Control plane of a Shroud onion-relay network: keys, the signed peer list, live relay administration",
    long_about = "Control plane of a Shroud onion-relay network.\n\n\
        Generates and inspects keys (`genkey`, `pubkey`, in the manner of `wg`); builds, \
        signs, inspects and verifies the peer list (`peers ...`): the signed directory of \
        relays that every relay and client fetches and checks; administers a running relay \
        over its admin socket (`status`, `top`, `reload`, `rotate`, `drain`, `shutdown`); \
        and rotates a relay's onion keys (`daemon`). Keys are one line of base64 \
        (44 characters); secret key files must have mode 0600. Times are Unix seconds or \
        RFC 3339 UTC dates; durations are written like 24h, 7d or 3600s.",
    after_help = concat!(
        "Examples:
  shroudctl genkey --type identity --out authority.key > authority.pub
  shroudctl genkey | tee onion.key | shroudctl pubkey
  shroudctl peers new --out network.peerlist --serial 1 --valid-for 7d
  shroudctl peers add network.peerlist --identity \"$(cat relay.pub)\" --addr 192.0.2.1 \\
      --ports 9000-9003 --onion \"$(cat onion.pub)\" --exit
  shroudctl peers sign network.peerlist --key authority.key
  shroudctl peers verify network.peerlist --authorities-file authorities --threshold 2
  shroudctl status --socket /run/shroud/admin.sock
  shroudctl daemon --key-dir /var/lib/shroud/onion-keys --socket /run/shroud/admin.sock

",
        exit_codes!()
    )
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a secret key: print it, or write it to a 0600 file and print its public key
    #[command(
        long_about = "Generate a secret key from the operating system's random number generator.\n\n\
            Without --out, prints the secret as one base64 line on standard output (as `wg genkey` \
            does), to be piped into `shroudctl pubkey` or redirected into a file; a warning is \
            printed if standard output is a file that group or others can read.\n\n\
            With --out FILE, writes the secret to FILE, created with mode 0600 by the open call \
            itself (O_CREAT|O_EXCL, never widened afterwards), and prints the PUBLIC key on \
            standard output; the secret is not printed. An existing FILE is never overwritten \
            unless --force is given, in which case it is atomically replaced by a new 0600 file.",
        after_help = concat!(
            "Examples:
  shroudctl genkey --type identity --out relay.key > relay.pub
  shroudctl genkey > onion.key        # (umask 077 first)

",
            exit_codes!()
        )
    )]
    Genkey(GenkeyArgs),

    /// Read a secret key line on standard input and print its public key
    #[command(
        long_about = "Read a secret key (one base64 line, optionally newline-terminated) on standard \
            input and print the matching public key line, as `wg pubkey` does.\n\n\
            The 32 bytes do not say what kind of key they are: give --type identity for an \
            identity (ed25519) key; the default is an onion (x25519) key, as for genkey. A \
            malformed key exits with 78.",
        after_help = concat!(
            "Examples:
  shroudctl genkey --type identity | tee relay.key | shroudctl pubkey --type identity
  shroudctl pubkey --type identity < authority.key

",
            exit_codes!()
        )
    )]
    Pubkey(PubkeyArgs),

    /// Build, sign, inspect and verify the peer list (the network's signed directory)
    #[command(
        subcommand,
        long_about = "Build, sign, inspect and verify the peer list: the network's directory of \
            relays (identity, address and ports, onion keys, flags, weight), its parameters (cell \
            size, maximum hops), a validity window and a serial number, signed by directory \
            authorities. The file is the canonical text format of `shroud-proto` (see \
            docs/PROTOCOL.md §7); it is a static file that any web server or configuration tool \
            can distribute.\n\n\
            Editing commands (add, remove, sign --serial) rewrite the file atomically (temporary \
            file and rename). Any change to the content removes every signature, since none could \
            verify any more: sign again afterwards.",
        after_help = concat!(
            "Workflow:
  shroudctl peers new --out L --serial 7 --valid-for 24h
  shroudctl peers add L --identity PUB --addr IP --ports 9000-9003 --onion PUB  (each relay)
  shroudctl peers sign L --key AUTHORITY_KEY                                     (each authority)
  shroudctl peers verify L --authorities-file A --threshold 2 --state S

",
            exit_codes!()
        )
    )]
    Peers(PeersCommand),

    /// Show a relay's workers, cells/s, circuits, drops and key expiry (admin socket)
    #[command(
        long_about = "Show a running relay's state from its admin socket: version, uptime, \
            draining or not (or refusing new circuits: its peer list expired), the peer list in \
            use, its onion keys and when each expires, and per worker its port, I/O driver, \
            cells/s received and sent, setups/s, drops/s, \
            live circuits, 99th-percentile batch latency (from reaping a batch to queueing its \
            sends) and 99th-percentile cell time in the relay (from a cell's datagram reaching \
            the socket to its sends being handed to the kernel); then drops by reason.\n\n\
            Rates come from two status samples --interval seconds apart (default 1; 0 takes one \
            sample and shows no rates).\n\n\
            With --json, prints one JSON object for scripts: {\"status\": the relay's status \
            document as it sent it (second sample), \"rates\": {interval_s, workers: [{index, \
            port, cells_rx_per_s, cells_tx_per_s, datagrams_rx_per_s, datagrams_tx_per_s, \
            setups_per_s, drops_per_s, batch_latency_observations, batch_latency_p50_s, \
            batch_latency_p99_s, cell_residence_observations, cell_residence_p50_s, \
            cell_residence_p99_s}], total: {...}, drops_per_s: {reason: n}} or null}.",
        after_help = concat!(admin_socket_help!(), exit_codes!())
    )]
    Status(StatusArgs),

    /// A live, refreshing view of a relay's status (Ctrl-C to quit)
    #[command(
        long_about = "Redraw the `status` table every --interval seconds (default 1) with the \
            rates of the last interval, until interrupted (Ctrl-C). On a terminal the screen is \
            redrawn in place; otherwise each frame is printed after the previous one. \
            --iterations N stops after N frames.",
        after_help = concat!(admin_socket_help!(), exit_codes!())
    )]
    Top(TopArgs),

    /// Tell a relay to re-read its peer list and onion keys (as SIGHUP does)
    #[command(
        long_about = "Tell the relay to re-read its configuration's peer list, authorities and \
            onion keys, verify them and apply them without dropping circuits. On failure the \
            relay keeps its last good peer list and keys and this command exits with 1, \
            printing the relay's reason.",
        after_help = concat!(admin_socket_help!(), exit_codes!())
    )]
    Reload(AdminArgs),

    /// Tell a relay to re-read its onion keys only
    #[command(
        long_about = "Tell the relay to re-read its onion keys (relay.onion_keys, or the 3 newest \
            files of relay.onion_key_dir) and use them for new circuit setups. Existing \
            circuits are not affected. Prints the keys the relay now holds.",
        after_help = concat!(admin_socket_help!(), exit_codes!())
    )]
    Rotate(AdminArgs),

    /// Make a relay refuse new circuits and exit once the last one ends (or at the timeout)
    #[command(
        long_about = "Drain the relay for maintenance: it refuses new circuits at once, keeps \
            forwarding cells of existing circuits, and exits when the last circuit is gone or \
            after --timeout seconds, whichever comes first (as SIGINT does, with 30 s).",
        after_help = concat!(admin_socket_help!(), exit_codes!())
    )]
    Drain(DrainArgs),

    /// Stop a relay now (as SIGTERM does)
    #[command(after_help = concat!(admin_socket_help!(), exit_codes!()))]
    Shutdown(AdminArgs),

    /// Rotate a relay's onion keys: create, publish (descriptor), load, erase
    #[command(
        long_about = "Keep a relay's onion keys in --key-dir (the relay's relay.onion_key_dir): \
            files onion-<UNIX_SECONDS>.key, the number being the key's creation time.\n\n\
            With no key, creates one. --lead before the newest key's --lifetime ends, creates \
            the next key (valid from then), tells the relay to `rotate` so that it holds the \
            new key, and only then writes the descriptor (--descriptor-out) listing the keys \
            with their expiry (creation + lifetime), signed by the relay's identity key, for the \
            authorities to publish (`shroudctl peers import`). Clients move to the new key as \
            their peer lists update. --grace after a key's lifetime ends, overwrites its file \
            with zeros, removes it and tells the relay to `rotate`, which drops it from memory. \
            Circuits never depend on onion keys after setup: no cell is lost.\n\n\
            Each step also brings the relay back in line with the directory when they differ \
            (a relay restarted or a missed rotate). Without --once, runs until stopped, \
            sleeping until the next event and checking every minute; errors are printed and \
            retried. With --once, does what is due now and exits (for cron and tests).",
        after_help = concat!(
            "Examples:
  shroudctl daemon --key-dir /var/lib/shroud/onion-keys --socket /run/shroud/admin.sock \\
      --descriptor-out /var/lib/shroud/relay.descriptor --identity-key /etc/shroud/identity.key \\
      --addr 192.0.2.1 --ports 9000-9003
  shroudctl daemon --key-dir keys --socket admin.sock --once --now 1764000000

",
            admin_socket_help!(),
            exit_codes!()
        )
    )]
    Daemon(DaemonArgs),
}

/// How admin commands find the socket, shown in their help.
macro_rules! admin_socket_help {
    () => {
        "Admin socket: --socket PATH, else $SHROUD_ADMIN_SOCKET, else /run/shroud/admin.sock
(the relay's `[admin] socket`; owner-only, so run as the relay's user).

"
    };
}
use admin_socket_help;

/// The admin socket argument shared by the live commands.
#[derive(Debug, Args)]
pub struct SocketArg {
    /// The relay's admin socket [default: $SHROUD_ADMIN_SOCKET, else /run/shroud/admin.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// Arguments of `reload`, `rotate` and `shutdown`.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The admin socket.
    #[command(flatten)]
    pub socket: SocketArg,

    /// Print the relay's result as JSON
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `shroudctl drain`.
#[derive(Debug, Args)]
pub struct DrainArgs {
    /// The admin socket.
    #[command(flatten)]
    pub socket: SocketArg,

    /// Seconds to wait for circuits to end before exiting anyway
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,

    /// Print the relay's result as JSON
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `shroudctl status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The admin socket.
    #[command(flatten)]
    pub socket: SocketArg,

    /// Print JSON (the status document and the computed rates) instead of a table
    #[arg(long)]
    pub json: bool,

    /// Seconds between the two samples the rates come from (0: one sample, no rates)
    #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = parse_interval)]
    pub interval: f64,
}

/// Arguments of `shroudctl top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// The admin socket.
    #[command(flatten)]
    pub socket: SocketArg,

    /// Seconds between refreshes
    #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = parse_positive_interval)]
    pub interval: f64,

    /// Stop after N frames [default: run until Ctrl-C]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub iterations: Option<u64>,
}

/// Arguments of `shroudctl daemon`.
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// The relay's onion key directory (its relay.onion_key_dir); created (0700) if missing
    #[arg(long, value_name = "DIR")]
    pub key_dir: PathBuf,

    /// The admin socket.
    #[command(flatten)]
    pub socket: SocketArg,

    /// How long a key is published as valid
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub lifetime: u64,

    /// How long a key is kept after its lifetime ends, before it is erased
    #[arg(long, value_name = "DURATION", default_value = "2h", value_parser = parse_duration)]
    pub grace: u64,

    /// How long before the current key's lifetime ends the next key is created
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub lead: u64,

    /// Write the relay's signed descriptor here whenever its keys change
    #[arg(long, value_name = "FILE", requires_all = ["identity_key", "addr", "ports"])]
    pub descriptor_out: Option<PathBuf>,

    /// The relay's secret identity key file (signs the descriptor)
    #[arg(long, value_name = "FILE", requires = "descriptor_out")]
    pub identity_key: Option<PathBuf>,

    /// The relay's IP address, for the descriptor
    #[arg(long, value_name = "IP", value_parser = parse_relay_addr, requires = "descriptor_out")]
    pub addr: Option<IpAddr>,

    /// The relay's UDP ports FIRST-LAST, for the descriptor
    #[arg(long, value_name = "FIRST-LAST", value_parser = parse_port_range, requires = "descriptor_out")]
    pub ports: Option<(u16, u16)>,

    /// The relay may be an exit (descriptor flag)
    #[arg(long, requires = "descriptor_out")]
    pub exit: bool,

    /// Relative weight for path selection (descriptor)
    #[arg(long, value_name = "W", default_value_t = 100)]
    pub weight: u32,

    /// Do what is due now, then exit
    #[arg(long)]
    pub once: bool,

    /// With --once: act as if it were this time (Unix seconds or RFC 3339), for tests
    #[arg(long, value_name = "TIME", value_parser = parse_instant, requires = "once")]
    pub now: Option<u64>,
}

/// Parses a non-negative number of seconds (fractions allowed).
pub fn parse_interval(text: &str) -> Result<f64, String> {
    let v: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if !v.is_finite() || !(0.0..=3600.0).contains(&v) {
        return Err("the interval must be between 0 and 3600 seconds".into());
    }
    Ok(v)
}

/// [`parse_interval`], refusing 0.
pub fn parse_positive_interval(text: &str) -> Result<f64, String> {
    match parse_interval(text)? {
        v if v < 0.01 => Err("the interval must be at least 0.01 seconds".into()),
        v => Ok(v),
    }
}

/// Arguments of `shroudctl genkey`.
#[derive(Debug, Args)]
pub struct GenkeyArgs {
    /// Kind of key to generate
    #[arg(long = "type", value_enum, default_value_t = KeyKind::Onion)]
    pub kind: KeyKind,

    /// Write the secret to FILE (mode 0600) and print the public key instead of the secret
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,

    /// With --out: replace FILE if it exists
    #[arg(long, requires = "out")]
    pub force: bool,
}

/// Arguments of `shroudctl pubkey`.
#[derive(Debug, Args)]
pub struct PubkeyArgs {
    /// Kind of the secret key read on standard input
    #[arg(long = "type", value_enum, default_value_t = KeyKind::Onion)]
    pub kind: KeyKind,
}

/// `shroudctl peers ...`.
#[derive(Debug, Subcommand)]
pub enum PeersCommand {
    /// Create an empty, unsigned peer list
    #[command(
        long_about = "Create an empty, unsigned peer list.\n\n\
            The list is valid from --valid-after (default: now) for --valid-for. Its serial \
            must increase with every list the authorities publish: relays refuse a serial \
            lower than one they accepted. Cell size and maximum hops are fixed for the whole \
            network.",
        after_help = exit_codes!()
    )]
    New(NewArgs),

    /// Add a relay, or replace the relay with the same identity (removes all signatures)
    #[command(
        long_about = "Add a relay to the peer list, or replace the relay with the same \
            identity key (every field is taken from the command line; nothing is kept from \
            the old entry).\n\n\
            The list is re-sorted into canonical order and checked (for instance no two \
            relays may share a port on the same address); every signature is removed, since \
            the content changed. The file is replaced atomically.",
        after_help = exit_codes!()
    )]
    Add(AddArgs),

    /// Remove a relay (removes all signatures)
    #[command(after_help = exit_codes!())]
    Remove(RemoveArgs),

    /// Add or replace a relay from its signed descriptor (removes all signatures)
    #[command(
        long_about = "Add a relay to the peer list, or replace the relay with the same identity, \
            from the descriptor its `shroudctl daemon` writes. The descriptor must be signed by \
            the identity key it names (exit 1 otherwise, and the list is left unchanged). Like \
            `peers add`, this re-sorts and checks the list and removes every signature: sign it \
            again afterwards. Authorities import each relay's latest descriptor before signing \
            a new list, which is how a relay's next onion key gets published ahead of use.",
        after_help = concat!(
            "Example:
  shroudctl peers import network.peerlist --descriptor relay1.descriptor
  shroudctl peers sign network.peerlist --key authority.key --serial 43

",
            exit_codes!()
        )
    )]
    Import(ImportArgs),

    /// Print the relays as a table, or as JSON with --json (of a file, or of a running relay)
    #[command(
        long_about = "Print the relays of a peer list: relay id, address, port range, exit \
            flag, weight, number of onion keys and when the last one expires.\n\n\
            With --running instead of FILE, the list is the one a running relay uses, \
            fetched over its admin socket (--socket, else $SHROUD_ADMIN_SOCKET, else \
            /run/shroud/admin.sock); a first line says its serial and whether it has \
            expired.\n\n\
            With --json, print one JSON object for scripts: {serial, valid_after, \
            valid_until, params: {cell, h_max}, signers: [base64], relays: [{relay_id, \
            identity, addr, port_first, port_last, exit, weight, onion_keys: [{key, \
            valid_until}]}]}, times in Unix seconds. Signatures are not checked: use \
            `peers verify`.",
        after_help = exit_codes!()
    )]
    List(ListArgs),

    /// Add an authority's signature (optionally setting a new serial first)
    #[command(
        long_about = "Add an authority's ed25519 signature to the peer list (replacing an \
            earlier signature by the same key). The key file must be a secret identity key \
            with mode 0600.\n\n\
            With --serial N, the serial is first set to N, which must be above the current \
            serial; since that changes the content, the other signatures are removed. A list \
            with invalid network parameters is not signed.",
        after_help = exit_codes!()
    )]
    Sign(SignArgs),

    /// Check signatures, threshold, validity window, serial and parameters
    #[command(
        long_about = "Verify a peer list as a relay or client does: at least --threshold \
            distinct trusted authorities signed it and every signature by a trusted \
            authority verifies (signatures by other keys are ignored), its network \
            parameters are valid, the time is within its validity window, and its serial is \
            not below the last accepted one.",
        after_help = concat!(
            "Exits with 0 and prints one line starting with `OK:` when the list is acceptable;
otherwise prints why on standard error and exits with 1 (78 if the file does not
parse). With --state FILE, the serial of each accepted list is recorded in FILE and a
lower serial is refused later (rollback).

",
            exit_codes!()
        )
    )]
    Verify(VerifyArgs),

    /// Print everything in the list for people: parameters, validity, relays, signatures
    #[command(
        long_about = "Print everything in a peer list for people: version, serial, \
            parameters, the validity window as dates and relative times with a status \
            (current, expired, not yet valid), every relay with its onion keys and their \
            expiry, and every signature with its signer's key and id and whether it verifies \
            over the list's content. Trust is not judged here (no authorities are given): use \
            `peers verify` for that.",
        after_help = exit_codes!()
    )]
    Show(ShowArgs),
}

/// Arguments of `shroudctl peers new`.
#[derive(Debug, Args)]
pub struct NewArgs {
    /// The peer-list file to create
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,

    /// Serial number (must grow from one published list to the next)
    #[arg(long, value_name = "N")]
    pub serial: u64,

    /// Length of the validity window, e.g. 24h, 7d, 3600s
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub valid_for: u64,

    /// Start of validity: Unix seconds or RFC 3339 UTC date or `now` [default: now]
    #[arg(long, value_name = "TIME", value_parser = parse_instant_or_now)]
    pub valid_after: Option<u64>,

    /// Cell size in bytes (a multiple of 16, large enough for h-max hops, at most 8192)
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_CELL)]
    pub cell: u16,

    /// Maximum number of hops in a circuit (1 to 8)
    #[arg(long, value_name = "HOPS", default_value_t = DEFAULT_H_MAX)]
    pub h_max: u8,

    /// Replace FILE if it exists
    #[arg(long)]
    pub force: bool,
}

/// Arguments of `shroudctl peers add`.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// The peer-list file to edit
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// The relay's identity public key (base64), as printed by `genkey --type identity`
    #[arg(long, value_name = "PUB")]
    pub identity: IdentityPublic,

    /// The relay's IP address (IPv4 or IPv6; not unspecified, multicast or broadcast)
    #[arg(long, value_name = "IP", value_parser = parse_relay_addr)]
    pub addr: IpAddr,

    /// The relay's UDP ports, FIRST-LAST inclusive (one per worker core), or one PORT
    #[arg(long, value_name = "FIRST-LAST", value_parser = parse_port_range)]
    pub ports: (u16, u16),

    /// An onion public key, optionally with the end of its validity (Unix seconds or RFC
    /// 3339 date; default: the list's valid-until). Repeat for up to 3 keys.
    #[arg(long = "onion", value_name = "PUB[@UNTIL]", required = true, value_parser = parse_onion_arg)]
    pub onion: Vec<OnionArg>,

    /// The relay may be the last hop of a circuit (exit)
    #[arg(long)]
    pub exit: bool,

    /// Relative weight for path selection
    #[arg(long, value_name = "W", default_value_t = 100)]
    pub weight: u32,
}

/// Which relay `peers remove` removes.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct RelaySelectorArgs {
    /// The relay's identity public key (base64)
    #[arg(long, value_name = "PUB")]
    pub identity: Option<IdentityPublic>,

    /// The relay id (32 lowercase hex digits, as `peers list` prints it)
    #[arg(long, value_name = "RELAYID")]
    pub id: Option<RelayId>,
}

/// Arguments of `shroudctl peers remove`.
#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// The peer-list file to edit
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// The relay to remove.
    #[command(flatten)]
    pub relay: RelaySelectorArgs,
}

/// Arguments of `shroudctl peers import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The peer-list file to edit
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// The relay's descriptor file (written by `shroudctl daemon --descriptor-out`)
    #[arg(long, value_name = "FILE")]
    pub descriptor: PathBuf,
}

/// Arguments of `shroudctl peers list`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("source").required(true).args(["file", "running"])))]
pub struct ListArgs {
    /// The peer-list file
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,

    /// Show the peer list a running relay uses, from its admin socket, instead of a file
    #[arg(long)]
    pub running: bool,

    /// The admin socket (with --running).
    #[command(flatten)]
    pub socket: SocketArg,

    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,

    /// Compute relative times for this time (Unix seconds or RFC 3339) or `now` [default: now]
    #[arg(long, value_name = "TIME", value_parser = parse_instant_or_now)]
    pub now: Option<u64>,
}

/// Arguments of `shroudctl peers sign`.
#[derive(Debug, Args)]
pub struct SignArgs {
    /// The peer-list file to sign
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// The authority's secret identity key file (mode 0600)
    #[arg(long, value_name = "IDENTITY_KEY_FILE")]
    pub key: PathBuf,

    /// Set this serial (above the current one) before signing; removes other signatures
    #[arg(long, value_name = "N")]
    pub serial: Option<u64>,
}

/// Arguments of `shroudctl peers verify`.
#[derive(Debug, Args)]
#[command(
    group(ArgGroup::new("trust").args(["authority", "authorities_file"]).required(true).multiple(true))
)]
pub struct VerifyArgs {
    /// The peer-list file
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// A trusted authority's identity public key (base64); repeatable
    #[arg(long, value_name = "PUB")]
    pub authority: Vec<IdentityPublic>,

    /// A file of trusted authority keys, one per line ('#' comments and blank lines allowed)
    #[arg(long, value_name = "FILE")]
    pub authorities_file: Option<PathBuf>,

    /// How many distinct trusted authorities must have signed
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..))]
    pub threshold: u64,

    /// Refuse serials below N (the last serial accepted)
    #[arg(long, value_name = "N", conflicts_with = "state")]
    pub last_serial: Option<u64>,

    /// Read the last accepted serial from FILE (if it exists) and record the new one there
    /// on success, so that a rollback is detected across runs
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,

    /// Check validity at this time (Unix seconds or RFC 3339) or `now` [default: now]
    #[arg(long, value_name = "TIME", value_parser = parse_instant_or_now)]
    pub now: Option<u64>,
}

/// Arguments of `shroudctl peers show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The peer-list file
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// Compute relative times and status for this time (Unix seconds or RFC 3339) or `now` [default: now]
    #[arg(long, value_name = "TIME", value_parser = parse_instant_or_now)]
    pub now: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn grammar_is_consistent() {
        Cli::command().debug_assert();
    }
}
