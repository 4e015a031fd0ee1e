//! TMDB's status codes: the table every body the proxy writes itself is drawn from.
//!
//! Copied from TMDB's published list (codes 1-47 with their HTTP statuses and messages, success
//! codes included). Clients match on `status_code` and on `success`, so the proxy speaks exactly
//! these, never a code of its own invention. A test compares this table with the published text.

use bytes::Bytes;
use http::StatusCode;

/// One row of TMDB's status table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// TMDB's `status_code`.
    pub code: u16,
    /// The HTTP status TMDB answers with for this code.
    pub http: u16,
    /// TMDB's `status_message`, verbatim.
    pub message: &'static str,
}

impl Status {
    const fn new(code: u16, http: u16, message: &'static str) -> Self {
        Self {
            code,
            http,
            message,
        }
    }

    /// The HTTP status as a typed value. Every row holds a valid status.
    pub fn http_status(&self) -> StatusCode {
        StatusCode::from_u16(self.http).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// Whether this is one of TMDB's success codes (1, 12, 13, 21, 40).
    pub fn is_success(&self) -> bool {
        self.http < 300
    }
}

/// The whole table, ordered by code.
pub static TABLE: [Status; 47] = [
    Status::new(1, 200, "Success."),
    Status::new(2, 501, "Invalid service: this service does not exist."),
    Status::new(
        3,
        401,
        "Authentication failed: You do not have permissions to access the service.",
    ),
    Status::new(
        4,
        405,
        "Invalid format: This service doesn’t exist in that format.",
    ),
    Status::new(
        5,
        422,
        "Invalid parameters: Your request parameters are incorrect.",
    ),
    Status::new(
        6,
        404,
        "Invalid id: The pre-requisite id is invalid or not found.",
    ),
    Status::new(7, 401, "Invalid API key: You must be granted a valid key."),
    Status::new(
        8,
        403,
        "Duplicate entry: The data you tried to submit already exists.",
    ),
    Status::new(
        9,
        503,
        "Service offline: This service is temporarily offline, try again later.",
    ),
    Status::new(
        10,
        401,
        "Suspended API key: Access to your account has been suspended, contact TMDB.",
    ),
    Status::new(
        11,
        500,
        "Internal error: Something went wrong, contact TMDB.",
    ),
    Status::new(12, 201, "The item/record was updated successfully."),
    Status::new(13, 200, "The item/record was deleted successfully."),
    Status::new(14, 401, "Authentication failed."),
    Status::new(15, 500, "Failed."),
    Status::new(16, 401, "Device denied."),
    Status::new(17, 401, "Session denied."),
    Status::new(18, 400, "Validation failed."),
    Status::new(19, 406, "Invalid accept header."),
    Status::new(
        20,
        422,
        "Invalid date range: Should be a range no longer than 14 days.",
    ),
    Status::new(
        21,
        200,
        "Entry not found: The item you are trying to edit cannot be found.",
    ),
    Status::new(
        22,
        400,
        "Invalid page: Pages start at 1 and max at 500. They are expected to be an integer.",
    ),
    Status::new(23, 400, "Invalid date: Format needs to be YYYY-MM-DD."),
    Status::new(
        24,
        504,
        "Your request to the backend server timed out. Try again.",
    ),
    Status::new(
        25,
        429,
        "Your request count (#) is over the allowed limit of (40).",
    ),
    Status::new(26, 400, "You must provide a username and password."),
    Status::new(
        27,
        400,
        "Too many append to response objects: The maximum number of remote calls is 20.",
    ),
    Status::new(
        28,
        400,
        "Invalid timezone: Please consult the documentation for a valid timezone.",
    ),
    Status::new(
        29,
        400,
        "You must confirm this action: Please provide a confirm=true parameter.",
    ),
    Status::new(
        30,
        401,
        "Invalid username and/or password: You did not provide a valid login.",
    ),
    Status::new(
        31,
        401,
        "Account disabled: Your account is no longer active. Contact TMDB if this is an error.",
    ),
    Status::new(
        32,
        401,
        "Email not verified: Your email address has not been verified.",
    ),
    Status::new(
        33,
        401,
        "Invalid request token: The request token is either expired or invalid.",
    ),
    Status::new(34, 404, "The resource you requested could not be found."),
    Status::new(35, 401, "Invalid token."),
    Status::new(
        36,
        401,
        "This token hasn’t been granted write permission by the user.",
    ),
    Status::new(37, 404, "The requested session could not be found."),
    Status::new(38, 401, "You don’t have permission to edit this resource."),
    Status::new(39, 401, "This resource is private."),
    Status::new(40, 200, "Nothing to update."),
    Status::new(
        41,
        422,
        "This request token hasn’t been approved by the user.",
    ),
    Status::new(
        42,
        405,
        "This request method is not supported for this resource.",
    ),
    Status::new(43, 502, "Couldn’t connect to the backend server."),
    Status::new(44, 500, "The ID is invalid."),
    Status::new(45, 403, "This user has been suspended."),
    Status::new(
        46,
        503,
        "The API is undergoing maintenance. Try again later.",
    ),
    Status::new(47, 400, "The input is not valid."),
];

/// Looks a code up in the table.
pub fn lookup(code: u16) -> Option<&'static Status> {
    TABLE
        .binary_search_by_key(&code, |s| s.code)
        .ok()
        .map(|i| &TABLE[i])
}

/// `Content-Type` of every body the proxy writes, as TMDB sends it.
pub const CONTENT_TYPE: &str = "application/json;charset=utf-8";

/// Codes the proxy itself answers with, named for readability at the call sites.
pub mod code {
    /// Authentication failed: a page of an origin not allowed to spend the injected key.
    pub const AUTHENTICATION_FAILED: u16 = 3;
    /// Invalid API key: a request with no key and no default to inject.
    pub const INVALID_API_KEY: u16 = 7;
    /// Service offline.
    pub const SERVICE_OFFLINE: u16 = 9;
    /// Internal error.
    pub const INTERNAL_ERROR: u16 = 11;
    /// Invalid accept header.
    pub const INVALID_ACCEPT_HEADER: u16 = 19;
    /// Invalid page.
    pub const INVALID_PAGE: u16 = 22;
    /// Invalid date.
    pub const INVALID_DATE: u16 = 23;
    /// Backend timed out.
    pub const TIMED_OUT: u16 = 24;
    /// Request count over the allowed limit.
    pub const RATE_LIMITED: u16 = 25;
    /// Too many append to response objects.
    pub const TOO_MANY_APPENDS: u16 = 27;
    /// Resource not found.
    pub const NOT_FOUND: u16 = 34;
    /// Method not supported.
    pub const METHOD_NOT_SUPPORTED: u16 = 42;
    /// Could not connect to the backend.
    pub const BAD_GATEWAY: u16 = 43;
    /// The API is undergoing maintenance.
    pub const MAINTENANCE: u16 = 46;
    /// The input is not valid.
    pub const INVALID_INPUT: u16 = 47;
}

/// A TMDB status body: `{"success":false,"status_code":N,"status_message":"..."}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorBody {
    pub success: bool,
    pub status_code: u16,
    pub status_message: String,
    /// The HTTP status it is sent with.
    pub http: StatusCode,
}

impl ErrorBody {
    /// The body for `code`, with TMDB's message. An unknown code falls back to 11 (internal error).
    pub fn for_code(code: u16) -> Self {
        let status = lookup(code)
            .or_else(|| lookup(code::INTERNAL_ERROR))
            .copied()
            .unwrap_or(Status::new(
                11,
                500,
                "Internal error: Something went wrong, contact TMDB.",
            ));
        Self {
            success: status.is_success(),
            status_code: status.code,
            status_message: status.message.to_owned(),
            http: status.http_status(),
        }
    }

    /// Code 25 with the real figures in place of TMDB's `(#)` and `(40)`.
    pub fn rate_limited(count: u64, limit: u64) -> Self {
        Self {
            status_message: format!(
                "Your request count ({count}) is over the allowed limit of ({limit})."
            ),
            ..Self::for_code(code::RATE_LIMITED)
        }
    }

    /// The JSON bytes, fields in TMDB's order.
    pub fn to_json(&self) -> Bytes {
        // serde_json escapes the message; the numbers and booleans cannot fail to serialise.
        let message =
            serde_json::to_string(&self.status_message).unwrap_or_else(|_| String::from("\"\""));
        Bytes::from(format!(
            "{{\"success\":{},\"status_code\":{},\"status_message\":{}}}",
            self.success, self.status_code, message
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TMDB's published table, as shipped beside the project.
    const SEED: &str = include_str!("../../tests/data/tmdb_status_codes.txt");

    /// Parses rows of `code http message` out of the published text.
    fn seed_rows() -> Vec<(u16, u16, String)> {
        let body = SEED
            .split("Rate Limiting")
            .next()
            .unwrap_or_default()
            .replace("Success Codes", " ")
            .replace("Error Codes", " ")
            .replace("Code HTTP Status Message", " ");
        // The published text runs one row into the next ("cannot be found.40 200 ..."): split a
        // full stop from a code that follows it directly.
        let mut spaced = String::with_capacity(body.len());
        let mut chars = body.chars().peekable();
        while let Some(c) = chars.next() {
            spaced.push(c);
            if c == '.' && chars.peek().is_some_and(char::is_ascii_digit) {
                spaced.push(' ');
            }
        }
        let tokens: Vec<&str> = spaced.split_whitespace().collect();
        let is_row_start = |i: usize| {
            i + 1 < tokens.len()
                && tokens[i].parse::<u16>().is_ok()
                && tokens[i + 1].len() == 3
                && tokens[i + 1].parse::<u16>().is_ok()
        };
        let mut rows = Vec::new();
        let mut i = 0;
        while i < tokens.len() {
            if is_row_start(i) {
                let code = tokens[i].parse().unwrap();
                let http = tokens[i + 1].parse().unwrap();
                let mut j = i + 2;
                while j < tokens.len() && !is_row_start(j) {
                    j += 1;
                }
                rows.push((code, http, tokens[i + 2..j].join(" ")));
                i = j;
            } else {
                i += 1;
            }
        }
        rows.sort();
        rows
    }

    #[test]
    fn table_matches_published_list_row_by_row() {
        let seed = seed_rows();
        assert_eq!(seed.len(), TABLE.len());
        for (status, (code, http, message)) in TABLE.iter().zip(&seed) {
            assert_eq!(
                (status.code, status.http, status.message),
                (*code, *http, message.as_str())
            );
        }
    }

    /// The copy under tests/data is the published list as the project received it.
    #[test]
    fn shipped_copy_matches_the_seed_when_present() {
        let seed = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/seed/000_d3971513a429251c.txt");
        if let Ok(text) = std::fs::read_to_string(seed) {
            assert_eq!(text, SEED);
        }
    }

    #[test]
    fn table_is_sorted_and_complete() {
        for (i, status) in TABLE.iter().enumerate() {
            assert_eq!(usize::from(status.code), i + 1);
        }
    }

    #[test]
    fn body_has_all_three_fields() {
        let json: serde_json::Value =
            serde_json::from_slice(&ErrorBody::for_code(34).to_json()).unwrap();
        assert_eq!(json["success"], false);
        assert_eq!(json["status_code"], 34);
        assert_eq!(
            json["status_message"],
            "The resource you requested could not be found."
        );
    }

    #[test]
    fn rate_limited_message_has_real_numbers() {
        let body = ErrorBody::rate_limited(51, 50);
        assert_eq!(body.http, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            std::str::from_utf8(&body.to_json()).unwrap(),
            r#"{"success":false,"status_code":25,"status_message":"Your request count (51) is over the allowed limit of (50)."}"#
        );
    }
}
