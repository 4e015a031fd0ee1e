//! Shutdown signals: SIGTERM (orchestrators) and SIGINT (a terminal), whichever comes first.

/// Installs the handlers now (a signal that arrives from here on is caught, not fatal) and
/// returns what completes on the first SIGTERM or SIGINT, logging which one arrived.
pub fn signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let handlers = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        async move {
            match handlers {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => tracing::info!("received SIGTERM, shutting down"),
                        _ = int.recv() => tracing::info!("received SIGINT, shutting down"),
                    }
                }
                _ => {
                    tracing::warn!("cannot install signal handlers; falling back to ctrl-c");
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("received ctrl-c, shutting down");
        }
    }
}
