//! `POST /v1/usage` bodies: parsing and validation, a pure function (fuzzed: `fuzz/`).

use std::collections::{BTreeMap, HashMap, HashSet};

use http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::model::{
    self, Aggregation, Event, Measure, TagSet, DISTINCT_MAX_CHARS, MAX_QUANTITY, MAX_TAG_KEYS,
};

use super::{MAX_BATCH_EVENTS, MAX_ID_CHARS};

/// One event as it arrives on the wire.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireEvent {
    dimension: Option<String>,
    quantity: Option<serde_json::Number>,
    tags: Option<UniqueTags>,
    id: Option<String>,
    distinct: Option<String>,
}

/// An event's tags; a key given twice is refused, like a field given twice.
#[derive(Debug, Default)]
struct UniqueTags(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for UniqueTags {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UniqueTags;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of tag keys to string values")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<UniqueTags, M::Error> {
                let mut tags = BTreeMap::new();
                while let Some((key, value)) = map.next_entry::<String, String>()? {
                    if tags.contains_key(&key) {
                        return Err(serde::de::Error::custom(format!(
                            "tag key {key:?} is given twice"
                        )));
                    }
                    tags.insert(key, value);
                }
                Ok(UniqueTags(tags))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// A body is one event or `{"events": [...]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireBody {
    dimension: Option<String>,
    quantity: Option<serde_json::Number>,
    tags: Option<UniqueTags>,
    id: Option<String>,
    distinct: Option<String>,
    events: Option<Vec<WireEvent>>,
}

/// A refused request: the status, a summary, and one entry per bad event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    /// Low-cardinality reason for the metric.
    pub reason: &'static str,
    pub error: String,
    pub details: Vec<EventProblem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventProblem {
    pub index: usize,
    pub field: &'static str,
    pub problem: String,
}

impl Rejection {
    pub(super) fn new(status: StatusCode, reason: &'static str, error: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            error: error.into(),
            details: Vec::new(),
        }
    }
}

/// What events may say: the configured dimensions, their aggregations and tag keys.
#[derive(Debug, Clone, Default)]
pub struct Vocabulary {
    pub dimensions: HashSet<String>,
    pub tag_keys: HashSet<String>,
    /// Dimensions that do not sum; a dimension not listed sums.
    pub aggregation: HashMap<String, Aggregation>,
    /// Dimensions meterd records itself (`metering.heartbeat`): no events are taken for them.
    pub heartbeat: HashSet<String>,
}

impl Vocabulary {
    pub fn from_config(config: &Config) -> Self {
        Self {
            dimensions: config.metering.dimensions.iter().cloned().collect(),
            tag_keys: config.metering.tag_keys.iter().cloned().collect(),
            aggregation: config
                .metering
                .aggregations()
                .into_iter()
                .filter(|(_, a)| *a != Aggregation::Sum)
                .collect(),
            heartbeat: config.metering.heartbeat.keys().cloned().collect(),
        }
    }

    pub fn aggregation_of(&self, dimension: &str) -> Aggregation {
        self.aggregation.get(dimension).copied().unwrap_or_default()
    }
}

/// Parses and validates a `POST /v1/usage` body: all events valid, or a rejection naming each
/// bad one.
pub fn parse_usage(body: &[u8], vocabulary: &Vocabulary) -> Result<Vec<Event>, Rejection> {
    let wire: WireBody = serde_json::from_slice(body).map_err(|e| {
        Rejection::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not a valid usage request: {e}"),
        )
    })?;
    let single = wire.dimension.is_some()
        || wire.quantity.is_some()
        || wire.tags.is_some()
        || wire.id.is_some()
        || wire.distinct.is_some();
    let events = match (wire.events, single) {
        (Some(_), true) => {
            return Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                "malformed_request",
                "send either one event or {\"events\": [...]}, not both",
            ))
        }
        (Some(events), false) => {
            if events.is_empty() || events.len() > MAX_BATCH_EVENTS {
                return Err(Rejection::new(
                    StatusCode::BAD_REQUEST,
                    "batch_size",
                    format!(
                        "events must hold 1 to {MAX_BATCH_EVENTS} events, got {}",
                        events.len()
                    ),
                ));
            }
            events
        }
        (None, _) => vec![WireEvent {
            dimension: wire.dimension,
            quantity: wire.quantity,
            tags: wire.tags,
            id: wire.id,
            distinct: wire.distinct,
        }],
    };
    let mut problems = Vec::new();
    let mut valid = Vec::with_capacity(events.len());
    for (index, event) in events.into_iter().enumerate() {
        match validate_event(event, vocabulary) {
            Ok(e) => valid.push(e),
            Err((field, problem)) => problems.push(EventProblem {
                index,
                field,
                problem,
            }),
        }
    }
    if problems.is_empty() {
        return Ok(valid);
    }
    let reason = match problems[0].field {
        "dimension" => "unknown_dimension",
        "quantity" => "bad_quantity",
        "tags" => "bad_tags",
        "distinct" => "bad_distinct",
        _ => "bad_event",
    };
    Err(Rejection {
        status: StatusCode::BAD_REQUEST,
        reason,
        error: format!(
            "{} of the request's events {} invalid; nothing was recorded",
            problems.len(),
            if problems.len() == 1 { "is" } else { "are" }
        ),
        details: problems,
    })
}

fn validate_event(
    event: WireEvent,
    vocabulary: &Vocabulary,
) -> Result<Event, (&'static str, String)> {
    let dimension = event
        .dimension
        .ok_or(("dimension", "dimension is required".to_owned()))?;
    if !vocabulary.dimensions.contains(&dimension) {
        let mut known: Vec<&String> = vocabulary.dimensions.iter().collect();
        known.sort();
        return Err((
            "dimension",
            format!("unknown dimension {dimension:?}; configured dimensions are {known:?}"),
        ));
    }
    if vocabulary.heartbeat.contains(&dimension) {
        return Err((
            "dimension",
            format!("dimension {dimension:?} is recorded by meterd itself (metering.heartbeat: units for every hour the agent runs) and takes no posted events"),
        ));
    }
    let aggregation = vocabulary.aggregation_of(&dimension);
    let measure = if aggregation == Aggregation::Unique {
        let Some(value) = event.distinct else {
            return Err((
                "distinct",
                format!("distinct is required: {dimension:?} counts distinct values (metering.aggregation = \"unique\")"),
            ));
        };
        let n = value.chars().count();
        if n == 0 || n > DISTINCT_MAX_CHARS {
            return Err((
                "distinct",
                format!("distinct must be 1 to {DISTINCT_MAX_CHARS} characters, got {n}"),
            ));
        }
        // An event is one occurrence of its value; a quantity would suggest it counts more.
        if let Some(q) = event.quantity.filter(|q| q.as_i64() != Some(1)) {
            return Err((
                "quantity",
                format!("quantity {q}: an event of the unique dimension {dimension:?} is one occurrence of its distinct value, so quantity must be absent or 1"),
            ));
        }
        Measure::Unique(value)
    } else {
        if event.distinct.is_some() {
            return Err((
                "distinct",
                format!("distinct is only for unique dimensions; {dimension:?} aggregates by {aggregation}"),
            ));
        }
        let quantity = parse_quantity(event.quantity)?;
        Measure::of(aggregation, quantity).ok_or(("quantity", "no quantity".to_owned()))?
    };
    let tags: TagSet = event.tags.unwrap_or_default().0;
    if tags.len() > MAX_TAG_KEYS {
        return Err((
            "tags",
            format!(
                "{} tag keys given; at most {MAX_TAG_KEYS} are allowed",
                tags.len()
            ),
        ));
    }
    for (key, value) in &tags {
        if !vocabulary.tag_keys.contains(key) {
            let mut known: Vec<&String> = vocabulary.tag_keys.iter().collect();
            known.sort();
            return Err((
                "tags",
                format!("tag key {key:?} is not in metering.tag_keys {known:?}"),
            ));
        }
        model::check_tag_text("value", value, model::TAG_VALUE_MAX_LEN)
            .map_err(|e| ("tags", format!("{e} (key {key:?})")))?;
    }
    if let Some(id) = &event.id {
        let n = id.chars().count();
        if n == 0 || n > MAX_ID_CHARS {
            return Err((
                "id",
                format!("id must be 1 to {MAX_ID_CHARS} characters, got {n}"),
            ));
        }
    }
    Ok(Event {
        dimension,
        tags,
        measure,
        id: event.id,
    })
}

/// A quantity: a whole number from 0 to 2147483647.
fn parse_quantity(quantity: Option<serde_json::Number>) -> Result<i64, (&'static str, String)> {
    let quantity = quantity.ok_or(("quantity", "quantity is required".to_owned()))?;
    let quantity = match quantity.as_i64() {
        Some(q) if (0..=MAX_QUANTITY).contains(&q) => q,
        Some(q) if q < 0 => return Err(("quantity", format!("quantity {q} is negative"))),
        _ if quantity.is_f64() => {
            return Err((
                "quantity",
                format!("quantity {quantity} is not a whole number"),
            ))
        }
        _ => {
            return Err((
                "quantity",
                format!("quantity {quantity} is larger than {MAX_QUANTITY}"),
            ))
        }
    };
    Ok(quantity)
}

#[cfg(test)]
mod tests;
