//! What a job posts: events and data, as JSON lines appended to the file named by
//! `HPCG_EVENTS` in its run directory (docs/definitions.md, "Jobs talk back"). The
//! engine reads the file over the same SSH round trip as its status query, from where
//! it stopped last time; this module turns the bytes read into posts, strictly, and
//! says what it could not take and why. Pure: no I/O, no clock.
//!
//! One line is one JSON object, either an event
//! `{"event": "converged", "data": {...}, "message": "...", "time": "..."}`
//! or a datum `{"key": "residual", "value": 1.2e-6, "time": "..."}`. `time` is the
//! job's own clock (RFC 3339); `phase` and `frame`, if a line carries them, are
//! informational: the file a line is in says which phase and frame posted it.

use serde_json::{Map, Value};
use time::OffsetDateTime;

/// The longest line taken: a longer one is dropped (and said so), never cut.
pub const MAX_LINE: usize = 64 << 10;

/// The longest event kind or data key.
pub const MAX_NAME: usize = 64;

/// One thing a job posted.
#[derive(Debug, Clone, PartialEq)]
pub enum Post {
    /// An event: its kind, optional data and message.
    Event {
        /// `converged`, `error`, `frame.done`: letters, digits, `_ . : -`.
        kind: String,
        /// Any JSON the job attached (`null` if none).
        data: Value,
        /// Words for people, if the job gave any.
        message: Option<String>,
        /// The job's own timestamp, if it gave a valid one.
        time: Option<OffsetDateTime>,
    },
    /// A datum: the newest value of `key` for the task.
    Datum {
        /// The key: letters, digits, `_ . : -`.
        key: String,
        /// Its value, any JSON.
        value: Value,
        /// The job's own timestamp, if it gave a valid one.
        time: Option<OffsetDateTime>,
    },
}

/// What the bytes read from one posts file held.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Read {
    /// The posts, in the order the job wrote them.
    pub posts: Vec<Post>,
    /// How many of the bytes given were used up (whole lines, kept or dropped); the
    /// rest (a line still being written) is read again next time.
    pub consumed: usize,
    /// Lines not taken, each as (line number within what was given, 1-based; why).
    pub dropped: Vec<(usize, String)>,
    /// Whether the bytes end inside a line longer than [`MAX_LINE`]: the reader skips
    /// up to that line's end next time (see [`read_posts`]'s `skipping`).
    pub skipping: bool,
}

/// Whether `s` may name an event kind or a data key.
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// Reads the posts in `bytes`, the next bytes of one posts file. `skipping`: the
/// previous read ended inside an over-long line, whose rest (up to its newline) is
/// dropped first. `ended`: the job has ended, so a last line without its newline is
/// complete (and taken) rather than still being written.
pub fn read_posts(bytes: &[u8], skipping: bool, ended: bool) -> Read {
    let mut out = Read::default();
    let mut at = 0;
    let mut skip = skipping;
    let mut number = 0;
    while at < bytes.len() {
        let rest = &bytes[at..];
        let (line, next, whole) = match rest.iter().position(|&b| b == b'\n') {
            Some(i) => (&rest[..i], at + i + 1, true),
            None => (rest, bytes.len(), ended),
        };
        // An over-long line is dropped whole: this read's part of it now, its tail
        // (up to its newline) on the next reads.
        let over_long = !skip && line.len() > MAX_LINE;
        if !skip {
            number += 1;
        }
        if over_long {
            out.dropped.push((number, format!("a line of over {MAX_LINE} bytes")));
        }
        if skip || over_long {
            out.consumed = next;
            if !whole {
                out.skipping = true;
                return out;
            }
            skip = false;
            at = next;
            continue;
        }
        if !whole {
            // Still being written: read again next time.
            break;
        }
        at = next;
        out.consumed = at;
        let text = String::from_utf8_lossy(line);
        if text.trim().is_empty() {
            continue;
        }
        match parse_line(text.trim()) {
            Ok(p) => out.posts.push(p),
            Err(why) => out.dropped.push((number, why)),
        }
    }
    out
}

/// One line as a post, or why it is not one.
pub fn parse_line(line: &str) -> Result<Post, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON ({e})"))?;
    let Value::Object(mut m) = v else {
        return Err("not a JSON object".into());
    };
    let time = match m.remove("time") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => Some(
            OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339)
                .map_err(|_| format!("`time` is not an RFC 3339 time: {}", clip(&t)))?,
        ),
        Some(_) => return Err("`time` is not a string".into()),
    };
    match (m.remove("event"), m.remove("key")) {
        (Some(_), Some(_)) => Err("both `event` and `key`: a line is one event or one datum".into()),
        (Some(kind), None) => {
            let kind = name(kind, "event")?;
            let message = match m.remove("message") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s),
                Some(_) => return Err("`message` is not a string".into()),
            };
            Ok(Post::Event { kind, data: m.remove("data").unwrap_or(Value::Null), message, time })
        }
        (None, Some(key)) => {
            let key = name(key, "key")?;
            let value = m.remove("value").ok_or_else(|| format!("datum `{key}` has no `value`"))?;
            Ok(Post::Datum { key, value, time })
        }
        (None, None) => Err(format!("neither `event` nor `key` (fields: {})", fields(&m))),
    }
}

fn name(v: Value, field: &str) -> Result<String, String> {
    match v {
        Value::String(s) if is_name(&s) => Ok(s),
        Value::String(s) => {
            Err(format!("`{field}` must be 1 to {MAX_NAME} letters, digits, `_`, `.`, `:` or `-`: {}", clip(&s)))
        }
        _ => Err(format!("`{field}` is not a string")),
    }
}

fn fields(m: &Map<String, Value>) -> String {
    if m.is_empty() { "none".into() } else { m.keys().map(|k| clip(k)).collect::<Vec<_>>().join(", ") }
}

/// At most 40 characters of `s`, for messages.
fn clip(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_and_data_are_read_in_order_with_the_jobs_own_time() {
        let text = "{\"event\":\"converged\",\"data\":{\"step\":12},\"time\":\"2026-12-05T04:00:01Z\",\"phase\":\"execute\"}\n\
                    {\"key\":\"residual\",\"value\":1.5e-6}\n\
                    \n\
                    {\"event\":\"note\",\"message\":\"half way\"}\n";
        let r = read_posts(text.as_bytes(), false, false);
        assert_eq!(r.consumed, text.len());
        assert!(r.dropped.is_empty(), "{:?}", r.dropped);
        assert_eq!(r.posts.len(), 3);
        let Post::Event { kind, data, time, .. } = &r.posts[0] else { panic!() };
        assert_eq!((kind.as_str(), data), ("converged", &json!({"step": 12})));
        assert_eq!(time.unwrap().second(), 1);
        assert_eq!(r.posts[1], Post::Datum { key: "residual".into(), value: json!(1.5e-6), time: None });
        let Post::Event { message, data, .. } = &r.posts[2] else { panic!() };
        assert_eq!((message.as_deref(), data), (Some("half way"), &Value::Null));
    }

    #[test]
    fn a_line_still_being_written_waits_unless_the_job_has_ended() {
        let text = b"{\"event\":\"a\"}\n{\"event\":\"b\"}";
        let r = read_posts(text, false, false);
        assert_eq!((r.posts.len(), r.consumed), (1, 14));
        let r = read_posts(text, false, true);
        assert_eq!((r.posts.len(), r.consumed), (2, text.len()));
    }

    #[test]
    fn malformed_lines_are_dropped_each_with_its_reason_and_the_rest_is_kept() {
        let text = "not json\n[1]\n{\"event\":\"a b\"}\n{\"key\":\"k\"}\n{\"event\":\"e\",\"key\":\"k\",\"value\":1}\n\
                    {\"event\":\"ok\",\"time\":\"yesterday\"}\n{\"other\":1}\n{\"event\":\"fine\"}\n";
        let r = read_posts(text.as_bytes(), false, false);
        assert_eq!(r.posts.len(), 1, "{r:?}");
        let why: Vec<&str> = r.dropped.iter().map(|(_, w)| w.as_str()).collect();
        assert_eq!(r.dropped.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6, 7]);
        assert!(why[0].starts_with("not JSON"), "{why:?}");
        assert_eq!(why[1], "not a JSON object");
        assert!(why[2].contains("`event` must be") && why[2].contains("a b"), "{why:?}");
        assert_eq!(why[3], "datum `k` has no `value`");
        assert!(why[4].contains("both"), "{why:?}");
        assert!(why[5].contains("RFC 3339"), "{why:?}");
        assert_eq!(why[6], "neither `event` nor `key` (fields: other)");
    }

    #[test]
    fn an_over_long_line_is_dropped_whole_even_across_reads() {
        let long = format!("{{\"event\":\"x\",\"data\":\"{}\"}}", "a".repeat(MAX_LINE));
        // All of it in one read.
        let text = format!("{long}\n{{\"event\":\"after\"}}\n");
        let r = read_posts(text.as_bytes(), false, false);
        assert_eq!((r.posts.len(), r.dropped.len(), r.consumed, r.skipping), (1, 1, text.len(), false));
        // Cut by the read's bound: its start is dropped, then its tail next time.
        let first = &text.as_bytes()[..MAX_LINE + 10];
        let r = read_posts(first, false, false);
        assert_eq!((r.posts.len(), r.dropped.len(), r.consumed, r.skipping), (0, 1, first.len(), true));
        let r = read_posts(&text.as_bytes()[first.len()..], true, false);
        assert_eq!((r.posts.len(), r.dropped.len(), r.skipping), (1, 0, false));
        assert_eq!(r.consumed, text.len() - first.len());
    }

    #[test]
    fn names_are_short_and_plain() {
        assert!(is_name("frame.done") && is_name("a:b-c_d") && is_name(&"k".repeat(MAX_NAME)));
        assert!(!is_name("") && !is_name("a b") && !is_name("é") && !is_name(&"k".repeat(MAX_NAME + 1)));
    }
}
