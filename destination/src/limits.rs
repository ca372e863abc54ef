//! Making data fit Klaviyo's ingestion limits before sending, instead of
//! earning a 400 for the whole event: strings are truncated, arrays cut,
//! objects nested too deep kept as JSON text, properties beyond the count
//! dropped. Each change is reported as a warning naming the field.

use serde_json::{Map, Value};

use crate::klaviyo::limits;

/// Warnings for one kind of change are collapsed after this many.
const WARNINGS_PER_KIND: usize = 5;

/// Collects what was changed, so the warnings name fields but stay short.
#[derive(Default)]
pub struct Changes {
    truncated: Vec<String>,
    cut: Vec<String>,
    flattened: Vec<String>,
    dropped: Vec<String>,
}

impl Changes {
    pub fn into_warnings(self, warnings: &mut Vec<String>) {
        report(
            warnings,
            &self.truncated,
            &format!("truncated to {} bytes", limits::STRING_BYTES),
        );
        report(warnings, &self.cut, &format!("cut to {} items", limits::ARRAY_ITEMS));
        report(
            warnings,
            &self.flattened,
            &format!("nested deeper than {} levels; sent as JSON text", limits::NESTING_DEPTH),
        );
        report(
            warnings,
            &self.dropped,
            &format!("dropped: more than {} event properties", limits::EVENT_PROPERTIES),
        );
    }
}

fn report(warnings: &mut Vec<String>, fields: &[String], what: &str) {
    if fields.is_empty() {
        return;
    }
    let shown = fields
        .iter()
        .take(WARNINGS_PER_KIND)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    let more = fields.len().saturating_sub(WARNINGS_PER_KIND);
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    warnings.push(format!("{shown}{more}: {what}"));
}

/// Event properties within the count limit (keys are kept in sorted order,
/// so which ones are dropped does not depend on the sender's key order),
/// with every value fitted.
pub fn fit_event_properties(mut properties: Map<String, Value>, changes: &mut Changes) -> Map<String, Value> {
    if properties.len() > limits::EVENT_PROPERTIES {
        let beyond: Vec<String> = properties.keys().skip(limits::EVENT_PROPERTIES).cloned().collect();
        for key in beyond {
            properties.remove(&key);
            changes.dropped.push(format!("properties.{key}"));
        }
    }
    fit_object(properties, "properties", 1, changes)
}

/// An object whose values fit the string, array and depth limits. `depth`
/// is the nesting level of the object itself (a top-level object is 1).
pub fn fit_object(object: Map<String, Value>, path: &str, depth: usize, changes: &mut Changes) -> Map<String, Value> {
    object
        .into_iter()
        .map(|(key, value)| {
            let child = format!("{path}.{key}");
            let value = fit_value(value, &child, depth, changes);
            (key, value)
        })
        .collect()
}

/// `depth` is the nesting level of the object holding this value.
fn fit_value(value: Value, path: &str, depth: usize, changes: &mut Changes) -> Value {
    match value {
        Value::String(text) => Value::String(fit_string(text, path, changes)),
        Value::Array(items) => {
            let mut items = items;
            if items.len() > limits::ARRAY_ITEMS {
                items.truncate(limits::ARRAY_ITEMS);
                changes.cut.push(path.to_string());
            }
            Value::Array(
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, item)| fit_value(item, &format!("{path}[{i}]"), depth, changes))
                    .collect(),
            )
        }
        Value::Object(object) if depth >= limits::NESTING_DEPTH => {
            changes.flattened.push(path.to_string());
            let text = Value::Object(object).to_string();
            Value::String(fit_string(text, path, changes))
        }
        Value::Object(object) => Value::Object(fit_object(object, path, depth + 1, changes)),
        other => other,
    }
}

fn fit_string(mut text: String, path: &str, changes: &mut Changes) -> String {
    if text.len() > limits::STRING_BYTES {
        let mut end = limits::STRING_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        changes.truncated.push(path.to_string());
    }
    text
}

/// Serialised size of a JSON value, in bytes (counted, not built).
pub fn json_size(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, value) {
        Ok(()) => count.0,
        Err(_) => usize::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fit(properties: Value) -> (Value, Vec<String>) {
        let mut changes = Changes::default();
        let Value::Object(map) = properties else { panic!() };
        let fitted = fit_event_properties(map, &mut changes);
        let mut warnings = Vec::new();
        changes.into_warnings(&mut warnings);
        (Value::Object(fitted), warnings)
    }

    #[test]
    fn long_strings_are_truncated_on_a_character_boundary() {
        let (fitted, warnings) = fit(json!({"note": "é".repeat(60_000)}));
        let note = fitted["note"].as_str().unwrap();
        assert!(note.len() <= limits::STRING_BYTES && note.len() >= limits::STRING_BYTES - 1);
        assert_eq!(warnings, ["properties.note: truncated to 100000 bytes"]);
    }

    #[test]
    fn properties_beyond_the_count_are_dropped_in_key_order() {
        let many: Map<String, Value> = (0..405).map(|i| (format!("p{i:03}"), json!(i))).collect();
        let (fitted, warnings) = fit(Value::Object(many));
        assert_eq!(fitted.as_object().unwrap().len(), 400);
        assert!(fitted.get("p399").is_some() && fitted.get("p400").is_none());
        assert!(
            warnings[0].starts_with("properties.p400, properties.p401"),
            "{warnings:?}"
        );
        assert!(
            warnings[0].ends_with("properties.p404: dropped: more than 400 event properties"),
            "{warnings:?}"
        );
    }

    #[test]
    fn objects_nested_too_deep_become_json_text() {
        let mut deep = json!({"leaf": 1});
        for _ in 0..12 {
            deep = json!({ "n": deep });
        }
        let (fitted, warnings) = fit(json!({ "deep": deep }));
        let mut at = &fitted["deep"];
        for _ in 0..8 {
            at = &at["n"];
        }
        assert!(at["n"].is_string(), "level 11 is text: {at}");
        assert_eq!(warnings.len(), 1);
    }

    #[test]
    fn long_arrays_are_cut() {
        let (fitted, warnings) = fit(json!({"ids": vec![1; 4_100]}));
        assert_eq!(fitted["ids"].as_array().unwrap().len(), limits::ARRAY_ITEMS);
        assert_eq!(warnings, ["properties.ids: cut to 4000 items"]);
    }
}
