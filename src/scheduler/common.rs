//! Shell plumbing every scheduler shares: the run directory, staging, script files,
//! output tails, and the line protocol results come back in (`KEY value` lines, free
//! text in base64).

use base64::Engine as _;
use time::OffsetDateTime;

use super::SubmitPlan;
use crate::shell::shell_quote;

// Frame phases' plumbing lives in `super::frames`; these names stay reachable here.
pub use super::frames::{
    FRAMES_OF, FrameRecord, FrameRecords, LISTED_FAILURES, frame_page_script, frame_records_script, frames_dir,
    frames_done_script, frames_helpers, frames_prep, parse_frame_page, parse_frames, parse_frames_done,
};

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
}
