//! From a compiled application and cluster, validated inputs and who/where, to one
//! standalone script per phase.
//!
//! Why this file is long: about 610 lines of code (compiling definitions, checking
//! resources against limits, rendering, checking directive lines), one path from
//! definitions to scripts that reads in order; the rest are its unit tests.
//!
//! Each phase script is the cluster's template with `HPCG_PAYLOAD` replaced by a
//! generated body that:
//! 1. exports the built-ins and every input (`HPCG_INPUT_<name>`), shell-quoted;
//! 2. enters the run directory and writes the posting helpers (`super::posts`);
//! 3. writes the application's cluster environment to the run directory through a
//!    quoted here-document and sources it;
//! 4. writes the application script the same way and runs it, the helpers first on
//!    `PATH`, with the interpreter its `#!` line names (so it works on `noexec` file
//!    systems too).
//!
//! Here-document delimiters carry a hash of their content, and values cannot hold
//! newlines, so no value can end a here-document early.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use tera::{Context, Tera, Value as TeraValue};

use super::inputs::{InputValidator, InputValue, ValidatedInputs};
use crate::definitions::markup::{self, Interpreter};
use crate::definitions::script::sha256_hex;
use crate::definitions::{COMMON_TEMPLATE, app_script_path, cluster_env_path, template_path};
pub use crate::model::task::{Forged, ForgedScript};
use crate::model::workflow::PhaseGraph;
use crate::model::{
    AppName, ApplicationSpec, ClusterName, ClusterSpec, DefinitionRef, Memory, Phase, Problems, Resources,
    SchedulerKind, TaskId, UserName,
};
use crate::scheduler::{self, Scheduler};
use crate::shell::{heredoc, shell_quote};

/// Largest forged script: 4 MiB, Slurm's default `max_script_size`.
pub const MAX_FORGED_BYTES: usize = 4 << 20;

/// Values longer than this are not exported as `HPCG_INPUT_<name>`: Linux refuses a
/// single environment string over 128 KiB when the next program starts. They are
/// written to `$HPCG_RUN_DIR/.hpcforge/input_<name>` instead, named by
/// `HPCG_INPUT_<name>_FILE`. Markup still carries the whole value.
pub const MAX_EXPORTED_VALUE: usize = 64 << 10;

/// Where the forged script keeps what it writes, inside the run directory.
pub const HPCFORGE_DIR: &str = ".hpcforge";

/// An application version, ready to forge from: specs, validator and parsed scripts.
pub struct CompiledApp {
    /// Name.
    pub name: AppName,
    /// Version.
    pub version: u32,
    /// The definition.
    pub spec: ApplicationSpec,
    /// The compiled input validator.
    pub validator: InputValidator,
    /// Its phases and what each waits for.
    pub graph: PhaseGraph,
    scripts: Tera,
    interpreters: BTreeMap<Phase, Interpreter>,
    environments: BTreeSet<String>,
    /// Scripts (by path) whose markup uses nothing phase-specific: rendered once per task.
    phase_free: BTreeSet<String>,
}

/// Built-ins whose value differs between the phases of one task.
const PHASE_BUILTINS: &[&str] = &[
    "HPCG_PHASE",
    "HPCG_JOB_TAG",
    "HPCG_CPUS",
    "HPCG_MEMORY",
    "HPCG_WALLTIME",
    "HPCG_PARTITION",
    "HPCG_ACCOUNT",
    "HPCG_LICENSES",
];

impl std::fmt::Debug for CompiledApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledApp").field("name", &self.name).field("version", &self.version).finish()
    }
}

/// A cluster version, ready to forge with: its definition and parsed templates.
pub struct CompiledCluster {
    /// Name.
    pub name: ClusterName,
    /// Version.
    pub version: u32,
    /// The definition.
    pub spec: ClusterSpec,
    templates: Tera,
    phase_templates: BTreeSet<Phase>,
    /// How its scheduler's scripts are written (directives, job-ID variable, formats).
    dialect: Box<dyn Scheduler>,
}

impl std::fmt::Debug for CompiledCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledCluster").field("name", &self.name).field("version", &self.version).finish()
    }
}

fn definition_problem(what: &str, e: impl std::fmt::Display) -> Problems {
    let mut p = Problems::default();
    p.push_rule("", "definition", None, format!("{what} cannot be used: {e}"));
    p
}

impl CompiledApp {
    /// Compiles application `spec` at `version` with its files (path → text).
    pub fn compile(spec: ApplicationSpec, version: u32, files: &BTreeMap<String, String>) -> Result<Self, Problems> {
        let what = format!("application `{}` version {version}", spec.name);
        let validator = InputValidator::compile(&spec).map_err(|e| definition_problem(&what, e))?;
        let graph = spec.graph().map_err(|e| definition_problem(&what, e))?;
        let mut scripts = markup::script_engine();
        let mut interpreters = BTreeMap::new();
        for phase in graph.phases() {
            let path = app_script_path(phase);
            let text = files.get(&path).ok_or_else(|| definition_problem(&what, format!("it has no {path}")))?;
            let interp =
                Interpreter::of(text).ok_or_else(|| definition_problem(&what, format!("{path} has no #! line")))?;
            interpreters.insert(phase, interp);
        }
        let mut environments = BTreeSet::new();
        for (path, text) in files {
            // Stored before the allow-list existed, perhaps: refused here too.
            if let Some((line, why)) = crate::definitions::filters::check(text, false).into_iter().next() {
                return Err(definition_problem(&format!("{what}, {path}"), format!("line {line}: {why}")));
            }
            scripts
                .add_raw_template(path, text)
                .map_err(|e| definition_problem(&format!("{what}, {path}"), markup::tera_message(&e)))?;
            if let Some(c) = path.strip_prefix("cluster/") {
                environments.insert(c.to_owned());
            }
        }
        let phase_free = files
            .keys()
            .filter(|path| {
                scripts.get_template_variables(path).is_ok_and(|vars| !vars.iter().any(|v| PHASE_BUILTINS.contains(v)))
            })
            .cloned()
            .collect();
        Ok(Self {
            name: spec.name.clone(),
            version,
            spec,
            validator,
            graph,
            scripts,
            interpreters,
            environments,
            phase_free,
        })
    }

    /// The clusters this application has an environment for.
    pub fn clusters(&self) -> impl Iterator<Item = &str> {
        self.environments.iter().map(String::as_str)
    }
}

impl CompiledCluster {
    /// Compiles cluster `spec` at `version` with its files (`forge/script_*` → text).
    pub fn compile(spec: ClusterSpec, version: u32, files: &BTreeMap<String, String>) -> Result<Self, Problems> {
        let what = format!("cluster `{}` version {version}", spec.name);
        let mut templates = markup::template_engine();
        for (path, text) in files {
            if let Some((line, why)) = crate::definitions::filters::check(text, true).into_iter().next() {
                return Err(definition_problem(&format!("{what}, {path}"), format!("line {line}: {why}")));
            }
        }
        let named = files.iter().filter_map(|(p, t)| p.strip_prefix("forge/").map(|n| (n, t.as_str())));
        templates.add_raw_templates(named).map_err(|e| definition_problem(&what, markup::tera_message(&e)))?;
        if !files.contains_key(COMMON_TEMPLATE) {
            return Err(definition_problem(&what, "it has no forge/script_common"));
        }
        // A template for any phase name: the cluster does not know which applications
        // will declare which phases.
        let phase_templates = files
            .keys()
            .filter_map(|path| path.strip_prefix("forge/script_").and_then(|p| Phase::parse(p).ok()))
            .filter(|p| files.contains_key(&template_path(*p)))
            .collect();
        let dialect = scheduler::dialect(spec.scheduler).ok_or_else(|| {
            definition_problem(
                &what,
                format!("scripts for `{}` clusters cannot be written yet", spec.scheduler.as_str()),
            )
        })?;
        Ok(Self { name: spec.name.clone(), version, spec, templates, phase_templates, dialect })
    }
}

/// Who a task is for and where it runs.
#[derive(Debug, Clone)]
pub struct ForgeRequest<'a> {
    /// The task's ID.
    pub task_id: TaskId,
    /// The Unix user the jobs run as.
    pub user: &'a UserName,
    /// The user's home directory on the cluster (expands `~/` in the run-directory base).
    pub home: &'a str,
    /// The user's workspace on a cluster whose run directories live in workspaces:
    /// the run directory is `<workspace>/<task-id>`, whatever `run_dir_base` says.
    pub workspace: Option<&'a str>,
}

/// The run directory: the cluster's base (`~/` → home, `{user}` → the user) plus the
/// task ID. Checked to stay within a plain character set.
pub fn run_dir(base: &str, user: &UserName, home: &str, task: TaskId) -> Result<String, String> {
    let base = base.replace("{user}", user.as_str());
    let base = match base.strip_prefix("~/") {
        Some(rest) => format!("{}/{rest}", home.trim_end_matches('/')),
        None => base,
    };
    let dir = format!("{}/{task}", base.trim_end_matches('/'));
    let plain = dir.starts_with('/') && dir.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b));
    if !plain || dir.split('/').any(|s| s == ".." || s == ".") {
        return Err(format!(
            "the run directory for `{user}` would be `{}`, which is not an absolute path of letters, digits and / . _ -",
            dir.escape_debug()
        ));
    }
    Ok(dir)
}

/// The resources of `phase`: application phase → application default → cluster
/// defaults; one CPU if nothing says otherwise. Checked against the cluster's limits.
pub(crate) fn resources_for(app: &ApplicationSpec, cluster: &ClusterSpec, phase: Phase, p: &mut Problems) -> Resources {
    let mut r = app.resources.for_phase(phase).or(&cluster.defaults);
    r.cpus = Some(r.cpus.unwrap_or(1));
    let l = &cluster.limits;
    let over = |what: &str, asked: String, limit: String, p: &mut Problems| {
        p.push_rule(
            "",
            "limits",
            None,
            format!(
                "application `{}` asks for {asked} {what} in its {phase} phase; cluster `{}` allows at most {limit}",
                app.name, cluster.name
            ),
        );
    };
    if let (Some(c), Some(max)) = (r.cpus, l.max_cpus)
        && c > max
    {
        over("CPUs", c.to_string(), max.to_string(), p);
    }
    if let Some(c) = r.cpus
        && c > 1
        && cluster.scheduler == SchedulerKind::Sge
        && cluster.parallel_environment.is_none()
    {
        p.push_rule(
            "",
            "limits",
            None,
            format!(
                "application `{}` asks for {c} CPUs in its {phase} phase; Grid Engine cluster `{}` names no \
                 `parallel_environment` to give a job more than one slot in",
                app.name, cluster.name
            ),
        );
    }
    if let (Some(m), Some(max)) = (r.memory, l.max_memory)
        && m > max
    {
        over("memory", m.to_string(), max.to_string(), p);
    }
    if let (Some(w), Some(max)) = (r.walltime, l.max_walltime)
        && w > max
    {
        over("wall time", w.to_string(), max.to_string(), p);
    }
    if let Some(part) = &r.partition
        && !l.partitions.is_empty()
        && !l.partitions.contains(part)
    {
        p.push_rule(
            "",
            "limits",
            None,
            format!(
                "application `{}` uses partition `{part}` in its {phase} phase; cluster `{}` allows {}",
                app.name,
                cluster.name,
                l.partitions.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
            ),
        );
    }
    r
}

/// The licences of a phase its cluster's scheduler counts too, in its spelling
/// (Slurm `maya:2,fluent@lic:1`, Grid Engine `maya=2,fluent=1`): those the cluster
/// names a `scheduler` licence for. `None` when there are none.
pub fn scheduler_licences(cluster: &ClusterSpec, r: &Resources) -> Option<String> {
    // Slurm: `--licenses=fluent:2,maya:1`; Grid Engine: `-l fluent=2,maya=1` (the
    // licence a consumable complex, as sites define FlexLM features).
    let sep = if cluster.scheduler == crate::model::SchedulerKind::Sge { '=' } else { ':' };
    let parts: Vec<String> = r
        .licences
        .iter()
        .filter_map(|(name, n)| cluster.licences.get(name)?.scheduler.as_ref().map(|s| format!("{s}{sep}{n}")))
        .collect();
    (!parts.is_empty()).then(|| parts.join(","))
}

/// Characters a directive token may hold: the shell-safe set, plus the operators
/// admins write in constraint expressions. No quotes, `$`, backticks, `;`, `<`, `>`,
/// backslashes or non-ASCII: a user value holding any of those arrives shell-quoted,
/// and the quote itself is refused here.
fn directive_token_ok(token: &str) -> bool {
    token.bytes().all(|b| b.is_ascii_alphanumeric() || b"_@%+=:,./-&|!()[]*?".contains(&b))
}

/// Checks the directive lines of a rendered script, as the scheduler reads them: the
/// comment block after the `#!` line, up to the first command.
fn check_directives(text: &str, dialect: &dyn Scheduler, phase: Phase, p: &mut Problems) {
    let Some(prefix) = dialect.directive_prefix() else { return };
    // The scheduler's own `$` variables (`$JOB_ID`) are the only `$` words allowed: a
    // user's value with a `$` in it arrives shell-quoted, and the quote is refused.
    let token_ok = |t: &str| {
        let plain = dialect.directive_variables().iter().fold(t.to_owned(), |t, v| t.replace(v, ""));
        directive_token_ok(&plain)
    };
    for (line, tokens) in scheduler::common::directive_lines(text, prefix) {
        if tokens.iter().any(|t| !token_ok(t)) {
            let option = tokens.first().map(|t| t.split('=').next().unwrap_or(t)).unwrap_or("");
            let option = if directive_token_ok(option) { option } else { "(an option)" };
            p.push_rule(
                "",
                "directive",
                None,
                format!(
                    "line {line} of the {phase} script: the {prefix} line for {option} holds characters a scheduler directive cannot \
                     safely carry (a value placed there must be letters, digits and _ @ % + = : , . / -)"
                ),
            );
        }
    }
}

/// Forges a task's script for each phase of its application. Pure: no I/O, no clock.
pub fn forge(
    app: &CompiledApp,
    cluster: &CompiledCluster,
    inputs: &ValidatedInputs,
    req: &ForgeRequest<'_>,
) -> Result<Forged, Problems> {
    let mut p = Problems::default();
    let env_path = cluster_env_path(&cluster.name);
    if !app.environments.contains(cluster.name.as_str()) {
        let runs_on: Vec<&str> = app.clusters().collect();
        p.push_rule(
            "/cluster",
            "cluster",
            Some("string"),
            format!(
                "application `{}` does not run on cluster `{}`: it has no cluster environment for it ({})",
                app.name,
                cluster.name,
                if runs_on.is_empty() {
                    "it has none".to_owned()
                } else {
                    format!("it runs on {}", runs_on.join(", "))
                }
            ),
        );
        return Err(p);
    }
    let base = req.workspace.unwrap_or(&cluster.spec.run_dir_base);
    let run_dir = run_dir(base, req.user, req.home, req.task_id).map_err(|e| {
        let mut p = Problems::default();
        p.push_rule("", "run-directory", None, e);
        p
    })?;
    let hpcg_dir = format!("{run_dir}/{HPCFORGE_DIR}");
    let dialect = cluster.dialect.as_ref();

    // What every phase shares.
    let mut base = Context::new();
    let builtins: [(&str, String); 6] = [
        ("HPCG_TASK_ID", req.task_id.to_string()),
        ("HPCG_RUN_DIR", run_dir.clone()),
        ("HPCG_USER", req.user.to_string()),
        ("HPCG_CLUSTER", cluster.name.to_string()),
        ("HPCG_APP", app.name.to_string()),
        ("HPCG_APP_VERSION", app.version.to_string()),
    ];
    for (k, v) in &builtins {
        base.insert(*k, v);
    }
    let mut exports = String::new();
    let mut big_values = String::new();
    for (name, value) in &inputs.values {
        let text = value.text(&run_dir);
        match value {
            InputValue::Files(files) => {
                let words: Vec<String> =
                    files.iter().map(|f| shell_quote(&format!("{run_dir}/{}", f.name)).into_owned()).collect();
                base.insert_value(name.to_string(), TeraValue::safe_string(&words.join(" ")));
            }
            _ => base.insert(name.to_string(), &text),
        }
        if text.len() > MAX_EXPORTED_VALUE {
            let file = format!("{hpcg_dir}/input_{name}");
            let _ = writeln!(big_values, "printf '%s' {} > {}", shell_quote(&text), shell_quote(&file));
            let _ = writeln!(big_values, "export HPCG_INPUT_{name}_FILE={}", shell_quote(&file));
        } else {
            let _ = writeln!(exports, "export HPCG_INPUT_{name}={}", shell_quote(&text));
        }
    }

    // The cluster environment usually does not depend on the phase: render it once.
    let shared_env = if app.phase_free.contains(&env_path) {
        match render_script(app, &env_path, &base) {
            Ok(t) => Some(t),
            Err(msg) => {
                p.push_rule("", "markup", None, msg);
                return Err(p);
            }
        }
    } else {
        None
    };
    let phases = app.graph.phases();
    let mut scripts = Vec::with_capacity(phases.len());
    for phase in phases {
        let r = resources_for(&app.spec, &cluster.spec, phase, &mut p);
        let tag = format!("hpcforge:{}:{phase}", req.task_id);
        // One context for all phases: the phase's values overwrite the last phase's.
        let ctx = &mut base;
        ctx.insert("HPCG_PHASE", phase.as_str());
        ctx.insert("HPCG_JOB_TAG", &tag);
        ctx.insert("HPCG_CPUS", &r.cpus.unwrap_or(1));
        let memory = r.memory.map(|m| dialect.memory(m));
        let walltime = r.walltime.map(|w| dialect.walltime(w));
        ctx.insert("HPCG_MEMORY", &memory);
        // Grid Engine's memory limits are per slot: the job's memory shared out.
        let per_cpu =
            r.memory.map(|m| dialect.memory(Memory::from_mib(m.as_mib().div_ceil(u64::from(r.cpus.unwrap_or(1))))));
        ctx.insert("HPCG_MEMORY_PER_CPU", &per_cpu);
        ctx.insert("HPCG_PARALLEL_ENV", &cluster.spec.parallel_environment.as_ref().map(|x| x.to_string()));
        ctx.insert(
            "HPCG_MEMORY_RESOURCE",
            &cluster.spec.memory_resource.as_ref().map_or_else(|| "h_vmem".to_owned(), |x| x.to_string()),
        );
        ctx.insert("HPCG_WALLTIME", &walltime);
        ctx.insert("HPCG_PARTITION", &r.partition.as_ref().map(|x| x.to_string()));
        ctx.insert("HPCG_ACCOUNT", &r.account.as_ref().map(|x| x.to_string()));
        ctx.insert("HPCG_LICENSES", &scheduler_licences(&cluster.spec, &r));

        let app_path = app_script_path(phase);
        let render = |path: &str, p: &mut Problems| {
            render_script(app, path, ctx).map_err(|msg| p.push_rule("", "markup", None, msg)).ok()
        };
        let env_text = match &shared_env {
            Some(t) => Some(t.clone()),
            None => render(&env_path, &mut p),
        };
        let (Some(app_text), Some(env_text)) = (render(&app_path, &mut p), env_text) else {
            continue;
        };

        let mut payload = String::with_capacity(app_text.len() + env_text.len() + exports.len() + 1024);
        let _ = writeln!(
            payload,
            "# ---- hpcforge: {phase} of task {} -- application {} v{} on cluster {} v{} ----",
            req.task_id, app.name, app.version, cluster.name, cluster.version
        );
        let q = |s: &str| shell_quote(s).into_owned();
        let _ = writeln!(
            payload,
            "export HPCG_TASK_ID={} HPCG_PHASE={phase} HPCG_USER={} HPCG_CLUSTER={} HPCG_APP={} HPCG_APP_VERSION={}",
            req.task_id,
            q(req.user.as_str()),
            q(cluster.name.as_str()),
            q(app.name.as_str()),
            app.version
        );
        let _ = writeln!(payload, "export HPCG_RUN_DIR={} HPCG_JOB_TAG={}", q(&run_dir), q(&tag));
        let opt = |v: Option<String>| q(&v.unwrap_or_default());
        let _ = writeln!(
            payload,
            "export HPCG_CPUS={} HPCG_MEMORY={} HPCG_WALLTIME={} HPCG_PARTITION={} HPCG_ACCOUNT={}",
            r.cpus.unwrap_or(1),
            opt(memory),
            opt(walltime),
            opt(r.partition.as_ref().map(|x| x.to_string())),
            opt(r.account.as_ref().map(|x| x.to_string()))
        );
        let _ = writeln!(payload, "hpcg_dir={}", q(&hpcg_dir));
        let _ = writeln!(
            payload,
            "mkdir -p \"$hpcg_dir\" && cd \"$HPCG_RUN_DIR\" || {{ echo \"hpcforge: cannot use the run directory $HPCG_RUN_DIR\" >&2; exit 1; }}"
        );
        // Evidence that this phase's job started, and its ID: the mediator finds a job
        // by it even after the scheduler has forgotten the job.
        // (For a job array, the array's ID: the one submission answered with.)
        let frames = frames_of(app, inputs, phase);
        let _ = writeln!(
            payload,
            "printf '%s\\n' \"${{{}:-unknown}}\" > \"$hpcg_dir\"/started_{phase}",
            if frames.is_some() { dialect.array_job_id_variable() } else { dialect.job_id_variable() }
        );
        payload.push_str(super::usage::FUNCTIONS);
        payload.push_str(&super::posts::payload_setup(phase, frames.is_some()));
        let keeps_afterok = !dialect.enforces_afterok();
        if keeps_afterok {
            payload.push_str(&scheduler::common::after_guard(phase, dialect.job_id_variable(), "\"$hpcg_dir\""));
        }
        payload.push_str(&exports);
        payload.push_str(&big_values);
        let _ = writeln!(payload, "# cluster environment: applications/{}/{env_path} (v{})", app.name, app.version);
        // The elements of a job array start side by side in one run directory: each
        // writes (and runs) files of its own, never one another is reading.
        let own = if frames.is_some() { format!(".${{{}:-0}}", dialect.array_index_variable()) } else { String::new() };
        let env_file = format!("\"$hpcg_dir\"/env_{phase}{own}.sh");
        if let Err(e) = heredoc(&mut payload, &env_file, "ENV", &env_text) {
            p.push_rule("", "heredoc", None, e);
            continue;
        }
        let _ = writeln!(payload, ". {env_file}");
        if keeps_afterok {
            payload.push_str(&scheduler::common::outcome_record(phase, dialect.job_id_variable(), "\"$hpcg_dir\""));
        }
        let interp = &app.interpreters[&phase];
        let _ = writeln!(
            payload,
            "# application script: applications/{}/{app_path} (v{}), run with {}{}",
            app.name,
            app.version,
            interp.program,
            interp.arg.as_deref().map(|a| format!(" {a}")).unwrap_or_default()
        );
        let app_file = format!("\"$hpcg_dir\"/{app_path}{own}");
        if let Err(e) = heredoc(&mut payload, &app_file, "APP", &app_text) {
            p.push_rule("", "heredoc", None, e);
            continue;
        }
        let _ = writeln!(payload, "chmod 700 {app_file}");
        payload.push_str(super::posts::PATH_LINE);
        let run = match &interp.arg {
            Some(arg) => format!("{} {} {app_file}", q(&interp.program), q(arg)),
            None => format!("{} {app_file}", q(&interp.program)),
        };
        match frames {
            None => {
                let _ = writeln!(payload, "{run}");
                payload.push_str(&super::usage::record(phase, "", dialect.job_id_variable()));
            }
            Some((range, per_job)) => {
                let per_frame: Vec<Phase> =
                    app.graph.waits_of(phase).into_iter().filter(|w| w.per_frame).map(|w| w.phase).collect();
                payload.push_str(&frame_loop(phase, &range, per_job, &per_frame, &run, dialect));
                payload.push_str(&super::usage::record(phase, &own, dialect.array_job_id_variable()));
            }
        }
        ctx.insert_value(markup::PAYLOAD, TeraValue::safe_string(&payload));

        let template = if cluster.phase_templates.contains(&phase) {
            format!("script_{phase}")
        } else {
            "script_common".to_owned()
        };
        let rendered = match cluster.templates.render(&template, ctx) {
            Ok(t) => t,
            Err(e) => {
                p.push_rule(
                    "",
                    "markup",
                    None,
                    format!(
                        "clusters/{}/forge/{template} (version {}): {}",
                        cluster.name,
                        cluster.version,
                        markup::tera_message(&e)
                    ),
                );
                continue;
            }
        };
        match normalise(rendered, dialect, phase, &template, &mut p) {
            Some(text) => {
                let sha256 = sha256_hex(text.as_bytes());
                scripts.push(ForgedScript { phase, text, sha256 });
            }
            None => continue,
        }
    }
    p.into_result()?;
    Ok(Forged {
        application: DefinitionRef { name: app.name.clone(), version: app.version },
        cluster: DefinitionRef { name: cluster.name.clone(), version: cluster.version },
        run_dir,
        scripts,
    })
}

/// For a phase that runs per frame: the canonical range it runs over and how many
/// frames each job runs.
pub fn frames_of(app: &CompiledApp, inputs: &ValidatedInputs, phase: Phase) -> Option<(String, u32)> {
    let decl = app.spec.phases.iter().find(|d| d.name == phase)?;
    let input = decl.frames.as_ref()?;
    let (_, value) = inputs.values.iter().find(|(n, _)| n == input)?;
    Some((value.text(""), decl.frames_per_job.unwrap_or(1)))
}

/// The payload's end for a frame phase: the frames this submission runs (read from
/// `<frames dir>.run`, which the submission wrote; see
/// [`scheduler::common::frames_prep`]), this array element's share of them (from its
/// index, [`scheduler::common::FRAMES_OF`]), run side by side at most `HPCG_CPUS` at
/// a time, each with `HPCG_FRAME` set and `HPCG_FRAMES` the phase's whole range, each
/// recording `<exit status> <start> <end> <array job> <element> <CPU ticks> <ticks a
/// second> <node>` in
/// `<frames dir>/<frame>`. Each frame's standard output and error go to its own
/// files ([`crate::model::rules::frame_output_dir`], which the log rules read), copied
/// to the job's when the frame ends, so frames side by side do not interleave. A
/// frame whose frame-by-frame wait (`per_frame`, on the phases in `per_frame`) did not
/// succeed is not run, and says so. The job fails if any frame failed or was not run.
fn frame_loop(
    phase: Phase,
    range: &str,
    per_job: u32,
    per_frame: &[Phase],
    run: &str,
    dialect: &dyn Scheduler,
) -> String {
    let mut s = String::from(scheduler::common::FRAMES_OF);
    let mut guard = String::new();
    for w in per_frame {
        let _ = write!(
            guard,
            "\x20 case $(head -n 1 \"$hpcg_dir/frames/{w}/$hpcg_frame\" 2>/dev/null) in\n\
             \x20   '0 '*) ;;\n\
             \x20   *) echo \"hpcforge: frame $hpcg_frame of {phase} not run: frame $hpcg_frame of {w} did not succeed\" >&2; hpcg_failed=1; continue ;;\n\
             \x20 esac\n"
        );
    }
    let _ = writeln!(
        s,
        "hpcg_index=${{{idx}:-1}}\n\
         hpcg_fdir=\"$hpcg_dir/frames/{phase}\"; hpcg_fout=\"$hpcg_dir/output/{phase}\"\n\
         mkdir -p \"$hpcg_fdir\" \"$hpcg_fout/stdout\" \"$hpcg_fout/stderr\" || exit 1\n\
         hpcg_sel=$(cat \"$hpcg_fdir.run\" 2>/dev/null)\n\
         case $hpcg_sel in\n\
         \x20 '' | *[!0-9,:-]*) echo \"hpcforge: the frames to run ($hpcg_fdir.run) are missing or unreadable\" >&2; exit 1 ;;\n\
         esac\n\
         export HPCG_FRAMES={range}\n\
         hpcg_failed=0; hpcg_pids=; hpcg_n=0\n\
         for hpcg_frame in $(hpcg_frames_of \"$hpcg_sel\" {per_job} \"$hpcg_index\"); do\n\
         {guard}\
         \x20 (\n\
         \x20   HPCG_FRAME=$hpcg_frame; export HPCG_FRAME\n\
         \x20   {events}\n\
         \x20   hpcg_t0=$(date -u +%Y-%m-%dT%H:%M:%S)\n\
         \x20   {run} > \"$hpcg_fout/stdout/$HPCG_FRAME\" 2> \"$hpcg_fout/stderr/$HPCG_FRAME\"\n\
         \x20   hpcg_rc=$?\n\
         \x20   cat \"$hpcg_fout/stdout/$HPCG_FRAME\"; cat \"$hpcg_fout/stderr/$HPCG_FRAME\" >&2\n\
         \x20   {ticks}\n\
         \x20   printf '%s %s %s %s %s %s %s %s\\n' \"$hpcg_rc\" \"$hpcg_t0\" \"$(date -u +%Y-%m-%dT%H:%M:%S)\" \"${{{job}:-unknown}}\" \"$hpcg_index\" \"${{hpcg_ticks:--}}\" \"$hpcg_hz\" \"$(uname -n)\" > \"$hpcg_fdir/$HPCG_FRAME.tmp\" \\\n\
         \x20     && mv -f \"$hpcg_fdir/$HPCG_FRAME.tmp\" \"$hpcg_fdir/$HPCG_FRAME\"\n\
         \x20   exit $hpcg_rc\n\
         \x20 ) &\n\
         \x20 hpcg_pids=\"$hpcg_pids $!\"; hpcg_n=$(( hpcg_n + 1 ))\n\
         \x20 if [ \"$hpcg_n\" -ge \"${{HPCG_CPUS:-1}}\" ]; then\n\
         \x20   for hpcg_pid in $hpcg_pids; do wait \"$hpcg_pid\" || hpcg_failed=1; done\n\
         \x20   hpcg_pids=; hpcg_n=0\n\
         \x20 fi\n\
         done\n\
         for hpcg_pid in $hpcg_pids; do wait \"$hpcg_pid\" || hpcg_failed=1; done\n\
         [ \"$hpcg_failed\" = 0 ]",
        idx = dialect.array_index_variable(),
        job = dialect.array_job_id_variable(),
        range = shell_quote(range),
        events = super::posts::frame_events(phase),
        ticks = super::usage::FRAME_TICKS,
    );
    s
}

/// Renders an application script or cluster environment; the error names the file.
fn render_script(app: &CompiledApp, path: &str, ctx: &Context) -> Result<String, String> {
    app.scripts.render(path, ctx).map_err(|e| {
        format!("applications/{}/{path} (version {}): {}", app.name, app.version, markup::tera_message(&e))
    })
}

/// `#!` on line 1, LF only, one final newline, size cap, directive lines.
fn normalise(
    mut text: String,
    dialect: &dyn Scheduler,
    phase: Phase,
    template: &str,
    p: &mut Problems,
) -> Option<String> {
    // Leading blank lines (left by comments or block tags) would push `#!` down.
    let start = text.find(|c: char| c != '\n' && c != ' ' && c != '\t').unwrap_or(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    text.drain(..line_start);
    if !text.starts_with("#!") {
        p.push_rule("", "shebang", None, format!("the {phase} script (from {template}) does not start with a #! line"));
        return None;
    }
    while text.ends_with("\n\n") {
        text.pop();
    }
    if !text.ends_with('\n') {
        text.push('\n');
    }
    if text.contains('\r') {
        p.push_rule("", "line-endings", None, format!("the {phase} script contains a carriage return"));
        return None;
    }
    if text.len() > MAX_FORGED_BYTES {
        p.push_rule(
            "",
            "size",
            None,
            format!("the {phase} script would be {} bytes; the limit is {MAX_FORGED_BYTES}", text.len()),
        );
        return None;
    }
    let before = p.len();
    check_directives(&text, dialect, phase, p);
    (p.len() == before).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_directories_expand_home_and_user_and_stay_plain() {
        let alice = UserName::parse("alice").unwrap();
        let id = TaskId::new();
        assert_eq!(run_dir("~/hpcforge", &alice, "/home/alice", id).unwrap(), format!("/home/alice/hpcforge/{id}"));
        assert_eq!(run_dir("/scratch/{user}/hpcg", &alice, "/x", id).unwrap(), format!("/scratch/alice/hpcg/{id}"));
        assert!(run_dir("~/hpcforge", &alice, "/home/al ice", id).is_err());
        assert!(run_dir("~/hpcforge", &alice, "relative", id).is_err());
    }

    #[test]
    fn directive_lines_refuse_quoted_or_odd_values_and_name_only_the_option() {
        let mut p = Problems::default();
        let text = "#!/bin/bash\n#SBATCH --job-name='a b'\n#SBATCH -c 2 --constraint=a&b|(c)\n# plain comment 'x'\necho\n#SBATCH --x='later, ignored'\n";
        check_directives(text, &crate::scheduler::slurm::Slurm { accounting: false }, Phase::EXECUTE, &mut p);
        assert_eq!(p.len(), 1, "{p}");
        let msg = &p.iter().next().unwrap().message;
        assert!(msg.contains("line 2") && msg.contains("--job-name") && !msg.contains("a b"), "{msg}");
    }
}
