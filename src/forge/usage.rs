//! The lines of a forged payload that record what the job used, for clusters whose
//! scheduler cannot say (no accounting): when the application ends, the job's shell
//! reads its own `/proc/self/stat`, whose `cutime` + `cstime` are the CPU time of
//! everything it waited for, and writes one line (parsed by
//! [`crate::model::usage::parse_job_record`]) to `<run>/.hpcforge/usage/<phase>`
//! (`<phase>.<element>` for a job array's elements). Each frame of a frame phase
//! measures itself the same way in its own subshell, into its frame record.
//!
//! No command substitution may stand between the shell and the read: `$(...)` forks,
//! and the child's `/proc/self` is not the shell's.

use std::fmt::Write as _;

use crate::model::Phase;

/// `hpcg_cpu_ticks`: sets `hpcg_ticks` to the CPU ticks (user + system) of the
/// children this shell has waited for, or to nothing where `/proc` cannot tell.
pub const FUNCTIONS: &str = "\
# What the job used (docs/definitions.md, \"Resource use\"): CPU ticks of what this shell waited for.
hpcg_cpu_ticks() {
  hpcg_ticks=
  hpcg_st=
  { read -r hpcg_st < /proc/self/stat; } 2>/dev/null || return 0
  hpcg_st=${hpcg_st##*) }
  set -- $hpcg_st
  [ \"$#\" -ge 15 ] && hpcg_ticks=$(( ${14} + ${15} ))
  return 0
}
hpcg_hz=$(getconf CLK_TCK 2>/dev/null) || hpcg_hz=100
case $hpcg_hz in '' | *[!0-9]*) hpcg_hz=100 ;; esac
hpcg_u0=$(date +%s)
";

/// The lines after the application (or the frame loop): the job's status kept in
/// `hpcg_rc`, its usage recorded under `own` (empty, or `.<element>` for an array
/// element) with the job's ID from `job_var`, then that status again.
pub fn record(phase: Phase, own: &str, job_var: &str) -> String {
    let mut s = String::from("hpcg_rc=$?\nhpcg_cpu_ticks\n");
    let file = format!("\"$hpcg_dir/usage/{phase}{own}\"");
    let _ = writeln!(
        s,
        "if [ -n \"$hpcg_ticks\" ] && mkdir -p \"$hpcg_dir/usage\" 2>/dev/null; then\n\
         \x20 printf '%s %s %s %s %s %s %s\\n' \"${{{job_var}:-unknown}}\" \"$hpcg_ticks\" \"$hpcg_hz\" \"$hpcg_u0\" \"$(date +%s)\" \"$(uname -n)\" \"${{HPCG_CPUS:-1}}\" > {file}.tmp 2>/dev/null \\\n\
         \x20   && mv -f {file}.tmp {file}\n\
         fi\n\
         (exit \"$hpcg_rc\")"
    );
    s
}

/// Inside a frame's subshell, after the frame ran: `hpcg_ticks` set for the frame
/// record's CPU field.
pub const FRAME_TICKS: &str = "hpcg_cpu_ticks";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::usage::parse_job_record;
    use std::process::Command;

    /// A payload's end run by `sh` (dash) and `bash` after a busy loop and a sleep:
    /// the record reads back, the busy child's CPU time is counted, the sleep's is
    /// not, and the job's exit status is kept.
    #[test]
    fn the_record_counts_the_cpu_of_what_the_shell_waited_for() {
        for shell in ["sh", "bash"] {
            let dir = tempfile::tempdir().unwrap();
            let script = format!(
                "hpcg_dir={dir}\nHPCG_CPUS=2\n{FUNCTIONS}\
                 i=0; sh -c 'i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done'\nsleep 1\n(exit 3)\n{}",
                record(Phase::parse("execute").unwrap(), "", "JOBID"),
                dir = dir.path().display()
            );
            let out = Command::new(shell).arg("-c").arg(&script).env("JOBID", "77").output().unwrap();
            assert_eq!(out.status.code(), Some(3), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
            let line = std::fs::read_to_string(dir.path().join("usage/execute")).unwrap();
            let (job, u) = parse_job_record(line.trim()).unwrap_or_else(|| panic!("{shell}: {line}"));
            assert_eq!(job, "77");
            assert_eq!(u.cpus, 2);
            assert!(u.cpu > 0.05, "{shell}: the busy loop's CPU time is counted: {line}");
            assert!(u.elapsed >= 1.0, "{shell}: {line}");
            assert!(u.cpu < u.elapsed + 1.0, "{shell}: {line}");
        }
    }
}
