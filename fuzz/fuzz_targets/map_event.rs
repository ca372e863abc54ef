//! The Klaviyo mapping, natively, on any bytes: it must never panic, and
//! whatever it sends must be JSON. Seeded with Chord-shaped events
//! (`fuzz/seeds/map_event`), so mutations start from real structure.

#![no_main]

use klaviyo_destination::contract::Outcome;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(event) = std::str::from_utf8(data) else { return };
    // serde_json with its `raw_value` feature (on here: the host's crates
    // enable it) reads an object whose key is this token as its private
    // marker and refuses the valid JSON around it; the mapping passes the
    // key through, rightly, so the check below has no verdict to give.
    if event.contains("$serde_json::private::RawValue") {
        return;
    }
    for settings in ["{}", r#"{"default_country":"GB","ordered_product_events":true}"#] {
        let mapping = klaviyo_destination::map(settings, event, 1_795_824_000_000);
        if let Outcome::Send(requests) = mapping.outcome {
            for request in requests {
                assert!(
                    serde_json::from_str::<serde_json::Value>(&request.body).is_ok(),
                    "a body that is not JSON: {}",
                    request.body
                );
            }
        }
    }
});
