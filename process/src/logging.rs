//! Logging: `tracing` to stdout or stderr, as text or JSON, filtered by
//! `RUST_LOG` (else a default level per binary).

use tracing_subscriber::EnvFilter;

/// The `--log-format` flag of every binary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Where log lines go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Stdout,
    /// For a process whose stdout carries data (the stand-in prints its
    /// bound address there).
    Stderr,
}

/// Installs the global subscriber. `default_filter` applies when `RUST_LOG`
/// is unset or invalid (e.g. `"info"`).
pub fn init(format: LogFormat, default_filter: &str, output: Output) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match (format, output) {
        (LogFormat::Text, Output::Stdout) => builder.init(),
        (LogFormat::Text, Output::Stderr) => builder.with_writer(std::io::stderr).init(),
        (LogFormat::Json, Output::Stdout) => builder.json().init(),
        (LogFormat::Json, Output::Stderr) => builder.json().with_writer(std::io::stderr).init(),
    }
}
