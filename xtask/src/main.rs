//! `shroud-xtask assets OUT_DIR`: writes the man pages (`OUT_DIR/man/*.1`, one per
//! command and subcommand) and shell completions (`OUT_DIR/completions/{bash,zsh,
//! fish}/...`) of `shroud-relay` and `shroudctl`, generated from their clap
//! definitions so they never drift from `--help`. deploy/package.sh puts them in the
//! Debian package.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Command;
use clap_complete::Shell;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [cmd, out] if cmd == "assets" => write_assets(Path::new(out)),
        _ => {
            eprintln!("usage: shroud-xtask assets OUT_DIR");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(n) => {
            println!("wrote {n} files");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("shroud-xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The commands whose pages and completions are generated, by binary name.
fn commands() -> Vec<Command> {
    use clap::CommandFactory as _;
    vec![
        shroud_relay::cli::command(),
        shroud_control::cli::Cli::command(),
    ]
}

/// Writes every man page and completion file under `out`; returns how many.
fn write_assets(out: &Path) -> Result<usize> {
    let man = out.join("man");
    std::fs::create_dir_all(&man).with_context(|| format!("cannot create {}", man.display()))?;
    let mut n = 0;
    for cmd in commands() {
        n += write_man(&man, cmd.clone(), None)?;
        let name = cmd.get_name().to_owned();
        for (shell, dir, file) in [
            (Shell::Bash, "bash", name.clone()),
            (Shell::Zsh, "zsh", format!("_{name}")),
            (Shell::Fish, "fish", format!("{name}.fish")),
        ] {
            let d = out.join("completions").join(dir);
            std::fs::create_dir_all(&d)
                .with_context(|| format!("cannot create {}", d.display()))?;
            let mut f = std::fs::File::create(d.join(&file))
                .with_context(|| format!("cannot create {}", d.join(&file).display()))?;
            clap_complete::generate(shell, &mut cmd.clone(), &name, &mut f);
            n += 1;
        }
    }
    Ok(n)
}

/// Writes `cmd`'s page as `<prefix>-<name>.1` (or `<name>.1` at the top) and those
/// of its subcommands, recursively.
fn write_man(dir: &Path, cmd: Command, prefix: Option<&str>) -> Result<usize> {
    let name = match prefix {
        Some(p) => format!("{p}-{}", cmd.get_name()),
        None => cmd.get_name().to_owned(),
    };
    if name.contains('/') {
        bail!("command name {name:?} is not a file name");
    }
    let mut cmd = cmd.name(name.clone());
    cmd.build();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut page)
        .with_context(|| format!("cannot render the man page of {name}"))?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
    let mut n = 1;
    for sub in cmd.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        n += write_man(dir, sub.clone(), Some(&name))?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_cover_every_command_and_shell() {
        let dir = tempfile::tempdir().unwrap();
        let n = write_assets(dir.path()).unwrap();
        let man = dir.path().join("man");
        for page in [
            "shroud-relay.1",
            "shroudctl.1",
            "shroudctl-status.1",
            "shroudctl-reload.1",
            "shroudctl-peers.1",
            "shroudctl-peers-verify.1",
        ] {
            let text = std::fs::read_to_string(man.join(page)).unwrap();
            assert!(text.starts_with(".ie \\n(.g .ds Aq"), "{page}: {text:.80}");
            assert!(text.contains(".TH "), "{page}");
        }
        // The relay's page carries its options and exit codes from --help.
        let relay = std::fs::read_to_string(man.join("shroud-relay.1")).unwrap();
        assert!(
            relay.contains("verify\\-config") && relay.contains("78"),
            "{relay}"
        );
        let bash = std::fs::read_to_string(dir.path().join("completions/bash/shroudctl")).unwrap();
        assert!(
            bash.contains("peers") && bash.contains("--running"),
            "{bash:.200}"
        );
        assert!(dir.path().join("completions/zsh/_shroud-relay").exists());
        assert!(dir.path().join("completions/fish/shroudctl.fish").exists());
        let pages = std::fs::read_dir(&man).unwrap().count();
        assert_eq!(n, pages + 6);
    }
}
