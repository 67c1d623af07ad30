//! Where and how the relay's log lines go: standard error, as text or JSON
//! (`[log] format`), filtered by `[log] level` or `$SHROUD_LOG`.
//!
//! - **Colour** only when standard error is a terminal and `$NO_COLOR` is unset or
//!   empty (<https://no-color.org>): journald, files and pipes get plain text.
//! - **Priorities under journald.** When standard error is the journal's stream
//!   (`$JOURNAL_STREAM` names its device and inode, as systemd sets it), every line
//!   starts with the syslog priority prefix `<N>` (`sd-daemon(3)`), which journald
//!   strips and stores as the priority: errors at `err` (3), warnings at `warning`
//!   (4), info at `info` (6), debug and trace at `debug` (7), so `journalctl -p err`
//!   shows the relay's errors. Elsewhere no prefix is written.

use std::fmt;
use std::io::IsTerminal as _;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// The syslog priority journald stores for a line logged at `level`.
pub fn syslog_priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// Whether standard error is the journal's stream: `$JOURNAL_STREAM` is
/// `DEVICE:INODE` of the stream systemd connected, and it must be the one fd 2
/// still refers to (a child whose stderr was redirected inherits the variable).
pub fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// Whether to colour: a terminal, and `NO_COLOR` unset or empty.
pub fn use_colour(is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Wraps an event formatter to start each event with `<N>` (its syslog priority)
/// when `prefix` is set.
#[derive(Debug)]
pub struct PriorityPrefix<F> {
    inner: F,
    prefix: bool,
}

impl<S, N, F> FormatEvent<S, N> for PriorityPrefix<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if self.prefix {
            write!(writer, "<{}>", syslog_priority(event.metadata().level()))?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}

/// The subscriber the relay logs with: `filter`, `format`, colour and the journald
/// priority prefix as given, lines written by `writer`.
pub fn subscriber<W>(
    filter: tracing_subscriber::EnvFilter,
    format: LogFormat,
    colour: bool,
    journal: bool,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => {
            let fmt = tracing_subscriber::fmt::format().with_ansi(colour);
            Box::new(
                builder
                    .with_ansi(colour)
                    .event_format(PriorityPrefix {
                        inner: fmt,
                        prefix: journal,
                    })
                    .finish(),
            )
        }
        LogFormat::Json => {
            let fmt = tracing_subscriber::fmt::format().json().with_ansi(false);
            Box::new(
                builder
                    .with_ansi(false)
                    .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                    .event_format(PriorityPrefix {
                        inner: fmt,
                        prefix: journal,
                    })
                    .finish(),
            )
        }
    }
}

/// Installs the relay's logger on standard error: `$SHROUD_LOG` (an `EnvFilter`
/// directive) or else `level`, in `format`, coloured and prefixed as the [module
/// docs](self) say.
pub fn init(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHROUD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let colour = use_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let sub = subscriber(filter, format, colour, stderr_is_journal(), std::io::stderr);
    let _ = tracing::subscriber::set_global_default(sub);
}

/// Prints a fatal error (the process exits next) on standard error, at journald's
/// `err` priority when standard error is the journal, prefixed `shroud-relay: `.
pub fn fatal(message: impl fmt::Display) {
    let prefix = if stderr_is_journal() { "<3>" } else { "" };
    eprintln!("{prefix}shroud-relay: {message}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn capture(format: LogFormat, colour: bool, journal: bool) -> Vec<String> {
        let buf = Buf::default();
        let b = buf.clone();
        let sub = subscriber(
            tracing_subscriber::EnvFilter::new("debug"),
            format,
            colour,
            journal,
            move || b.clone(),
        );
        tracing::subscriber::with_default(sub, || {
            tracing::error!(serial = 7, "the peer list in force has expired");
            tracing::warn!("clamped");
            tracing::info!("started");
            tracing::debug!("detail");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn journald_lines_carry_their_syslog_priority() {
        let lines = capture(LogFormat::Text, false, true);
        let prefixes: Vec<&str> = lines.iter().map(|l| &l[..3]).collect();
        assert_eq!(prefixes, ["<3>", "<4>", "<6>", "<7>"], "{lines:?}");
        assert!(lines[0].contains("ERROR") && lines[0].contains("serial=7"));
        // Not under journald: no prefix.
        let plain = capture(LogFormat::Text, false, false);
        assert!(plain.iter().all(|l| !l.starts_with('<')), "{plain:?}");
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some("".as_ref())));
        assert!(!use_colour(true, Some("1".as_ref())));
        assert!(!use_colour(false, None));
        let plain = capture(LogFormat::Text, false, false);
        assert!(plain.iter().all(|l| !l.contains('\x1b')), "{plain:?}");
        let coloured = capture(LogFormat::Text, true, false);
        assert!(coloured.iter().all(|l| l.contains('\x1b')), "{coloured:?}");
    }

    #[test]
    fn json_lines_are_objects_with_level_and_fields() {
        let lines = capture(LogFormat::Json, false, false);
        assert_eq!(lines.len(), 4, "{lines:?}");
        let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(first["level"], "ERROR");
        assert_eq!(
            first["fields"]["message"],
            "the peer list in force has expired"
        );
        assert_eq!(first["fields"]["serial"], 7);
        assert!(first["timestamp"].is_string());
        // Under journald the prefix comes first, then the object.
        let j = capture(LogFormat::Json, false, true);
        let rest = j[1].strip_prefix("<4>").unwrap();
        let v: serde_json::Value = serde_json::from_str(rest).unwrap();
        assert_eq!(v["level"], "WARN");
    }
}
