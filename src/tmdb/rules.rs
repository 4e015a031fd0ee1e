//! TMDB's rules, as pure functions: which bodies are TMDB's own, how a foreign error maps onto
//! TMDB's codes, and which requests TMDB is documented to refuse (so the proxy can refuse them
//! without spending a token or an upstream request).

use http::StatusCode;

use super::query::Query;
use super::status::code;

/// Whether `body` is a TMDB JSON body that clients can parse as is: a status body (`status_code`
/// or `status_message`, in any field order, with or without `success`, v4's `failure` too) or a
/// 422 validation body (`{"errors":[...]}`).
pub fn is_tmdb_body(body: &[u8]) -> bool {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(body)
    else {
        return false;
    };
    map.get("status_code")
        .is_some_and(serde_json::Value::is_u64)
        || map
            .get("status_message")
            .is_some_and(serde_json::Value::is_string)
        || map.get("errors").is_some_and(serde_json::Value::is_array)
}

/// The TMDB code for an upstream error status whose body is not TMDB's. `None` for statuses below
/// 400, which pass through. 429 is handled by the caller (it also pauses the key).
pub fn code_for_upstream_error(status: StatusCode, body: &[u8]) -> Option<u16> {
    let code = match status.as_u16() {
        0..=399 => return None,
        401 => code::INVALID_API_KEY,
        404 => code::NOT_FOUND,
        405 => code::METHOD_NOT_SUPPORTED,
        406 => code::INVALID_ACCEPT_HEADER,
        429 => code::RATE_LIMITED,
        500 => code::INTERNAL_ERROR,
        502 => code::BAD_GATEWAY,
        503 if mentions_maintenance(body) => code::MAINTENANCE,
        503 => code::SERVICE_OFFLINE,
        504 => code::TIMED_OUT,
        400..=499 => code::INVALID_INPUT,
        _ => code::INTERNAL_ERROR,
    };
    Some(code)
}

fn mentions_maintenance(body: &[u8]) -> bool {
    body.windows(b"maintenance".len())
        .any(|w| w.eq_ignore_ascii_case(b"maintenance"))
}

/// Which documented refusals the proxy answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaSavers {
    /// `page` must be an integer from 1 to 500 (code 22).
    pub page: bool,
    /// Date parameters must be `YYYY-MM-DD` (code 23).
    pub dates: bool,
    /// `append_to_response` may name at most 20 items (code 27).
    pub append_to_response: bool,
}

impl QuotaSavers {
    /// All on: the default.
    pub const ALL: Self = Self {
        page: true,
        dates: true,
        append_to_response: true,
    };
}

/// Most items TMDB accepts in `append_to_response`.
const MAX_APPEND_TO_RESPONSE: usize = 20;
/// Highest page TMDB serves.
const MAX_PAGE: u32 = 500;

/// The TMDB code for a query TMDB is documented to refuse, if any. Empty values count as absent:
/// clients commonly send unset filters as `name=`.
pub fn refused_query(query: &Query<'_>, savers: QuotaSavers) -> Option<u16> {
    for pair in query.pairs() {
        let (name, value) = (&*pair.name, &*pair.value);
        if value.is_empty() {
            continue;
        }
        if savers.page && name == "page" && !valid_page(value) {
            return Some(code::INVALID_PAGE);
        }
        if savers.dates && is_date_param(name) && !valid_date(value) {
            return Some(code::INVALID_DATE);
        }
        if savers.append_to_response
            && name == "append_to_response"
            && value
                .split(',')
                .filter(|item| !item.trim().is_empty())
                .count()
                > MAX_APPEND_TO_RESPONSE
        {
            return Some(code::TOO_MANY_APPENDS);
        }
    }
    None
}

fn valid_page(value: &str) -> bool {
    value.bytes().all(|b| b.is_ascii_digit())
        && value
            .parse::<u32>()
            .is_ok_and(|page| (1..=MAX_PAGE).contains(&page))
}

/// `date`, `*_date`, and their `.gte` / `.lte` range forms (`primary_release_date.gte`,
/// `air_date.lte`, `start_date`, `end_date`).
fn is_date_param(name: &str) -> bool {
    let base = name
        .strip_suffix(".gte")
        .or_else(|| name.strip_suffix(".lte"))
        .unwrap_or(name);
    base == "date" || base.ends_with("_date")
}

/// `YYYY-MM-DD` with a month of 01-12 and a day of 01-31.
fn valid_date(value: &str) -> bool {
    let b = value.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let digits = |range: std::ops::Range<usize>| {
        b[range.clone()].iter().all(u8::is_ascii_digit).then(|| {
            b[range]
                .iter()
                .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'))
        })
    };
    matches!(
        (digits(0..4), digits(5..7), digits(8..10)),
        (Some(_), Some(1..=12), Some(1..=31))
    )
}

/// Whether `path` falls under one of `prefixes` (an empty list allows every path). When a list is
/// set, a path the upstream could resolve outside it is never allowed: one with a dot-segment
/// (`/3/../x`, raw or percent-encoded), an encoded slash or backslash (`%2f`, `%5c`), a backslash,
/// or a `;` (a path parameter some servers strip before routing). TMDB's paths have none of these.
pub fn path_allowed(path: &str, prefixes: &[String]) -> bool {
    if prefixes.is_empty() {
        return true;
    }
    let lower = path.to_ascii_lowercase();
    let ambiguous = ["%2f", "%5c", "\\", ";"]
        .iter()
        .any(|needle| lower.contains(needle));
    let has_dot_segment = lower.split('/').any(|segment| {
        let decoded = segment.replace("%2e", ".");
        decoded == "." || decoded == ".."
    });
    !ambiguous
        && !has_dot_segment
        && prefixes
            .iter()
            .any(|prefix| path.starts_with(prefix.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(query: &str, savers: QuotaSavers) -> Option<u16> {
        refused_query(&Query::parse(Some(query)), savers)
    }

    #[test]
    fn tmdb_bodies_are_recognised_whatever_their_shape() {
        for body in [
            r#"{"success":false,"status_code":34,"status_message":"The resource you requested could not be found."}"#,
            r#"{"status_message":"Invalid API key: You must be granted a valid key.","status_code":7}"#,
            r#"{"status_code":7,"status_message":"x","success":false,"failure":true}"#,
            r#"{"errors":["query must be provided"]}"#,
            r#"{"success":true,"status_code":1,"status_message":"Success."}"#,
        ] {
            assert!(is_tmdb_body(body.as_bytes()), "{body}");
        }
        for body in [
            "<html>502 Bad Gateway</html>",
            "",
            "{\"status_code\":",
            "[1,2]",
            r#"{"message":"x"}"#,
        ] {
            assert!(!is_tmdb_body(body.as_bytes()), "{body}");
        }
    }

    #[test]
    fn foreign_errors_map_onto_tmdb_codes() {
        let code = |s: u16, body: &str| {
            code_for_upstream_error(StatusCode::from_u16(s).unwrap(), body.as_bytes())
        };
        assert_eq!(code(200, ""), None);
        assert_eq!(code(304, ""), None);
        assert_eq!(code(401, "<html>"), Some(7));
        assert_eq!(code(404, ""), Some(34));
        assert_eq!(code(405, ""), Some(42));
        assert_eq!(code(406, ""), Some(19));
        assert_eq!(code(418, ""), Some(47));
        assert_eq!(code(500, ""), Some(11));
        assert_eq!(code(501, ""), Some(11));
        assert_eq!(code(502, ""), Some(43));
        assert_eq!(code(503, "down"), Some(9));
        assert_eq!(code(503, "<h1>Scheduled MAINTENANCE</h1>"), Some(46));
        assert_eq!(code(504, ""), Some(24));
    }

    #[test]
    fn page_must_be_an_integer_from_1_to_500() {
        for ok in [
            "page=1",
            "page=500",
            "page=042",
            "page=",
            "language=en&&page=2",
        ] {
            assert_eq!(refused(ok, QuotaSavers::ALL), None, "{ok}");
        }
        for bad in [
            "page=0",
            "page=501",
            "page=abc",
            "page=1.5",
            "page=-1",
            "page=+1",
            "page=99999999999",
        ] {
            assert_eq!(refused(bad, QuotaSavers::ALL), Some(22), "{bad}");
        }
    }

    #[test]
    fn dates_must_be_yyyy_mm_dd() {
        for ok in [
            "primary_release_date.gte=2024-01-31",
            "air_date.lte=1999-12-01",
            "start_date=2020-02-29&end_date=2020-03-01",
            "release_date=",
            "sort_by=primary_release_date.desc",
        ] {
            assert_eq!(refused(ok, QuotaSavers::ALL), None, "{ok}");
        }
        for bad in [
            "primary_release_date.gte=2024-1-31",
            "air_date.lte=31-12-1999",
            "start_date=2020/02/29",
            "end_date=2020-13-01",
            "first_air_date.gte=yesterday",
        ] {
            assert_eq!(refused(bad, QuotaSavers::ALL), Some(23), "{bad}");
        }
    }

    #[test]
    fn at_most_twenty_appends() {
        let items = |n: usize| {
            (0..n)
                .map(|i| format!("x{i}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        assert_eq!(
            refused(
                &format!("append_to_response={}", items(20)),
                QuotaSavers::ALL
            ),
            None
        );
        assert_eq!(
            refused(
                &format!("append_to_response={}", items(21)),
                QuotaSavers::ALL
            ),
            Some(27)
        );
        assert_eq!(
            refused(
                &format!("append_to_response={}", items(21).replace(',', "%2C")),
                QuotaSavers::ALL
            ),
            Some(27)
        );
    }

    #[test]
    fn savers_can_be_switched_off() {
        let off = QuotaSavers {
            page: false,
            dates: false,
            append_to_response: false,
        };
        assert_eq!(refused("page=0&release_date=x", off), None);
    }

    #[test]
    fn path_allow_list() {
        let list = vec!["/3/".to_owned(), "/4/".to_owned()];
        assert!(path_allowed("/3/movie/550", &list));
        assert!(path_allowed("/4/list/1", &list));
        assert!(!path_allowed("/", &list));
        assert!(!path_allowed("/5/x", &list));
        assert!(!path_allowed("/3/../admin", &list));
        assert!(!path_allowed("/3/%2e%2e/admin", &list));
        assert!(!path_allowed("/3/%2E%2e/admin", &list));
        for ambiguous in [
            "/3/movie%2f..%2fadmin",
            "/3/movie%2F550",
            "/3/movie%5c550",
            "/3/movie\\550",
            "/3/movie;x=1/550",
            "/3/..;/admin",
        ] {
            assert!(!path_allowed(ambiguous, &list), "{ambiguous}");
        }
        assert!(path_allowed("/anything", &[]));
    }
}
