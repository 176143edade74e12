//! Shell plumbing every scheduler shares: the run directory, staging, script files,
//! output tails, and the line protocol results come back in (`KEY value` lines, free
//! text in base64).

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use time::OffsetDateTime;

use super::SubmitPlan;
use crate::shell::shell_quote;

/// The script that prints the tail of `path` (at most `lines` lines and `max_bytes`
/// bytes) as `SIZE <bytes>` and `TAIL <b64>`, or `MISSING` if it cannot be read.
pub fn tail_script(path: &str, lines: usize, max_bytes: usize) -> String {
    let f = shell_quote(path);
    format!(
        "{HELPERS}f={f}\nif [ -f \"$f\" ] && [ -r \"$f\" ]; then\n  printf 'SIZE %s\\n' \"$(wc -c < \"$f\" | tr -d ' ')\"\n  printf 'TAIL %s\\n' \"$(tail -n {lines} -- \"$f\" | tail -c {max_bytes} | hpcg_b64)\"\nelse\n  printf 'MISSING\\n'\nfi\n"
    )
}

/// What [`tail_script`] printed: `None` if the file is missing, else (size, tail bytes).
pub fn parse_tail(body: &str) -> Option<(u64, Vec<u8>)> {
    let mut size = None;
    let mut tail = Vec::new();
    for line in body.lines() {
        if let Some(n) = line.strip_prefix("SIZE ") {
            size = n.trim().parse().ok();
        } else if let Some(b) = line.strip_prefix("TAIL ") {
            tail = base64::engine::general_purpose::STANDARD.decode(b.trim()).unwrap_or_default();
        } else if line.trim() == "MISSING" {
            return None;
        }
    }
    size.map(|s| (s, tail))
}

/// Base64 of `s` on one line, for free text in the line protocol.
pub fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Reverse of [`b64`]; garbage reads as itself.
pub fn unb64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_else(|| s.to_owned())
}

/// The shell helpers every script uses: `hpcg_b64` prints its stdin as one base64 line.
pub const HELPERS: &str = "hpcg_b64() { base64 | tr -d '\\n'; }\n";

/// `body` behind the cluster-side fence of a submission attempt holding claim `fence`
/// on `task`: under an exclusive `flock` on `<run>/.hpcforge/lock` (held until the
/// script ends), the highest fence any attempt showed this run directory is read from
/// `<run>/.hpcforge/fence-<task>`. If it is higher than `fence`, a newer owner has
/// been here: `FENCED <n>` is printed and `body` does not run. Otherwise `fence` is
/// written there and `body` runs, still under the lock. So an owner that lost its
/// claim while paused cannot submit once its successor has looked for jobs, and a
/// successor looking for jobs waits for a submission that is under way to end.
///
/// Without `flock` (util-linux) on the host, the check still runs, unlocked. Where the
/// run directory cannot be created, `body` runs unfenced and reports that itself.
/// Background processes `body` starts must close descriptor 9 (`9>&-`), or they
/// hold the lock.
pub fn fenced(run_dir: &str, task: &crate::model::TaskId, fence: u64, body: &str) -> String {
    let dir = shell_quote(&format!("{run_dir}/.hpcforge")).into_owned();
    format!(
        "hpcg_um=$(umask)
         umask 077
         hpcg_fd={dir}
         hpcg_fenced=0
         mkdir -p \"$hpcg_fd\" 2>/dev/null
         if [ -d \"$hpcg_fd\" ] && [ -w \"$hpcg_fd\" ]; then
         \x20 exec 9>>\"$hpcg_fd/lock\"
         \x20 if command -v flock >/dev/null 2>&1; then flock -x 9; fi
         \x20 hpcg_seen=$(cat \"$hpcg_fd/fence-{task}\" 2>/dev/null) || hpcg_seen=0
         \x20 case $hpcg_seen in ''|*[!0-9]*) hpcg_seen=0 ;; esac
         \x20 if [ \"$hpcg_seen\" -gt {fence} ]; then
         \x20   hpcg_fenced=1; printf 'FENCED %s\\n' \"$hpcg_seen\"
         \x20 elif [ \"$hpcg_seen\" -lt {fence} ]; then
         \x20   printf '%s\\n' {fence} > \"$hpcg_fd/fence-{task}.tmp\" && mv -f \"$hpcg_fd/fence-{task}.tmp\" \"$hpcg_fd/fence-{task}\"
         \x20 fi
         fi
         umask \"$hpcg_um\"
         if [ \"$hpcg_fenced\" = 0 ]; then
         {body}
         fi
"
    )
}

/// The fence a [`fenced`] script was refused for (`FENCED <n>`), if it was.
pub fn parse_fenced(body: &str) -> Option<u64> {
    body.lines().find_map(|l| l.strip_prefix("FENCED ")).map(|n| n.trim().parse().unwrap_or(u64::MAX))
}

/// Creates the run directory, stages the inputs (as the user: Unix permissions decide
/// what may be read) and writes the phase scripts to `<run>/.hpcforge/script_<phase>`.
/// Reports `STAGE <name> <status> <b64 error>` for each file.
pub fn prelude(plan: &SubmitPlan) -> Result<String, String> {
    let mut s = String::from(HELPERS);
    s.push_str("umask 077\n");
    s.push_str(&format!("hpcg_run={}\n", shell_quote(&plan.run_dir)));
    s.push_str("mkdir -p \"$hpcg_run/.hpcforge\" || printf 'STAGE %s 1 %s\\n' .hpcforge \"$(printf 'cannot create %s' \"$hpcg_run\" | hpcg_b64)\"\n");
    s.push_str("hpcg_stage_ok=1\n");
    for f in &plan.stage {
        let dst = format!("{}/{}", plan.run_dir, f.name);
        s.push_str(&format!(
            "if e=$(cp -p -- {src} {dst} 2>&1){chmod}; then printf 'STAGE %s 0 -\\n' {name}; else hpcg_stage_ok=0; printf 'STAGE %s 1 %s\\n' {name} \"$(printf '%s' \"$e\" | hpcg_b64)\"; fi\n",
            src = shell_quote(&f.source),
            dst = shell_quote(&dst),
            chmod = f.mode.map(|m| format!(" && e=$(chmod {m} {} 2>&1)", shell_quote(&dst))).unwrap_or_default(),
            name = shell_quote(&f.name),
        ));
    }
    for p in &plan.phases {
        let target = format!("\"$hpcg_run\"/.hpcforge/script_{}", p.phase);
        s.push_str(&crate::shell::heredoc_block(&target, "SCRIPT", &p.script)?);
    }
    Ok(s)
}

/// Reads the `STAGE` lines of a report.
pub fn parse_stage(body: &str) -> Vec<(String, String)> {
    body.lines()
        .filter_map(|l| l.strip_prefix("STAGE "))
        .filter_map(|rest| {
            let mut it = rest.splitn(3, ' ');
            let (name, status, msg) = (it.next()?, it.next()?, it.next().unwrap_or("-"));
            (status != "0").then(|| (name.to_owned(), unb64(msg)))
        })
        .collect()
}

/// The directive lines of a job script as a scheduler reads them: the comment block
/// after the `#!` line, up to the first command. Yields (line number from 1, the
/// words after `prefix`).
pub fn directive_lines<'a>(script: &'a str, prefix: &'a str) -> impl Iterator<Item = (usize, Vec<&'a str>)> + 'a {
    script
        .lines()
        .enumerate()
        .skip(1)
        .map(|(i, l)| (i, l.trim_start()))
        .take_while(|(_, l)| l.is_empty() || l.starts_with('#'))
        .filter_map(move |(i, l)| {
            let rest = l.strip_prefix(prefix)?;
            (rest.is_empty() || rest.starts_with(char::is_whitespace))
                .then(|| (i + 1, rest.split_whitespace().collect()))
        })
}

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
#[derive(Debug, Clone, PartialEq, Eq)]
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
    let clear = if a.whole {
        "rm -rf -- \"$hpcg_fd\" && mkdir -p -- \"$hpcg_fd\"".to_owned()
    } else {
        format!(
            "mkdir -p -- \"$hpcg_fd\" && (cd \"$hpcg_fd\" && hpcg_frames_of {sel} {n} 1 | tr ' ' '\\n' | xargs -r rm -f --)",
            n = u32::MAX / 2
        )
    };
    format!(
        "  hpcg_fd=\"$hpcg_run\"/{dir}\n\
         \x20 if ! hpcg_out=$({{ {clear} && printf '%s\\n' {sel} > \"$hpcg_fd.run.tmp\" && mv -f -- \"$hpcg_fd.run.tmp\" \"$hpcg_fd.run\"; }} 2>&1); then\n\
         \x20   hpcg_rc=1; hpcg_out=\"could not prepare the records of the {phase} frames in $hpcg_fd: $hpcg_out\"; hpcg_report {phase}; hpcg_go=0\n\
         \x20 fi\n",
        dir = frames_dir(phase),
    )
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

/// One script, run as the user, asking for each `(phase, needs, produces)` whether
/// its outputs are up to date in `run_dir`: every file it produces exists, and each is
/// newer (to the nanosecond, by `find -newer`) than every file it needs that exists.
/// Prints `FRESH <phase> 1` or `FRESH <phase> 0`; read by [`parse_fresh`].
pub fn fresh_script(run_dir: &str, phases: &[(crate::model::Phase, Vec<String>, Vec<String>)]) -> String {
    let mut s = format!("cd {} || exit 0\n", shell_quote(run_dir));
    for (phase, needs, produces) in phases {
        s.push_str("hpcg_fresh=1\n");
        for out in produces {
            let out = shell_quote(out);
            s.push_str(&format!("[ -e {out} ] || hpcg_fresh=0\n"));
            for input in needs {
                let input = shell_quote(input);
                s.push_str(&format!(
                    "if [ \"$hpcg_fresh\" = 1 ] && [ -e {input} ] && [ -z \"$(find {out} -prune -newer {input} 2>/dev/null)\" ]; then hpcg_fresh=0; fi\n"
                ));
            }
        }
        s.push_str(&format!("printf 'FRESH %s %s\\n' {phase} \"$hpcg_fresh\"\n"));
    }
    s
}

/// The phases [`fresh_script`] found up to date.
pub fn parse_fresh(body: &str) -> std::collections::BTreeSet<crate::model::Phase> {
    body.lines()
        .filter_map(|l| l.strip_prefix("FRESH "))
        .filter_map(|rest| {
            let (phase, yes) = rest.split_once(' ')?;
            (yes.trim() == "1").then(|| crate::model::Phase::parse(phase).ok()).flatten()
        })
        .collect()
}

/// The shell function `hpcg_report <phase>` every submission uses after its submit
/// command set `hpcg_out` (its output) and `hpcg_rc` (its status): the job ID is the
/// output's last line, cut at a `;` (Slurm's `N;cluster`); it prints `SUBMIT` lines as
/// [`parse_submit`] reads them, sets `hpcg_job` and fails unless a job ID was read.
pub const SUBMIT_REPORT: &str = "hpcg_nl='\n'\n\
     hpcg_report() { # phase\n\
     \x20 hpcg_job=${hpcg_out##*\"$hpcg_nl\"}; hpcg_job=${hpcg_job%%;*}\n\
     \x20 case $hpcg_rc:$hpcg_job in\n\
     \x20   0:''|0:*[!0-9]*) printf 'SUBMIT %s %s %s\\n' \"$1\" 90 \"$(printf '%s' \"$hpcg_out\" | hpcg_b64)\"; return 1 ;;\n\
     \x20   0:*) printf 'SUBMIT %s 0 =%s\\n' \"$1\" \"$hpcg_job\" ;;\n\
     \x20   *) printf 'SUBMIT %s %s %s\\n' \"$1\" \"$hpcg_rc\" \"$(printf '%s' \"$hpcg_out\" | hpcg_b64)\"; return 1 ;;\n\
     \x20 esac\n\
     }\n";

/// For schedulers that do not enforce a wait's condition
/// ([`super::Scheduler::enforces_afterok`]): the lines a phase script runs before its
/// payload. For each `ok:<phase>:<job>` in [`super::AFTER_VARIABLE`], that job must
/// have recorded exit status 0 in `.hpcforge/rc_<phase>`; for each
/// `notok:<phase>:<job>`, it must not have (a job killed by a limit, or itself not
/// run, records nothing). A phase that runs per frame is named with its number of
/// frames (`ok:<phase>:<job>:<frames>`): it succeeded when that many of its frames
/// recorded exit status 0 ([`frames_dir`]). If one check fails the phase does not run: it writes its
/// job ID to `.hpcforge/skipped_<phase>`, says why on standard error and exits 1.
/// `job_var` is the scheduler's job-ID variable; `dir` the shell word of the
/// `.hpcforge` directory.
pub fn after_guard(phase: crate::model::Phase, job_var: &str, dir: &str) -> String {
    let var = super::AFTER_VARIABLE;
    format!(
        "hpcg_skip=\n\
         hpcg_ifs=$IFS; IFS=+\n\
         for hpcg_w in ${{{var}:-}}; do\n\
         \x20 hpcg_kind=${{hpcg_w%%:*}}; hpcg_rest=${{hpcg_w#*:}}; hpcg_pred=${{hpcg_rest%%:*}}; hpcg_pred_job=${{hpcg_rest#*:}}\n\
         \x20 case $hpcg_pred_job in\n\
         \x20   *:*)\n\
         \x20     hpcg_total=${{hpcg_pred_job#*:}}; hpcg_pred_job=${{hpcg_pred_job%%:*}}\n\
         \x20     hpcg_done=$(find {dir}/frames/\"$hpcg_pred\" -mindepth 1 -maxdepth 1 -type f ! -name '*.tmp' 2>/dev/null | awk '{{ if ((getline l < $0) > 0 && l ~ /^0 /) n++; close($0) }} END {{ print n + 0 }}')\n\
         \x20     if [ \"$hpcg_done\" = \"$hpcg_total\" ]; then hpcg_ok=1; else hpcg_ok=0; fi ;;\n\
         \x20   *) case $(head -n 1 {dir}/rc_\"$hpcg_pred\" 2>/dev/null) in \"$hpcg_pred_job 0\" | \"$hpcg_pred_job 0 \"*) hpcg_ok=1 ;; *) hpcg_ok=0 ;; esac ;;\n\
         \x20 esac\n\
         \x20 case $hpcg_kind:$hpcg_ok in\n\
         \x20   ok:0) hpcg_skip=\"the $hpcg_pred phase (job $hpcg_pred_job) did not succeed\"; break ;;\n\
         \x20   notok:1) hpcg_skip=\"the $hpcg_pred phase (job $hpcg_pred_job) succeeded, and {phase} runs only if it did not\"; break ;;\n\
         \x20 esac\n\
         done\n\
         IFS=$hpcg_ifs\n\
         if [ -n \"$hpcg_skip\" ]; then\n\
         \x20 printf '%s\\n' \"${{{job_var}:-unknown}}\" > {dir}/skipped_{phase}\n\
         \x20 echo \"hpcforge: {phase} not run: $hpcg_skip\" >&2\n\
         \x20 exit 1\n\
         fi\n"
    )
}

/// The exit trap that records how a phase script ended, for [`after_guard`] and the
/// status script: `<job ID> <exit status> <start> <end>` (UTC, `2026-12-03T16:36:54`)
/// in `.hpcforge/rc_<phase>`.
pub fn outcome_record(phase: crate::model::Phase, job_var: &str, dir: &str) -> String {
    format!(
        "hpcg_t0=$(date -u +%Y-%m-%dT%H:%M:%S)\n\
         trap 'hpcg_rc=$?; printf \"%s %s %s %s\\n\" \"${{{job_var}:-unknown}}\" \"$hpcg_rc\" \"$hpcg_t0\" \"$(date -u +%Y-%m-%dT%H:%M:%S)\" > {dir}/rc_{phase}; exit $hpcg_rc' EXIT\n"
    )
}

/// The lines that print `STARTED <phase> <job ID>` for each phase in `tags` whose job
/// left its start marker in `run_dir` (the forged scripts write it first thing).
pub fn start_markers(run_dir: &str, tags: &std::collections::BTreeMap<crate::model::Phase, String>) -> String {
    let mut s = String::new();
    for phase in tags.keys() {
        let marker = shell_quote(&format!("{run_dir}/.hpcforge/started_{phase}")).into_owned();
        s.push_str(&format!("[ -f {marker} ] && printf 'STARTED {phase} %s\\n' \"$(head -n 1 {marker})\"\n"));
    }
    s
}

/// The `STARTED` lines of a find report: (phase, job ID as `parse_id` reads it).
pub fn parse_started(body: &str, parse_id: fn(&str) -> Option<String>) -> Vec<(crate::model::Phase, String)> {
    body.lines()
        .filter_map(|l| l.strip_prefix("STARTED "))
        .filter_map(|rest| {
            let (phase, id) = rest.split_once(' ')?;
            Some((crate::model::Phase::parse(phase).ok()?, parse_id(id)?))
        })
        .collect()
}

/// Reads the `SUBMIT <phase> <status> <=id | b64 output>` lines of a submission
/// report, job IDs read with `parse_id`. A submit command that said yes but printed
/// no job ID `parse_id` accepts records nothing: the job may exist, and the next
/// attempt looks it up by tag.
pub fn parse_submit(body: &str, report: &mut super::SubmitReport, parse_id: fn(&str) -> Option<String>) {
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("SUBMIT ") else { continue };
        let mut it = rest.splitn(3, ' ');
        let (Some(phase), Some(rc), text) = (it.next(), it.next(), it.next().unwrap_or("")) else { continue };
        let Ok(phase) = crate::model::Phase::parse(phase) else { continue };
        let out = match text.strip_prefix('=') {
            Some(id) => id.to_owned(),
            None => unb64(text),
        };
        let status: i32 = rc.parse().unwrap_or(-1);
        let outcome = match (status, parse_id(&out)) {
            (0, Some(id)) => super::SubmitOutcome::Submitted(id),
            (0 | 90, _) => continue,
            _ => super::SubmitOutcome::Refused { status, message: out.trim().to_owned() },
        };
        report.outcomes.insert(phase, outcome);
    }
}

/// Parses an ISO-8601 local time as Slurm prints it (and the local supervisor writes) (`2026-11-22T04:15:12`); `N/A`,
/// `NONE`, `Unknown` → none. Slurm prints the cluster's local time; the test and most
/// clusters run in UTC, so UTC is assumed.
pub fn parse_slurm_time(s: &str) -> Option<OffsetDateTime> {
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    time::PrimitiveDateTime::parse(s.trim(), &fmt).ok().map(|t| t.assume_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_free_text() {
        assert_eq!(unb64(&b64("sbatch: error: x\nline 2")), "sbatch: error: x\nline 2");
        assert_eq!(unb64("not base64!"), "not base64!");
    }

    #[test]
    fn slurm_times_parse_and_placeholders_do_not() {
        assert_eq!(parse_slurm_time("2026-11-22T04:15:12").unwrap().unix_timestamp(), 1_795_320_912);
        for none in ["N/A", "NONE", "Unknown", ""] {
            assert!(parse_slurm_time(none).is_none());
        }
    }

    #[test]
    fn stage_failures_are_read_with_their_messages() {
        let body =
            format!("STAGE a.dat 0 -\nSTAGE b.dat 1 {}\nOTHER x\n", b64("cp: cannot open '/x': Permission denied"));
        assert_eq!(parse_stage(&body), [("b.dat".to_owned(), "cp: cannot open '/x': Permission denied".to_owned())]);
    }

    /// Runs `fenced(dir, task, fence, "echo RAN")` with `sh`: its output.
    fn run_fenced(dir: &std::path::Path, task: &crate::model::TaskId, fence: u64) -> String {
        let script = fenced(dir.to_str().unwrap(), task, fence, "echo RAN");
        let out = std::process::Command::new("sh").arg("-c").arg(&script).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn a_fenced_script_runs_for_the_newest_fence_only() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run dir; $(touch pwned)");
        let task = crate::model::TaskId::new();
        assert_eq!(run_fenced(&run, &task, 1), "RAN\n");
        assert_eq!(run_fenced(&run, &task, 2), "RAN\n");
        assert_eq!(run_fenced(&run, &task, 2), "RAN\n", "the same fence again runs");
        let refused = run_fenced(&run, &task, 1);
        assert_eq!(refused, "FENCED 2\n", "an older owner is shut out");
        assert_eq!(parse_fenced(&refused), Some(2));
        assert_eq!(parse_fenced("RAN\n"), None);
        let kept = std::fs::read_to_string(run.join(".hpcforge").join(format!("fence-{task}"))).unwrap();
        assert_eq!(kept.trim(), "2");
        assert!(!dir.path().join("pwned").exists() && !std::path::Path::new("pwned").exists());
        // Another task's fence in the same directory is its own.
        assert_eq!(run_fenced(&run, &crate::model::TaskId::new(), 1), "RAN\n");
    }

    #[test]
    fn outputs_are_fresh_when_they_all_exist_and_are_newer_than_every_input() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let touch = |f: &str, when: &str| {
            let st = std::process::Command::new("touch").arg("-d").arg(when).arg(d.join(f)).status().unwrap();
            assert!(st.success());
        };
        touch("in.dat", "2026-12-01 10:00:00.5");
        touch("out.dat", "2026-12-01 10:00:00.7"); // newer by 0.2 s: fresh
        touch("old.dat", "2026-12-01 09:00:00");
        std::fs::create_dir(d.join("sub")).unwrap();
        touch("sub/r.txt", "2026-12-01 11:00:00");
        let ph = |n: &str| crate::model::Phase::parse(n).unwrap();
        let v = |x: &[&str]| x.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let phases = [
            (ph("a"), v(&["in.dat"]), v(&["out.dat", "sub/r.txt"])),
            (ph("b"), v(&["in.dat"]), v(&["old.dat"])),
            (ph("c"), v(&["in.dat"]), v(&["out.dat", "missing.dat"])),
            (ph("d"), v(&["not-there.dat"]), v(&["old.dat"])),
            (ph("e"), v(&["it's here.dat"]), v(&["out.dat"])),
        ];
        touch("it's here.dat", "2026-12-01 12:00:00");
        let script = fresh_script(d.to_str().unwrap(), &phases);
        let out = std::process::Command::new("sh").arg("-c").arg(&script).output().unwrap();
        let got = parse_fresh(&String::from_utf8_lossy(&out.stdout));
        // a: both outputs newer; b: older than its input; c: an output missing; d: its
        // input is not there, so nothing is newer; e: the input (quoted name) is newer.
        assert_eq!(got, [ph("a"), ph("d")].into_iter().collect(), "{}", String::from_utf8_lossy(&out.stdout));
    }

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
}
