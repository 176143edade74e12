//! Task inputs, checked on the server against the application's input specs.
//!
//! The specs compile once per application version into a JSON Schema (2020-12) and a
//! `jsonschema` validator. A task's inputs are merged over the defaults and checked
//! against it, and the checks a schema cannot express are done in code: editable,
//! required, control characters, file staging. Every problem comes back at once, each
//! with a JSON pointer into the task body, the rule it broke, and the value's JSON type.
//! Values themselves are never echoed: they may be secret.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

mod files;
mod given;
mod schema;

use given::Given;

pub use crate::model::StagedFile;
use crate::model::frames::{FrameRange, MAX_FRAMES};
use crate::model::problems::pointer_token;
use crate::model::{ApplicationSpec, ClusterSpec, InputName, InputSpec, InputType, Problems};

/// Longest `string` value when the spec sets no `maxLength`: 1 Mi characters.
pub const DEFAULT_MAX_STRING: u64 = 1 << 20;
/// Most files one `file` input may list.
pub const MAX_FILES_PER_INPUT: u64 = 1000;

/// Fields of an input object in the portal's task JSON. Only `name`, `type`, `value`
/// and `files` matter to the server; the rest describe the form and are ignored (the
/// server trusts its own specs, never the portal's copy of them).
pub(super) const PORTAL_FIELDS: &[&str] = &[
    "name",
    "type",
    "value",
    "files",
    "required",
    "editable",
    "hidden",
    "strict",
    "order",
    "label",
    "labelVisible",
    "description",
    "autoCheck",
    "valid",
    "min",
    "max",
    "pattern",
    "maxLength",
    "choices",
];

/// The value one input ends up with.
#[derive(Debug, Clone, PartialEq)]
pub enum InputValue {
    /// No value (an optional input left empty).
    Absent,
    /// A scalar: string, number or boolean.
    Scalar(Value),
    /// The files of a `file` input.
    Files(Vec<StagedFile>),
}

impl InputValue {
    /// The value as text: what markup and `HPCG_INPUT_<name>` carry (file inputs: one
    /// absolute path per line, under `run_dir`).
    pub fn text(&self, run_dir: &str) -> String {
        match self {
            InputValue::Absent => String::new(),
            InputValue::Scalar(Value::String(s)) => s.clone(),
            InputValue::Scalar(v) => v.to_string(),
            InputValue::Files(files) => {
                files.iter().map(|f| format!("{run_dir}/{}", f.name)).collect::<Vec<_>>().join("\n")
            }
        }
    }
}

/// Inputs that passed every check.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ValidatedInputs {
    /// Every declared input, in declaration order.
    pub values: Vec<(InputName, InputValue)>,
    /// What validation changed and the task should say (for example a file mode
    /// raised so that the job can read its own input).
    pub notes: Vec<String>,
}

impl ValidatedInputs {
    /// Every file to stage, in input order.
    pub fn staged(&self) -> Vec<StagedFile> {
        self.values
            .iter()
            .filter_map(|(_, v)| match v {
                InputValue::Files(f) => Some(f.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// The inputs in the portal's list format (`name`, `type`, `value` or `files`),
    /// as a task records them.
    pub fn to_portal(&self, spec: &ApplicationSpec) -> Value {
        let items = self
            .values
            .iter()
            .zip(&spec.inputs)
            .map(|((name, v), s)| {
                let mut o = Map::new();
                o.insert("name".into(), json!(name));
                o.insert("type".into(), json!(s.kind.as_str()));
                match v {
                    InputValue::Absent => {
                        o.insert("value".into(), Value::Null);
                    }
                    InputValue::Scalar(x) => {
                        o.insert("value".into(), x.clone());
                    }
                    InputValue::Files(fs) => {
                        let files: Vec<Value> = fs
                            .iter()
                            .map(|f| {
                                let mut e = json!({ "action": "COPY", "path": f.source });
                                if let Some(m) = &f.mode {
                                    e["mods"] = json!(m.to_string());
                                }
                                e
                            })
                            .collect();
                        o.insert("files".into(), Value::Array(files));
                    }
                }
                Value::Object(o)
            })
            .collect();
        Value::Array(items)
    }
}

/// A compiled validator for one application version.
pub struct InputValidator {
    spec: ApplicationSpec,
    schema: Value,
    validator: jsonschema::Validator,
    /// Input name → position in `spec.inputs`.
    index: std::collections::HashMap<String, usize>,
    /// Default of each input, converted once.
    defaults: Vec<Option<Value>>,
}

impl std::fmt::Debug for InputValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InputValidator").field("application", &self.spec.name).finish()
    }
}

pub(super) fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

impl InputValidator {
    /// Compiles the schema of `spec` (done once per application version).
    pub fn compile(spec: &ApplicationSpec) -> Result<Self, String> {
        let (schema, validator) = schema::compile(spec)?;
        let index = spec.inputs.iter().enumerate().map(|(i, s)| (s.name.to_string(), i)).collect();
        let defaults = spec.inputs.iter().map(default_of).collect();
        Ok(Self { spec: spec.clone(), schema, validator, index, defaults })
    }

    /// The compiled JSON Schema (served to portals that want to check forms early).
    pub fn schema(&self) -> &Value {
        &self.schema
    }

    /// Checks a task's `inputs` (portal list, or an object of name → value) for a task
    /// on `cluster`. Pointers are relative to the task body (`/inputs/...`).
    pub fn validate(&self, inputs: &Value, cluster: &ClusterSpec) -> Result<ValidatedInputs, Problems> {
        let mut p = Problems::default();
        // What the task gave, by position in the spec. Pointers are only formatted when
        // a problem needs one: valid tasks (the common case) format none.
        let provided = self.collect(inputs, &mut p);
        let mut merged = Map::new();
        for (i, (spec, default)) in self.spec.inputs.iter().zip(&self.defaults).enumerate() {
            let name = spec.name.as_str();
            let given = provided[i].as_ref();
            let value = match given {
                Some(g) => {
                    let v = self.take_given(spec, g, &mut p);
                    if !spec.editable && v != *default {
                        p.push_rule(
                            g.value_pointer(spec),
                            "editable",
                            v.as_ref().map(json_type),
                            format!("`{name}` is not editable: the application sets its value"),
                        );
                    }
                    v
                }
                None => default.clone(),
            };
            let at = || given.map_or_else(|| "/inputs".to_owned(), |g| g.value_pointer(spec));
            let missing = match &value {
                None => true,
                Some(Value::String(s)) => s.is_empty(),
                Some(Value::Array(a)) => a.is_empty(),
                Some(_) => false,
            };
            if spec.required && missing {
                p.push_rule(at(), "required", value.as_ref().map(json_type), format!("`{name}` is required"));
            }
            if let Some(v) = value {
                if has_control(&v) {
                    check_strings(&v, &at(), &mut p);
                }
                if spec.kind == InputType::String
                    && spec.pattern.is_none()
                    && v.as_str().is_some_and(|s| s.starts_with('-'))
                {
                    p.push_rule(
                        at(),
                        "leading-dash",
                        Some("string"),
                        format!("`{name}` must not start with `-`: commands given it would read it as an option (declare a pattern on the input to allow it)"),
                    );
                }
                merged.insert(name.to_owned(), v);
            }
        }
        let instance = Value::Object(merged);
        // Collecting errors costs more than a yes/no; only do it when there are some.
        if !self.validator.is_valid(&instance) {
            for err in self.validator.iter_errors(&instance) {
                let path = err.instance_path().to_string();
                let mut tokens = path.splitn(3, '/').skip(1);
                let name = tokens.next().unwrap_or_default().replace("~1", "/").replace("~0", "~");
                let rest = tokens.next().map(|r| format!("/{r}")).unwrap_or_default();
                let base = self
                    .index
                    .get(name.as_str())
                    .and_then(|&i| provided[i].as_ref().map(|g| g.value_pointer(&self.spec.inputs[i])))
                    .unwrap_or_else(|| "/inputs".to_owned());
                let (rule, message) = schema::describe(err.kind(), &name, err.instance());
                p.push_rule(format!("{base}{rest}"), rule, Some(json_type(err.instance())), message);
            }
        }
        if !p.is_empty() {
            p.sort();
            return Err(p);
        }
        let Value::Object(values) = instance else { unreachable!("built as an object") };
        let mut notes = Vec::new();
        let values = self.stage(values, &provided, cluster, &mut p, &mut notes);
        p.sort();
        p.into_result()?;
        Ok(ValidatedInputs { values, notes })
    }

    /// Turns the validated values into input values, checking what a schema cannot
    /// about files.
    fn stage(
        &self,
        mut values: Map<String, Value>,
        provided: &[Option<Given<'_>>],
        cluster: &ClusterSpec,
        p: &mut Problems,
        notes: &mut Vec<String>,
    ) -> Vec<(InputName, InputValue)> {
        let mut staged_names: BTreeSet<String> = BTreeSet::new();
        let mut out = Vec::with_capacity(self.spec.inputs.len());
        for (i, spec) in self.spec.inputs.iter().enumerate() {
            let name = spec.name.as_str();
            // A problem in a default is the application's: it points at `/inputs` and says so.
            let from_default = provided[i].is_none();
            let at = || provided[i].as_ref().map_or_else(|| "/inputs".to_owned(), |g| g.value_pointer(spec));
            let value = match values.remove(name) {
                None => InputValue::Absent,
                Some(Value::Array(entries)) if spec.kind == InputType::File => {
                    let mut files = Vec::new();
                    let before = p.len();
                    for (j, e) in entries.iter().enumerate() {
                        let ep = || if from_default { "/inputs".to_owned() } else { format!("{}/{j}", at()) };
                        if let Some(f) = files::stage_file(e, &ep, cluster, &mut staged_names, p, notes) {
                            files.push(f);
                        }
                    }
                    if from_default {
                        p.rewrite_from(before, |m| format!("the default files of `{name}` cannot be used here: {m}"));
                    }
                    InputValue::Files(files)
                }
                Some(Value::String(text)) if spec.kind == InputType::Range => {
                    let limit = cluster.limits.max_frames.map_or(MAX_FRAMES, u64::from);
                    let checked =
                        FrameRange::parse(&text, limit).and_then(|r| spec.frames_within_bounds(&r).map(|_| r));
                    match checked {
                        Ok(r) => InputValue::Scalar(Value::String(r.to_string())),
                        Err(why) => {
                            let whose = if from_default { " (its default)" } else { "" };
                            p.push_rule(at(), "range", Some("string"), format!("`{name}`{whose}: {why}"));
                            InputValue::Absent
                        }
                    }
                }
                Some(v) => InputValue::Scalar(v),
            };
            out.push((spec.name.clone(), value));
        }
        out
    }
}

/// Whether any string in `v` holds a control character (checked before building
/// pointers for the report).
fn has_control(v: &Value) -> bool {
    match v {
        Value::String(s) => s.chars().any(char::is_control),
        Value::Array(a) => a.iter().any(has_control),
        Value::Object(o) => o.values().any(has_control),
        _ => false,
    }
}

/// The default value of an input, as JSON (`files` for file inputs).
fn default_of(spec: &InputSpec) -> Option<Value> {
    if spec.kind == InputType::File {
        if spec.files.is_empty() {
            None
        } else {
            Some(serde_json::to_value(&spec.files).expect("file entries serialise"))
        }
    } else {
        spec.value.clone().filter(|v| !v.is_null()).map(|v| convert(spec, &v))
    }
}

/// Exact conversions: integral numbers to integers for `int` inputs, and — unless the
/// input is `strict` — form strings (`"20"`, `"0.5"`, `"true"`) to the input's type.
/// Anything that does not convert exactly is left for the schema to refuse.
pub(super) fn convert(spec: &InputSpec, v: &Value) -> Value {
    match (spec.kind, v) {
        (InputType::Int, Value::Number(n)) if n.as_i64().is_none() => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => json!(f as i64),
            _ => v.clone(),
        },
        (_, Value::String(s)) if !spec.strict => match spec.kind {
            InputType::Int => s.parse::<i64>().map_or_else(|_| v.clone(), |n| json!(n)),
            InputType::Float => s.parse::<f64>().ok().filter(|f| f.is_finite()).map_or_else(|| v.clone(), |f| json!(f)),
            InputType::Boolean => match s.as_str() {
                "true" => json!(true),
                "false" => json!(false),
                _ => v.clone(),
            },
            InputType::Select => spec
                .choices
                .iter()
                .map(|c| c.value())
                .find(|c| !c.is_string() && c.to_string() == *s)
                .cloned()
                .unwrap_or_else(|| v.clone()),
            _ => v.clone(),
        },
        _ => v.clone(),
    }
}

/// Refuses control characters in every string of a value.
fn check_strings(v: &Value, at: &str, p: &mut Problems) {
    match v {
        Value::String(s) => {
            if let Some(c) = s.chars().find(|c| c.is_control()) {
                p.push_rule(
                    at,
                    "control-character",
                    Some("string"),
                    format!(
                        "contains the control character U+{:04X}; values cannot hold newlines, carriage returns, NUL or other control characters",
                        c as u32
                    ),
                );
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                check_strings(x, &format!("{at}/{i}"), p);
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                check_strings(x, &format!("{at}/{}", pointer_token(k)), p);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(super) fn validator(toml_text: &str) -> InputValidator {
        let spec: ApplicationSpec = toml::from_str(toml_text).unwrap();
        InputValidator::compile(&spec).unwrap()
    }

    pub(super) fn cluster() -> ClusterSpec {
        toml::from_str("name = 'local-slurm'\nscheduler = 'local'").unwrap()
    }

    pub(super) fn sleep() -> InputValidator {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("applications/sleep/application.toml"),
        )
        .unwrap();
        validator(&text)
    }

    pub(super) fn pointers(p: &Problems) -> Vec<(String, String)> {
        p.iter().map(|p| (p.pointer.clone(), p.rule.clone().unwrap_or_default())).collect()
    }

    #[test]
    fn defaults_fill_what_the_task_leaves_out() {
        let v = sleep().validate(&json!([]), &cluster()).unwrap();
        assert_eq!(v.values[0].1, InputValue::Scalar(json!(20)));
        let InputValue::Files(files) = &v.values[1].1 else { panic!() };
        assert_eq!(files[0].name, "hostname");
        assert_eq!(v.values[1].1.text("/run"), "/run/hostname");
    }

    #[test]
    fn the_portal_list_and_the_map_form_mean_the_same() {
        let list = sleep()
            .validate(
                &json!([{ "name": "sleep", "type": "int", "value": 5, "label": "x", "required": true }]),
                &cluster(),
            )
            .unwrap();
        let map = sleep().validate(&json!({ "sleep": 5 }), &cluster()).unwrap();
        assert_eq!(list, map);
        assert_eq!(list.values[0].1, InputValue::Scalar(json!(5)));
    }

    #[test]
    fn every_failing_field_is_reported_with_pointer_rule_and_type_but_not_the_value() {
        let v = validator(
            r#"
            name = "t"
            [[inputs]]
            name = "n"
            type = "int"
            strict = true
            min = 1
            max = 10
            [[inputs]]
            name = "s"
            type = "string"
            pattern = "^[a-z]+$"
            [[inputs]]
            name = "mode"
            type = "select"
            choices = ["a", "b"]
            [[inputs]]
            name = "fixed"
            type = "string"
            value = "x"
            editable = false
            [[inputs]]
            name = "need"
            type = "string"
            required = true
            "#,
        );
        let body = json!([
            { "name": "n", "value": 99 },
            { "name": "s", "value": "SECRET-Value" },
            { "name": "mode", "value": "c" },
            { "name": "fixed", "value": "y" },
            { "name": "nope", "value": 1 },
            { "name": "n", "value": 2 },
            { "name": "need", "value": "line\nbreak", "colour": "red" },
        ]);
        let p = v.validate(&body, &cluster()).unwrap_err();
        let got = pointers(&p);
        for expected in [
            ("/inputs/0/value", "maximum"),
            ("/inputs/1/value", "pattern"),
            ("/inputs/2/value", "choices"),
            ("/inputs/3/value", "editable"),
            ("/inputs/4/name", "unknown"),
            ("/inputs/5/name", "duplicate"),
            ("/inputs/6/colour", "unknown"),
            ("/inputs/6/value", "control-character"),
        ] {
            assert!(got.contains(&(expected.0.to_owned(), expected.1.to_owned())), "missing {expected:?} in {got:#?}");
        }
        assert!(!p.to_string().contains("SECRET"), "values are never echoed: {p}");
        assert_eq!(p.iter().find(|x| x.pointer == "/inputs/0/value").unwrap().value_type.as_deref(), Some("integer"));
    }

    #[test]
    fn strict_inputs_take_json_types_and_others_convert_form_strings_exactly() {
        let v = validator(
            "name='t'\n[[inputs]]\nname='n'\ntype='int'\n[[inputs]]\nname='f'\ntype='float'\n[[inputs]]\nname='b'\ntype='boolean'\n[[inputs]]\nname='k'\ntype='int'\nstrict=true\n",
        );
        let ok = v.validate(&json!({ "n": "20", "f": "0.5", "b": "true", "k": 3 }), &cluster()).unwrap();
        assert_eq!(ok.values[0].1, InputValue::Scalar(json!(20)));
        assert_eq!(ok.values[1].1, InputValue::Scalar(json!(0.5)));
        assert_eq!(ok.values[2].1, InputValue::Scalar(json!(true)));
        let p = v.validate(&json!({ "n": "20.5", "b": "yes", "k": "3" }), &cluster()).unwrap_err();
        assert_eq!(
            pointers(&p),
            [
                ("/inputs/b".into(), "type".into()),
                ("/inputs/k".into(), "type".into()),
                ("/inputs/n".into(), "type".into())
            ]
        );
        // 20.0 for an int input is the integer 20.
        assert_eq!(v.validate(&json!({ "k": 20.0 }), &cluster()).unwrap().values[3].1, InputValue::Scalar(json!(20)));
    }

    #[test]
    fn required_means_a_non_empty_value() {
        let v = validator("name='t'\n[[inputs]]\nname='s'\ntype='string'\nrequired=true\n");
        for body in [json!([]), json!({ "s": "" }), json!({ "s": null })] {
            let p = v.validate(&body, &cluster()).unwrap_err();
            assert_eq!(p.iter().next().unwrap().rule.as_deref(), Some("required"), "{body}");
        }
    }

    #[test]
    fn strings_that_would_read_as_options_are_refused_unless_a_pattern_allows_them() {
        let v = validator(
            "name='t'\n[[inputs]]\nname='s'\ntype='string'\n[[inputs]]\nname='p'\ntype='string'\npattern='^-?[a-z]+$'\n",
        );
        let p = v.validate(&json!({ "s": "--checkpoint-action=exec=id" }), &cluster()).unwrap_err();
        assert_eq!(p.iter().next().unwrap().rule.as_deref(), Some("leading-dash"));
        v.validate(&json!({ "p": "-x" }), &cluster()).unwrap();
    }

    #[test]
    fn a_wrongly_typed_portal_input_is_named() {
        let p = sleep().validate(&json!([{ "name": "sleep", "type": "string", "value": 3 }]), &cluster()).unwrap_err();
        assert_eq!(pointers(&p), [("/inputs/0/type".into(), "type".into())]);
    }

    #[test]
    fn the_schema_is_draft_2020_12_and_fetches_nothing() {
        let v = sleep();
        assert_eq!(v.schema()["$schema"], "https://json-schema.org/draft/2020-12/schema");
        let remote = json!({ "$ref": "https://example.com/evil.json" });
        let err = jsonschema::draft202012::options().with_retriever(schema::NoRetrieval).build(&remote).unwrap_err();
        assert!(err.to_string().contains("disabled"), "{err}");
    }

    const FRAMES_APP: &str = r#"
        name = "render"
        [[inputs]]
        name = "frames"
        type = "range"
        value = "1-10"
        min = 1
        max = 500
    "#;

    #[test]
    fn a_frame_range_is_checked_and_carried_in_canonical_form() {
        let v = validator(FRAMES_APP);
        let ok = v.validate(&json!({ "frames": " 1-10:4 ,20" }), &cluster()).unwrap();
        assert_eq!(ok.values[0].1.text(""), "1-9:4,20");
        let dflt = v.validate(&json!({}), &cluster()).unwrap();
        assert_eq!(dflt.values[0].1.text(""), "1-10");
        for (value, words) in [
            (json!("5-1"), "5 is after 1"),
            (json!("1-10,5"), "does not come after"),
            (json!("0-3"), "frame 0 is below min (1)"),
            (json!("490-510"), "frame 510 is above max (500)"),
        ] {
            let p = v.validate(&json!({ "frames": value }), &cluster()).unwrap_err();
            assert_eq!(pointers(&p), [("/inputs/frames".to_owned(), "range".to_owned())], "{value}");
            assert!(p.to_string().contains(words), "{value}: {p}");
        }
        // Not a string, or not even shaped like a range: the schema says so.
        let p = v.validate(&json!({ "frames": 7 }), &cluster()).unwrap_err();
        assert_eq!(pointers(&p)[0].1, "type");
        let p = v.validate(&json!({ "frames": "1-3; id" }), &cluster()).unwrap_err();
        assert_eq!(pointers(&p)[0].1, "pattern");
    }

    #[test]
    fn the_cluster_bounds_how_many_frames_a_range_may_hold() {
        let v = validator(FRAMES_APP);
        let small: ClusterSpec = toml::from_str("name = 'c'\nscheduler = 'local'\n[limits]\nmax_frames = 5").unwrap();
        let p = v.validate(&json!({ "frames": "1-6" }), &small).unwrap_err();
        assert!(p.to_string().contains("more than 5 frames"), "{p}");
        assert!(v.validate(&json!({ "frames": "1-5" }), &small).is_ok());
        // The default is the application's: said as such.
        let p = v.validate(&json!({}), &small).unwrap_err();
        assert!(p.to_string().contains("`frames` (its default): the range holds more than 5"), "{p}");
    }

    #[test]
    fn a_range_default_is_checked_at_upload() {
        let spec: ApplicationSpec =
            toml::from_str("name = 'r'\n[[inputs]]\nname = 'f'\ntype = 'range'\nvalue = '9-3'\n").unwrap();
        let mut p = Problems::default();
        spec.check(&mut p);
        assert!(p.to_string().contains("/inputs/0/value: the default value `9-3` is not a frame range piece"), "{p}");
        let spec: ApplicationSpec =
            toml::from_str("name = 'r'\n[[inputs]]\nname = 'f'\ntype = 'range'\nvalue = '1-20'\nmax = 10\n").unwrap();
        let mut p = Problems::default();
        spec.check(&mut p);
        assert!(p.to_string().contains("the default value: frame 20 is above max (10)"), "{p}");
    }
}
