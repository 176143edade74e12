//! The JSON Schema (2020-12) an application's input specs compile to, and plain
//! words for what its validator reports (never echoing the value).

use serde_json::{Map, Value, json};

use super::{DEFAULT_MAX_STRING, MAX_FILES_PER_INPUT, json_type};
use crate::model::application::MAX_PATH_LEN;
use crate::model::{ApplicationSpec, InputSpec, InputType};

/// The schema of `spec`'s inputs and its validator.
pub(super) fn compile(spec: &ApplicationSpec) -> Result<(Value, jsonschema::Validator), String> {
    let properties: Map<String, Value> = spec.inputs.iter().map(|i| (i.name.to_string(), input_schema(i))).collect();
    let schema = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": format!("urn:hpcforge:application:{}", spec.name),
        "type": "object",
        "additionalProperties": false,
        "properties": properties,
        "$defs": {
            "file": {
                "type": "object",
                "required": ["action", "path"],
                "additionalProperties": false,
                "properties": {
                    "action": { "enum": ["COPY"] },
                    "path": { "type": "string", "pattern": "^/", "maxLength": MAX_PATH_LEN },
                    // Octal, or as `ls -l` shows it; FileMode reads it exactly.
                    "mods": { "type": "string", "pattern": "^([0-7]{3,4}|[-dlcbps][-rwxsStT]{9})$" },
                    "size": { "type": "integer", "minimum": 0 },
                    "server": {
                        "type": "object",
                        "required": ["id"],
                        "additionalProperties": false,
                        "properties": { "id": { "type": "string", "minLength": 1 }, "name": { "type": "string" } }
                    }
                }
            }
        }
    });
    let validator = jsonschema::draft202012::options()
        .with_retriever(NoRetrieval)
        .build(&schema)
        .map_err(|e| format!("the input schema of `{}` does not compile: {e}", spec.name))?;
    Ok((schema, validator))
}

/// Refuses every external `$ref`: schemas are generated here and need none, and a
/// validator must never reach out to the network or the file system.
pub(super) struct NoRetrieval;

impl jsonschema::Retrieve for NoRetrieval {
    fn retrieve(&self, uri: &jsonschema::Uri<String>) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        Err(format!("external $ref resolution is disabled (asked for {uri})").into())
    }
}

/// The schema of one input's value.
fn input_schema(spec: &InputSpec) -> Value {
    let mut s = match spec.kind {
        InputType::Int => json!({ "type": "integer" }),
        InputType::Float => json!({ "type": "number" }),
        InputType::Boolean => json!({ "type": "boolean" }),
        InputType::String => {
            let mut s = json!({ "type": "string", "maxLength": spec.max_length.map_or(DEFAULT_MAX_STRING, u64::from) });
            if let Some(p) = &spec.pattern {
                s["pattern"] = json!(p);
            }
            s
        }
        InputType::Select => json!({ "enum": spec.choices.iter().map(|c| c.value().clone()).collect::<Vec<_>>() }),
        InputType::File => {
            json!({ "type": "array", "maxItems": MAX_FILES_PER_INPUT, "items": { "$ref": "#/$defs/file" } })
        }
        // The shape only; what it holds (order, count, bounds) is checked in code.
        InputType::Range => json!({ "type": "string", "maxLength": 4096, "pattern": "^[0-9 ,:-]*$" }),
    };
    if spec.kind != InputType::Range {
        if let Some(min) = spec.min {
            s["minimum"] = json!(min);
        }
        if let Some(max) = spec.max {
            s["maximum"] = json!(max);
        }
    }
    s
}

/// The rule and a message for a schema error, without the value.
pub(super) fn describe(
    kind: &jsonschema::error::ValidationErrorKind,
    name: &str,
    value: &Value,
) -> (&'static str, String) {
    use jsonschema::error::ValidationErrorKind as K;
    let got = json_type(value);
    match kind {
        K::Type { kind } => ("type", format!("`{name}` must be {} (got {got})", type_words(kind))),
        K::Minimum { limit } => ("minimum", format!("`{name}` must be at least {limit}")),
        K::Maximum { limit } => ("maximum", format!("`{name}` must be at most {limit}")),
        K::ExclusiveMinimum { limit } => ("minimum", format!("`{name}` must be greater than {limit}")),
        K::ExclusiveMaximum { limit } => ("maximum", format!("`{name}` must be less than {limit}")),
        K::MaxLength { limit } => (
            "maxLength",
            format!(
                "`{name}` must be at most {limit} characters (got {})",
                value.as_str().map_or(0, |s| s.chars().count())
            ),
        ),
        K::MinLength { limit } => ("minLength", format!("`{name}` must be at least {limit} characters")),
        K::Pattern { pattern } => ("pattern", format!("`{name}` must match the pattern {pattern}")),
        K::Enum { options } => {
            let list: Vec<String> =
                options.as_array().map(|a| a.iter().map(|o| o.to_string()).collect()).unwrap_or_default();
            ("choices", format!("`{name}` must be one of {}", list.join(", ")))
        }
        K::MaxItems { limit } => ("maxItems", format!("`{name}` may list at most {limit} files")),
        K::Required { property } => ("required", format!("a file of `{name}` needs {property}")),
        K::AdditionalProperties { unexpected } => {
            ("unknown", format!("unknown field(s) in a file of `{name}`: {}", unexpected.join(", ")))
        }
        other => ("schema", format!("`{name}` is invalid ({})", kind_name(other))),
    }
}

fn type_words(kind: &jsonschema::error::TypeKind) -> String {
    let word = |t: &jsonschema::JsonType| match t.to_string().as_str() {
        "integer" => "an integer".to_owned(),
        "number" => "a number".to_owned(),
        "string" => "a string".to_owned(),
        "boolean" => "true or false".to_owned(),
        "array" => "a list".to_owned(),
        "object" => "an object".to_owned(),
        other => other.to_owned(),
    };
    match kind {
        jsonschema::error::TypeKind::Single(t) => word(t),
        jsonschema::error::TypeKind::Multiple(ts) => ts.iter().map(|t| word(&t)).collect::<Vec<_>>().join(" or "),
    }
}

fn kind_name(kind: &jsonschema::error::ValidationErrorKind) -> String {
    let dbg = format!("{kind:?}");
    dbg.split(|c: char| !c.is_alphanumeric()).next().unwrap_or("invalid").to_owned()
}
