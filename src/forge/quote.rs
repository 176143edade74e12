//! POSIX shell quoting: the escape function every `@@ value @@` goes through.

use std::borrow::Cow;

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

/// The escape function given to Tera.
pub fn tera_escape(s: &str, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    out.write_all(shell_quote(s).as_bytes())
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
}
