//! A request's query string, split and decoded once; every rule that reads the query reads this.
//!
//! TMDB clients send queries such as `api_key=K&&language=en-US&include_image_language=null`:
//! empty pairs, valueless names, `+` for spaces. Each pair keeps its raw text beside its decoded
//! name and value, so a rewrite (the default key injected upstream) can drop one pair and forward
//! every other byte for byte.

use std::borrow::Cow;

use smallvec::SmallVec;

/// One `name=value` pair of a query. (No `Debug`: a pair may be an API key.)
#[derive(Clone, PartialEq, Eq)]
pub struct Pair<'a> {
    /// The pair as it stood in the query, undecoded.
    pub raw: &'a str,
    /// The name, percent- and `+`-decoded.
    pub name: Cow<'a, str>,
    /// The value, decoded; empty for `name=` and for a bare `name`.
    pub value: Cow<'a, str>,
}

/// The pairs of a query string, in order. Empty pairs (`a=1&&b=2`) are skipped. Its `Debug`
/// lists the names only: a value may be an API key.
#[derive(Clone, Default)]
pub struct Query<'a> {
    /// Inline for the usual TMDB request (a key, a language, a page, an append or two).
    pairs: SmallVec<[Pair<'a>; 8]>,
}

impl std::fmt::Debug for Query<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.pairs.iter().map(|pair| &*pair.name))
            .finish()
    }
}

impl<'a> Query<'a> {
    /// Splits `query` (the part after `?`, if any) into its pairs.
    pub fn parse(query: Option<&'a str>) -> Self {
        let pairs = query
            .unwrap_or_default()
            .split('&')
            .filter(|raw| !raw.is_empty())
            .map(|raw| {
                // One pair of application/x-www-form-urlencoded text: the parser splits at the
                // first `=` and decodes both sides, borrowing when nothing needed decoding.
                let (name, value) = form_urlencoded::parse(raw.as_bytes())
                    .next()
                    .unwrap_or_default();
                Pair { raw, name, value }
            })
            .collect();
        Self { pairs }
    }

    /// Every pair, in query order.
    pub fn pairs(&self) -> &[Pair<'a>] {
        &self.pairs
    }

    /// The non-empty values given for `name`, in query order.
    pub fn values<'q>(&'q self, name: &'q str) -> impl Iterator<Item = &'q str> + 'q {
        self.pairs
            .iter()
            .filter(move |pair| pair.name == name && !pair.value.trim().is_empty())
            .map(|pair| &*pair.value)
    }

    /// The raw text of every pair not named `name`, in query order.
    pub fn raw_without<'q>(&'q self, name: &'q str) -> impl Iterator<Item = &'a str> + 'q {
        self.pairs
            .iter()
            .filter(move |pair| pair.name != name)
            .map(|pair| pair.raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_decoded_and_keep_their_raw_text() {
        let q = Query::parse(Some("api_key=K%2B1&&query=a+b&flag&x=%E2%82%AC"));
        let seen: Vec<(&str, &str, &str)> = q
            .pairs()
            .iter()
            .map(|p| (p.raw, &*p.name, &*p.value))
            .collect();
        assert_eq!(
            seen,
            [
                ("api_key=K%2B1", "api_key", "K+1"),
                ("query=a+b", "query", "a b"),
                ("flag", "flag", ""),
                ("x=%E2%82%AC", "x", "€"),
            ]
        );
        assert!(Query::parse(None).pairs().is_empty());
        assert_eq!(format!("{q:?}"), r#"["api_key", "query", "flag", "x"]"#);
        assert!(Query::parse(Some("&&")).pairs().is_empty());
    }

    #[test]
    fn values_skip_empty_ones_and_raw_without_drops_a_name() {
        let q = Query::parse(Some("api_key=&api_key=A&page=2&api_key=B"));
        assert_eq!(q.values("api_key").collect::<Vec<_>>(), ["A", "B"]);
        assert_eq!(q.raw_without("api_key").collect::<Vec<_>>(), ["page=2"]);
    }
}
