//! Applications: what users run. Input specs in the portal's format, per-phase
//! resources, and the checks a definition must pass before it is stored.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use super::files::{FileAction, FileEntry, FileMode, FileServer, MAX_PATH_LEN, check_absolute_path};
use super::names::{AppName, InputName};
use super::problems::Problems;
use super::resources::{DEFAULT_RESOURCES, PhaseResources};
use super::workflow::{PhaseDecl, PhaseGraph};

/// An application definition: `applications/<name>/application.toml`, or the
/// `definition` object of an upload.
///
/// Scripts are not part of it; they travel next to it (see `crate::definitions`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplicationSpec {
    /// Unique name; also the application's ID in storage paths.
    pub name: AppName,
    /// Human title shown by portals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// What the application does, for portal users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Inputs a task gives, in the portal's format.
    #[serde(default)]
    pub inputs: Vec<InputSpec>,
    /// The phases, with what each waits for (`[[phases]]`). None declared: prolog →
    /// execute → epilog, as every application had before phases could be declared.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseDecl>,
    /// Scheduler resources per phase.
    #[serde(default)]
    pub resources: PhaseResources,
    /// Log rules: lines of the jobs' output that raise events and act (`[[rules]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<super::rules::LogRule>,
    /// What the task's user takes home: globs relative to the run directory
    /// (`out/*.ppm`, `render.tar.gz`), bundled by `GET /tasks/{id}/outputs.tar.gz`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
    /// Keep the outputs in the store when a task ends (`[archive]`, with its caps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<super::archive::ArchiveSpec>,
}

/// The most output globs an application declares.
pub const MAX_OUTPUTS: usize = 50;

/// Checks an output glob (shell pathname patterns: `*`, `?`, `[...]`): relative to
/// the run directory, without `..` or control characters. On the cluster it is only
/// ever expanded as a pattern (from a quoted variable, split on newlines only), so
/// no other character in it means anything to the shell.
pub fn check_output_glob(glob: &str) -> Result<(), String> {
    if glob.is_empty() || glob.len() > 256 {
        return Err("a glob of 1 to 256 characters".into());
    }
    if glob.starts_with('/') {
        return Err(format!("`{glob}` is absolute: outputs are relative to the run directory"));
    }
    if glob.split('/').any(|p| p == "..") {
        return Err(format!("`{}` leads out of the run directory (`..`)", glob.escape_debug()));
    }
    if glob.chars().any(char::is_control) {
        return Err(format!("`{}` holds a control character", glob.escape_debug()));
    }
    Ok(())
}

/// The type of an input, as portals name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputType {
    /// A whole number (JSON integer).
    Int,
    /// A number (JSON number).
    Float,
    /// One line of text.
    String,
    /// `true` or `false`.
    Boolean,
    /// One of the listed `choices`.
    Select,
    /// Files staged into the run directory, listed in `files`.
    File,
    /// A frame range (`1-100`, `1-100:2`, `1,3,5-9`): a string, checked and written
    /// back in canonical form; `min`/`max` bound every frame, and the cluster's
    /// `limits.max_frames` the count.
    Range,
}

impl InputType {
    /// Name as written in definitions.
    pub fn as_str(self) -> &'static str {
        match self {
            InputType::Int => "int",
            InputType::Float => "float",
            InputType::String => "string",
            InputType::Boolean => "boolean",
            InputType::Select => "select",
            InputType::File => "file",
            InputType::Range => "range",
        }
    }
}

/// One input in the portal's format. Field names are the portal's (`labelVisible`,
/// `autoCheck`), so a portal can send its JSON as is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Input name; also its `@@NAME@@` markup.
    pub name: InputName,
    /// Input type.
    #[serde(rename = "type")]
    pub kind: InputType,
    /// Default value (absent for `file`, which uses `files`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// A task must end up with a value (its own or the default).
    #[serde(default)]
    pub required: bool,
    /// Whether a task may change the value. A non-editable input always has the default.
    #[serde(default = "yes")]
    pub editable: bool,
    /// Not shown by portals. A hidden required input must have a default.
    #[serde(default)]
    pub hidden: bool,
    /// Strict typing: the task must send the value with its JSON type (`20`, not
    /// `"20"`). Without it, form strings are converted exactly (`"20"` → 20,
    /// `"0.5"` → 0.5, `"true"` → true); anything inexact is refused either way.
    #[serde(default)]
    pub strict: bool,
    /// Position in the portal's form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<i64>,
    /// Form label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Whether the portal shows the label.
    #[serde(default = "yes", rename = "labelVisible")]
    pub label_visible: bool,
    /// Help text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Whether the portal checks the value as it is typed.
    #[serde(default, rename = "autoCheck")]
    pub auto_check: bool,
    /// The portal's last verdict on the value; carried, never trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid: Option<bool>,
    /// Smallest allowed value (`int`, `float`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Largest allowed value (`int`, `float`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// Regular expression a `string` value must match (ECMA-262, as in JSON Schema).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// Longest allowed `string`, in characters.
    #[serde(default, rename = "maxLength", skip_serializing_if = "Option::is_none")]
    pub max_length: Option<u32>,
    /// Allowed values of a `select`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<Choice>,
    /// Files of a `file` input, each with the action that stages it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileEntry>,
}

fn yes() -> bool {
    true
}

/// One allowed value of a `select` input: a bare value, or `{value, label}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Choice {
    // Order matters for `untagged`: `Plain(Value)` accepts anything, so the labelled
    // form must be tried first or `{value, label}` would be read as a plain object.
    /// A value with a label for the form.
    Labelled {
        /// The value a task sends.
        value: Value,
        /// What the form shows.
        label: String,
    },
    /// A value shown as itself.
    Plain(Value),
}

impl Choice {
    /// The value a task sends.
    pub fn value(&self) -> &Value {
        match self {
            Choice::Plain(v) | Choice::Labelled { value: v, .. } => v,
        }
    }
}

/// Checks `value` against an input's type; returns why it does not fit.
fn check_value_type(kind: InputType, value: &Value) -> Result<(), String> {
    let ok = match kind {
        InputType::Int => value.as_i64().is_some(),
        InputType::Float => value.is_number(),
        InputType::String => value.is_string(),
        InputType::Boolean => value.is_boolean(),
        InputType::Select => value.is_string() || value.is_number() || value.is_boolean(),
        InputType::File => false,
        InputType::Range => {
            return match value.as_str() {
                Some(text) => super::frames::FrameRange::parse(text, super::frames::MAX_FRAMES).map(|_| ()),
                None => Err(format!("is {}, but a `range` is a string like \"1-100\"", json_type_name(value))),
            };
        }
    };
    if ok {
        Ok(())
    } else if kind == InputType::File {
        Err("a `file` input takes no `value`; list its files in `files`".into())
    } else {
        Err(format!("is {}, but the input's type is `{}`", json_type_name(value), kind.as_str()))
    }
}

/// The JSON type of a value, for messages that must not echo the value itself.
pub fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a number with a fraction",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl InputSpec {
    /// For a `range` input: whether every frame of `r` lies within `min` and `max`.
    pub fn frames_within_bounds(&self, r: &super::frames::FrameRange) -> Result<(), String> {
        let (first, last) = r.bounds();
        if let Some(min) = self.min.filter(|m| f64::from(first) < *m) {
            return Err(format!("frame {first} is below min ({min})"));
        }
        if let Some(max) = self.max.filter(|m| f64::from(last) > *m) {
            return Err(format!("frame {last} is above max ({max})"));
        }
        Ok(())
    }

    /// Checks the spec itself (not a task's value); problems under `pointer`.
    fn check(&self, pointer: &str, problems: &mut Problems) {
        let kind = self.kind;
        let only_for = |field: &str, allowed: &[InputType], present: bool, problems: &mut Problems| {
            if present && !allowed.contains(&kind) {
                let names: Vec<_> = allowed.iter().map(|k| format!("`{}`", k.as_str())).collect();
                problems.push(
                    format!("{pointer}/{field}"),
                    format!("`{field}` applies only to {} inputs, not `{}`", names.join(" and "), kind.as_str()),
                );
            }
        };
        let numbers = [InputType::Int, InputType::Float, InputType::Range];
        only_for("min", &numbers, self.min.is_some(), problems);
        only_for("max", &numbers, self.max.is_some(), problems);
        only_for("pattern", &[InputType::String], self.pattern.is_some(), problems);
        only_for("maxLength", &[InputType::String], self.max_length.is_some(), problems);
        only_for("choices", &[InputType::Select], !self.choices.is_empty(), problems);
        only_for("files", &[InputType::File], !self.files.is_empty(), problems);

        if let (Some(min), Some(max)) = (self.min, self.max)
            && min > max
        {
            problems.push(format!("{pointer}/min"), format!("min ({min}) is greater than max ({max})"));
        }
        for (field, bound) in [("min", self.min), ("max", self.max)] {
            if let Some(b) = bound
                && (!b.is_finite() || (kind != InputType::Float && b.fract() != 0.0))
            {
                problems.push(
                    format!("{pointer}/{field}"),
                    format!("{field} must be a finite {}", if kind == InputType::Float { "number" } else { "integer" }),
                );
            }
        }
        if let Some(pattern) = &self.pattern {
            // The same engine that validates task values (JSON Schema's ECMA-262 dialect)
            // judges the pattern, so a pattern accepted here compiles there.
            if let Err(e) = jsonschema::validator_for(&serde_json::json!({ "pattern": pattern })) {
                problems.push(format!("{pointer}/pattern"), format!("not a valid regular expression: {e}"));
            }
        }
        if kind == InputType::Select {
            if self.choices.is_empty() {
                problems.push(format!("{pointer}/choices"), "a `select` input needs at least one choice");
            }
            let mut seen = BTreeSet::new();
            for (i, c) in self.choices.iter().enumerate() {
                let v = c.value();
                if !(v.is_string() || v.is_number() || v.is_boolean()) {
                    problems.push(
                        format!("{pointer}/choices/{i}"),
                        format!("a choice must be a string, number or boolean, not {}", json_type_name(v)),
                    );
                }
                if !seen.insert(v.to_string()) {
                    problems.push(format!("{pointer}/choices/{i}"), "this choice is listed twice");
                }
            }
        }
        for (i, f) in self.files.iter().enumerate() {
            f.check(&format!("{pointer}/files/{i}"), problems);
        }
        if let Some(value) = &self.value {
            if let Err(why) = check_value_type(kind, value) {
                problems.push(format!("{pointer}/value"), format!("the default value {why}"));
            } else {
                self.check_default_against_rules(value, pointer, problems);
            }
        }
        let has_default = self.value.is_some() || !self.files.is_empty();
        if self.required && !has_default {
            if self.hidden {
                problems.push(
                    format!("{pointer}/value"),
                    "the input is required and hidden, so it needs a default value the user cannot see",
                );
            } else if !self.editable {
                problems.push(
                    format!("{pointer}/value"),
                    "the input is required and not editable, so it needs a default value",
                );
            }
        }
    }

    fn check_default_against_rules(&self, value: &Value, pointer: &str, problems: &mut Problems) {
        if self.kind == InputType::Range
            && let Some(r) =
                value.as_str().and_then(|t| super::frames::FrameRange::parse(t, super::frames::MAX_FRAMES).ok())
            && let Err(why) = self.frames_within_bounds(&r)
        {
            problems.push(format!("{pointer}/value"), format!("the default value: {why}"));
        }
        if let Some(n) = value.as_f64() {
            if let Some(min) = self.min.filter(|m| n < *m) {
                problems.push(format!("{pointer}/value"), format!("the default value is below min ({min})"));
            }
            if let Some(max) = self.max.filter(|m| n > *m) {
                problems.push(format!("{pointer}/value"), format!("the default value is above max ({max})"));
            }
        }
        if self.kind == InputType::Select && !self.choices.iter().any(|c| c.value() == value) {
            problems.push(format!("{pointer}/value"), "the default value is not one of the choices");
        }
        if let (Value::String(s), Some(max)) = (value, self.max_length)
            && s.chars().count() > max as usize
        {
            problems.push(format!("{pointer}/value"), format!("the default value is longer than maxLength ({max})"));
        }
        if let Value::String(s) = value
            && let Some(c) = s.chars().find(|c| c.is_control())
        {
            problems
                .push(format!("{pointer}/value"), format!("the default value contains the control character {c:?}"));
        }
    }
}

impl ApplicationSpec {
    /// Checks the definition; every problem is reported, each under its JSON pointer
    /// relative to the definition (`/inputs/1/type`).
    pub fn check(&self, problems: &mut Problems) {
        let mut names = BTreeSet::new();
        for (i, input) in self.inputs.iter().enumerate() {
            let pointer = format!("/inputs/{i}");
            if !names.insert(input.name.as_str().to_ascii_lowercase()) {
                problems.push(
                    format!("{pointer}/name"),
                    format!("the input name `{}` is used twice (names are compared without case)", input.name),
                );
            }
            input.check(&pointer, problems);
        }
        for (i, d) in self.phases.iter().enumerate() {
            self.check_frames(i, d, problems);
            if d.name.as_str() == DEFAULT_RESOURCES {
                problems.push(
                    format!("/phases/{i}/name"),
                    "`default` names the resources every phase shares (`[resources.default]`); choose another phase name",
                );
            }
        }
        if let Some(graph) = PhaseGraph::resolve(&self.phases, problems) {
            let phases = graph.phases();
            super::rules::check(&self.rules, &phases, problems);
            if self.outputs.len() > MAX_OUTPUTS {
                problems.push("/outputs", format!("at most {MAX_OUTPUTS} outputs, not {}", self.outputs.len()));
            }
            for (i, glob) in self.outputs.iter().enumerate() {
                if let Err(why) = check_output_glob(glob) {
                    problems.push(format!("/outputs/{i}"), why);
                }
            }
            if let Some(archive) = &self.archive {
                archive.check(&self.outputs, problems);
            }
            for phase in self.resources.phases.keys() {
                if !phases.contains(phase) {
                    problems.push(
                        format!("/resources/{phase}"),
                        format!(
                            "there is no phase `{phase}` to give these resources to (the phases are {})",
                            graph.names_listed()
                        ),
                    );
                }
            }
        }
        for (field, text) in [("label", &self.label), ("description", &self.description)] {
            if let Some(t) = text
                && t.chars().any(|c| c.is_control() && c != '\n' && c != '\t')
            {
                problems.push(format!("/{field}"), "contains control characters");
            }
        }
    }
}

impl ApplicationSpec {
    /// A phase's frame options: `frames` names a `range` input; the rest need it.
    fn check_frames(&self, i: usize, d: &PhaseDecl, problems: &mut Problems) {
        let at = |field: &str| format!("/phases/{i}/{field}");
        match &d.frames {
            Some(name) => match self.inputs.iter().find(|x| x.name == *name) {
                Some(input) if input.kind == InputType::Range => {}
                Some(input) => problems.push(
                    at("frames"),
                    format!("`{name}` is a `{}` input; a phase runs per frame of a `range` input", input.kind.as_str()),
                ),
                None => problems.push(at("frames"), format!("there is no input `{name}`")),
            },
            None => {
                for (field, set) in
                    [("max_parallel", d.max_parallel.is_some()), ("frames_per_job", d.frames_per_job.is_some())]
                {
                    if set {
                        problems.push(
                            at(field),
                            format!("`{field}` applies only to a phase that runs per frame (`frames`)"),
                        );
                    }
                }
            }
        }
        if d.max_parallel == Some(0) {
            problems.push(at("max_parallel"), "`max_parallel` must be at least 1");
        }
        if let Some(k) = d.frames_per_job
            && !(1..=super::workflow::MAX_FRAMES_PER_JOB).contains(&k)
        {
            problems.push(
                at("frames_per_job"),
                format!("`frames_per_job` must be between 1 and {}", super::workflow::MAX_FRAMES_PER_JOB),
            );
        }
    }

    /// The application's phases and what each waits for. A definition that passed
    /// [`ApplicationSpec::check`] always has one; otherwise the problems say why not.
    pub fn graph(&self) -> Result<PhaseGraph, Problems> {
        let mut problems = Problems::default();
        match PhaseGraph::resolve(&self.phases, &mut problems) {
            Some(g) => Ok(g),
            None => Err(problems),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> ApplicationSpec {
        toml::from_str(toml_text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn problems_of(spec: &ApplicationSpec) -> Vec<(String, String)> {
        let mut p = Problems::default();
        spec.check(&mut p);
        p.into_iter().map(|p| (p.pointer, p.message)).collect()
    }

    #[test]
    fn the_portal_sleep_example_parses_with_all_its_fields() {
        let spec = parse(
            r#"
            name = "sleep"
            [[inputs]]
            name = "sleep"
            type = "int"
            value = 20
            required = true
            editable = true
            hidden = false
            strict = false
            order = 1
            label = "Seconds"
            labelVisible = true
            description = "How long to sleep"
            autoCheck = false
            valid = true
            [[inputs]]
            name = "input_files"
            type = "file"
            [[inputs.files]]
            action = "COPY"
            path = "/etc/hostname"
            mods = "0644"
            size = 12
            server = { id = "local-slurm", name = "Local Slurm" }
            "#,
        );
        assert_eq!(spec.inputs[0].kind, InputType::Int);
        assert_eq!(spec.inputs[0].value, Some(serde_json::json!(20)));
        assert_eq!(spec.inputs[1].files[0].action, FileAction::Copy);
        assert!(problems_of(&spec).is_empty(), "{:?}", problems_of(&spec));
        // The portal's JSON field names survive a round trip.
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["inputs"][0]["labelVisible"], true);
        assert_eq!(json["inputs"][0]["autoCheck"], false);
    }

    #[test]
    fn unknown_types_and_fields_are_refused_by_name() {
        let err = toml::from_str::<ApplicationSpec>("name='a'\n[[inputs]]\nname='x'\ntype='integer'").unwrap_err();
        assert!(err.to_string().contains("unknown variant `integer`"), "{err}");
        let err =
            toml::from_str::<ApplicationSpec>("name='a'\n[[inputs]]\nname='x'\ntype='int'\nrequird=true").unwrap_err();
        assert!(err.to_string().contains("unknown field `requird`"), "{err}");
        let err = toml::from_str::<ApplicationSpec>(
            "name='a'\n[[inputs]]\nname='x'\ntype='file'\nfiles=[{action='MOVE', path='/a'}]",
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown variant `MOVE`"), "{err}");
    }

    #[test]
    fn every_definition_problem_is_reported_at_once_with_its_pointer() {
        let spec = parse(
            r#"
            name = "bad"
            [[inputs]]
            name = "n"
            type = "int"
            value = "twenty"
            min = 10
            max = 1
            [[inputs]]
            name = "N"
            type = "select"
            [[inputs]]
            name = "secret"
            type = "string"
            required = true
            hidden = true
            pattern = "("
            [[inputs]]
            name = "f"
            type = "file"
            files = [{ action = "COPY", path = "relative/x" }, { action = "COPY", path = "/a/../etc/shadow", mods = "777x" }]
            "#,
        );
        let got = problems_of(&spec);
        let pointers: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
        for expected in [
            "/inputs/0/min",
            "/inputs/0/value",
            "/inputs/1/name",
            "/inputs/1/choices",
            "/inputs/2/pattern",
            "/inputs/2/value",
            "/inputs/3/files/0/path",
            "/inputs/3/files/1/path",
            "/inputs/3/files/1/mods",
        ] {
            assert!(pointers.contains(&expected), "missing {expected} in {got:#?}");
        }
        // Messages about values name the type, never echo the value.
        let value_msg = &got.iter().find(|(p, _)| p == "/inputs/0/value").unwrap().1;
        assert!(value_msg.contains("a string") && !value_msg.contains("twenty"), "{value_msg}");
    }

    #[test]
    fn select_defaults_must_be_among_the_choices() {
        let spec = parse(
            r#"
            name = "a"
            [[inputs]]
            name = "mode"
            type = "select"
            value = "slow"
            choices = ["fast", { value = "exact", label = "Exact (slow)" }]
            "#,
        );
        let got = problems_of(&spec);
        assert_eq!(
            got,
            vec![("/inputs/0/value".to_string(), "the default value is not one of the choices".to_string())]
        );
    }

    #[test]
    fn file_paths_must_be_absolute_and_free_of_dot_segments() {
        assert!(check_absolute_path("/home/alice/in.dat").is_ok());
        for bad in ["in.dat", "/home/../etc/passwd", "/home/./x", "/a\nb", "~alice/x"] {
            assert!(check_absolute_path(bad).is_err(), "{bad:?}");
        }
    }
}
