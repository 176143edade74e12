//! Archived outputs: an application may ask (`[archive]`) that its tasks' declared
//! outputs be copied into the store when the task ends, so that results outlive
//! scratch purges and workspace expiry. This is what the application says, what a
//! task records of it, and the choice of which files fit the caps. Pure data.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::problems::Problems;

/// The most files one task's archive holds; the rest are left out, saying so.
pub const MAX_ARCHIVED_FILES: usize = 2_000;

/// `[archive]` of an application: copy the outputs into the store when a task ends
/// (completed or failed; a cancelled task's are not kept).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveSpec {
    /// The largest file kept, in MB (10^6 bytes); larger ones are left out.
    #[serde(default = "default_file_mb")]
    pub max_file_mb: u64,
    /// The most a task's archive holds in all, in MB; files are taken in path order
    /// while they fit.
    #[serde(default = "default_total_mb")]
    pub max_total_mb: u64,
}

fn default_file_mb() -> u64 {
    100
}

fn default_total_mb() -> u64 {
    1_000
}

/// The largest cap an application may set, in MB (1 TB).
pub const MAX_CAP_MB: u64 = 1_000_000;

impl ArchiveSpec {
    /// Checks the caps (`/archive/...` pointers); `outputs` are the application's
    /// declared outputs, which an archive needs.
    pub fn check(&self, outputs: &[String], problems: &mut Problems) {
        if outputs.is_empty() {
            problems.push("/archive", "an archive keeps the declared outputs: declare them (`outputs = [\"out/*\"]`)");
        }
        for (field, v) in [("max_file_mb", self.max_file_mb), ("max_total_mb", self.max_total_mb)] {
            if v == 0 || v > MAX_CAP_MB {
                problems.push(format!("/archive/{field}"), format!("from 1 to {MAX_CAP_MB} (MB), not {v}"));
            }
        }
    }
}

/// Where a task's archive stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ArchiveState {
    /// To be made once the task has ended and its jobs' news is read.
    Waiting,
    /// Made: `files` are in the store.
    Done,
    /// Not made, and not tried again (`error` says why).
    Failed,
    /// Not made because of how the task ended (cancelled).
    Skipped,
}

/// One file kept in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ArchivedFile {
    /// Its path, relative to the run directory.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// The sha256 of its bytes, in hex.
    pub sha256: String,
    /// When it was last modified on the cluster.
    #[serde(with = "time::serde::rfc3339")]
    pub modified: OffsetDateTime,
}

/// One output that was not kept, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeftOut {
    /// Its path, relative to the run directory.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// Why, in words.
    pub why: String,
}

/// A task's archive: the caps it was created with, and what was kept. The files
/// themselves, with their sizes and checksums, are listed by the store (a task's
/// state stays small however many outputs it has).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Archive {
    /// Where it stands.
    pub state: ArchiveState,
    /// The largest file kept, in bytes.
    pub max_file: u64,
    /// The most kept in all, in bytes.
    pub max_total: u64,
    /// How many files are in the store.
    #[serde(default)]
    pub kept: u64,
    /// Their bytes in all.
    #[serde(default)]
    pub bytes: u64,
    /// Outputs not kept, with why (the first [`LEFT_OUT_SHOWN`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_out: Vec<LeftOut>,
    /// How many outputs were not kept in all.
    #[serde(default)]
    pub left_out_count: u64,
    /// Failed tries so far.
    #[serde(default)]
    pub attempts: u32,
    /// Not before this is it tried again (after a failed try).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub next_try: Option<OffsetDateTime>,
    /// Why the last try failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When it was made.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub at: Option<OffsetDateTime>,
}

/// How many left-out outputs a task names.
pub const LEFT_OUT_SHOWN: usize = 20;

/// How many failed tries before an archive is given up on.
pub const MAX_ATTEMPTS: u32 = 5;

impl Archive {
    /// A task's archive as the application asks for it, still to be made.
    pub fn waiting(spec: &ArchiveSpec) -> Archive {
        Archive {
            state: ArchiveState::Waiting,
            max_file: spec.max_file_mb.saturating_mul(1_000_000),
            max_total: spec.max_total_mb.saturating_mul(1_000_000),
            kept: 0,
            bytes: 0,
            left_out: Vec::new(),
            left_out_count: 0,
            attempts: 0,
            next_try: None,
            error: None,
            at: None,
        }
    }

    /// The same caps, to be made again (a restarted task's outputs change).
    pub fn again(&self) -> Archive {
        Archive { max_file: self.max_file, max_total: self.max_total, ..Archive::waiting(&ArchiveSpec::default()) }
    }

    /// Records what was made: the files kept and those left out.
    pub fn made(&mut self, kept: &[ArchivedFile], left_out: &[LeftOut], at: OffsetDateTime) {
        self.state = ArchiveState::Done;
        self.kept = kept.len() as u64;
        self.bytes = kept.iter().map(|f| f.size).sum();
        self.left_out = left_out.iter().take(LEFT_OUT_SHOWN).cloned().collect();
        self.left_out_count = left_out.len() as u64;
        (self.next_try, self.error, self.at) = (None, None, Some(at));
    }

    /// Whether files are kept and can be served from the store.
    pub fn serves(&self) -> bool {
        self.state == ArchiveState::Done && self.kept > 0
    }

    /// One line on what was kept: "3 outputs (12.5 MB) kept in the store; 1 left out
    /// (big.bin: 3.2 GB, over the 100 MB a file may have)".
    pub fn summary(&self) -> String {
        let n = self.kept;
        let mut s =
            format!("{n} output{} ({}) kept in the store", if n == 1 { "" } else { "s" }, bytes_shown(self.bytes));
        if self.left_out_count > 0 {
            let shown: Vec<String> = self.left_out.iter().take(3).map(|l| format!("{}: {}", l.path, l.why)).collect();
            let more = self.left_out_count.saturating_sub(shown.len() as u64);
            s.push_str(&format!(
                "; {} left out ({}{})",
                self.left_out_count,
                shown.join("; "),
                if more > 0 { format!("; and {more} more") } else { String::new() }
            ));
        }
        s
    }
}

impl Default for ArchiveSpec {
    fn default() -> Self {
        ArchiveSpec { max_file_mb: default_file_mb(), max_total_mb: default_total_mb() }
    }
}

/// A size in decimal units, as people read them: "950 B", "12.5 MB", "3.2 GB".
pub fn bytes_shown(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let (mut v, mut i) = (n as f64, 0);
    while v >= 1000.0 && i + 1 < UNITS.len() {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        return format!("{n} B");
    }
    let text = format!("{v:.1}");
    format!("{} {}", text.strip_suffix(".0").unwrap_or(&text), UNITS[i])
}

/// Which of `found` (path, size), in path order, the caps keep: a file larger than
/// `max_file` is left out, and so is one that would take the total past
/// `max_total` (smaller ones after it may still fit), and everything past
/// [`MAX_ARCHIVED_FILES`].
pub fn choose(found: &[(String, u64)], max_file: u64, max_total: u64) -> (Vec<(String, u64)>, Vec<LeftOut>) {
    let mut sorted: Vec<&(String, u64)> = found.iter().collect();
    sorted.sort();
    sorted.dedup_by(|a, b| a.0 == b.0);
    let (mut keep, mut left, mut total) = (Vec::new(), Vec::new(), 0u64);
    for (path, size) in sorted {
        let shown = bytes_shown;
        let why = if *size > max_file {
            Some(format!("{}, over the {} a file may have", shown(*size), shown(max_file)))
        } else if total + size > max_total {
            Some(format!("{}, past the {} the archive may hold", shown(*size), shown(max_total)))
        } else if keep.len() >= MAX_ARCHIVED_FILES {
            Some(format!("past the {MAX_ARCHIVED_FILES} files the archive may hold"))
        } else {
            None
        };
        match why {
            Some(why) => left.push(LeftOut { path: path.clone(), size: *size, why }),
            None => {
                total += size;
                keep.push((path.clone(), *size));
            }
        }
    }
    (keep, left)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(n: u64) -> u64 {
        n * 1_000_000
    }

    #[test]
    fn the_caps_keep_what_fits_in_path_order() {
        let found = vec![
            ("out/c.dat".to_owned(), mb(40)),
            ("out/a.dat".to_owned(), mb(50)),
            ("big.bin".to_owned(), mb(3_200)),
            ("out/b.dat".to_owned(), mb(60)),
            ("out/a.dat".to_owned(), mb(50)),
            ("z.txt".to_owned(), 10),
        ];
        let (keep, left) = choose(&found, mb(100), mb(100));
        let kept: Vec<&str> = keep.iter().map(|k| k.0.as_str()).collect();
        // a (50) fits; b (60) would pass 100; c (40) still fits; z too.
        assert_eq!(kept, ["out/a.dat", "out/c.dat", "z.txt"]);
        assert_eq!(left.len(), 2);
        assert_eq!(left[0].path, "big.bin");
        assert!(left[0].why.contains("over the 100 MB a file may have"), "{}", left[0].why);
        assert_eq!(left[1].path, "out/b.dat");
        assert!(left[1].why.contains("past the 100 MB the archive may hold"), "{}", left[1].why);
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(bytes_shown(950), "950 B");
        assert_eq!(bytes_shown(12_500_000), "12.5 MB");
        assert_eq!(bytes_shown(100_000_000), "100 MB");
        assert_eq!(bytes_shown(3_200_000_000), "3.2 GB");
    }

    #[test]
    fn an_archive_without_outputs_or_with_silly_caps_is_refused() {
        let mut p = Problems::default();
        ArchiveSpec { max_file_mb: 0, max_total_mb: MAX_CAP_MB + 1 }.check(&[], &mut p);
        let pointers: Vec<String> = p.iter().map(|x| x.pointer.clone()).collect();
        assert_eq!(pointers, ["/archive", "/archive/max_file_mb", "/archive/max_total_mb"]);
    }

    #[test]
    fn the_summary_says_what_was_kept_and_left_out() {
        let mut a = Archive::waiting(&ArchiveSpec::default());
        assert!(!a.serves(), "only a finished archive serves files");
        let kept = [ArchivedFile {
            path: "out/a".into(),
            size: 1_500_000,
            sha256: "00".into(),
            modified: OffsetDateTime::UNIX_EPOCH,
        }];
        let left: Vec<LeftOut> =
            (0..30).map(|i| LeftOut { path: format!("big{i:02}"), size: 1, why: "too big".into() }).collect();
        a.made(&kept, &left, OffsetDateTime::UNIX_EPOCH);
        assert!(a.serves());
        assert_eq!(
            a.summary(),
            "1 output (1.5 MB) kept in the store; 30 left out (big00: too big; big01: too big; big02: too big; and 27 more)"
        );
        assert_eq!(a.left_out.len(), LEFT_OUT_SHOWN);
    }
}
