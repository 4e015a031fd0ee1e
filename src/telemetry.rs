//! Logging setup: `tracing-subscriber` with the configured filter (`log.level`, or `RUST_LOG`
//! when that is set: `config` resolves which).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber with `filter`, which came from `filter_from` (named in the
/// warning if it is invalid). A bad filter falls back to `info` rather than refusing to start.
pub fn init(filter: &str, filter_from: &str, format: LogFormat) {
    let (filter, bad) = match EnvFilter::try_new(filter) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new("info"), Some(format!("{filter_from}: {e}"))),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    if let Some(message) = bad {
        tracing::warn!(%message, "invalid log filter; using info");
    }
}
