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

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::Phase;

/// The longest line taken: a longer one is dropped (and said so), never cut.
pub const MAX_LINE: usize = 64 << 10;

/// The longest event kind or data key.
pub const MAX_NAME: usize = 64;

/// What the engine reads of one posts file per status round trip, at most. A job that
/// wrote more since the last read has the older part skipped (and said so): the
/// newest posts are the ones a person watching wants.
pub const READ_PER_FILE: u64 = 256 << 10;

/// What one status round trip (one cluster, one user) reads of posts files in all;
/// files left over are read on the next.
pub const READ_PER_QUERY: u64 = 4 << 20;

/// The most job events (data included) one task keeps; later posts are counted, not kept.
pub const MAX_TASK_POSTS: u32 = 10_000;

/// The most bytes of job posts one task keeps (as posted); later posts are counted,
/// not kept.
pub const MAX_TASK_POST_BYTES: u64 = 4 << 20;

/// The posts file of `phase`, relative to the run directory (a phase without frames).
pub fn posts_file(phase: Phase) -> String {
    format!(".hpcforge/posts/{phase}.jsonl")
}

/// The folder of a frame phase's posts files, relative to the run directory: one
/// `<frame>.jsonl` per frame.
pub fn posts_dir(phase: Phase) -> String {
    format!(".hpcforge/posts/{phase}")
}

/// How far the engine has read what one phase posted. Kept on the phase and moved
/// on in the same store write that adds the posts read, so a post is never lost
/// and never taken twice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PostsCursor {
    /// Bytes of the phase's posts file taken (a phase without frames). A rerun
    /// appends to the same file, so this carries on across restarts.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: u64,
    /// The next read starts inside a line that is being dropped (over-long, or cut
    /// by a skip), up to its end.
    #[serde(default, skip_serializing_if = "is_false")]
    pub skipping: bool,
    /// Frame phases: the frames whose posts were read to the end after they ended,
    /// in canonical form (`1-40,42`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<String>,
    /// Frame phases: the frames read part way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub open: Vec<FrameCursor>,
    /// Everything the phase's job posted has been read (it ended, then was read to
    /// the end). A restart sets it back.
    #[serde(default, skip_serializing_if = "is_false")]
    pub drained: bool,
}

/// How far one frame's posts file was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FrameCursor {
    /// The frame.
    pub frame: u32,
    /// Bytes taken.
    pub offset: u64,
    /// As [`PostsCursor::skipping`].
    #[serde(default, skip_serializing_if = "is_false")]
    pub skipping: bool,
}

impl PostsCursor {
    /// Whether nothing was read yet and nothing is pending: the stored form omits it.
    pub fn is_empty(&self) -> bool {
        *self == PostsCursor::default()
    }

    /// Before a rerun of a frame phase: forgets the frames that run again (`None`:
    /// all of them), whose posts files the submission removes.
    pub fn forget_frames(&mut self, rerun: Option<&super::frames::FrameRange>) {
        match rerun {
            None => {
                self.done = None;
                self.open.clear();
            }
            Some(r) => {
                self.open.retain(|f| !r.contains(f.frame));
                let kept: Vec<u32> = self.done_frames().into_iter().filter(|f| !r.contains(*f)).collect();
                self.done = super::frames::FrameRange::from_frames(&kept).map(|r| r.to_string());
            }
        }
    }

    /// Moves `frame`'s cursor on to `offset`; `finished` (the frame had ended and its
    /// file was read to its end): the frame is done, and no longer has a cursor.
    pub fn move_frame(&mut self, frame: u32, offset: u64, skipping: bool, finished: bool) {
        self.open.retain(|c| c.frame != frame);
        if finished {
            let mut done = self.done_frames();
            done.push(frame);
            done.sort_unstable();
            done.dedup();
            self.done = super::frames::FrameRange::from_frames(&done).map(|r| r.to_string());
        } else {
            self.open.push(FrameCursor { frame, offset, skipping });
            self.open.sort_by_key(|c| c.frame);
        }
    }

    /// The frames of [`PostsCursor::done`].
    pub fn done_frames(&self) -> Vec<u32> {
        self.done
            .as_deref()
            .and_then(|d| super::frames::FrameRange::parse(d, u64::MAX).ok())
            .map(|r| r.frames().collect())
            .unwrap_or_default()
    }
}

/// What a task's jobs posted, counted: what is kept against the caps, and what was
/// not kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PostsTally {
    /// Posts kept as events (data included).
    #[serde(default)]
    pub kept: u32,
    /// Their size as posted, in bytes.
    #[serde(default)]
    pub bytes: u64,
    /// Lines not kept: malformed, over-long, or over the task's caps.
    #[serde(default)]
    pub dropped_lines: u64,
    /// Bytes never read: skipped because a job posted faster than the engine reads,
    /// or after the task reached its caps.
    #[serde(default)]
    pub skipped_bytes: u64,
}

impl PostsTally {
    /// Whether nothing was posted: the stored form omits it.
    pub fn is_empty(&self) -> bool {
        *self == PostsTally::default()
    }

    /// Whether the task has reached a cap: later posts are counted, not kept.
    pub fn full(&self) -> bool {
        self.kept >= MAX_TASK_POSTS || self.bytes >= MAX_TASK_POST_BYTES
    }
}

/// One value of a task's data, as the jobs posted it: in the data map, a key's newest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DataPoint {
    /// The value, any JSON.
    pub value: Value,
    /// The phase whose job posted it.
    pub phase: Phase,
    /// The frame, in a phase that runs per frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame: Option<u32>,
    /// The job that posted it.
    pub job: String,
    /// When the engine took it.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The job's own clock when it posted, if it said.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub time: Option<OffsetDateTime>,
    /// The event that holds it in the task's history.
    pub seq: u64,
    /// In the data map: how many values the key had (its history:
    /// `GET /api/v1/tasks/{id}/data/{key}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<u32>,
}

/// The data the jobs of a task posted, from its events: key → newest value, with how
/// many values the key had.
pub fn data_map(events: &[super::task::TaskEvent]) -> std::collections::BTreeMap<String, DataPoint> {
    let mut out: std::collections::BTreeMap<String, DataPoint> = std::collections::BTreeMap::new();
    for (key, point) in data_points(events) {
        let values = out.get(&key).and_then(|d| d.values).unwrap_or(0) + 1;
        out.insert(key, DataPoint { values: Some(values), ..point });
    }
    out
}

/// Every value of `key` the jobs of a task posted, oldest first.
pub fn data_history(events: &[super::task::TaskEvent], key: &str) -> Vec<DataPoint> {
    data_points(events).filter(|(k, _)| k == key).map(|(_, p)| p).collect()
}

fn data_points(events: &[super::task::TaskEvent]) -> impl Iterator<Item = (String, DataPoint)> + '_ {
    events.iter().filter_map(|e| {
        let post = e.post.as_ref()?;
        let (key, value) = (post.key.clone()?, post.value.clone()?);
        let point = DataPoint {
            value,
            phase: e.phase?,
            frame: post.frame,
            job: post.job.clone(),
            at: e.at,
            time: post.time,
            seq: e.seq,
            values: None,
        };
        Some((key, point))
    })
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

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
            let mut data = m.remove("data").unwrap_or(Value::Null);
            storable(&mut data, "/data")?;
            Ok(Post::Event { kind, data, message, time })
        }
        (None, Some(key)) => {
            let key = name(key, "key")?;
            let mut value = m.remove("value").ok_or_else(|| format!("datum `{key}` has no `value`"))?;
            storable(&mut value, "/value")?;
            Ok(Post::Datum { key, value, time })
        }
        (None, None) => Err(format!("neither `event` nor `key` (fields: {})", fields(&m))),
    }
}

/// Makes `v` storable in either store, or says where it cannot be: object keys that
/// start with `$` are refused (MongoDB reserves them), whole numbers beyond what a
/// signed 64-bit integer holds become floating point (BSON has no unsigned 64-bit
/// integer). `at` is the JSON pointer of `v` in the line.
fn storable(v: &mut Value, at: &str) -> Result<(), String> {
    match v {
        Value::Object(m) => {
            if let Some(k) = m.keys().find(|k| k.starts_with('$')) {
                return Err(format!("a key that starts with `$` at {at}: {}", clip(k)));
            }
            for (k, v) in m.iter_mut() {
                storable(v, &format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")))?;
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter_mut().enumerate() {
                storable(v, &format!("{at}/{i}"))?;
            }
        }
        Value::Number(n) if n.is_u64() && n.as_i64().is_none() => {
            *v = serde_json::Number::from_f64(n.as_f64().unwrap_or(f64::MAX)).map_or(Value::Null, Value::Number);
        }
        _ => {}
    }
    Ok(())
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
    clip_to(s, 40)
}

/// At most `n` characters of `s`, with `…` if cut.
pub fn clip_to(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
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
    fn values_are_made_storable_or_refused_with_where() {
        let r = read_posts(
            b"{\"key\":\"k\",\"value\":{\"a\":[1,{\"$set\":2}]}}\n{\"key\":\"big\",\"value\":18446744073709551615}\n",
            false,
            false,
        );
        assert_eq!(r.dropped.len(), 1, "{r:?}");
        assert!(r.dropped[0].1.contains("/value/a/1") && r.dropped[0].1.contains("$set"), "{:?}", r.dropped);
        let Post::Datum { value, .. } = &r.posts[0] else { panic!() };
        assert!(value.is_f64() && value.as_f64().unwrap() > 1.8e19, "{value}");
    }

    #[test]
    fn names_are_short_and_plain() {
        assert!(is_name("frame.done") && is_name("a:b-c_d") && is_name(&"k".repeat(MAX_NAME)));
        assert!(!is_name("") && !is_name("a b") && !is_name("é") && !is_name(&"k".repeat(MAX_NAME + 1)));
    }
}
