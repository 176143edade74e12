//! Telling failures apart: transient ones (retry later, the task shows `blocked`) and
//! permanent ones (the phase fails, with the scheduler's own words kept verbatim next
//! to a plain explanation).

use std::time::Duration;

use super::Scheduler;

/// What kind of failure a message describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Trying again later may work.
    Transient,
    /// It will fail the same way until someone changes something.
    Permanent,
}

/// Messages (lowercase fragments) of failures that pass whatever the scheduler: the
/// network and the SSH connection. Each scheduler adds its own
/// ([`Scheduler::transient_phrases`]).
const TRANSIENT: &[&str] = &[
    "temporarily unavailable",
    "temporarily unable",
    "resource temporarily unavailable",
    "try again",
    "connection refused",
    "connection reset",
    "connection timed out",
    "can't be reached now",
    "transport endpoint",
    "broken pipe",
];

/// Plain explanations of refusals any scheduler may give, by message fragment; each
/// scheduler's own ([`Scheduler::explanations`]) are tried first.
const EXPLAINED: &[(&str, &str)] = &[
    ("access denied", "the scheduler does not let this user submit there"),
    ("command not found", "the scheduler's commands are not installed or not on the user's PATH on the cluster"),
    ("no such file or directory", "a file the submission needs does not exist on the cluster"),
    ("permission denied", "the user lacks permission for a file or directory the submission needs"),
];

/// Classifies what `scheduler` or the connection to it said.
pub fn classify(scheduler: &dyn Scheduler, message: &str) -> FailureKind {
    let m = message.to_ascii_lowercase();
    let transient = TRANSIENT.iter().chain(scheduler.transient_phrases()).any(|t| m.contains(t));
    if transient { FailureKind::Transient } else { FailureKind::Permanent }
}

/// A plain explanation of a refusal by `scheduler`.
pub fn explain(scheduler: &dyn Scheduler, message: &str) -> String {
    let m = message.to_ascii_lowercase();
    scheduler
        .explanations()
        .iter()
        .chain(EXPLAINED)
        .find(|(k, _)| m.contains(k))
        .map(|(_, e)| (*e).to_owned())
        .unwrap_or_else(|| "the scheduler refused the job; its message says why".to_owned())
}

/// When try `n + 1` may start, `backoff(n)` after `at`. One place for the arithmetic
/// every retry uses.
pub fn retry_at(at: time::OffsetDateTime, n: u32) -> time::OffsetDateTime {
    at + time::Duration::try_from(backoff(n, jitter())).unwrap_or(time::Duration::minutes(5))
}

/// A little entropy for backoff jitter.
fn jitter() -> u64 {
    u64::from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos()))
}

/// How long to wait before try `n` (1-based): 2 s doubling to at most 5 min, with up to
/// 25 % jitter so tasks that failed together do not retry together.
pub fn backoff(n: u32, jitter_seed: u64) -> Duration {
    let base = 2u64.saturating_mul(1u64 << n.saturating_sub(1).min(16)).min(300);
    let jitter_ms = jitter_seed % (base * 250 + 1);
    Duration::from_secs(base) + Duration::from_millis(jitter_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::scheduler::slurm::Slurm;
    use crate::scheduler::tests::slurm_fixture as fixture;

    const SLURM: Slurm = Slurm { accounting: false };

    fn classify(m: &str) -> FailureKind {
        super::classify(&SLURM, m)
    }

    fn explain(m: &str) -> String {
        super::explain(&SLURM, m)
    }

    #[test]
    fn a_busy_or_unreachable_controller_is_transient() {
        for m in [
            "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation",
            "sbatch: error: Slurm temporarily unable to accept job, sleeping and retrying",
            "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)",
            "cannot connect to 127.0.0.1:2222: Connection refused (os error 111)",
            &fixture("sbatch-cluster-unreachable.txt"),
        ] {
            assert_eq!(classify(m), FailureKind::Transient, "{m}");
        }
    }

    #[test]
    fn refusals_are_permanent_and_explained_in_plain_words() {
        let m = fixture("sbatch-invalid-partition.txt");
        assert_eq!(classify(&m), FailureKind::Permanent);
        assert!(explain(&m).starts_with("the partition does not exist"));
        let m = fixture("sbatch-unsatisfiable.txt");
        assert_eq!(classify(&m), FailureKind::Permanent);
        assert!(explain(&m).contains("CPUs or memory"));
        assert!(explain("sbatch: error: something new").contains("its message says why"));
    }

    #[test]
    fn grid_engines_own_words_are_classified_and_explained() {
        let ge = crate::scheduler::sge::GridEngine;
        let fixture = |name: &str| {
            let path = format!("{}/tests/fixtures/sge/{name}", env!("CARGO_MANIFEST_DIR"));
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
        };
        for m in [fixture("qsub-master-down.txt"), fixture("qstat-master-down.txt")] {
            assert_eq!(super::classify(&ge, &m), FailureKind::Transient, "{m}");
        }
        let m = fixture("qsub-bad-queue.txt");
        assert_eq!(super::classify(&ge, &m), FailureKind::Permanent);
        assert!(super::explain(&ge, &m).starts_with("the queue does not exist"), "{}", super::explain(&ge, &m));
        let m = fixture("qsub-bad-hrt.txt");
        assert_eq!(super::classify(&ge, &m), FailureKind::Permanent);
        assert!(super::explain(&ge, &m).starts_with("a time limit is not written"));
        // Slurm's phrases are Slurm's: Grid Engine's words do not explain a Slurm refusal.
        assert!(!explain(&m).starts_with("a time limit"));
    }

    #[test]
    fn backoff_grows_to_a_cap_with_jitter() {
        assert_eq!(backoff(1, 0), Duration::from_secs(2));
        assert_eq!(backoff(3, 0), Duration::from_secs(8));
        assert_eq!(backoff(30, 0), Duration::from_secs(300));
        assert!(backoff(1, 999_999) <= Duration::from_millis(2500));
    }
}
