//! TMDB facts: its auth scheme, its rules, its status codes, and the query view they read.
//!
//! Pure data and rewrite rules, no sockets. Anything TMDB-specific that other modules need
//! (parameter names, the auth scheme, status bodies, documented refusals) is defined here once.

pub mod auth;
pub mod query;
pub mod rules;
pub mod status;

pub use query::Query;
pub use status::{ErrorBody, Status};

/// Random and hostile inputs through every parser a client reaches: none may panic, and each
/// keeps its promises. (The fuzzers that need a nightly toolchain cannot run here; these replay
/// from their seed.)
#[cfg(test)]
mod robustness {
    use super::*;
    use crate::fuzz::{Rng, for_each_seed};
    use http::{HeaderMap, HeaderValue};

    /// A string of up to `max` characters drawn from pieces that matter to the parsers.
    fn input(rng: &mut Rng, max: u64) -> String {
        const PIECES: &[&str] = &[
            "api_key",
            "=",
            "&",
            ";",
            "%",
            "%2",
            "%2f",
            "%2e",
            "%5c",
            "%3D",
            "%26",
            "+",
            "page",
            "0",
            "1",
            "500",
            "501",
            "-",
            ".",
            "..",
            "/",
            "\\",
            "date",
            "_date.gte",
            "2024-01-31",
            "append_to_response",
            ",",
            "€",
            "\u{0}",
            " ",
            "a",
            "Z",
            "=null",
            "%ZZ",
            "%C3%A9",
        ];
        let len = rng.below(max);
        (0..len)
            .map(|_| PIECES[rng.below(PIECES.len() as u64) as usize])
            .collect()
    }

    #[test]
    fn queries_keys_and_refusals_never_panic() {
        for_each_seed("queries", 0..200, |seed| {
            let mut rng = Rng(seed);
            for _ in 0..100 {
                let text = input(&mut rng, 24);
                let query = Query::parse(Some(&text));
                // Every pair's raw text is a piece of the query; no pair is empty.
                for pair in query.pairs() {
                    assert!(!pair.raw.is_empty() && text.contains(pair.raw));
                }
                let headers = HeaderMap::new();
                if let Some(credential) = auth::credential(&query, &headers) {
                    assert!(!credential.as_sent().trim().is_empty());
                }
                let _ = auth::is_ambiguous(&query, &headers);
                let _ = rules::refused_query(&query, rules::QuotaSavers::ALL);
                let path = format!("/3/{text}");
                let allowed = rules::path_allowed(&path, &["/3/".to_owned()]);
                // An allowed path has nothing the upstream could resolve outside the list.
                if allowed {
                    let lower = path.to_ascii_lowercase();
                    assert!(
                        !["%2f", "%5c", "\\", ";"].iter().any(|n| lower.contains(n)),
                        "{path}"
                    );
                    assert!(
                        lower.split('/').all(|segment| {
                            let decoded = segment.replace("%2e", ".");
                            decoded != "." && decoded != ".."
                        }),
                        "{path}"
                    );
                }
            }
        });
    }

    #[test]
    fn bearer_tokens_and_jwts_never_panic() {
        use base64::Engine as _;
        let enc = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        for_each_seed("tokens", 0..50, |seed| {
            let mut rng = Rng(seed);
            for _ in 0..100 {
                let claims = input(&mut rng, 12);
                let token = match rng.below(3) {
                    0 => format!(
                        "{}.{}.{}",
                        enc.encode("{}"),
                        enc.encode(&claims),
                        enc.encode("s")
                    ),
                    1 => format!("x.{claims}.y"),
                    _ => claims.clone(),
                };
                let _ = auth::jwt_audience(&token);
                let _ = auth::account_of(&token);
                if let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}")) {
                    let mut headers = HeaderMap::new();
                    headers.insert(http::header::AUTHORIZATION, value);
                    let query = Query::default();
                    if let Some(credential) = auth::credential(&query, &headers) {
                        assert!(!credential.account().is_empty());
                    }
                }
            }
        });
    }

    #[test]
    fn any_config_text_is_refused_or_loaded_without_panic() {
        const PIECES: &[&str] = &[
            "[server]\n",
            "[limit]\n",
            "[[limit.overrides]]\n",
            "[keys.aliases]\n",
            "listen",
            "=",
            "\"",
            "'",
            "1",
            "0",
            "-1",
            "\"2s\"",
            "\"0s\"",
            "\"8MiB\"",
            "requests_per_second",
            "max_wait",
            "mode",
            "\"queue\"",
            "key",
            "alias",
            "\n",
            " ",
            "[",
            "]",
            "{",
            "}",
            ",",
            "max_buffered_body",
            "window_margin",
            "\"1h\"",
            "\"99999999999999h\"",
            "true",
        ];
        for_each_seed("config text", 0..50, |seed| {
            let mut rng = Rng(seed);
            for _ in 0..100 {
                let len = rng.below(30);
                let text: String = (0..len)
                    .map(|_| PIECES[rng.below(PIECES.len() as u64) as usize])
                    .collect();
                let _ = crate::config::Config::from_toml_str(&text);
            }
        });
    }
}
