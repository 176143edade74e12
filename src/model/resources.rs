//! What a phase asks the scheduler for: CPUs, memory, wall time, partition, account.
//!
//! Every value here can end up on a scheduler directive line (`#SBATCH --time=...`),
//! which the shell never parses, so quoting cannot protect it. Each type therefore
//! parses into a canonical form that contains no character a directive could misuse.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::names::Phase;

/// Why a resource value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ResourceError(String);

/// A wall-clock limit, kept in seconds, written as Slurm's `D-HH:MM:SS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WallTime(u64);

impl WallTime {
    /// Accepts `HH:MM:SS` and `D-HH:MM:SS` (hours may exceed 24 without a day part).
    ///
    /// Bare numbers are refused on purpose: Slurm reads `30` as minutes and PBS as
    /// seconds, and a definition must mean the same thing on every scheduler.
    pub fn parse(value: &str) -> Result<Self, ResourceError> {
        let bad = |why: &str| {
            ResourceError(format!(
                "wall time `{}` is not valid: {why}; write `HH:MM:SS` or `D-HH:MM:SS`, e.g. `01:30:00`",
                value.escape_debug()
            ))
        };
        let (days, clock) = match value.split_once('-') {
            Some((d, rest)) => (parse_digits(d).ok_or_else(|| bad("the day part is not a number"))?, rest),
            None => (0, value),
        };
        let parts: Vec<&str> = clock.split(':').collect();
        if parts.len() != 3 {
            return Err(bad("expected three `:`-separated fields"));
        }
        let h = parse_digits(parts[0]).ok_or_else(|| bad("hours are not a number"))?;
        let m = parse_digits(parts[1]).filter(|_| parts[1].len() == 2).ok_or_else(|| bad("minutes need two digits"))?;
        let s = parse_digits(parts[2]).filter(|_| parts[2].len() == 2).ok_or_else(|| bad("seconds need two digits"))?;
        if m >= 60 || s >= 60 {
            return Err(bad("minutes and seconds must be below 60"));
        }
        if days > 0 && h >= 24 {
            return Err(bad("with a day part, hours must be below 24"));
        }
        let total = days
            .checked_mul(86_400)
            .and_then(|d| h.checked_mul(3600).and_then(|h| d.checked_add(h)))
            .and_then(|t| t.checked_add(m * 60 + s))
            .ok_or_else(|| bad("it is too large"))?;
        if total == 0 {
            return Err(bad("it is zero"));
        }
        Ok(Self(total))
    }

    /// A limit of `secs` seconds.
    pub fn from_secs(secs: u64) -> Self {
        Self(secs)
    }

    /// The limit in seconds.
    pub fn as_secs(self) -> u64 {
        self.0
    }
}

fn parse_digits(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 9 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl fmt::Display for WallTime {
    /// Slurm's `D-HH:MM:SS`, or `HH:MM:SS` under a day.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (d, rest) = (self.0 / 86_400, self.0 % 86_400);
        let (h, m, s) = (rest / 3600, rest % 3600 / 60, rest % 60);
        if d > 0 { write!(f, "{d}-{h:02}:{m:02}:{s:02}") } else { write!(f, "{h:02}:{m:02}:{s:02}") }
    }
}

/// An amount of memory, kept in MiB, written as Slurm's `<n>M` / `<n>G`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Memory(u64);

impl Memory {
    /// Accepts an integer with a unit: `K`, `M`, `G` or `T` (binary multiples, as Slurm
    /// reads them), e.g. `512M`, `4G`. A bare number is refused: schedulers disagree on
    /// its unit.
    pub fn parse(value: &str) -> Result<Self, ResourceError> {
        let bad = |why: &str| {
            ResourceError(format!(
                "memory `{}` is not valid: {why}; write a whole number with a unit K, M, G or T, e.g. `512M` or `4G`",
                value.escape_debug()
            ))
        };
        let split = value.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| bad("the unit is missing"))?;
        let (num, unit) = value.split_at(split);
        let n = parse_digits(num).ok_or_else(|| bad("the amount is not a whole number"))?;
        let mib = match unit {
            "K" | "k" | "KB" | "KiB" => {
                if n % 1024 != 0 {
                    return Err(bad("kibibytes must be a multiple of 1024"));
                }
                Some(n / 1024)
            }
            "M" | "m" | "MB" | "MiB" => Some(n),
            "G" | "g" | "GB" | "GiB" => n.checked_mul(1024),
            "T" | "t" | "TB" | "TiB" => n.checked_mul(1024 * 1024),
            _ => return Err(bad("unknown unit")),
        }
        .ok_or_else(|| bad("it is too large"))?;
        if mib == 0 {
            return Err(bad("it is zero"));
        }
        Ok(Self(mib))
    }

    /// An amount of `mib` MiB.
    pub fn from_mib(mib: u64) -> Self {
        Self(mib)
    }

    /// The amount in MiB.
    pub fn as_mib(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1024) { write!(f, "{}G", self.0 / 1024) } else { write!(f, "{}M", self.0) }
    }
}

/// A partition (queue) or account name as schedulers accept them: letters, digits,
/// `_`, `.` and `-`, at most 64 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SchedulerToken(String);

impl SchedulerToken {
    /// Parses a partition, queue or account name.
    pub fn parse(value: &str) -> Result<Self, ResourceError> {
        let ok = !value.is_empty()
            && value.len() <= 64
            && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            && !value.starts_with('-');
        if ok {
            Ok(Self(value.to_owned()))
        } else {
            Err(ResourceError(format!(
                "`{}` is not a valid partition or account name: use letters, digits, `_`, `.` and `-` \
                 (not first), at most 64 characters",
                value.escape_debug()
            )))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SchedulerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! string_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                <$t>::parse(&s).map_err(serde::de::Error::custom)
            }
        }
        impl FromStr for $t {
            type Err = ResourceError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                <$t>::parse(s)
            }
        }
    };
}
string_serde!(WallTime);
string_serde!(Memory);
string_serde!(SchedulerToken);

/// Largest CPU count a definition may ask for in one job. Far above any single node;
/// it only stops typos like `cpus = 40000000`.
pub const MAX_CPUS: u32 = 100_000;

/// What one phase job asks for. Unset fields fall back to the application's
/// `default` resources, then to the cluster's defaults (see [`PhaseResources::for_phase`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPUs for the job's single task (`--cpus-per-task`).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "cpus")]
    pub cpus: Option<u32>,
    /// Memory for the job (`--mem`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Memory>,
    /// Wall-clock limit (`--time`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub walltime: Option<WallTime>,
    /// Partition (Slurm) or queue (PBS, SGE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<SchedulerToken>,
    /// Account charged for the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<SchedulerToken>,
    /// Licences the job holds while it is queued or runs, by pool name
    /// (`licences = { maya = 2 }`): the engine starts the task only when they are free
    /// (docs/definitions.md, "Licences and the queue"). A phase's own table replaces
    /// the default's whole.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "licences")]
    pub licences: BTreeMap<super::names::LicenceName, u32>,
}

/// Most of one licence a phase may ask for.
pub const MAX_LICENCES: u32 = 100_000;

fn licences<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<super::names::LicenceName, u32>, D::Error> {
    let m = BTreeMap::<super::names::LicenceName, u32>::deserialize(d)?;
    if let Some((name, n)) = m.iter().find(|(_, n)| **n == 0 || **n > MAX_LICENCES) {
        return Err(serde::de::Error::custom(format!(
            "licence `{name}`: ask for between 1 and {MAX_LICENCES}, not {n}"
        )));
    }
    Ok(m)
}

fn cpus<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let n = u32::deserialize(d)?;
    if n == 0 || n > MAX_CPUS {
        return Err(serde::de::Error::custom(format!("cpus must be between 1 and {MAX_CPUS}, not {n}")));
    }
    Ok(Some(n))
}

impl Resources {
    /// Fills every unset field of `self` from `fallback`.
    pub fn or(&self, fallback: &Resources) -> Resources {
        Resources {
            cpus: self.cpus.or(fallback.cpus),
            memory: self.memory.or(fallback.memory),
            walltime: self.walltime.or(fallback.walltime),
            partition: self.partition.clone().or_else(|| fallback.partition.clone()),
            account: self.account.clone().or_else(|| fallback.account.clone()),
            licences: if self.licences.is_empty() { fallback.licences.clone() } else { self.licences.clone() },
        }
    }
}

/// Resources per phase, with a shared default: `[resources.default]`, then one table
/// per phase name (`[resources.execute]`, `[resources.work1]`).
///
/// ```toml
/// [resources.default]
/// cpus = 1
/// walltime = "00:10:00"
/// [resources.execute]
/// cpus = 4
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PhaseResources {
    /// Applies to every phase unless the phase's own table overrides a field.
    pub default: Resources,
    /// Each phase's own table. Which names are phases is the application's to say
    /// (checked with the definition: a table for a phase it does not have is refused).
    pub phases: BTreeMap<Phase, Resources>,
}

/// The table that is not a phase's.
pub const DEFAULT_RESOURCES: &str = "default";

impl Serialize for PhaseResources {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let own: Vec<(&Phase, &Resources)> = self.phases.iter().filter(|(_, r)| !is_default(r)).collect();
        let mut m = s.serialize_map(Some(own.len() + usize::from(!is_default(&self.default))))?;
        if !is_default(&self.default) {
            m.serialize_entry(DEFAULT_RESOURCES, &self.default)?;
        }
        for (p, r) in own {
            m.serialize_entry(p.as_str(), r)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for PhaseResources {
    /// `default` or a phase name (an identifier), each a [`Resources`] table.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let tables = BTreeMap::<String, Resources>::deserialize(d)?;
        let mut out = PhaseResources::default();
        for (name, r) in tables {
            if name == DEFAULT_RESOURCES {
                out.default = r;
            } else {
                let phase = Phase::parse(&name).map_err(|e| {
                    serde::de::Error::custom(format!(
                        "`[resources.{}]`: {e}; a resources table is `default` or a phase's name",
                        name.escape_debug()
                    ))
                })?;
                out.phases.insert(phase, r);
            }
        }
        Ok(out)
    }
}

fn is_default(r: &Resources) -> bool {
    *r == Resources::default()
}

impl PhaseResources {
    /// The resources of `phase`: its own table, then `default`.
    pub fn for_phase(&self, phase: Phase) -> Resources {
        match self.phases.get(&phase) {
            Some(own) => own.or(&self.default),
            None => self.default.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_times_parse_to_seconds_and_print_as_slurm_writes_them() {
        for (text, secs, shown) in [
            ("00:00:30", 30, "00:00:30"),
            ("01:30:00", 5400, "01:30:00"),
            ("36:00:00", 129_600, "1-12:00:00"),
            ("2-03:04:05", 2 * 86_400 + 3 * 3600 + 4 * 60 + 5, "2-03:04:05"),
        ] {
            let w = WallTime::parse(text).unwrap();
            assert_eq!(w.as_secs(), secs, "{text}");
            assert_eq!(w.to_string(), shown, "{text}");
        }
    }

    #[test]
    fn wall_times_refuse_ambiguous_and_hostile_text() {
        for bad in [
            "30",
            "",
            "1:2:3",
            "00:60:00",
            "00:00:60",
            "1-24:00:00",
            "00:00:00",
            "-1:00:00",
            "00:10:00\n#SBATCH",
            "00:10:00 --wrap=id",
            "a-00:00:01",
            "99999999999:00:00",
        ] {
            let err = WallTime::parse(bad).expect_err(bad);
            assert!(err.to_string().contains("HH:MM:SS"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn memory_parses_units_as_slurm_does() {
        assert_eq!(Memory::parse("512M").unwrap().as_mib(), 512);
        assert_eq!(Memory::parse("4G").unwrap().as_mib(), 4096);
        assert_eq!(Memory::parse("1T").unwrap().as_mib(), 1024 * 1024);
        assert_eq!(Memory::parse("2048K").unwrap().as_mib(), 2);
        assert_eq!(Memory::parse("4G").unwrap().to_string(), "4G");
        assert_eq!(Memory::parse("1536M").unwrap().to_string(), "1536M");
        for bad in ["4", "G", "4X", "0M", "1.5G", "4G;id", "1000K", "-4G"] {
            assert!(Memory::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn partition_names_cannot_smuggle_options() {
        SchedulerToken::parse("debug").unwrap();
        SchedulerToken::parse("gpu-a100.long_q").unwrap();
        for bad in ["", "-p", "debug --wrap=id", "a\nb", "a;b", "a'b", &"x".repeat(65)] {
            assert!(SchedulerToken::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn phase_resources_fall_back_field_by_field_to_the_default() {
        let r: PhaseResources = toml::from_str(
            r#"
            [default]
            cpus = 1
            walltime = "00:10:00"
            partition = "debug"
            [execute]
            cpus = 4
            memory = "2G"
            "#,
        )
        .unwrap();
        let exec = r.for_phase(Phase::EXECUTE);
        assert_eq!(exec.cpus, Some(4));
        assert_eq!(exec.memory, Some(Memory::from_mib(2048)));
        assert_eq!(exec.walltime, Some(WallTime::from_secs(600)));
        assert_eq!(exec.partition.as_ref().map(|p| p.as_str()), Some("debug"));
        let pro = r.for_phase(Phase::PROLOG);
        assert_eq!(pro.cpus, Some(1));
        assert_eq!(pro.memory, None);
    }

    #[test]
    fn any_phase_name_has_its_own_table_and_the_rest_are_refused() {
        let r: PhaseResources = toml::from_str("[default]\ncpus = 1\n[work1]\ncpus = 18\n").unwrap();
        assert_eq!(r.for_phase(Phase::parse("work1").unwrap()).cpus, Some(18));
        assert_eq!(r.for_phase(Phase::parse("work2").unwrap()).cpus, Some(1));
        let back: PhaseResources = toml::from_str(&toml::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        let err = toml::from_str::<PhaseResources>("[Work-1]\ncpus = 2\n").unwrap_err().to_string();
        assert!(err.contains("`[resources.Work-1]`") && err.contains("phase"), "{err}");
    }

    #[test]
    fn resources_refuse_unknown_fields_and_zero_cpus() {
        let err = toml::from_str::<Resources>("cpu = 4").unwrap_err().to_string();
        assert!(err.contains("unknown field `cpu`"), "{err}");
        let err = toml::from_str::<Resources>("cpus = 0").unwrap_err().to_string();
        assert!(err.contains("between 1 and"), "{err}");
    }
}
