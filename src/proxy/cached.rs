//! The cache's part in a request (see `crate::cache`): a plan made once the request is known,
//! then a hit answered from memory, or a miss filled once for every request waiting on it.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, AGE, CONTENT_ENCODING, CONTENT_LENGTH, VARY};
use http::{HeaderValue, Method, Request, Response};
use http_body::Body;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Proxy;
use super::body::{ProxyBody, TeeEnd};
use super::ctx::Exchanged;
use super::ctx::{Identity, RequestCtx};
use super::settings::Settings;
use crate::cache::{Bypass, Cache, Entry, Filled, FlightResult, Join, Leader};
use crate::error::ProxyError;
use crate::upstream::{UpstreamBody, UpstreamError};

/// A request the cache may answer.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    cache: Arc<Cache>,
    key: String,
    path: String,
    /// A `HEAD`, answered from the `GET` entry (the fill is a `GET`).
    head: bool,
    /// The client takes gzip: a gzip entry is served as it is stored.
    gzip_ok: bool,
}

/// The plan for a request, from its cache key (or why it bypasses). A `HEAD` is turned into the
/// `GET` that fills its entry.
pub(super) fn plan(
    settings: &Settings,
    key: Option<Result<String, Bypass>>,
    parts: &mut http::request::Parts,
    ctx: &mut RequestCtx,
) -> Option<Plan> {
    let cache = settings.cache.as_ref()?;
    match key? {
        Err(_) => {
            cache.stats.bypasses.fetch_add(1, Ordering::Relaxed);
            ctx.cache = Some(("BYPASS", Cow::Borrowed("tmdb-proxy; fwd=bypass")));
            None
        }
        Ok(key) => {
            let head = parts.method == Method::HEAD;
            if head {
                parts.method = Method::GET;
            }
            // The fill's answer is shared whole: no request's conditions or ranges shape it.
            for name in [
                http::header::IF_NONE_MATCH,
                http::header::IF_MODIFIED_SINCE,
                http::header::IF_MATCH,
                http::header::IF_UNMODIFIED_SINCE,
                http::header::IF_RANGE,
                http::header::RANGE,
            ] {
                parts.headers.remove(name);
            }
            Some(Plan {
                cache: cache.clone(),
                key,
                path: parts.uri.path().to_owned(),
                head,
                gzip_ok: accepts_gzip(&parts.headers),
            })
        }
    }
}

impl Proxy {
    /// A hit for a known key; else the miss goes upstream once for all who wait on it (a known
    /// key), or on its own (an unknown key: it reads nothing, but a storable answer is stored).
    /// When the fill fails and a stale copy may answer, the stale copy answers.
    pub(super) async fn through_cache(
        &self,
        settings: &Arc<Settings>,
        plan: Plan,
        identity: Identity,
        req: Request<UpstreamBody>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let cache = plan.cache.clone();
        let now = Instant::now();
        let ttl = cache.config().known_key_ttl;
        let known = self.shared.admission.is_known_within(identity.key, ttl);
        let entry = known.then(|| cache.get(&plan.key, now)).flatten();
        if let Some(entry) = entry.as_ref().filter(|e| e.is_fresh(now)) {
            cache.stats.hits.fetch_add(1, Ordering::Relaxed);
            let ttl = entry.fresh_until.saturating_duration_since(now).as_secs();
            ctx.cache = Some(("HIT", Cow::Owned(format!("tmdb-proxy; hit; ttl={ttl}"))));
            return Ok(answer(entry, now, &plan));
        }
        cache.stats.misses.fetch_add(1, Ordering::Relaxed);
        if !known {
            // Alone: it reads nothing, but a storable answer of TMDB's is stored.
            let response = self.send_through(settings, identity, req, ctx).await?;
            let limit = cache.config().max_object_size;
            return Ok(match read_for_store(response, limit) {
                Read::Whole(filled) => {
                    let stored = shareable(filled.status) && store(&cache, &plan, &filled).await;
                    ctx.cache = Some(("MISS", miss_status(stored, false)));
                    respond(&filled, &plan)
                }
                Read::Streamed(parts, body) => {
                    let (body, end) = crate::proxy::body::tee(body, limit);
                    let (cache, plan_key) = (cache.clone(), plan.clone());
                    let (status, headers) = (parts.status, parts.headers.clone());
                    tokio::spawn(async move {
                        if let Ok(TeeEnd::Whole(body)) = end.await
                            && shareable(status)
                        {
                            let filled = Filled::read(status, headers, body);
                            store(&cache, &plan_key, &filled).await;
                        }
                    });
                    ctx.cache = Some(("MISS", Cow::Borrowed("tmdb-proxy; fwd=miss")));
                    streamed(parts, body, &plan)
                }
                Read::TooLarge(response) => {
                    ctx.cache = Some(("MISS", Cow::Borrowed("tmdb-proxy; fwd=miss")));
                    response
                }
            });
        }
        let stale = entry.filter(|e| !e.is_fresh(now));
        let mut req = Some(req);
        let (result, own, collapsed) = match (cache.join(&plan.key), req.take()) {
            (Join::Lead(leader, rx), Some(fill)) => {
                let (own_tx, own_rx) = oneshot::channel();
                self.spawn_fill(settings, &plan, leader, identity, fill, ctx, own_tx);
                // The fill ends its `own` sender once its result is published, when it has
                // nothing for the leader alone.
                match own_rx.await {
                    Ok(own) => (None, Some(own), false),
                    Err(_) => (wait(rx).await, None, false),
                }
            }
            (Join::Wait(rx), mine) => {
                req = mine;
                (wait(rx).await, None, true)
            }
            (Join::Lead(..), None) => (None, None, false),
        };
        ctx.cache = Some(("MISS", Cow::Borrowed("tmdb-proxy; fwd=miss")));
        match (own, result) {
            // The leader's own failure: a stale copy answers for it, else the error itself.
            (Some(Own::Failed(error, exchanged)), _) => {
                ctx.take_exchanged(exchanged);
                let status = error.to_response().status().as_u16();
                match stale_answer(&cache, stale.as_deref(), &plan, status, ctx) {
                    Some(answer) => Ok(answer),
                    None => Err(error),
                }
            }
            (Some(Own::TooLarge(response)), _) => Ok(response),
            (Some(Own::Streamed(parts, body, exchanged)), _) => {
                ctx.take_exchanged(exchanged);
                Ok(streamed(parts, body, &plan))
            }
            (None, Some(filled)) if collapsed && !filled.shareable => {
                // About the leader's key or request, not this one's: it goes on its own.
                let req = req.ok_or_else(no_answer)?;
                self.on_its_own(settings, identity, req, stale.as_deref(), &plan, ctx)
                    .await
            }
            (_, Some(filled)) => {
                if !collapsed {
                    ctx.take_exchanged(filled.exchanged);
                }
                if filled.is_failure()
                    && let Some(answer) =
                        stale_answer(&cache, stale.as_deref(), &plan, filled.status.as_u16(), ctx)
                {
                    return Ok(answer);
                }
                ctx.cache = Some(("MISS", miss_status(filled.stored, collapsed)));
                Ok(respond(&filled, &plan))
            }
            // Abandoned (an answer too large to share): a waiter goes on its own.
            (None, None) => {
                let req = req.ok_or_else(no_answer)?;
                self.on_its_own(settings, identity, req, stale.as_deref(), &plan, ctx)
                    .await
            }
        }
    }

    /// A waiter whose flight's answer was not for it: its own request, stale copy on failure.
    async fn on_its_own(
        &self,
        settings: &Arc<Settings>,
        identity: Identity,
        req: Request<UpstreamBody>,
        stale: Option<&Entry>,
        plan: &Plan,
        ctx: &mut RequestCtx,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        ctx.cache = Some(("MISS", Cow::Borrowed("tmdb-proxy; fwd=miss")));
        match self.send_through(settings, identity, req, ctx).await {
            Ok(response) => Ok(response),
            Err(error) => {
                let status = error.to_response().status().as_u16();
                match stale_answer(&plan.cache, stale, plan, status, ctx) {
                    Some(answer) => Ok(answer),
                    None => Err(error),
                }
            }
        }
    }

    /// Sends the fill in a task of its own, so a leader that goes away leaves only itself. The
    /// leader's own outcome (an error, with its kind, or an answer too large to share) also goes
    /// to it through `own`, before the flight's result is published.
    #[allow(clippy::too_many_arguments)]
    fn spawn_fill(
        &self,
        settings: &Arc<Settings>,
        plan: &Plan,
        leader: Leader,
        identity: Identity,
        req: Request<UpstreamBody>,
        ctx: &RequestCtx,
        own: oneshot::Sender<Own>,
    ) {
        let (proxy, settings) = (self.clone(), settings.clone());
        let (cache, key, path) = (plan.cache.clone(), plan.key.clone(), plan.path.clone());
        let mut fill_ctx = RequestCtx::new(ctx.id.clone(), &Method::GET, &path);
        fill_ctx.key = ctx.key;
        fill_ctx.app = ctx.app.clone();
        tokio::spawn(async move {
            let plan = Plan {
                cache: cache.clone(),
                key,
                path,
                head: false,
                gzip_ok: true,
            };
            let result = proxy
                .send_through(&settings, identity, req, &mut fill_ctx)
                .await;
            let answered = fill_ctx.exchanged();
            let response = match result {
                Ok(response) => response,
                Err(error) => return publish_failure(leader, own, error, answered),
            };
            let limit = cache.config().max_object_size;
            let filled = match read_for_store(response, limit) {
                Read::Whole(filled) => filled,
                Read::TooLarge(response) => {
                    let _ = own.send(Own::TooLarge(response));
                    return drop(leader);
                }
                Read::Streamed(parts, body) => {
                    // The leader's client gets the body as it arrives; waiters get it whole.
                    let (status, headers) = (parts.status, parts.headers.clone());
                    let (body, end) = crate::proxy::body::tee(body, limit);
                    let _ = own.send(Own::Streamed(parts, body, answered));
                    match end.await {
                        Ok(TeeEnd::Whole(body)) => Filled::read(status, headers, body),
                        // Too large to share: each waiter goes on its own.
                        Ok(TeeEnd::TooLarge) => return drop(leader),
                        Ok(TeeEnd::Broken(reason)) => {
                            let error = ProxyError::Upstream(UpstreamError::Failed(reason));
                            return leader.publish(failure(&error, answered));
                        }
                        Err(_) => return drop(leader),
                    }
                }
            };
            let mut filled = filled;
            filled.exchanged = answered;
            filled.shareable = shareable(filled.status);
            filled.stored = filled.shareable && store(&cache, &plan, &filled).await;
            leader.publish(filled);
        });
    }
}

/// A fill that failed with an error the proxy writes: never stored. The leader gets the error
/// itself; waiters get the same TMDB body.
fn publish_failure(
    leader: Leader,
    own: oneshot::Sender<Own>,
    error: ProxyError,
    answered: Exchanged,
) {
    let filled = failure(&error, answered);
    let _ = own.send(Own::Failed(error, answered));
    leader.publish(filled);
}

/// A failed fill as waiters get it: the error's TMDB body, shareable unless it is a refusal of
/// the leader's key, which is not theirs.
fn failure(error: &ProxyError, answered: Exchanged) -> Filled {
    let (parts, body) = error.to_response().into_parts();
    Filled {
        status: parts.status,
        headers: parts.headers,
        body,
        stored: false,
        exchanged: answered,
        shareable: !matches!(error, ProxyError::RateLimited(_)),
    }
}

/// What only the leader's client gets: its own error (the metric and log line say what it was),
/// an answer too large to share, or the head of an answer whose body it gets as it arrives.
#[derive(Debug)]
pub(super) enum Own {
    Failed(ProxyError, Exchanged),
    TooLarge(Response<ProxyBody>),
    Streamed(http::response::Parts, ProxyBody, Exchanged),
}

/// Whether an answer is the same for every key, so waiters of other keys may have it: TMDB's
/// data (200, 404) and its failures (5xx). A 401, 403 or 429 is about the leader's key; a 304
/// or 206 about its request.
fn shareable(status: http::StatusCode) -> bool {
    matches!(status.as_u16(), 200 | 404) || status.is_server_error()
}

/// The stale copy's answer instead of a failure with `status` (5xx or 429), if there is one.
fn stale_answer(
    cache: &Cache,
    stale: Option<&Entry>,
    plan: &Plan,
    status: u16,
    ctx: &mut RequestCtx,
) -> Option<Response<ProxyBody>> {
    let failure = status >= 500 || status == 429;
    let stale = stale.filter(|_| failure)?;
    cache.stats.stale.fetch_add(1, Ordering::Relaxed);
    ctx.cache = Some((
        "STALE",
        Cow::Owned(format!("tmdb-proxy; fwd=stale; fwd-status={status}")),
    ));
    Some(answer(stale, Instant::now(), plan))
}

fn no_answer() -> ProxyError {
    ProxyError::Upstream(UpstreamError::Failed(
        "the shared fill ended without an answer".into(),
    ))
}

/// Waits for a flight's result; `None` if it was abandoned.
async fn wait(mut rx: FlightResult) -> Option<Arc<Filled>> {
    loop {
        if let Some(filled) = rx.borrow_and_update().clone() {
            return Some(filled);
        }
        if rx.changed().await.is_err() {
            return rx.borrow().clone();
        }
    }
}

/// An answer as the cache takes it.
enum Read {
    /// Already read whole (most TMDB answers are: see `proxy::body`).
    Whole(Filled),
    /// Still arriving: it is teed, to its client and into memory.
    Streamed(http::response::Parts, ProxyBody),
    /// Longer than the limit by its declared length, or held whole but longer: passed on.
    TooLarge(Response<ProxyBody>),
}

fn read_for_store(response: Response<ProxyBody>, limit: usize) -> Read {
    if response.body().size_hint().lower() > limit as u64 {
        return Read::TooLarge(response);
    }
    let (parts, body) = response.into_parts();
    match body {
        ProxyBody::Full(Some(body)) => Read::Whole(Filled::read(parts.status, parts.headers, body)),
        ProxyBody::Full(None) => {
            Read::Whole(Filled::read(parts.status, parts.headers, Bytes::new()))
        }
        body => Read::Streamed(parts, body),
    }
}

/// Bodies longer than this are compressed for storing on a blocking thread, off the workers.
const COMPRESS_INLINE: usize = 64 * 1024;

/// Stores a fill's answer if it may be stored; returns whether it was.
async fn store(cache: &Arc<Cache>, plan: &Plan, filled: &Filled) -> bool {
    if filled.body.len() <= COMPRESS_INLINE {
        return cache.store(
            &plan.key,
            &plan.path,
            filled.status,
            &filled.headers,
            &filled.body,
            Instant::now(),
        );
    }
    let (cache, key, path) = (cache.clone(), plan.key.clone(), plan.path.clone());
    let (status, headers, body) = (filled.status, filled.headers.clone(), filled.body.clone());
    let now = Instant::now();
    tokio::task::spawn_blocking(move || cache.store(&key, &path, status, &headers, &body, now))
        .await
        .unwrap_or(false)
}

fn miss_status(stored: bool, collapsed: bool) -> Cow<'static, str> {
    Cow::Borrowed(match (collapsed, stored) {
        (true, _) => "tmdb-proxy; fwd=miss; collapsed",
        (false, true) => "tmdb-proxy; fwd=miss; stored",
        (false, false) => "tmdb-proxy; fwd=miss",
    })
}

/// A fill's answer for one client.
fn respond(filled: &Filled, plan: &Plan) -> Response<ProxyBody> {
    let headers = crate::cache::stored_headers(&filled.headers);
    build(filled.status, &headers, filled.body.clone(), plan, None)
}

/// The head of an answer its client gets as it arrives, shaped as a fill's answer is.
fn streamed(parts: http::response::Parts, body: ProxyBody, plan: &Plan) -> Response<ProxyBody> {
    let mut headers = crate::cache::stored_headers(&parts.headers);
    if headers.contains_key(CONTENT_ENCODING) {
        headers.insert(VARY, HeaderValue::from_static("Accept-Encoding"));
    }
    let body = if plan.head {
        headers.remove(http::header::TRANSFER_ENCODING);
        ProxyBody::full(Bytes::new())
    } else {
        body
    };
    let mut response = Response::new(body);
    *response.status_mut() = parts.status;
    *response.headers_mut() = headers;
    response
}

/// An entry's answer at `now`, with its `Age`.
fn answer(entry: &Entry, now: Instant, plan: &Plan) -> Response<ProxyBody> {
    build(
        entry.status,
        &entry.headers,
        entry.body.clone(),
        plan,
        Some(entry.age(now)),
    )
}

fn build(
    status: http::StatusCode,
    headers: &http::HeaderMap,
    body: Bytes,
    plan: &Plan,
    age: Option<u64>,
) -> Response<ProxyBody> {
    let mut headers = headers.clone();
    let gzip = headers
        .get(CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    if gzip {
        // The same entry answers clients that take gzip and clients that do not.
        headers.insert(VARY, HeaderValue::from_static("Accept-Encoding"));
    }
    let body = match (gzip && !plan.gzip_ok).then(|| gunzip(&body)).flatten() {
        Some(plain) => {
            headers.remove(CONTENT_ENCODING);
            plain
        }
        None => body,
    };
    headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    if let Some(age) = age {
        headers.insert(AGE, HeaderValue::from(age));
    }
    let body = if plan.head { Bytes::new() } else { body };
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// Most bytes a stored gzip body may decompress to for a client that does not take gzip.
const MAX_PLAIN: u64 = 64 * 1024 * 1024;

/// The body decompressed, or `None` if it is not valid gzip or would exceed [`MAX_PLAIN`] (the
/// client then gets it as stored).
fn gunzip(body: &[u8]) -> Option<Bytes> {
    use std::io::Read;
    let mut plain = Vec::with_capacity(body.len() * 4);
    flate2::read::GzDecoder::new(body)
        .take(MAX_PLAIN + 1)
        .read_to_end(&mut plain)
        .ok()?;
    (plain.len() as u64 <= MAX_PLAIN).then(|| Bytes::from(plain))
}

fn accepts_gzip(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| p.trim().replace(' ', "") == "q=0");
            !refused && (name.eq_ignore_ascii_case("gzip") || name == "*")
        })
}
