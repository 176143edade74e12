//! What jobs posted, taken into their tasks: the monitor reads the posts files on its
//! status round trip ([`crate::scheduler::posts`]); this turns what it read into the
//! task's events (marked as the job's), moves the phase's cursor on in the same
//! write, counts what was dropped and says so in an event, and decides when a phase
//! that ended has been read to its end. Pure: the monitor does the I/O.

use time::{Duration, OffsetDateTime};

use crate::model::posts::{MAX_TASK_POST_BYTES, MAX_TASK_POSTS, Post, READ_PER_FILE, clip_to, read_posts};
use crate::model::task::JobPost;
use crate::model::{Phase, Task};
use crate::scheduler::posts::{FileRead, PostsAnswer, PostsQuery, Source};

/// How long after a job ended the engine keeps trying to read what it posted, when
/// the cluster does not answer; then it says it gave up.
pub const DRAIN_LIMIT: Duration = Duration::minutes(15);

/// How many reasons an event about dropped lines lists.
const LISTED_REASONS: usize = 3;

/// The phases of `t` whose posts are read this tick, as queries.
pub fn queries(t: &Task) -> Vec<PostsQuery> {
    t.phases
        .iter()
        .filter(|p| p.posts_pending())
        .map(|p| PostsQuery {
            source: Source::Posts,
            run_dir: t.run_dir.clone(),
            phase: p.phase,
            frames: p.frames.is_some(),
            ended: p.state.is_final(),
            skip: t.posted.full(),
            cursor: p.posts.clone(),
        })
        .collect()
}

/// Applies what was read for `q` (after the status answers of the same round trip,
/// so that a phase the answers say has ended had ended before its files were read).
/// `answer`: `None` when the round trip did not get that far.
pub fn apply(t: &mut Task, q: &PostsQuery, answer: Option<&PostsAnswer>, at: OffsetDateTime) {
    let phase = q.phase;
    let rec = t.phase(phase);
    let Some(job) = rec.job_id.clone() else { return };
    // The phase was restarted meanwhile: its cursor is not the one the query read with.
    if rec.posts != q.cursor {
        return;
    }
    let ended_before = rec.state.is_final();
    let Some(answer) = answer else {
        give_up_if_too_late(t, phase, at);
        return;
    };
    for read in &answer.reads {
        take(t, phase, &job, read, ended_before, at);
    }
    let rec = t.phase_mut(phase);
    // Read to the end after the job ended: every file was looked at, and (frames)
    // every frame's file was read with the job known to have ended.
    if answer.complete && ended_before && (q.ended || rec.frames.is_none() || rec.posts.open.is_empty()) {
        rec.posts.drained = true;
    } else {
        give_up_if_too_late(t, phase, at);
    }
}

/// Marks a phase that ended long ago and still could not be read as read, saying so.
fn give_up_if_too_late(t: &mut Task, phase: Phase, at: OffsetDateTime) {
    let rec = t.phase(phase);
    if !rec.state.is_final() || rec.posts.drained || rec.ended_at.is_none_or(|e| at - e < DRAIN_LIMIT) {
        return;
    }
    t.phase_mut(phase).posts.drained = true;
    t.record(
        at,
        Some(phase),
        format!(
            "{phase}: stopped reading what its job posted: the cluster did not let it be read for {} minutes after the job ended",
            DRAIN_LIMIT.whole_minutes()
        ),
    );
}

/// Takes one file's bytes: the posts as events, the cursor moved on, what was
/// dropped counted and said.
fn take(t: &mut Task, phase: Phase, job: &str, read: &FileRead, ended_before: bool, at: OffsetDateTime) {
    let rec = t.phase(phase);
    let (mut offset, mut skipping) = match read.frame {
        None => (rec.posts.offset, rec.posts.skipping),
        Some(f) => rec.posts.open.iter().find(|c| c.frame == f).map_or((0, false), |c| (c.offset, c.skipping)),
    };
    let place = match read.frame {
        Some(f) => format!("{phase} (frame {f})"),
        None => phase.to_string(),
    };
    if read.start < offset {
        t.record(
            at,
            Some(phase),
            format!("{place}: its posts file was replaced by a shorter one; read again from its start"),
        );
        (offset, skipping) = (0, false);
    }
    if read.start > offset {
        let skipped = read.start - offset;
        t.posted.skipped_bytes += skipped;
        skipping = true;
        if !t.posted.full() {
            t.record(
                at,
                Some(phase),
                format!(
                    "{place}: skipped {skipped} bytes of what the job posted: it posted more than {} KiB between two reads; the newest were read",
                    READ_PER_FILE >> 10
                ),
            );
        }
    }
    let ended = read.ended || ended_before;
    let r = read_posts(&read.bytes, skipping, ended);
    let mut dropped: Vec<String> = r.dropped.iter().map(|(_, why)| why.clone()).collect();
    let mut over_cap = 0u64;
    for post in r.posts {
        if t.posted.full() {
            over_cap += 1;
            continue;
        }
        let (message, post, size) = describe(post, job, read.frame);
        t.posted.kept += 1;
        t.posted.bytes += size;
        t.record_post(at, phase, message, post);
        if t.posted.full() {
            t.record(
                at,
                None,
                format!(
                    "the task keeps at most {MAX_TASK_POSTS} posts of its jobs and {} MiB of them: later posts are counted, not kept",
                    MAX_TASK_POST_BYTES >> 20
                ),
            );
        }
    }
    t.posted.dropped_lines += dropped.len() as u64 + over_cap;
    if !dropped.is_empty() {
        let n = dropped.len();
        dropped.truncate(LISTED_REASONS);
        let more = if n > LISTED_REASONS { format!("; and {} more", n - LISTED_REASONS) } else { String::new() };
        t.record(
            at,
            Some(phase),
            format!(
                "{place}: {n} line{} of what the job posted {} not taken: {}{more}",
                if n == 1 { "" } else { "s" },
                if n == 1 { "was" } else { "were" },
                dropped.join("; ")
            ),
        );
    }
    let new_offset = read.start + r.consumed as u64;
    let rec = t.phase_mut(phase);
    match read.frame {
        None => (rec.posts.offset, rec.posts.skipping) = (new_offset, r.skipping),
        Some(f) => {
            let finished = read.ended && new_offset >= read.size && !r.skipping;
            rec.posts.move_frame(f, new_offset, r.skipping, finished);
        }
    }
}

/// A post as the task keeps it: its words, the post, and its size against the cap.
fn describe(post: Post, job: &str, frame: Option<u32>) -> (String, JobPost, u64) {
    let at_frame = frame.map(|f| format!("frame {f}: ")).unwrap_or_default();
    let base =
        JobPost { job: job.to_owned(), frame, event: None, data: None, key: None, value: None, time: None, rule: None };
    match post {
        Post::Event { kind, data, message, time } => {
            let size = (kind.len() + message.as_ref().map_or(0, String::len) + json_len(&data)) as u64;
            let words = match &message {
                Some(m) => format!("{at_frame}{kind}: {m}"),
                None => format!("{at_frame}{kind}"),
            };
            let data = (!data.is_null()).then_some(data);
            (words, JobPost { event: Some(kind), data, time, ..base }, size)
        }
        Post::Datum { key, value, time } => {
            let size = (key.len() + json_len(&value)) as u64;
            let words = format!("{at_frame}{key} = {}", clip_to(&value.to_string(), 120));
            (words, JobPost { key: Some(key), value: Some(value), time, ..base }, size)
        }
    }
}

fn json_len(v: &serde_json::Value) -> usize {
    if v.is_null() { 0 } else { v.to_string().len() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PhaseState;
    use crate::model::posts::PostsCursor;

    fn task() -> Task {
        let mut t = crate::model::task::sample_task(OffsetDateTime::UNIX_EPOCH);
        t.run_dir = "/home/alice/hpcforge/t".into();
        let rec = t.phase_mut(Phase::EXECUTE);
        rec.job_id = Some("42".into());
        rec.state = PhaseState::Running;
        t
    }

    fn read(start: u64, text: &str, ended: bool) -> FileRead {
        FileRead { frame: None, start, size: start + text.len() as u64, ended, bytes: text.as_bytes().to_vec() }
    }

    fn q(t: &Task) -> PostsQuery {
        queries(t).into_iter().find(|q| q.phase == Phase::EXECUTE).unwrap()
    }

    fn posts(t: &Task) -> Vec<&JobPost> {
        t.events.iter().filter_map(|e| e.post.as_ref()).collect()
    }

    #[test]
    fn posts_become_the_jobs_events_and_the_cursor_moves_past_whole_lines_only() {
        let mut t = task();
        let at = OffsetDateTime::UNIX_EPOCH;
        let text = "{\"event\":\"converged\",\"data\":{\"step\":3},\"message\":\"done\"}\n{\"key\":\"residual\",\"value\":0.5}\n{\"event\":\"hal";
        let query = q(&t);
        apply(&mut t, &query, Some(&PostsAnswer { reads: vec![read(0, text, false)], complete: true }), at);
        let p = posts(&t);
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].event.as_deref(), p[0].job.as_str()), (Some("converged"), "42"));
        assert_eq!(p[1].value, Some(serde_json::json!(0.5)));
        let msgs: Vec<&str> = t.events.iter().map(|e| e.message.as_str()).collect();
        assert!(msgs.contains(&"converged: done") && msgs.contains(&"residual = 0.5"), "{msgs:?}");
        let rec = t.phase(Phase::EXECUTE);
        assert_eq!(rec.posts.offset, text.rfind('\n').unwrap() as u64 + 1);
        // Still running: not read to the end yet.
        assert!(!rec.posts.drained && t.is_live());
        assert_eq!((t.posted.kept, t.posted.dropped_lines), (2, 0));
    }

    #[test]
    fn a_phase_that_ended_is_drained_by_a_complete_read_and_its_last_line_is_taken() {
        let mut t = task();
        let at = OffsetDateTime::UNIX_EPOCH;
        t.set_phase_state(at, Phase::EXECUTE, PhaseState::Completed, None);
        let query = q(&t);
        apply(
            &mut t,
            &query,
            Some(&PostsAnswer { reads: vec![read(0, "{\"event\":\"last\"}", true)], complete: true }),
            at,
        );
        assert_eq!(posts(&t).len(), 1);
        assert!(t.phase(Phase::EXECUTE).posts.drained);
        // Cut short: not drained, read again next time.
        let mut t = task();
        t.set_phase_state(at, Phase::EXECUTE, PhaseState::Completed, None);
        let query = q(&t);
        apply(&mut t, &query, Some(&PostsAnswer { reads: vec![], complete: false }), at);
        assert!(!t.phase(Phase::EXECUTE).posts.drained);
    }

    #[test]
    fn skips_and_malformed_lines_are_counted_and_said_and_the_caps_hold() {
        let mut t = task();
        let at = OffsetDateTime::UNIX_EPOCH;
        let query = q(&t);
        let text = "\"tail of a skipped line\"}\nnot json\n{\"event\":\"ok\"}\n";
        apply(&mut t, &query, Some(&PostsAnswer { reads: vec![read(1000, text, false)], complete: true }), at);
        assert_eq!(t.posted.skipped_bytes, 1000);
        assert_eq!((t.posted.kept, t.posted.dropped_lines), (1, 1));
        let msgs: Vec<&str> = t.events.iter().map(|e| e.message.as_str()).collect();
        assert!(msgs.iter().any(|m| m.contains("skipped 1000 bytes")), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.contains("1 line of what the job posted was not taken: not JSON")), "{msgs:?}");
        // At the cap: counted, not kept, said once.
        t.posted.kept = MAX_TASK_POSTS - 1;
        let query = q(&t);
        let more = "{\"event\":\"a\"}\n{\"event\":\"b\"}\n{\"event\":\"c\"}\n";
        apply(
            &mut t,
            &query,
            Some(&PostsAnswer { reads: vec![read(query.cursor.offset, more, false)], complete: true }),
            at,
        );
        assert_eq!((t.posted.kept, t.posted.dropped_lines), (MAX_TASK_POSTS, 3));
        assert_eq!(t.events.iter().filter(|e| e.message.contains("later posts are counted")).count(), 1);
        assert!(q(&t).skip, "a full task reads nothing more");
    }

    #[test]
    fn frames_are_done_once_read_to_the_end_after_they_ended_and_a_rerun_forgets_them() {
        let mut t = task();
        let at = OffsetDateTime::UNIX_EPOCH;
        t.phase_mut(Phase::EXECUTE).frames = Some(crate::model::task::FrameProgress {
            range: "1-4".into(),
            total: 4,
            per_job: 1,
            max_parallel: None,
            selection: None,
            completed: 0,
            failed: 0,
            failures: vec![],
        });
        let query = q(&t);
        let f = |frame, start: u64, text: &str, ended| FileRead {
            frame: Some(frame),
            start,
            size: start + text.len() as u64,
            ended,
            bytes: text.as_bytes().to_vec(),
        };
        let reads = vec![f(1, 0, "{\"event\":\"a\"}\n", true), f(2, 0, "{\"event\":\"b\"}\n", false)];
        apply(&mut t, &query, Some(&PostsAnswer { reads, complete: true }), at);
        let c = &t.phase(Phase::EXECUTE).posts;
        assert_eq!(c.done.as_deref(), Some("1"));
        assert_eq!(c.open, [crate::model::posts::FrameCursor { frame: 2, offset: 14, skipping: false }]);
        assert_eq!(posts(&t).iter().map(|p| p.frame).collect::<Vec<_>>(), [Some(1), Some(2)]);
        let mut c: PostsCursor = c.clone();
        c.forget_frames(Some(&crate::model::frames::FrameRange::parse("1", 10).unwrap()));
        assert_eq!((c.done, c.open.len()), (None, 1));
    }

    #[test]
    fn a_phase_that_cannot_be_read_long_after_it_ended_is_given_up_with_an_event() {
        let mut t = task();
        let at = OffsetDateTime::UNIX_EPOCH;
        t.set_phase_state(at, Phase::EXECUTE, PhaseState::Completed, None);
        t.phase_mut(Phase::EXECUTE).ended_at = Some(at);
        let query = q(&t);
        apply(&mut t, &query, None, at + Duration::minutes(1));
        assert!(!t.phase(Phase::EXECUTE).posts.drained);
        apply(&mut t, &query, None, at + DRAIN_LIMIT);
        assert!(t.phase(Phase::EXECUTE).posts.drained);
        assert!(t.events.last().unwrap().message.contains("stopped reading"));
    }
}
