//! Logging: human-readable lines on a terminal, JSON lines with `--log-format json`.
//! Replica lines carry the span `replica{id=.. epoch=..}`; request lines carry
//! `req=<client_id, replica_id, request_id>`.
//!
//! `tandem up`'s own lines (target [`EVENTS`]) are the command's output: they go to
//! stdout, as `HH:MM:SS.mmm  RM: …` or, with `--log-format json`, as JSON lines; every
//! other line goes to stderr.

use std::fmt;
use std::io::IsTerminal;

use clap::{Args, ValueEnum};
use tandem_operator::local::EVENTS;
use tandem_replica::wire::unix_ms;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt as format};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log filter, e.g. `info`, `debug` (every request), `tandem_replica=debug`.
    #[arg(long, global = true, env = "TANDEM_LOG", default_value = "info")]
    pub log_level: String,
    /// Log line format (also of `tandem up`'s own lines on stdout).
    #[arg(long, global = true, env = "TANDEM_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// Installs logging; `events` says whether this command prints `tandem up`'s own lines.
pub fn init(args: &LogArgs, events: bool) {
    let filter = EnvFilter::try_new(&args.log_level).unwrap_or_else(|error| {
        eprintln!("warning: bad --log-level {:?} ({error}); using info", args.log_level);
        EnvFilter::new("info")
    });
    let filter = filter.add_directive(format!("{EVENTS}=off").parse().expect("a valid directive"));
    let logs = format::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let lines = format::layer().with_writer(std::io::stdout);
    let (logs, lines) = match args.log_format {
        LogFormat::Text => (logs.boxed(), lines.event_format(EventLine).boxed()),
        LogFormat::Json => (logs.json().boxed(), lines.json().boxed()),
    };
    let lines_filter = if events { Targets::new().with_target(EVENTS, Level::INFO) } else { Targets::new() };
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(lines.with_filter(lines_filter))
        .init();
}

/// `HH:MM:SS.mmm  message`: the shape `tandem up` has always printed.
struct EventLine;

impl<S, N> FormatEvent<S, N> for EventLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "{}  ", clock(unix_ms()))?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// `HH:MM:SS.mmm` (UTC), without a date-time dependency.
fn clock(ms: u64) -> String {
    let (s, ms) = (ms / 1000, ms % 1000);
    format!("{:02}:{:02}:{:02}.{ms:03}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}
