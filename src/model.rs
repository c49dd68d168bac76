//! Value types shared by ingest, ledger and seal, with the Metering Service's own limits.

use std::collections::BTreeMap;

/// Largest quantity MeterUsage accepts, and so the largest hourly total per dimension.
pub const MAX_QUANTITY: i64 = 2_147_483_647;
/// Tag keys allowed across a record's allocations (Seller Guide).
pub const MAX_TAG_KEYS: usize = 5;
/// Dimensions a product may have.
pub const MAX_DIMENSIONS: usize = 24;
/// The service's hard ceiling on allocations per record.
pub const MAX_ALLOCATIONS_CEILING: usize = 2500;
pub const TAG_KEY_MAX_LEN: usize = 100;
pub const TAG_VALUE_MAX_LEN: usize = 256;

/// `^[a-zA-Z0-9+ -=._:\/@]+$`, where ` -=` is the range from space to `=`
/// (which already holds `+ . : /`).
pub fn is_tag_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, ' '..='=' | '_' | '@')
}

/// Checks a tag key or value against the service's pattern and length limits.
pub fn check_tag_text(what: &str, text: &str, max_len: usize) -> Result<(), String> {
    if text.is_empty() {
        return Err(format!("tag {what} must not be empty"));
    }
    let len = text.chars().count();
    if len > max_len {
        return Err(format!(
            "tag {what} is {len} characters; the limit is {max_len}"
        ));
    }
    if let Some(bad) = text.chars().find(|c| !is_tag_char(*c)) {
        return Err(format!(
            "tag {what} {text:?} contains {bad:?}; allowed are letters, digits, space and + - = . _ : / @ ! \" # $ % & ' ( ) * , ; <"
        ));
    }
    Ok(())
}

/// `^[-a-zA-Z0-9/=:_.@]*$`, 1 to 255 characters.
pub fn check_product_code(code: &str) -> Result<(), String> {
    if code.is_empty() || code.len() > 255 {
        return Err(format!(
            "product_code must be 1 to 255 characters, got {}",
            code.len()
        ));
    }
    if let Some(bad) = code.chars().find(|c| {
        !(c.is_ascii_alphanumeric() || matches!(c, '-' | '/' | '=' | ':' | '_' | '.' | '@'))
    }) {
        return Err(format!("product_code {code:?} contains {bad:?}"));
    }
    Ok(())
}

/// How a dimension's events become its hourly value (`metering.aggregation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregation {
    /// The sum of the quantities posted in the hour.
    #[default]
    Sum,
    /// The largest quantity posted in the hour.
    Max,
    /// The last quantity posted before the hour closed (a sample).
    Last,
    /// The number of distinct `distinct` values posted in the hour.
    Unique,
}

impl Aggregation {
    pub const ALL: [Aggregation; 4] = [
        Aggregation::Sum,
        Aggregation::Max,
        Aggregation::Last,
        Aggregation::Unique,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Aggregation::Sum => "sum",
            Aggregation::Max => "max",
            Aggregation::Last => "last",
            Aggregation::Unique => "unique",
        }
    }
}

impl std::fmt::Display for Aggregation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Aggregation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Aggregation::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown aggregation {s:?}; expected \"sum\", \"max\", \"last\" or \"unique\""
                )
            })
    }
}

/// A `unique` dimension's `distinct` value: 1 to this many characters.
pub const DISTINCT_MAX_CHARS: usize = 256;
/// Distinct values stored per `unique` dimension-hour at most; a request that would add more
/// is refused (422) and changes nothing.
pub const MAX_DISTINCT_PER_HOUR: i64 = 100_000;

/// A set of tags in canonical (key-sorted) order. The empty set is the untagged bucket.
pub type TagSet = BTreeMap<String, String>;

/// Canonical text form of a tag set, used as the ledger key: sorted JSON object.
pub fn tagset_key(tags: &TagSet) -> String {
    serde_json::to_string(tags).unwrap_or_else(|_| "{}".to_owned())
}

/// Parses the ledger key written by [`tagset_key`].
pub fn tagset_from_key(key: &str) -> Result<TagSet, serde_json::Error> {
    serde_json::from_str(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_pattern_matches_the_service_range() {
        for ok in ["acme", "a b", "x=y", "!#$%&'()*,;<", "a/b@c:d_e.f+g-h"] {
            assert!(check_tag_text("value", ok, 256).is_ok(), "{ok}");
        }
        for bad in ["", ">", "?", "é", "a\tb", "[x]", "a|b", "~"] {
            assert!(check_tag_text("value", bad, 256).is_err(), "{bad}");
        }
        assert!(check_tag_text("key", &"k".repeat(101), TAG_KEY_MAX_LEN).is_err());
        assert!(check_tag_text("key", &"k".repeat(100), TAG_KEY_MAX_LEN).is_ok());
    }

    #[test]
    fn product_code_pattern() {
        assert!(check_product_code("prod-1234abcd").is_ok());
        assert!(check_product_code("").is_err());
        assert!(check_product_code("prod 1").is_err());
    }

    #[test]
    fn tagset_key_is_canonical() {
        let mut a = TagSet::new();
        a.insert("b".into(), "2".into());
        a.insert("a".into(), "1".into());
        assert_eq!(tagset_key(&a), r#"{"a":"1","b":"2"}"#);
        assert_eq!(tagset_from_key(&tagset_key(&a)).ok(), Some(a));
    }
}
