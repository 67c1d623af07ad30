//! End-to-end tests of the `shroudctl` binary: each test runs the real executable in
//! a temporary directory and checks its standard output, standard error, exit code
//! and the files it leaves behind.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use shroud_proto::keys::{IdentityKey, OnionSecret};
use shroud_proto::peerlist::PeerList;
use tempfile::TempDir;

/// Start of validity of the test lists (2025-11-24T16:00:00Z).
const AFTER: u64 = 1_764_000_000;
/// End of validity of the test lists (24 hours later, exclusive).
const UNTIL: u64 = AFTER + 86_400;
/// A time inside the validity window.
const NOW: u64 = AFTER + 43_200;

/// A temporary working directory in which `shroudctl` runs.
struct Dir {
    dir: TempDir,
}

/// What a run of `shroudctl` produced.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn from(out: Output) -> Self {
        Self {
            code: out.status.code().expect("shroudctl was killed by a signal"),
            stdout: String::from_utf8(out.stdout).expect("stdout is UTF-8"),
            stderr: String::from_utf8(out.stderr).expect("stderr is UTF-8"),
        }
    }

    /// Asserts success and returns stdout.
    fn ok(self) -> String {
        assert_eq!(self.code, 0, "expected success; stderr:\n{}", self.stderr);
        self.stdout
    }

    /// Asserts the exit code and that stderr mentions every `needle`; returns stderr.
    fn fails(self, code: i32, needles: &[&str]) -> String {
        assert_eq!(
            self.code, code,
            "expected exit code {code}; stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        for needle in needles {
            assert!(
                self.stderr.contains(needle),
                "stderr lacks {needle:?}:\n{}",
                self.stderr
            );
        }
        self.stderr
    }
}

impl Dir {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shroudctl"));
        cmd.args(args).current_dir(self.dir.path());
        cmd
    }

    fn run(&self, args: &[&str]) -> Run {
        Run::from(self.cmd(args).output().expect("run shroudctl"))
    }

    fn run_stdin(&self, args: &[&str], stdin: &str) -> Run {
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn shroudctl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        Run::from(child.wait_with_output().expect("wait"))
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.path(name)).expect("read file")
    }

    /// `genkey --type KIND --out NAME`; returns the printed public key.
    fn genkey(&self, kind: &str, name: &str) -> String {
        let out = self.run(&["genkey", "--type", kind, "--out", name]).ok();
        out.trim_end().to_owned()
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("metadata").permissions().mode() & 0o7777
}

fn assert_key_line(text: &str) {
    assert_eq!(text.len(), 45, "{text:?}");
    assert!(text.ends_with('\n'), "{text:?}");
    assert!(!text[..44].contains(char::is_whitespace), "{text:?}");
}

#[test]
fn help_mentions_every_command_and_the_exit_codes() {
    let d = Dir::new();
    let top = d.run(&["--help"]).ok();
    for word in [
        "genkey",
        "pubkey",
        "peers",
        "Exit status",
        "78",
        "EX_CONFIG",
    ] {
        assert!(top.contains(word), "--help lacks {word:?}:\n{top}");
    }
    let peers = d.run(&["peers", "--help"]).ok();
    for word in [
        "new", "add", "remove", "list", "sign", "verify", "show", "78",
    ] {
        assert!(
            peers.contains(word),
            "peers --help lacks {word:?}:\n{peers}"
        );
    }
    let verify = d.run(&["peers", "verify", "--help"]).ok();
    for word in [
        "--authority",
        "--authorities-file",
        "--threshold",
        "--state",
        "--now",
    ] {
        assert!(verify.contains(word), "verify --help lacks {word:?}");
    }
    for word in [
        "status", "top", "reload", "rotate", "drain", "shutdown", "daemon",
    ] {
        assert!(top.contains(word), "--help lacks {word:?}:\n{top}");
    }
    for cmd in ["status", "top", "reload", "rotate", "drain", "shutdown"] {
        let help = d.run(&[cmd, "--help"]).ok();
        for word in [
            "--socket",
            "SHROUD_ADMIN_SOCKET",
            "/run/shroud/admin.sock",
            "Exit status",
            "unreachable",
        ] {
            assert!(help.contains(word), "{cmd} --help lacks {word:?}:\n{help}");
        }
    }
    let status = d.run(&["status", "--help"]).ok();
    for word in ["--json", "--interval", "cells_rx_per_s"] {
        assert!(status.contains(word), "status --help lacks {word:?}");
    }
    assert!(d.run(&["top", "--help"]).ok().contains("--iterations"));
    assert!(d.run(&["drain", "--help"]).ok().contains("--timeout"));
    let daemon = d.run(&["daemon", "--help"]).ok();
    for word in [
        "--key-dir",
        "--lifetime",
        "--grace",
        "--lead",
        "--descriptor-out",
        "--identity-key",
        "--once",
        "--now",
        "onion-<UNIX_SECONDS>.key",
    ] {
        assert!(daemon.contains(word), "daemon --help lacks {word:?}");
    }
    assert!(d
        .run(&["peers", "import", "--help"])
        .ok()
        .contains("--descriptor"));
    // Usage errors keep clap's exit code 2.
    d.run(&["frobnicate"]).fails(2, &["frobnicate"]);
    d.run(&["peers", "new", "--out", "x"])
        .fails(2, &["--serial"]);
}

#[test]
fn genkey_pubkey_round_trip_matches_shroud_proto() {
    let d = Dir::new();
    for kind in ["identity", "onion"] {
        // `genkey | pubkey`.
        let secret = d.run(&["genkey", "--type", kind]).ok();
        assert_key_line(&secret);
        let public = d.run_stdin(&["pubkey", "--type", kind], &secret).ok();
        assert_key_line(&public);
        let expected = match kind {
            "identity" => secret
                .parse::<IdentityKey>()
                .expect("seed")
                .public()
                .to_base64(),
            _ => secret
                .parse::<OnionSecret>()
                .expect("secret")
                .public()
                .to_base64(),
        };
        assert_eq!(public.trim_end(), expected);
        // Without the trailing newline too.
        let again = d
            .run_stdin(&["pubkey", "--type", kind], secret.trim_end())
            .ok();
        assert_eq!(again, public);

        // `genkey --out` prints the public key of the secret it wrote.
        let name = format!("{kind}.key");
        let printed = d.genkey(kind, &name);
        let written = d.read(&name);
        assert_key_line(&written);
        assert!(!printed.contains(written.trim_end()));
        let derived = d.run_stdin(&["pubkey", "--type", kind], &written).ok();
        assert_eq!(derived.trim_end(), printed);
    }
    // The default kind is onion, for both commands.
    let secret = d.run(&["genkey"]).ok();
    let public = d.run_stdin(&["pubkey"], &secret).ok();
    let expected = secret.parse::<OnionSecret>().expect("secret").public();
    assert_eq!(public.trim_end(), expected.to_base64());
}

#[test]
fn pubkey_refuses_malformed_input() {
    let d = Dir::new();
    let secret = d.run(&["genkey"]).ok();
    for bad in [
        String::new(),
        "not a key\n".to_owned(),
        format!("{secret}\n"),
        secret.replace('\n', "\r\n"),
        format!(" {secret}"),
    ] {
        d.run_stdin(&["pubkey"], &bad)
            .fails(78, &["standard input does not hold a secret onion key"]);
    }
}

#[test]
fn key_files_are_created_0600_and_never_overwritten_silently() {
    let d = Dir::new();
    let public = d.genkey("identity", "k");
    assert_eq!(mode(&d.path("k")), 0o600);
    let first = d.read("k");

    let stderr = d
        .run(&["genkey", "--type", "identity", "--out", "k"])
        .fails(1, &["already exists", "--force"]);
    assert!(!stderr.contains(first.trim_end()));
    assert_eq!(d.read("k"), first);

    // --force replaces it, still 0600, even if the old file was 0644.
    fs::set_permissions(d.path("k"), fs::Permissions::from_mode(0o644)).expect("chmod");
    let replaced = d
        .run(&["genkey", "--type", "identity", "--out", "k", "--force"])
        .ok();
    assert_ne!(replaced.trim_end(), public);
    assert_ne!(d.read("k"), first);
    assert_eq!(mode(&d.path("k")), 0o600);
    // Nothing else (temporary files) is left in the directory.
    assert_eq!(fs::read_dir(d.dir.path()).expect("ls").count(), 1);

    // --force without --out is a usage error.
    d.run(&["genkey", "--force"]).fails(2, &["--out"]);
}

/// A network: three authorities, three relays, a list valid over [AFTER, UNTIL).
struct Network {
    d: Dir,
    authorities: [String; 3],
    relays: Vec<(String, String)>,
}

impl Network {
    fn new() -> Self {
        let d = Dir::new();
        let authorities = ["a1", "a2", "a3"].map(|a| d.genkey("identity", &format!("{a}.key")));
        let relays = (1..=3)
            .map(|i| {
                let identity = d.genkey("identity", &format!("relay{i}.key"));
                let onion = d.genkey("onion", &format!("relay{i}.onion"));
                (identity, onion)
            })
            .collect();
        Self {
            d,
            authorities,
            relays,
        }
    }

    /// Builds `name` with the three relays, unsigned.
    fn build(&self, name: &str, serial: u64) {
        let (after, serial) = (AFTER.to_string(), serial.to_string());
        self.d
            .run(&[
                "peers",
                "new",
                "--out",
                name,
                "--serial",
                &serial,
                "--valid-for",
                "24h",
                "--valid-after",
                &after,
            ])
            .ok();
        for (i, (identity, onion)) in self.relays.iter().enumerate() {
            let addr = format!("127.0.0.{}", i + 2);
            let onion_until = format!("{onion}@{}", UNTIL + 3_600);
            let mut args = vec![
                "peers",
                "add",
                name,
                "--identity",
                identity,
                "--addr",
                &addr,
                "--ports",
                "9000-9001",
                "--onion",
                &onion_until,
                "--weight",
                "100",
            ];
            if i == 0 {
                args.push("--exit");
            }
            self.d.run(&args).ok();
        }
    }

    fn sign(&self, name: &str, authority: usize) {
        let key = format!("a{authority}.key");
        self.d.run(&["peers", "sign", name, "--key", &key]).ok();
    }

    /// `peers verify NAME` trusting all three authorities, plus `extra` arguments.
    fn verify(&self, name: &str, threshold: u64, now: u64, extra: &[&str]) -> Run {
        let (threshold, now) = (threshold.to_string(), now.to_string());
        let mut args = vec!["peers", "verify", name];
        for a in &self.authorities {
            args.extend(["--authority", a.as_str()]);
        }
        args.extend(["--threshold", &threshold, "--now", &now]);
        args.extend(extra);
        self.d.run(&args)
    }
}

#[test]
fn peer_list_signed_by_two_of_three_verifies_and_every_fault_is_refused() {
    let net = Network::new();
    let d = &net.d;
    net.build("L", 42);
    net.sign("L", 1);
    net.sign("L", 2);
    let list = PeerList::parse(&d.read("L")).expect("canonical");
    assert_eq!(list.relays.len(), 3);
    assert_eq!(list.signatures.len(), 2);
    // A public document: readable by its owner at least (the umask decides the rest).
    assert_eq!(mode(&d.path("L")) & 0o600, 0o600);

    let ok = net.verify("L", 2, NOW, &[]).ok();
    assert!(
        ok.starts_with("OK: serial 42, signed by 2 of 3 trusted authorities (threshold 2)"),
        "{ok}"
    );
    assert!(
        ok.contains("3 relays, expires in 12h (2025-11-25T16:00:00Z)"),
        "{ok}"
    );
    assert_eq!(ok.lines().count(), 1);

    // The same with the keys in an authorities file.
    let file = format!("# test authorities\n{}\n\n", net.authorities.join("\n"));
    fs::write(d.path("auth"), file).expect("write");
    d.run(&[
        "peers",
        "verify",
        "L",
        "--authorities-file",
        "auth",
        "--threshold",
        "2",
        "--now",
        &NOW.to_string(),
    ])
    .ok();

    // Tampered: one byte of a relay line changed after signing (weight 100 -> 900).
    let text = d.read("L");
    let at = text.find(" weight 100\n").expect("weight line") + " weight ".len();
    let mut bytes = text.into_bytes();
    bytes[at] = b'9';
    fs::write(d.path("tampered"), &bytes).expect("write");
    net.verify("tampered", 2, NOW, &[])
        .fails(1, &["tampered", "REJECTED", "does not verify", "altered"]);

    // Expired: at valid-until (exclusive) and later.
    net.verify("L", 2, UNTIL, &[]).fails(1, &["expired"]);
    net.verify("L", 2, UNTIL + 7_200, &[])
        .fails(1, &["expired 2h ago", "2025-11-25T16:00:00Z"]);

    // Not yet valid.
    net.verify("L", 2, AFTER - 60, &[])
        .fails(1, &["not valid yet", "becomes valid in 1m"]);

    // Under threshold.
    net.verify("L", 3, NOW, &[])
        .fails(1, &["2 valid signature(s)", "3 required"]);
    // A threshold above the number of authorities is a usage error.
    net.verify("L", 4, NOW, &[]).fails(2, &["--threshold 4"]);

    // Truncated in the middle: does not parse.
    let text = d.read("L");
    fs::write(d.path("truncated"), &text[..text.len() / 2]).expect("write");
    net.verify("truncated", 2, NOW, &[])
        .fails(78, &["truncated is not a valid peer list", "line"]);

    // Unsigned.
    net.build("unsigned", 43);
    net.verify("unsigned", 2, NOW, &[]).fails(1, &["unsigned"]);

    // Missing file: an I/O failure.
    net.verify("missing", 2, NOW, &[]).fails(1, &["missing"]);
}

#[test]
fn state_file_records_the_serial_and_refuses_rollback() {
    let net = Network::new();
    let d = &net.d;
    net.build("L", 42);
    net.sign("L", 1);
    net.sign("L", 3);

    // No state yet: accepted and recorded.
    net.verify("L", 2, NOW, &["--state", "state"]).ok();
    assert_eq!(d.read("state"), "42\n");
    // The same list again is fine (an equal serial is the same list refetched).
    net.verify("L", 2, NOW, &["--state", "state"]).ok();

    // A newer list moves the state forward.
    net.build("L2", 50);
    net.sign("L2", 2);
    net.sign("L2", 3);
    net.verify("L2", 2, NOW, &["--state", "state"]).ok();
    assert_eq!(d.read("state"), "50\n");

    // Going back to serial 42 is a rollback, and the state is kept.
    net.verify("L", 2, NOW, &["--state", "state"])
        .fails(1, &["rollback", "42", "50"]);
    assert_eq!(d.read("state"), "50\n");
    net.verify("L", 2, NOW, &["--last-serial", "43"])
        .fails(1, &["rollback"]);

    // A corrupt state file is a configuration error.
    fs::write(d.path("state"), "fifty\n").expect("write");
    net.verify("L", 2, NOW, &["--state", "state"])
        .fails(78, &["state file", "corrupt"]);
    // --state and --last-serial exclude each other.
    net.verify("L", 2, NOW, &["--state", "state", "--last-serial", "1"])
        .fails(2, &[]);
}

#[test]
fn world_readable_identity_key_is_refused() {
    let net = Network::new();
    let d = &net.d;
    net.build("L", 1);
    let before = d.read("L");
    fs::set_permissions(d.path("a1.key"), fs::Permissions::from_mode(0o644)).expect("chmod");
    let secret = d.read("a1.key");
    let stderr = d
        .run(&["peers", "sign", "L", "--key", "a1.key"])
        .fails(78, &["a1.key", "0644", "chmod 600 a1.key"]);
    assert!(!stderr.contains(secret.trim_end()));
    assert_eq!(d.read("L"), before, "the list must not change");

    // A key file that is not one strict line is refused too, without echoing it.
    fs::write(d.path("bad.key"), format!("{secret}extra\n")).expect("write");
    fs::set_permissions(d.path("bad.key"), fs::Permissions::from_mode(0o600)).expect("chmod");
    let stderr = d
        .run(&["peers", "sign", "L", "--key", "bad.key"])
        .fails(78, &["bad.key", "does not hold a key"]);
    assert!(!stderr.contains(secret.trim_end()));

    // A directory is not a key file.
    fs::create_dir(d.path("dir.key")).expect("mkdir");
    d.run(&["peers", "sign", "L", "--key", "dir.key"])
        .fails(78, &["not a regular file"]);
}

#[test]
fn editing_removes_signatures_and_sign_can_bump_the_serial() {
    let net = Network::new();
    let d = &net.d;
    net.build("L", 7);
    net.sign("L", 1);
    net.sign("L", 2);
    let list = PeerList::parse(&d.read("L")).expect("parse");
    let victim = list.relays[1].relay_id().to_string();

    let run = d.run(&["peers", "remove", "L", "--id", &victim]);
    assert!(
        run.stderr.contains("removed 2 signature(s)"),
        "{}",
        run.stderr
    );
    run.ok();
    let list = PeerList::parse(&d.read("L")).expect("parse");
    assert_eq!(list.relays.len(), 2);
    assert!(list.signatures.is_empty());
    d.run(&["peers", "remove", "L", "--id", &victim])
        .fails(1, &["no relay with relay id"]);

    // Replacing a relay by identity keeps the count (one still listed: the victim
    // above is any of the three).
    let (identity, onion) = net
        .relays
        .iter()
        .find(|(identity, _)| {
            list.relays
                .iter()
                .any(|r| r.identity.to_base64() == *identity)
        })
        .expect("a relay still listed");
    let out = d
        .run(&[
            "peers",
            "add",
            "L",
            "--identity",
            identity,
            "--addr",
            "2001:db8::1",
            "--ports",
            "443",
            "--onion",
            onion,
        ])
        .ok();
    assert!(out.starts_with("replaced relay"), "{out}");
    let list = PeerList::parse(&d.read("L")).expect("parse");
    assert_eq!(list.relays.len(), 2);
    let relay = list
        .relays
        .iter()
        .find(|r| r.identity.to_base64() == *identity)
        .expect("relay");
    assert_eq!(relay.addr.to_string(), "2001:db8::1");
    assert!(!relay.exit);
    // Without @UNTIL the onion key lasts as long as the list.
    assert_eq!(relay.onion_keys[0].valid_until, UNTIL);

    // Overlapping ports on one address are refused; the file is unchanged.
    let before = d.read("L");
    let (other, onion2) = &net.relays[2];
    d.run(&[
        "peers",
        "add",
        "L",
        "--identity",
        other,
        "--addr",
        "2001:db8::1",
        "--ports",
        "400-500",
        "--onion",
        onion2,
    ])
    .fails(1, &["overlap"]);
    assert_eq!(d.read("L"), before);
    // More than three onion keys is a usage error.
    let four: Vec<String> = (0..4)
        .map(|i| d.genkey("onion", &format!("extra{i}")))
        .collect();
    let mut args = vec![
        "peers",
        "add",
        "L",
        "--identity",
        other,
        "--addr",
        "10.1.1.1",
        "--ports",
        "1",
    ];
    for k in &four {
        args.extend(["--onion", k.as_str()]);
    }
    d.run(&args).fails(2, &["at most 3"]);

    net.sign("L", 1);
    net.sign("L", 2);
    let run = d.run(&["peers", "sign", "L", "--key", "a3.key", "--serial", "8"]);
    assert!(
        run.stderr.contains("removed 2 signature(s)"),
        "{}",
        run.stderr
    );
    run.ok();
    let list = PeerList::parse(&d.read("L")).expect("parse");
    assert_eq!(list.serial, 8);
    assert_eq!(list.signatures.len(), 1);
    d.run(&["peers", "sign", "L", "--key", "a1.key", "--serial", "8"])
        .fails(1, &["not above the current serial 8"]);
    net.sign("L", 1);
    net.verify("L", 2, NOW, &[]).ok();

    // Invalid network parameters are refused up front.
    d.run(&[
        "peers",
        "new",
        "--out",
        "bad",
        "--serial",
        "1",
        "--valid-for",
        "1h",
        "--cell",
        "1000",
    ])
    .fails(2, &["cell"]);
    // `peers new` does not overwrite.
    d.run(&[
        "peers",
        "new",
        "--out",
        "L",
        "--serial",
        "1",
        "--valid-for",
        "1h",
    ])
    .fails(1, &["already exists"]);
}

#[test]
fn show_and_list_json_describe_the_list() {
    let net = Network::new();
    let d = &net.d;
    net.build("L", 42);
    net.sign("L", 1);
    net.sign("L", 2);
    let list = PeerList::parse(&d.read("L")).expect("parse");
    let now = NOW.to_string();

    let json = d.run(&["peers", "list", "L", "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(v["serial"], 42);
    assert_eq!(v["valid_after"], AFTER);
    assert_eq!(v["valid_until"], UNTIL);
    assert_eq!(v["params"]["cell"], 1024);
    assert_eq!(v["params"]["h_max"], 8);
    assert_eq!(v["signers"].as_array().expect("signers").len(), 2);
    let relays = v["relays"].as_array().expect("relays");
    assert_eq!(relays.len(), 3);
    for (r, expected) in relays.iter().zip(&list.relays) {
        assert_eq!(r["relay_id"], expected.relay_id().to_string());
        assert_eq!(r["identity"], expected.identity.to_base64());
        assert_eq!(r["addr"], expected.addr.to_string());
        assert_eq!(r["port_first"], 9000);
        assert_eq!(r["port_last"], 9001);
        assert_eq!(r["exit"], expected.exit);
        assert_eq!(r["weight"], 100);
        assert_eq!(
            r["onion_keys"][0]["key"],
            expected.onion_keys[0].key.to_base64()
        );
        assert_eq!(r["onion_keys"][0]["valid_until"], UNTIL + 3_600);
    }
    assert_eq!(relays.iter().filter(|r| r["exit"] == true).count(), 1);

    let table = d.run(&["peers", "list", "L", "--now", &now]).ok();
    assert_eq!(table.lines().count(), 4, "{table}");
    assert!(table.starts_with("RELAY ID"), "{table}");
    for r in &list.relays {
        let line = table
            .lines()
            .find(|l| l.starts_with(&r.relay_id().to_string()))
            .expect("a line per relay");
        assert!(
            line.contains(&r.addr.to_string()) && line.contains("9000-9001"),
            "{line}"
        );
        assert!(line.ends_with("2025-11-25T17:00:00Z (in 13h)"), "{line}");
    }

    let show = d.run(&["peers", "show", "L", "--now", &now]).ok();
    for needle in [
        "serial       42",
        "params       cell=1024 h-max=8",
        "valid after  2025-11-24T16:00:00Z (12h ago)",
        "valid until  2025-11-25T16:00:00Z (in 12h)",
        "status       current (expires in 12h)",
        "relays       3 (1 exit)",
        "signatures   2",
    ] {
        assert!(show.contains(needle), "show lacks {needle:?}:\n{show}");
    }
    for r in &list.relays {
        assert!(show.contains(&format!("relay {}", r.relay_id())), "{show}");
        assert!(show.contains(&r.onion_keys[0].key.to_base64()), "{show}");
    }
    for a in &net.authorities[..2] {
        let id = a
            .parse::<shroud_proto::keys::IdentityPublic>()
            .expect("pub")
            .relay_id();
        assert!(
            show.contains(&format!("signature by {a} (id {id}): valid")),
            "{show}"
        );
    }
    assert!(!show.contains(&net.authorities[2]));

    // On a tampered copy, show still works and flags the signatures.
    let tampered = d.read("L").replacen(" weight 100\n", " weight 101\n", 1);
    fs::write(d.path("T"), tampered).expect("write");
    let show = d
        .run(&["peers", "show", "T", "--now", &UNTIL.to_string()])
        .ok();
    assert_eq!(show.matches("INVALID").count(), 2, "{show}");
    assert!(show.contains("EXPIRED (now)"), "{show}");

    // Neither command accepts an unparseable file.
    fs::write(d.path("junk"), "hello\n").expect("write");
    d.run(&["peers", "show", "junk"])
        .fails(78, &["junk is not a valid peer list"]);
    d.run(&["peers", "list", "junk"]).fails(78, &["junk"]);
}

#[test]
fn peers_import_adds_a_signed_descriptor_and_refuses_a_forged_one() {
    use shroud_control::descriptor::Descriptor;
    use shroud_proto::peerlist::{OnionKeyEntry, RelayDescriptor};

    let net = Network::new();
    let d = &net.d;
    net.build("L", 7);
    net.sign("L", 1);
    let relay_key = IdentityKey::from_bytes(&[42; 32]);
    let relay = RelayDescriptor {
        identity: relay_key.public(),
        addr: "192.0.2.42".parse().expect("addr"),
        ports: (7000, 7003),
        onion_keys: vec![OnionKeyEntry {
            key: OnionSecret::from_bytes(&[43; 32]).public(),
            valid_until: UNTIL + 7_200,
        }],
        exit: false,
        weight: 5,
    };
    let desc = Descriptor::sign(relay.clone(), &relay_key, AFTER);
    fs::write(d.path("r.desc"), desc.encode()).expect("write");
    let run = d.run(&["peers", "import", "L", "--descriptor", "r.desc"]);
    assert!(
        run.stderr.contains("removed 1 signature(s)"),
        "{}",
        run.stderr
    );
    let out = run.ok();
    assert!(
        out.starts_with(&format!("added relay {}", relay.relay_id())),
        "{out}"
    );
    assert!(out.contains("(192.0.2.42 ports 7000-7003, 1 onion key(s), descriptor published 2025-11-24T16:00:00Z); 4 relay(s) in L"), "{out}");
    let list = PeerList::parse(&d.read("L")).expect("parse");
    assert_eq!(list.relay_by_identity(&relay_key.public()), Some(&relay));

    // A new descriptor with another key replaces the entry.
    let mut next = relay.clone();
    next.onion_keys.push(OnionKeyEntry {
        key: OnionSecret::from_bytes(&[44; 32]).public(),
        valid_until: UNTIL + 90_000,
    });
    fs::write(
        d.path("r.desc"),
        Descriptor::sign(next.clone(), &relay_key, AFTER + 1).encode(),
    )
    .expect("write");
    let out = d
        .run(&["peers", "import", "L", "--descriptor", "r.desc"])
        .ok();
    assert!(out.starts_with("replaced relay"), "{out}");
    let list = PeerList::parse(&d.read("L")).expect("parse");
    assert_eq!(list.relay_by_identity(&relay_key.public()), Some(&next));

    // Forged (signed by another key), tampered, malformed: refused, list unchanged.
    let before = d.read("L");
    let mut forged = Descriptor::sign(relay.clone(), &IdentityKey::from_bytes(&[9; 32]), AFTER);
    forged.relay.identity = relay_key.public();
    fs::write(d.path("f.desc"), forged.encode()).expect("write");
    d.run(&["peers", "import", "L", "--descriptor", "f.desc"])
        .fails(1, &["f.desc", "does not verify"]);
    let text = desc.encode().replace("weight 5", "weight 50");
    fs::write(d.path("t.desc"), text).expect("write");
    d.run(&["peers", "import", "L", "--descriptor", "t.desc"])
        .fails(1, &["does not verify"]);
    fs::write(d.path("m.desc"), &desc.encode()[..100]).expect("write");
    d.run(&["peers", "import", "L", "--descriptor", "m.desc"])
        .fails(78, &["not a valid relay descriptor"]);
    d.run(&["peers", "import", "L", "--descriptor", "missing.desc"])
        .fails(1, &["cannot read descriptor"]);
    assert_eq!(d.read("L"), before);
}

#[test]
fn time_options_accept_now_as_their_help_says() {
    let d = Dir::new();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    d.run(&[
        "peers",
        "new",
        "--out",
        "l",
        "--serial",
        "1",
        "--valid-for",
        "1h",
        "--valid-after",
        "now",
    ])
    .ok();
    let list = PeerList::parse(&d.read("l")).unwrap();
    assert!(
        list.valid_after >= before && list.valid_after <= before + 5,
        "{}",
        list.valid_after
    );
    assert_eq!(list.valid_until, list.valid_after + 3600);
    d.run(&["peers", "list", "l", "--now", "now"]).ok();
    // Anything else that is not a time is still a usage error naming the argument.
    d.run(&[
        "peers",
        "new",
        "--out",
        "m",
        "--serial",
        "1",
        "--valid-for",
        "1h",
        "--valid-after",
        "tomorrow",
    ])
    .fails(2, &["--valid-after", "tomorrow"]);
    // `peers list` needs a file or --running.
    d.run(&["peers", "list"]).fails(2, &["--running"]);
}
