//! The shell plumbing that collects what jobs post (docs/definitions.md, "Jobs talk
//! back"), on the same round trip as the status query: the lines that read, for each
//! phase the engine asks about, only the bytes its posts files gained since the
//! engine's cursor, and their parser. The cursors themselves are the engine's (kept
//! on the task, [`PostsCursor`]); nothing here writes on the cluster.
//!
//! One `find` lists every posts file of the round trip with its size; one `awk`
//! compares the sizes with the cursors and decides what to read, within
//! [`READ_PER_FILE`] per file and [`READ_PER_QUERY`] in all; one `dd` per file that
//! grew reads exactly the new bytes. A file that did not grow costs nothing.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use base64::Engine as _;

use crate::model::Phase;
use crate::model::posts::{PostsCursor, READ_PER_FILE, READ_PER_QUERY, posts_dir, posts_file};

/// What a query reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// What the phase's jobs posted (`HPCG_EVENTS`).
    Posts,
    /// The phase job's standard output (`stderr` false) or error, at `path` (where the
    /// cluster's scheduler writes it), for the task's log rules. For a phase that runs
    /// per frame (`frames`), `path` is the folder of its frames' own files
    /// ([`crate::model::rules::frame_output_dir`]).
    Output {
        /// Standard error.
        stderr: bool,
        /// The job whose output it is.
        job: String,
        /// The file (empty until the monitor names it).
        path: String,
    },
}

/// One phase whose posts (or output) are read.
#[derive(Debug, Clone)]
pub struct PostsQuery {
    /// What is read.
    pub source: Source,
    /// The task's run directory.
    pub run_dir: String,
    /// The phase.
    pub phase: Phase,
    /// Whether it runs per frame (one posts file per frame).
    pub frames: bool,
    /// Whether its job is known to have ended before this read: every file is then
    /// complete, its last line too.
    pub ended: bool,
    /// Read nothing, only say how far the files reach (the task is at its caps).
    pub skip: bool,
    /// How far the engine has read.
    pub cursor: PostsCursor,
}

/// What was read of one posts file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRead {
    /// The frame whose file it is (`None`: the phase's one file).
    pub frame: Option<u32>,
    /// Where the bytes start in the file. Beyond the cursor: the bytes between were
    /// skipped (too many since the last read, or the task is at its caps). Before it:
    /// the file was replaced by a shorter one, read again from its start.
    pub start: u64,
    /// The file's size when it was read.
    pub size: u64,
    /// Whether the job (frame) that writes it had ended before it was read.
    pub ended: bool,
    /// The bytes read.
    pub bytes: Vec<u8>,
}

/// What one [`PostsQuery`] brought back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostsAnswer {
    /// The files read (only those that grew, or ended).
    pub reads: Vec<FileRead>,
    /// Whether every file of the phase was looked at: not cut short by the round
    /// trip's bound or a broken connection.
    pub complete: bool,
}

/// The script lines that read what the phases of `queries` posted, printing one line
/// `POSTSB <b64>` holding, per file read, `POSTS <query> <frame|-> <start> <size>
/// <ended> <length>` and the bytes, and `POSTSOK <query>` for each query whose files
/// were all looked at. Read by [`parse_posts`]. Needs [`super::common::HELPERS`] before it; runs after the status
/// query, so that a job the status says has ended had ended before its files were read.
pub fn posts_script(queries: &[PostsQuery]) -> String {
    let mut table = String::new();
    let mut any = false;
    for (i, q) in queries.iter().enumerate() {
        // A line-based protocol: a path that would break a line is never asked about
        // (run directories are the engine's own; this does not happen), and so never
        // complete: the engine gives up on it in the end and says so.
        if q.run_dir.contains(['\n', '\t', '\r']) {
            continue;
        }
        let (ended, skip) = (u8::from(q.ended), u8::from(q.skip));
        // One file (`S`), or a folder of one file per frame (`F`).
        let (frames, path) = match &q.source {
            Source::Output { path, .. } if path.contains(['\n', '\t', '\r']) => continue,
            Source::Output { path, .. } => (q.frames, path.clone()),
            Source::Posts if q.frames => (true, format!("{}/{}", q.run_dir, posts_dir(q.phase))),
            Source::Posts => (false, format!("{}/{}", q.run_dir, posts_file(q.phase))),
        };
        if frames {
            let records = format!("{}/{}", q.run_dir, super::frames::frames_dir(q.phase));
            let open: Vec<String> =
                q.cursor.open.iter().map(|f| format!("{}:{}:{}", f.frame, f.offset, u8::from(f.skipping))).collect();
            let open = if open.is_empty() { "-".to_owned() } else { open.join(",") };
            let done = q.cursor.done.clone().unwrap_or_else(|| "-".into());
            let _ = writeln!(table, "Q\t{i}\tF\t{ended}\t{skip}\t{done}\t{open}\t{records}\t{path}");
        } else {
            let _ = writeln!(table, "Q\t{i}\tS\t{ended}\t{skip}\t{}\t-\t-\t{path}", q.cursor.offset);
        }
        any = true;
    }
    if !any {
        return String::new();
    }
    // The table goes into a variable once; the paths (its last field) go to `find`
    // through `xargs`, so no number of them can overflow a command line.
    let mut s = String::from("hpcg_pq=$(cat <<'HPCG_POSTS_END'\n");
    s.push_str(&table);
    s.push_str("HPCG_POSTS_END\n)\n");
    s.push_str(
        "{ printf '%s\\n' \"$hpcg_pq\"; printf '%s\\n' \"$hpcg_pq\" | awk -F'\\t' '{ print $NF }' | tr '\\n' '\\000' \\\n\
         \x20 | xargs -0 sh -c 'find \"$@\" -maxdepth 1 -type f -printf \"F\\t%s\\t%p\\n\" 2>/dev/null; true' sh; }",
    );
    let _ = writeln!(s, " | awk -v per={READ_PER_FILE} -v budget={READ_PER_QUERY} {PLAN} |");
    s.push_str(READ);
    s
}

/// Decides what to read: `<query> <frame|-> <start> <length> <size> <ended> <path>`
/// per file, then `OK <query>` for each query none of whose files was left over.
const PLAN: &str = r#"'
BEGIN { FS = "\t"; used = 0 }
$1 == "Q" {
    i = $2; order[++nq] = i; ended[i] = $4; skip[i] = $5
    if ($3 == "S") { single[$9] = i; off[i, "-"] = $6; sk[i, "-"] = 0; next }
    dirq[$9] = i; rec[i] = $8
    if ($6 != "-") {
        np = split($6, parts, ",")
        for (k = 1; k <= np; k++) {
            step = 1; lohi = parts[k]
            if (index(lohi, ":")) { split(lohi, st, ":"); lohi = st[1]; step = st[2] + 0 }
            if (index(lohi, "-")) { split(lohi, b, "-"); lo = b[1] + 0; hi = b[2] + 0 } else { lo = lohi + 0; hi = lo }
            for (f = lo; f <= hi; f += step) done[i, f] = 1
        }
    }
    if ($7 != "-") {
        no = split($7, os, ",")
        for (k = 1; k <= no; k++) { split(os[k], c, ":"); off[i, c[1] + 0] = c[2]; sk[i, c[1] + 0] = c[3] }
    }
    next
}
$1 == "F" {
    size = $2 + 0; p = $3
    if (p in single) { i = single[p]; n = "-" }
    else {
        d = p; sub(/\/[^\/]*$/, "", d)
        if (!(d in dirq)) next
        i = dirq[d]; n = substr(p, length(d) + 2); sub(/\.jsonl$/, "", n)
        if (n !~ /^[0-9]+$/) next
        n = n + 0
        if ((i, n) in done) next
    }
    o = ((i, n) in off) ? off[i, n] + 0 : 0
    e = ended[i]
    if (n != "-" && !e) { r = rec[i] "/" n; if ((getline l < r) > 0) e = 1; close(r) }
    if (size == o && (n == "-" || !e)) next
    if (size < o) o = 0
    start = o; len = size - o
    if (skip[i]) { start = size; len = 0 }
    else if (len > per) { start = size - per; len = per }
    if (len > 0 && used + len > budget) { cut[i] = 1; next }
    used += len
    print i, n, start, len, size, e, p
}
END { for (k = 1; k <= nq; k++) if (!(order[k] in cut)) print "OK", order[k] }'"#;

/// Reads what [`PLAN`] decided: one `dd` per file that grew, each file's bytes between
/// a header line giving their length and a trailer line that must follow them
/// exactly, all of it base64-encoded once (`POSTSB <b64>`): a fork per file, not three.
const READ: &str = r#"printf 'POSTSB %s\n' "$(while read -r hpcg_i hpcg_n hpcg_start hpcg_len hpcg_size hpcg_e hpcg_p; do
    if [ "$hpcg_i" = OK ]; then printf 'POSTSOK %s\n' "$hpcg_n"; continue; fi
    printf 'POSTS %s %s %s %s %s %s\n' "$hpcg_i" "$hpcg_n" "$hpcg_start" "$hpcg_size" "$hpcg_e" "$hpcg_len"
    if [ "$hpcg_len" -gt 0 ]; then
        dd if="$hpcg_p" bs=65536 skip="$hpcg_start" count="$hpcg_len" iflag=skip_bytes,count_bytes status=none
    fi
    printf '\nPOSTSEND %s %s\n' "$hpcg_i" "$hpcg_start"
done | hpcg_b64)"
"#;

/// What [`posts_script`] printed: query index → answer. A query with no `POSTSOK`
/// was cut short; what was read of it still counts. If a file's bytes fall short of
/// the length announced (it was cut meanwhile), the rest of the answer cannot be
/// framed and is left out: those files are read again next time.
pub fn parse_posts(body: &str) -> BTreeMap<usize, PostsAnswer> {
    let mut out: BTreeMap<usize, PostsAnswer> = BTreeMap::new();
    let Some(blob) = body.lines().find_map(|l| l.strip_prefix("POSTSB ")) else { return out };
    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(blob.trim()) else { return out };
    let mut at = 0;
    while at < bytes.len() {
        let Some(nl) = bytes[at..].iter().position(|&b| b == b'\n') else { break };
        let Ok(header) = std::str::from_utf8(&bytes[at..at + nl]) else { break };
        at += nl + 1;
        if let Some(i) = header.strip_prefix("POSTSOK ") {
            let Ok(i) = i.trim().parse() else { break };
            out.entry(i).or_default().complete = true;
            continue;
        }
        let Some(rest) = header.strip_prefix("POSTS ") else { break };
        let f: Vec<&str> = rest.split(' ').collect();
        let (Some(i), Some(Ok(frame)), Some(start), Some(size), Some(ended), Some(len)) = (
            f.first().and_then(|v| v.parse::<usize>().ok()),
            f.get(1).map(|v| if *v == "-" { Ok(None) } else { v.parse::<u32>().map(Some) }),
            f.get(2).and_then(|v| v.parse::<u64>().ok()),
            f.get(3).and_then(|v| v.parse::<u64>().ok()),
            f.get(4).map(|v| *v == "1"),
            f.get(5).and_then(|v| v.parse::<usize>().ok()),
        ) else {
            break;
        };
        let trailer = format!("\nPOSTSEND {i} {start}\n");
        if len > bytes.len() - at || start + len as u64 > size || !bytes[at + len..].starts_with(trailer.as_bytes()) {
            break;
        }
        let read = FileRead { frame, start, size, ended, bytes: bytes[at..at + len].to_vec() };
        at += len + trailer.len();
        out.entry(i).or_default().reads.push(read);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::posts::FrameCursor;
    use std::process::Command;

    fn sh(script: &str) -> String {
        let full = format!("{}{script}", super::super::common::HELPERS);
        // As the engine runs it: `sh -s` (dash here, as on Debian clusters).
        let out = Command::new("sh").arg("-c").arg(&full).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn query(run_dir: &std::path::Path, phase: &str, frames: bool, cursor: PostsCursor) -> PostsQuery {
        PostsQuery {
            source: Source::Posts,
            run_dir: run_dir.to_string_lossy().into_owned(),
            phase: Phase::parse(phase).unwrap(),
            frames,
            ended: false,
            skip: false,
            cursor,
        }
    }

    #[test]
    fn only_new_bytes_are_read_and_a_file_that_did_not_grow_costs_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run dir");
        std::fs::create_dir_all(run.join(".hpcforge/posts")).unwrap();
        std::fs::write(run.join(".hpcforge/posts/execute.jsonl"), "{\"event\":\"a\"}\n{\"event\":\"b\"}\n").unwrap();
        std::fs::write(run.join(".hpcforge/posts/prolog.jsonl"), "{\"event\":\"p\"}\n").unwrap();
        let qs = [
            query(&run, "execute", false, PostsCursor { offset: 14, ..Default::default() }),
            query(&run, "prolog", false, PostsCursor { offset: 14, ..Default::default() }),
            query(&run, "epilog", false, PostsCursor::default()),
        ];
        let answers = parse_posts(&sh(&posts_script(&qs)));
        assert_eq!(
            answers[&0].reads,
            [FileRead { frame: None, start: 14, size: 28, ended: false, bytes: b"{\"event\":\"b\"}\n".to_vec() }]
        );
        assert!(answers[&0].complete);
        // Nothing new, no file at all: looked at, nothing read.
        assert!(answers[&1].reads.is_empty() && answers[&1].complete);
        assert!(answers[&2].reads.is_empty() && answers[&2].complete);
    }

    #[test]
    fn frames_are_read_from_their_own_cursors_and_an_ended_frame_is_reported_once_read() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let posts = run.join(".hpcforge/posts/render");
        let records = run.join(".hpcforge/frames/render");
        std::fs::create_dir_all(&posts).unwrap();
        std::fs::create_dir_all(&records).unwrap();
        for f in 1..=5 {
            std::fs::write(posts.join(format!("{f}.jsonl")), format!("{{\"event\":\"f{f}\"}}\n")).unwrap();
        }
        std::fs::write(posts.join("notes.jsonl"), "x\n").unwrap();
        // Frame 2 ended (its record is there); 1 and 3 were read before; 4 is done.
        std::fs::write(records.join("2"), "0 1 2 7 1\n").unwrap();
        std::fs::write(records.join("3"), "0 1 2 7 1\n").unwrap();
        let cursor = PostsCursor {
            done: Some("4".into()),
            open: vec![
                FrameCursor { frame: 1, offset: 15, skipping: false },
                FrameCursor { frame: 3, offset: 15, skipping: false },
            ],
            ..Default::default()
        };
        let answers = parse_posts(&sh(&posts_script(&[query(run, "render", true, cursor)])));
        let mut got: Vec<(Option<u32>, u64, bool, usize)> =
            answers[&0].reads.iter().map(|r| (r.frame, r.start, r.ended, r.bytes.len())).collect();
        got.sort();
        // 1: nothing new, still running: not listed. 3: nothing new but ended: listed
        // (the engine marks it done). 2 and 5: read whole.
        assert_eq!(got, [(Some(2), 0, true, 15), (Some(3), 15, true, 0), (Some(5), 0, false, 15)]);
        assert!(answers[&0].complete);
    }

    #[test]
    fn an_output_file_is_read_like_a_posts_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("execute-7.err");
        std::fs::write(&path, "error: mesh wing inverted\n").unwrap();
        let mut q = query(tmp.path(), "execute", false, PostsCursor::default());
        q.source = Source::Output { stderr: true, job: "7".into(), path: path.to_string_lossy().into_owned() };
        let answers = parse_posts(&sh(&posts_script(&[q])));
        assert_eq!(answers[&0].reads[0].bytes, b"error: mesh wing inverted\n", "{answers:?}");
        assert!(answers[&0].complete);
    }

    #[test]
    fn a_frame_phase_output_is_read_per_frame_from_its_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let out = run.join(crate::model::rules::frame_output_dir(Phase::EXECUTE, true));
        let records = run.join(".hpcforge/frames/execute");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::create_dir_all(&records).unwrap();
        std::fs::write(out.join("2"), "error: frame 2\n").unwrap();
        std::fs::write(out.join("10"), "running\n").unwrap();
        std::fs::write(records.join("2"), "1 a b 7 1\n").unwrap();
        let mut q = query(run, "execute", true, PostsCursor::default());
        q.source = Source::Output { stderr: true, job: "7".into(), path: out.to_string_lossy().into_owned() };
        let answers = parse_posts(&sh(&posts_script(&[q])));
        let mut got: Vec<(Option<u32>, bool, Vec<u8>)> =
            answers[&0].reads.iter().map(|r| (r.frame, r.ended, r.bytes.clone())).collect();
        got.sort();
        assert_eq!(got, [(Some(2), true, b"error: frame 2\n".to_vec()), (Some(10), false, b"running\n".to_vec())]);
    }

    #[test]
    fn an_answer_that_cannot_be_framed_keeps_what_came_before_and_drops_the_rest() {
        use base64::Engine as _;
        let enc = |raw: &[u8]| format!("POSTSB {}\n", base64::engine::general_purpose::STANDARD.encode(raw));
        let good = b"POSTS 0 - 0 3 0 3\nab\n\nPOSTSEND 0 0\nPOSTSOK 0\n";
        let mut cut = good.to_vec();
        // A file that shrank between the listing and the read: 2 bytes, not 5; what
        // follows would otherwise be taken as its bytes.
        cut.extend_from_slice(b"POSTS 1 - 0 5 0 5\nxy\nPOSTSEND 1 0\nPOSTSOK 1\n");
        let answers = parse_posts(&enc(&cut));
        assert_eq!(answers[&0].reads[0].bytes, b"ab\n");
        assert!(answers[&0].complete);
        assert!(!answers.contains_key(&1), "{answers:?}");
        assert!(parse_posts("POSTSB not-base64!\n").is_empty());
    }

    #[test]
    fn a_flood_is_read_from_its_newest_part_and_the_round_trip_stays_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let posts = run.join(".hpcforge/posts");
        std::fs::create_dir_all(&posts).unwrap();
        let line = "{\"event\":\"tick\"}\n";
        let big = line.repeat((READ_PER_FILE as usize / line.len()) * 3);
        let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q", "r"];
        for n in names {
            std::fs::write(posts.join(format!("{n}.jsonl")), &big).unwrap();
        }
        let qs: Vec<PostsQuery> = names.iter().map(|n| query(run, n, false, PostsCursor::default())).collect();
        let answers = parse_posts(&sh(&posts_script(&qs)));
        let read: u64 = answers.values().flat_map(|a| &a.reads).map(|r| r.bytes.len() as u64).sum();
        assert!(read <= READ_PER_QUERY, "{read}");
        assert_eq!(read, READ_PER_QUERY / READ_PER_FILE * READ_PER_FILE);
        for r in answers.values().flat_map(|a| &a.reads) {
            assert_eq!((r.start + r.bytes.len() as u64, r.bytes.len() as u64), (r.size, READ_PER_FILE));
        }
        // The files left over are said to be so: their queries are not complete.
        let complete = (0..qs.len()).filter(|i| answers.get(i).is_some_and(|a| a.complete)).count();
        assert_eq!(complete as u64, READ_PER_QUERY / READ_PER_FILE);
        assert_eq!(answers.len(), complete, "a query left over printed nothing");
    }
}
