//! The Klaviyo destination of the Chord CDP: Chord events in, Klaviyo API
//! request descriptors out. Pure functions of their arguments; no network,
//! clock or files, so the same code runs natively under `cargo test` and
//! inside the sandboxed WebAssembly component the host loads.
//!
//! Chord's rules: every `track` goes to the Events API under its own name;
//! `identify` upserts the profile; only events carrying an email or phone
//! number are sent; page views are not passed through.

pub mod arena;
mod bulk;
pub mod contract;
mod event;
mod identify;
mod identity;
mod interpret;
pub mod klaviyo;
mod limits;
mod phone;
mod profile;
mod request;
mod settings;
mod time;
mod track;

#[cfg(target_arch = "wasm32")]
mod component;

use std::cell::RefCell;
use std::rc::Rc;

use contract::{
    BatchClass, BatchItem, BatchVerdict, Manifest, Mapping, Outcome, Request, Response, SettingError, Verdict,
};
use event::{ChordEvent, Kind};
use settings::Settings;

/// The plugin's version: the crate's, unless a build names itself (e.g.
/// `1.0.0+canary`, semver build metadata) through `KLAVIYO_PLUGIN_VERSION`.
const VERSION: &str = match option_env!("KLAVIYO_PLUGIN_VERSION") {
    Some(version) => version,
    None => env!("CARGO_PKG_VERSION"),
};

/// Who this plugin is and what it may do.
pub fn manifest() -> Manifest {
    Manifest {
        name: "klaviyo",
        version: VERSION,
        api_revision: klaviyo::REVISION,
        allowed_hosts: vec![klaviyo::HOST],
        rate_classes: vec![
            klaviyo::EVENTS_RATE,
            klaviyo::PROFILES_RATE,
            klaviyo::BULK_EVENTS_RATE,
            klaviyo::BULK_PROFILES_RATE,
            klaviyo::BULK_JOBS_RATE,
        ],
        settings: settings::specs(),
    }
}

/// The rules by which an event is skipped, each as its code (a metric's
/// label in the host) and the beginning of its reason; every skip reason
/// begins with one of these (a test checks that each skip of the cases
/// has a code).
pub const SKIP_RULES: &[(&str, &str)] = &[
    ("no_email_or_phone", NO_EMAIL_OR_PHONE),
    ("page_view", PAGE_VIEWS),
    ("group_call", GROUP_CALLS),
    ("alias_call", ALIAS_CALLS),
    ("skip_events_setting", SKIP_EVENTS_SETTING),
];

pub(crate) const NO_EMAIL_OR_PHONE: &str = "no email or phone number";
const PAGE_VIEWS: &str = "page views are not passed through";
const GROUP_CALLS: &str = "group calls are not sent";
const ALIAS_CALLS: &str = "alias calls are not sent";
pub(crate) const SKIP_EVENTS_SETTING: &str = "listed in the skip_events setting";

/// Checks a settings JSON object.
pub fn validate_settings(settings: &str) -> Result<(), Vec<SettingError>> {
    settings::parse(settings).map(|_| ())
}

/// Maps one Chord event to Klaviyo requests.
pub fn map(settings: &str, event: &str, now_unix_ms: i64) -> Mapping {
    let mut warnings = Vec::new();
    let (outcome, ordering_key) = map_event(settings, event, now_unix_ms, &mut warnings);
    Mapping {
        outcome,
        warnings,
        ordering_key,
    }
}

fn map_event(settings: &str, event: &str, now_unix_ms: i64, warnings: &mut Vec<String>) -> (Outcome, Option<String>) {
    let settings = match parsed_settings(settings) {
        Ok(settings) => settings,
        Err(errors) => {
            let problems: Vec<String> = errors.iter().map(|e| format!("{}: {}", e.name, e.reason)).collect();
            return (
                Outcome::Error(format!("invalid settings: {}", problems.join("; "))),
                None,
            );
        }
    };
    let event = match ChordEvent::parse(event) {
        Ok(event) => event,
        Err(reason) => return (Outcome::Error(reason), None),
    };
    match event.kind() {
        Err(reason) => (Outcome::Error(reason), None),
        Ok(Kind::Track) => track::map(&event, &settings, now_unix_ms, warnings),
        Ok(Kind::Identify) => identify::map(&event, &settings, warnings),
        Ok(Kind::Page | Kind::Screen) => (Outcome::Skip(PAGE_VIEWS.to_string()), None),
        Ok(Kind::Group) => (
            Outcome::Skip(format!(
                "{GROUP_CALLS}: Klaviyo has no accounts or groups to put them in"
            )),
            None,
        ),
        Ok(Kind::Alias) => (
            Outcome::Skip(format!(
                "{ALIAS_CALLS}: Klaviyo merges profiles by email and phone, not by alias"
            )),
            None,
        ),
    }
}

thread_local! {
    /// The settings parsed last, with their text. A host passes the same
    /// settings with every event of a destination, so they are parsed once,
    /// not per event; the result is what parsing the text again would give.
    static LAST_SETTINGS: RefCell<Option<(String, Rc<Settings>)>> = const { RefCell::new(None) };
}

fn parsed_settings(text: &str) -> Result<Rc<Settings>, Vec<SettingError>> {
    // Kept between calls: allocated outside the call's arena.
    arena::persistent(|| parsed_settings_kept(text))
}

fn parsed_settings_kept(text: &str) -> Result<Rc<Settings>, Vec<SettingError>> {
    LAST_SETTINGS.with_borrow_mut(|last| {
        if let Some((last_text, settings)) = last.as_ref()
            && last_text == text
        {
            return Ok(settings.clone());
        }
        let settings = Rc::new(settings::parse(text)?);
        *last = Some((text.to_string(), settings.clone()));
        Ok(settings)
    })
}

/// Judges the response one of this plugin's requests received.
pub fn interpret(_settings: &str, request: &Request, response: &Response) -> Verdict {
    interpret::interpret(request, response)
}

/// The batch classes these settings allow (none when they do not parse:
/// then nothing is batched, and mapping reports the settings' errors).
pub fn batch_classes(settings: &str) -> Vec<BatchClass> {
    parsed_settings(settings).map(|s| bulk::classes(&s)).unwrap_or_default()
}

/// Whether a mapped request may go in a batch, and as what.
pub fn batchable(settings: &str, request: &Request) -> Option<BatchItem> {
    bulk::batchable(&*parsed_settings(settings).ok()?, request)
}

/// One bulk request carrying `items` of `class`.
pub fn assemble(settings: &str, class: &str, items: &[String]) -> Result<Request, String> {
    let settings = parsed_settings(settings).map_err(|_| "the settings are not valid".to_string())?;
    bulk::assemble(&settings, class, items)
}

/// Judges a bulk request's (or a follow-up's) response per item.
pub fn judge(_settings: &str, class: &str, items: &[String], request: &Request, response: &Response) -> BatchVerdict {
    bulk::judge(class, items, request, response)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every rule by which an event is skipped has its code: a skip with no
    /// code would be counted as `other` in the host's metrics.
    #[test]
    fn every_skip_reason_has_a_code() {
        let settings = r#"{"skip_events": ["Ignored Event"]}"#;
        let events = [
            r#"{"type": "page", "messageId": "m1", "properties": {"email": "a@example.org"}}"#,
            r#"{"type": "screen", "messageId": "m2"}"#,
            r#"{"type": "group", "messageId": "m3", "groupId": "g"}"#,
            r#"{"type": "alias", "messageId": "m4", "userId": "u", "previousId": "p"}"#,
            r#"{"type": "track", "messageId": "m5", "event": "Viewed"}"#,
            r#"{"type": "identify", "messageId": "m6", "userId": "u", "traits": {"name": "x"}}"#,
            r#"{"type": "track", "messageId": "m7", "event": "Ignored Event", "properties": {"email": "a@example.org"}}"#,
        ];
        let mut codes = Vec::new();
        for event in events {
            let Outcome::Skip(reason) = map(settings, event, 1_700_000_000_000).outcome else {
                panic!("{event} was not skipped");
            };
            // The host's rule (`Plugin::skip_code`): the first prefix that
            // begins the reason.
            let code = SKIP_RULES
                .iter()
                .find(|(_, prefix)| reason.starts_with(prefix))
                .map(|(code, _)| *code);
            codes.push(code.unwrap_or_else(|| panic!("no code for {reason:?}")));
        }
        codes.dedup();
        let declared: Vec<&str> = SKIP_RULES.iter().map(|(code, _)| *code).collect();
        let mut seen = codes.clone();
        seen.sort();
        let mut all = declared.clone();
        all.sort();
        assert_eq!(seen, all, "each declared code is used by some rule");
    }
}
