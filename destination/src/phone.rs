//! Phone numbers to E.164, the only form Klaviyo accepts, using a port of
//! Google's libphonenumber. A number written without `+country` is read in
//! the first country the event tells us (see `identity::countries`).

use phonenumber::{Mode, country};

/// Normalises `raw` to E.164, reading a national number in each of
/// `countries` in turn. `None` when no reading gives a valid number.
pub fn to_e164(raw: &str, countries: &[String]) -> Option<String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return None;
    }
    let international = raw.starts_with('+') || raw.starts_with("00");
    if international {
        return valid_e164(None, raw);
    }
    countries.iter().find_map(|code| {
        let id = code.parse::<country::Id>().ok()?;
        valid_e164(Some(id), raw)
    })
}

fn valid_e164(country: Option<country::Id>, raw: &str) -> Option<String> {
    let number = phonenumber::parse(country, raw).ok()?;
    phonenumber::is_valid(&number).then(|| number.format().mode(Mode::E164).to_string())
}

/// The ISO 3166 alpha-2 code for a country as events write it: a code in
/// any case ("us"), or a few common long forms ("USA", "United States").
/// Only regions libphonenumber knows are returned.
pub fn region(text: &str) -> Option<String> {
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
    code.parse::<country::Id>().ok().map(|_| code)
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
