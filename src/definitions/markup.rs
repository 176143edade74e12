//! The markup language (Tera 2 with `@@` delimiters), the built-in names, and the
//! checks run when definitions are uploaded: syntax, undeclared names, and where
//! input values may stand in shell scripts.
//!
//! Two engines:
//! - **templates** (cluster forge templates, admin-written): `@@ value @@`,
//!   `@% block %@`, `@# comment #@`;
//! - **scripts** (application scripts and cluster environments): `@@ value @@` only.
//!   Their block and comment delimiters are control bytes that uploads refuse, so
//!   nothing else in a script in any language can be taken for markup.
//!
//! Both shell-quote every value on output ([`tera_escape`]); only
//! values the forge builds itself (`HPCG_PAYLOAD`, file lists) are inserted pre-quoted.

use std::collections::BTreeSet;

use tera::{Delimiters, Tera};

use super::CheckedFile;
use super::shell_lint::{ShellContext, markup_sites};
use crate::model::problems::pointer_token;
use crate::model::{ApplicationSpec, InputType, Problems};

/// The built-in markup names and what they hold.
pub const BUILTINS: &[(&str, &str)] = &[
    ("HPCG_TASK_ID", "the task ID (a UUID)"),
    ("HPCG_RUN_DIR", "the task's run directory on the cluster (absolute)"),
    ("HPCG_PHASE", "prolog, execute or epilog"),
    ("HPCG_USER", "the Unix user the job runs as"),
    ("HPCG_CLUSTER", "the cluster's name"),
    ("HPCG_APP", "the application's name"),
    ("HPCG_APP_VERSION", "the application definition's version"),
    ("HPCG_JOB_TAG", "the tag that identifies this phase's job (hpcforge:<task>:<phase>)"),
    ("HPCG_CPUS", "CPUs for the job"),
    ("HPCG_MEMORY", "memory for the job (e.g. 100M), or empty"),
    ("HPCG_WALLTIME", "wall-time limit (e.g. 00:10:00), or empty"),
    ("HPCG_MEMORY_PER_CPU", "the job's memory divided among its CPUs (Grid Engine's per-slot limits), or empty"),
    ("HPCG_PARTITION", "partition or queue, or empty"),
    ("HPCG_ACCOUNT", "account (Slurm) or project (Grid Engine), or empty"),
    (
        "HPCG_LICENSES",
        "the phase's licences the cluster's scheduler counts too, as Slurm's --licenses takes them (maya:2,fluent@lic:1), or empty",
    ),
    ("HPCG_PARALLEL_ENV", "the cluster's parallel environment for multi-CPU jobs (Grid Engine), or empty"),
    ("HPCG_MEMORY_RESOURCE", "the cluster's memory complex (Grid Engine; h_vmem unless it says otherwise)"),
    ("HPCG_PAYLOAD", "templates only: the generated body (inputs, cluster environment, application script)"),
];

/// The built-in only templates may use.
pub const PAYLOAD: &str = "HPCG_PAYLOAD";

/// Whether `name` is a built-in.
pub fn is_builtin(name: &str) -> bool {
    BUILTINS.iter().any(|(n, _)| *n == name)
}

fn engine(blocks: (&'static str, &'static str), comments: (&'static str, &'static str)) -> Tera {
    let mut t = Tera::default();
    t.set_delimiters(Delimiters {
        block_start: blocks.0.into(),
        block_end: blocks.1.into(),
        variable_start: "@@".into(),
        variable_end: "@@".into(),
        comment_start: comments.0.into(),
        comment_end: comments.1.into(),
    })
    .expect("the delimiters are valid and set before any template");
    // Escape every template (the empty suffix matches all names) with shell quoting.
    t.autoescape_on([""]);
    t.set_escape_fn(tera_escape);
    t
}

/// The escape function given to Tera: every value is shell-quoted on output.
pub fn tera_escape(s: &str, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    out.write_all(crate::shell::shell_quote(s).as_bytes())
}

/// The engine for cluster forge templates.
pub fn template_engine() -> Tera {
    engine(("@%", "%@"), ("@#", "#@"))
}

/// Control bytes used as the script engine's block and comment delimiters. Uploaded
/// scripts may not contain them (see `definitions::script`).
pub const SCRIPT_BLOCK_DELIMITERS: (&str, &str) = ("\u{1}\u{1}", "\u{1}\u{2}");
/// See [`SCRIPT_BLOCK_DELIMITERS`].
pub const SCRIPT_COMMENT_DELIMITERS: (&str, &str) = ("\u{2}\u{1}", "\u{2}\u{2}");

/// The engine for application scripts and cluster environments: values only.
pub fn script_engine() -> Tera {
    engine(SCRIPT_BLOCK_DELIMITERS, SCRIPT_COMMENT_DELIMITERS)
}

/// A Tera error in one line, without the source listing Tera appends.
pub fn tera_message(e: &tera::Error) -> String {
    use std::error::Error as _;
    let mut msg = match e.kind() {
        tera::ErrorKind::SyntaxError(r) | tera::ErrorKind::RenderingError(r) => {
            let span = r.span();
            if span.start_line > 0 {
                format!("line {}, column {}: {}", span.start_line, span.start_col + 1, r.message())
            } else {
                r.message().to_owned()
            }
        }
        // Reports span lines; keep the `error:` and `-->` lines, one after the other.
        _ => e
            .to_string()
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("error:") || l.starts_with("-->") || (!l.is_empty() && !l.contains('|')))
            .collect::<Vec<_>>()
            .join(" "),
    };
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

/// The interpreter a script's `#!` line names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interpreter {
    /// Absolute path of the program (`/bin/bash`, `/usr/bin/env`).
    pub program: String,
    /// The single optional argument (Linux passes the rest of the line as one).
    pub arg: Option<String>,
}

/// Shells whose quoting rules the forge's shell quoting follows.
const SHELLS: &[&str] = &["sh", "bash", "dash", "ksh", "mksh", "zsh", "ash", "posh"];

impl Interpreter {
    /// Reads the `#!` line of `text`, if there is one.
    pub fn of(text: &str) -> Option<Self> {
        let rest = text.lines().next()?.strip_prefix("#!")?.trim();
        let (program, arg) = match rest.split_once(char::is_whitespace) {
            Some((p, a)) => (p, Some(a.trim().to_owned()).filter(|a| !a.is_empty())),
            None => (rest, None),
        };
        program.starts_with('/').then(|| Self { program: program.to_owned(), arg })
    }

    /// The command that runs: the program, or what `env` starts.
    pub fn command_name(&self) -> &str {
        let base = self.program.rsplit('/').next().unwrap_or(&self.program);
        if base == "env"
            && let Some(arg) = &self.arg
            && let Some(cmd) = arg.split_whitespace().find(|w| !w.starts_with('-'))
        {
            return cmd.rsplit('/').next().unwrap_or(cmd);
        }
        base
    }

    /// Whether it is a POSIX-style shell.
    pub fn is_shell(&self) -> bool {
        SHELLS.contains(&self.command_name())
    }
}

/// Whether markup `expr` can only produce text that never needs quoting: a bare
/// built-in, or a bare int/float/boolean input.
fn never_needs_quoting(expr: &str, spec: &ApplicationSpec) -> bool {
    let ident = expr.trim();
    if !ident.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return false;
    }
    if is_builtin(ident) {
        return true;
    }
    spec.inputs
        .iter()
        .any(|i| i.name.as_str() == ident && matches!(i.kind, InputType::Int | InputType::Float | InputType::Boolean))
}

/// Whether `expr` mentions an input (any identifier that is not a built-in).
fn mentions_input(expr: &str, spec: &ApplicationSpec) -> Option<String> {
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            if spec.inputs.iter().any(|i| i.name.as_str() == word) {
                return Some(word);
            }
            word.clear();
        }
    }
    None
}

fn file_pointer(path: &str) -> String {
    format!("/files/{}", pointer_token(path))
}

/// Checks cluster forge templates: they parse, phase templates resolve their parent,
/// they use only built-ins, and every phase's template places `HPCG_PAYLOAD`.
pub fn check_templates(files: &[CheckedFile]) -> Problems {
    let mut problems = Problems::default();
    let mut t = template_engine();
    let named: Vec<(String, &str)> =
        files.iter().filter_map(|f| f.path.strip_prefix("forge/").map(|n| (n.to_owned(), f.text.as_str()))).collect();
    let allowed: Vec<&str> = BUILTINS.iter().map(|(n, _)| *n).collect();
    let report_unknown = |name: &str, vars: &std::collections::HashSet<&str>, problems: &mut Problems| {
        let mut unknown: Vec<&str> = vars.iter().copied().filter(|v| !is_builtin(v)).collect();
        unknown.sort();
        for v in unknown {
            problems.push(
                file_pointer(&format!("forge/{name}")),
                format!(
                    "unknown markup `{v}`: a cluster template serves every application, so it may use only built-ins ({})",
                    allowed.join(", ")
                ),
            );
        }
    };
    // What the markup may do with values: an allow-list (see `filters`).
    for (name, text) in &named {
        for (line, message) in super::filters::check(text, true) {
            problems.push(file_pointer(&format!("forge/{name}")), format!("line {line}: {message}"));
        }
    }
    // Each template alone first: syntax errors and names are pinned to their file.
    // (Templates that extend another can only be read together with it, below.)
    let mut alone_ok = Vec::new();
    let mut syntax_errors = false;
    for (name, text) in &named {
        let mut single = template_engine();
        match single.add_raw_template(name, text) {
            Ok(()) => {
                if let Ok(vars) = single.get_template_variables(name) {
                    report_unknown(name, &vars, &mut problems);
                }
                alone_ok.push(name.clone());
            }
            Err(e) if matches!(e.kind(), tera::ErrorKind::MissingParent { .. }) => {}
            Err(e) => {
                syntax_errors = true;
                problems.push(file_pointer(&format!("forge/{name}")), tera_message(&e));
            }
        }
    }
    if syntax_errors {
        return problems;
    }
    if let Err(e) = t.add_raw_templates(named.iter().map(|(n, s)| (n.as_str(), *s))) {
        problems.push("/files", format!("the templates do not fit together: {}", tera_message(&e)));
        return problems;
    }
    for (name, _) in named.iter().filter(|(n, _)| !alone_ok.contains(n)) {
        match t.get_template_variables(name) {
            Ok(vars) => report_unknown(name, &vars, &mut problems),
            Err(e) => problems.push(file_pointer(&format!("forge/{name}")), tera_message(&e)),
        }
    }
    // Every template a phase may be forged with: `script_common` and each phase's own.
    for (name, _) in named.iter().filter(|(n, _)| n.starts_with("script_")) {
        if let Ok(vars) = t.get_template_variables(name)
            && !vars.contains(PAYLOAD)
        {
            let whose = match name.strip_prefix("script_") {
                Some("common") | None => "the common script".to_owned(),
                Some(phase) => format!("the {phase} script"),
            };
            problems.push(
                file_pointer(&format!("forge/{name}")),
                format!("{whose} never places `@@ {PAYLOAD} @@`, so the application would not run"),
            );
        }
    }
    problems
}

/// Checks application scripts and cluster environments: they parse, use only declared
/// inputs and built-ins (not `HPCG_PAYLOAD`), and input values stand where quoting
/// protects them (plain shell context), or not at all in non-shell scripts.
pub fn check_scripts(spec: &ApplicationSpec, files: &[CheckedFile]) -> Problems {
    let mut problems = Problems::default();
    let declared: BTreeSet<&str> = spec.inputs.iter().map(|i| i.name.as_str()).collect();
    for f in files {
        let pointer = file_pointer(&f.path);
        let mut t = script_engine();
        if let Err(e) = t.add_raw_template(&f.path, &f.text) {
            problems.push(pointer, tera_message(&e));
            continue;
        }
        for (line, message) in super::filters::check(&f.text, false) {
            problems.push(&pointer, format!("line {line}: {message}"));
        }
        let sites = markup_sites(&f.text);
        let line_of = |name: &str| {
            sites
                .iter()
                .find(|s| s.expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).any(|w| w == name))
                .map(|s| format!("line {}: ", s.line))
                .unwrap_or_default()
        };
        let mut vars: Vec<&str> =
            t.get_template_variables(&f.path).map(|v| v.into_iter().collect()).unwrap_or_default();
        vars.sort();
        for v in vars {
            if v == PAYLOAD {
                problems.push(&pointer, format!("{}`{PAYLOAD}` is only for cluster templates", line_of(v)));
            } else if !is_builtin(v) && !declared.contains(v) {
                problems.push(
                    &pointer,
                    format!(
                        "{}unknown markup `{v}`: it is neither an input of `{}` ({}) nor a built-in (HPCG_...)",
                        line_of(v),
                        spec.name,
                        if declared.is_empty() {
                            "it has none".to_owned()
                        } else {
                            declared.iter().copied().collect::<Vec<_>>().join(", ")
                        }
                    ),
                );
            }
        }
        // Cluster environments are sourced by the forged (POSIX shell) script.
        let interpreter = if f.path.starts_with("cluster/") { None } else { Interpreter::of(&f.text) };
        let shell = interpreter.as_ref().is_none_or(Interpreter::is_shell);
        for site in &sites {
            if shell {
                if site.context.quoting_protects() || never_needs_quoting(&site.expr, spec) {
                    continue;
                }
                let hint = match site.context {
                    ShellContext::DoubleQuotes => {
                        format!("; close the quotes around it, e.g. \"text \"@@ {} @@\" more\"", site.expr)
                    }
                    ShellContext::UnquotedHeredoc | ShellContext::QuotedHeredoc => {
                        format!("; write it with printf instead, e.g. printf 'key = %s\\n' @@ {} @@ >> file", site.expr)
                    }
                    _ => "; move it out into plain shell context".into(),
                };
                problems.push(
                    &pointer,
                    format!(
                        "line {}, column {}: `@@ {} @@` stands {}, where a shell-quoted value could still run commands{hint}",
                        site.line,
                        site.column,
                        site.expr,
                        site.context.describe()
                    ),
                );
            } else if let Some(input) = mentions_input(&site.expr, spec) {
                let interp = interpreter.as_ref().map(Interpreter::command_name).unwrap_or("?");
                problems.push(
                    &pointer,
                    format!(
                        "line {}: `@@ {} @@` in a {interp} script: values are shell-quoted, which is not {interp} syntax; \
                         read the input from the environment variable HPCG_INPUT_{input} instead",
                        site.line, site.expr
                    ),
                );
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml_text: &str) -> ApplicationSpec {
        toml::from_str(toml_text).unwrap()
    }

    fn file(path: &str, text: &str) -> CheckedFile {
        CheckedFile { path: path.into(), text: text.into(), sha256: String::new() }
    }

    const INPUTS: &str = "name='a'\n[[inputs]]\nname='n'\ntype='int'\n[[inputs]]\nname='s'\ntype='string'\n";

    #[test]
    fn interpreters_are_read_from_the_shebang() {
        let i = Interpreter::of("#!/usr/bin/env python3\n").unwrap();
        assert_eq!((i.command_name(), i.is_shell()), ("python3", false));
        let i = Interpreter::of("#!/bin/bash -e\n").unwrap();
        assert_eq!((i.program.as_str(), i.arg.as_deref(), i.is_shell()), ("/bin/bash", Some("-e"), true));
        assert!(Interpreter::of("#!/usr/bin/env -S bash -eu\n").unwrap().is_shell());
        assert!(Interpreter::of("echo\n").is_none());
    }

    #[test]
    fn undeclared_markup_is_refused_by_name_and_line() {
        let p = check_scripts(&spec(INPUTS), &[file("app_execute", "#!/bin/bash\necho @@ n @@\necho @@ nope @@\n")]);
        assert_eq!(p.len(), 1, "{p}");
        let msg = &p.iter().next().unwrap().message;
        assert!(msg.starts_with("line 3: unknown markup `nope`"), "{msg}");
        assert!(msg.contains("(n, s)"), "{msg}");
    }

    #[test]
    fn string_values_must_stand_in_plain_shell_context() {
        let p = check_scripts(
            &spec(INPUTS),
            &[file("app_execute", "#!/bin/bash\necho \"n=@@ n @@\"\necho \"s=@@ s @@\"\n")],
        );
        assert_eq!(p.len(), 1, "numbers may stand in quotes, strings may not: {p}");
        let msg = &p.iter().next().unwrap().message;
        assert!(msg.starts_with("line 3, column 9: `@@ s @@` stands inside double quotes"), "{msg}");
    }

    #[test]
    fn non_shell_scripts_may_use_built_ins_but_not_inputs() {
        let p = check_scripts(
            &spec(INPUTS),
            &[file("app_execute", "#!/usr/bin/env python3\nrun = '@@ HPCG_RUN_DIR @@'\nx = @@ n @@\n")],
        );
        assert_eq!(p.len(), 1, "{p}");
        assert!(p.iter().next().unwrap().message.contains("HPCG_INPUT_n"), "{p}");
    }

    #[test]
    fn here_documents_may_not_carry_string_values_quoted_or_not() {
        for script in ["#!/bin/bash\ncat <<END\n@@ s @@\nEND\n", "#!/bin/bash\ncat <<'END'\n@@ s @@\nEND\n"] {
            let p = check_scripts(&spec(INPUTS), &[file("app_execute", script)]);
            assert!(p.to_string().contains("here-document") && p.to_string().contains("printf"), "{script:?}: {p}");
        }
    }

    #[test]
    fn cluster_environments_are_linted_as_shell() {
        let p = check_scripts(&spec(INPUTS), &[file("cluster/x", "export A=\"@@ s @@\"\n")]);
        assert_eq!(p.len(), 1, "{p}");
    }

    #[test]
    fn scripts_cannot_place_the_payload_and_syntax_errors_are_located() {
        let p = check_scripts(&spec(INPUTS), &[file("app_execute", "#!/bin/bash\n@@ HPCG_PAYLOAD @@\n")]);
        assert!(p.to_string().contains("only for cluster templates"), "{p}");
        let p = check_scripts(&spec(INPUTS), &[file("app_execute", "#!/bin/bash\necho @@ n\n")]);
        assert_eq!(p.iter().next().unwrap().pointer, "/files/app_execute");
    }

    #[test]
    fn block_syntax_is_plain_text_in_scripts() {
        // `@%` means nothing in a script: only templates have blocks.
        let p = check_scripts(&spec(INPUTS), &[file("app_execute", "#!/bin/bash\necho '@% if x %@ {% raw %}'\n")]);
        assert!(p.is_empty(), "{p}");
    }

    #[test]
    fn templates_may_use_only_built_ins_and_must_place_the_payload() {
        let ok = [file("forge/script_common", "#!/bin/bash\n#SBATCH -c @@ HPCG_CPUS @@\n@@ HPCG_PAYLOAD @@\n")];
        assert!(check_templates(&ok).is_empty());
        let p = check_templates(&[file("forge/script_common", "#!/bin/bash\necho @@ sleep @@\n")]);
        let text = p.to_string();
        assert!(text.contains("unknown markup `sleep`"), "{text}");
        assert!(text.contains("never places `@@ HPCG_PAYLOAD @@`"), "{text}");
        let p = check_templates(&[
            file("forge/script_common", "#!/bin/bash\n@@ HPCG_PAYLOAD @@\n"),
            file("forge/script_execute", "@% extends \"script_nope\" %@\n"),
        ]);
        assert!(!p.is_empty());
        let p = check_templates(&[file("forge/script_common", "#!/bin/bash\n@% if x %@\n")]);
        assert_eq!(p.iter().next().unwrap().pointer, "/files/forge~1script_common", "{p}");
    }

    #[test]
    fn the_default_slurm_templates_pass() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("forge-templates/slurm");
        let files: Vec<CheckedFile> = ["script_common", "script_prolog", "script_execute", "script_epilog"]
            .iter()
            .map(|n| file(&format!("forge/{n}"), &std::fs::read_to_string(dir.join(n)).unwrap()))
            .collect();
        let p = check_templates(&files);
        assert!(p.is_empty(), "{p}");
    }
}
