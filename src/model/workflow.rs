//! An application's phases as a graph: what each phase waits for (another phase
//! succeeding, ending whatever the outcome, or failing), declared directly or following
//! from the files phases need and produce; and the checks a declared graph must pass,
//! every problem at once. An application that declares no phases has the default shape,
//! prolog → execute (if it succeeded) → epilog (whatever execute did).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use super::names::Phase;
use super::problems::Problems;

/// The most phases one application may declare. Each becomes a batch job (or array)
/// per task, and a task is one document: a bound keeps both reasonable.
pub const MAX_PHASES: usize = 64;

/// The longest path a phase may declare it needs or produces.
pub const MAX_FILE_PATH: usize = 1024;

/// What a phase waits for another one to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Condition {
    /// It ended with exit status 0 (Slurm's `afterok`).
    Succeeded,
    /// It ended, whatever the outcome, or never ran (Slurm's `afterany`).
    Ended,
    /// It ran and did not succeed (Slurm's `afternotok`): for clean-up and error handlers.
    Failed,
}

impl Condition {
    /// The word used in definitions and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Succeeded => "succeeded",
            Condition::Ended => "ended",
            Condition::Failed => "failed",
        }
    }

    /// The short word scripts use for it: `ok`, `any`, `notok` (the local supervisor's
    /// waits, Grid Engine's `HPCG_AFTER`).
    pub fn script_word(self) -> &'static str {
        match self {
            Condition::Succeeded => "ok",
            Condition::Ended => "any",
            Condition::Failed => "notok",
        }
    }

    /// Whether a phase that ended in `state` did what this condition asks. `failed`
    /// counts every end but success, a phase that never ran included (as Slurm's
    /// `afternotok` counts a job cancelled because its own dependency failed).
    pub fn met_by(self, state: super::task::PhaseState) -> bool {
        use super::task::PhaseState;
        match self {
            Condition::Succeeded => state == PhaseState::Completed,
            Condition::Ended => state.is_final(),
            Condition::Failed => state.is_final() && state != PhaseState::Completed,
        }
    }
}

/// One thing a phase waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, utoipa::ToSchema)]
pub struct Wait {
    /// The phase waited for.
    pub phase: Phase,
    /// What it must have done.
    pub when: Condition,
    /// Frame by frame: each frame of the waiting phase waits for the same frame of
    /// `phase` only (Slurm's `aftercorr`, Grid Engine's `-hold_jid_ad`). Both run per
    /// frame of the same `range` input, packed alike; only `succeeded` is allowed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub per_frame: bool,
}

impl Wait {
    /// A wait for the whole of `phase` to have done `when`.
    pub fn on(phase: Phase, when: Condition) -> Wait {
        Wait { phase, when, per_frame: false }
    }
}

impl<'de> Deserialize<'de> for Wait {
    /// `"prolog"` (waits for it to succeed) or `{ phase = "prolog", when = "ended" }`
    /// (`per_frame = true` to wait frame by frame).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Name(Phase),
            Full {
                phase: Phase,
                #[serde(default = "succeeded")]
                when: Condition,
                #[serde(default)]
                per_frame: bool,
            },
        }
        fn succeeded() -> Condition {
            Condition::Succeeded
        }
        Ok(match Form::deserialize(d)? {
            Form::Name(phase) => Wait::on(phase, Condition::Succeeded),
            Form::Full { phase, when, per_frame } => Wait { phase, when, per_frame },
        })
    }
}

/// A phase as an application declares it (`[[phases]]` in `application.toml`). Its
/// script is `app_<name>`, its resources `[resources.<name>]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseDecl {
    /// Its name: an identifier (`preprocess`, `work1`).
    pub name: Phase,
    /// What it waits for, besides what follows from the files it needs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<Wait>,
    /// Files (relative to the run directory) it reads: it waits for the phase that
    /// produces each one to succeed. A file no phase produces is an input.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    /// Files (relative to the run directory) it writes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub produces: Vec<String>,
    /// Runs once per frame of this `range` input (a job array), not once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames: Option<super::names::InputName>,
    /// With `frames`: at most this many frames' jobs run at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<u32>,
    /// With `frames`: this many frames per job, run side by side (packing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames_per_job: Option<u32>,
}

/// The most frames one job may run side by side.
pub const MAX_FRAMES_PER_JOB: u32 = 1024;

/// Where one wait came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Because {
    /// The application said so (`after`).
    Declared,
    /// The phase needs this file, which the other produces.
    File(String),
}

/// The resolved graph: every phase in declaration order, with all it waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhaseGraph {
    /// (phase, what it waits for, and why), in the order the application declared them.
    phases: Vec<(Phase, Vec<(Wait, Because)>)>,
    /// The files each declared phase needs and produces (none for the default shape).
    files: BTreeMap<Phase, PhaseFiles>,
}

/// The files a phase declares, relative to the run directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PhaseFiles {
    /// What it reads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    /// What it writes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub produces: Vec<String>,
}

impl PhaseFiles {
    /// Whether it declares nothing.
    pub fn is_empty(&self) -> bool {
        self.needs.is_empty() && self.produces.is_empty()
    }
}

impl PhaseGraph {
    /// The shape of an application that declares no phases.
    pub fn default_shape() -> PhaseGraph {
        let w = |phase, when| vec![(Wait::on(phase, when), Because::Declared)];
        PhaseGraph {
            phases: vec![
                (Phase::PROLOG, Vec::new()),
                (Phase::EXECUTE, w(Phase::PROLOG, Condition::Succeeded)),
                (Phase::EPILOG, w(Phase::EXECUTE, Condition::Ended)),
            ],
            files: BTreeMap::new(),
        }
    }

    /// The graph of `decls` (the default shape when there are none), or `None` with
    /// every problem recorded, each under `/phases/<i>/...`.
    pub fn resolve(decls: &[PhaseDecl], problems: &mut Problems) -> Option<PhaseGraph> {
        if decls.is_empty() {
            return Some(PhaseGraph::default_shape());
        }
        let before = problems.len();
        if decls.len() > MAX_PHASES {
            problems.push("/phases", format!("{} phases are declared; at most {MAX_PHASES} are allowed", decls.len()));
        }
        // Where each phase is first declared.
        let mut index: BTreeMap<Phase, usize> = BTreeMap::new();
        for (i, d) in decls.iter().enumerate() {
            if *index.entry(d.name).or_insert(i) != i {
                problems.push(format!("/phases/{i}/name"), format!("phase `{}` is declared twice", d.name));
            }
        }
        // Files: each produced by one phase, written the same way everywhere.
        let mut producer: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, d) in decls.iter().enumerate() {
            for (field, list) in [("needs", &d.needs), ("produces", &d.produces)] {
                for (j, f) in list.iter().enumerate() {
                    if let Err(why) = check_file_path(f) {
                        problems.push(format!("/phases/{i}/{field}/{j}"), why);
                    }
                }
            }
            for (j, f) in d.produces.iter().enumerate() {
                let other = *producer.entry(f.as_str()).or_insert(i);
                if other != i {
                    problems.push(
                        format!("/phases/{i}/produces/{j}"),
                        format!(
                            "phases `{}` and `{}` both produce this file; which one another phase waits for would be a guess",
                            decls[other].name, d.name
                        ),
                    );
                }
            }
        }
        let mut phases = Vec::with_capacity(decls.len());
        for (i, d) in decls.iter().enumerate() {
            let mut waits: Vec<(Wait, Because)> = Vec::new();
            for (j, w) in d.after.iter().enumerate() {
                let pointer = format!("/phases/{i}/after/{j}");
                if w.phase == d.name {
                    problems.push(pointer, format!("phase `{}` waits for itself", d.name));
                } else if !index.contains_key(&w.phase) {
                    problems
                        .push(pointer, format!("phase `{}` waits for `{}`, which is not declared", d.name, w.phase));
                } else if let Some((seen, _)) = waits.iter().find(|(s, _)| s.phase == w.phase) {
                    let why = if seen.when == w.when {
                        "twice".to_owned()
                    } else {
                        format!("both to have {} and to have {}", seen.when.as_str(), w.when.as_str())
                    };
                    problems.push(pointer, format!("phase `{}` waits for `{}` {why}", d.name, w.phase));
                } else {
                    if w.per_frame {
                        check_per_frame(d, &decls[index[&w.phase]], w.when, &pointer, problems);
                    }
                    waits.push((*w, Because::Declared));
                }
            }
            for f in &d.needs {
                let Some(&p) = producer.get(f.as_str()) else { continue };
                let from = decls[p].name;
                // A phase that rewrites its own file, or an explicit wait, decides.
                if from != d.name && !waits.iter().any(|(w, _)| w.phase == from) {
                    waits.push((Wait::on(from, Condition::Succeeded), Because::File(f.clone())));
                }
            }
            phases.push((d.name, waits));
        }
        let files = decls
            .iter()
            .filter(|d| !d.needs.is_empty() || !d.produces.is_empty())
            .map(|d| (d.name, PhaseFiles { needs: d.needs.clone(), produces: d.produces.clone() }))
            .collect();
        let graph = PhaseGraph { phases, files };
        if problems.len() == before
            && let Some(cycle) = graph.find_cycle()
        {
            let first = index[&cycle[0]];
            let shown: Vec<String> = cycle.iter().chain(cycle.first()).map(|p| format!("`{p}`")).collect();
            problems.push(
                format!("/phases/{first}/after"),
                format!("phases wait for each other in a circle, so none of them can start: {}", shown.join(" → ")),
            );
        }
        if problems.len() == before {
            for (p, q) in graph.never_runs() {
                problems.push(
                    format!("/phases/{}/after", index[&p]),
                    format!(
                        "phase `{p}` can never run: through what it waits for, it needs `{q}` both to succeed \
                         and not to succeed"
                    ),
                );
            }
        }
        (problems.len() == before).then_some(graph)
    }

    /// The phases whose waits contradict each other, each with the phase it would need
    /// both to succeed and not to: `x` after `a` succeeded and after `h`, where `h`
    /// runs only if `a` failed. Only the first phase of such a chain is named (those
    /// that wait for its success inherit the contradiction). No cycles (checked first).
    fn never_runs(&self) -> Vec<(Phase, Phase)> {
        // What must hold for `p` to run: phases that must succeed, phases that must not.
        fn needs(g: &PhaseGraph, p: Phase, ok: &mut BTreeSet<Phase>, not_ok: &mut BTreeSet<Phase>) {
            for w in g.waits_of(p) {
                match w.when {
                    Condition::Succeeded => {
                        if ok.insert(w.phase) {
                            needs(g, w.phase, ok, not_ok);
                        }
                    }
                    Condition::Failed => {
                        not_ok.insert(w.phase);
                    }
                    Condition::Ended => {}
                }
            }
        }
        let contradiction = |p: Phase| {
            let (mut ok, mut not_ok) = (BTreeSet::new(), BTreeSet::new());
            needs(self, p, &mut ok, &mut not_ok);
            ok.intersection(&not_ok).next().copied()
        };
        let mut out = Vec::new();
        for p in self.phases() {
            let Some(q) = contradiction(p) else { continue };
            let inherited =
                self.waits_of(p).iter().any(|w| w.when == Condition::Succeeded && contradiction(w.phase).is_some());
            if !inherited {
                out.push((p, q));
            }
        }
        out
    }

    /// The graph a task recorded: each phase with what it waits for (no reasons; the
    /// application's definition has those). The task was created from a resolved
    /// graph, so there is no cycle.
    pub fn from_waits(phases: impl IntoIterator<Item = (Phase, Vec<Wait>)>) -> PhaseGraph {
        PhaseGraph {
            phases: phases
                .into_iter()
                .map(|(p, w)| (p, w.into_iter().map(|w| (w, Because::Declared)).collect()))
                .collect(),
            files: BTreeMap::new(),
        }
    }

    /// The files `phase` declares it needs and produces.
    pub fn files_of(&self, phase: Phase) -> PhaseFiles {
        self.files.get(&phase).cloned().unwrap_or_default()
    }

    /// The phases as a message lists them: `` `prolog`, `execute`, `epilog` ``.
    pub fn names_listed(&self) -> String {
        self.phases.iter().map(|(p, _)| format!("`{p}`")).collect::<Vec<_>>().join(", ")
    }

    /// The phases, in the order they were declared.
    pub fn phases(&self) -> Vec<Phase> {
        self.phases.iter().map(|(p, _)| *p).collect()
    }

    /// What `phase` waits for (empty for a phase it does not have).
    pub fn waits_of(&self, phase: Phase) -> Vec<Wait> {
        self.phases
            .iter()
            .find(|(p, _)| *p == phase)
            .map(|(_, w)| w.iter().map(|(w, _)| *w).collect())
            .unwrap_or_default()
    }

    /// Why `phase` waits for `other`, in words (`declared`, or the file).
    pub fn reason(&self, phase: Phase, other: Phase) -> Option<String> {
        let (_, waits) = self.phases.iter().find(|(p, _)| *p == phase)?;
        waits.iter().find(|(w, _)| w.phase == other).map(|(_, b)| match b {
            Because::Declared => "declared".to_owned(),
            Because::File(f) => format!("it needs `{f}`, which `{other}` produces"),
        })
    }

    /// The phases that (directly or through others) wait for `phase`, in declaration
    /// order, without `phase` itself.
    pub fn downstream(&self, phase: Phase) -> Vec<Phase> {
        let mut reached: BTreeSet<Phase> = BTreeSet::from([phase]);
        // Declaration order is not always an order of waits; repeat until nothing new.
        loop {
            let before = reached.len();
            for (p, waits) in &self.phases {
                if waits.iter().any(|(w, _)| reached.contains(&w.phase)) {
                    reached.insert(*p);
                }
            }
            if reached.len() == before {
                break;
            }
        }
        self.phases().into_iter().filter(|p| *p != phase && reached.contains(p)).collect()
    }

    /// The phases in an order where each comes after all it waits for (declaration
    /// order among equals). The graph has no cycle (checked when resolved).
    pub fn run_order(&self) -> Vec<Phase> {
        let mut done: Vec<Phase> = Vec::with_capacity(self.phases.len());
        while done.len() < self.phases.len() {
            let next = self
                .phases
                .iter()
                .find(|(p, waits)| !done.contains(p) && waits.iter().all(|(w, _)| done.contains(&w.phase)));
            match next {
                Some((p, _)) => done.push(*p),
                None => break, // a cycle: resolve refuses those
            }
        }
        done
    }

    /// A cycle of waits, if there is one, as the phases around it.
    fn find_cycle(&self) -> Option<Vec<Phase>> {
        // Depth-first, with the path kept: a wait on a phase on the path closes a circle.
        fn visit(
            g: &PhaseGraph,
            p: Phase,
            path: &mut Vec<Phase>,
            finished: &mut BTreeSet<Phase>,
        ) -> Option<Vec<Phase>> {
            if let Some(at) = path.iter().position(|q| *q == p) {
                return Some(path[at..].to_vec());
            }
            if finished.contains(&p) {
                return None;
            }
            path.push(p);
            for w in g.waits_of(p) {
                if let Some(c) = visit(g, w.phase, path, finished) {
                    return Some(c);
                }
            }
            path.pop();
            finished.insert(p);
            None
        }
        let mut finished = BTreeSet::new();
        for p in self.phases() {
            if let Some(mut cycle) = visit(self, p, &mut Vec::new(), &mut finished) {
                // Said in the direction things would run: each phase before the one
                // that waits for it.
                cycle.reverse();
                return Some(cycle);
            }
        }
        None
    }
}

impl fmt::Display for PhaseGraph {
    /// `prolog; execute after prolog succeeded; epilog after execute ended`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .phases
            .iter()
            .map(|(p, waits)| {
                if waits.is_empty() {
                    p.to_string()
                } else {
                    let w: Vec<String> = waits
                        .iter()
                        .map(|(w, _)| {
                            format!("{} {}{}", w.phase, w.when.as_str(), if w.per_frame { " per frame" } else { "" })
                        })
                        .collect();
                    format!("{p} after {}", w.join(", "))
                }
            })
            .collect();
        f.write_str(&parts.join("; "))
    }
}

/// A frame-by-frame wait of `d` on `on`: both run per frame of the same input, packed
/// alike (so element `i` of one is element `i` of the other), on success only.
fn check_per_frame(d: &PhaseDecl, on: &PhaseDecl, when: Condition, pointer: &str, problems: &mut Problems) {
    let (Some(mine), Some(theirs)) = (&d.frames, &on.frames) else {
        problems.push(
            pointer,
            format!(
                "`per_frame` needs both phases to run per frame (`frames`); `{}` does not, so wait for it as a whole",
                if d.frames.is_none() { d.name } else { on.name }
            ),
        );
        return;
    };
    if mine != theirs {
        problems.push(
            pointer,
            format!(
                "`{}` runs per frame of `{mine}` and `{}` per frame of `{theirs}`; frame by frame, both must run over the \
                 same input",
                d.name, on.name
            ),
        );
    } else if d.frames_per_job.unwrap_or(1) != on.frames_per_job.unwrap_or(1) {
        problems.push(
            pointer,
            format!(
                "`{}` packs {} frames per job and `{}` {}; frame by frame, both must pack alike (job i of one runs the \
                 frames of job i of the other)",
                d.name,
                d.frames_per_job.unwrap_or(1),
                on.name,
                on.frames_per_job.unwrap_or(1)
            ),
        );
    }
    if when != Condition::Succeeded {
        problems.push(
            pointer,
            format!(
                "a frame-by-frame wait is on success only (as Slurm's `aftercorr`); to wait for `{}` to have {}, wait \
                 for the whole phase",
                on.name,
                when.as_str()
            ),
        );
    }
}

/// A path a phase needs or produces: relative to the run directory, inside it, and
/// plain enough to land in a script and a message.
fn check_file_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("the path is empty".into());
    }
    if path.len() > MAX_FILE_PATH {
        return Err(format!("the path is longer than {MAX_FILE_PATH} bytes"));
    }
    if let Some(c) = path.chars().find(|c| c.is_control()) {
        return Err(format!("the path contains the control character {c:?}"));
    }
    if path.starts_with('/') || path.starts_with('~') {
        return Err("the path must be relative to the run directory".into());
    }
    let segments: Vec<&str> = path.split('/').collect();
    if segments.contains(&"..") {
        return Err("the path leaves the run directory (`..`)".into());
    }
    if segments.iter().any(|s| s.is_empty() || *s == ".") {
        return Err("the path has an empty or `.` segment; write it plainly (`out/a.dat`)".into());
    }
    if segments[0] == ".hpcforge" {
        return Err("`.hpcforge/` is hpcforge's own part of the run directory".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
