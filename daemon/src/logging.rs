//! Process logs: `tracing` events to stderr, as text or JSON lines.

use std::io::IsTerminal;

/// How a process writes its log (`log_format` in every binary's config).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line per event for people; colour only when stderr is a terminal,
    /// so a log file or the journal gets plain text.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields), for log
    /// shippers.
    Json,
}

/// Installs the process's subscriber: the level filter comes from `RUST_LOG`
/// (default `info`). Call once, after the config is read.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}
