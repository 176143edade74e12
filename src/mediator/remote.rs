//! Running a shell script on a cluster as a user: over SSH, or (for `local` clusters)
//! as a local process of the server's own user.
//!
//! Every operation is one POSIX `sh` script sent on standard input to `sh -s`: one
//! round trip, however many commands it runs. Login shells may print banners or
//! warnings from startup files; the script prints its results between two random
//! marker lines, and only what stands between them is read.

use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};

/// What a remote script printed between its markers, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteOutput {
    /// Lines between the markers.
    pub body: String,
    /// Standard error (startup-file noise included), for messages.
    pub stderr: String,
    /// Exit status of `sh -s`.
    pub status: i32,
}

/// Why a remote script did not run to its end marker.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// Could not connect or log in; nothing ran. Retrying later may work.
    #[error("{0}")]
    Unreachable(String),
    /// The connection failed after the script was sent: it may or may not have run.
    #[error("{0}")]
    Ambiguous(String),
    /// The cluster is not the one we think it is, or the user cannot log in: retrying
    /// will not help until an admin acts.
    #[error("{0}")]
    Refused(String),
    /// The script ran but its output had no end marker (it was killed, or printed
    /// something that broke the protocol).
    #[error("{0}")]
    Garbled(String),
}

impl RemoteError {
    /// Whether trying again later may work.
    pub fn is_transient(&self) -> bool {
        matches!(self, RemoteError::Unreachable(_) | RemoteError::Ambiguous(_) | RemoteError::Garbled(_))
    }
}

/// A fresh pair of marker lines.
pub fn markers() -> (String, String) {
    let mut bytes = [0u8; 12];
    SystemRandom::new().fill(&mut bytes).expect("the system random source works");
    let nonce = hex::encode(bytes);
    (format!("HPCFORGE-BEGIN-{nonce}"), format!("HPCFORGE-END-{nonce}"))
}

/// Wraps `body` so its output is framed by the markers.
pub fn framed(body: &str, (begin, end): &(String, String)) -> String {
    format!("printf '%s\\n' '{begin}'\n{body}\nprintf '\\n%s\\n' '{end}'\n")
}

/// Takes what stands between the markers in `stdout`.
pub fn unframe(stdout: &str, (begin, end): &(String, String)) -> Option<String> {
    let start = stdout.find(&format!("{begin}\n"))? + begin.len() + 1;
    let stop = stdout[start..].rfind(&format!("\n{end}"))? + start;
    Some(stdout[start..stop].to_owned())
}

/// `sh -s` as a local process of the server's own user, its three streams piped,
/// killed if dropped.
pub(super) fn spawn_sh() -> Result<tokio::process::Child, RemoteError> {
    tokio::process::Command::new("sh")
        .arg("-s")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| RemoteError::Unreachable(format!("cannot start sh: {e}")))
}

/// Runs `script` with `sh -s` as the server's own user (the `local` scheduler).
pub async fn run_local(script: &str, timeout: Duration) -> Result<RemoteOutput, RemoteError> {
    use tokio::io::AsyncWriteExt as _;
    let marks = markers();
    let mut child = spawn_sh()?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = framed(script, &marks);
    let write = async move {
        stdin.write_all(input.as_bytes()).await?;
        stdin.shutdown().await
    };
    let run = async {
        let (w, out) = tokio::join!(write, child.wait_with_output());
        w.map_err(|e| RemoteError::Ambiguous(format!("writing to sh: {e}")))?;
        out.map_err(|e| RemoteError::Ambiguous(format!("waiting for sh: {e}")))
    };
    let out = tokio::time::timeout(timeout, run).await.map_err(|_| {
        RemoteError::Ambiguous(format!("the local script did not finish within {} s", timeout.as_secs()))
    })??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let body = unframe(&stdout, &marks).ok_or_else(|| {
        RemoteError::Garbled(format!(
            "the local script ended without its end marker: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    })?;
    Ok(RemoteOutput {
        body,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        status: out.status.code().unwrap_or(-1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_read_only_between_the_markers() {
        let m = ("B".to_owned(), "E".to_owned());
        assert_eq!(unframe("motd\nwelcome!\nB\nline 1\nline 2\n\nE\n", &m).as_deref(), Some("line 1\nline 2\n"));
        assert_eq!(unframe("B\n\nE\n", &m).as_deref(), Some(""));
        assert_eq!(unframe("B\nno end\n", &m), None);
    }

    #[tokio::test]
    async fn local_scripts_run_and_startup_noise_is_ignored() {
        let out = run_local("echo one; echo two >&2; printf 'three'", Duration::from_secs(10)).await.unwrap();
        assert_eq!((out.body.as_str(), out.stderr.trim(), out.status), ("one\nthree", "two", 0));
        let out = run_local("exit 3", Duration::from_secs(10)).await;
        assert!(matches!(out, Err(RemoteError::Garbled(_))), "an early exit never prints the end marker");
    }
}
