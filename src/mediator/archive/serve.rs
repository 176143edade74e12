//! The outputs kept in the store, served: listed, one file downloaded (whole or a
//! byte range, a chunk at a time), or all of them bundled into a gzipped tarball made
//! as it is sent. Through bounded channels, as downloads from the cluster are.

use futures::StreamExt as _;
use tokio::sync::mpsc;

use crate::mediator::files::{ByteRange, Download, DownloadError, FileKind, FileSource, RunFile, RunFiles};
use crate::mediator::stream::{CHUNK, CHUNKS_IN_FLIGHT, RemoteStream};
use crate::mediator::{Mediator, MediatorError};
use crate::model::Task;
use crate::store::ArchiveStream;

/// A stream of the store's chunks as a [`RemoteStream`] (what downloads send),
/// through a bounded channel: a reader that goes away stops the reading.
fn as_remote(header: String, mut chunks: ArchiveStream) -> RemoteStream {
    let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    tokio::spawn(async move {
        while let Some(item) = chunks.next().await {
            let failed = item.is_err();
            let item = item.map_err(|e| std::io::Error::other(e.to_string()));
            if tx.send(item).await.is_err() || failed {
                break;
            }
        }
    });
    RemoteStream { header, body: rx }
}

/// Bytes written into a bounded channel in [`CHUNK`]s, for `tar` and `gzip` on a
/// blocking thread; a reader that went away fails the next write.
struct ChannelWriter {
    tx: mpsc::Sender<Result<Vec<u8>, std::io::Error>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx.blocking_send(Ok(full)).map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

impl Mediator {
    /// The outputs kept for `task`, as a listing.
    pub(in crate::mediator) async fn list_archived(&self, task: &Task) -> Result<RunFiles, MediatorError> {
        let files = self.store.archived_files(&task.id).await?;
        Ok(RunFiles {
            run_dir: task.run_dir.clone(),
            files: files
                .into_iter()
                .map(|f| RunFile {
                    path: f.path,
                    kind: FileKind::File,
                    size: f.size,
                    modified: f.modified,
                    sha256: Some(f.sha256),
                })
                .collect(),
            left_out: 0,
            source: FileSource::Archive,
        })
    }

    /// The kept file `rel` of `task` (or a range of it), if it is kept.
    pub(in crate::mediator) async fn download_archived(
        &self,
        task: &Task,
        rel: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<Download>, DownloadError> {
        let Some(file) = self.store.archived_file(&task.id, rel).await.map_err(MediatorError::from)? else {
            return Ok(None);
        };
        let size = file.size;
        let last = size.saturating_sub(1);
        let (first, end) = match range {
            None => (0, last),
            Some(ByteRange::From(a)) => (a, last),
            Some(ByteRange::Between(a, b)) => (a, b.min(last)),
            Some(ByteRange::Last(0)) => return Err(DownloadError::Unsatisfiable(size)),
            Some(ByteRange::Last(n)) => (size.saturating_sub(n), last),
        };
        let empty = || as_remote(String::new(), futures::stream::empty().boxed());
        if size == 0 && range.is_none() {
            let d = Download {
                path: file.path,
                size: 0,
                modified: file.modified,
                span: None,
                partial: false,
                body: empty(),
                source: FileSource::Archive,
            };
            return Ok(Some(d));
        }
        if first >= size {
            return Err(DownloadError::Unsatisfiable(size));
        }
        let Some((_, chunks)) =
            self.store.archive_read(&task.id, rel, first, end).await.map_err(MediatorError::from)?
        else {
            return Ok(None); // removed meanwhile (a restart made it again): the cluster's
        };
        Ok(Some(Download {
            path: file.path,
            size,
            modified: file.modified,
            span: Some((first, end)),
            partial: range.is_some(),
            body: as_remote(String::new(), chunks),
            source: FileSource::Archive,
        }))
    }

    /// Every output kept for `task`, as one gzipped tarball made as it is sent (the
    /// server holds a few chunks of it at a time); how many files it holds.
    pub(in crate::mediator) async fn archived_tarball(
        &self,
        task: &Task,
    ) -> Result<(u64, RemoteStream), MediatorError> {
        let files = self.store.archived_files(&task.id).await?;
        if files.is_empty() {
            return Err(MediatorError::NotFound(format!("task {} has no outputs kept in the store", task.id)));
        }
        let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
        let (store, rt, id, n) = (self.store.clone(), tokio::runtime::Handle::current(), task.id, files.len() as u64);
        tokio::task::spawn_blocking(move || {
            let writer = ChannelWriter { tx: tx.clone(), buf: Vec::with_capacity(CHUNK) };
            let made = (|| -> std::io::Result<()> {
                let gz = flate2::write::GzEncoder::new(writer, flate2::Compression::fast());
                let mut tar = tar::Builder::new(gz);
                for f in &files {
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(f.size);
                    h.set_mode(0o644);
                    h.set_mtime(f.modified.unix_timestamp().max(0) as u64);
                    let mut chunks = if f.size == 0 {
                        futures::stream::empty().boxed()
                    } else {
                        match rt.block_on(store.archive_read(&id, &f.path, 0, f.size - 1)) {
                            Ok(Some((_, chunks))) => chunks,
                            Ok(None) => return Err(std::io::Error::other(format!("{} is no longer kept", f.path))),
                            Err(e) => return Err(std::io::Error::other(e.to_string())),
                        }
                    };
                    let rt = rt.clone();
                    let reader = super::ChunkReader::new(move || {
                        rt.block_on(chunks.next()).map(|c| c.map_err(|e| std::io::Error::other(e.to_string())))
                    });
                    tar.append_data(&mut h, &f.path, reader)?;
                }
                let mut writer = tar.into_inner()?.finish()?;
                std::io::Write::flush(&mut writer)
            })();
            if let Err(e) = made {
                let _ = tx.blocking_send(Err(e));
            }
        });
        Ok((n, RemoteStream { header: format!("OK {n}"), body: rx }))
    }
}
