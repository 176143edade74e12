//! Files of `file` inputs, in the portal's format: where a file lives (path and
//! server), how it reaches the run directory (`COPY`), and the mode of the copy.

use serde::{Deserialize, Serialize};

use super::problems::Problems;

/// What to do with a file of a `file` input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum FileAction {
    /// Copy the file into the run directory, as the task's user.
    #[serde(rename = "COPY")]
    Copy,
}

/// The permissions of a staged copy. Portals write them two ways: octal (`"0644"`,
/// `"644"`) or as `ls -l` shows them (`"-rw-r--r--"`, ten characters, the first the
/// file type). Only the nine permission bits are kept; set-user-ID, set-group-ID and
/// sticky bits are never given to a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMode(u32);

impl FileMode {
    /// Reads either form; says why not.
    pub fn parse(text: &str) -> Result<Self, String> {
        let octal = (3..=4).contains(&text.len()) && text.bytes().all(|b| (b'0'..=b'7').contains(&b));
        if octal {
            let bits = u32::from_str_radix(text, 8).map_err(|e| e.to_string())?;
            return Ok(Self(bits & 0o777));
        }
        let b = text.as_bytes();
        if b.len() != 10 || !text.is_ascii() {
            return Err(format!(
                "`{}` is not a mode: write it in octal (\"0644\") or as `ls -l` shows it (\"-rw-r--r--\")",
                text.escape_debug()
            ));
        }
        if b[0] != b'-' {
            return Err(format!(
                "`{}` is the mode of a {}, not of a regular file; only files can be staged",
                text.escape_debug(),
                match b[0] {
                    b'd' => "directory",
                    b'l' => "symbolic link",
                    _ => "special file",
                }
            ));
        }
        let mut bits = 0;
        // Each triple: r, w, then x (or s/S/t/T, whose lowercase form also means x).
        for (i, c) in b[1..].iter().enumerate() {
            let (want, exec_forms): (u8, &[u8]) = match i % 3 {
                0 => (b'r', b""),
                1 => (b'w', b""),
                _ => (b'x', if i == 8 { b"tT" } else { b"sS" }),
            };
            let bit = 1 << (8 - i);
            if *c == want || (i % 3 == 2 && exec_forms.first().is_some_and(|l| l == c)) {
                bits |= bit;
            } else if *c != b'-' && !(i % 3 == 2 && exec_forms.contains(c)) {
                return Err(format!(
                    "`{}` is not a mode: character {} should be `{}` or `-`",
                    text.escape_debug(),
                    i + 2,
                    want as char
                ));
            }
        }
        Ok(Self(bits))
    }

    /// The permission bits (0..=0o777).
    pub fn bits(self) -> u32 {
        self.0
    }

    /// Whether the owner can read a file with this mode.
    pub fn owner_can_read(self) -> bool {
        self.0 & 0o400 != 0
    }

    /// This mode with the owner's read bit added: the job runs as the owner and must
    /// be able to read its own input.
    pub fn readable_by_owner(self) -> Self {
        Self(self.0 | 0o400)
    }

    /// As `ls -l` shows a regular file with this mode.
    pub fn symbolic(self) -> String {
        let mut s = String::from("-");
        for i in 0..9 {
            let on = self.0 & (1 << (8 - i)) != 0;
            s.push(if on { b"rwx"[i % 3] as char } else { '-' });
        }
        s
    }
}

impl std::fmt::Display for FileMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl Serialize for FileMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FileMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        FileMode::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl utoipa::PartialSchema for FileMode {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some("Octal permissions, e.g. `0644`."))
            .into()
    }
}

impl utoipa::ToSchema for FileMode {}

/// Where a file lives, as the portal identifies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileServer {
    /// The portal's ID of the server (a cluster name for files on a cluster).
    pub id: String,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// One file of a `file` input, in the portal's format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// How the file reaches the run directory.
    pub action: FileAction,
    /// Absolute path of the file where it lives.
    pub path: String,
    /// Permissions to give the staged copy: octal (`"0644"`) or as `ls -l` shows them
    /// (`"-rw-r--r--"`); see [`FileMode`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mods: Option<String>,
    /// Size in bytes, as the portal saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Where the file lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<FileServer>,
}

/// Longest path a file entry may name (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;

impl FileEntry {
    /// Checks the entry; problems are reported under `pointer`.
    pub fn check(&self, pointer: &str, problems: &mut Problems) {
        if let Err(why) = check_absolute_path(&self.path) {
            problems.push(format!("{pointer}/path"), why);
        }
        if let Some(mods) = &self.mods
            && let Err(why) = FileMode::parse(mods)
        {
            problems.push(format!("{pointer}/mods"), why);
        }
        if let Some(server) = &self.server
            && (server.id.is_empty() || server.id.chars().any(char::is_control))
        {
            problems.push(format!("{pointer}/server/id"), "must be a non-empty name without control characters");
        }
    }
}

/// Checks a path that a file entry names: absolute, no `.`/`..` segments, no control
/// characters, bounded length. Returns why not.
pub fn check_absolute_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("`{}` is not an absolute path", path.escape_debug()));
    }
    if path.len() > MAX_PATH_LEN {
        return Err(format!("the path is {} bytes long; the limit is {MAX_PATH_LEN}", path.len()));
    }
    if let Some(c) = path.chars().find(|c| c.is_control()) {
        return Err(format!("the path contains the control character {c:?}"));
    }
    if path.split('/').any(|seg| seg == ".." || seg == ".") {
        return Err(format!("`{}` contains a `.` or `..` segment", path.escape_debug()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_read_both_ways_portals_write_them() {
        for (text, bits) in
            [("0644", 0o644), ("755", 0o755), ("-rw-r--r--", 0o644), ("----------", 0), ("-rwsr-sr-t", 0o755)]
        {
            assert_eq!(FileMode::parse(text).unwrap().bits(), bits, "{text}");
        }
        assert_eq!(FileMode::parse("-rwSr-Sr-T").unwrap().bits(), 0o644, "capital S/T: the bit without x");
        assert_eq!(FileMode::parse("----------").unwrap().readable_by_owner().symbolic(), "-r--------");
        assert_eq!(FileMode::parse("0640").unwrap().to_string(), "0640");
        assert!(!FileMode::parse("--w-------").unwrap().owner_can_read());
        for bad in
            ["", "0", "08", "12345", "rw-r--r--", "-rw-r--r-", "drwxr-xr-x", "lrwxrwxrwx", "-rw-r--r-X", "-ｒw-r--r--"]
        {
            assert!(FileMode::parse(bad).is_err(), "{bad:?}");
        }
    }
}
