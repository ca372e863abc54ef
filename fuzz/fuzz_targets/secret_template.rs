//! The secret-placeholder grammar on any header value: splitting never
//! panics and loses nothing (the segments put back together are the
//! value), rendering fills exactly the placeholders `references` names,
//! and text outside placeholders is never changed.

#![no_main]

use libfuzzer_sys::fuzz_target;
use plugin_runtime::template::{Segment, references, render, segments};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else { return };
    let mut rebuilt = String::new();
    let mut names = Vec::new();
    for segment in segments(value) {
        match segment {
            Segment::Text(text) => {
                assert!(!text.is_empty(), "an empty text segment");
                rebuilt.push_str(text);
            }
            Segment::Secret(name) => {
                rebuilt.push_str("{{secret:");
                rebuilt.push_str(name);
                rebuilt.push_str("}}");
                names.push(name);
            }
        }
    }
    assert_eq!(rebuilt, value, "the segments are the value");
    assert_eq!(references(value).collect::<Vec<_>>(), names);

    // Filled with a marker, every placeholder and only those are replaced.
    let mut asked = Vec::new();
    let filled = render(value, |name| {
        asked.push(name.to_string());
        Ok::<_, ()>("\u{1}")
    })
    .unwrap();
    assert_eq!(asked, names);
    let texts: String = segments(value)
        .map(|segment| match segment {
            Segment::Text(text) => text,
            Segment::Secret(_) => "\u{1}",
        })
        .collect();
    assert_eq!(filled, texts);
    // A failing fill stops at the first placeholder and fills nothing.
    assert_eq!(render(value, |_| Err(())).is_err(), !names.is_empty());
});
