//! The cache's part in a request (see `crate::cache`): a plan made once the request is known,
//! then a hit answered from memory, or a miss filled once for every request waiting on it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, AGE, CONTENT_ENCODING, CONTENT_LENGTH};
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
use crate::upstream::UpstreamBody;

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
            ctx.cache = Some(("BYPASS", "tmdb-proxy; fwd=bypass".to_owned()));
            None
        }
        Ok(key) => {
            let head = parts.method == Method::HEAD;
            if head {
                parts.method = Method::GET;
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
            ctx.cache = Some(("HIT", format!("tmdb-proxy; hit; ttl={ttl}")));
            return Ok(answer(entry, now, &plan));
        }
        cache.stats.misses.fetch_add(1, Ordering::Relaxed);
        if !known {
            let response = self.send_through(settings, identity, req, ctx).await?;
            return Ok(
                match read_whole(response, cache.config().max_object_size).await {
                    Ok(filled) => {
                        let stored = store(&cache, &plan, &filled);
                        ctx.cache = Some(("MISS", miss_status(stored, false)));
                        respond(&filled, &plan)
                    }
                    Err(response) => {
                        ctx.cache = Some(("MISS", "tmdb-proxy; fwd=miss".to_owned()));
                        response
                    }
                },
            );
        }
        let mut req = Some(req);
        let (result, own, collapsed) = match (cache.join(&plan.key), req.take()) {
            (Join::Lead(leader, rx), Some(fill)) => {
                let (own_tx, own_rx) = oneshot::channel();
                self.spawn_fill(settings, &plan, leader, identity, fill, ctx, own_tx);
                (wait(rx).await, Some(own_rx), false)
            }
            (Join::Wait(rx), mine) => {
                req = mine;
                (wait(rx).await, None, true)
            }
            (Join::Lead(..), None) => (None, None, false),
        };
        let Some(filled) = result else {
            // Abandoned (an answer too large to share): the leader gets its own answer, and a
            // waiter goes on its own.
            if let Some(Ok(response)) = match own {
                Some(rx) => Some(rx.await),
                None => None,
            } {
                ctx.cache = Some(("MISS", "tmdb-proxy; fwd=miss".to_owned()));
                return Ok(response);
            }
            if let Some(req) = req {
                ctx.cache = Some(("MISS", "tmdb-proxy; fwd=miss".to_owned()));
                return self.send_through(settings, identity, req, ctx).await;
            }
            return Err(ProxyError::Upstream(
                crate::upstream::UpstreamError::Failed(
                    "the shared fill ended without an answer".into(),
                ),
            ));
        };
        ctx.rate = filled.rate.or(ctx.rate);
        ctx.upstream_answered = filled.upstream_answered;
        if filled.is_failure()
            && let Some(stale) = entry.as_ref()
        {
            cache.stats.stale.fetch_add(1, Ordering::Relaxed);
            let status = filled.status.as_u16();
            ctx.cache = Some((
                "STALE",
                format!("tmdb-proxy; fwd=stale; fwd-status={status}"),
            ));
            return Ok(answer(stale, Instant::now(), &plan));
        }
        ctx.cache = Some(("MISS", miss_status(filled.stored, collapsed)));
        Ok(respond(&filled, &plan))
    }

    /// Sends the fill in a task of its own, so a leader that goes away leaves only itself.
    #[allow(clippy::too_many_arguments)]
    fn spawn_fill(
        &self,
        settings: &Arc<Settings>,
        plan: &Plan,
        leader: Leader,
        identity: Identity,
        req: Request<UpstreamBody>,
        ctx: &RequestCtx,
        own: oneshot::Sender<Response<ProxyBody>>,
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
            let response = match result {
                Ok(response) => response,
                Err(error) => error.to_response().map(ProxyBody::full),
            };
            match read_whole(response, cache.config().max_object_size).await {
                Ok(mut filled) => {
                    filled.upstream_answered = fill_ctx.upstream_answered;
                    filled.rate = fill_ctx.rate;
                    filled.stored = store(&cache, &plan, &filled);
                    leader.publish(filled);
                }
                Err(response) => {
                    drop(leader);
                    let _ = own.send(response);
                }
            }
        });
    }
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

/// Reads an answer whole if it fits in `limit` bytes; else hands it back untouched.
async fn read_whole(
    response: Response<ProxyBody>,
    limit: usize,
) -> Result<Filled, Response<ProxyBody>> {
    let fits = response
        .body()
        .size_hint()
        .exact()
        .is_some_and(|n| n <= limit as u64);
    if !fits {
        return Err(response);
    }
    let (parts, body) = response.into_parts();
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    Ok(Filled {
        status: parts.status,
        headers: parts.headers,
        body: bytes,
        stored: false,
        upstream_answered: true,
        rate: None,
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

fn miss_status(stored: bool, collapsed: bool) -> String {
    match (collapsed, stored) {
        (true, _) => "tmdb-proxy; fwd=miss; collapsed".to_owned(),
        (false, true) => "tmdb-proxy; fwd=miss; stored".to_owned(),
        (false, false) => "tmdb-proxy; fwd=miss".to_owned(),
    }
}

/// A fill's answer for one client.
fn respond(filled: &Filled, plan: &Plan) -> Response<ProxyBody> {
    build(
        filled.status,
        &filled.headers,
        filled.body.clone(),
        plan,
        None,
    )
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

fn gunzip(body: &[u8]) -> Option<Bytes> {
    use std::io::Read;
    let mut plain = Vec::with_capacity(body.len() * 4);
    flate2::read::GzDecoder::new(body)
        .take(64 * 1024 * 1024)
        .read_to_end(&mut plain)
        .ok()?;
    Some(Bytes::from(plain))
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
