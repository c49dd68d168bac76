//! Value types shared by ingest, ledger, seal and send, with the Metering Service's own limits
//! and rules: what an event is, what a sealed record is and which delivery states it takes,
//! how long ids and timestamps stay valid, and which hour usage counts in ([`attributed_hour`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::clock::{hour_floor, HOUR_SECS};

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

// ---------------------------------------------------------------------------------------------
// The service's rules about time, and the attribution rule.

/// Idempotency keys are remembered this long.
pub const EVENT_ID_RETENTION_SECS: i64 = 7 * HOUR_SECS;

/// The service accepts timestamps at most this old.
pub const REPORT_WINDOW_SECS: i64 = 6 * HOUR_SECS;

/// The hour that usage received at `received_at` counts in: its UTC hour, unless that hour is
/// already sealed (after a shutdown flush, or a clock step back), then the first unsealed hour
/// `sealed_floor`. The one copy of the attribution rule (ingest's answer, the ledger's append
/// and its `open_hour` all use it).
pub fn attributed_hour(received_at: i64, sealed_floor: i64) -> i64 {
    hour_floor(received_at).max(sealed_floor)
}

// ---------------------------------------------------------------------------------------------
// What flows through ingest, the ledger, seal and send.

/// One usage event, already validated by ingest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub dimension: String,
    pub tags: TagSet,
    /// What it says, in the terms of its dimension's aggregation.
    pub measure: Measure,
    pub id: Option<String>,
}

/// An event's value under its dimension's aggregation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Measure {
    /// Added to the hour's total.
    Sum(i64),
    /// The hour's value is the largest posted.
    Max(i64),
    /// The hour's value is the last posted.
    Last(i64),
    /// One occurrence of a distinct value; the hour's value is the number of distinct values.
    Unique(String),
}

impl Measure {
    pub fn aggregation(&self) -> Aggregation {
        match self {
            Measure::Sum(_) => Aggregation::Sum,
            Measure::Max(_) => Aggregation::Max,
            Measure::Last(_) => Aggregation::Last,
            Measure::Unique(_) => Aggregation::Unique,
        }
    }

    /// The measure of `quantity` under a numeric aggregation (`None` for `unique`).
    pub fn of(aggregation: Aggregation, quantity: i64) -> Option<Self> {
        match aggregation {
            Aggregation::Sum => Some(Measure::Sum(quantity)),
            Aggregation::Max => Some(Measure::Max(quantity)),
            Aggregation::Last => Some(Measure::Last(quantity)),
            Aggregation::Unique => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordState {
    Pending,
    Sent,
    Dead,
    Duplicate,
}

impl RecordState {
    pub const ALL: [RecordState; 4] = [
        RecordState::Pending,
        RecordState::Sent,
        RecordState::Dead,
        RecordState::Duplicate,
    ];

    /// The state as the ledger stores it (`records.state`).
    pub fn as_str(self) -> &'static str {
        match self {
            RecordState::Pending => "pending",
            RecordState::Sent => "sent",
            RecordState::Dead => "dead",
            RecordState::Duplicate => "duplicate",
        }
    }
}

/// A `records.state` text this meterd does not know (the schema's CHECK admits none; a
/// ledger written by something else could hold one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown record state {0:?}; expected \"pending\", \"sent\", \"dead\" or \"duplicate\"")]
pub struct UnknownRecordState(pub String);

impl TryFrom<&str> for RecordState {
    type Error = UnknownRecordState;
    fn try_from(s: &str) -> Result<Self, UnknownRecordState> {
        RecordState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownRecordState(s.to_owned()))
    }
}

/// A sealed record as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredRecord {
    pub hour: i64,
    pub dimension: String,
    pub quantity: i64,
    pub allocations: Option<Vec<Allocation>>,
    pub timestamp: i64,
    pub client_token: String,
    pub state: RecordState,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub metering_record_id: Option<String>,
    pub sealed_at: i64,
    pub sent_at: Option<i64>,
    /// When the delivery state last changed (the final outcome's time once it is final).
    pub updated_at: i64,
}

/// How a delivery attempt ended, as recorded.
#[derive(Debug, Clone)]
pub enum Delivery {
    Sent { metering_record_id: String },
    Failed { error: String },
    Final { state: RecordState, error: String },
}

/// One counter row of an hour: a dimension and tag set with its value under an aggregation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub dimension: String,
    pub tags: TagSet,
    /// `sum`: the total; `max`: the tag set's largest quantity; `last`: its last quantity;
    /// `unique`: the distinct values first seen with this tag set.
    pub quantity: i64,
    /// The aggregation the row was recorded under.
    pub aggregation: Aggregation,
    /// `max`: the receive sequence at which `quantity` was first reached; `last`: the receive
    /// sequence of the last event; 0 otherwise. Sequences grow with every event received.
    pub seq: i64,
}

impl UsageRow {
    /// A `sum` row.
    pub fn sum(dimension: &str, tags: TagSet, quantity: i64) -> Self {
        Self {
            dimension: dimension.to_owned(),
            tags,
            quantity,
            aggregation: Aggregation::Sum,
            seq: 0,
        }
    }
}

/// A bucket of a record's quantity. Empty `tags` is the untagged bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub quantity: i64,
    pub tags: TagSet,
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

    #[test]
    fn record_states_read_back_as_written_and_an_unknown_one_is_an_error() {
        for state in RecordState::ALL {
            assert_eq!(RecordState::try_from(state.as_str()), Ok(state));
        }
        let err = RecordState::try_from("pendng").expect_err("unknown");
        assert!(err.to_string().contains("\"pendng\""), "{err}");
    }

    #[test]
    fn usage_counts_in_its_hour_unless_that_hour_is_sealed() {
        let h = 1_800_000_000 - 1_800_000_000 % HOUR_SECS;
        assert_eq!(attributed_hour(h + 10, 0), h);
        assert_eq!(attributed_hour(h + 10, h), h);
        assert_eq!(attributed_hour(h + 10, h + HOUR_SECS), h + HOUR_SECS);
        assert_eq!(attributed_hour(h - 1, h), h, "a clock stepped back");
    }
}
