//! `identify` -> Klaviyo Create or Update Profile (`POST /api/profile-import`),
//! an upsert keyed on email or phone.

use serde_json::Value;

use crate::contract::Outcome;
use crate::event::ChordEvent;
use crate::identity::Identity;
use crate::klaviyo::{self, limits};
use crate::limits::{Changes, fit_object, json_size};
use crate::profile::{self, Scope};
use crate::request;
use crate::settings::Settings;
use crate::track::event_hash;

pub fn map(event: &ChordEvent, settings: &Settings, warnings: &mut Vec<String>) -> (Outcome, Option<String>) {
    let identity = Identity::resolve(event, settings, warnings);
    let ordering_key = identity.ordering_key();
    if ordering_key.is_none() {
        return (
            Outcome::Skip(format!(
                "{}: Chord sends Klaviyo only profiles that carry one",
                crate::NO_EMAIL_OR_PHONE
            )),
            None,
        );
    }
    let mut attributes = profile::attributes(event, &identity, Scope::Full, warnings);
    if let Some(Value::Object(properties)) = attributes.remove("properties") {
        let mut changes = Changes::default();
        let properties = fit_object(properties, "traits", 1, &mut changes);
        changes.into_warnings(warnings);
        attributes.insert("properties".into(), Value::Object(properties));
    }
    let mut body = request::resource("profile", attributes);
    if let Err(reason) = fit_profile_import(&mut body, warnings) {
        return (Outcome::Error(reason), ordering_key);
    }
    let key = format!(
        "profile-import:{}",
        event.message_id().unwrap_or_else(|| event_hash(event))
    );
    let request = request::post(
        klaviyo::PROFILE_IMPORT_PATH,
        &body,
        key,
        &klaviyo::PROFILES_RATE,
        settings,
    );
    (Outcome::Send(vec![request]), ordering_key)
}

/// Keeps the body within Klaviyo's 100 KB profile limit by dropping the
/// largest custom properties first, each named in a warning.
fn fit_profile_import(body: &mut Value, warnings: &mut Vec<String>) -> Result<(), String> {
    while json_size(body) > limits::PROFILE_IMPORT_BYTES {
        let properties = body["data"]["attributes"]
            .get_mut("properties")
            .and_then(Value::as_object_mut)
            .filter(|p| !p.is_empty());
        let Some(properties) = properties else {
            return Err(format!(
                "the profile is over Klaviyo's {} byte limit even without custom properties",
                limits::PROFILE_IMPORT_BYTES
            ));
        };
        let largest = properties
            .iter()
            .max_by_key(|(key, value)| (json_size(value), std::cmp::Reverse((*key).clone())))
            .map(|(key, _)| key.clone())
            .expect("not empty");
        properties.remove(&largest);
        warnings.push(format!(
            "traits.{largest} dropped: the profile is over Klaviyo's {} byte limit",
            limits::PROFILE_IMPORT_BYTES
        ));
    }
    Ok(())
}
