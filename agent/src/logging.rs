//! The agent's own log: text for people (on a terminal, or in the journal under systemd) or JSON
//! for collectors, always on stderr.
//!
//! `log.level` is parsed as a [`Targets`] filter (`level` or `target=level`, comma-separated), not
//! an `EnvFilter`: it takes every directive the README documents, and leaving `EnvFilter` out
//! keeps its regular-expression DFA builder out of the board binaries (`cross/size-budget`).

use std::fmt;
use std::str::FromStr;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::{ParseError, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{AgentConfig, LogFormat};

/// Sets the global subscriber for `lichen run`.
pub fn init(config: &AgentConfig) {
    // The level was validated with the config; fall back to info rather than run blind.
    let filter = filter(&config.log.level, "info");
    let builder = fmt_builder();
    match config.log.format {
        LogFormat::Json => builder.json().finish().with(filter).init(),
        // The journal stamps every line itself and reads `<N>` prefixes as the priority, so
        // `journalctl -p warning -u lichen` and its colours work.
        LogFormat::Text if stderr_is_journal() => builder
            .with_ansi(false)
            .event_format(Journald(tracing_subscriber::fmt::format().without_time()))
            .finish()
            .with(filter)
            .init(),
        LogFormat::Text => {
            use std::io::IsTerminal;
            builder.with_ansi(std::io::stderr().is_terminal()).finish().with(filter).init()
        }
    }
}

/// The formatter on stderr. Its own level is opened to `TRACE` (it defaults to `INFO`) so that the
/// [`Targets`] layer over it alone decides what is logged.
fn fmt_builder() -> tracing_subscriber::fmt::SubscriberBuilder<
    tracing_subscriber::fmt::format::DefaultFields,
    tracing_subscriber::fmt::format::Format,
    tracing::level_filters::LevelFilter,
    fn() -> std::io::Stderr,
> {
    tracing_subscriber::fmt()
        .with_max_level(tracing::level_filters::LevelFilter::TRACE)
        .with_writer(std::io::stderr as fn() -> std::io::Stderr)
}

/// Parses a `log.level` value (what config validation checks).
pub fn parse_level(level: &str) -> Result<Targets, ParseError> {
    Targets::from_str(level)
}

/// The filter for `level` with [`GUEST_DRIVEN`] targets held down. The level was validated with
/// the config; an invalid one falls back to `fallback` rather than run blind.
fn filter(level: &str, fallback: &str) -> Targets {
    parse_level(&guest_proof(level)).unwrap_or_else(|_| {
        parse_level(&guest_proof(fallback)).unwrap_or_else(|_| Targets::new().with_default(Level::INFO))
    })
}

/// Targets whose volume a module decides, with the level each is held to unless the filter names
/// it. Wasmtime's WASI layer warns each time a module calls something it does not implement (every
/// preview 1 socket call, for one): a module knocking 400,000 times wrote 400,000 lines into the
/// journal (tests/suites/hostile.rs). At `debug`, Cranelift logs every pass over every function a
/// module has, so a module's size set the log's.
const GUEST_DRIVEN: [(&str, &str); 4] = [
    ("wasmtime_wasi", "error"),
    ("cranelift_codegen", "warn"),
    ("wasmtime_cranelift", "warn"),
    ("regalloc2", "warn"),
];

/// The filter with [`GUEST_DRIVEN`] targets held down, except those the operator names
/// (`level = "info,wasmtime_wasi=debug"` brings WASI's messages back).
pub fn guest_proof(level: &str) -> String {
    let mut filter = level.to_owned();
    for (target, cap) in GUEST_DRIVEN {
        if !level.contains(target) {
            filter.push_str(&format!(",{target}={cap}"));
        }
    }
    filter
}

/// Commands other than `run` log only warnings, to stderr, so their output stays readable.
pub fn init_quiet(config: &AgentConfig) {
    let level = if config.log.level == "info" { "warn" } else { config.log.level.as_str() };
    fmt_builder().finish().with(filter(level, "warn")).init();
}

/// Whether stderr is the journal's stream, as `systemd.exec(5)` says to check: `JOURNAL_STREAM`
/// names its device and inode, which a redirected stderr no longer matches.
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Ok(st) = rustix::fs::fstat(std::io::stderr()) else { return false };
    stream.to_str().and_then(parse_journal_stream) == Some((st.st_dev, st.st_ino))
}

fn parse_journal_stream(s: &str) -> Option<(u64, u64)> {
    let (dev, ino) = s.split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// The syslog priority prefix (`sd-daemon(3)`) in front of the usual text line.
struct Journald<F>(F);

impl<S, N, F> FormatEvent<S, N> for Journald<F>
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
        write!(writer, "<{}>", priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn guest_driven_logs_stay_off_unless_named() {
        assert!(guest_proof("debug").starts_with("debug,wasmtime_wasi=error,cranelift_codegen=warn"));
        let named = guest_proof("info,wasmtime_wasi=warn");
        assert!(named.starts_with("info,wasmtime_wasi=warn,") && named.matches("wasmtime_wasi").count() == 1);
        for level in ["trace", "lichen=debug,warn"] {
            assert!(parse_level(&guest_proof(level)).is_ok(), "{level}");
        }
    }

    #[test]
    fn documented_levels_filter_as_documented() {
        // README, `log.level`: a level, or per module, e.g. `info,lichen::runtime=debug`.
        let f = filter("info,lichen::runtime=debug", "info");
        assert!(f.would_enable("lichen::runtime::engine", &Level::DEBUG));
        assert!(!f.would_enable("lichen::pod", &Level::DEBUG));
        assert!(f.would_enable("lichen::pod", &Level::INFO));
        assert!(!f.would_enable("wasmtime_wasi::p1", &Level::WARN));
        assert!(f.would_enable("wasmtime_wasi::p1", &Level::ERROR));
        let f = filter("debug,wasmtime_wasi=debug", "info");
        assert!(
            f.would_enable("wasmtime_wasi", &Level::DEBUG) && f.would_enable("kube_client", &Level::DEBUG)
        );
        assert!(!f.would_enable("cranelift_codegen", &Level::INFO));
        let f = filter("off", "info");
        assert!(!f.would_enable("lichen", &Level::ERROR));
        // A value config validation would refuse falls back rather than logging nothing.
        assert!(parse_level("lichen=[").is_err());
        assert!(filter("lichen=[", "warn").would_enable("lichen", &Level::WARN));
        assert!(!filter("lichen=[", "warn").would_enable("lichen", &Level::INFO));
    }

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn journal_lines_carry_their_priority_and_no_timestamp() {
        let buf = Buf::default();
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .event_format(Journald(tracing_subscriber::fmt::format().without_time()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(pod = "default/a", "pod did not stop");
            tracing::info!("lichen running");
        });
        let text = String::from_utf8(buf.0.lock().expect("buffer").clone()).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("<4> WARN"), "{}", lines[0]);
        assert!(lines[0].ends_with("pod did not stop pod=\"default/a\""), "{}", lines[0]);
        assert!(lines[1].starts_with("<6> INFO"), "{}", lines[1]);
    }

    #[test]
    fn journal_stream_is_device_and_inode() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8"), None);
        assert_eq!(parse_journal_stream("x:1"), None);
    }
}
