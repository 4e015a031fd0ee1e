//! Configuration reload: on SIGHUP, and when the file's modification time changes, the file is
//! read and validated again and, if valid, put in force without dropping connections. An invalid
//! file is refused with an error log and the running configuration stays.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::tls::TlsError;
use crate::config::{Config, ConfigError};
use crate::proxy::Proxy;
use crate::upstream::BuildError;

/// How often the file's modification time is checked.
const POLL_EVERY: Duration = Duration::from_secs(2);

/// Reloads `path` into `proxy` on SIGHUP or when the file changes, forever. `running` is the
/// configuration the process started with, to warn about settings a reload cannot change.
pub async fn watch(path: PathBuf, proxy: Proxy, running: Config) {
    #[cfg(unix)]
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP; reloading on file changes only");
            None
        }
    };
    let mut seen = modified(&path);
    // A changed modification time is acted on only once it has held for a whole poll, so a file
    // being rewritten (truncated, then written) is not loaded half-way.
    let mut changed_to = None;
    let mut poll = tokio::time::interval(POLL_EVERY);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let hup = async {
            match hangup.as_mut() {
                Some(signal) => signal.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hup = std::future::pending::<Option<()>>();
        let reason = tokio::select! {
            _ = hup => "SIGHUP",
            _ = poll.tick() => {
                let now = modified(&path);
                if now == seen {
                    changed_to = None;
                    continue;
                }
                if changed_to != Some(now) {
                    changed_to = Some(now);
                    continue;
                }
                "file changed"
            }
        };
        // Noted before reading, so an edit landing during the load is seen by the next poll.
        seen = modified(&path);
        changed_to = None;
        // Logged either way; a refused reload changes nothing.
        let _ = reload(&path, &proxy, &running, reason);
    }
}

fn modified(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Why a reload was refused; the running configuration stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Upstream(#[from] BuildError),
}

/// Loads, validates and applies `path` once, logging the outcome.
pub fn reload(
    path: &std::path::Path,
    proxy: &Proxy,
    running: &Config,
    reason: &str,
) -> Result<(), ReloadError> {
    let applied = apply(path, proxy);
    let cfg = match applied {
        Ok(cfg) => cfg,
        Err(error) => {
            tracing::error!(%reason, %error, "configuration reload refused; keeping the running configuration");
            return Err(error);
        }
    };
    for key in cfg.restart_required(running) {
        tracing::warn!(
            key,
            "changed in the file, but takes effect only after a restart"
        );
    }
    tracing::info!(
        %reason,
        requests_per_second = cfg.limit.requests_per_second.get(),
        overrides = cfg.limit.overrides.len(),
        global_requests_per_second = cfg.limit.global_requests_per_second.map(|r| r.get()),
        "configuration reloaded"
    );
    Ok(())
}

/// Loads `path` and puts it in force, or changes nothing.
fn apply(path: &std::path::Path, proxy: &Proxy) -> Result<Config, ReloadError> {
    let cfg = Config::load(path)?;
    // TLS files take effect only at a restart, but broken ones are refused now, not then.
    if let Some(tls) = &cfg.server.tls {
        super::tls::acceptor(tls)?;
    }
    proxy.reload(&cfg)?;
    Ok(cfg)
}
