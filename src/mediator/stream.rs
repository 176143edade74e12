//! A remote script whose answer is a stream of bytes (a file, a tarball) rather than
//! lines: its first line after the begin marker is a header the caller reads (what
//! it is about to send, or why it cannot), and everything after it reaches the caller
//! in chunks through a bounded channel, so the server holds at most
//! [`CHUNKS_IN_FLIGHT`] × [`CHUNK`] bytes of it whatever its size. A reader that goes
//! away stops the transfer; a script that fails after its header (a broken
//! connection, `tar` that could not read a file) ends the stream with an error, so an
//! HTTP client sees a broken transfer, never a complete-looking short one.
//!
//! Over SSH each stream has a connection of its own, outside the pool: a long
//! download must not hold one of the few connections the monitor's queries use.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::remote::{RemoteError, markers};
use super::ssh::{SshLimits, SshTarget, connect};

/// Bytes a chunk holds at most.
pub const CHUNK: usize = 64 * 1024;

/// Chunks read ahead of the reader at most.
pub const CHUNKS_IN_FLIGHT: usize = 8;

/// The longest header line.
const MAX_HEADER: usize = 64 * 1024;

/// A script's streamed answer.
#[derive(Debug)]
pub struct RemoteStream {
    /// The header line the script printed first (without its marker and newline).
    pub header: String,
    /// The bytes after it, in chunks; an `Err` ends a stream that failed.
    pub body: mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
}

/// Reads `from` until the begin marker's line (startup-file noise before it is
/// skipped): what follows the marker on that line is the header.
fn read_header(from: &mut impl std::io::BufRead, begin: &str) -> Result<String, String> {
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = from.take(MAX_HEADER as u64).read_until(b'\n', &mut line).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the script ended before it said what it sends".into());
        }
        let text = String::from_utf8_lossy(&line);
        if let Some(rest) = text.strip_prefix(begin) {
            return Ok(rest.trim_start_matches(' ').trim_end_matches('\n').to_owned());
        }
    }
}

/// Sends the rest of `from` in chunks; `false` when the reader went away.
fn pump(
    from: &mut impl std::io::Read,
    to: &mpsc::Sender<Result<Vec<u8>, std::io::Error>>,
) -> Result<bool, std::io::Error> {
    loop {
        let mut chunk = vec![0u8; CHUNK];
        let n = from.read(&mut chunk)?;
        if n == 0 {
            return Ok(true);
        }
        chunk.truncate(n);
        if to.blocking_send(Ok(chunk)).is_err() {
            return Ok(false);
        }
    }
}

/// The script as sent: the begin marker opens its header line, which the script
/// completes (`printf '%s ...' "$hpcg_begin" ...`).
fn script_with_marker(script: &str, begin: &str) -> String {
    format!("hpcg_begin='{begin}'\n{script}")
}

/// Runs `script` over SSH as `target.user` on a connection of its own; `idle` bounds
/// each wait for data.
pub async fn ssh_stream(
    target: &SshTarget,
    limits: SshLimits,
    script: &str,
    idle: Duration,
) -> Result<RemoteStream, RemoteError> {
    let t = target.clone();
    let session = tokio::task::spawn_blocking(move || connect(&t, &limits))
        .await
        .map_err(|e| RemoteError::Unreachable(format!("the connection task failed: {e}")))??;
    let (begin, _) = markers();
    let input = script_with_marker(script, &begin);
    let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    let (header_tx, header_rx) = oneshot::channel();
    tokio::task::spawn_blocking(move || {
        session.set_timeout(idle.as_millis().min(u128::from(u32::MAX)) as u32);
        let started = (|| {
            let mut ch = session
                .channel_session()
                .map_err(|e| RemoteError::Unreachable(format!("opening an SSH channel: {e}")))?;
            ch.exec("sh -s").map_err(|e| RemoteError::Unreachable(format!("starting sh: {e}")))?;
            ch.write_all(input.as_bytes()).map_err(|e| RemoteError::Ambiguous(format!("sending the script: {e}")))?;
            ch.send_eof().map_err(|e| RemoteError::Ambiguous(format!("ending the script: {e}")))?;
            Ok(ch)
        })();
        let mut ch = match started {
            Ok(ch) => ch,
            Err(e) => {
                let _ = header_tx.send(Err(e));
                return;
            }
        };
        let mut out = BufReader::with_capacity(CHUNK, ch.stream(0));
        match read_header(&mut out, &begin) {
            Ok(h) => {
                if header_tx.send(Ok(h)).is_err() {
                    return;
                }
            }
            Err(why) => {
                let mut stderr = String::new();
                let _ = ch.stderr().take(4096).read_to_string(&mut stderr);
                let _ = header_tx.send(Err(RemoteError::Garbled(format!("{why}: {}", stderr.trim()))));
                return;
            }
        }
        let pumped = pump(&mut out, &tx);
        drop(out);
        match pumped {
            Ok(true) => {
                let mut stderr = String::new();
                let _ = ch.stderr().take(4096).read_to_string(&mut stderr);
                let _ = ch.wait_close();
                let status = ch.exit_status().unwrap_or(-1);
                if status != 0 {
                    let why = format!("the transfer ended with status {status}: {}", stderr.trim());
                    let _ = tx.blocking_send(Err(std::io::Error::other(why)));
                }
            }
            // The reader went away: close, which stops the remote side.
            Ok(false) => {}
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
            }
        }
        let _ = ch.close();
        let _ = session.disconnect(None, "done", None);
    });
    let header = header_rx.await.map_err(|_| RemoteError::Ambiguous("the transfer task ended".into()))??;
    Ok(RemoteStream { header, body: rx })
}

/// Runs `script` with `sh -s` as the server's own user (the `local` scheduler).
pub async fn local_stream(script: &str) -> Result<RemoteStream, RemoteError> {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
    let (begin, _) = markers();
    let mut child = super::remote::spawn_sh()?;
    let mut stdin = child.stdin.take().expect("piped");
    stdin
        .write_all(script_with_marker(script, &begin).as_bytes())
        .await
        .map_err(|e| RemoteError::Ambiguous(format!("writing to sh: {e}")))?;
    drop(stdin);
    let mut out = tokio::io::BufReader::with_capacity(CHUNK, child.stdout.take().expect("piped"));
    let mut stderr = child.stderr.take().expect("piped");
    let header = loop {
        let mut line = Vec::new();
        let n = (&mut out).take(MAX_HEADER as u64).read_until(b'\n', &mut line).await.unwrap_or(0);
        if n == 0 {
            let mut why = String::new();
            let _ = (&mut stderr).take(4096).read_to_string(&mut why).await;
            return Err(RemoteError::Garbled(format!("the script ended before it said what it sends: {}", why.trim())));
        }
        let text = String::from_utf8_lossy(&line).into_owned();
        if let Some(rest) = text.strip_prefix(&begin) {
            break rest.trim_start_matches(' ').trim_end_matches('\n').to_owned();
        }
    };
    let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    tokio::spawn(async move {
        loop {
            let mut chunk = vec![0u8; CHUNK];
            match out.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => {
                    chunk.truncate(n);
                    if tx.send(Ok(chunk)).await.is_err() {
                        return; // the reader went away: the child is killed on drop
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
        let mut why = String::new();
        let _ = (&mut stderr).take(4096).read_to_string(&mut why).await;
        match child.wait().await {
            Ok(s) if s.success() => {}
            Ok(s) => {
                let msg = format!("the transfer ended with {s}: {}", why.trim());
                let _ = tx.send(Err(std::io::Error::other(msg))).await;
            }
            Err(e) => {
                let _ = tx.send(Err(e)).await;
            }
        }
    });
    Ok(RemoteStream { header, body: rx })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_follows_the_marker_and_noise_before_it_is_skipped() {
        let mut input: &[u8] = b"Welcome to the cluster\nBEGIN OK 12 34\nbinary\x00rest";
        assert_eq!(read_header(&mut input, "BEGIN").unwrap(), "OK 12 34");
        assert_eq!(input, b"binary\x00rest");
        let mut none: &[u8] = b"no marker here\n";
        assert!(read_header(&mut none, "BEGIN").is_err());
    }

    #[tokio::test]
    async fn a_local_stream_brings_every_byte_and_a_failure_after_the_header_ends_it_with_an_error() {
        let s = local_stream("printf '%s OK\\n' \"$hpcg_begin\"; head -c 300000 /dev/zero").await.unwrap();
        assert_eq!(s.header, "OK");
        let mut body = s.body;
        let mut total = 0;
        while let Some(chunk) = body.recv().await {
            total += chunk.unwrap().len();
        }
        assert_eq!(total, 300_000);
        let s = local_stream("printf '%s OK\\n' \"$hpcg_begin\"; echo part; exit 3").await.unwrap();
        let mut body = s.body;
        assert_eq!(body.recv().await.unwrap().unwrap(), b"part\n");
        let end = body.recv().await.unwrap();
        assert!(end.is_err(), "{end:?}");
    }
}
