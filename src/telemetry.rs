//! Logging setup: `tracing-subscriber` with the configured filter, `RUST_LOG` taking precedence.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. A bad filter falls back to `info` with a warning rather than
/// refusing to start.
pub fn init(level: &str, format: LogFormat) {
    let (filter, bad) = match std::env::var("RUST_LOG") {
        Ok(env) if !env.trim().is_empty() => match EnvFilter::try_new(&env) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new("info"), Some(format!("RUST_LOG: {e}"))),
        },
        _ => match EnvFilter::try_new(level) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new("info"), Some(format!("log.level: {e}"))),
        },
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
