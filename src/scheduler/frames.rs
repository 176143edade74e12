//! The shell plumbing of frame phases every scheduler shares: where frames record how
//! they ended, the lines a submission runs before a job array (the frames to run, old
//! records cleared), the shell function that gives an element its frames, and the
//! scripts (with their parsers) that tally the records each tick, list the frames that
//! succeeded for a restart, and read one page of records.

use std::collections::{BTreeMap, BTreeSet};

use super::common::{HELPERS, unb64};
use crate::shell::shell_quote;

/// Where a phase's frames record how they ended, relative to the run directory:
/// `<dir>/<frame>` holds `<exit status> <start> <end> <array job> <element>`. The
/// frames a submission runs are in `<dir>.run` (a canonical range).
pub fn frames_dir(phase: crate::model::Phase) -> String {
    format!(".hpcforge/frames/{phase}")
}

/// How many failed frames a status query lists (the lowest numbers); the rest are
/// counted.
pub const LISTED_FAILURES: usize = 100;

/// The lines that print, for each job array of `jobs` that runs frames, a tally of
/// the records its phase's frames left ([`frames_dir`]): `FRAMES <job> <b64>`, the
/// text holding `C <succeeded> <failed>` and one `F <frame> <exit status>` per failed
/// frame, the [`LISTED_FAILURES`] lowest. One `find` and one `awk` per array,
/// reading each record once, however many frames; the answer's size does not grow
/// with them. Read by [`parse_frames`].
pub fn frame_records_script(jobs: &[super::JobQuery]) -> String {
    let mut s = String::new();
    for j in jobs.iter().filter(|j| j.frames) {
        let dir = shell_quote(&format!("{}/{}", j.run_dir, frames_dir(j.phase))).into_owned();
        s.push_str(&format!(
            "if [ -d {dir} ]; then printf 'FRAMES %s %s\\n' {id} \"$(find {dir} -mindepth 1 -maxdepth 1 -type f ! -name '*.tmp' | {TALLY} | hpcg_b64)\"; fi\n",
            id = shell_quote(&j.job_id),
        ));
    }
    s
}

/// Reads frame records whose paths come on standard input, one per line, and prints
/// `C <succeeded> <failed>` and `F <frame> <exit status>` for the lowest failed frames.
const TALLY: &str = r#"awk '{ n = $0; sub(/.*\//, "", n); if ((getline l < $0) > 0) { split(l, r, " "); if (r[1] == "0") ok++; else { bad++; print "F", n, r[1] } } close($0) } END { print "C", ok + 0, bad + 0 }' | sort -k2,2n | awk -v max=100 '$1 == "C" || n++ < max'"#;

/// The frame tallies [`frame_records_script`] printed: job ID → tally.
pub fn parse_frames(body: &str) -> BTreeMap<String, super::FrameTally> {
    let mut out: BTreeMap<String, super::FrameTally> = BTreeMap::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("FRAMES ") else { continue };
        let (job, text) = rest.split_once(' ').unwrap_or((rest, ""));
        let mut tally = super::FrameTally::default();
        let mut counted = false;
        for l in unb64(text).lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                ["C", ok, bad] => {
                    if let (Ok(ok), Ok(bad)) = (ok.parse(), bad.parse()) {
                        (tally.completed, tally.failed, counted) = (ok, bad, true);
                    }
                }
                ["F", frame, rc] => {
                    if let (Ok(frame), Ok(rc)) = (frame.parse(), rc.parse()) {
                        tally.failures.push((frame, rc));
                    }
                }
                _ => {}
            }
        }
        tally.failures.sort_unstable();
        tally.failures.truncate(LISTED_FAILURES);
        // No count line: the query was cut short; nothing is known this time.
        if counted {
            out.insert(job.to_owned(), tally);
        }
    }
    out
}

/// One script, run as the user, printing for each of `phases` (which run per frame)
/// the frames whose records say they succeeded: `DONE <phase> <b64 of one frame per
/// line>`, then `END`. Read by [`parse_frames_done`].
pub fn frames_done_script(run_dir: &str, phases: &[crate::model::Phase]) -> String {
    let mut s = String::from(HELPERS);
    for p in phases {
        let dir = shell_quote(&format!("{run_dir}/{}", frames_dir(*p))).into_owned();
        s.push_str(&format!(
            "printf 'DONE {p} %s\\n' \"$(find {dir} -mindepth 1 -maxdepth 1 -type f ! -name '*.tmp' 2>/dev/null | awk '{{ n = $0; sub(/.*\\//, \"\", n); if ((getline l < $0) > 0 && l ~ /^0 /) print n; close($0) }}' | hpcg_b64)\"\n"
        ));
    }
    s.push_str("echo END\n");
    s
}

/// The frames [`frames_done_script`] found succeeded, for each of `phases`; an
/// answer cut short (no `END`, or a phase missing) is an error.
pub fn parse_frames_done(
    body: &str,
    phases: &[crate::model::Phase],
) -> Result<BTreeMap<crate::model::Phase, BTreeSet<u32>>, String> {
    if !body.lines().any(|l| l == "END") {
        return Err("the answer was cut short".into());
    }
    let mut out = BTreeMap::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("DONE ") else { continue };
        let (phase, text) = rest.split_once(' ').unwrap_or((rest, ""));
        let Ok(phase) = crate::model::Phase::parse(phase) else { continue };
        let frames: BTreeSet<u32> = unb64(text).lines().filter_map(|l| l.trim().parse().ok()).collect();
        out.insert(phase, frames);
    }
    match phases.iter().find(|p| !out.contains_key(p)) {
        Some(p) => Err(format!("nothing was said about the frames of `{p}`")),
        None => Ok(out),
    }
}

/// Which frame records [`frame_page_script`] reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameRecords {
    /// Those of these frames (one page of the range).
    Of(Vec<u32>),
    /// Every record whose exit status is not 0.
    Failed,
    /// Every record whose exit status is 0.
    Succeeded,
}

/// One script, run as the user, printing `RECORDS <b64>`: for each record of
/// `phase`'s frames that `which` asks for, `<frame> <exit status> <start> <end> <job>
/// <element>`, sorted by frame; then `END`. Read by [`parse_frame_page`].
pub fn frame_page_script(run_dir: &str, phase: crate::model::Phase, which: &FrameRecords) -> String {
    let dir = shell_quote(&format!("{run_dir}/{}", frames_dir(phase))).into_owned();
    let list = "find . -mindepth 1 -maxdepth 1 -type f ! -name '*.tmp' | sed 's|^\\./||'";
    let read = match which {
        FrameRecords::Of(frames) => {
            let names: Vec<String> = frames.iter().map(u32::to_string).collect();
            format!(
                "for hpcg_f in {}; do [ -f \"$hpcg_f\" ] && set -- \"$@\" \"$hpcg_f\"; done; [ $# -eq 0 ] || awk 'FNR == 1 {{ print FILENAME, $0 }}' \"$@\"",
                names.join(" ")
            )
        }
        FrameRecords::Failed => {
            format!("{list} | awk '{{ if ((getline l < $0) > 0 && l !~ /^0 /) print $0, l; close($0) }}'")
        }
        FrameRecords::Succeeded => {
            format!("{list} | awk '{{ if ((getline l < $0) > 0 && l ~ /^0 /) print $0, l; close($0) }}'")
        }
    };
    format!(
        "{HELPERS}set --\nif cd {dir} 2>/dev/null; then printf 'RECORDS %s\\n' \"$({{ {read}; }} | sort -n | hpcg_b64)\"; else printf 'RECORDS \\n'; fi\necho END\n"
    )
}

/// One frame's record, as [`frame_page_script`] printed it.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameRecord {
    /// The frame.
    pub frame: u32,
    /// Its exit status.
    pub exit_code: i32,
    /// When it started and ended (UTC, `2026-12-04T10:00:00`).
    pub started: String,
    /// See `started`.
    pub ended: String,
    /// The job (array job ID) and the element that ran it.
    pub job: String,
    /// See `job`.
    pub element: String,
    /// CPU seconds the frame used (what its subshell waited for), where the node's
    /// `/proc` could tell.
    pub cpu_seconds: Option<f64>,
    /// The node it ran on.
    pub node: Option<String>,
}

/// The records [`frame_page_script`] printed; an answer cut short is an error.
pub fn parse_frame_page(body: &str) -> Result<Vec<FrameRecord>, String> {
    if !body.lines().any(|l| l == "END") {
        return Err("the answer was cut short".into());
    }
    let text = body.lines().find_map(|l| l.strip_prefix("RECORDS ")).map(unb64).unwrap_or_default();
    Ok(text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(FrameRecord {
                frame: f.first()?.parse().ok()?,
                exit_code: f.get(1)?.parse().ok()?,
                started: f.get(2).copied().unwrap_or("").to_owned(),
                ended: f.get(3).copied().unwrap_or("").to_owned(),
                job: f.get(4).copied().unwrap_or("").to_owned(),
                element: f.get(5).copied().unwrap_or("").to_owned(),
                cpu_seconds: match (
                    f.get(6).and_then(|t| t.parse::<u64>().ok()),
                    f.get(7).and_then(|h| h.parse::<u64>().ok()),
                ) {
                    (Some(t), Some(h)) if h > 0 => Some(crate::model::usage::round3(t as f64 / h as f64)),
                    _ => None,
                },
                node: f.get(8).map(|n| (*n).to_owned()),
            })
        })
        .collect())
}

/// The shell functions a plan's [`frames_prep`] lines need: [`FRAMES_OF`] when a
/// phase reruns only some of its frames, else nothing.
pub fn frames_helpers(plan: &super::SubmitPlan) -> &'static str {
    if plan.phases.iter().any(|p| p.array.as_ref().is_some_and(|a| !a.whole)) { FRAMES_OF } else { "" }
}

/// The lines a submission runs before handing `phase`'s job array to the scheduler
/// (inside `if [ "$hpcg_go" = 1 ]`): the records of the frames it is about to run
/// are removed (all of them for a whole run), so what is there afterwards is theirs,
/// and the frames to run are written to `<frames dir>.run`, which the forged frame
/// loop reads. On failure the phase is reported refused with the shell's words, and
/// nothing more is submitted. Needs [`FRAMES_OF`] for a partial run.
pub fn frames_prep(phase: crate::model::Phase, a: &super::ArraySpec) -> String {
    let sel = shell_quote(&a.frames).into_owned();
    // The frames that run again start new posts and output files (the engine forgets
    // how far it read the old ones, `PhaseRecord::reset_for_restart`).
    let clear = if a.whole {
        "rm -rf -- \"$hpcg_fd\" \"$hpcg_pd\" \"$hpcg_od\" && mkdir -p -- \"$hpcg_fd\"".to_owned()
    } else {
        // In each folder, the files of those frames (`<frame><suffix>`), listed once.
        let remove = |dir: &str, suffix: &str| {
            format!(
                "{{ [ ! -d \"{dir}\" ] || (cd \"{dir}\" && printf '%s\\n' \"$hpcg_rf\" | sed 's/$/{suffix}/' | xargs -r rm -f --); }}"
            )
        };
        format!(
            "hpcg_rf=$(hpcg_frames_of {sel} {n} 1 | tr ' ' '\\n') && mkdir -p -- \"$hpcg_fd\" && {} && {} && {} && {}",
            remove("$hpcg_fd", ""),
            remove("$hpcg_pd", ".jsonl"),
            remove("$hpcg_od/stdout", ""),
            remove("$hpcg_od/stderr", ""),
            n = u32::MAX / 2,
        )
    };
    format!(
        "  hpcg_fd=\"$hpcg_run\"/{dir}; hpcg_pd=\"$hpcg_run\"/{posts}; hpcg_od=\"$hpcg_run\"/{output}\n\
         \x20 if ! hpcg_out=$({{ {clear} && printf '%s\\n' {sel} > \"$hpcg_fd.run.tmp\" && mv -f -- \"$hpcg_fd.run.tmp\" \"$hpcg_fd.run\"; }} 2>&1); then\n\
         \x20   hpcg_rc=1; hpcg_out=\"could not prepare the records of the {phase} frames in $hpcg_fd: $hpcg_out\"; hpcg_report {phase}; hpcg_go=0\n\
         \x20 fi\n",
        dir = frames_dir(phase),
        posts = crate::model::posts::posts_dir(phase),
        output = frame_output_root(phase),
    )
}

/// The folder of a frame phase's frames' output files, relative to the run directory
/// (its `stdout` and `stderr` folders are [`crate::model::rules::frame_output_dir`]).
pub fn frame_output_root(phase: crate::model::Phase) -> String {
    crate::model::rules::frame_output_dir(phase, false).trim_end_matches("/stdout").to_owned()
}

/// The shell function `hpcg_frames_of RANGE K ELEMENT`: the frames (space-separated)
/// that job-array element ELEMENT (from 1) runs when each element runs K consecutive
/// frames of RANGE, written in [`crate::model::frames::FrameRange`]'s canonical form
/// (`1-9:4,12,20-25`). Walks the pieces with shell arithmetic: no file, and nothing
/// proportional to the number of frames but the K it prints. Its variables all start
/// with `hpcg_`, so an application's own are left alone.
pub const FRAMES_OF: &str = "hpcg_frames_of() {\n\
     \x20 hpcg_skip=$(( ($3 - 1) * $2 )); hpcg_left=$2; hpcg_out=\n\
     \x20 hpcg_ifs=$IFS; IFS=,\n\
     \x20 for hpcg_piece in $1; do\n\
     \x20   case $hpcg_piece in\n\
     \x20     *-*:*) hpcg_a=${hpcg_piece%%-*}; hpcg_r=${hpcg_piece#*-}; hpcg_b=${hpcg_r%%:*}; hpcg_s=${hpcg_r#*:} ;;\n\
     \x20     *-*) hpcg_a=${hpcg_piece%%-*}; hpcg_b=${hpcg_piece#*-}; hpcg_s=1 ;;\n\
     \x20     *) hpcg_a=$hpcg_piece; hpcg_b=$hpcg_piece; hpcg_s=1 ;;\n\
     \x20   esac\n\
     \x20   hpcg_n=$(( (hpcg_b - hpcg_a) / hpcg_s + 1 ))\n\
     \x20   if [ \"$hpcg_skip\" -ge \"$hpcg_n\" ]; then hpcg_skip=$(( hpcg_skip - hpcg_n )); continue; fi\n\
     \x20   hpcg_f=$(( hpcg_a + hpcg_skip * hpcg_s )); hpcg_skip=0\n\
     \x20   while [ \"$hpcg_left\" -gt 0 ] && [ \"$hpcg_f\" -le \"$hpcg_b\" ]; do\n\
     \x20     hpcg_out=\"$hpcg_out${hpcg_out:+ }$hpcg_f\"; hpcg_left=$(( hpcg_left - 1 )); hpcg_f=$(( hpcg_f + hpcg_s ))\n\
     \x20   done\n\
     \x20   [ \"$hpcg_left\" -eq 0 ] && break\n\
     \x20 done\n\
     \x20 IFS=$hpcg_ifs\n\
     \x20 printf '%s\\n' \"$hpcg_out\"\n\
     }\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_records_are_tallied_with_the_lowest_failures_and_the_successes_listed_for_a_restart() {
        let run = tempfile::tempdir().unwrap();
        let phase = crate::model::Phase::parse("render").unwrap();
        let dir = run.path().join(frames_dir(phase));
        std::fs::create_dir_all(&dir).unwrap();
        // 1-100 and 251-300 succeed; 101-250 fail with exit status 2; 301 is being written.
        for f in 1..=300u32 {
            let rc = if (101..=250).contains(&f) { 2 } else { 0 };
            std::fs::write(dir.join(f.to_string()), format!("{rc} 2026-12-04T10:00:00 2026-12-04T10:00:01 55 {f}\n"))
                .unwrap();
        }
        std::fs::write(dir.join("301.tmp"), "0 x y 55 1\n").unwrap();
        let run_dir = run.path().to_str().unwrap();
        let q = super::super::JobQuery { job_id: "55".into(), run_dir: run_dir.into(), phase, frames: true };
        let sh = |script: String| {
            let out = std::process::Command::new("sh").arg("-c").arg(script).output().unwrap();
            String::from_utf8(out.stdout).unwrap()
        };
        let tallies = parse_frames(&sh(String::from(HELPERS) + &frame_records_script(&[q])));
        let t = &tallies["55"];
        assert_eq!((t.completed, t.failed), (150, 150));
        assert_eq!(t.failures, (101..=200).map(|f| (f, 2)).collect::<Vec<_>>(), "the hundred lowest, in order");
        let done = parse_frames_done(&sh(frames_done_script(run_dir, &[phase])), &[phase]).unwrap();
        assert_eq!(done[&phase], (1..=100).chain(251..=300).collect());
        // A phase with no records yet has none done; an answer cut short is no answer.
        let other = crate::model::Phase::parse("gather").unwrap();
        assert!(parse_frames_done(&sh(frames_done_script(run_dir, &[other])), &[other]).unwrap()[&other].is_empty());
        assert!(parse_frames_done("DONE render MQo=\n", &[phase]).is_err());
    }

    #[test]
    fn each_array_element_finds_its_frames_in_the_canonical_range() {
        use crate::model::frames::FrameRange;
        for text in ["1-10:3,12,20-25", "0", "5-5,7-100:31", "1-1000"] {
            let range = FrameRange::parse(text, 100_000).unwrap();
            let canonical = range.to_string();
            let all: Vec<String> = range.frames().map(|f| f.to_string()).collect();
            for k in [1usize, 2, 3, 7] {
                let elements = all.len().div_ceil(k);
                // Every element, and one past the last (which has none), in one sh.
                let mut script = String::from(FRAMES_OF);
                for e in 1..=elements + 1 {
                    script.push_str(&format!("hpcg_frames_of '{canonical}' {k} {e}\n"));
                }
                let out = std::process::Command::new("sh").arg("-c").arg(&script).output().unwrap();
                let text_out = String::from_utf8(out.stdout).unwrap();
                let lines: Vec<&str> = text_out.lines().collect();
                assert_eq!(lines.len(), elements + 1, "{canonical} k={k}");
                let want: Vec<String> = all.chunks(k).map(|c| c.join(" ")).chain([String::new()]).collect();
                assert_eq!(lines, want, "{canonical} k={k}");
            }
        }
    }

    #[test]
    fn a_partial_rerun_removes_only_its_frames_records_posts_and_output() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run dir");
        let phase = crate::model::Phase::parse("render").unwrap();
        let dirs = [
            (run.join(frames_dir(phase)), ""),
            (run.join(crate::model::posts::posts_dir(phase)), ".jsonl"),
            (run.join(crate::model::rules::frame_output_dir(phase, false)), ""),
            (run.join(crate::model::rules::frame_output_dir(phase, true)), ""),
        ];
        for (dir, suffix) in &dirs {
            std::fs::create_dir_all(dir).unwrap();
            for f in 1..=6 {
                std::fs::write(dir.join(format!("{f}{suffix}")), "x").unwrap();
            }
        }
        let a = super::super::ArraySpec { elements: 2, max_parallel: None, frames: "2,5".into(), whole: false };
        let script = format!(
            "{FRAMES_OF}hpcg_report() {{ echo \"refused: $hpcg_out\"; }}\nhpcg_run='{}'\n{}",
            run.display(),
            frames_prep(phase, &a)
        );
        let out = std::process::Command::new("sh").arg("-c").arg(&script).output().unwrap();
        assert!(out.status.success() && out.stdout.is_empty(), "{out:?}");
        for (dir, suffix) in &dirs {
            let mut left: Vec<String> =
                std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            left.sort();
            let want: Vec<String> = [1, 3, 4, 6].iter().map(|f| format!("{f}{suffix}")).collect();
            assert_eq!(left, want, "{}", dir.display());
        }
        assert_eq!(std::fs::read_to_string(run.join(format!("{}.run", frames_dir(phase)))).unwrap(), "2,5\n");
    }
}
