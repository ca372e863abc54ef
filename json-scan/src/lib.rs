//! One pass over JSON text, building nothing: is it JSON, where does each
//! value end, and how big are its strings, arrays and objects.
//!
//! The plugin and the host both handle events and request bodies of
//! hundreds of kilobytes that they mostly pass on as they are. Parsing such
//! text into a tree to learn three things about it, or scanning it once per
//! question with serde_json's skipping, was most of a large event's cost
//! (BENCHMARKS.md §1). This scanner answers every question in one pass,
//! finding the end of each string with 16 bytes a step (SIMD on wasm32 and
//! x86_64, eight-byte words elsewhere).
//!
//! It accepts only what serde_json accepts: the same grammar and
//! whitespace and, in strict mode, the two things serde_json finds only when
//! it reads values rather than skipping them (a lone UTF-16 surrogate in an
//! escape, a number out of `f64`'s range), which strict mode records rather
//! than fails on. It refuses one thing serde_json's skipping allows: arrays
//! and objects nested 128 deep (serde_json's limit when it reads values),
//! so that its recursion is bounded. Tests hold it to serde_json's verdicts.
//! Errors carry only an offset: a caller that must explain a refusal, or
//! that must accept exactly what serde_json accepts, asks serde_json when
//! the scanner refuses.

use std::borrow::Cow;

/// Arrays and objects nested this deep are refused (serde_json's limit
/// when it reads values, counted from where the scanner starts).
pub const MAX_DEPTH: usize = 128;

/// Not JSON: the byte offset at which the scanner gave up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Error {
    pub offset: usize,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not JSON at byte {}", self.offset)
    }
}

impl std::error::Error for Error {}

/// What the values scanned since the last [`Scanner::take_shape`] hold at
/// most. Keys are not strings here: Klaviyo's limits apply to values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shape {
    /// The longest string value, in bytes once its escapes are decoded.
    pub longest_string: usize,
    /// The most items in one array.
    pub most_items: usize,
    /// Objects nested in one another, the scanned value itself counted
    /// when it is one; arrays do not count.
    pub object_depth: usize,
}

/// A cursor over JSON text.
pub struct Scanner<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    depth: usize,
    strict: bool,
    /// Where strict mode first found a value serde_json would refuse to read.
    unreadable: Option<usize>,
    longest_string: usize,
    most_items: usize,
    /// An object's text known to be JSON, skipped wherever a value is it
    /// (`validate_around`); empty for none.
    checked: &'a [u8],
}

/// A checked text shorter than this is scanned like the rest: comparing
/// would cost about as much.
const MIN_CHECKED: usize = 64;

impl<'a> Scanner<'a> {
    /// A scanner that checks the grammar only, as serde_json does when it
    /// skips a value or captures it raw.
    pub fn new(text: &'a str) -> Scanner<'a> {
        Scanner {
            text,
            bytes: text.as_bytes(),
            pos: 0,
            depth: 0,
            strict: false,
            unreadable: None,
            longest_string: 0,
            most_items: 0,
            checked: &[],
        }
    }

    /// Checks, while scanning, what serde_json checks only when it reads a
    /// value: escapes that are lone surrogates and numbers out of range.
    /// They are recorded ([`Scanner::unreadable`]), not errors, so a caller
    /// can scan on and decide.
    pub fn strict(mut self, strict: bool) -> Scanner<'a> {
        self.strict = strict;
        self
    }

    /// The offset the scanner is at.
    pub fn offset(&self) -> usize {
        self.pos
    }

    /// The text between `start` and where the scanner is.
    pub fn since(&self, start: usize) -> &'a str {
        &self.text[start..self.pos]
    }

    /// Where strict mode first met a value serde_json would not read.
    pub fn unreadable(&self) -> Option<usize> {
        self.unreadable
    }

    /// The shape of what was scanned since the last call, the object depth
    /// being that of the values passed in.
    pub fn take_shape(&mut self, object_depth: usize) -> Shape {
        let shape = Shape {
            longest_string: self.longest_string,
            most_items: self.most_items,
            object_depth,
        };
        self.longest_string = 0;
        self.most_items = 0;
        shape
    }

    /// Skips whitespace and returns the next byte, if any.
    #[inline]
    pub fn peek(&mut self) -> Option<u8> {
        // Compact JSON has no whitespace between tokens: one compare.
        match self.bytes.get(self.pos) {
            Some(&byte) if byte > b' ' => Some(byte),
            _ => {
                self.skip_whitespace();
                self.bytes.get(self.pos).copied()
            }
        }
    }

    /// Checks that nothing but whitespace is left.
    pub fn end(&mut self) -> Result<(), Error> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.error()),
        }
    }

    /// Scans one value; returns how deep objects nest in it (0 for
    /// anything but an object or an array holding one).
    pub fn value(&mut self) -> Result<usize, Error> {
        match self.peek() {
            Some(b'"') => {
                let length = self.string()?.decoded;
                self.longest_string = self.longest_string.max(length);
                Ok(0)
            }
            Some(b'{') => {
                if self.checked.len() >= MIN_CHECKED && self.bytes[self.pos..].starts_with(self.checked) {
                    // One JSON object, whole: it ends where its text does.
                    self.pos += self.checked.len();
                    return Ok(1);
                }
                self.enter()?;
                let deepest = self.skip_members()?;
                self.depth -= 1;
                Ok(deepest + 1)
            }
            Some(b'[') => {
                self.enter()?;
                self.pos += 1;
                let mut deepest = 0;
                let mut items = 0;
                if self.peek() == Some(b']') {
                    self.pos += 1;
                } else {
                    loop {
                        deepest = deepest.max(self.member_value()?);
                        items += 1;
                        match self.peek() {
                            Some(b',') => self.pos += 1,
                            Some(b']') => {
                                self.pos += 1;
                                break;
                            }
                            _ => return Err(self.error()),
                        }
                    }
                }
                self.most_items = self.most_items.max(items);
                self.depth -= 1;
                Ok(deepest)
            }
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(self.error()),
        }
    }

    /// [`Scanner::value`] for an item or a member's value, with strings,
    /// the most common, scanned here rather than in a call (each call pays
    /// a deadline check in the component).
    #[inline(always)]
    fn member_value(&mut self) -> Result<usize, Error> {
        match self.peek() {
            Some(b'"') => {
                let length = self.string()?.decoded;
                self.longest_string = self.longest_string.max(length);
                Ok(0)
            }
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => self.value(),
        }
    }

    /// Scans the object the scanner is at, handing each key (decoded) to
    /// `member`, which must scan the member's value.
    pub fn object(
        &mut self,
        member: impl FnMut(Cow<'a, str>, &mut Scanner<'a>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        if self.peek() != Some(b'{') {
            return Err(self.error());
        }
        self.enter()?;
        self.members(member)?;
        self.depth -= 1;
        Ok(())
    }

    /// The members of an object, from its `{` to past its `}`.
    fn members(
        &mut self,
        mut member: impl FnMut(Cow<'a, str>, &mut Scanner<'a>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        self.pos += 1;
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            if self.peek() != Some(b'"') {
                return Err(self.error());
            }
            let start = self.pos;
            let key = self.string()?;
            let raw = &self.text[start + 1..self.pos - 1];
            // Escapes are rare in keys; serde_json decodes them. A lone
            // surrogate it cannot decode (strict mode has recorded it)
            // leaves the key as written.
            let key = match key.escaped {
                true => {
                    serde_json::from_str::<String>(&self.text[start..self.pos]).map_or(Cow::Borrowed(raw), Cow::Owned)
                }
                false => Cow::Borrowed(raw),
            };
            if self.peek() != Some(b':') {
                return Err(self.error());
            }
            self.pos += 1;
            member(key, self)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(self.error()),
            }
        }
    }

    /// The members of an object no one asked about, from its `{` to past
    /// its `}`: keys are checked but not decoded. Returns how deep objects
    /// nest in the values. The loop repeats `members`' on purpose: written
    /// once, through a closure, the scan took 5% more instructions
    /// (callgrind), and this is the scanner's hottest loop.
    fn skip_members(&mut self) -> Result<usize, Error> {
        self.pos += 1;
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(0);
        }
        let mut deepest = 0;
        loop {
            if self.peek() != Some(b'"') {
                return Err(self.error());
            }
            self.string()?;
            if self.peek() != Some(b':') {
                return Err(self.error());
            }
            self.pos += 1;
            deepest = deepest.max(self.member_value()?);
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(deepest);
                }
                _ => return Err(self.error()),
            }
        }
    }

    fn enter(&mut self) -> Result<(), Error> {
        self.depth += 1;
        if self.depth >= MAX_DEPTH {
            return Err(self.error());
        }
        Ok(())
    }

    fn error(&self) -> Error {
        Error { offset: self.pos }
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.bytes.get(self.pos) {
            self.pos += 1;
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<usize, Error> {
        if self.bytes[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(0)
        } else {
            Err(self.error())
        }
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    #[inline(always)]
    fn number(&mut self) -> Result<usize, Error> {
        let start = self.pos;
        let digits = |scanner: &mut Scanner| {
            let from = scanner.pos;
            while let Some(b'0'..=b'9') = scanner.bytes.get(scanner.pos) {
                scanner.pos += 1;
            }
            scanner.pos - from
        };
        if self.bytes[self.pos] == b'-' {
            self.pos += 1;
        }
        match self.bytes.get(self.pos) {
            Some(b'0') => {
                self.pos += 1;
                if let Some(b'0'..=b'9') = self.bytes.get(self.pos) {
                    return Err(self.error());
                }
            }
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return Err(self.error()),
        }
        if self.bytes.get(self.pos) == Some(&b'.') {
            self.pos += 1;
            if digits(self) == 0 {
                return Err(self.error());
            }
        }
        let mut exponent = false;
        if let Some(b'e' | b'E') = self.bytes.get(self.pos) {
            exponent = true;
            self.pos += 1;
            if let Some(b'+' | b'-') = self.bytes.get(self.pos) {
                self.pos += 1;
            }
            if digits(self) == 0 {
                return Err(self.error());
            }
        }
        // Only an exponent or some 300 digits can leave f64's range; then
        // serde_json itself says whether it reads the number.
        if self.strict
            && self.unreadable.is_none()
            && (exponent || self.pos - start > 300)
            && serde_json::from_str::<f64>(&self.text[start..self.pos]).is_err()
        {
            self.unreadable = Some(start);
        }
        Ok(0)
    }

    /// A string, from its opening quote to past its closing one.
    #[inline(always)]
    fn string(&mut self) -> Result<Str, Error> {
        let start = self.pos + 1;
        // Most strings end, unescaped, within their first 16 bytes: found
        // with no loop at all (in the component, every loop and call pays
        // wasmtime's check for a deadline).
        if let Some(first) = first_special_in_block(self.bytes, start)
            && self.bytes[first] == b'"'
        {
            self.pos = first + 1;
            return Ok(Str {
                decoded: first - start,
                escaped: false,
            });
        }
        let mut at = start;
        // Bytes the escapes take beyond what they decode to.
        let mut shrink = 0;
        let mut escaped = false;
        loop {
            at = find_special(self.bytes, at);
            match self.bytes.get(at) {
                Some(b'"') => {
                    self.pos = at + 1;
                    return Ok(Str {
                        decoded: at - start - shrink,
                        escaped,
                    });
                }
                Some(b'\\') => {
                    escaped = true;
                    match self.bytes.get(at + 1) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                            shrink += 1;
                            at += 2;
                        }
                        Some(b'u') => {
                            let Some(unit) = hex4(self.bytes, at + 2) else {
                                return Err(Error { offset: at });
                            };
                            let (taken, decoded) = self.unicode_escape(unit, at);
                            shrink += taken - decoded;
                            at += taken;
                        }
                        _ => return Err(Error { offset: at }),
                    }
                }
                // A control character, or the text ends inside the string.
                _ => return Err(Error { offset: at }),
            }
        }
    }

    /// A `\uXXXX` escape (and its pair's second half): how many bytes of
    /// text it takes and how many it decodes to in UTF-8.
    fn unicode_escape(&mut self, unit: u16, at: usize) -> (usize, usize) {
        match unit {
            0xD800..=0xDBFF => {
                let low = if self.bytes.get(at + 6..at + 8) == Some(b"\\u") {
                    hex4(self.bytes, at + 8)
                } else {
                    None
                };
                match low {
                    Some(0xDC00..=0xDFFF) => (12, 4),
                    _ => {
                        self.lone_surrogate(at);
                        (6, 3)
                    }
                }
            }
            0xDC00..=0xDFFF => {
                self.lone_surrogate(at);
                (6, 3)
            }
            0..=0x7F => (6, 1),
            0x80..=0x7FF => (6, 2),
            _ => (6, 3),
        }
    }

    fn lone_surrogate(&mut self, at: usize) {
        if self.strict && self.unreadable.is_none() {
            self.unreadable = Some(at);
        }
    }
}

struct Str {
    decoded: usize,
    escaped: bool,
}

/// Scans one JSON value: the whole text must be it, with whitespace around.
pub fn validate(text: &str) -> Result<(), Error> {
    let mut scanner = Scanner::new(text);
    scanner.value()?;
    scanner.end()
}

/// [`validate`], for text that may copy `checked`, an object's text the
/// caller has already found to be JSON (with this scanner): wherever a value
/// begins with those bytes it is skipped whole rather than scanned again.
/// A body that embeds an event's `properties` as they were sent is checked
/// at the cost of a comparison for the part it copied.
///
/// `checked` must be one JSON object and nothing else, or the verdict may
/// be wrong; sizes and nesting inside it are not measured.
pub fn validate_around(text: &str, checked: &str) -> Result<(), Error> {
    let mut scanner = Scanner::new(text);
    if checked.starts_with('{') {
        scanner.checked = checked.as_bytes();
    }
    scanner.value()?;
    scanner.end()
}

fn hex4(bytes: &[u8], at: usize) -> Option<u16> {
    let digits = bytes.get(at..at + 4)?;
    let mut unit = 0u16;
    for &digit in digits {
        let value = match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            b'A'..=b'F' => digit - b'A' + 10,
            _ => return None,
        };
        unit = unit << 4 | u16::from(value);
    }
    Some(unit)
}

/// Whole 16-byte blocks; the caller finishes the last few bytes. Each
/// implementation gives the mask of one block (a bit per byte: `"`, `\`
/// or a control); the loops over blocks are written once, below.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod simd {
    use core::arch::wasm32::*;

    pub const BLOCK: usize = 16;

    /// The special bytes of the 16 at `at`, which must be in the slice.
    #[inline(always)]
    pub fn block_mask(bytes: &[u8], at: usize) -> u32 {
        assert!(at + BLOCK <= bytes.len());
        // SAFETY: checked just above: the 16 bytes read are inside the
        // slice; wasm loads need no alignment.
        let block = unsafe { v128_load(bytes.as_ptr().add(at).cast::<v128>()) };
        let special = v128_or(
            v128_or(u8x16_eq(block, u8x16_splat(b'"')), u8x16_eq(block, u8x16_splat(b'\\'))),
            u8x16_lt(block, u8x16_splat(0x20)),
        );
        u32::from(u8x16_bitmask(special))
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use core::arch::x86_64::*;

    pub const BLOCK: usize = 16;

    /// The special bytes of the 16 at `at`, which must be in the slice.
    #[inline(always)]
    pub fn block_mask(bytes: &[u8], at: usize) -> u32 {
        assert!(at + BLOCK <= bytes.len());
        // SAFETY: SSE2 is part of x86_64; the 16 bytes read are inside the
        // slice (checked just above), unaligned loads allowed.
        unsafe {
            let block = _mm_loadu_si128(bytes.as_ptr().add(at).cast::<__m128i>());
            // Unsigned `block <= 0x1F`: the larger of the two is 0x1F.
            let below_space = _mm_set1_epi8(0x1F);
            let control = _mm_cmpeq_epi8(_mm_max_epu8(block, below_space), below_space);
            let special = _mm_or_si128(
                _mm_or_si128(
                    _mm_cmpeq_epi8(block, _mm_set1_epi8(b'"' as i8)),
                    _mm_cmpeq_epi8(block, _mm_set1_epi8(b'\\' as i8)),
                ),
                control,
            );
            _mm_movemask_epi8(special) as u32
        }
    }
}

#[cfg(not(any(all(target_arch = "wasm32", target_feature = "simd128"), target_arch = "x86_64")))]
use words as simd;

/// Where there is no SIMD: eight bytes a step. Compiled everywhere, so that
/// the tests hold it to the same answers.
#[cfg_attr(
    any(all(target_arch = "wasm32", target_feature = "simd128"), target_arch = "x86_64"),
    allow(dead_code)
)]
mod words {
    pub const BLOCK: usize = 8;

    /// The special bytes of the 8 at `at`, a bit per byte: the classic
    /// bit tricks for "a byte equal to" and "a byte below", exact for the
    /// lowest match (all the callers use).
    #[inline(always)]
    pub fn block_mask(bytes: &[u8], at: usize) -> u32 {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGH: u64 = 0x8080_8080_8080_8080;
        let word = u64::from_le_bytes(bytes[at..at + BLOCK].try_into().expect("eight bytes"));
        let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
        let special = zero_byte(word ^ (ONES * u64::from(b'"')))
            | zero_byte(word ^ (ONES * u64::from(b'\\')))
            | (word.wrapping_sub(ONES * 0x20) & !word & HIGH);
        if special == 0 {
            return 0;
        }
        // The lowest special byte's bit (only the lowest is exact).
        1 << (special.trailing_zeros() / 8)
    }
}

/// The first offset at or after `at` holding `"`, `\` or a control
/// character, or the length when there is none.
#[inline]
fn find_special(bytes: &[u8], at: usize) -> usize {
    let at = find_special_in_blocks(bytes, at);
    at + bytes[at..]
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .unwrap_or(bytes.len() - at)
}

/// The first special byte at or after `at` found a block at a time, or
/// the offset of the bytes left over (fewer than a block).
#[inline(always)]
fn find_special_in_blocks(bytes: &[u8], at: usize) -> usize {
    blocks(bytes, at, simd::BLOCK, simd::block_mask)
}

/// The loop over blocks, for any block scanner (the tests run the
/// fallback's on every target).
#[inline(always)]
fn blocks(bytes: &[u8], mut at: usize, block: usize, mask: impl Fn(&[u8], usize) -> u32) -> usize {
    while at + block <= bytes.len() {
        let found = mask(bytes, at);
        if found != 0 {
            return at + found.trailing_zeros() as usize;
        }
        at += block;
    }
    at
}

/// The first special byte in the block at `at`, when the block is in the
/// slice and holds one: no loop (see `Scanner::string`).
#[inline(always)]
fn first_special_in_block(bytes: &[u8], at: usize) -> Option<usize> {
    if at + simd::BLOCK > bytes.len() {
        return None;
    }
    let found = simd::block_mask(bytes, at);
    (found != 0).then(|| at + found.trailing_zeros() as usize)
}

#[cfg(test)]
mod tests;
