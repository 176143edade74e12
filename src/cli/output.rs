//! What the CLI prints that every command shares: the one place errors are reported
//! (a server's refusal with its problems, mapped to files for a pushed folder; any
//! other failure with its cause chain), and common formats.

use std::process::ExitCode;

use super::client::{Answer, ClientError};
use crate::definitions::folder::LoadedFolder;

/// Reports a command's failure: a server's refusal with each problem, else the cause
/// chain.
pub fn failed(e: &anyhow::Error) -> ExitCode {
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::Server { status, message, errors }) => report::<()>(
            ClientError::Server { status: *status, message: message.clone(), errors: errors.clone() },
            None,
        ),
        _ => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// For commands whose answer is its message: prints it and succeeds.
pub fn done<T>(answer: Answer<T>) -> ExitCode {
    println!("{}", answer.message);
    ExitCode::SUCCESS
}

/// Prints a server error; with a loaded folder, problems are shown per file.
pub fn report<S>(e: ClientError, folder: Option<&LoadedFolder<S>>) -> ExitCode {
    match e {
        ClientError::Server { status, message, errors } => {
            eprintln!("error: the server refused it ({status}): {message}");
            if status == reqwest::StatusCode::UNAUTHORIZED {
                eprintln!(
                    "hint: set HPCFORGE_TOKEN to your token; an admin makes one with `hpcforge user add NAME` or `hpcforge token create --user NAME`"
                );
            }
            for p in &errors {
                match folder {
                    Some(f) => {
                        let (file, field) = f.locate(&p.pointer);
                        match field {
                            Some(field) => eprintln!("  {}: {field}: {}", file.display(), p.message),
                            None => eprintln!("  {}: {}", file.display(), p.message),
                        }
                    }
                    None => eprintln!("  {}: {}", if p.pointer.is_empty() { "/" } else { &p.pointer }, p.message),
                }
            }
        }
        other => eprintln!("error: {other:#}"),
    }
    ExitCode::FAILURE
}

pub fn print_problems(what: &str, p: &crate::model::Problems) -> ExitCode {
    eprintln!("error: {what}:");
    for x in p.iter() {
        eprintln!("  {}: {}", if x.pointer.is_empty() { "/" } else { &x.pointer }, x.message);
    }
    ExitCode::FAILURE
}

pub fn when(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| t.to_string())
}

pub fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

/// Percent-encodes a query value.
pub fn url_escape(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b',' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
