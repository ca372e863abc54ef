//! Making data fit Klaviyo's ingestion limits before sending, instead of
//! earning a 400 for the whole event: strings are truncated, arrays cut,
//! objects nested too deep kept as JSON text, properties beyond the count
//! dropped. Each change is reported as a warning naming the field.

use serde_json::{Map, Value};

use crate::event::Member;
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
        // The descriptions are formatted only for kinds that happened: this
        // runs for every event, and nearly every event fits as it is.
        report(warnings, &self.truncated, || {
            format!("truncated to {} bytes", limits::STRING_BYTES)
        });
        report(warnings, &self.cut, || format!("cut to {} items", limits::ARRAY_ITEMS));
        report(warnings, &self.flattened, || {
            format!("nested deeper than {} levels; sent as JSON text", limits::NESTING_DEPTH)
        });
        report(warnings, &self.dropped, || {
            format!("dropped: more than {} event properties", limits::EVENT_PROPERTIES)
        });
    }
}

fn report(warnings: &mut Vec<String>, fields: &[String], what: impl FnOnce() -> String) {
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
    warnings.push(format!("{shown}{more}: {}", what()));
}

/// Where a value sits (`properties.products[2].name`), written out only
/// when a change to it is reported: fitting visits every value of every
/// event, and almost none change.
#[derive(Clone, Copy)]
enum Path<'a> {
    Root(&'a str),
    Key(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl std::fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Root(name) => f.write_str(name),
            Path::Key(parent, key) => write!(f, "{parent}.{key}"),
            Path::Index(parent, index) => write!(f, "{parent}[{index}]"),
        }
    }
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

/// Whether event properties are within every limit already, so that
/// `fit_event_properties` would change nothing: the plain statement of
/// what `members_fit` decides on text, which the tests hold it to.
#[cfg(test)]
pub fn fits(properties: &Map<String, Value>) -> bool {
    fn value_fits(value: &Value, depth: usize) -> bool {
        match value {
            Value::String(text) => text.len() <= limits::STRING_BYTES,
            Value::Array(items) => items.len() <= limits::ARRAY_ITEMS && items.iter().all(|i| value_fits(i, depth)),
            Value::Object(_) if depth >= limits::NESTING_DEPTH => false,
            Value::Object(object) => object.values().all(|v| value_fits(v, depth + 1)),
            _ => true,
        }
    }
    properties.len() <= limits::EVENT_PROPERTIES && properties.values().all(|v| value_fits(v, 1))
}

/// The same judgement as `fits`, made on the properties as sent, from
/// what one scan of them found (`ChordEvent::members`), without building
/// them: a large event (a 200 KB product list) then costs a read, not a
/// tree built, walked and printed again. A repeated top-level key, which a
/// tree would have collapsed, counts as not fitting, so that event takes
/// the tree path and is sent exactly as before.
pub fn members_fit(members: &[Member<'_>]) -> bool {
    members.len() <= limits::EVENT_PROPERTIES
        && members.iter().all(|m| {
            // Top-level values sit at depth 1; an object at depth d fits
            // while d < NESTING_DEPTH.
            m.shape.longest_string <= limits::STRING_BYTES
                && m.shape.most_items <= limits::ARRAY_ITEMS
                && m.shape.object_depth < limits::NESTING_DEPTH
        })
        && members
            .iter()
            .enumerate()
            .all(|(i, m)| members[..i].iter().all(|earlier| earlier.key != m.key))
}

/// An object whose values fit the string, array and depth limits. `depth`
/// is the nesting level of the object itself (a top-level object is 1).
pub fn fit_object(
    mut object: Map<String, Value>,
    path: &str,
    depth: usize,
    changes: &mut Changes,
) -> Map<String, Value> {
    fit_members(&mut object, &Path::Root(path), depth, changes);
    object
}

/// Fits an object's values in place.
fn fit_members(object: &mut Map<String, Value>, path: &Path<'_>, depth: usize, changes: &mut Changes) {
    for (key, value) in object.iter_mut() {
        fit_value(value, &Path::Key(path, key), depth, changes);
    }
}

/// `depth` is the nesting level of the object holding this value.
fn fit_value(value: &mut Value, path: &Path<'_>, depth: usize, changes: &mut Changes) {
    match value {
        Value::String(text) => fit_string(text, path, changes),
        Value::Array(items) => {
            if items.len() > limits::ARRAY_ITEMS {
                items.truncate(limits::ARRAY_ITEMS);
                changes.cut.push(path.to_string());
            }
            for (i, item) in items.iter_mut().enumerate() {
                fit_value(item, &Path::Index(path, i), depth, changes);
            }
        }
        Value::Object(object) if depth >= limits::NESTING_DEPTH => {
            changes.flattened.push(path.to_string());
            let mut text = Value::Object(std::mem::take(object)).to_string();
            fit_string(&mut text, path, changes);
            *value = Value::String(text);
        }
        Value::Object(object) => fit_members(object, path, depth + 1, changes),
        _ => {}
    }
}

fn fit_string(text: &mut String, path: &Path<'_>, changes: &mut Changes) {
    if text.len() > limits::STRING_BYTES {
        let mut end = limits::STRING_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        changes.truncated.push(path.to_string());
    }
}

/// Serialised size of a JSON value, in bytes (counted, not built).
pub fn json_size(value: &impl serde::Serialize) -> usize {
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
    use crate::event::ChordEvent;
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

    /// `members_fit` on properties as an event carries them, through the
    /// one scan that reads the event (or serde_json's path, when that
    /// decides); `Err` when serde_json would not read them.
    fn scanned_fits(properties: &str) -> Result<bool, String> {
        let text = format!(r#"{{"type": "track", "properties": {properties}}}"#);
        let event = ChordEvent::parse(&text).unwrap();
        let members = event.members();
        match &members.unreadable {
            Some(why) => Err(why.clone()),
            None => Ok(members_fit(&members.members)),
        }
    }

    #[test]
    fn repeated_keys_and_unreadable_text_take_the_tree_path() {
        assert!(!scanned_fits(r#"{"a": 1, "a": 2}"#).unwrap(), "a repeated key");
        assert!(
            !scanned_fits(r#"{"ab": 1, "a\u0062": 2}"#).unwrap(),
            "a key repeated with an escape"
        );
        assert!(
            scanned_fits(r#"{"a\u0062": {"a": 1}, "ab2": [1]}"#).unwrap(),
            "escaped keys"
        );
        let surrogate = scanned_fits(r#"{"s": "\ud800"}"#).unwrap_err();
        assert!(surrogate.contains("escape"), "a lone surrogate: {surrogate}");
        let range = scanned_fits(r#"{"n": 1e999}"#).unwrap_err();
        assert!(range.contains("out of range"), "a number out of range: {range}");
    }

    #[test]
    fn fits_is_true_exactly_when_fitting_changes_nothing() {
        let mut deep = json!({"leaf": 1});
        for _ in 0..12 {
            deep = json!({ "n": deep });
        }
        let mut nine = json!({"leaf": 1});
        for _ in 0..8 {
            nine = json!({ "n": nine });
        }
        let ten = json!({ "n": nine });
        let many: Map<String, Value> = (0..401).map(|i| (format!("p{i:03}"), json!(i))).collect();
        let exactly: Map<String, Value> = (0..400).map(|i| (format!("p{i:03}"), json!(i))).collect();
        for (properties, fitting) in [
            (
                json!({"a": "x", "n": 1.5, "list": [1, {"b": [true]}], "o": {"p": null}}),
                true,
            ),
            (json!({ "nine": nine }), true),
            (json!({ "deep": deep }), false),
            (json!({"note": "x".repeat(limits::STRING_BYTES + 1)}), false),
            (json!({"ids": vec![1; limits::ARRAY_ITEMS + 1]}), false),
            (Value::Object(many), false),
            (Value::Object(exactly), true),
            (json!({"note": "x".repeat(limits::STRING_BYTES)}), true),
            // Escapes count as what they decode to.
            (json!({"note": "\n".repeat(limits::STRING_BYTES)}), true),
            (json!({"note": "é".repeat(limits::STRING_BYTES / 2 + 1)}), false),
            (json!({"ids": vec![1; limits::ARRAY_ITEMS]}), true),
            // Arrays do not count as nesting; objects in them do.
            (json!({"ids": [[ten]]}), false),
            (json!({"ids": [[nine]]}), true),
        ] {
            let map = properties.as_object().unwrap();
            let (fitted, warnings) = fit(properties.clone());
            assert_eq!(fits(map), fitting, "{properties:.80}");
            assert_eq!(
                scanned_fits(&properties.to_string()),
                Ok(fitting),
                "as sent: {properties:.80}"
            );
            assert_eq!(warnings.is_empty() && fitted == properties, fitting, "{properties:.80}");
        }
    }

    #[test]
    fn long_arrays_are_cut() {
        let (fitted, warnings) = fit(json!({"ids": vec![1; 4_100]}));
        assert_eq!(fitted["ids"].as_array().unwrap().len(), limits::ARRAY_ITEMS);
        assert_eq!(warnings, ["properties.ids: cut to 4000 items"]);
    }
}
