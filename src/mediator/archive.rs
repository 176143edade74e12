//! Outputs kept in the store when a task ends, for applications that ask for it
//! (`[archive]`): results then outlive scratch purges and workspace expiry, and
//! download the same way as from the cluster.
//!
//! When a task with a waiting archive has ended (completed or failed; a cancelled
//! task's outputs are not kept) and nothing more is read of its jobs, the server that
//! watches its (cluster, user) takes the lease `archive/<task>` and, as the task's
//! owner over SSH, lists the outputs (the declared globs, regular files inside the run
//! directory, staged inputs left out, as the tarball takes them), chooses what fits
//! the caps ([`crate::model::archive::choose`]), then streams exactly those files as
//! one tar stream and writes each into the store a chunk at a time, with its sha256:
//! the server holds a few chunks at a time whatever the sizes. Each file becomes
//! visible only when whole; a try that fails (the cluster unreachable, a server
//! stopped) leaves the archive waiting, and the next try starts over from nothing, a
//! few minutes later, up to [`MAX_ATTEMPTS`] tries.

mod serve;

use std::collections::BTreeSet;
use std::sync::Arc;

use sha2::{Digest as _, Sha256};
use time::{Duration, OffsetDateTime};
use tokio::sync::mpsc;

use super::files::{STREAM_IDLE, output_matching, relative_path, tarball_script};
use super::transitions::Refused;
use super::{Mediator, now};
use crate::model::archive::{ArchiveState, ArchivedFile, LeftOut, MAX_ATTEMPTS, choose};
use crate::model::{Task, TaskId, TaskState};
use crate::scheduler::common::HELPERS;
use crate::shell::shell_quote;
use crate::store::{ARCHIVE_CHUNK, StoreError};

/// How long the lease on one task's archive holds: a server that dies while it
/// archives holds it up this long at most.
const LEASE_FOR: Duration = Duration::minutes(1);

/// How often the lease is renewed while the archive is made (however long one file
/// takes).
const RENEW_EVERY: std::time::Duration = std::time::Duration::from_secs(20);

/// How long after a failed try the next one starts: one minute, doubled each time.
fn retry_after(attempts: u32) -> Duration {
    Duration::minutes(1i64 << attempts.min(6))
}

/// Whether `t`'s archive is to be made now.
pub fn due(t: &Task, at: OffsetDateTime) -> bool {
    t.archive.as_ref().is_some_and(|a| a.state == ArchiveState::Waiting && a.next_try.is_none_or(|n| n <= at))
        && t.state.is_final()
        && !t.news_coming()
}

/// The script that lists the outputs as they would be archived: `NORUN`, or
/// `FOUND <b64>` of `<path>\t<size>\0` entries (in path order) — the regular files the globs match,
/// or that lie in folders they match, inside the run directory, staged inputs left
/// out; at most `limit`.
fn list_script(run_dir: &str, globs: &[String], staged: &[String], limit: usize) -> String {
    format!(
        "{HELPERS}hpcg_root=$(cd -- {dir} 2>/dev/null && pwd -P) && cd -- \"$hpcg_root\" || {{ printf 'NORUN\\n'; exit 0; }}\n\
         {matching}\
         hpcg_files() {{ hpcg_output \"$1\" && find -P \"$1\" -type f -printf '%p\\t%s\\0' 2>/dev/null; }}\n\
         printf 'FOUND %s\\n' \"$(hpcg_each_output hpcg_files | sort -zu | head -z -n {limit} | hpcg_b64)\"\n",
        dir = shell_quote(run_dir),
        matching = output_matching(globs, staged),
    )
}

/// Reads what [`list_script`] printed: (path, size) of each output found, `None`
/// when there is no run directory.
fn parse_found(body: &str) -> Option<Vec<(String, u64)>> {
    use base64::Engine as _;
    let mut found = None;
    for line in body.lines() {
        if line.trim() == "NORUN" {
            return None;
        }
        let Some(b64) = line.strip_prefix("FOUND ") else { continue };
        let raw = base64::engine::general_purpose::STANDARD.decode(b64.trim()).unwrap_or_default();
        let mut entries = Vec::new();
        for entry in raw.split(|&b| b == 0).filter(|e| !e.is_empty()) {
            let text = String::from_utf8_lossy(entry);
            let Some((path, size)) = text.rsplit_once('\t') else { continue };
            // Names with control characters, or that are not UTF-8, cannot be served
            // back by path: they are not kept.
            let (Ok(size), Ok(path)) = (size.parse::<u64>(), relative_path(path)) else { continue };
            if !path.is_empty() && !text.contains('\u{FFFD}') {
                entries.push((path, size));
            }
        }
        entries.sort();
        found = Some(entries);
    }
    found
}

/// What the unpacking thread hands over, in order.
enum Piece {
    /// A wanted file begins (its path, size, modification time).
    Start(String, u64, OffsetDateTime),
    /// Its next bytes.
    Data(Vec<u8>),
    /// It ended.
    End,
}

/// Reads the tar stream the cluster sends (gzip) and hands each wanted regular
/// file's bytes over as they come; anything else in it is skipped. Runs on a
/// blocking thread: `tar` reads synchronously.
fn unpack(
    mut body: mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
    wanted: BTreeSet<String>,
    to: mpsc::Sender<Piece>,
) -> Result<(), String> {
    use std::io::Read as _;
    let reader = ChunkReader::new(move || body.blocking_recv());
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(reader));
    let entries = archive.entries().map_err(|e| format!("the outputs' tar stream cannot be read: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("the outputs' tar stream broke: {e}"))?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let raw = entry.path().map_err(|e| format!("a name in the outputs' tar stream: {e}"))?;
        let Ok(path) = relative_path(&raw.to_string_lossy()) else { continue };
        if !wanted.contains(&path) {
            continue;
        }
        let size = entry.size();
        let mtime = entry.header().mtime().unwrap_or(0);
        let modified = OffsetDateTime::from_unix_timestamp(mtime as i64).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        if to.blocking_send(Piece::Start(path, size, modified)).is_err() {
            return Ok(()); // the writer gave up; it says why
        }
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = entry.read(&mut chunk).map_err(|e| format!("the outputs' tar stream broke: {e}"))?;
            if n == 0 {
                break;
            }
            if to.blocking_send(Piece::Data(chunk[..n].to_vec())).is_err() {
                return Ok(());
            }
        }
        if to.blocking_send(Piece::End).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Chunks taken one at a time from `next` (`None`: the end) as a [`std::io::Read`],
/// for `tar` on a blocking thread.
struct ChunkReader<F> {
    next: F,
    buf: Vec<u8>,
    at: usize,
}

impl<F> ChunkReader<F> {
    fn new(next: F) -> Self {
        ChunkReader { next, buf: Vec::new(), at: 0 }
    }
}

impl<F: FnMut() -> Option<std::io::Result<Vec<u8>>>> std::io::Read for ChunkReader<F> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.buf.len() {
            match (self.next)() {
                Some(chunk) => (self.buf, self.at) = (chunk?, 0),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// One file being written into the store.
struct Writing {
    handle: String,
    path: String,
    size: u64,
    modified: OffsetDateTime,
    sha: Sha256,
    buf: Vec<u8>,
    next: u32,
    written: u64,
}

impl Mediator {
    /// Makes `id`'s archive on a task of its own, unless this server is on it already.
    pub(super) fn spawn_archive(self: &Arc<Self>, id: TaskId) {
        if !self.archiving.lock().unwrap_or_else(|p| p.into_inner()).insert(id) {
            return;
        }
        let m = self.clone();
        tokio::spawn(async move {
            if let Err(e) = m.archive_task(&id).await {
                tracing::warn!(task = %id, error = %e, "could not keep the task's outputs; trying again later");
            }
            m.archiving.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        });
    }

    /// Makes task `id`'s archive if it is due and no other server is on it; records
    /// the outcome on the task (an event, and the archive's state).
    pub async fn archive_task(&self, id: &TaskId) -> Result<(), StoreError> {
        let key = format!("archive/{id}");
        let at = now();
        let Some(lease) = self.store.claim_lease(&key, &self.instance, at + LEASE_FOR, at).await? else {
            return Ok(()); // another server is on it
        };
        let result = self.archive_held(id, &key).await;
        if let Err(e) = self.store.release_lease(&lease, now()).await {
            tracing::debug!(task = %id, error = %e, "could not release an archive's lease; it lapses by itself");
        }
        result
    }

    async fn archive_held(&self, id: &TaskId, key: &str) -> Result<(), StoreError> {
        let Some(task) = self.store.task_state(id).await? else { return Ok(()) };
        if !due(&task, now()) {
            return Ok(());
        }
        if !matches!(task.state, TaskState::Completed | TaskState::Failed) {
            self.store.archive_drop(id).await?;
            return self
                .record_archive(id, |t, at| {
                    if let Some(a) = t.archive.as_mut() {
                        a.state = ArchiveState::Skipped;
                    }
                    t.record(at, None, format!("outputs not kept in the store: the task ended {}", t.state.as_str()));
                })
                .await;
        }
        let started = std::time::Instant::now();
        match self.make_archive(&task, key).await {
            Ok((kept, left)) => {
                self.metrics.archive_made(kept.iter().map(|f| f.size).sum());
                tracing::info!(task = %id, files = kept.len(), left_out = left.len(), seconds = started.elapsed().as_secs_f64(), "outputs kept in the store");
                self.record_archive(id, |t, at| {
                    if let Some(a) = t.archive.as_mut() {
                        a.made(&kept, &left, at);
                        let summary = a.summary();
                        t.record(at, None, summary);
                    }
                })
                .await
            }
            Err(why) => {
                tracing::warn!(task = %id, error = why, "keeping the task's outputs failed");
                // Nothing half-written is left visible; a later try starts over.
                if let Err(e) = self.store.archive_drop(id).await {
                    tracing::warn!(task = %id, error = %e, "could not remove a failed archive's files; the next try does");
                }
                self.record_archive(id, |t, at| {
                    let Some(a) = t.archive.as_mut() else { return };
                    a.attempts += 1;
                    a.error = Some(why.clone());
                    if a.attempts >= MAX_ATTEMPTS {
                        a.state = ArchiveState::Failed;
                        a.next_try = None;
                        let n = a.attempts;
                        t.record(at, None, format!("outputs not kept in the store after {n} tries: {why}"));
                    } else {
                        let next = at + retry_after(a.attempts);
                        a.next_try = Some(next);
                        let n = a.attempts;
                        t.record(
                            at,
                            None,
                            format!("keeping the outputs in the store failed (try {n} of {MAX_ATTEMPTS}): {why}; trying again at {}", next.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()),
                        );
                    }
                })
                .await
            }
        }
    }

    /// Writes the outcome onto the task if its archive is still the one waiting
    /// (a restart meanwhile makes it wait again, for the new outputs).
    async fn record_archive(
        &self,
        id: &TaskId,
        mut apply: impl FnMut(&mut Task, OffsetDateTime),
    ) -> Result<(), StoreError> {
        let at = now();
        let changed = self
            .change_task(id, |t| {
                if !t.archive.as_ref().is_some_and(|a| a.state == ArchiveState::Waiting) || !t.state.is_final() {
                    return Err(Refused("the task changed while its outputs were kept".into()));
                }
                apply(t, at);
                Ok(())
            })
            .await?;
        if let Err((why, _)) = changed {
            tracing::info!(task = %id, why = %why, "the archive's outcome was not recorded");
        }
        Ok(())
    }

    /// Lists, chooses and copies the outputs; what was kept and what was left out.
    async fn make_archive(&self, task: &Task, key: &str) -> Result<(Vec<ArchivedFile>, Vec<LeftOut>), String> {
        let a = task.archive.as_ref().ok_or("the task keeps no outputs")?;
        let exec = self.owner_exec(task).await.map_err(|e| e.to_string())?;
        let staged: Vec<String> = task.staged.iter().map(|s| s.name.clone()).collect();
        // More than the archive may hold, so that what is left out is named.
        let limit = crate::model::archive::MAX_ARCHIVED_FILES * 2;
        let out = self
            .clusters
            .run(&exec, &list_script(&task.run_dir, &task.outputs, &staged, limit), self.cfg.query_timeout)
            .await
            .map_err(|e| format!("the outputs could not be listed on cluster {}: {e}", task.cluster.name))?;
        let found = parse_found(&out.body).ok_or_else(|| {
            format!("the run directory {} does not exist on cluster {} any more", task.run_dir, task.cluster.name)
        })?;
        let (keep, mut left) = choose(&found, a.max_file, a.max_total);
        self.store.archive_drop(&task.id).await.map_err(|e| e.to_string())?;
        if keep.is_empty() {
            return Ok((Vec::new(), left));
        }
        let paths: Vec<String> = keep.iter().map(|(p, _)| p.clone()).collect();
        let body = self
            .clusters
            .stream(&exec, &tarball_script(&task.run_dir, &[], &paths, &staged), STREAM_IDLE)
            .await
            .map_err(|e| format!("the outputs could not be read on cluster {}: {e}", task.cluster.name))?;
        if !body.header.starts_with("OK") {
            return Err(format!("the outputs could not be read on cluster {}: {}", task.cluster.name, body.header));
        }
        let (tx, mut rx) = mpsc::channel::<Piece>(8);
        let wanted: BTreeSet<String> = paths.iter().cloned().collect();
        let reader = tokio::task::spawn_blocking(move || unpack(body.body, wanted, tx));
        let mut kept = Vec::new();
        let mut current: Option<Writing> = None;
        let mut renewed = std::time::Instant::now();
        let written = async {
            while let Some(piece) = rx.recv().await {
                if renewed.elapsed() > RENEW_EVERY {
                    let at = now();
                    let held = self.store.claim_lease(key, &self.instance, at + LEASE_FOR, at).await;
                    if !matches!(held, Ok(Some(_))) {
                        return Err("the archive's lease was lost (another server takes it over)".to_owned());
                    }
                    renewed = std::time::Instant::now();
                }
                match piece {
                    Piece::Start(path, size, modified) => {
                        let handle =
                            self.store.archive_begin(&task.id, &path, now()).await.map_err(|e| e.to_string())?;
                        current = Some(Writing {
                            handle,
                            path,
                            size,
                            modified,
                            sha: Sha256::new(),
                            buf: Vec::with_capacity(ARCHIVE_CHUNK),
                            next: 0,
                            written: 0,
                        });
                    }
                    Piece::Data(bytes) => {
                        let w = current.as_mut().ok_or("bytes before a file began")?;
                        w.sha.update(&bytes);
                        w.written += bytes.len() as u64;
                        w.buf.extend_from_slice(&bytes);
                        while w.buf.len() >= ARCHIVE_CHUNK {
                            let rest = w.buf.split_off(ARCHIVE_CHUNK);
                            let full = std::mem::replace(&mut w.buf, rest);
                            self.store.archive_chunk(&w.handle, w.next, full).await.map_err(|e| e.to_string())?;
                            w.next += 1;
                        }
                    }
                    Piece::End => {
                        let mut w = current.take().ok_or("a file ended before it began")?;
                        if !w.buf.is_empty() {
                            let last = std::mem::take(&mut w.buf);
                            self.store.archive_chunk(&w.handle, w.next, last).await.map_err(|e| e.to_string())?;
                        }
                        if w.written != w.size {
                            return Err(format!("{} came short ({} of {} bytes)", w.path, w.written, w.size));
                        }
                        let file = ArchivedFile {
                            path: w.path,
                            size: w.size,
                            sha256: hex::encode(w.sha.finalize()),
                            modified: w.modified,
                        };
                        self.store
                            .archive_finish(&w.handle, &task.id, &file, &task.owner, now())
                            .await
                            .map_err(|e| e.to_string())?;
                        kept.push(file);
                    }
                }
            }
            Ok::<(), String>(())
        }
        .await;
        // A failed write drops the channel, which stops the reader and the transfer.
        drop(rx);
        let read = reader.await.map_err(|e| format!("reading the outputs failed: {e}"))?;
        written?;
        read?;
        // A file listed but gone (or turned into something else) before it was read.
        let got: BTreeSet<&str> = kept.iter().map(|f| f.path.as_str()).collect();
        for (path, size) in &keep {
            if !got.contains(path.as_str()) {
                left.push(LeftOut {
                    path: path.clone(),
                    size: *size,
                    why: "no longer a regular file of the run directory when it was copied".into(),
                });
            }
        }
        left.sort_by(|x, y| x.path.cmp(&y.path));
        Ok((kept, left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listing_is_read_and_bad_names_are_dropped() {
        use base64::Engine as _;
        let raw = b"out/a.dat\t12\x00./b.txt\t5\x00x/../../etc\t7\x00bad\nname\t3\x00".to_vec();
        let body = format!("noise\nFOUND {}\n", base64::engine::general_purpose::STANDARD.encode(raw));
        let found = parse_found(&body).unwrap();
        assert_eq!(found, [("b.txt".to_owned(), 5), ("out/a.dat".to_owned(), 12)]);
        assert_eq!(parse_found("NORUN\n"), None);
    }

    /// The listing script, run by `sh` on a real folder: globs and folders they
    /// match, links out and staged inputs left out.
    #[test]
    fn the_listing_script_finds_what_the_globs_match_inside_the_run_directory() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir_all(run.join("out/deep")).unwrap();
        std::fs::write(run.join("out/a.dat"), b"12345").unwrap();
        std::fs::write(run.join("out/deep/b.dat"), b"1").unwrap();
        std::fs::write(run.join("input.dat"), b"staged").unwrap();
        std::fs::write(run.join("log.txt"), b"abc").unwrap();
        std::fs::write(dir.path().join("secret"), b"outside").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), run.join("out/link")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), run.join("leak.txt")).unwrap();
        let globs = ["out".to_owned(), "*.dat".to_owned(), "*.txt".to_owned(), "nothing/*".to_owned()];
        let script = list_script(run.to_str().unwrap(), &globs, &["input.dat".to_owned()], 100);
        let out = std::process::Command::new("sh").arg("-c").arg(&script).output().unwrap();
        let found = parse_found(&String::from_utf8_lossy(&out.stdout)).expect("a listing");
        assert_eq!(found, [("log.txt".to_owned(), 3), ("out/a.dat".to_owned(), 5), ("out/deep/b.dat".to_owned(), 1)]);
        let none = list_script(dir.path().join("gone").to_str().unwrap(), &globs, &[], 100);
        let out = std::process::Command::new("sh").arg("-c").arg(&none).output().unwrap();
        assert_eq!(parse_found(&String::from_utf8_lossy(&out.stdout)), None);
    }

    #[test]
    fn tries_wait_longer_each_time() {
        assert_eq!(retry_after(1), Duration::minutes(2));
        assert_eq!(retry_after(4), Duration::minutes(16));
        assert_eq!(retry_after(40), Duration::minutes(64));
    }
}
