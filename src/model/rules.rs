//! Log rules: an application says which lines of its jobs' output mean something
//! (`[[rules]]` in `application.toml`, docs/definitions.md "Log rules"). A rule names
//! the phases and streams it reads, a regular expression, the event it raises (the
//! expression's named groups become the event's data) and what the engine then does:
//! nothing, abort the task, or restart the phase (at most `max_restarts` times).
//! Checked at upload; matched here, purely, on lines the monitor read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Phase;
use super::posts::PostsCursor;
use super::problems::Problems;

/// The longest line a rule is matched against; the rest of a longer line is not.
pub const MAX_RULE_LINE: usize = 4096;

/// The most rules an application may declare.
pub const MAX_RULES: usize = 50;

/// The longest pattern, in bytes.
pub const MAX_PATTERN: usize = 1000;

/// The most restarts a rule may ask for, per phase.
pub const MAX_RESTARTS: u32 = 10;

/// How far the engine has matched rules against a phase's output (bytes of its job's
/// standard output and error; for a phase that runs per frame, of each frame's own
/// files, [`frame_output_dir`]), kept on the phase like the posts' cursor.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OutputCursor {
    /// Bytes of standard output read.
    #[serde(default)]
    pub stdout: u64,
    /// Bytes of standard error read.
    #[serde(default)]
    pub stderr: u64,
    /// Standard output was read to its end after the job ended.
    #[serde(default)]
    pub stdout_done: bool,
    /// Standard error was read to its end after the job ended.
    #[serde(default)]
    pub stderr_done: bool,
    /// A frame phase: how far each frame's standard output was read (`drained`: to
    /// the end, after the phase's jobs ended).
    #[serde(default, skip_serializing_if = "PostsCursor::is_empty")]
    pub frames_stdout: PostsCursor,
    /// A frame phase: the same for standard error.
    #[serde(default, skip_serializing_if = "PostsCursor::is_empty")]
    pub frames_stderr: PostsCursor,
}

impl OutputCursor {
    /// Whether nothing was read: the stored form omits it.
    pub fn is_empty(&self) -> bool {
        *self == OutputCursor::default()
    }

    /// A frame phase's cursor over its frames' standard error (or output).
    pub fn frames(&self, stderr: bool) -> &PostsCursor {
        if stderr { &self.frames_stderr } else { &self.frames_stdout }
    }

    /// [`OutputCursor::frames`], to move on.
    pub fn frames_mut(&mut self, stderr: bool) -> &mut PostsCursor {
        if stderr { &mut self.frames_stderr } else { &mut self.frames_stdout }
    }

    /// Before a rerun: what the new jobs write is read from its start, except the
    /// frames of a frame phase that do not run again (`rerun`: the frames that do;
    /// `None`: all of them), whose files stay and were read.
    pub fn reset_for_rerun(&mut self, rerun: Option<&super::frames::FrameRange>) {
        let mut frames = [std::mem::take(&mut self.frames_stdout), std::mem::take(&mut self.frames_stderr)];
        for c in &mut frames {
            c.forget_frames(rerun);
            c.drained = false;
        }
        let [frames_stdout, frames_stderr] = frames;
        *self = OutputCursor { frames_stdout, frames_stderr, ..OutputCursor::default() };
    }
}

/// Where each frame of a phase that runs per frame writes its standard output (or
/// error), relative to the run directory: one file per frame, named by its number.
/// The frame loop copies them to the job's own output when the frame ends.
pub fn frame_output_dir(phase: Phase, stderr: bool) -> String {
    format!(".hpcforge/output/{phase}/{}", if stderr { "stderr" } else { "stdout" })
}

/// How many times a rule restarted a phase (or one frame of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RuleRestarts {
    /// The rule (its index in the task's rules).
    pub rule: u32,
    /// The phase.
    pub phase: Phase,
    /// The frame, for a phase that runs per frame: each frame is counted on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame: Option<u32>,
    /// Restarts so far.
    pub count: u32,
    /// It matched again after its last restart allowed, and said it gave up.
    #[serde(default)]
    pub gave_up: bool,
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogRule {
    /// A regular expression (Rust `regex` syntax: no look-around, no back-references,
    /// matching in time linear in the line), searched for in each new line.
    pub pattern: String,
    /// The kind of the event a match raises (letters, digits, `_ . : -`).
    pub event: String,
    /// Words for people, shown with the event (the matched line follows them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The phases whose output it reads; none listed: every phase.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<Phase>,
    /// Which output: `stdout`, `stderr` or `both` (the default).
    #[serde(default)]
    pub stream: RuleStream,
    /// What a match does: `none` (the default: the event only), `abort` (cancel the
    /// task, as its user would) or `restart` (the phase, as its user would).
    #[serde(default)]
    pub action: RuleAction,
    /// For `restart`: at most this many restarts of one phase (of one frame, in a
    /// phase that runs per frame) by this rule (1 to 10, default 1); after that a
    /// match raises the event and says it gave up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_restarts: Option<u32>,
}

/// Which output a rule reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuleStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// Both.
    #[default]
    Both,
}

impl RuleStream {
    /// Whether it reads standard error (`true`) or standard output (`false`).
    pub fn reads(self, stderr: bool) -> bool {
        matches!((self, stderr), (RuleStream::Both, _) | (RuleStream::Stderr, true) | (RuleStream::Stdout, false))
    }
}

/// What a match does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    /// Raise the event only.
    #[default]
    None,
    /// Raise the event and cancel the task.
    Abort,
    /// Raise the event and restart the phase, at most `max_restarts` times.
    Restart,
}

impl LogRule {
    /// Whether it reads `phase`'s output (a rule that lists no phases reads every
    /// phase).
    pub fn applies_to(&self, phase: Phase) -> bool {
        self.phases.is_empty() || self.phases.contains(&phase)
    }

    /// How many restarts it may make of one phase (of each frame of a frame phase).
    pub fn restarts_allowed(&self) -> u32 {
        self.max_restarts.unwrap_or(1)
    }
}

/// Checks `rules` against the application's `phases`, every problem under its JSON
/// pointer (`/rules/0/pattern`).
pub fn check(rules: &[LogRule], phases: &[Phase], problems: &mut Problems) {
    if rules.len() > MAX_RULES {
        problems.push("/rules", format!("at most {MAX_RULES} rules, not {}", rules.len()));
    }
    for (i, r) in rules.iter().enumerate() {
        let at = |field: &str| format!("/rules/{i}/{field}");
        if r.pattern.len() > MAX_PATTERN {
            problems.push(at("pattern"), format!("a pattern of at most {MAX_PATTERN} bytes"));
        } else if let Err(e) = compile(&r.pattern) {
            problems.push(at("pattern"), format!("the pattern does not compile: {e}"));
        }
        if !super::posts::is_name(&r.event) {
            problems.push(at("event"), "1 to 64 letters, digits, `_`, `.`, `:` or `-`");
        }
        for (k, p) in r.phases.iter().enumerate() {
            if !phases.contains(p) {
                let names: Vec<String> = phases.iter().map(|p| format!("`{p}`")).collect();
                problems.push(
                    format!("/rules/{i}/phases/{k}"),
                    format!("there is no phase `{p}` (the phases are {})", names.join(", ")),
                );
            }
        }
        match (r.action, r.max_restarts) {
            (RuleAction::Restart, Some(n)) if n == 0 || n > MAX_RESTARTS => {
                problems.push(at("max_restarts"), format!("from 1 to {MAX_RESTARTS}"));
            }
            (RuleAction::None | RuleAction::Abort, Some(_)) => {
                problems.push(at("max_restarts"), "only a `restart` rule restarts");
            }
            _ => {}
        }
        if let Some(m) = &r.message
            && m.chars().any(char::is_control)
        {
            problems.push(at("message"), "contains control characters");
        }
    }
}

/// Compiles a rule's pattern, with a bound on the compiled size so that no pattern
/// can make the engine's memory or time blow up.
pub fn compile(pattern: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(pattern).size_limit(1 << 20).dfa_size_limit(1 << 20).build().map_err(|e| e.to_string())
}

/// A rule that matched a line.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// Which rule (its index in the application's list).
    pub rule: usize,
    /// The line (at most [`MAX_RULE_LINE`] bytes of it).
    pub line: String,
    /// The pattern's named groups that took part in the match.
    pub groups: BTreeMap<String, String>,
}

/// The first rule of `compiled` (index, rule, pattern) that matches each of `lines`,
/// read from `phase`'s standard error (`stderr`) or output.
pub fn scan(compiled: &[(usize, &LogRule, regex::Regex)], phase: Phase, stderr: bool, lines: &[&str]) -> Vec<Hit> {
    let mut hits = Vec::new();
    for line in lines {
        let line = clip(line, MAX_RULE_LINE);
        for (i, rule, re) in compiled {
            if !rule.applies_to(phase) || !rule.stream.reads(stderr) {
                continue;
            }
            if let Some(c) = re.captures(line) {
                let groups = re
                    .capture_names()
                    .flatten()
                    .filter_map(|n| c.name(n).map(|m| (n.to_owned(), m.as_str().to_owned())))
                    .collect();
                hits.push(Hit { rule: *i, line: line.to_owned(), groups });
                break;
            }
        }
    }
    hits
}

fn clip(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(toml_text: &str) -> LogRule {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn rules_are_checked_with_pointers() {
        let phases = Phase::DEFAULT.to_vec();
        let rules = vec![
            rule("pattern = 'error: (?P<what>'\nevent = 'bad'"),
            rule("pattern = 'x'\nevent = 'a b'\nphases = ['execute', 'nope']"),
            rule("pattern = 'x'\nevent = 'ok'\naction = 'restart'\nmax_restarts = 11"),
            rule("pattern = 'x'\nevent = 'ok'\nmax_restarts = 2"),
            rule("pattern = 'x'\nevent = 'ok'\naction = 'abort'\nstream = 'stderr'"),
        ];
        let mut p = Problems::default();
        check(&rules, &phases, &mut p);
        let at: Vec<&str> = p.iter().map(|p| p.pointer.as_str()).collect();
        assert_eq!(
            at,
            [
                "/rules/0/pattern",
                "/rules/1/event",
                "/rules/1/phases/1",
                "/rules/2/max_restarts",
                "/rules/3/max_restarts"
            ],
            "{p:?}"
        );
        assert!(p.iter().next().unwrap().message.contains("does not compile"));
        assert!(toml::from_str::<LogRule>("pattern = 'x'\nevent = 'e'\naction = 'explode'").is_err());
        assert!(
            toml::from_str::<LogRule>("pattern = 'x'\nevent = 'e'\ncolour = 'red'").is_err(),
            "unknown fields are errors"
        );
    }

    #[test]
    fn the_first_matching_rule_of_each_line_raises_with_its_named_groups() {
        let rules = [
            rule(
                "pattern = 'error: mesh (?P<part>\\w+) inverted'\nevent = 'mesh.inverted'\nstream = 'stderr'\naction = 'abort'",
            ),
            rule("pattern = 'error'\nevent = 'error'\nphases = ['epilog']"),
            rule("pattern = 'converged at step (?P<step>\\d+)'\nevent = 'converged'"),
        ];
        let compiled: Vec<(usize, &LogRule, regex::Regex)> =
            rules.iter().enumerate().map(|(i, r)| (i, r, compile(&r.pattern).unwrap())).collect();
        let lines = ["step 1", "error: mesh wing inverted", "converged at step 12"];
        let hits = scan(&compiled, Phase::EXECUTE, true, &lines);
        assert_eq!(hits.len(), 2);
        assert_eq!((hits[0].rule, hits[0].groups["part"].as_str()), (0, "wing"));
        assert_eq!((hits[1].rule, hits[1].groups["step"].as_str()), (2, "12"));
        // On standard output, the stderr rule does not read; on the epilog, rule 1 does.
        assert_eq!(scan(&compiled, Phase::EXECUTE, false, &lines).len(), 1);
        assert_eq!(scan(&compiled, Phase::EPILOG, false, &["an error"])[0].rule, 1);
        // A very long line is matched on its first part only, cut on a character.
        let long = format!("{}é error", "é".repeat(MAX_RULE_LINE));
        assert!(scan(&compiled, Phase::EPILOG, false, &[long.as_str()]).is_empty());
    }
}
