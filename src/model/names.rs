//! Identifiers that parse at the boundary: definition names, Unix user names, input
//! names, task IDs and phases. Once a value has one of these types it is known good.
//!
//! Why this file is long: about 530 lines of code; the rest are the unit tests of what
//! each name accepts and refuses, kept beside the rules they pin.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Why a name was refused. The message says what is wrong and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} `{shown}` is not valid: {reason}")]
pub struct NameError {
    /// What kind of name it was meant to be ("application name", "user name", ...).
    pub what: &'static str,
    /// The refused value, with control characters escaped so the message stays one line.
    pub shown: String,
    /// What rule it broke.
    pub reason: String,
}

impl NameError {
    fn new(what: &'static str, value: &str, reason: impl Into<String>) -> Self {
        let mut shown: String = value.chars().take(80).collect::<String>().escape_debug().to_string();
        if value.chars().count() > 80 {
            shown.push('…');
        }
        Self { what, shown, reason: reason.into() }
    }
}

/// Longest definition name. Names are path segments in GridFS and directory names on
/// clusters; 64 keeps every derived path comfortably short.
pub const MAX_NAME_LEN: usize = 64;

/// Checks a name that becomes one segment of a storage path
/// (`applications/<name>/...`, `clusters/<name>/...`).
///
/// Letters, digits, `.`, `_` and `-`; starts with a letter or digit; no `..`; at most
/// [`MAX_NAME_LEN`] bytes. This refuses `/`, `..`, control characters, spaces and
/// anything a shell or a URL would treat specially.
fn check_path_segment(what: &'static str, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::new(what, value, "it is empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(NameError::new(
            what,
            value,
            format!("it is {} bytes long; the limit is {MAX_NAME_LEN}", value.len()),
        ));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(NameError::new(what, value, format!("it contains the control character {c:?}")));
    }
    if value.contains('/') {
        return Err(NameError::new(what, value, "it contains `/`"));
    }
    if value.contains("..") {
        return Err(NameError::new(what, value, "it contains `..`"));
    }
    let first = value.chars().next().expect("checked non-empty");
    if !first.is_ascii_alphanumeric() {
        return Err(NameError::new(what, value, "it must start with a letter or a digit"));
    }
    if let Some(c) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(NameError::new(
            what,
            value,
            format!("it contains {c:?}; only letters, digits, `.`, `_` and `-` are allowed"),
        ));
    }
    Ok(())
}

/// Declares a `String` newtype whose only constructor is a checked parse.
macro_rules! checked_name {
    ($(#[$doc:meta])* $name:ident, $what:literal, $check:path, $pattern:literal, $max:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Parses and checks `value`.
            pub fn parse(value: &str) -> Result<Self, NameError> {
                $check($what, value)?;
                Ok(Self(value.to_owned()))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }

        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                string_schema(concat!("A ", $what, "."), $pattern, Some($max))
            }
        }

        impl utoipa::ToSchema for $name {}
    };
}

/// A string schema with a pattern (ECMA-262) and a length cap, for the OpenAPI document.
fn string_schema(
    description: &str,
    pattern: &str,
    max_length: Option<usize>,
) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
        .pattern(Some(pattern))
        .min_length(Some(1))
        .max_length(max_length)
        .into()
}

checked_name!(
    /// Name (and ID) of an application: `applications/<name>/...` in GridFS.
    AppName,
    "application name",
    check_path_segment,
    "^[A-Za-z0-9][A-Za-z0-9._-]*$",
    64
);

checked_name!(
    /// Name (and ID) of a cluster: `clusters/<name>/...` in GridFS.
    ClusterName,
    "cluster name",
    check_path_segment,
    "^[A-Za-z0-9][A-Za-z0-9._-]*$",
    64
);

checked_name!(
    /// Name of a licence pool (`maya`, `fluent`): what applications ask for and sites
    /// count. Letters, digits, `.`, `_`, `-`, starting with a letter or digit.
    LicenceName,
    "licence name",
    check_path_segment,
    "^[A-Za-z0-9][A-Za-z0-9._-]*$",
    64
);

checked_name!(
    /// A Unix login name: who uploads definitions and whom a task's jobs run as.
    ///
    /// Follows the portable rule of `useradd` (`[a-z_][a-z0-9_-]*`, at most 32 bytes),
    /// so a name accepted here is a name the cluster can have.
    UserName,
    "user name",
    check_user_name,
    "^[a-z_][a-z0-9_-]*$",
    32
);

checked_name!(
    /// Name of a task input, which is also its `@@NAME@@` markup.
    ///
    /// An identifier (`[A-Za-z_][A-Za-z0-9_]*`, at most 64 bytes) so it can be a template
    /// variable and an environment variable name; the `HPCG_` prefix is reserved for
    /// built-ins.
    InputName,
    "input name",
    check_input_name,
    "^[A-Za-z_][A-Za-z0-9_]*$",
    64
);

fn check_user_name(what: &'static str, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::new(what, value, "it is empty"));
    }
    if value.len() > 32 {
        return Err(NameError::new(what, value, "it is longer than 32 bytes"));
    }
    let mut chars = value.chars();
    let first = chars.next().expect("checked non-empty");
    if !(first.is_ascii_lowercase() || first == '_') {
        return Err(NameError::new(what, value, "it must start with a lowercase letter or `_`"));
    }
    if let Some(c) = chars.find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'))) {
        return Err(NameError::new(
            what,
            value,
            format!("it contains {c:?}; only lowercase letters, digits, `_` and `-` are allowed"),
        ));
    }
    Ok(())
}

/// Prefix reserved for built-in markup (`HPCG_TASK_ID`, ...).
pub const BUILTIN_PREFIX: &str = "HPCG_";

fn check_input_name(what: &'static str, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(NameError::new(what, value, "it is empty"));
    }
    if value.len() > 64 {
        return Err(NameError::new(what, value, "it is longer than 64 bytes"));
    }
    let mut chars = value.chars();
    let first = chars.next().expect("checked non-empty");
    if !(first.is_ascii_alphabetic() || first == '_') {
        return Err(NameError::new(what, value, "it must start with a letter or `_`"));
    }
    if let Some(c) = chars.find(|c| !(c.is_ascii_alphanumeric() || *c == '_')) {
        return Err(NameError::new(
            what,
            value,
            format!("it contains {c:?}; only letters, digits and `_` are allowed"),
        ));
    }
    if value.to_ascii_uppercase().starts_with(BUILTIN_PREFIX) {
        return Err(NameError::new(
            what,
            value,
            format!("the prefix `{BUILTIN_PREFIX}` is reserved for built-in markup"),
        ));
    }
    Ok(())
}

/// Identifies a task. Always a UUID version 7, so IDs sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId(Uuid);

impl TaskId {
    /// A fresh ID for a task created now.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Parses the canonical hyphenated form and insists on version 7.
    pub fn parse(value: &str) -> Result<Self, NameError> {
        let uuid = Uuid::try_parse(value).map_err(|e| NameError::new("task ID", value, e.to_string()))?;
        if uuid.get_version_num() != 7 {
            return Err(NameError::new(
                "task ID",
                value,
                format!("it is a version {} UUID; task IDs are version 7", uuid.get_version_num()),
            ));
        }
        Ok(Self(uuid))
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl Default for TaskId {
    fn default() -> Self {
        Self::new()
    }
}

impl TaskId {
    /// The task's global identity: `hpcforge://<site>/tasks/<id>`.
    pub fn uri(&self, site: &SiteId) -> String {
        format!("hpcforge://{site}/tasks/{self}")
    }

    /// A task ID, or the URI form of one at `site` (what [`TaskId::uri`] gives). A
    /// URI of another site is refused, naming both sites.
    pub fn parse_ref(value: &str, site: &SiteId) -> Result<Self, NameError> {
        let Some(rest) = value.strip_prefix("hpcforge://") else { return Self::parse(value) };
        let Some((host, id)) = rest.split_once("/tasks/") else {
            return Err(NameError::new("task URI", value, "the form is hpcforge://<site>/tasks/<id>"));
        };
        if host != site.as_str() {
            return Err(NameError::new(
                "task URI",
                value,
                format!("it names site `{}`; this is site `{site}`", host.escape_debug()),
            ));
        }
        Self::parse(id)
    }
}

/// An installation's site ID, the host part of its task URIs: 1 to 63 lower-case
/// letters, digits, `.` and `-`, starting and ending with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SiteId(String);

impl SiteId {
    /// Parses a site ID.
    pub fn parse(value: &str) -> Result<Self, NameError> {
        let what = "site ID";
        if value.is_empty() || value.len() > 63 {
            return Err(NameError::new(what, value, "it must be 1 to 63 characters long"));
        }
        if let Some(c) = value.chars().find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-')) {
            return Err(NameError::new(
                what,
                value,
                format!("it contains {c:?}; use lower-case letters, digits, `.` and `-`"),
            ));
        }
        let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
        if !edge(value.chars().next()) || !edge(value.chars().last()) {
            return Err(NameError::new(what, value, "it must start and end with a letter or digit"));
        }
        Ok(Self(value.to_owned()))
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for SiteId {
    /// `local`: an installation that did not name itself.
    fn default() -> Self {
        Self("local".to_owned())
    }
}

impl fmt::Display for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TaskId {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl Serialize for TaskId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TaskId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl utoipa::PartialSchema for TaskId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)))
            .description(Some("A task ID: a UUID version 7, so IDs sort by creation time."))
            .into()
    }
}

impl utoipa::ToSchema for TaskId {}

/// The longest phase name. Phase names become parts of file names, shell variable
/// names and job names (`hpcg-<app>-<phase>`), so they stay short.
pub const MAX_PHASE_NAME: usize = 31;

/// A phase of a task: one step, which becomes one batch job. Its name is an identifier
/// (`[a-z][a-z0-9_]*`, at most [`MAX_PHASE_NAME`] bytes), because it lands in file
/// names (`script_<phase>`), shell variable names and job names unquoted. By default a
/// task has three, [`Phase::PROLOG`], [`Phase::EXECUTE`] and [`Phase::EPILOG`].
///
/// Stored inline (no allocation), so it stays `Copy` like the names it replaced.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Phase {
    /// The name's bytes, zero-padded (zero bytes never occur in a name, so the derived
    /// order is the names' order).
    bytes: [u8; MAX_PHASE_NAME],
}

impl Phase {
    /// Prepares the run (checks inputs, stages data). Runs first.
    pub const PROLOG: Phase = Phase::known("prolog");
    /// The application's real work. Runs only if the prolog succeeded.
    pub const EXECUTE: Phase = Phase::known("execute");
    /// Clean-up and summary. Runs once execute has ended, whatever its outcome.
    pub const EPILOG: Phase = Phase::known("epilog");

    /// The phases of an application that declares none, in the order they run.
    pub const DEFAULT: [Phase; 3] = [Phase::PROLOG, Phase::EXECUTE, Phase::EPILOG];

    /// Whether `b` is a phase name: a lowercase letter, then lowercase letters, digits
    /// or `_`, at most [`MAX_PHASE_NAME`] bytes. (A `const fn`, so the built-in names
    /// are checked by the same rule at compile time.)
    const fn is_name(b: &[u8]) -> bool {
        if b.is_empty() || b.len() > MAX_PHASE_NAME || !b[0].is_ascii_lowercase() {
            return false;
        }
        let mut i = 1;
        while i < b.len() {
            if !(b[i].is_ascii_lowercase() || b[i].is_ascii_digit() || b[i] == b'_') {
                return false;
            }
            i += 1;
        }
        true
    }

    /// A name known to be valid, at compile time.
    const fn known(name: &str) -> Phase {
        let src = name.as_bytes();
        assert!(Phase::is_name(src), "a built-in phase name breaks the rule");
        let mut bytes = [0u8; MAX_PHASE_NAME];
        let mut i = 0;
        while i < src.len() {
            bytes[i] = src[i];
            i += 1;
        }
        Phase { bytes }
    }

    /// The name, as used in file names and the API.
    pub fn as_str(&self) -> &str {
        let len = self.bytes.iter().position(|b| *b == 0).unwrap_or(MAX_PHASE_NAME);
        // Only names `is_name` accepted go in: ASCII.
        std::str::from_utf8(&self.bytes[..len]).expect("phase names are ASCII")
    }

    /// Parses a phase name (see [`Phase::is_name`] for the rule).
    pub fn parse(value: &str) -> Result<Self, NameError> {
        let b = value.as_bytes();
        if b.is_empty() {
            return Err(NameError::new("phase", value, "it is empty"));
        }
        if b.len() > MAX_PHASE_NAME {
            return Err(NameError::new("phase", value, format!("it is longer than {MAX_PHASE_NAME} bytes")));
        }
        if !Phase::is_name(b) {
            return Err(NameError::new(
                "phase",
                value,
                "a phase name is a lowercase letter, then lowercase letters, digits or `_`",
            ));
        }
        let mut bytes = [0u8; MAX_PHASE_NAME];
        bytes[..b.len()].copy_from_slice(b);
        Ok(Phase { bytes })
    }
}

impl fmt::Debug for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Phase({})", self.as_str())
    }
}

impl Serialize for Phase {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Phase {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        Phase::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl utoipa::PartialSchema for Phase {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(format!("^[a-z][a-z0-9_]{{0,{}}}$", MAX_PHASE_NAME - 1)))
            .description(Some(
                "A phase of the task: `prolog`, `execute` and `epilog` unless the application declares its own.",
            ))
            .examples([serde_json::json!("execute")])
            .into()
    }
}

impl utoipa::ToSchema for Phase {}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Phase {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definition_names_accept_ordinary_names() {
        for ok in ["sleep", "OpenFOAM-v2312", "pi", "a", "x.y_z-1", "0day"] {
            AppName::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn definition_names_refuse_anything_that_escapes_a_path_segment() {
        let cases = [
            ("", "empty"),
            ("a/b", "`/`"),
            ("..", "`..`"),
            ("a..b", "`..`"),
            ("../etc", "`/`"),
            (".hidden", "start with"),
            ("-rf", "start with"),
            ("tab\there", "control"),
            ("nul\0", "control"),
            ("new\nline", "control"),
            ("with space", "' '"),
            ("ünï", "start with"),
            ("aü", "'ü'"),
            ("a$(id)", "'$'"),
        ];
        for (bad, why) in cases {
            let err = ClusterName::parse(bad).expect_err(bad);
            assert!(err.to_string().contains(why), "{bad:?}: {err}");
        }
        let long = "a".repeat(MAX_NAME_LEN + 1);
        assert!(AppName::parse(&long).unwrap_err().reason.contains("limit is 64"));
        AppName::parse(&"a".repeat(MAX_NAME_LEN)).unwrap();
    }

    #[test]
    fn name_errors_show_control_characters_escaped() {
        let err = AppName::parse("a\nb").unwrap_err();
        assert_eq!(err.shown, "a\\nb");
        assert!(!err.to_string().contains('\n'));
    }

    #[test]
    fn user_names_follow_useradd_rules() {
        UserName::parse("alice").unwrap();
        UserName::parse("_svc-1").unwrap();
        assert!(UserName::parse("Alice").is_err());
        assert!(UserName::parse("1alice").is_err());
        assert!(UserName::parse("al ice").is_err());
        assert!(UserName::parse("root;id").is_err());
        assert!(UserName::parse(&"a".repeat(33)).is_err());
    }

    #[test]
    fn input_names_are_identifiers_and_hpcg_prefix_is_reserved() {
        InputName::parse("sleep").unwrap();
        InputName::parse("input_files").unwrap();
        InputName::parse("_x1").unwrap();
        assert!(InputName::parse("1x").is_err());
        assert!(InputName::parse("a-b").is_err());
        assert!(InputName::parse("HPCG_TASK_ID").unwrap_err().reason.contains("reserved"));
        assert!(InputName::parse("hpcg_mine").unwrap_err().reason.contains("reserved"));
    }

    #[test]
    fn task_ids_are_uuid_v7_and_round_trip() {
        let id = TaskId::new();
        let text = id.to_string();
        assert_eq!(TaskId::parse(&text).unwrap(), id);
        let v4 = "f47ac10b-58cc-4372-a567-0e02b2c3d479";
        assert!(TaskId::parse(v4).unwrap_err().reason.contains("version 4"));
        assert!(TaskId::parse("not-a-uuid").is_err());
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<TaskId>(&json).unwrap(), id);
    }

    #[test]
    fn a_task_is_named_by_its_id_or_its_uri_at_this_site_only() {
        let site = SiteId::parse("hpc.example-1").unwrap();
        let id = TaskId::new();
        let uri = id.uri(&site);
        assert_eq!(uri, format!("hpcforge://hpc.example-1/tasks/{id}"));
        assert_eq!(TaskId::parse_ref(&uri, &site).unwrap(), id);
        assert_eq!(TaskId::parse_ref(&id.to_string(), &site).unwrap(), id);
        let other = TaskId::parse_ref(&id.uri(&SiteId::default()), &site).unwrap_err();
        assert!(other.reason.contains("site `local`; this is site `hpc.example-1`"), "{other}");
        assert!(TaskId::parse_ref("hpcforge://hpc.example-1/jobs/x", &site).is_err());
        assert!(TaskId::parse_ref(&format!("hpcforge://hpc.example-1/tasks/{id}/x"), &site).is_err());
        for bad in ["", "Site", "-a", "a-", "a/b", "a b", &"a".repeat(64)] {
            assert!(SiteId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn task_ids_created_later_sort_later() {
        let a = TaskId::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = TaskId::new();
        assert!(a < b);
        assert!(a.to_string() < b.to_string());
    }

    #[test]
    fn phases_are_identifiers_that_round_trip() {
        assert_eq!(Phase::DEFAULT.map(|p| p.as_str().to_owned()), ["prolog", "execute", "epilog"]);
        for p in Phase::DEFAULT {
            assert_eq!(Phase::parse(p.as_str()).unwrap(), p);
        }
        for ok in ["work1", "post_process", "a", &"x".repeat(MAX_PHASE_NAME)] {
            assert_eq!(Phase::parse(ok).unwrap().as_str(), ok);
        }
        for bad in
            ["", "Execute", "1st", "_x", "a-b", "a b", "a.b", "ünï", "a$(id)", "x\n", &"x".repeat(MAX_PHASE_NAME + 1)]
        {
            assert!(Phase::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(serde_json::to_string(&Phase::EPILOG).unwrap(), "\"epilog\"");
        assert_eq!(serde_json::from_str::<Phase>("\"work2\"").unwrap().as_str(), "work2");
        assert!(serde_json::from_str::<Phase>("\"../x\"").is_err());
        assert_eq!(format!("{:?}", Phase::EXECUTE), "Phase(execute)");
    }
}
