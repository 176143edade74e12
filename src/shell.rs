//! Shell text on the ground floor: POSIX quoting (what every `@@ value @@` and every
//! path in a mediator script goes through) and quoted here-documents. The forge and
//! the mediator both build on it; it depends on nothing in the crate.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Bytes that never need quoting in any shell context: letters, digits and
/// `_ @ % + = : , . / -`. A value made only of these cannot end a quoted string,
/// start an expansion, or split into words.
pub fn is_shell_safe(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_@%+=:,./-".contains(&b))
}

/// `s` as one shell word: unchanged if [`is_shell_safe`], else in single quotes with
/// each `'` written as `'\''`. The empty string becomes `''`.
pub fn shell_quote(s: &str) -> Cow<'_, str> {
    if is_shell_safe(s) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    Cow::Owned(out)
}

/// Writes `content` to `target` (a shell word) through a quoted here-document. The
/// delimiter is `HPCFORGE_END_<purpose>`, with a number added until no line of the
/// content equals it: that check, not the name, is what keeps content from ending the
/// here-document early.
pub fn heredoc(out: &mut String, target: &str, purpose: &str, content: &str) -> Result<(), String> {
    let base = format!("HPCFORGE_END_{purpose}");
    let mut tag = base.clone();
    let mut n = 0u32;
    while content.lines().any(|l| l == tag) {
        n += 1;
        if n > 1000 {
            return Err(format!("no free here-document delimiter for the {purpose} text"));
        }
        tag = format!("{base}_{n}");
    }
    let _ = writeln!(out, "cat > {target} <<'{tag}'");
    out.push_str(content);
    if !content.is_empty() && !content.ends_with('\n') {
        out.push('\n');
    }
    let _ = writeln!(out, "{tag}");
    Ok(())
}

/// A quoted here-document writing `content` to `target`, as its own text (for scripts
/// that carry other scripts, like the mediator's submission).
pub fn heredoc_block(target: &str, purpose: &str, content: &str) -> Result<String, String> {
    let mut out = String::new();
    heredoc(&mut out, target, purpose, content)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_words_stay_as_they_are() {
        for s in ["20", "-3.5e7", "/home/alice/hpcforge/x", "a_b-c.d", "user@host:22", "50%", "k=v,w"] {
            assert_eq!(shell_quote(s), s);
        }
    }

    #[test]
    fn everything_else_is_single_quoted() {
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("$(id)"), "'$(id)'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote("café"), "'café'");
        assert_eq!(shell_quote("~root"), "'~root'");
        assert_eq!(shell_quote("*"), "'*'");
    }

    #[test]
    fn quoted_words_read_back_as_the_value_in_a_real_shell() {
        let values = ["a b", "$(id)", "it's", "`id`", "x;y&&z|w", "\"dq\"", "back\\slash", "'''", "tab\there", "ünï🚀"];
        let script: String = values.iter().map(|v| format!("printf '%s\\0' {}\n", shell_quote(v))).collect();
        let out = std::process::Command::new("sh").arg("-c").arg(&script).output().expect("sh runs");
        let got: Vec<String> =
            String::from_utf8(out.stdout).unwrap().split('\0').filter(|s| !s.is_empty()).map(String::from).collect();
        assert_eq!(got, values);
    }

    #[test]
    fn here_documents_end_only_at_their_own_delimiter() {
        let mut out = String::new();
        heredoc(&mut out, "f", "APP", "line\nEOF\n").unwrap();
        assert!(out.starts_with("cat > f <<'HPCFORGE_END_APP'\n") && out.ends_with("\nHPCFORGE_END_APP\n"), "{out}");
        // Content that holds the delimiter line gets another delimiter.
        let mut out = String::new();
        heredoc(&mut out, "f", "APP", "HPCFORGE_END_APP\nHPCFORGE_END_APP_1\n").unwrap();
        assert!(out.starts_with("cat > f <<'HPCFORGE_END_APP_2'\n"), "{out}");
        assert_eq!(out.lines().filter(|l| *l == "HPCFORGE_END_APP_2").count(), 1);
    }
}
