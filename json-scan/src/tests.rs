//! The scanner against serde_json: the same verdicts on hand-picked edge
//! cases and on many thousands of generated and mutated texts.

use serde_json::Value;
use serde_json::value::RawValue;

use super::*;

/// serde_json's verdict when it skips or captures a value.
fn serde_skips(text: &str) -> bool {
    serde_json::from_str::<&RawValue>(text).is_ok()
}

/// serde_json's verdict when it reads a value into a tree.
fn serde_reads(text: &str) -> bool {
    serde_json::from_str::<Value>(text).is_ok()
}

fn strict_reads(text: &str) -> bool {
    let mut scanner = Scanner::new(text).strict(true);
    scanner.value().is_ok() && scanner.end().is_ok() && scanner.unreadable().is_none()
}

fn agree(text: &str) {
    assert_eq!(validate(text).is_ok(), serde_skips(text), "skipping {text:?}");
    assert_eq!(strict_reads(text), serde_reads(text), "reading {text:?}");
}

#[test]
fn edge_cases_are_judged_as_serde_json_judges_them() {
    for text in [
        "",
        " ",
        "{}",
        "[]",
        "[ ]",
        "{ }",
        "0",
        "-0",
        "00",
        "01",
        "-",
        "-a",
        "1.",
        "1.5",
        ".5",
        "1e",
        "1e+",
        "1e5",
        "1E-5",
        "1e+05",
        "-0.0e0",
        "1.5e999",
        "-1e999",
        "1e-999",
        "0e99999",
        "12345678901234567890123",
        "true",
        "false",
        "null",
        "tru",
        "nul",
        "truex",
        "True",
        "\"\"",
        "\"a\"",
        "\"a",
        "\"\\\"\"",
        "\"\\/\"",
        "\"\\x\"",
        "\"\\u12\"",
        "\"\\u12g4\"",
        "\"\\u00e9\"",
        "\"\\uD83C\\uDF3F\"",
        "\"\\uD83C\"",
        "\"\\uDF3F\"",
        "\"\\uD83C\\u0041\"",
        "\"\\uD83Cx\"",
        "\"tab\there\"",
        "\"nl\nhere\"",
        "\"é ✓ 🌿\"",
        "{\"a\":1}",
        "{\"a\" : 1 , \"b\" : [ 1 , 2 ] }",
        "{\"a\":1,}",
        "[1,]",
        "[,1]",
        "{,}",
        "{\"a\"}",
        "{\"a\":}",
        "{1:2}",
        "{\"a\":1 \"b\":2}",
        "[1 2]",
        "[1]]",
        "{\"a\":1}}",
        " [1] ",
        "[1]\n",
        "[1] x",
        "\t{\r\n\"k\"\t:\n\"v\"\r}",
        "\u{a0}1",
        "[\"\\u0000\"]",
        "{\"a\\u0062\":1}",
        "{\"\\uD800\":1}",
    ] {
        agree(text);
    }
    let long_integer = "9".repeat(400);
    agree(&long_integer);
    agree(&format!("[{long_integer}]"));
}

#[test]
fn nesting_past_the_limit_is_refused_and_below_it_accepted() {
    let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    assert!(validate(&nested(MAX_DEPTH - 1)).is_ok());
    assert!(validate(&nested(MAX_DEPTH)).is_err());
    assert!(
        validate(&nested(100_000)).is_err(),
        "deep text is refused, not a stack overflow"
    );
    // serde_json reading values has the same limit.
    assert_eq!(
        strict_reads(&nested(MAX_DEPTH - 1)),
        serde_reads(&nested(MAX_DEPTH - 1))
    );
    assert_eq!(strict_reads(&nested(MAX_DEPTH)), serde_reads(&nested(MAX_DEPTH)));
}

#[test]
fn strings_are_found_to_their_end_at_every_alignment() {
    // Specials at every offset of a 16-byte block, and in the tail.
    for length in 0..70 {
        for special in ["\\\"", "\\\\", "\\n", "\\u00e9", "é"] {
            for at in 0..=length {
                let mut body = "x".repeat(length);
                body.insert_str(at, special);
                agree(&format!("\"{body}\""));
                agree(&format!("[\"{body}\",1]"));
            }
        }
        for control in ["\u{1}", "\u{1f}", "\u{0}"] {
            let text = format!("\"{}{control}\"", "y".repeat(length));
            assert!(validate(&text).is_err(), "{text:?}");
        }
        // A string cut off at every length.
        assert!(validate(&format!("\"{}", "z".repeat(length))).is_err());
    }
}

#[test]
fn the_shape_measures_decoded_strings_arrays_and_object_nesting() {
    for text in [
        r#"{"a": "xyz", "b": [1, 2, 3, 4], "c": {"d": {"e": "\u00e9\n"}}}"#,
        r#"[[], [[1, 2]], {"k": [{"x": "\uD83C\uDF3F"}]}]"#,
        r#""plain""#,
        r#"{"long": "\\\\\\\\", "items": [{}, {}, {}]}"#,
        "{}",
    ] {
        let mut scanner = Scanner::new(text);
        let depth = scanner.value().unwrap();
        let shape = scanner.take_shape(depth);
        let tree: Value = serde_json::from_str(text).unwrap();
        assert_eq!(shape, tree_shape(&tree), "{text}");
    }
}

/// The shape of a tree, as a reference.
fn tree_shape(value: &Value) -> Shape {
    let mut shape = Shape::default();
    fn walk(value: &Value, shape: &mut Shape) -> usize {
        match value {
            Value::String(s) => {
                shape.longest_string = shape.longest_string.max(s.len());
                0
            }
            Value::Array(items) => {
                shape.most_items = shape.most_items.max(items.len());
                items.iter().map(|i| walk(i, shape)).max().unwrap_or(0)
            }
            Value::Object(members) => 1 + members.values().map(|v| walk(v, shape)).max().unwrap_or(0),
            _ => 0,
        }
    }
    shape.object_depth = walk(value, &mut shape);
    shape
}

#[test]
fn an_objects_keys_come_decoded_with_their_values_spans() {
    let text = r#"{"a": 1, "b\u0063": {"x": [true]}, "e" : "f" }"#;
    let mut scanner = Scanner::new(text);
    let mut seen = Vec::new();
    scanner
        .object(|key, scanner| {
            scanner.peek();
            let start = scanner.offset();
            scanner.value()?;
            seen.push((key.into_owned(), scanner.since(start).to_string()));
            Ok(())
        })
        .unwrap();
    scanner.end().unwrap();
    assert_eq!(
        seen,
        [
            ("a".into(), "1".into()),
            ("bc".into(), r#"{"x": [true]}"#.into()),
            ("e".into(), r#""f""#.into())
        ]
    );
}

/// A small deterministic generator (xorshift), so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn generate(rng: &mut Rng, depth: usize, out: &mut String) {
    let pick = if depth > 6 { rng.below(5) } else { rng.below(7) };
    match pick {
        0 => out.push_str(["true", "false", "null"][rng.below(3)]),
        1 => {
            let numbers = [
                "0",
                "-1",
                "12.5",
                "1e3",
                "-0.25E-2",
                "1e400",
                "123456789012345678901234",
                "7",
            ];
            out.push_str(numbers[rng.below(numbers.len())]);
        }
        2..=4 => {
            out.push('"');
            for _ in 0..rng.below(40) {
                let pieces = [
                    "a",
                    "b ",
                    "é",
                    "🌿",
                    "\\n",
                    "\\\"",
                    "\\\\",
                    "\\u00e9",
                    "\\uD83C\\uDF3F",
                    "\\uD800",
                    "/",
                ];
                out.push_str(pieces[rng.below(pieces.len())]);
            }
            out.push('"');
        }
        5 => {
            out.push('[');
            for i in 0..rng.below(5) {
                if i > 0 {
                    out.push_str([",", ", "][rng.below(2)]);
                }
                generate(rng, depth + 1, out);
            }
            out.push(']');
        }
        _ => {
            out.push('{');
            for i in 0..rng.below(5) {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(["\"k\"", "\"key\" ", "\"k\\u0031\""][rng.below(3)]);
                out.push(':');
                generate(rng, depth + 1, out);
            }
            out.push('}');
        }
    }
}

#[test]
fn generated_and_mutated_texts_are_judged_as_serde_json_judges_them() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mutations: [&str; 12] = ["", "\"", "\\", ",", ":", "{", "}", "[", "]", "\u{1}", "-", "e"];
    for _ in 0..20_000 {
        let mut text = String::new();
        generate(&mut rng, 0, &mut text);
        agree(&text);
        // One byte changed, dropped or added, on a character boundary.
        let mut mutated = text.clone();
        let mut at = rng.below(mutated.len() + 1);
        while !mutated.is_char_boundary(at) {
            at -= 1;
        }
        match rng.below(3) {
            0 if at < mutated.len() => {
                mutated.remove(at);
            }
            _ => mutated.insert_str(at, mutations[rng.below(mutations.len())]),
        }
        agree(&mutated);
    }
}

#[test]
fn chords_samples_are_valid_and_measured_as_a_tree_measures_them() {
    let samples = std::env::var("CHORD_SAMPLES")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/chord/sample-events.ndjson").into());
    let Ok(text) = std::fs::read_to_string(&samples) else {
        eprintln!("skipped: Chord's samples are not at {samples}");
        return;
    };
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        agree(line);
        let mut scanner = Scanner::new(line);
        let depth = scanner.value().unwrap();
        assert_eq!(
            scanner.take_shape(depth),
            tree_shape(&serde_json::from_str(line).unwrap())
        );
    }
}

#[test]
fn every_block_scanner_finds_the_first_special_byte() {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    for _ in 0..20_000 {
        let bytes: Vec<u8> = (0..rng.below(80))
            .map(|_| match rng.below(12) {
                0 => b'"',
                1 => b'\\',
                2 => rng.below(0x20) as u8,
                3 => 0x80 + rng.below(0x80) as u8,
                _ => b' ' + rng.below(0x5e) as u8,
            })
            .collect();
        let from = rng.below(bytes.len() + 1);
        let expected = from
            + bytes[from..]
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
                .unwrap_or(bytes.len() - from);
        assert_eq!(find_special(&bytes, from), expected, "{bytes:?} from {from}");
        // The block scanners stop at a special byte or before the last block.
        for block in [
            find_special_in_blocks(&bytes, from),
            blocks(&bytes, from, words::BLOCK, words::block_mask),
        ] {
            assert!(
                block <= expected && (block == expected || block + 16 > bytes.len()),
                "{bytes:?} from {from}"
            );
        }
        // The one-block look finds it when it is in the first block.
        match first_special_in_block(&bytes, from) {
            Some(first) => assert_eq!(first, expected, "{bytes:?} from {from}"),
            None => assert!(
                from + 16 > bytes.len() || expected >= from + 16,
                "{bytes:?} from {from}"
            ),
        }
    }
}

#[test]
fn a_checked_object_is_skipped_with_the_same_verdicts() {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    for _ in 0..20_000 {
        // An object, valid, large enough to be skipped.
        let mut inner = String::from("{\"k\":");
        generate(&mut rng, 1, &mut inner);
        inner.push_str(",\"pad\":\"");
        inner.push_str(&"x".repeat(MIN_CHECKED));
        inner.push_str("\"}");
        assert!(validate(&inner).is_ok(), "{inner}");
        // Copied twice into a text, then mutated anywhere (inside a copy
        // too, which then is no longer skipped).
        let text = format!("{{\"data\":{{\"properties\":{inner}}},\"more\":[{inner},1]}}");
        let mut mutated = text.clone();
        let mut at = rng.below(mutated.len() + 1);
        while !mutated.is_char_boundary(at) {
            at -= 1;
        }
        let mutations = ["", "}", "]", ",", "\"", "{", "x"];
        match rng.below(3) {
            0 if at < mutated.len() => {
                mutated.remove(at);
            }
            _ => mutated.insert_str(at, mutations[rng.below(mutations.len())]),
        }
        for text in [&text, &mutated] {
            assert_eq!(
                validate_around(text, &inner),
                validate(text),
                "{text:?} around {inner:?}"
            );
        }
    }
    // What is checked is trusted: a text that is not JSON, passed as
    // checked, is skipped unscanned (the caller's promise broken).
    let not_json = format!("{{\"a\":tru,\"pad\":\"{}\"}}", "x".repeat(MIN_CHECKED));
    let text = format!("[{not_json}]");
    assert!(validate(&text).is_err());
    assert!(validate_around(&text, &not_json).is_ok(), "skipped, not scanned");
    // Too short to be worth comparing: scanned.
    assert!(validate_around("[{\"a\":tru}]", "{\"a\":tru}").is_err());
}
