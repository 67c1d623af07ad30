//! The `shroud-proxy` binary's offline commands: the gateway's certificate, its
//! fingerprint, and `--verify-config` on the shipped gateway configuration and on bad
//! ones. (Being an integration test of this package, it also makes `cargo test
//! --workspace` build the binary that the process-level tests and the benchmark's
//! smoke test run.)

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_shroud-proxy");

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shroud-proxy-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str], dir: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run shroud-proxy")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn gen_cert_writes_an_owner_only_key_and_the_fingerprint_matches() {
    let d = scratch("cert");
    let out = run(&["gen-cert", "--cert", "gw.cert", "--key", "gw.key"], &d);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout).trim().to_string();
    assert_eq!(printed.len(), 64, "{printed:?}");
    assert!(
        printed.chars().all(|c| c.is_ascii_hexdigit()),
        "{printed:?}"
    );
    let mode = std::fs::metadata(d.join("gw.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "key mode {mode:o}");
    let out = run(&["fingerprint", "gw.cert"], &d);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), printed);
    // An existing key is never overwritten.
    let before = std::fs::read(d.join("gw.key")).unwrap();
    let out = run(&["gen-cert", "--cert", "gw2.cert", "--key", "gw.key"], &d);
    assert!(!out.status.success());
    assert_eq!(std::fs::read(d.join("gw.key")).unwrap(), before);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn verify_config_accepts_the_shipped_gateway_config_and_refuses_bad_ones() {
    let d = scratch("verify");
    let out = run(
        &["gen-cert", "--cert", "gateway.cert", "--key", "gateway.key"],
        &d,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/gateway.toml");
    let good = std::fs::read_to_string(shipped).unwrap();
    std::fs::write(d.join("gateway.toml"), &good).unwrap();
    let out = run(
        &["gateway", "--config", "gateway.toml", "--verify-config"],
        &d,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("configuration OK"));

    let bad = [
        (
            good.replacen("[gateway]", "[gateway]\nno_such_key = 1", 1),
            "no_such_key",
        ),
        (
            good.replace("listen = \"127.0.0.1:4433\"", "listen = \"nowhere\""),
            "listen",
        ),
        ("this is not toml".to_string(), ""),
    ];
    for (cfg, named) in bad {
        std::fs::write(d.join("bad.toml"), &cfg).unwrap();
        let out = run(&["gateway", "--config", "bad.toml", "--verify-config"], &d);
        assert_eq!(out.status.code(), Some(78), "{cfg}\n{}", text(&out.stderr));
        let err = text(&out.stderr);
        assert!(err.contains("bad configuration"), "{err}");
        assert!(err.contains(named), "{err} does not name {named}");
    }
    // A key others can read is refused.
    std::fs::set_permissions(
        d.join("gateway.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = run(
        &["gateway", "--config", "gateway.toml", "--verify-config"],
        &d,
    );
    assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
    std::fs::remove_dir_all(&d).unwrap();
}
