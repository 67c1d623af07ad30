//! The `shroud-relay` binary's command line: help, `--verify-config`, and exit code 78
//! for every kind of bad configuration (including the peer-list rollback state).

use std::process::Command;

use shroud_proto::keys::{IdentityKey, OnionSecret};
use shroud_proto::peerlist::{NetworkParams, OnionKeyEntry, PeerList, RelayDescriptor};
use shroud_tests::{now_s, temp_dir, write_key};

fn relay() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shroud-relay"))
}

struct Setup {
    dir: std::path::PathBuf,
    authority: IdentityKey,
}

/// Runs `shroud-relay --config CFG --verify-config`.
fn verify(cfg: &std::path::Path) -> std::process::Output {
    relay()
        .arg("--config")
        .arg(cfg)
        .arg("--verify-config")
        .output()
        .unwrap()
}

fn setup(tag: &str) -> Setup {
    let now = now_s();
    setup_valid(tag, now - 10, now + 3600)
}

/// As [`setup`], with the peer list valid from `after` until `until`.
fn setup_valid(tag: &str, after: u64, until: u64) -> Setup {
    let dir = temp_dir(tag);
    let mut rng = rand_core::OsRng;
    let id = IdentityKey::generate(&mut rng);
    let onion = OnionSecret::generate(&mut rng);
    let authority = IdentityKey::generate(&mut rng);
    write_key(&dir.join("identity.key"), &id.to_bytes());
    write_key(&dir.join("onion.key"), &onion.to_bytes());
    let now = now_s();
    let mut list = PeerList::new(7, after, until, NetworkParams::default());
    list.relays.push(RelayDescriptor {
        identity: id.public(),
        addr: "127.0.0.1".parse().unwrap(),
        ports: (9000, 9000),
        onion_keys: vec![OnionKeyEntry {
            key: onion.public(),
            valid_until: now + 3600,
        }],
        exit: false,
        weight: 1,
    });
    list.normalize();
    list.sign(&authority).unwrap();
    std::fs::write(dir.join("peers.list"), list.encode()).unwrap();
    Setup { dir, authority }
}

fn config(s: &Setup, extra: &str) -> std::path::PathBuf {
    let p = s.dir.join("relay.toml");
    std::fs::write(
        &p,
        format!(
            "[relay]\nidentity_key = \"identity.key\"\nonion_keys = [\"onion.key\"]\npeer_list = \"peers.list\"\npeer_list_state = \"peer-list.serial\"\nsetup_journal = \"setup.journal\"\nauthorities = [\"{}\"]\n{extra}",
            s.authority.public().to_base64()
        ),
    )
    .unwrap();
    p
}

#[test]
fn help_names_the_signals_and_exit_codes() {
    let out = relay().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("--verify-config") && text.contains("SIGHUP") && text.contains("78"),
        "{text}"
    );
}

#[test]
fn verify_config_accepts_a_good_configuration() {
    let s = setup("verify-ok");
    let out = verify(&config(&s, ""));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("configuration OK") && text.contains("serial 7"),
        "{text}"
    );
    // Checking records nothing: only a started relay writes the rollback state.
    assert!(!s.dir.join("peer-list.serial").exists());
}

#[test]
fn bad_configurations_exit_78_with_a_clear_message() {
    let s = setup("verify-bad");
    let cases: Vec<(String, &str)> = vec![
        ("[network]\nworkers = 0\n".into(), "network.workers"),
        ("[network]\nfrobnicate = 1\n".into(), "unknown field"),
        ("this is not toml".into(), "relay.toml"),
        ("[relay]\n".into(), "duplicate"),
    ];
    for (extra, want) in cases {
        let out = verify(&config(&s, &extra));
        assert_eq!(out.status.code(), Some(78), "{extra}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{extra}: {err}");
    }
    // A missing config file.
    let out = relay()
        .arg("--config")
        .arg(s.dir.join("nope.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    // A key file readable by others.
    let cfg = config(&s, "");
    std::fs::set_permissions(
        s.dir.join("onion.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let out = verify(&cfg);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("chmod"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::set_permissions(
        s.dir.join("onion.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    // A corrupt peer-list rollback state, or one recording a later serial.
    let state = s.dir.join("peer-list.serial");
    for (content, want) in [("seven\n", "corrupt"), ("8\n", "rollback")] {
        std::fs::write(&state, content).unwrap();
        let out = verify(&cfg);
        assert_eq!(out.status.code(), Some(78), "{content}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{content}: {err}");
        if want == "corrupt" {
            assert!(err.contains(&state.display().to_string()), "{err}");
        }
    }
    std::fs::remove_file(&state).unwrap();
    // A tampered peer list.
    let list = std::fs::read_to_string(s.dir.join("peers.list")).unwrap();
    std::fs::write(
        s.dir.join("peers.list"),
        list.replace("weight 1", "weight 2"),
    )
    .unwrap();
    let out = verify(&cfg);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("peer list"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn verify_config_warns_about_a_port_mismatch_and_an_expired_list() {
    // The list names ports 9000-9000; the configuration gives 9100-9101.
    let s = setup("verify-warn");
    let out = verify(&config(&s, "[network]\nbase_port = 9100\nworkers = 2\n"));
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("configuration OK with 1 warning(s)"),
        "{text}"
    );
    assert!(
        err.contains("lists ports 9000-9000") && err.contains("give 9100-9101"),
        "{err}"
    );
    // Matching ports: no warning.
    let out = verify(&config(&s, ""));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("configuration OK: "), "{text}");

    // An expired but otherwise valid list: the relay would start on it (refusing new
    // circuits), so the check passes with the warning; a forged expired list does not.
    let now = now_s();
    let s = setup_valid("verify-expired", now - 7200, now - 3600);
    let cfg = config(&s, "");
    let out = verify(&cfg);
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the peer list has expired"), "{err}");
    let list = std::fs::read_to_string(s.dir.join("peers.list")).unwrap();
    std::fs::write(
        s.dir.join("peers.list"),
        list.replace("weight 1", "weight 2"),
    )
    .unwrap();
    let out = verify(&cfg);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not verify") && !err.contains("has expired"),
        "{err}"
    );
}
