//! Reports: the machine description and JSON output shared by every subcommand.
//!
//! JSON schema (documented in docs/BENCHMARKING.md): every report has `schema`
//! (`"shroud-bench/<subcommand>/1"`), `machine`, and the subcommand's headline figures
//! at the top level.

use serde_json::{json, Value};

/// Versions of the crates that decide the numbers (kept in step with Cargo.lock by a
/// unit test).
pub const CRATES: &[(&str, &str)] = &[("ring", "0.17"), ("aes-gcm", "0.11"), ("io-uring", "0.7")];

/// Describes this machine: CPU model and flags of interest, kernel, cores.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = field("flags");
    let interesting: Vec<&str> = [
        "aes",
        "pclmulqdq",
        "vaes",
        "vpclmulqdq",
        "avx2",
        "avx512f",
        "sha_ni",
    ]
    .into_iter()
    .filter(|f| flags.split_whitespace().any(|x| x == *f))
    .collect();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    json!({
        "cpu": field("model name"),
        "cpu_flags": interesting,
        "kernel": kernel,
        "cores": cores,
        "shroud": env!("CARGO_PKG_VERSION"),
        "crates": CRATES.iter().map(|(n, v)| json!({"name": n, "version": v})).collect::<Vec<_>>(),
        "load_average": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>(),
    })
}

/// Writes `v` to `path` (pretty JSON).
pub fn write_json(path: &std::path::Path, v: &Value) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)? + "\n")?;
    Ok(())
}

/// Microseconds of one call of `f`: the median of timed groups of `group` calls, at
/// least 20 groups and at most 200, over about `budget`.
pub fn time_us(budget: std::time::Duration, group: u32, mut f: impl FnMut()) -> f64 {
    let mut groups = Vec::new();
    let started = std::time::Instant::now();
    while groups.len() < 20 || (started.elapsed() < budget && groups.len() < 200) {
        let t = std::time::Instant::now();
        for _ in 0..group {
            f();
        }
        groups.push(t.elapsed().as_secs_f64() * 1e6 / f64::from(group));
    }
    median(&mut groups)
}

/// A worker counter from a relay's admin `status` reply, summed over its workers.
pub fn worker_sum(status: &Value, name: &str) -> u64 {
    status["workers"]
        .as_array()
        .map(|ws| ws.iter().filter_map(|w| w["stats"][name].as_u64()).sum())
        .unwrap_or(0)
}

/// Median of a sample (0 for an empty one).
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crate_versions_match_the_lock_file() {
        let lock =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).unwrap();
        for (name, version) in CRATES {
            let entry = format!("name = \"{name}\"\nversion = \"{version}");
            assert!(lock.contains(&entry), "{name} {version} not in Cargo.lock");
        }
    }

    #[test]
    fn machine_description_is_complete() {
        let m = machine();
        assert!(m["cores"].as_u64().unwrap() >= 1);
        assert!(!m["kernel"].as_str().unwrap().is_empty());
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
    }
}
