//! Phone numbers to E.164, the only form Klaviyo accepts, using
//! rlibphonenumber, a port of Google's libphonenumber (differentially
//! fuzzed against the C++ original). A number written without `+country`
//! is read in the first country the event tells us (see
//! `identity::countries`).

use std::cell::RefCell;
use std::collections::HashMap;

use rlibphonenumber::enums::Region;
use rlibphonenumber::{PHONE_NUMBER_UTIL, PhoneNumberFormat};

/// A number as written, and the countries it is read in.
type CacheKey = (String, Vec<String>);

/// Numbers remembered per instance (then forgotten all at once).
const CACHE_ENTRIES: usize = 4096;

thread_local! {
    /// Recent answers, by number and countries. A shopper's number comes
    /// with every event they send (`context.traits` carries it), and often
    /// twice in one event; libphonenumber's parse and validation run
    /// dozens of regexes, tens of microseconds in the component.
    static CACHE: RefCell<HashMap<CacheKey, Option<String>>> = RefCell::new(HashMap::new());
}

/// Normalises `raw` to E.164, reading a national number in each of
/// `countries` in turn. `None` when no reading gives a valid number.
pub fn to_e164(raw: &str, countries: &[String]) -> Option<String> {
    // The cache and libphonenumber's own lazily built state (metadata,
    // compiled regexes) are kept between calls: allocated outside the
    // call's arena.
    crate::arena::persistent(|| to_e164_kept(raw, countries))
}

fn to_e164_kept(raw: &str, countries: &[String]) -> Option<String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return None;
    }
    let key = (raw.to_string(), countries.to_vec());
    if let Some(known) = CACHE.with_borrow(|cache| cache.get(&key).cloned()) {
        return known;
    }
    let answer = parse_e164(raw, countries);
    CACHE.with_borrow_mut(|cache| {
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(key, answer.clone());
    });
    answer
}

fn parse_e164(raw: &str, countries: &[String]) -> Option<String> {
    let international = raw.starts_with('+') || raw.starts_with("00");
    if international {
        return valid_e164(None, raw);
    }
    countries
        .iter()
        .find_map(|code| valid_e164(Some(known_region(code)?), raw))
}

/// A region libphonenumber has numbering rules for.
fn known_region(code: &str) -> Option<Region> {
    let region = code.parse::<Region>().ok()?;
    PHONE_NUMBER_UTIL.get_country_code_for_region(region).map(|_| region)
}

fn valid_e164(region: Option<Region>, raw: &str) -> Option<String> {
    let number = PHONE_NUMBER_UTIL.parse(raw, region).ok()?;
    number
        .is_valid()
        .then(|| number.format_as(PhoneNumberFormat::E164).into_owned())
}

/// The ISO 3166 alpha-2 code for a country as events write it: a code in
/// any case ("us"), or a few common long forms ("USA", "United States").
/// Only regions libphonenumber knows are returned.
pub fn region(text: &str) -> Option<String> {
    // libphonenumber's lazily built state is kept between calls.
    crate::arena::persistent(|| region_kept(text))
}

fn region_kept(text: &str) -> Option<String> {
    let text = text.trim();
    let code = match text.to_ascii_uppercase().as_str() {
        "USA" | "UNITED STATES" | "UNITED STATES OF AMERICA" => "US".to_string(),
        "UK" | "UNITED KINGDOM" | "GREAT BRITAIN" => "GB".to_string(),
        "CANADA" => "CA".to_string(),
        "AUSTRALIA" => "AU".to_string(),
        "GERMANY" | "DEUTSCHLAND" => "DE".to_string(),
        "FRANCE" => "FR".to_string(),
        other if other.len() == 2 => other.to_string(),
        _ => return None,
    };
    known_region(&code).map(|_| code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us() -> Vec<String> {
        vec!["US".to_string()]
    }

    #[test]
    fn national_numbers_take_the_country_given() {
        assert_eq!(to_e164("(617) 555-0177", &us()).as_deref(), Some("+16175550177"));
        assert_eq!(
            to_e164("020 7946 0018", &["GB".to_string()]).as_deref(),
            Some("+442079460018")
        );
    }

    #[test]
    fn international_numbers_need_no_country() {
        assert_eq!(to_e164("+44 20 7946 0018", &[]).as_deref(), Some("+442079460018"));
        assert_eq!(to_e164("+1 617-555-0123", &[]).as_deref(), Some("+16175550123"));
    }

    #[test]
    fn unusable_numbers_are_none() {
        assert_eq!(to_e164("1234567890", &us()), None);
        assert_eq!(to_e164("(617) 555-0177", &[]), None);
        assert_eq!(to_e164("call me", &us()), None);
        assert_eq!(to_e164("", &us()), None);
    }

    #[test]
    fn regions_accept_codes_and_common_names() {
        assert_eq!(region("us").as_deref(), Some("US"));
        assert_eq!(region("United Kingdom").as_deref(), Some("GB"));
        assert_eq!(region("XX"), None);
        assert_eq!(region("Atlantis"), None);
    }
}
