//! The cache's part in a request (see `crate::cache`): a plan made once the request is known,
//! then a hit answered from memory, or a miss filled once for every request waiting on it.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, AGE, CONTENT_ENCODING, CONTENT_LENGTH, VARY};
use http::{HeaderValue, Method, Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Proxy;
use super::body::ProxyBody;
use super::ctx::{Identity, RequestCtx};
use super::settings::Settings;
use crate::cache::{Bypass, Cache, Entry, Filled, FlightResult, Join, Leader};
use crate::error::ProxyError;
use crate::upstream::{UpstreamBody, UpstreamError};

/// A request the cache may answer.
#[derive(Debug)]
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
            return Ok(
                match read_whole(response, cache.config().max_object_size).await {
                    Whole::Read(filled) => {
                        let stored = shareable(filled.status) && store(&cache, &plan, &filled);
                        ctx.cache = Some(("MISS", miss_status(stored, false)));
                        respond(&filled, &plan)
                    }
                    Whole::TooLarge(response) => {
                        ctx.cache = Some(("MISS", Cow::Borrowed("tmdb-proxy; fwd=miss")));
                        response
                    }
                    Whole::Broken(reason) => {
                        return Err(ProxyError::Upstream(UpstreamError::Failed(reason)));
                    }
                },
            );
        }
        let stale = entry.filter(|e| !e.is_fresh(now));
        let mut req = Some(req);
        let (result, own, collapsed) = match (cache.join(&plan.key), req.take()) {
            (Join::Lead(leader, rx), Some(fill)) => {
                let (own_tx, own_rx) = oneshot::channel();
                self.spawn_fill(settings, &plan, leader, identity, fill, ctx, own_tx);
                let result = wait(rx).await;
                (result, own_rx.await.ok(), false)
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
            (Some(Own::Failed(error, (answered, rate))), _) => {
                ctx.upstream_answered = answered;
                ctx.rate = rate.or(ctx.rate);
                let status = error.to_response().status().as_u16();
                match stale_answer(&cache, stale.as_deref(), &plan, status, ctx) {
                    Some(answer) => Ok(answer),
                    None => Err(error),
                }
            }
            (Some(Own::TooLarge(response)), _) => Ok(response),
            (None, Some(filled)) if collapsed && !filled.shareable => {
                // About the leader's key or request, not this one's: it goes on its own.
                let req = req.ok_or_else(no_answer)?;
                self.on_its_own(settings, identity, req, stale.as_deref(), &plan, ctx)
                    .await
            }
            (_, Some(filled)) => {
                if !collapsed {
                    ctx.upstream_answered = filled.upstream_answered;
                    ctx.rate = filled.rate.or(ctx.rate);
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
            let answered = (fill_ctx.upstream_answered, fill_ctx.rate);
            let response = match result {
                Ok(response) => response,
                Err(error) => return publish_failure(leader, own, error, answered),
            };
            match read_whole(response, cache.config().max_object_size).await {
                Whole::Read(mut filled) => {
                    filled.upstream_answered = answered.0;
                    filled.rate = answered.1;
                    filled.shareable = shareable(filled.status);
                    filled.stored = filled.shareable && store(&cache, &plan, &filled);
                    leader.publish(filled);
                }
                Whole::TooLarge(response) => {
                    let _ = own.send(Own::TooLarge(response));
                    drop(leader);
                }
                Whole::Broken(reason) => {
                    let error = ProxyError::Upstream(UpstreamError::Failed(reason));
                    publish_failure(leader, own, error, answered);
                }
            }
        });
    }
}

/// A fill that failed with an error the proxy writes: never stored. The leader gets the error
/// itself; waiters get the same TMDB body, unless it is a refusal of the leader's key, which is
/// not theirs.
fn publish_failure(
    leader: Leader,
    own: oneshot::Sender<Own>,
    error: ProxyError,
    answered: (bool, Option<crate::limiter::RateState>),
) {
    let (parts, body) = error.to_response().into_parts();
    let filled = Filled {
        status: parts.status,
        headers: parts.headers,
        body,
        stored: false,
        upstream_answered: answered.0,
        rate: answered.1,
        shareable: !matches!(error, ProxyError::RateLimited(_)),
    };
    let _ = own.send(Own::Failed(error, answered));
    leader.publish(filled);
}

/// What only the leader's client gets: its own error (the metric and log line say what it was),
/// or an answer too large to share.
#[derive(Debug)]
pub(super) enum Own {
    Failed(ProxyError, (bool, Option<crate::limiter::RateState>)),
    TooLarge(Response<ProxyBody>),
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

/// An answer read whole, or why not.
enum Whole {
    Read(Filled),
    /// Larger than `limit`: handed back whole (what was read, then the rest).
    TooLarge(Response<ProxyBody>),
    /// The body broke while it was read.
    Broken(String),
}

/// Reads an answer whole if it is within `limit` bytes: at once when its length says it is
/// larger; else frame by frame, handing back what was read and the rest once it is more.
async fn read_whole(response: Response<ProxyBody>, limit: usize) -> Whole {
    if response.body().size_hint().lower() > limit as u64 {
        return Whole::TooLarge(response);
    }
    let (parts, mut body) = response.into_parts();
    let mut read = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    read.extend_from_slice(data);
                }
                if read.len() > limit {
                    let body = ProxyBody::Prefixed {
                        prefix: Some(read.freeze()),
                        rest: Box::new(body),
                    };
                    return Whole::TooLarge(Response::from_parts(parts, body));
                }
            }
            Err(error) => return Whole::Broken(format!("the upstream body broke: {error}")),
        }
    }
    Whole::Read(Filled {
        status: parts.status,
        headers: parts.headers,
        body: read.freeze(),
        stored: false,
        upstream_answered: true,
        rate: None,
        shareable: false,
    })
}

fn store(cache: &Cache, plan: &Plan, filled: &Filled) -> bool {
    cache.store(
        &plan.key,
        &plan.path,
        filled.status,
        &filled.headers,
        &filled.body,
        Instant::now(),
    )
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
