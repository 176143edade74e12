//! Shell plumbing every scheduler shares: the run directory, staging, script files,
//! output tails, and the line protocol results come back in (`KEY value` lines, free
//! text in base64).

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
}
