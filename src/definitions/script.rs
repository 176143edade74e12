//! Script text rules shared by every uploaded script: size cap, line endings, byte-order
//! mark, NUL, final newline and, where one is needed, a `#!` line.
//!
//! Representation details are normalised (CRLF → LF, BOM dropped, final newline added)
//! and reported as notes; content that cannot be a script (NUL, a lone CR, a missing
//! `#!`) is refused with the line it is on. Normalisation happens on the server, so the
//! same upload gives the same stored bytes and sha256 whichever client sent it.

use sha2::{Digest, Sha256};

/// What a script must start with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShebangRule {
    /// A `#!/absolute/interpreter` line (application scripts).
    Required,
    /// A `#!` line, or an `extends` tag: a phase template that extends `script_common`
    /// inherits its `#!` line (Tera wants `extends` before anything else).
    Template,
    /// Anything (cluster environment snippets, which are sourced by the forged script).
    Optional,
}

/// A script after normalisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalisedScript {
    /// The text as it will be stored.
    pub text: String,
    /// sha256 of `text`, lowercase hex.
    pub sha256: String,
    /// What was changed on the way (for the upload's answer).
    pub notes: Vec<String>,
}

/// sha256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Normalises `text` or says why it cannot be a script. `max_bytes` applies to the
/// text as received.
pub fn normalise(text: &str, rule: ShebangRule, max_bytes: usize) -> Result<NormalisedScript, String> {
    if text.len() > max_bytes {
        return Err(format!("the script is {} bytes; the limit is {max_bytes} bytes", text.len()));
    }
    let mut notes = Vec::new();
    let mut body = text;
    if let Some(rest) = body.strip_prefix('\u{feff}') {
        body = rest;
        notes.push("removed a UTF-8 byte-order mark (it would hide the `#!` line from the kernel)".to_owned());
    }
    let mut out = String::with_capacity(body.len() + 1);
    let mut crlf = 0usize;
    for (i, line) in body.split('\n').enumerate() {
        let line_no = i + 1;
        let line = match line.strip_suffix('\r') {
            Some(stripped) => {
                crlf += 1;
                stripped
            }
            None => line,
        };
        if let Some(col) = line.find('\r') {
            return Err(format!(
                "line {line_no}, byte {}: a carriage return not followed by a newline (old Mac line endings?); save the file with LF line endings",
                col + 1
            ));
        }
        if let Some(col) = line.find('\0') {
            return Err(format!("line {line_no}, byte {}: a NUL byte; scripts must be text", col + 1));
        }
        // Other C0 controls have no place in a script; refusing them also keeps the
        // forge's internal markup delimiters (control bytes) out of every script.
        if let Some((col, c)) =
            line.char_indices().find(|(_, c)| c.is_control() && !matches!(c, '\t' | '\u{c}' | '\u{1b}'))
        {
            return Err(format!(
                "line {line_no}, byte {}: the control character U+{:04X}; scripts may hold tabs, form feeds and escapes, not other control characters",
                col + 1,
                c as u32
            ));
        }
        if i > 0 {
            out.push('\n');
        }
        out.push_str(line);
    }
    if crlf > 0 {
        notes.push(format!("converted {crlf} CRLF line ending{} to LF", if crlf == 1 { "" } else { "s" }));
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
        notes.push("added a final newline".to_owned());
    }
    match rule {
        ShebangRule::Required => check_shebang(&out)?,
        ShebangRule::Template if !starts_with_extends(&out) => check_shebang(&out)
            .map_err(|e| format!("{e}; a phase template may instead start with `@% extends \"script_common\" %@`"))?,
        ShebangRule::Template | ShebangRule::Optional => {}
    }
    let sha256 = sha256_hex(out.as_bytes());
    Ok(NormalisedScript { text: out, sha256, notes })
}

/// Whether line 1 is a template `extends` tag (`@% extends "script_common" %@`).
fn starts_with_extends(text: &str) -> bool {
    let first = text.lines().next().unwrap_or("");
    first.strip_prefix("@%").is_some_and(|rest| rest.trim_start_matches('-').trim_start().starts_with("extends"))
}

/// Checks that line 1 is `#!` followed by an absolute interpreter path.
fn check_shebang(text: &str) -> Result<(), String> {
    let first = text.lines().next().unwrap_or("");
    let Some(rest) = first.strip_prefix("#!") else {
        return Err(
            "line 1 must be a `#!` line naming the interpreter (e.g. `#!/bin/bash` or `#!/usr/bin/env python3`)"
                .to_owned(),
        );
    };
    if !rest.trim_start().starts_with('/') {
        return Err(format!("line 1: the interpreter in `{}` must be an absolute path", first.escape_debug()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: usize = 1 << 20;

    #[test]
    fn lf_scripts_are_kept_byte_for_byte() {
        let s = normalise("#!/bin/bash\necho hi\n", ShebangRule::Required, CAP).unwrap();
        assert_eq!(s.text, "#!/bin/bash\necho hi\n");
        assert!(s.notes.is_empty());
        assert_eq!(s.sha256, sha256_hex(b"#!/bin/bash\necho hi\n"));
    }

    #[test]
    fn crlf_is_normalised_and_gives_the_same_bytes_as_lf() {
        let lf = normalise("#!/bin/bash\necho hi\n", ShebangRule::Required, CAP).unwrap();
        let crlf = normalise("#!/bin/bash\r\necho hi\r\n", ShebangRule::Required, CAP).unwrap();
        assert_eq!(crlf.text, lf.text);
        assert_eq!(crlf.sha256, lf.sha256);
        assert_eq!(crlf.notes, ["converted 2 CRLF line endings to LF"]);
    }

    #[test]
    fn a_lone_carriage_return_is_refused_with_its_line() {
        let err = normalise("#!/bin/sh\necho a\recho b\n", ShebangRule::Required, CAP).unwrap_err();
        assert!(err.starts_with("line 2, byte 7:"), "{err}");
    }

    #[test]
    fn nul_bytes_are_refused_with_their_line() {
        let err = normalise("#!/bin/sh\n\necho \0\n", ShebangRule::Required, CAP).unwrap_err();
        assert!(err.starts_with("line 3, byte 6: a NUL"), "{err}");
    }

    #[test]
    fn other_control_characters_are_refused_but_tab_and_escape_are_kept() {
        let err = normalise("#!/bin/sh\necho \u{1}\u{1}\n", ShebangRule::Required, CAP).unwrap_err();
        assert!(err.starts_with("line 2, byte 6: the control character U+0001"), "{err}");
        normalise("#!/bin/sh\nprintf '\t\u{1b}[1m'\n", ShebangRule::Required, CAP).unwrap();
    }

    #[test]
    fn the_byte_order_mark_is_dropped_and_a_final_newline_added() {
        let s = normalise("\u{feff}#!/usr/bin/env python3\nprint(1)", ShebangRule::Required, CAP).unwrap();
        assert_eq!(s.text, "#!/usr/bin/env python3\nprint(1)\n");
        assert_eq!(s.notes.len(), 2);
    }

    #[test]
    fn scripts_that_need_an_interpreter_line_must_have_one() {
        assert!(normalise("echo hi\n", ShebangRule::Required, CAP).unwrap_err().contains("line 1 must be"));
        assert!(normalise("#!bash\n", ShebangRule::Required, CAP).unwrap_err().contains("absolute path"));
        assert!(normalise("", ShebangRule::Required, CAP).is_err());
        normalise("#! /bin/sh\n", ShebangRule::Required, CAP).unwrap();
        // Environment snippets are sourced, so they need none.
        normalise("export OMP_NUM_THREADS=4\n", ShebangRule::Optional, CAP).unwrap();
        normalise("", ShebangRule::Optional, CAP).unwrap();
    }

    #[test]
    fn phase_templates_may_start_with_an_extends_tag() {
        normalise("@% extends \"script_common\" %@\n", ShebangRule::Template, CAP).unwrap();
        normalise("@%- extends \"script_common\" %@\n", ShebangRule::Template, CAP).unwrap();
        normalise("#!/bin/bash\n#SBATCH -n 1\n", ShebangRule::Template, CAP).unwrap();
        let err = normalise("#SBATCH -n 1\n", ShebangRule::Template, CAP).unwrap_err();
        assert!(err.contains("may instead start with"), "{err}");
        // Application scripts get no such leeway.
        assert!(normalise("@% extends \"x\" %@\n", ShebangRule::Required, CAP).is_err());
    }

    #[test]
    fn the_size_cap_is_enforced_before_any_work() {
        let big = format!("#!/bin/sh\n{}", "x".repeat(100));
        let err = normalise(&big, ShebangRule::Required, 50).unwrap_err();
        assert!(err.contains("limit is 50 bytes"), "{err}");
    }
}
