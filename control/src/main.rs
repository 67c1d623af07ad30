//! `shroudctl`: the control-plane CLI of a Shroud network.
//!
//! This file parses the command line ([`shroud_control::cli`]), runs the command with
//! the library's modules, prints results on standard output and errors on standard
//! error, and maps errors to the exit codes of [`shroud_control::exit`]. See
//! `shroudctl --help`.

use std::fs::File;
use std::io::IsTerminal as _;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{error::ErrorKind, CommandFactory, Parser};
use serde_json::{json, Value};
use shroud_admin::{Draining, Peers, Reloaded, Request, Rotated, Status, Stopping};
use shroud_control::admin::{self, AdminClient, AdminError};
use shroud_control::check::{self, VerifyError};
use shroud_control::cli::{
    AddArgs, AdminArgs, Cli, Command, DaemonArgs, DrainArgs, GenkeyArgs, ImportArgs, ListArgs,
    NewArgs, PeersCommand, PubkeyArgs, RemoveArgs, ShowArgs, SignArgs, StatusArgs, TopArgs,
    VerifyArgs,
};
use shroud_control::descriptor::{Descriptor, DescriptorError, MAX_DESCRIPTOR_BYTES};
use shroud_control::edit::{self, EditError, RelaySelector, Upsert};
use shroud_control::keyfile::{self, KeyFileError};
use shroud_control::peerfile::{self, FileError};
use shroud_control::render::{self, ListJson};
use shroud_control::rotate::{self, AdminRelay, DaemonConfig, DescriptorConfig, RotateError};
use shroud_control::status::{render_status, Rates};
use shroud_control::time::{self, format_date, format_date_relative};
use shroud_control::{exit, read_identity_key_file, write_secret_key_file};
use shroud_proto::keys::{encode_key, KeyError};
use shroud_proto::peerlist::{
    NetworkParams, PeerList, RelayDescriptor, TrustPolicy, MAX_ONION_KEYS,
};
use zeroize::Zeroizing;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if is_broken_pipe(&err) => {
            // The reader went away (`shroudctl peers list L | head -1`): nothing to say.
            ExitCode::from(exit::FAILURE)
        }
        Err(err) => {
            eprintln!("shroudctl: {err:#}");
            if let Some(hint) = hint(&err) {
                eprintln!("shroudctl: hint: {hint}");
            }
            ExitCode::from(exit_code(&err))
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Genkey(args) => genkey(&args),
        Command::Pubkey(args) => pubkey(&args),
        Command::Peers(peers) => match peers {
            PeersCommand::New(args) => peers_new(&args),
            PeersCommand::Add(args) => peers_add(&args),
            PeersCommand::Remove(args) => peers_remove(&args),
            PeersCommand::Import(args) => peers_import(&args),
            PeersCommand::List(args) => peers_list(&args),
            PeersCommand::Sign(args) => peers_sign(&args),
            PeersCommand::Verify(args) => peers_verify(&args),
            PeersCommand::Show(args) => peers_show(&args),
        },
        Command::Status(args) => status(&args),
        Command::Top(args) => top(&args),
        Command::Reload(args) => reload(&args),
        Command::Rotate(args) => rotate_now(&args),
        Command::Drain(args) => drain(&args),
        Command::Shutdown(args) => shutdown(&args),
        Command::Daemon(args) => daemon(&args),
    }
}

/// The exit code for an error: the first library error in the chain decides.
fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<KeyFileError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<FileError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<EditError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<VerifyError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<AdminError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<DescriptorError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<RotateError>() {
            return e.exit_code();
        }
        // Key text read from standard input.
        if cause.downcast_ref::<KeyError>().is_some() {
            return exit::CONFIG;
        }
    }
    exit::FAILURE
}

/// Whether `err` is standard output closed by its reader. A broken pipe on the
/// admin socket (the relay closed the connection, e.g. refusing this user) is not:
/// that one is reported.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    if err
        .chain()
        .any(|c| c.downcast_ref::<AdminError>().is_some())
    {
        return false;
    }
    err.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// What to do about an error, when there is something obvious.
fn hint(err: &anyhow::Error) -> Option<&'static str> {
    err.chain().find_map(|cause| {
        if let Some(e) = cause.downcast_ref::<AdminError>() {
            return e.hint();
        }
        if let Some(RotateError::Relay(e)) = cause.downcast_ref::<RotateError>() {
            return e.hint();
        }
        let exists = matches!(
            cause.downcast_ref::<KeyFileError>(),
            Some(KeyFileError::Exists { .. })
        ) || matches!(
            cause.downcast_ref::<FileError>(),
            Some(FileError::Exists { .. })
        );
        exists.then_some("pass --force to replace it")
    })
}

/// Reports a usage error found after parsing (clap's format, exit code 2).
fn usage_error(subcommand: &[&str], message: impl std::fmt::Display) -> ! {
    let mut target = Cli::command();
    target.build();
    for name in subcommand {
        match target.find_subcommand(name) {
            Some(sub) => target = sub.clone(),
            None => break,
        }
    }
    target.error(ErrorKind::ValueValidation, message).exit()
}

/// Writes `text` to standard output.
fn print(text: &str) -> Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write to standard output")
}

fn note(text: impl std::fmt::Display) {
    eprintln!("shroudctl: {text}");
}

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

fn genkey(args: &GenkeyArgs) -> Result<()> {
    let secret = args.kind.generate();
    match &args.out {
        Some(path) => {
            write_secret_key_file(path, &secret, args.force)?;
            print(&format!("{}\n", args.kind.public_base64(&secret)))
        }
        None => {
            warn_if_stdout_is_shared_file();
            let line = Zeroizing::new(encode_key(&secret));
            print(&line)
        }
    }
}

/// Like `wg genkey`: warn when the secret is about to land in a file that group or
/// others can read (a redirection without `umask 077`).
fn warn_if_stdout_is_shared_file() {
    let Ok(fd) = io::stdout().as_fd().try_clone_to_owned() else {
        return;
    };
    let Ok(meta) = File::from(fd).metadata() else {
        return;
    };
    let mode = meta.permissions().mode() & 0o7777;
    if meta.is_file() && mode & keyfile::FORBIDDEN_MODE_BITS != 0 {
        note(format_args!(
            "warning: writing a secret key to a file with mode {mode:04o}, readable by group or \
             others; shroud refuses such key files (use `genkey --out FILE`, or `umask 077` first)"
        ));
    }
}

fn pubkey(args: &PubkeyArgs) -> Result<()> {
    let limit = keyfile::MAX_KEY_FILE_BYTES;
    let mut buf = Zeroizing::new(Vec::with_capacity(
        usize::try_from(limit).unwrap_or(1024) + 1,
    ));
    io::stdin()
        .lock()
        .take(limit + 1)
        .read_to_end(&mut buf)
        .context("cannot read standard input")?;
    let secret = keyfile::parse_secret_key(&buf).map_err(|e| {
        anyhow::Error::new(e).context(format!(
            "standard input does not hold a secret {} key",
            args.kind.name()
        ))
    })?;
    print(&format!("{}\n", args.kind.public_base64(&secret)))
}

// ---------------------------------------------------------------------------
// Peer list
// ---------------------------------------------------------------------------

fn read_list(path: &Path) -> Result<PeerList> {
    Ok(peerfile::read_peer_list(path)?)
}

fn peers_new(args: &NewArgs) -> Result<()> {
    let params = NetworkParams {
        cell: args.cell,
        h_max: args.h_max,
    };
    if let Err(e) = params.validate() {
        usage_error(
            &["peers", "new"],
            format_args!("invalid --cell/--h-max: {e}"),
        );
    }
    let valid_after = args.valid_after.unwrap_or_else(time::now);
    let Some(valid_until) = valid_after.checked_add(args.valid_for) else {
        usage_error(
            &["peers", "new"],
            "--valid-after plus --valid-for is beyond the end of time",
        );
    };
    let list = PeerList::new(args.serial, valid_after, valid_until, params);
    peerfile::write_peer_list(&args.out, &list, args.force)?;
    print(&format!(
        "created {}: serial {}, valid {} to {}, cell={} h-max={}, no relays, unsigned\n",
        args.out.display(),
        list.serial,
        format_date(valid_after),
        format_date(valid_until),
        params.cell,
        params.h_max
    ))
}

fn signatures_removed(removed: usize) {
    if removed > 0 {
        note(format_args!(
            "removed {removed} signature(s): the content changed, so the list must be signed again"
        ));
    }
}

fn peers_add(args: &AddArgs) -> Result<()> {
    if args.onion.len() > MAX_ONION_KEYS {
        usage_error(
            &["peers", "add"],
            format_args!(
                "at most {MAX_ONION_KEYS} --onion keys per relay, {} given",
                args.onion.len()
            ),
        );
    }
    let mut list = read_list(&args.file)?;
    let relay = RelayDescriptor {
        identity: args.identity,
        addr: args.addr,
        ports: args.ports,
        onion_keys: args
            .onion
            .iter()
            .map(|o| o.entry(list.valid_until))
            .collect(),
        exit: args.exit,
        weight: args.weight,
    };
    for k in relay
        .onion_keys
        .iter()
        .filter(|k| k.valid_until <= list.valid_after)
    {
        note(format_args!(
            "warning: onion key {} expires at {}, before the list becomes valid",
            k.key,
            format_date(k.valid_until)
        ));
    }
    let id = relay.relay_id();
    let (change, removed) = edit::upsert_relay(&mut list, relay)
        .with_context(|| format!("cannot add the relay to {}", args.file.display()))?;
    peerfile::write_peer_list(&args.file, &list, true)?;
    let verb = match change {
        Upsert::Added => "added",
        Upsert::Replaced => "replaced",
    };
    print(&format!(
        "{verb} relay {id} ({} ports {}-{}); {} relay(s) in {}\n",
        args.addr,
        args.ports.0,
        args.ports.1,
        list.relays.len(),
        args.file.display()
    ))?;
    signatures_removed(removed);
    Ok(())
}

fn peers_remove(args: &RemoveArgs) -> Result<()> {
    let selector = match (&args.relay.identity, &args.relay.id) {
        (Some(identity), _) => RelaySelector::Identity(*identity),
        (None, Some(id)) => RelaySelector::Id(*id),
        (None, None) => usage_error(&["peers", "remove"], "give --identity or --id"),
    };
    let mut list = read_list(&args.file)?;
    let (relay, removed) = edit::remove_relay(&mut list, &selector)
        .with_context(|| format!("cannot remove the relay from {}", args.file.display()))?;
    peerfile::write_peer_list(&args.file, &list, true)?;
    print(&format!(
        "removed relay {} ({} ports {}-{}); {} relay(s) left in {}\n",
        relay.relay_id(),
        relay.addr,
        relay.ports.0,
        relay.ports.1,
        list.relays.len(),
        args.file.display()
    ))?;
    signatures_removed(removed);
    Ok(())
}

fn peers_list(args: &ListArgs) -> Result<()> {
    let (list, source) = match &args.file {
        Some(file) if !args.running => (read_list(file)?, None),
        _ => {
            let path = socket(&args.socket);
            let (peers, _) = admin::request_as::<Peers>(&path, &Request::Peers)?;
            if peers.document.is_empty() {
                return Err(AdminError::BadReply {
                    path: path.clone(),
                    reason:
                        "the peers reply has no \"document\" (a relay older than this shroudctl?)"
                            .into(),
                }
                .into());
            }
            let doc = peers.document.as_str();
            let list = PeerList::parse(doc).map_err(|e| AdminError::BadReply {
                path: path.clone(),
                reason: format!("the relay's peer list does not parse: {e}"),
            })?;
            let expired = peers.expired;
            (list, Some((path, expired)))
        }
    };
    if let Some((path, expired)) = &source {
        if !args.json {
            print(&format!(
                "peer list in use by the relay at {}: serial {}{}\n",
                path.display(),
                list.serial,
                if *expired {
                    ", EXPIRED (new circuits refused until a reload brings a valid list)"
                } else {
                    ""
                }
            ))?;
        }
    }
    if args.json {
        let mut text =
            serde_json::to_string_pretty(&ListJson::new(&list)).context("cannot encode JSON")?;
        text.push('\n');
        print(&text)
    } else {
        print(&render::relay_table(
            &list,
            args.now.unwrap_or_else(time::now),
        ))
    }
}

fn peers_sign(args: &SignArgs) -> Result<()> {
    let mut list = read_list(&args.file)?;
    let key = read_identity_key_file(&args.key)?;
    let mut removed = 0;
    if let Some(serial) = args.serial {
        removed = edit::set_serial(&mut list, serial)
            .with_context(|| format!("cannot set the serial of {}", args.file.display()))?;
    }
    let replaced = edit::sign_list(&mut list, &key)
        .with_context(|| format!("cannot sign {}", args.file.display()))?;
    peerfile::write_peer_list(&args.file, &list, true)?;
    let signer = key.public();
    print(&format!(
        "{} serial {} as {} (id {}); {} signature(s) in {}\n",
        if replaced { "re-signed" } else { "signed" },
        list.serial,
        signer,
        signer.relay_id(),
        list.signatures.len(),
        args.file.display()
    ))?;
    signatures_removed(removed);
    let now = time::now();
    if now >= list.valid_until {
        note(format_args!(
            "warning: this list expired at {}; relays and clients will refuse it",
            format_date(list.valid_until)
        ));
    }
    Ok(())
}

fn peers_verify(args: &VerifyArgs) -> Result<()> {
    let list = read_list(&args.file)?;
    let mut authorities = args.authority.clone();
    if let Some(path) = &args.authorities_file {
        authorities.extend(peerfile::read_authorities_file(path)?);
    }
    authorities.sort();
    authorities.dedup();
    if authorities.is_empty() {
        usage_error(
            &["peers", "verify"],
            "no trusted authority given (the authorities file lists none)",
        );
    }
    let threshold = usize::try_from(args.threshold).unwrap_or(usize::MAX);
    if threshold > authorities.len() {
        usage_error(
            &["peers", "verify"],
            format_args!(
                "--threshold {threshold} exceeds the {} distinct trusted authorities given; \
                 no list could ever verify",
                authorities.len()
            ),
        );
    }
    let last_serial = match (&args.last_serial, &args.state) {
        (Some(n), _) => Some(*n),
        (None, Some(path)) => peerfile::read_state(path)?,
        (None, None) => None,
    };
    let now = args.now.unwrap_or_else(time::now);
    let policy = TrustPolicy::new(authorities, threshold);
    let verified = check::verify(&list, &policy, now, last_serial)
        .with_context(|| format!("{}: REJECTED", args.file.display()))?;
    if let Some(path) = &args.state {
        if last_serial != Some(list.serial) {
            peerfile::write_state(path, list.serial)?;
        }
    }
    print(&format!("{verified}\n"))
}

fn peers_show(args: &ShowArgs) -> Result<()> {
    let list = read_list(&args.file)?;
    let source = args.file.display().to_string();
    print(&render::show(
        &list,
        &source,
        args.now.unwrap_or_else(time::now),
    ))
}

fn peers_import(args: &ImportArgs) -> Result<()> {
    let mut list = read_list(&args.file)?;
    let path = &args.descriptor;
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|f| {
            f.take(MAX_DESCRIPTOR_BYTES as u64 + 1)
                .read_to_end(&mut bytes)
        })
        .with_context(|| format!("cannot read descriptor {}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|_| DescriptorError::Malformed {
        line: 1,
        reason: "non-ASCII character".into(),
    });
    let desc = text
        .and_then(|t| Descriptor::parse_and_verify(&t))
        .with_context(|| format!("descriptor {} refused", path.display()))?;
    let relay = desc.relay;
    for k in relay
        .onion_keys
        .iter()
        .filter(|k| k.valid_until <= list.valid_after)
    {
        note(format_args!(
            "warning: onion key {} expires at {}, before the list becomes valid",
            k.key,
            format_date(k.valid_until)
        ));
    }
    let id = relay.relay_id();
    let (addr, ports, keys) = (relay.addr, relay.ports, relay.onion_keys.len());
    let (change, removed) = edit::upsert_relay(&mut list, relay)
        .with_context(|| format!("cannot import the relay into {}", args.file.display()))?;
    peerfile::write_peer_list(&args.file, &list, true)?;
    let verb = match change {
        Upsert::Added => "added",
        Upsert::Replaced => "replaced",
    };
    print(&format!(
        "{verb} relay {id} ({addr} ports {}-{}, {keys} onion key(s), descriptor published {}); \
         {} relay(s) in {}\n",
        ports.0,
        ports.1,
        format_date(desc.published),
        list.relays.len(),
        args.file.display()
    ))?;
    signatures_removed(removed);
    Ok(())
}

// ---------------------------------------------------------------------------
// Live administration
// ---------------------------------------------------------------------------

fn socket(arg: &shroud_control::cli::SocketArg) -> PathBuf {
    admin::socket_path(arg.socket.as_deref())
}

/// Two status samples `interval` seconds apart on one connection: the second
/// sample (raw and parsed) and the rates between them.
fn sample_pair(
    client: &mut AdminClient,
    first: Option<(Status, Instant)>,
    interval: f64,
) -> Result<(Value, Status, Instant, Rates)> {
    let (a, t0) = match first {
        Some(x) => x,
        None => {
            let (status, _) = client.call_as::<Status>(&Request::Status)?;
            (status, Instant::now())
        }
    };
    std::thread::sleep(Duration::from_secs_f64(interval));
    let (b, raw) = client.call_as::<Status>(&Request::Status)?;
    let t1 = Instant::now();
    let rates = Rates::between(&a, &b, t1.duration_since(t0).as_secs_f64());
    Ok((raw, b, t1, rates))
}

fn print_json(v: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v).context("cannot encode JSON")?;
    text.push('\n');
    print(&text)
}

fn status(args: &StatusArgs) -> Result<()> {
    let path = socket(&args.socket);
    let mut client = AdminClient::connect(&path)?;
    let (raw, parsed, rates) = if args.interval > 0.0 {
        let (raw, parsed, _, rates) = sample_pair(&mut client, None, args.interval)?;
        (raw, parsed, Some(rates))
    } else {
        let (parsed, raw) = client.call_as::<Status>(&Request::Status)?;
        (raw, parsed, None)
    };
    if args.json {
        print_json(&json!({"status": raw, "rates": rates}))
    } else {
        print(&render_status(&parsed, rates.as_ref(), time::now()))
    }
}

fn top(args: &TopArgs) -> Result<()> {
    let path = socket(&args.socket);
    let mut client = AdminClient::connect(&path)?;
    let terminal = io::stdout().is_terminal();
    let mut last: Option<(Status, Instant)> = None;
    let mut frame = 0u64;
    loop {
        let (_, parsed, t, rates) = sample_pair(&mut client, last.take(), args.interval)?;
        let now = time::now();
        let mut text = String::new();
        if terminal {
            // Home the cursor and clear the screen: the frame is redrawn in place.
            text.push_str("\x1b[H\x1b[2J");
        } else if frame > 0 {
            text.push('\n');
        }
        text.push_str(&format!(
            "shroudctl top: {}  {}  (every {} s; Ctrl-C quits)\n\n",
            path.display(),
            format_date(now),
            args.interval
        ));
        text.push_str(&render_status(&parsed, Some(&rates), now));
        print(&text)?;
        frame += 1;
        if args.iterations.is_some_and(|n| frame >= n) {
            return Ok(());
        }
        last = Some((parsed, t));
    }
}

fn admin_command<T: serde::de::DeserializeOwned>(
    arg: &shroud_control::cli::SocketArg,
    request: &Request,
) -> Result<(T, Value)> {
    Ok(admin::request_as(&socket(arg), request)?)
}

fn reload(args: &AdminArgs) -> Result<()> {
    let (r, raw) = admin_command::<Reloaded>(&args.socket, &Request::Reload)?;
    if args.json {
        return print_json(&raw);
    }
    print(&format!(
        "reloaded: peer list serial {}, {} relay(s); {} onion key(s)\n",
        r.serial, r.peers, r.onion_keys
    ))
}

fn rotate_now(args: &AdminArgs) -> Result<()> {
    let (r, raw) = admin_command::<Rotated>(&args.socket, &Request::Rotate)?;
    if args.json {
        return print_json(&raw);
    }
    let now = time::now();
    let mut text = format!(
        "rotated: the relay holds {} onion key(s), newest first\n",
        r.onion_keys.len()
    );
    for k in &r.onion_keys {
        let until = match k.valid_until {
            Some(t) => format!("expires {}", format_date_relative(t, now)),
            None => "not in the peer list yet".to_owned(),
        };
        text.push_str(&format!("  {}  {until}\n", k.public));
    }
    print(&text)
}

fn drain(args: &DrainArgs) -> Result<()> {
    let (r, raw) = admin_command::<Draining>(
        &args.socket,
        &Request::Drain {
            timeout_s: args.timeout,
        },
    )?;
    if args.json {
        return print_json(&raw);
    }
    let deadline = (r.deadline_ms > 0).then_some(r.deadline_ms / 1000);
    print(&format!(
        "draining: the relay refuses new circuits and exits when its last circuit ends{}\n",
        deadline
            .map(|t| format!(
                " or at {}, whichever comes first",
                format_date_relative(t, time::now())
            ))
            .unwrap_or_default()
    ))
}

fn shutdown(args: &AdminArgs) -> Result<()> {
    let (_, raw) = admin_command::<Stopping>(&args.socket, &Request::Shutdown)?;
    if args.json {
        return print_json(&raw);
    }
    print("stopping: the relay is shutting down\n")
}

// ---------------------------------------------------------------------------
// Key rotation daemon
// ---------------------------------------------------------------------------

fn daemon(args: &DaemonArgs) -> Result<()> {
    let policy = rotate::RotationPolicy {
        lifetime: args.lifetime,
        grace: args.grace,
        lead: args.lead,
    };
    if let Err(e) = policy.validate() {
        usage_error(&["daemon"], e);
    }
    let descriptor = match (
        &args.descriptor_out,
        &args.identity_key,
        args.addr,
        args.ports,
    ) {
        (Some(out), Some(identity_key), Some(addr), Some(ports)) => {
            // Fail now, not at the first rotation, if the identity key is unusable.
            read_identity_key_file(identity_key)?;
            Some(DescriptorConfig {
                out: out.clone(),
                identity_key: identity_key.clone(),
                addr,
                ports,
                exit: args.exit,
                weight: args.weight,
            })
        }
        (None, ..) => None,
        _ => usage_error(
            &["daemon"],
            "--descriptor-out needs --identity-key, --addr and --ports",
        ),
    };
    let cfg = DaemonConfig {
        key_dir: args.key_dir.clone(),
        policy,
        descriptor,
    };
    let mut relay = AdminRelay {
        socket: socket(&args.socket),
    };
    if args.once {
        let now = args.now.unwrap_or_else(time::now);
        let report = rotate::step(&cfg, now, &mut relay)?;
        let mut text = String::new();
        for n in &report.notes {
            text.push_str(&format!("{n}\n"));
        }
        if !report.did_something() {
            text.push_str("nothing due\n");
        }
        if let Some((t, what)) = report.next {
            text.push_str(&format!(
                "next: {what} at {}\n",
                format_date_relative(t, now)
            ));
        }
        return print(&text);
    }
    println!(
        "shroudctl daemon: keeping onion keys in {} for the relay at {} (lifetime {}s, lead {}s, grace {}s)",
        cfg.key_dir.display(),
        relay.socket.display(),
        policy.lifetime,
        policy.lead,
        policy.grace
    );
    loop {
        let now = time::now();
        let wait = match rotate::step(&cfg, now, &mut relay) {
            Ok(report) => {
                for n in &report.notes {
                    println!("shroudctl daemon: {n}");
                }
                if report.did_something() {
                    if let Some((t, what)) = report.next {
                        println!(
                            "shroudctl daemon: next: {what} at {}",
                            format_date_relative(t, now)
                        );
                    }
                }
                report.next.map(|(t, _)| t.saturating_sub(now))
            }
            Err(e) => {
                let e = anyhow::Error::new(e);
                eprintln!("shroudctl daemon: error (retrying in a minute): {e:#}");
                if let Some(h) = hint(&e) {
                    eprintln!("shroudctl daemon: hint: {h}");
                }
                None
            }
        };
        // Sleep until the next event, but re-check at least every minute (the clock
        // may jump, the relay may restart).
        std::thread::sleep(Duration::from_secs(wait.unwrap_or(60).clamp(1, 60)));
    }
}
