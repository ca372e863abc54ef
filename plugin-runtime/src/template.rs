//! The one grammar of secret placeholders. A plugin never sees a secret:
//! it writes `{{secret:NAME}}` into a header value, and the host fills it in
//! only when the request is sent. The output check (which secrets a header
//! names) and the host's rendering (filling in or masking) both read header
//! values through `segments`, so they can never disagree on what a
//! placeholder is.

const OPEN: &str = "{{secret:";
const CLOSE: &str = "}}";

/// A piece of a header value: literal text, or a placeholder's secret name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment<'a> {
    Text(&'a str),
    Secret(&'a str),
}

/// Splits a header value into text and placeholders. An opening `{{secret:`
/// with no closing `}}` is text.
pub fn segments(value: &str) -> Segments<'_> {
    Segments { rest: value }
}

pub struct Segments<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Segments<'a> {
    type Item = Segment<'a>;

    fn next(&mut self) -> Option<Segment<'a>> {
        if self.rest.is_empty() {
            return None;
        }
        let placeholder = self.rest.find(OPEN).and_then(|start| {
            let name_start = start + OPEN.len();
            let end = self.rest[name_start..].find(CLOSE)? + name_start;
            Some((start, name_start, end))
        });
        match placeholder {
            Some((0, name_start, end)) => {
                let name = &self.rest[name_start..end];
                self.rest = &self.rest[end + CLOSE.len()..];
                Some(Segment::Secret(name))
            }
            Some((start, _, _)) => {
                let text = &self.rest[..start];
                self.rest = &self.rest[start..];
                Some(Segment::Text(text))
            }
            None => {
                let text = self.rest;
                self.rest = "";
                Some(Segment::Text(text))
            }
        }
    }
}

/// The secret names a header value refers to.
pub fn references(value: &str) -> impl Iterator<Item = &str> {
    segments(value).filter_map(|segment| match segment {
        Segment::Secret(name) => Some(name),
        Segment::Text(_) => None,
    })
}

/// A header value with each placeholder replaced by what `fill` gives for
/// its secret name; the first error `fill` returns ends the rendering.
pub fn render<'s, E>(value: &str, mut fill: impl FnMut(&str) -> Result<&'s str, E>) -> Result<String, E> {
    let mut out = String::with_capacity(value.len());
    for segment in segments(value) {
        match segment {
            Segment::Text(text) => out.push_str(text),
            Segment::Secret(name) => out.push_str(fill(name)?),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_and_text_are_told_apart() {
        let parts: Vec<_> = segments("Klaviyo-API-Key {{secret:api_key}} and {{secret:b}}!").collect();
        assert_eq!(
            parts,
            [
                Segment::Text("Klaviyo-API-Key "),
                Segment::Secret("api_key"),
                Segment::Text(" and "),
                Segment::Secret("b"),
                Segment::Text("!"),
            ]
        );
    }

    #[test]
    fn an_unclosed_placeholder_is_text() {
        assert_eq!(references("x {{secret:api_key").count(), 0);
        let shown = render("x {{secret:api_key", |_| Ok::<_, ()>("***")).unwrap();
        assert_eq!(shown, "x {{secret:api_key");
    }

    #[test]
    fn rendering_fills_every_placeholder_and_nothing_else() {
        let sent = render("a{{secret:k}}b{{secret:k}}", |name| {
            assert_eq!(name, "k");
            Ok::<_, ()>("V")
        })
        .unwrap();
        assert_eq!(sent, "aVbV");
        assert_eq!(
            render("no placeholder", |_| Err("unused")),
            Ok("no placeholder".to_string())
        );
        assert_eq!(render("{{secret:missing}}", |_| Err("missing")), Err("missing"));
    }
}
