//! Who an event is about, as Klaviyo identifies people: a usable email
//! and/or an E.164 phone number. Chord puts them in `traits` (identify),
//! `context.traits` (copied into browser calls) and `properties` (server
//! events such as Order Completed); the first usable one wins, in that order.

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::event::ChordEvent;
use crate::klaviyo::limits;
use crate::phone;
use crate::settings::Settings;

/// The identifiers found, with what could not be used.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub email: Option<String>,
    /// E.164.
    pub phone: Option<String>,
    /// A phone number that could not be made E.164, kept so that nothing
    /// the shop sent is lost (sent as the custom property `phone_raw`).
    pub phone_raw: Option<String>,
}

impl Identity {
    pub fn resolve(event: &ChordEvent, settings: &Settings, warnings: &mut Vec<String>) -> Identity {
        let sources = sources(event);
        let mut identity = Identity::default();

        for (source, map) in &sources {
            let Some(raw) = text(map.get("email")) else { continue };
            match usable_email(&raw) {
                Some(email) => {
                    identity.email = Some(email);
                    break;
                }
                None => warnings.push(format!(
                    "{source}.email {raw:?} is not a usable email address (local@domain, at most {} characters); it is not sent",
                    limits::EMAIL_CHARS
                )),
            }
        }

        // Worked out only when there is a number to read.
        let mut countries: Option<Vec<String>> = None;
        let mut unusable = None;
        'found: for (source, map) in &sources {
            for key in ["phone", "phone_number"] {
                let Some(raw) = text(map.get(key)) else { continue };
                let countries = countries.get_or_insert_with(|| self::countries(event, settings));
                match phone::to_e164(&raw, countries) {
                    Some(e164) => {
                        identity.phone = Some(e164);
                        break 'found;
                    }
                    None => {
                        if unusable.is_none() {
                            unusable = Some((format!("{source}.{key}"), raw));
                        }
                    }
                }
            }
        }
        if identity.phone.is_none()
            && let Some((field, raw)) = unusable
        {
            let countries = countries.unwrap_or_default();
            let known = if countries.is_empty() {
                "no country is known for it (set default_country)".to_string()
            } else {
                format!("read as a number of {}", countries.join(", then "))
            };
            warnings.push(format!(
                "{field} {raw:?} is not a valid phone number ({known}); it is not used as phone_number, and is kept as the profile property phone_raw when the event is sent"
            ));
            identity.phone_raw = Some(raw);
        }
        identity
    }

    /// The key the host orders a person's requests by.
    pub fn ordering_key(&self) -> Option<String> {
        match (&self.email, &self.phone) {
            (Some(email), _) => Some(format!("email:{}", email.to_lowercase())),
            (None, Some(phone)) => Some(format!("phone:{phone}")),
            (None, None) => None,
        }
    }
}

/// Where identifiers may live, in order of precedence. Of `properties`,
/// only the identifier members are read (it can be hundreds of KB).
fn sources<'e>(event: &'e ChordEvent<'_>) -> Vec<(&'static str, Cow<'e, Map<String, Value>>)> {
    let properties = event.properties_subset(&["email", "phone", "phone_number"]);
    [
        ("traits", event.traits().map(Cow::Borrowed)),
        ("context.traits", event.context_traits().map(Cow::Borrowed)),
        ("properties", (!properties.is_empty()).then_some(Cow::Owned(properties))),
    ]
    .into_iter()
    .filter_map(|(name, map)| map.map(|m| (name, m)))
    .collect()
}

/// The countries to read a national phone number in, best first: the
/// person's address, the IP's country, the locale's region, the setting.
pub fn countries(event: &ChordEvent, settings: &Settings) -> Vec<String> {
    let mut candidates: Vec<String> = Vec::new();
    for traits in [event.traits(), event.context_traits()].into_iter().flatten() {
        if let Some(country) = traits.get("address").and_then(|a| a.get("country")) {
            candidates.extend(text(Some(country)));
        }
        candidates.extend(text(traits.get("country")));
    }
    candidates.extend(text(event.context_value(&["geo", "country", "code"])));
    if let Some(locale) = text(event.context_value(&["locale"])) {
        candidates.extend(locale_region(&locale));
    }
    candidates.extend(settings.default_country.clone());

    let mut regions: Vec<String> = Vec::new();
    for region in candidates.iter().filter_map(|c| phone::region(c)) {
        if !regions.contains(&region) {
            regions.push(region);
        }
    }
    regions
}

/// The region of a BCP 47 locale: "en-US" and "en_US" give "US".
fn locale_region(locale: &str) -> Option<String> {
    locale
        .split(['-', '_'])
        .skip(1)
        .find(|part| part.len() == 2 && part.chars().all(|c| c.is_ascii_alphabetic()))
        .map(str::to_string)
}

/// A plausible email: trimmed, `local@domain.tld`, no spaces, at most 100
/// characters. Anything else is treated as missing.
pub fn usable_email(raw: &str) -> Option<String> {
    let email = raw.trim();
    if email.is_empty() || email.chars().count() > limits::EMAIL_CHARS {
        return None;
    }
    let (local, domain) = email.rsplit_once('@')?;
    let plausible = !local.is_empty()
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
        && !domain.contains('@');
    plausible.then(|| email.to_string())
}

/// Non-blank text from a string or number value.
fn text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(event: &str, settings: &Settings) -> (Identity, Vec<String>) {
        let event = ChordEvent::parse(event).unwrap();
        let mut warnings = Vec::new();
        (Identity::resolve(&event, settings, &mut warnings), warnings)
    }

    #[test]
    fn traits_win_over_context_traits_and_properties() {
        let (id, _) = resolve(
            r#"{"traits":{"email":"a@x.com"},"context":{"traits":{"email":"b@x.com"}},"properties":{"email":"c@x.com"}}"#,
            &Settings::default(),
        );
        assert_eq!(id.email.as_deref(), Some("a@x.com"));
    }

    #[test]
    fn an_unusable_email_falls_through_to_the_next_source() {
        let (id, warnings) = resolve(
            r#"{"traits":{"email":"not an email"},"properties":{"email":" c@x.com "}}"#,
            &Settings::default(),
        );
        assert_eq!(id.email.as_deref(), Some("c@x.com"));
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("traits.email"));
    }

    #[test]
    fn a_national_phone_is_read_in_the_address_country() {
        let (id, _) = resolve(
            r#"{"traits":{"phone":"020 7946 0018","address":{"country":"GB"}}}"#,
            &Settings::default(),
        );
        assert_eq!(id.phone.as_deref(), Some("+442079460018"));
    }

    #[test]
    fn the_locale_region_is_a_fallback_country() {
        let (id, _) = resolve(
            r#"{"properties":{"phone_number":"(617) 555-0177"},"context":{"locale":"en-US"}}"#,
            &Settings::default(),
        );
        assert_eq!(id.phone.as_deref(), Some("+16175550177"));
    }

    #[test]
    fn an_invalid_phone_is_kept_raw_with_a_warning() {
        let (id, warnings) = resolve(
            r#"{"properties":{"phone":"1234567890"}}"#,
            &Settings {
                default_country: Some("US".into()),
                ..Settings::default()
            },
        );
        assert_eq!(id.phone, None);
        assert_eq!(id.phone_raw.as_deref(), Some("1234567890"));
        assert!(warnings[0].contains("phone_raw"), "{warnings:?}");
    }

    #[test]
    fn emails_are_checked_for_shape_and_length() {
        assert_eq!(usable_email(" ada@example.com ").as_deref(), Some("ada@example.com"));
        for bad in ["ada", "ada@", "@x.com", "ada@localhost", "a b@x.com", "a@x..com"] {
            assert_eq!(usable_email(bad), None, "{bad}");
        }
        let long = format!("{}@example.com", "a".repeat(90));
        assert_eq!(usable_email(&long), None);
    }
}
