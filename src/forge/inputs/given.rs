//! What a task gave for each input, in either form the portal sends: its list of
//! input objects (`[{"name", "type", "value" | "files", ...}]`) or an object of
//! name → value. Each value is found by position in the specs, with the JSON pointer
//! its problems point at.

use serde_json::Value;

use super::{InputValidator, PORTAL_FIELDS, convert, json_type};
use crate::model::problems::pointer_token;
use crate::model::{InputSpec, InputType, Problems};

impl InputValidator {
    /// Reads the task's inputs: what was given for each declared input, by position.
    pub(super) fn collect<'a>(&self, inputs: &'a Value, p: &mut Problems) -> Vec<Option<Given<'a>>> {
        let mut out: Vec<Option<Given<'a>>> = (0..self.spec.inputs.len()).map(|_| None).collect();
        let unknown = |name: &str| {
            let declared: Vec<&str> = self.spec.inputs.iter().map(|i| i.name.as_str()).collect();
            format!(
                "unknown input `{}`: `{}` has {}",
                name.escape_debug(),
                self.spec.name,
                if declared.is_empty() { "no inputs".to_owned() } else { declared.join(", ") }
            )
        };
        match inputs {
            Value::Null => {}
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let at = Loc::List(i);
                    let Value::Object(obj) = item else {
                        p.push_rule(
                            at.to_string(),
                            "type",
                            Some(json_type(item)),
                            "each input must be an object with a `name`",
                        );
                        continue;
                    };
                    for key in obj.keys() {
                        if !PORTAL_FIELDS.contains(&key.as_str()) {
                            p.push_rule(
                                format!("{at}/{}", pointer_token(key)),
                                "unknown",
                                None,
                                format!("unknown field `{}`", key.escape_debug()),
                            );
                        }
                    }
                    let Some(Value::String(name)) = obj.get("name") else {
                        p.push_rule(
                            format!("{at}/name"),
                            "required",
                            obj.get("name").map(json_type),
                            "each input needs a `name` (a string)",
                        );
                        continue;
                    };
                    let Some(&idx) = self.index.get(name.as_str()) else {
                        p.push_rule(format!("{at}/name"), "unknown", Some("string"), unknown(name));
                        continue;
                    };
                    if out[idx].is_some() {
                        p.push_rule(
                            format!("{at}/name"),
                            "duplicate",
                            Some("string"),
                            format!("`{name}` is given twice"),
                        );
                        continue;
                    }
                    out[idx] =
                        Some(Given { at, value: obj.get("value"), files: obj.get("files"), kind: obj.get("type") });
                }
            }
            Value::Object(map) => {
                for (name, v) in map {
                    let at = Loc::Map(name);
                    let Some(&idx) = self.index.get(name.as_str()) else {
                        p.push_rule(at.to_string(), "unknown", Some(json_type(v)), unknown(name));
                        continue;
                    };
                    let is_file = self.spec.inputs[idx].kind == InputType::File;
                    let (value, files) = if is_file { (None, Some(v)) } else { (Some(v), None) };
                    out[idx] = Some(Given { at, value, files, kind: None });
                }
            }
            other => p.push_rule(
                "/inputs",
                "type",
                Some(json_type(other)),
                "`inputs` must be a list of inputs (the portal's format) or an object of name: value",
            ),
        }
        out
    }

    /// The value a task gave for `spec`, converted where the spec allows.
    pub(super) fn take_given(&self, spec: &InputSpec, given: &Given<'_>, p: &mut Problems) -> Option<Value> {
        if let Some(kind) = given.kind
            && kind.as_str() != Some(spec.kind.as_str())
        {
            p.push_rule(
                format!("{}/type", given.at),
                "type",
                Some(json_type(kind)),
                format!("`{}` is a `{}` input, not `{}`", spec.name, spec.kind.as_str(), kind.as_str().unwrap_or("?")),
            );
        }
        let list = matches!(given.at, Loc::List(_));
        if spec.kind == InputType::File {
            if given.value.is_some_and(|v| !v.is_null()) && list {
                p.push_rule(
                    format!("{}/value", given.at),
                    "files",
                    None,
                    format!("`{}` is a file input: list its files in `files`", spec.name),
                );
            }
            return given.files.filter(|f| !f.is_null()).cloned();
        }
        if given.files.is_some_and(|f| !f.is_null()) {
            p.push_rule(
                format!("{}/files", given.at),
                "files",
                None,
                format!("`{}` is not a file input; give a `value`", spec.name),
            );
        }
        let v = given.value.filter(|v| !v.is_null())?;
        Some(convert(spec, v))
    }
}

/// Where an input stands in the task body.
#[derive(Debug, Clone, Copy)]
pub(super) enum Loc<'a> {
    /// `inputs[i]` in the portal's list format (value under `/value`).
    List(usize),
    /// `inputs.<name>` in the object form (the value itself).
    Map(&'a str),
}

impl std::fmt::Display for Loc<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Loc::List(i) => write!(f, "/inputs/{i}"),
            Loc::Map(name) => write!(f, "/inputs/{}", pointer_token(name)),
        }
    }
}

/// What a task gave for one input.
pub(super) struct Given<'a> {
    pub(super) at: Loc<'a>,
    pub(super) value: Option<&'a Value>,
    pub(super) files: Option<&'a Value>,
    pub(super) kind: Option<&'a Value>,
}

impl Given<'_> {
    /// Where errors about the value point.
    pub(super) fn value_pointer(&self, spec: &InputSpec) -> String {
        match (self.at, spec.kind) {
            (Loc::List(_), InputType::File) => format!("{}/files", self.at),
            (Loc::List(_), _) => format!("{}/value", self.at),
            (Loc::Map(_), _) => self.at.to_string(),
        }
    }
}
