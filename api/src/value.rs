//! A write's value, from the text the client sent to the text kvq stores,
//! without building a tree of it.
//!
//! The body is parsed with the value as a [`RawValue`] borrowed from the
//! body's bytes; [`stored`] then checks it in one pass that allocates
//! nothing per element (a serde visitor that counts depth and ignores what
//! it reads), and copies it once, without insignificant whitespace. So a
//! value costs about its own size again, whatever its shape: a
//! `serde_json::Value` of a 1 MiB `[[],[],…]` took hundreds of MiB.
//!
//! What is refused (400 `malformed_json`): nesting deeper than
//! [`MAX_DEPTH`] levels, numbers beyond `f64` (`1e400`), lone UTF-16
//! surrogates in escapes (`"\ud800"`), and anything that is not JSON. What
//! is stored is the value as sent, less its insignificant whitespace:
//! numbers keep their digits (`1.0e2`, a 30-digit integer), strings their
//! escapes, objects their members in order, duplicate keys included.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::error::ApiError;

/// The deepest nesting of arrays and objects a value may have.
pub const MAX_DEPTH: usize = 128;

/// The text to store for `raw`: checked, and compact. 400 `malformed_json`
/// for a value a reader could not load back, 413 `value_too_large` if the
/// compact text is longer than `limit` bytes.
pub fn stored(raw: &RawValue, limit: usize) -> Result<Box<RawValue>, ApiError> {
    check(raw.get())?;
    let text = compact(raw.get());
    if text.len() > limit {
        return Err(ApiError::ValueTooLarge(format!(
            "the value is {} bytes of JSON; the limit is {limit}",
            text.len()
        )));
    }
    RawValue::from_string(text)
        .map_err(|e| ApiError::MalformedJson(format!("the value cannot be stored: {e}")))
}

/// Walks `json` once: at most [`MAX_DEPTH`] levels, finite numbers, valid
/// strings.
fn check(json: &str) -> Result<(), ApiError> {
    let mut deserializer = serde_json::Deserializer::from_str(json);
    // The depth is counted by `Check` itself, which stops at MAX_DEPTH
    // before the parser goes any deeper.
    deserializer.disable_recursion_limit();
    Check { depth: 0 }
        .deserialize(&mut deserializer)
        .and_then(|()| deserializer.end())
        .map_err(|e| ApiError::MalformedJson(format!("the value: {e}")))
}

/// `json` without whitespace outside strings; everything else byte for
/// byte. `json` is valid JSON (the body parser checked it), so a string
/// starts at an unescaped `"` outside a string and ends at the next one.
fn compact(json: &str) -> String {
    let bytes = json.as_bytes();
    let mut out = String::with_capacity(json.len());
    let mut start = 0;
    let mut in_string = false;
    let mut escaped = false;
    for (i, &b) in bytes.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if b == b'"' {
            in_string = true;
        } else if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            // Whitespace is ASCII, so these are char boundaries.
            out.push_str(&json[start..i]);
            start = i + 1;
        }
    }
    out.push_str(&json[start..]);
    out
}

/// A visitor that accepts any JSON value within the limits and keeps
/// nothing of it.
#[derive(Clone, Copy)]
struct Check {
    /// Levels of arrays and objects around the value being read.
    depth: usize,
}

impl Check {
    /// The check for a value one level down, or an error past
    /// [`MAX_DEPTH`].
    fn inner<E: de::Error>(self) -> Result<Self, E> {
        if self.depth >= MAX_DEPTH {
            return Err(E::custom(format_args!(
                "nesting deeper than {MAX_DEPTH} levels"
            )));
        }
        Ok(Self {
            depth: self.depth + 1,
        })
    }
}

impl<'de> DeserializeSeed<'de> for Check {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Check {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        // serde_json refuses numbers beyond f64 itself; this keeps it so
        // whatever it does with them.
        if v.is_finite() {
            Ok(())
        } else {
            Err(E::custom("number out of range"))
        }
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.inner()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.inner()?;
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value_seed(inner)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).expect("valid JSON")
    }

    fn stored_text(json: &str) -> Result<String, String> {
        stored(&raw(json), 1 << 20)
            .map(|v| v.get().to_owned())
            .map_err(|e| format!("{}: {e}", e.code()))
    }

    #[test]
    fn the_stored_text_is_the_sent_text_without_whitespace() {
        for (sent, kept) in [
            ("{ \"a\" : 1 }", "{\"a\":1}"),
            ("[ 1 , 2 ,\n\t3 ]", "[1,2,3]"),
            ("\" a \\\" b \"", "\" a \\\" b \""),
            ("{\"k\\\\\":\" \\\\ \"}", "{\"k\\\\\":\" \\\\ \"}"),
            ("1.0e2", "1.0e2"),
            ("-0", "-0"),
            (
                "123456789012345678901234567890",
                "123456789012345678901234567890",
            ),
            ("{\"a\":1,\"a\":2}", "{\"a\":1,\"a\":2}"),
            ("\"\\u00e9 é\"", "\"\\u00e9 é\""),
            ("null", "null"),
        ] {
            assert_eq!(stored_text(sent).as_deref(), Ok(kept), "{sent}");
        }
    }

    #[test]
    fn depth_is_limited_to_128_levels() {
        let nested = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        assert!(stored_text(&nested(MAX_DEPTH)).is_ok());
        let objects = format!("{}1{}", "{\"a\":".repeat(MAX_DEPTH), "}".repeat(MAX_DEPTH));
        assert!(stored_text(&objects).is_ok());
        for n in [MAX_DEPTH + 1, 100_000] {
            let err = stored_text(&nested(n)).expect_err("too deep");
            assert!(err.starts_with("malformed_json"), "{err}");
        }
    }

    #[test]
    fn numbers_beyond_f64_and_lone_surrogates_are_refused() {
        for bad in ["1e400", "-1e400", "[1,{\"a\":1e999}]", "\"\\ud800\""] {
            let err = stored_text(bad).expect_err(bad);
            assert!(err.starts_with("malformed_json"), "{bad}: {err}");
        }
        assert!(stored_text("1e308").is_ok());
    }

    #[test]
    fn the_limit_applies_to_the_compact_text() {
        assert!(stored(&raw("[1, 2, 3]"), 7).is_ok());
        let err = stored(&raw("[1,2,3,4]"), 7).expect_err("9 bytes");
        assert_eq!(err.code(), "value_too_large");
    }
}
