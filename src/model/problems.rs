//! A list of everything wrong with a piece of input, each item located by a JSON
//! pointer, so a caller can fix all of it in one go.

use serde::{Deserialize, Serialize};

/// One thing wrong, and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Problem {
    /// JSON pointer (RFC 6901) into the document that was checked, e.g.
    /// `/definition/inputs/1/type` or `/files/app_execute`.
    pub pointer: String,
    /// What is wrong, in words a definition author can act on. Never contains a
    /// user-supplied value verbatim (values may be secret).
    pub message: String,
    /// The rule broken, for programs: `type`, `minimum`, `pattern`, `required`,
    /// `editable`, `unknown`, `control-character`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The JSON type of the offending value (`string`, `integer`, ...), never the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_type: Option<String>,
}

impl Problem {
    /// A problem at `pointer`.
    pub fn new(pointer: impl Into<String>, message: impl Into<String>) -> Self {
        Self { pointer: pointer.into(), message: message.into(), rule: None, value_type: None }
    }
}

/// Problems collected while checking one document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Problems(Vec<Problem>);

impl Problems {
    /// Records a problem at `pointer`.
    pub fn push(&mut self, pointer: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem::new(pointer, message));
    }

    /// Records a problem with the rule it broke and the type of the value.
    pub fn push_rule(
        &mut self,
        pointer: impl Into<String>,
        rule: &str,
        value_type: Option<&str>,
        message: impl Into<String>,
    ) {
        self.0.push(Problem {
            pointer: pointer.into(),
            message: message.into(),
            rule: Some(rule.to_owned()),
            value_type: value_type.map(str::to_owned),
        });
    }

    /// Rewrites the messages of the problems recorded since position `from`.
    pub fn rewrite_from(&mut self, from: usize, f: impl Fn(&str) -> String) {
        for p in self.0.iter_mut().skip(from) {
            p.message = f(&p.message);
        }
    }

    /// Sorts the problems by pointer, so answers are stable.
    pub fn sort(&mut self) {
        self.0.sort_by(|a, b| a.pointer.cmp(&b.pointer));
    }

    /// Moves every problem of `other` here, with `prefix` put in front of its pointer.
    pub fn extend_under(&mut self, prefix: &str, other: Problems) {
        for p in other.0 {
            self.0.push(Problem { pointer: format!("{prefix}{}", p.pointer), ..p });
        }
    }

    /// Whether nothing is wrong.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many problems there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The problems, in the order found.
    pub fn iter(&self) -> std::slice::Iter<'_, Problem> {
        self.0.iter()
    }

    /// `Ok(())` when empty, else the problems as an error.
    pub fn into_result(self) -> Result<(), Problems> {
        if self.0.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl IntoIterator for Problems {
    type Item = Problem;
    type IntoIter = std::vec::IntoIter<Problem>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl FromIterator<Problem> for Problems {
    fn from_iter<I: IntoIterator<Item = Problem>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl From<Problem> for Problems {
    fn from(p: Problem) -> Self {
        Self(vec![p])
    }
}

impl std::fmt::Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {}", if p.pointer.is_empty() { "/" } else { &p.pointer }, p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// Escapes one reference token for a JSON pointer (`~` → `~0`, `/` → `~1`).
pub fn pointer_token(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// Turns a path reported by `serde_path_to_error` (`inputs[1].type`) into a JSON
/// pointer (`/inputs/1/type`).
pub fn pointer_from_serde_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path.iter() {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("/{index}")),
            Segment::Map { key } => out.push_str(&format!("/{}", pointer_token(key))),
            Segment::Enum { variant } => out.push_str(&format!("/{}", pointer_token(variant))),
            Segment::Unknown => out.push_str("/?"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_tokens_escape_tilde_and_slash() {
        assert_eq!(pointer_token("cluster/local-slurm"), "cluster~1local-slurm");
        assert_eq!(pointer_token("a~b"), "a~0b");
    }

    #[test]
    fn problems_display_one_per_line() {
        let mut p = Problems::default();
        p.push("/a", "first");
        p.push("", "whole document");
        assert_eq!(p.to_string(), "/a: first\n/: whole document");
    }
}
