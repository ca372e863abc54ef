//! Segment-spec traits to Klaviyo profile attributes, shared by
//! `identify` (profile-import) and by the profile inside every event.
//!
//! Traits are read from `traits`, then `context.traits`; the first source
//! that has a field decides it. A trait present as `null` clears the
//! Klaviyo field (profile-import sends `null`), an absent one leaves it as
//! it is. Traits that are not standard attributes become custom profile
//! properties under their own names.

use std::sync::LazyLock;

use serde_json::{Map, Value, json};

use crate::event::ChordEvent;
use crate::identity::Identity;
use crate::klaviyo::limits;

/// A standard attribute and the trait spellings it is read from. A
/// spelling `a.b` is the key `b` of the object trait `a`.
struct Attribute {
    klaviyo: &'static str,
    traits: &'static [&'static str],
}

const NAMES: &[Attribute] = &[
    Attribute {
        klaviyo: "first_name",
        traits: &["firstName", "first_name", "firstname"],
    },
    Attribute {
        klaviyo: "last_name",
        traits: &["lastName", "last_name", "lastname"],
    },
];

const ATTRIBUTES: &[Attribute] = &[
    Attribute {
        klaviyo: "title",
        traits: &["title"],
    },
    Attribute {
        klaviyo: "organization",
        traits: &["company.name", "company", "organization"],
    },
    Attribute {
        klaviyo: "image",
        traits: &["avatar", "image"],
    },
    Attribute {
        klaviyo: "locale",
        traits: &["locale"],
    },
];

const LOCATION: &[Attribute] = &[
    Attribute {
        klaviyo: "address1",
        traits: &["address.street", "address.address1", "street", "address1"],
    },
    Attribute {
        klaviyo: "address2",
        traits: &["address.address2", "address2"],
    },
    Attribute {
        klaviyo: "city",
        traits: &["address.city", "city"],
    },
    Attribute {
        klaviyo: "region",
        traits: &["address.state", "address.region", "state", "region"],
    },
    Attribute {
        klaviyo: "zip",
        traits: &[
            "address.postalCode",
            "address.postal_code",
            "address.zip",
            "postalCode",
            "postal_code",
            "zip",
        ],
    },
    Attribute {
        klaviyo: "country",
        traits: &["address.country", "country"],
    },
    Attribute {
        klaviyo: "timezone",
        traits: &["timezone"],
    },
];

/// Trait keys that are identifiers, mapped elsewhere, never custom properties.
const IDENTIFIER_TRAITS: &[&str] = &["email", "phone", "phone_number", "name"];

/// A standard value as found: a value to set, or an explicit clear.
enum Found {
    Set(Value),
    Clear,
}

/// How much of the traits to map.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything, with explicit clears: the profile-import body.
    Full,
    /// Standard attributes only, from `context.traits`, no clears: the
    /// profile inside an event (Chord's rule 6).
    EventProfile,
}

/// The profile attributes object for Klaviyo.
pub fn attributes(
    event: &ChordEvent,
    identity: &Identity,
    scope: Scope,
    warnings: &mut Vec<String>,
) -> Map<String, Value> {
    let maps: Vec<&Map<String, Value>> = match scope {
        Scope::Full => [event.traits(), event.context_traits()].into_iter().flatten().collect(),
        Scope::EventProfile => event.context_traits().into_iter().collect(),
    };
    let sources: Vec<Source<'_>> = maps.iter().map(|map| Source::new(map)).collect();
    let mut out = Map::new();
    if let Some(email) = &identity.email {
        out.insert("email".into(), json!(email));
    }
    if let Some(phone) = &identity.phone {
        out.insert("phone_number".into(), json!(phone));
    }
    match event.user_id() {
        Some(user_id) if user_id.chars().count() > limits::ID_CHARS => warnings.push(format!(
            "userId is longer than {} characters, Klaviyo's limit for external_id; external_id is left out",
            limits::ID_CHARS
        )),
        Some(user_id) => {
            out.insert("external_id".into(), json!(user_id));
        }
        None => {}
    }

    let put = |out: &mut Map<String, Value>, key: &str, found: Option<Found>| match found {
        Some(Found::Set(value)) => {
            out.insert(key.to_string(), value);
        }
        Some(Found::Clear) if scope == Scope::Full => {
            out.insert(key.to_string(), Value::Null);
        }
        _ => {}
    };

    for attribute in NAMES.iter().chain(ATTRIBUTES) {
        put(&mut out, attribute.klaviyo, find(&sources, attribute.traits));
    }
    if scope == Scope::Full
        && !out.contains_key("locale")
        && let Some(locale) = event.context_value(&["locale"]).and_then(Value::as_str)
    {
        out.insert("locale".into(), json!(locale));
    }
    split_name(&sources, &mut out);

    let mut location = Map::new();
    for attribute in LOCATION {
        put(&mut location, attribute.klaviyo, find(&sources, attribute.traits));
    }
    if scope == Scope::Full {
        context_location(event, &mut location);
    }
    if !location.is_empty() {
        out.insert("location".into(), Value::Object(location));
    }

    if scope == Scope::Full {
        let mut properties = custom_properties(&maps);
        if let Some(raw) = &identity.phone_raw {
            properties.insert("phone_raw".into(), json!(raw));
        }
        if !properties.is_empty() {
            out.insert("properties".into(), Value::Object(properties));
        }
    } else if let Some(raw) = &identity.phone_raw {
        out.insert("properties".into(), json!({ "phone_raw": raw }));
    }
    out
}

/// What the event's context says of where the person is: the timezone,
/// the IP address and coordinates. Only for identify: on a server-to-server
/// event the request IP is the sender's server, not the shopper.
fn context_location(event: &ChordEvent, location: &mut Map<String, Value>) {
    if !location.contains_key("timezone")
        && let Some(tz) = event.context_value(&["timezone"]).and_then(Value::as_str)
    {
        location.insert("timezone".into(), json!(tz));
    }
    let ip = event
        .context_value(&["ip"])
        .or_else(|| event.request_ip())
        .and_then(Value::as_str);
    if let Some(ip) = ip {
        location.insert("ip".into(), json!(ip));
    }
    let coordinates = event
        .context_value(&["geo", "location"])
        .or_else(|| event.context_value(&["location"]));
    if let Some(coordinates) = coordinates {
        for key in ["latitude", "longitude"] {
            if let Some(value) = coordinates.get(key).filter(|v| v.is_number() || v.is_string()) {
                location.insert(key.into(), value.clone());
            }
        }
    }
}

/// The first source that has any of `spellings` decides the value. A
/// string-valued `company` is the organization; an object `company` is
/// read through `company.name`.
fn find(sources: &[Source<'_>], spellings: &[&str]) -> Option<Found> {
    for source in sources {
        for spelling in spellings {
            let value = match split_spelling(spelling) {
                Some((object, key)) => source.get(object).and_then(Value::as_object).and_then(|o| o.get(key)),
                None => source.get(spelling),
            };
            match value {
                None => continue,
                Some(Value::Null) => return Some(Found::Clear),
                Some(Value::String(s)) if s.trim().is_empty() => continue,
                Some(Value::String(s)) => return Some(Found::Set(json!(s.trim()))),
                Some(Value::Number(n)) => return Some(Found::Set(json!(n.to_string()))),
                Some(_) => continue,
            }
        }
    }
    None
}

/// `name` fills `first_name` / `last_name` that no trait gave (the first
/// word, and the rest).
fn split_name(sources: &[Source<'_>], out: &mut Map<String, Value>) {
    let has = |out: &Map<String, Value>, key: &str| out.contains_key(key);
    if has(out, "first_name") && has(out, "last_name") {
        return;
    }
    let Some(Found::Set(Value::String(name))) = find(sources, &["name"]) else {
        return;
    };
    let mut words = name.split_whitespace();
    let first = words.next().map(str::to_string);
    let rest = words.collect::<Vec<_>>().join(" ");
    if !has(out, "first_name")
        && let Some(first) = first
    {
        out.insert("first_name".into(), json!(first));
    }
    if !has(out, "last_name") && !rest.is_empty() {
        out.insert("last_name".into(), json!(rest));
    }
}

/// Every trait that no standard attribute used, under its own key; traits
/// win over `context.traits`. An object trait partly used (an address
/// with extra keys, a company with more than a name) is kept whole.
fn custom_properties(sources: &[&Map<String, Value>]) -> Map<String, Value> {
    let mut properties = Map::new();
    for source in sources.iter().rev() {
        for (key, value) in source.iter() {
            if is_standard_trait(key) && !has_unused_keys(key, value) {
                continue;
            }
            properties.insert(key.clone(), value.clone());
        }
    }
    properties
}

/// Whether a top-level trait key feeds a standard attribute (for an
/// object trait like `address`, through one of its keys).
fn is_standard_trait(key: &str) -> bool {
    STANDARD_TRAITS.binary_search(&key).is_ok()
}

/// The top-level trait keys that identifiers and standard attributes are
/// read from, sorted.
/// Built in the first call that needs it and kept: allocated outside the
/// call's arena.
static STANDARD_TRAITS: LazyLock<Vec<&'static str>> = LazyLock::new(|| crate::arena::persistent(standard_traits));

fn standard_traits() -> Vec<&'static str> {
    let spellings = NAMES
        .iter()
        .chain(ATTRIBUTES)
        .chain(LOCATION)
        .flat_map(|a| a.traits.iter());
    let mut keys: Vec<&'static str> = IDENTIFIER_TRAITS
        .iter()
        .copied()
        .chain(spellings.map(|t| split_spelling(t).map_or(*t, |(object, _)| object)))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// A trait source reduced to the members that identifiers and standard
/// attributes are read from. Most traits are custom, and looking every
/// spelling up in the whole map was the largest single cost of a small
/// event's mapping inside the component.
struct Source<'a>(Vec<(&'a str, &'a Value)>);

impl<'a> Source<'a> {
    fn new(map: &'a Map<String, Value>) -> Source<'a> {
        Source(
            map.iter()
                .filter(|(key, _)| is_standard_trait(key))
                .map(|(key, value)| (key.as_str(), value))
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, value)| *value)
    }
}

/// `a.b` as `("a", "b")`. A byte scan: `split_once` goes through the
/// general pattern searcher, and this runs for every spelling of every
/// attribute of every event.
fn split_spelling(spelling: &str) -> Option<(&str, &str)> {
    let dot = spelling.bytes().position(|b| b == b'.')?;
    Some((&spelling[..dot], &spelling[dot + 1..]))
}

fn has_unused_keys(key: &str, value: &Value) -> bool {
    let Some(object) = value.as_object() else { return false };
    let used: Vec<&str> = NAMES
        .iter()
        .chain(ATTRIBUTES)
        .chain(LOCATION)
        .flat_map(|a| a.traits.iter())
        .filter_map(|t| split_spelling(t))
        .filter(|(object, _)| *object == key)
        .map(|(_, field)| field)
        .collect();
    object.keys().any(|k| !used.contains(&k.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Settings;

    fn full(event: &str) -> Value {
        let event = ChordEvent::parse(event).unwrap();
        let identity = Identity::resolve(&event, &Settings::default(), &mut Vec::new());
        Value::Object(attributes(&event, &identity, Scope::Full, &mut Vec::new()))
    }

    #[test]
    fn segment_address_keys_fill_the_location() {
        let p = full(
            r#"{"traits":{"email":"a@x.com","address":{"street":"1 Main St","city":"Boston","state":"MA","postalCode":"02110","country":"US"}}}"#,
        );
        assert_eq!(
            p["location"],
            json!({"address1":"1 Main St","city":"Boston","region":"MA","zip":"02110","country":"US"})
        );
        assert!(p.get("properties").is_none(), "address fully used: {p}");
    }

    #[test]
    fn name_is_split_only_into_absent_parts() {
        assert_eq!(
            full(r#"{"traits":{"name":"Ada King Lovelace"}}"#)["last_name"],
            json!("King Lovelace")
        );
        let p = full(r#"{"traits":{"name":"Ada Lovelace","firstName":"Augusta"}}"#);
        assert_eq!(
            (p["first_name"].clone(), p["last_name"].clone()),
            (json!("Augusta"), json!("Lovelace"))
        );
    }

    #[test]
    fn explicit_null_clears_and_absent_leaves_alone() {
        let p = full(r#"{"traits":{"email":"a@x.com","lastName":null,"address":{"city":null}}}"#);
        assert_eq!(p["last_name"], Value::Null);
        assert_eq!(p["location"]["city"], Value::Null);
        assert!(p.get("first_name").is_none());
    }

    #[test]
    fn company_name_is_the_organization_and_extra_company_keys_are_kept() {
        assert_eq!(full(r#"{"traits":{"company":"Acme"}}"#)["organization"], json!("Acme"));
        let p = full(r#"{"traits":{"company":{"name":"Acme","plan":"pro"}}}"#);
        assert_eq!(p["organization"], json!("Acme"));
        assert_eq!(p["properties"]["company"], json!({"name":"Acme","plan":"pro"}));
    }

    #[test]
    fn other_traits_are_custom_properties_with_traits_winning() {
        let p = full(r#"{"traits":{"gender":"f"},"context":{"traits":{"gender":"m","birthday":"1990-12-10"}}}"#);
        assert_eq!(p["properties"], json!({"gender":"f","birthday":"1990-12-10"}));
    }
}
