//! Where markup stands in a shell script: in plain shell context, or inside quotes,
//! backticks or a here-document.
//!
//! Shell-quoting a value protects it only in **plain** context. Inside `"..."`, a
//! quoted value's single quotes are literal characters and `$(...)` in it runs; inside
//! `'...'` the value's own quotes end the string and leave it bare; inside an unquoted
//! here-document `$(...)` runs whatever the quotes. So markup whose value may need
//! quoting must stand in plain context, and this lexer finds where each `@@ … @@` is.
//!
//! It follows the POSIX shell's quoting rules (single, double and ANSI-C quotes,
//! backslashes, backticks, `$( )` nesting, comments, `<<` / `<<-` here-documents with
//! quoted or unquoted delimiters). It is a lexer, not a parser: it is exact about
//! quoting, which is all that matters here.

/// The shell context a piece of markup stands in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShellContext {
    /// Plain shell words, including inside `$( )` and `[[ ]]`: quoting works.
    Plain,
    /// A comment: the shell never reads it.
    Comment,
    /// Inside `'...'`.
    SingleQuotes,
    /// Inside `$'...'`.
    AnsiCQuotes,
    /// Inside `"..."` (or `${...}` within it).
    DoubleQuotes,
    /// Inside `` `...` ``.
    Backticks,
    /// In the body of a here-document whose delimiter is quoted (`<<'EOF'`): literal text.
    QuotedHeredoc,
    /// In the body of a here-document whose delimiter is not quoted: expansions run.
    UnquotedHeredoc,
}

impl ShellContext {
    /// Whether a shell-quoted value is safe here (it stays one literal word, or is
    /// never read). Not in a quoted here-document either: its body is literal, but a
    /// value equal to the delimiter would end it early and make the admin's remaining
    /// lines run as commands (and the value would land there with its quotes).
    pub fn quoting_protects(self) -> bool {
        matches!(self, ShellContext::Plain | ShellContext::Comment)
    }

    /// How to say where the markup is.
    pub fn describe(self) -> &'static str {
        match self {
            ShellContext::Plain => "in plain shell context",
            ShellContext::Comment => "in a comment",
            ShellContext::SingleQuotes => "inside single quotes",
            ShellContext::AnsiCQuotes => "inside $'...' quotes",
            ShellContext::DoubleQuotes => "inside double quotes",
            ShellContext::Backticks => "inside backticks",
            ShellContext::QuotedHeredoc => "in a quoted here-document",
            ShellContext::UnquotedHeredoc => "in an unquoted here-document",
        }
    }
}

/// One `@@ … @@` in a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MarkupSite {
    /// 1-based line of the opening `@@`.
    pub line: usize,
    /// 1-based column (in characters) of the opening `@@`.
    pub column: usize,
    /// The text between the delimiters, trimmed.
    pub expr: String,
    /// Where it stands.
    pub context: ShellContext,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// Plain context; `depth` counts open `(` inside a `$( )`; the bottom frame is the
    /// script itself.
    Plain {
        depth: u32,
        nested: bool,
    },
    Double,
    Backtick,
}

struct PendingHeredoc {
    delimiter: String,
    quoted: bool,
    strip_tabs: bool,
}

/// Finds every markup site and the shell context it stands in.
pub fn markup_sites(text: &str) -> Vec<MarkupSite> {
    let chars: Vec<char> = text.chars().collect();
    let mut sites = Vec::new();
    let mut stack = vec![Frame::Plain { depth: 0, nested: false }];
    let mut pending: Vec<PendingHeredoc> = Vec::new();
    let (mut i, mut line, mut col) = (0usize, 1usize, 1usize);

    // Advances over one char, keeping line/column.
    macro_rules! bump {
        () => {{
            if chars[i] == '\n' {
                line += 1;
                col = 1;
            } else {
                col += 1;
            }
            i += 1;
        }};
    }
    // Steps over a backslash and the character it escapes.
    macro_rules! escaped {
        () => {{
            bump!();
            if i < chars.len() {
                bump!();
            }
        }};
    }
    // Tries to take a markup site at `i`; true if one was taken.
    let take_markup =
        |i: &mut usize, line: &mut usize, col: &mut usize, ctx: ShellContext, sites: &mut Vec<MarkupSite>| -> bool {
            if chars.get(*i) != Some(&'@') || chars.get(*i + 1) != Some(&'@') {
                return false;
            }
            let start = *i + 2;
            let mut j = start;
            while j + 1 < chars.len() && !(chars[j] == '@' && chars[j + 1] == '@') {
                j += 1;
            }
            if j + 1 >= chars.len() {
                return false; // unclosed: the template engine reports it
            }
            let expr: String = chars[start..j].iter().collect();
            sites.push(MarkupSite { line: *line, column: *col, expr: expr.trim().to_owned(), context: ctx });
            for c in &chars[*i..j + 2] {
                if *c == '\n' {
                    *line += 1;
                    *col = 1;
                } else {
                    *col += 1;
                }
            }
            *i = j + 2;
            true
        };

    while i < chars.len() {
        let top = *stack.last().expect("never empty");
        match top {
            Frame::Plain { depth, nested } => {
                if take_markup(&mut i, &mut line, &mut col, ShellContext::Plain, &mut sites) {
                    continue;
                }
                let c = chars[i];
                let prev = if i == 0 { '\n' } else { chars[i - 1] };
                match c {
                    '\\' => escaped!(),
                    '\'' => {
                        bump!();
                        while i < chars.len() && chars[i] != '\'' {
                            if !take_markup(&mut i, &mut line, &mut col, ShellContext::SingleQuotes, &mut sites) {
                                bump!();
                            }
                        }
                        if i < chars.len() {
                            bump!();
                        }
                    }
                    '$' if chars.get(i + 1) == Some(&'\'') => {
                        bump!();
                        bump!();
                        while i < chars.len() && chars[i] != '\'' {
                            if chars[i] == '\\' {
                                escaped!();
                            } else if !take_markup(&mut i, &mut line, &mut col, ShellContext::AnsiCQuotes, &mut sites) {
                                bump!();
                            }
                        }
                        if i < chars.len() {
                            bump!();
                        }
                    }
                    '$' if chars.get(i + 1) == Some(&'(') => {
                        bump!();
                        bump!();
                        stack.push(Frame::Plain { depth: 0, nested: true });
                    }
                    '"' => {
                        bump!();
                        stack.push(Frame::Double);
                    }
                    '`' => {
                        bump!();
                        stack.push(Frame::Backtick);
                    }
                    '#' if prev.is_whitespace() || matches!(prev, ';' | '&' | '|' | '(' | ')') => {
                        while i < chars.len() && chars[i] != '\n' {
                            if !take_markup(&mut i, &mut line, &mut col, ShellContext::Comment, &mut sites) {
                                bump!();
                            }
                        }
                    }
                    '(' if nested => {
                        bump!();
                        *stack.last_mut().expect("non-empty") = Frame::Plain { depth: depth + 1, nested };
                    }
                    ')' if nested => {
                        bump!();
                        if depth == 0 {
                            stack.pop();
                        } else {
                            *stack.last_mut().expect("non-empty") = Frame::Plain { depth: depth - 1, nested };
                        }
                    }
                    '<' if chars.get(i + 1) == Some(&'<') && chars.get(i + 2) == Some(&'<') => {
                        // A here-string (`<<<`): its word is ordinary plain context.
                        bump!();
                        bump!();
                        bump!();
                    }
                    '<' if chars.get(i + 1) == Some(&'<') => {
                        bump!();
                        bump!();
                        let strip_tabs = chars.get(i) == Some(&'-');
                        if strip_tabs {
                            bump!();
                        }
                        while i < chars.len() && (chars[i] == ' ' || chars[i] == '\t') {
                            bump!();
                        }
                        let mut word = String::new();
                        let mut quoted = false;
                        while i < chars.len() && !chars[i].is_whitespace() && !";|&<>()".contains(chars[i]) {
                            match chars[i] {
                                '\'' | '"' => {
                                    quoted = true;
                                    let q = chars[i];
                                    bump!();
                                    while i < chars.len() && chars[i] != q && chars[i] != '\n' {
                                        word.push(chars[i]);
                                        bump!();
                                    }
                                    if i < chars.len() && chars[i] == q {
                                        bump!();
                                    }
                                }
                                '\\' => {
                                    quoted = true;
                                    bump!();
                                    if i < chars.len() {
                                        word.push(chars[i]);
                                        bump!();
                                    }
                                }
                                c => {
                                    word.push(c);
                                    bump!();
                                }
                            }
                        }
                        if !word.is_empty() {
                            pending.push(PendingHeredoc { delimiter: word, quoted, strip_tabs });
                        }
                    }
                    '\n' if !pending.is_empty() => {
                        bump!();
                        for doc in std::mem::take(&mut pending) {
                            let ctx =
                                if doc.quoted { ShellContext::QuotedHeredoc } else { ShellContext::UnquotedHeredoc };
                            // Body lines until the delimiter line.
                            loop {
                                if i >= chars.len() {
                                    break;
                                }
                                let line_end =
                                    chars[i..].iter().position(|c| *c == '\n').map_or(chars.len(), |p| i + p);
                                let raw: String = chars[i..line_end].iter().collect();
                                let candidate =
                                    if doc.strip_tabs { raw.trim_start_matches('\t') } else { raw.as_str() };
                                if candidate == doc.delimiter {
                                    while i < line_end {
                                        bump!();
                                    }
                                    if i < chars.len() {
                                        bump!();
                                    }
                                    break;
                                }
                                while i < line_end {
                                    if !take_markup(&mut i, &mut line, &mut col, ctx, &mut sites) {
                                        bump!();
                                    }
                                }
                                if i < chars.len() {
                                    bump!();
                                }
                            }
                        }
                    }
                    _ => bump!(),
                }
            }
            Frame::Double => {
                if take_markup(&mut i, &mut line, &mut col, ShellContext::DoubleQuotes, &mut sites) {
                    continue;
                }
                match chars[i] {
                    '\\' => escaped!(),
                    '"' => {
                        bump!();
                        stack.pop();
                    }
                    '$' if chars.get(i + 1) == Some(&'(') => {
                        bump!();
                        bump!();
                        stack.push(Frame::Plain { depth: 0, nested: true });
                    }
                    '`' => {
                        bump!();
                        stack.push(Frame::Backtick);
                    }
                    _ => bump!(),
                }
            }
            Frame::Backtick => {
                if take_markup(&mut i, &mut line, &mut col, ShellContext::Backticks, &mut sites) {
                    continue;
                }
                match chars[i] {
                    '\\' => escaped!(),
                    '`' => {
                        bump!();
                        stack.pop();
                    }
                    _ => bump!(),
                }
            }
        }
    }
    sites
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contexts(script: &str) -> Vec<(String, ShellContext)> {
        markup_sites(script).into_iter().map(|s| (s.expr, s.context)).collect()
    }

    fn ctx_of(script: &str) -> ShellContext {
        let all = contexts(script);
        assert_eq!(all.len(), 1, "{script:?} -> {all:?}");
        all[0].1
    }

    #[test]
    fn plain_positions_are_plain() {
        for s in [
            "x=@@ v @@\n",
            "echo @@ v @@ > out\n",
            "[[ @@ v @@ == y ]]\n",
            "case @@ v @@ in a) ;; esac\n",
            "files=(@@ v @@)\n",
            "y=$(basename @@ v @@)\n",
            "echo \"$(printf %s @@ v @@)\"\n",
            "cmd --opt=@@ v @@\n",
            "x=${y:-1} @@ v @@\n",
            "echo 'a' @@ v @@ 'b'\n",
            "a=\"q\" @@ v @@\n",
            "echo ${#arr[@]} @@ v @@\n",
        ] {
            assert_eq!(ctx_of(s), ShellContext::Plain, "{s:?}");
        }
    }

    #[test]
    fn quoted_positions_are_found() {
        assert_eq!(ctx_of("echo \"Sleeping @@ v @@ s\"\n"), ShellContext::DoubleQuotes);
        assert_eq!(ctx_of("echo 'Sleeping @@ v @@ s'\n"), ShellContext::SingleQuotes);
        assert_eq!(ctx_of("echo $'a @@ v @@'\n"), ShellContext::AnsiCQuotes);
        assert_eq!(ctx_of("x=`echo @@ v @@`\n"), ShellContext::Backticks);
        assert_eq!(ctx_of("echo \"${x:-@@ v @@}\"\n"), ShellContext::DoubleQuotes);
        assert_eq!(ctx_of("echo \"a\\\"b @@ v @@\"\n"), ShellContext::DoubleQuotes, "escaped quote stays inside");
        assert_eq!(ctx_of("echo \"$(echo \"@@ v @@\")\"\n"), ShellContext::DoubleQuotes);
    }

    #[test]
    fn comments_are_comments_but_hash_in_words_is_not() {
        assert_eq!(ctx_of("# uses @@ v @@\n"), ShellContext::Comment);
        assert_eq!(ctx_of("echo x # @@ v @@\n"), ShellContext::Comment);
        assert_eq!(ctx_of("echo a#@@ v @@\n"), ShellContext::Plain);
        assert_eq!(ctx_of("echo $# @@ v @@\n"), ShellContext::Plain);
    }

    #[test]
    fn here_documents_are_quoted_or_not_by_their_delimiter() {
        assert_eq!(ctx_of("cat <<EOF\nvalue @@ v @@\nEOF\necho\n"), ShellContext::UnquotedHeredoc);
        assert_eq!(ctx_of("cat <<'EOF'\nvalue @@ v @@\nEOF\n"), ShellContext::QuotedHeredoc);
        assert_eq!(ctx_of("cat <<\"EOF\"\nvalue @@ v @@\nEOF\n"), ShellContext::QuotedHeredoc);
        assert_eq!(ctx_of("cat <<\\EOF\nvalue @@ v @@\nEOF\n"), ShellContext::QuotedHeredoc);
        assert_eq!(ctx_of("cat <<-EOF\n\tvalue @@ v @@\n\tEOF\n"), ShellContext::UnquotedHeredoc);
        // After the delimiter line, plain again.
        assert_eq!(contexts("cat <<EOF\nx\nEOF\necho @@ v @@\n")[0].1, ShellContext::Plain);
        // A here-string is not a here-document.
        assert_eq!(ctx_of("cat <<< @@ v @@\n"), ShellContext::Plain);
        // Quotes inside a here-document body do not open strings.
        assert_eq!(contexts("cat <<'EOF'\nit's\nEOF\necho @@ v @@\n")[0].1, ShellContext::Plain);
    }

    #[test]
    fn sites_carry_line_column_and_expression() {
        let sites = markup_sites("#!/bin/bash\nx=1\n  echo @@ sleep | upper @@\n");
        assert_eq!(
            sites,
            [MarkupSite { line: 3, column: 8, expr: "sleep | upper".into(), context: ShellContext::Plain }]
        );
    }

    #[test]
    fn the_example_scripts_use_input_markup_only_in_plain_context() {
        for path in [
            "applications/sleep/app_prolog",
            "applications/sleep/app_execute",
            "applications/sleep/app_epilog",
            "applications/pi/app_epilog",
        ] {
            let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap();
            // Built-ins (HPCG_*) never need quoting, so they may stand anywhere.
            for site in markup_sites(&text).into_iter().filter(|s| !s.expr.starts_with("HPCG_")) {
                assert!(site.context.quoting_protects(), "{path}:{}: {:?}", site.line, site);
            }
        }
    }
}
