//! The lines of a forged payload that let a job talk back: `hpcg_event` and
//! `hpcg_data`, two small POSIX `sh` programs on the job's `PATH`, and `HPCG_EVENTS`,
//! the file they append JSON lines to (the protocol: [`crate::model::posts`]). Any
//! language can append the same lines itself, without a library.
//!
//! Each phase posts to `<run>/.hpcforge/posts/<phase>.jsonl`; each frame of a frame
//! phase to `<run>/.hpcforge/posts/<phase>/<frame>.jsonl`, so frames running side by
//! side never write one file. A rerun appends to the same file.

use std::fmt::Write as _;
use std::sync::LazyLock;

use crate::model::Phase;
use crate::shell::heredoc;

/// What both helpers start with: checks, and the time and place of the post.
const COMMON: &str = r#"#!/bin/sh
# Written by hpcforge (docs/definitions.md, "Jobs talk back"): appends one JSON line
# to the file $HPCG_EVENTS names; the engine collects it with the job's status.
hpcg_me=${0##*/}
hpcg_name() { case $1 in ''|*[!A-Za-z0-9_.:-]*) return 1 ;; esac; [ "${#1}" -le 64 ]; }
# A JSON value on one line (the engine checks it, and says so if it is not JSON).
hpcg_json() { printf '%s' "$1" | tr '\n\r' '  '; }
# $1 as a JSON string: control characters become spaces; \ and " are escaped.
hpcg_str() { printf '"%s"' "$(printf '%s' "$1" | tr '\001-\037' ' ' | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g')"; }
if [ -z "${HPCG_EVENTS:-}" ]; then
    echo "$hpcg_me: HPCG_EVENTS is not set: run it inside an hpcforge job" >&2
    exit 2
fi
hpcg_head="{\"time\":\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\",\"phase\":$(hpcg_str "${HPCG_PHASE:-}")"
case ${HPCG_FRAME:-} in
    '' | *[!0-9]*) ;;
    *) hpcg_head="$hpcg_head,\"frame\":$HPCG_FRAME" ;;
esac
"#;

const EVENT: &str = r#"if [ "$#" -lt 1 ] || [ "$#" -gt 3 ]; then
    echo "usage: hpcg_event KIND [JSON-DATA [MESSAGE]]" >&2
    exit 2
fi
if ! hpcg_name "$1"; then
    echo "hpcg_event: KIND must be 1 to 64 letters, digits, '_', '.', ':' or '-', not: $1" >&2
    exit 2
fi
hpcg_line="$hpcg_head,\"event\":\"$1\""
if [ "$#" -ge 2 ] && [ -n "$2" ]; then hpcg_line="$hpcg_line,\"data\":$(hpcg_json "$2")"; fi
if [ "$#" -ge 3 ]; then hpcg_line="$hpcg_line,\"message\":$(hpcg_str "$3")"; fi
printf '%s}\n' "$hpcg_line" >> "$HPCG_EVENTS"
"#;

const DATA: &str = r#"if [ "$#" -ne 2 ]; then
    echo "usage: hpcg_data KEY JSON-VALUE" >&2
    exit 2
fi
if ! hpcg_name "$1"; then
    echo "hpcg_data: KEY must be 1 to 64 letters, digits, '_', '.', ':' or '-', not: $1" >&2
    exit 2
fi
printf '%s,"key":"%s","value":%s}\n' "$hpcg_head" "$1" "$(hpcg_json "$2")" >> "$HPCG_EVENTS"
"#;

/// The helper programs, as (name, text).
pub fn helper_programs() -> [(&'static str, String); 2] {
    [("hpcg_event", format!("{COMMON}{EVENT}")), ("hpcg_data", format!("{COMMON}{DATA}"))]
}

/// The payload lines that write the helpers to `$hpcg_dir/bin`, each to a file of its
/// own, then renamed (jobs of one task may start at once). The same for every phase of
/// every task: built once.
static WRITE_HELPERS: LazyLock<String> = LazyLock::new(|| {
    let mut s = String::new();
    for (name, text) in helper_programs() {
        let tmp = format!("\"$hpcg_dir/bin/.{name}.$$\"");
        // The texts are constants whose lines never equal the delimiter.
        heredoc(&mut s, &tmp, "HELPER", &text).expect("the helpers hold no delimiter line");
        let _ = writeln!(s, "chmod 755 {tmp} && mv -f {tmp} \"$hpcg_dir/bin/{name}\"");
    }
    s
});

/// The payload lines that write the helpers and, for a phase that does not run per
/// frame, set `HPCG_EVENTS`. A frame phase sets it per frame ([`frame_events`]).
pub fn payload_setup(phase: Phase, per_frame: bool) -> String {
    let mut s = String::from("# Jobs talk back: hpcg_event and hpcg_data append to $HPCG_EVENTS.\n");
    let dir = if per_frame { format!("\"$hpcg_dir/posts/{phase}\"") } else { "\"$hpcg_dir/posts\"".into() };
    let _ = writeln!(s, "mkdir -p {dir} \"$hpcg_dir/bin\"");
    s.push_str(&WRITE_HELPERS);
    if !per_frame {
        let _ = writeln!(s, "HPCG_EVENTS=\"$hpcg_dir/posts/{phase}.jsonl\"; export HPCG_EVENTS");
    }
    s
}

/// The line, inside a frame's subshell, that points `HPCG_EVENTS` at the frame's file.
pub fn frame_events(phase: Phase) -> String {
    format!("HPCG_EVENTS=\"$hpcg_dir/posts/{phase}/$HPCG_FRAME.jsonl\"; export HPCG_EVENTS")
}

/// The line before the application runs: the helpers first on `PATH` (after the
/// cluster environment, which may set `PATH` itself).
pub const PATH_LINE: &str = "PATH=\"$hpcg_dir/bin:$PATH\"; export PATH\n";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::posts::{Post, read_posts};
    use serde_json::json;
    use std::process::Command;

    /// Runs the helpers as a job would, with `sh`, and reads back what they wrote
    /// with the engine's own reader.
    #[test]
    fn the_helpers_write_lines_the_engine_reads_back_exactly() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut script = String::from("set -e\nhpcg_dir=\"$1\"\n");
        script.push_str(&payload_setup(Phase::EXECUTE, false));
        script.push_str(PATH_LINE);
        script.push_str(
            "HPCG_PHASE=execute; export HPCG_PHASE\n\
             hpcg_event started\n\
             hpcg_event converged '{\"step\": 12,\n \"ok\": true}' 'said \"done\"\\ with\ttab'\n\
             hpcg_data residual 1.5e-6\n\
             hpcg_data 'bad key' 1 2>/dev/null && exit 9\n\
             hpcg_event 2>/dev/null && exit 9\n\
             hpcg_data path '\"/scratch/a b\"'\n\
             (HPCG_FRAME=7; export HPCG_FRAME; hpcg_event frame.done)\n\
             echo ok\n",
        );
        let out = Command::new("sh").arg("-c").arg(&script).arg("sh").arg(dir).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
        let bytes = std::fs::read(dir.join("posts/execute.jsonl")).unwrap();
        let r = read_posts(&bytes, false, false);
        assert!(r.dropped.is_empty(), "{:?}\n{}", r.dropped, String::from_utf8_lossy(&bytes));
        assert_eq!(r.consumed, bytes.len());
        assert_eq!(r.posts.len(), 5, "{}", String::from_utf8_lossy(&bytes));
        let Post::Event { kind, data, message, time } = &r.posts[1] else { panic!() };
        assert_eq!(kind, "converged");
        assert_eq!(data, &json!({"step": 12, "ok": true}));
        assert_eq!(message.as_deref(), Some("said \"done\"\\ with tab"));
        assert!(time.is_some());
        assert!(matches!(&r.posts[2], Post::Datum { key, value, .. } if key == "residual" && value == &json!(1.5e-6)));
        assert!(matches!(&r.posts[3], Post::Datum { value, .. } if value == &json!("/scratch/a b")));
        let line = String::from_utf8_lossy(&bytes).lines().last().unwrap().to_owned();
        assert!(line.contains("\"phase\":\"execute\",\"frame\":7"), "{line}");
    }

    #[test]
    fn without_hpcg_events_the_helpers_say_why() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("hpcg_event");
        std::fs::write(&path, &helper_programs()[0].1).unwrap();
        let out = Command::new("sh").arg(&path).arg("x").env_remove("HPCG_EVENTS").output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("HPCG_EVENTS is not set"));
    }
}
