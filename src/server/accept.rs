//! The accept loop every listener shares: the client listener, the admin listener and the TMDB
//! stand-in.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Pause after a failed accept: the usual cause is a full file-descriptor table (EMFILE), which
/// retrying at once would only spin on.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts connections on `listener` until `stop` completes, handing each to `serve` with the
/// slot it holds. With `slots`, a connection is accepted only once a slot is free, so excess
/// clients wait in the kernel's backlog instead of in memory. A failed accept (a reset before it,
/// EMFILE) is logged and retried after [`ACCEPT_BACKOFF`]; it never stops the listener.
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
    loop {
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
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => serve(stream, peer, permit),
                Err(error) => {
                    tracing::warn!(listener = name, %error, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            () = &mut stop => return,
        }
    }
}
