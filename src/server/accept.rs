//! The accept loop every listener shares: the client listener, the admin listener and the TMDB
//! stand-in.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Pause after a failed accept: the usual cause is a full file-descriptor table (EMFILE), which
/// retrying at once would only spin on.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Least time between two log lines about failed accepts: a full fd table fails every accept.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(1);

/// Logs failed accepts at most once per [`ERROR_LOG_EVERY`], counting the ones in between.
#[derive(Default)]
struct ErrorLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorLog {
    fn note(&mut self, listener: &'static str, error: &std::io::Error) {
        let now = Instant::now();
        if self.last.is_some_and(|last| now - last < ERROR_LOG_EVERY) {
            self.suppressed += 1;
            return;
        }
        let suppressed = std::mem::take(&mut self.suppressed);
        tracing::warn!(listener, %error, suppressed, "accept failed");
        self.last = Some(now);
    }
}

/// Accepts connections on `listener` until `stop` completes, handing each to `serve` with the
/// slot it holds. With `slots`, a connection is served only once a slot is free: the accepted
/// one waits for it unread and the next ones wait in the kernel's backlog, not in memory. The
/// slot is taken after the accept, not before, because several listeners (one per serving
/// thread, see `server::workers`) share one cap: a slot taken ahead would sit with a listener
/// that has nothing to accept while another's backlog waits. A failed accept (a reset before
/// it, EMFILE) is retried after [`ACCEPT_BACKOFF`] and logged at most once a second; it never
/// stops the listener.
pub async fn accept_until<F>(
    listener: &TcpListener,
    name: &'static str,
    slots: Option<Arc<Semaphore>>,
    stop: impl Future<Output = ()>,
    mut serve: F,
) where
    F: FnMut(TcpStream, SocketAddr, Option<OwnedSemaphorePermit>),
{
    tokio::pin!(stop);
    let mut errors = ErrorLog::default();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    errors.note(name, &error);
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut stop => return,
        };
        let permit = match &slots {
            Some(slots) => tokio::select! {
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(permit) => Some(permit),
                    Err(_) => return,
                },
                () = &mut stop => return,
            },
            None => None,
        };
        serve(stream, peer, permit);
    }
}
