//! What markup may do with a value: an allow-list of Tera filters and block tags,
//! checked at upload (and again when a stored definition is compiled), naming the
//! file and line of each refusal.
//!
//! Every value is shell-quoted on output; what must never happen is a value reaching
//! the script without that quoting. Tera can do that three ways: the `safe` filter
//! (and `escape`, whose result is marked safe), filters that pass a value's "safe"
//! mark on while changing its text (`replace`, `join`, `indent`, `trim` with a
//! pattern: the quoting of a pre-quoted value such as a file list or `HPCG_PAYLOAD`
//! can be cut apart), and block tags whose rendered content counts as safe
//! (`filter`, `set` blocks, macros, includes). So:
//!
//! - only filters that cannot cut a quoted value apart are allowed: case changes,
//!   whitespace trimming without a pattern, `truncate` (which drops the mark), `default`,
//!   and numeric ones;
//! - `safe` is allowed only as `@@ BUILTIN | safe @@`, the whole expression, on a
//!   built-in whose value the engine makes itself (admins' raw output, e.g. a path in a
//!   directive); never on an input, never inside a larger expression;
//! - `HPCG_PAYLOAD` (the generated, already quoted body) may only stand alone, as
//!   `@@ HPCG_PAYLOAD @@`;
//! - templates may use the structural blocks (`if`, `for`, `block`, `extends`,
//!   `set NAME = ...`, `raw`), nothing that captures rendered text.

use super::markup::{PAYLOAD, is_builtin};

/// Filters that keep a shell-quoted value one quoted word (or make a number of it).
pub const ALLOWED_FILTERS: &[&str] = &[
    "default",
    "upper",
    "lower",
    "capitalize",
    "title",
    "trim",
    "trim_start",
    "trim_end",
    "truncate",
    "length",
    "wordcount",
    "str",
    "int",
    "float",
    "abs",
    "round",
];

/// Filters that may not take arguments (with one they can cut quoting apart).
const NO_ARGUMENTS: &[&str] = &["trim", "trim_start", "trim_end"];

/// Block tags templates may use.
const ALLOWED_BLOCKS: &[&str] = &[
    "if", "elif", "else", "endif", "for", "endfor", "block", "endblock", "extends", "set", "raw", "endraw", "break",
    "continue",
];

/// A piece of markup: where it starts, whether it is a block tag, and its body.
struct Tag<'a> {
    line: usize,
    block: bool,
    body: &'a str,
}

/// The markup of `text`: `@@ … @@`, and for templates `@% … %@` (comments skipped).
fn tags(text: &str, template: bool) -> Vec<Tag<'_>> {
    let mut out = Vec::new();
    let mut i = 0;
    let bytes = text.as_bytes();
    let line_at = |pos: usize| text[..pos].bytes().filter(|b| *b == b'\n').count() + 1;
    while i + 1 < bytes.len() {
        // Compared as bytes: `i` may be inside a multi-byte character (only the
        // ASCII `@` starts markup, so a match is always on character boundaries).
        let (open, close) = match &bytes[i..i + 2] {
            b"@@" => ("@@", "@@"),
            b"@%" if template => ("@%", "%@"),
            b"@#" if template => ("@#", "#@"),
            _ => {
                i += 1;
                continue;
            }
        };
        let start = i + 2;
        let Some(len) = text[start..].find(close) else { break };
        if open != "@#" {
            out.push(Tag { line: line_at(i), block: open == "@%", body: &text[start..start + len] });
        }
        i = start + len + 2;
    }
    out
}

/// A token of a markup expression.
#[derive(Debug, PartialEq)]
enum Token<'a> {
    Ident(&'a str),
    Str,
    Pipe,
    Open,
    Other,
}

fn tokens(body: &str) -> Vec<Token<'_>> {
    let mut out = Vec::new();
    let b = body.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_alphabetic() || c == b'_' {
            let s = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push(Token::Ident(&body[s..i]));
            continue;
        }
        match c {
            b'"' | b'\'' | b'`' => {
                i += 1;
                while i < b.len() && b[i] != c {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                out.push(Token::Str);
            }
            b'|' => out.push(Token::Pipe),
            b'(' => out.push(Token::Open),
            c if c.is_ascii_whitespace() => {}
            _ => out.push(Token::Other),
        }
        i += 1;
    }
    out
}

/// Checks the markup of one file; each refusal as (line, message).
pub fn check(text: &str, template: bool) -> Vec<(usize, String)> {
    let mut problems = Vec::new();
    for tag in tags(text, template) {
        let body = tag.body.trim().trim_start_matches('-').trim_end_matches('-').trim();
        let toks = tokens(body);
        let mut say = |m: String| problems.push((tag.line, m));
        if tag.block {
            let keyword = match toks.first() {
                Some(Token::Ident(k)) => *k,
                _ => "",
            };
            if !ALLOWED_BLOCKS.contains(&keyword) {
                say(format!(
                    "`@% {keyword} … %@` is not allowed in a template: only {} are, since other blocks can place rendered \
                     text (and the values in it) unquoted",
                    ALLOWED_BLOCKS.join(", ")
                ));
                continue;
            }
            if keyword == "set" && !body.contains('=') {
                say(
                    "a `set` block (without `=`) captures rendered text and is not allowed; write `@% set NAME = … %@`"
                        .into(),
                );
                continue;
            }
        } else if body == PAYLOAD {
            continue;
        }
        let payload = toks.contains(&Token::Ident(PAYLOAD));
        if payload {
            say(format!(
                "`{PAYLOAD}` may only stand alone, as `@@ {PAYLOAD} @@`: it is already quoted, and nothing may change it"
            ));
            continue;
        }
        for (n, t) in toks.iter().enumerate() {
            if *t != Token::Pipe {
                continue;
            }
            let Some(Token::Ident(filter)) = toks.get(n + 1) else { continue };
            let with_args = toks.get(n + 2) == Some(&Token::Open);
            if *filter == "safe" {
                let bare_builtin = !tag.block
                    && toks.len() == 3
                    && matches!(toks[0], Token::Ident(b) if is_builtin(b) && b != PAYLOAD)
                    && n == 1;
                if !bare_builtin {
                    say(format!(
                        "`| safe` would place a value unquoted: it is allowed only as `@@ BUILTIN | safe @@` on a built-in \
                         (HPCG_...), never on an input or inside a larger expression (`@@ {body} @@`)"
                    ));
                }
            } else if !ALLOWED_FILTERS.contains(filter) {
                say(format!(
                    "the filter `{filter}` is not allowed (it could undo the quoting of a value); allowed: {}",
                    ALLOWED_FILTERS.join(", ")
                ));
            } else if with_args && NO_ARGUMENTS.contains(filter) {
                say(format!(
                    "`{filter}` may not take a pattern here: trimming quotes off a quoted value would unquote it"
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str, template: bool) -> Vec<String> {
        check(text, template).into_iter().map(|(l, m)| format!("{l}: {m}")).collect()
    }

    #[test]
    fn scripts_with_characters_beyond_ascii_are_read_not_cut() {
        // A multi-byte character right before or inside markup once made the scan
        // slice a character in two (and the upload answer a dropped connection).
        for template in [false, true] {
            assert!(refused("#!/bin/sh\necho 'ünïcode ok' ü@@ sleep @@é\n", template).is_empty());
            assert!(refused("ü@", template).is_empty() && refused("é", template).is_empty());
        }
        assert_eq!(refused("# ü\n@@ x | shell @@", false).len(), 1);
    }

    #[test]
    fn safe_on_an_input_is_refused_with_its_line() {
        // The regression (issue 9, hole 1): `@@ msg | safe @@` passed the upload checks.
        let got = refused("#!/bin/bash\necho hi\necho @@ msg | safe @@\n", false);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].starts_with("3: `| safe` would place a value unquoted"), "{got:?}");
        for hidden in [
            "@@ msg|safe @@",
            "@@- msg | safe -@@",
            "@@ msg | upper | safe @@",
            "@@ (msg | safe) ~ 'x' @@",
            "@@ HPCG_RUN_DIR | safe ~ msg @@",
            "@@ msg | default(value=HPCG_USER | safe) @@",
        ] {
            assert!(!refused(hidden, false).is_empty(), "{hidden} passed");
        }
    }

    #[test]
    fn safe_stays_for_a_bare_built_in() {
        assert!(refused("#SBATCH --chdir=@@ HPCG_RUN_DIR | safe @@\n", true).is_empty());
        assert!(refused("cd @@ HPCG_RUN_DIR|safe @@\n", false).is_empty());
        assert!(!refused("@@ HPCG_PAYLOAD | safe @@\n", true).is_empty(), "the payload stands alone");
    }

    #[test]
    fn filters_that_can_cut_quoting_apart_are_refused() {
        for bad in [
            "@@ f | replace(from=\"'\", to=\"\") @@",
            "@@ f | join(sep=\" \") @@",
            "@@ f | trim_start(pat=\"'\") @@",
            "@@ f | escape @@",
            "@@ f | indent @@",
            "@@ f | reverse @@",
        ] {
            assert_eq!(refused(bad, false).len(), 1, "{bad}");
        }
        for ok in ["@@ f | upper @@", "@@ n | default(value=3) | int @@", "@@ s | trim | truncate(length=10) @@"] {
            assert!(refused(ok, false).is_empty(), "{ok}: {:?}", refused(ok, false));
        }
    }

    #[test]
    fn the_payload_stands_alone_and_templates_keep_to_structural_blocks() {
        assert!(
            refused("@@ HPCG_PAYLOAD @@\n@%- if HPCG_MEMORY %@x@% endif %@\n@% set a = HPCG_CPUS %@\n", true)
                .is_empty()
        );
        assert_eq!(refused("@@ HPCG_PAYLOAD | upper @@", true).len(), 1);
        assert_eq!(refused("@% set p = HPCG_PAYLOAD %@", true).len(), 1);
        assert_eq!(refused("@% filter upper %@@@ HPCG_PAYLOAD @@@% endfilter %@", true).len(), 2);
        assert_eq!(refused("@% set captured %@x@% endset %@", true).len(), 2);
        assert_eq!(refused("@% include \"other\" %@", true).len(), 1);
        // Comments are not markup, and strings do not hide filters.
        assert!(refused("@# @@ x | safe @@ #@", true).is_empty());
        assert!(refused("@@ HPCG_APP ~ \"|safe\" @@", true).is_empty());
    }
}
