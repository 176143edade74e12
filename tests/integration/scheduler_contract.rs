//! The scheduler contract: one set of end-to-end scenarios, written once, that every
//! scheduler hpcforge submits to must pass — the real Slurm and Grid Engine of
//! `scripts/test-env` (as alice, over sshd) and the `local` supervisor (as the
//! server's own user) — the way `store_contract` runs one suite against every store.
//!
//! Each scenario is an async function of ([`Sched`], a fresh store); the macro at the
//! bottom runs it per scheduler on the embedded store and on MongoDB. What differs
//! between schedulers lives in [`Sched`] only: which cluster, who submits, what a job
//! ID looks like, what the scheduler refuses, and how the test asks the scheduler
//! itself (not hpcforge) which jobs a task has.
//!
//! Three scenarios do not apply to `local`, and are not generated for it: there is no
//! connection that could be unreachable, and no scheduler of its own that could
//! refuse a job or stop it at a wall-time limit. The wall-time scenario waits on the
//! scheduler's clock (over a minute on Slurm), so it runs on the embedded store only
//! (`<scheduler>::embedded_only`).

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Server, TestApp, TestStore, test_env};
use crate::mediator::{
    app_body, assert_restarted_from_execute, call, cluster_body, is_final, job, phase, put, register_key, remote,
    submit, time_of, variant, wait_for,
};

/// A scheduler under the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sched {
    /// The test environment's Slurm, over SSH.
    Slurm,
    /// The test environment's Son of Grid Engine, over SSH.
    GridEngine,
    /// This machine's supervisor, no SSH.
    Local,
}

/// One job the scheduler itself holds for a task.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct SchedJob {
    /// The phase its tag names.
    pub phase: String,
    /// The scheduler's job ID.
    pub id: String,
    /// Queued or running (not ended).
    pub alive: bool,
}

impl Sched {
    /// The example cluster of this scheduler.
    pub fn cluster(self) -> &'static str {
        match self {
            Sched::Slurm => "local-slurm",
            Sched::GridEngine => "local-sge",
            Sched::Local => "local",
        }
    }

    /// Who the scenarios submit as: alice over SSH; on `local`, the user the server
    /// (this test process) runs as, the only one it takes tasks of.
    pub fn owner(self) -> String {
        match self {
            Sched::Local => hpcforge::mediator::current_user().expect("the test knows who it runs as").to_string(),
            _ => "alice".into(),
        }
    }

    /// The prefix of the scheduler's directive lines in a forged script (`local`'s
    /// scripts have none).
    fn directive_prefix(self) -> Option<&'static str> {
        match self {
            Sched::Slurm => Some("#SBATCH"),
            Sched::GridEngine => Some("#$"),
            Sched::Local => None,
        }
    }

    /// What a phase whose predecessor failed says on its standard error, where its job
    /// runs at all: Grid Engine starts it (`-hold_jid` waits for any end) and the
    /// forged guard stops it; Slurm and `local` never start it.
    fn skipped_says(self) -> Option<&'static str> {
        match self {
            Sched::GridEngine => Some("hpcforge: execute not run: the prolog phase"),
            Sched::Slurm | Sched::Local => None,
        }
    }

    /// Whether `id` has the shape of this scheduler's job IDs.
    fn is_job_id(self, id: &str, phase: &str) -> bool {
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        match self {
            Sched::Slurm | Sched::GridEngine => digits(id),
            // `<supervisor pid>.<phase>`.
            Sched::Local => id.split_once('.').is_some_and(|(pid, p)| digits(pid) && p == phase),
        }
    }

    /// A server with `sleep` and this scheduler's cluster; over SSH, with alice's
    /// and bob's keys registered.
    pub async fn setup(self, t: &TestStore) -> TestApp {
        let app = crate::helpers::spawn_configured(t.store.clone(), |_| {}).await;
        put(&app, "/api/v1/applications/sleep", &app_body("sleep")).await;
        put(&app, &format!("/api/v1/clusters/{}", self.cluster()), &cluster_body(self.cluster())).await;
        if self != Sched::Local {
            for user in ["alice", "bob"] {
                register_key(&app, user, self.cluster()).await;
            }
        }
        app
    }

    /// The jobs the scheduler itself holds for task `id`, asked of the scheduler (not
    /// of hpcforge): on Slurm every job whose comment carries the task's tag, ended
    /// ones too while Slurm remembers them; on Grid Engine the queued and running jobs
    /// whose context variable carries it (ended jobs keep no context); on `local` the
    /// supervisors running the task's run directory, and any process left in it.
    pub async fn jobs_of(self, id: &str) -> Vec<SchedJob> {
        let mut jobs = match self {
            Sched::Slurm => {
                let (_, out) = remote(
                    "alice",
                    format!(
                        "squeue --noheader --states=all -u alice -O 'JobID:|,Comment:|,State:|' | grep 'hpcforge:{id}:'"
                    ),
                )
                .await;
                out.lines()
                    .filter_map(|l| {
                        let f: Vec<&str> = l.split('|').map(str::trim).collect();
                        let phase = f.get(1)?.rsplit(':').next()?.to_owned();
                        let alive = matches!(
                            *f.get(2)?,
                            "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING" | "SUSPENDED" | "REQUEUED"
                        );
                        Some(SchedJob { phase, id: f[0].to_owned(), alive })
                    })
                    .collect::<Vec<_>>()
            }
            Sched::GridEngine => {
                // `qstat -j` of each of alice's jobs, its `context:` line.
                let script = format!(
                    "for j in $(qstat -u alice | awk 'NR > 2 {{ print $1 }}'); do \
                       qstat -j \"$j\" 2>/dev/null | sed -n \"s/^context: *hpcforge=hpcforge:{id}:/$j /p\"; \
                     done"
                );
                let (_, out) = remote("alice", script).await;
                out.lines()
                    .filter_map(|l| {
                        let (job, phase) = l.split_once(' ')?;
                        Some(SchedJob { phase: phase.trim().to_owned(), id: job.to_owned(), alive: true })
                    })
                    .collect()
            }
            Sched::Local => {
                let ps = local(&format!(
                    "ps -eo pid=,ppid=,args= | grep '[s]upervisor.sh .*{id}'; \
                     for d in /proc/[0-9]*; do case $(readlink $d/cwd 2>/dev/null) in *{id}*) echo \"CWD ${{d#/proc/}}\";; esac; done"
                ));
                let mut jobs = Vec::new();
                let mut strays = Vec::new();
                // The supervisor runs each phase in a subshell of its own, with the same
                // command line: only a process whose parent is not one of them is a supervisor.
                let pids: Vec<&str> = ps.lines().filter_map(|l| l.split_whitespace().next()).collect();
                for l in ps.lines() {
                    if let Some(pid) = l.strip_prefix("CWD ") {
                        strays.push(pid.to_owned());
                        continue;
                    }
                    // `<pid> <ppid> sh <run>/.hpcforge/supervisor.sh <run> prolog: execute:ok=prolog ...`
                    let mut words = l.split_whitespace();
                    let (Some(pid), Some(ppid)) = (words.next(), words.next()) else { continue };
                    if pids.contains(&ppid) {
                        continue;
                    }
                    for spec in words.skip(3) {
                        let phase = spec.split(':').next().unwrap_or(spec);
                        jobs.push(SchedJob { phase: phase.into(), id: format!("{pid}.{phase}"), alive: true });
                    }
                }
                // A supervisor and its phase's processes work in the run directory; with
                // no supervisor left, any process still there is a job nobody stopped.
                if jobs.is_empty() {
                    for pid in strays {
                        jobs.push(SchedJob {
                            phase: "(a process left in the run directory)".into(),
                            id: pid,
                            alive: true,
                        });
                    }
                }
                jobs
            }
        };
        jobs.sort();
        jobs
    }

    /// Who the scheduler says ran job `job_id` of task `task`: Slurm's job record;
    /// Grid Engine's accounting (written every 15 s, so this waits for it); on
    /// `local`, the owner of the state file the supervisor wrote.
    async fn job_owner(self, task: &Value, job_id: &str, phase: &str) -> String {
        match self {
            Sched::Slurm => {
                let (code, out) = remote("alice", format!("scontrol show job -o {job_id}")).await;
                assert_eq!(code, 0, "{out}");
                let tag = format!("Comment=hpcforge:{}:{phase}", task["id"].as_str().unwrap());
                assert!(out.contains(&tag), "Slurm's job {job_id} carries its tag: {out}");
                out.split("UserId=").nth(1).and_then(|r| r.split('(').next()).unwrap_or_default().to_owned()
            }
            Sched::GridEngine => {
                let start = Instant::now();
                loop {
                    let (_, out) = remote("alice", format!("qacct -j {job_id} | grep -E '^(owner|jobname) '")).await;
                    let field = |k: &str| {
                        out.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.trim().to_owned()).unwrap_or_default()
                    };
                    if !field("owner").is_empty() {
                        assert!(field("jobname").ends_with(&format!("-{phase}")), "Grid Engine's job {job_id}: {out}");
                        return field("owner");
                    }
                    assert!(start.elapsed() < Duration::from_secs(45), "no accounting record of {job_id}: {out}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            Sched::Local => {
                let file = format!("{}/.hpcforge/{phase}.state", task["run_dir"].as_str().unwrap());
                local(&format!("stat -c %U '{file}'")).trim().to_owned()
            }
        }
    }

    /// Runs `script` as the owner where the jobs run (over SSH as alice; on `local`,
    /// here).
    async fn run_as_owner(self, script: &str) {
        match self {
            Sched::Local => {
                let out = std::process::Command::new("sh").arg("-c").arg(script).status().unwrap();
                assert!(out.success(), "{script}");
            }
            _ => {
                let (code, out) = remote("alice", script.to_owned()).await;
                assert_eq!(code, 0, "{script}: {out}");
            }
        }
    }

    /// The shortest wall-time limit the scheduler enforces, and what it says when it
    /// stops a job there: (limit, signal, reason). Slurm counts whole minutes and
    /// checks about every 30 s, sending SIGTERM; Grid Engine's master enforces `h_rt`
    /// to the second with SIGKILL.
    fn wall_time_story(self) -> (&'static str, i64, &'static str) {
        match self {
            Sched::Slurm => ("00:01:00", 15, "TimeLimit"),
            Sched::GridEngine => ("00:00:05", 9, "qmaster enforced h_rt, h_cpu, or h_vmem limit"),
            Sched::Local => unreachable!("the local supervisor enforces no wall time"),
        }
    }

    /// What the scheduler itself says when a job asks for a queue (partition) that
    /// does not exist: (a fragment of its own words, the start of hpcforge's plain
    /// explanation).
    fn refusal(self) -> (&'static str, &'static str) {
        match self {
            Sched::Slurm => {
                ("Batch job submission failed: Invalid partition name specified", "the partition does not exist")
            }
            Sched::GridEngine => ("job requests unknown queue \"nope\"", "the queue does not exist on this cluster"),
            Sched::Local => unreachable!("the local supervisor refuses nothing"),
        }
    }
}

/// Runs `script` with `sh` on this machine; its standard output.
fn local(script: &str) -> String {
    let out = std::process::Command::new("sh").arg("-c").arg(script).output().expect("run sh");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The application's stdout or stderr of `phase`, through the API; `None` if the
/// job wrote none (it never ran).
async fn output(app: &TestApp, user: &str, id: &str, phase: &str, stderr: bool) -> Option<String> {
    let stream = if stderr { "stderr" } else { "stdout" };
    let (s, v) =
        call(app, Method::GET, &format!("/api/v1/tasks/{id}/output/{phase}?stream={stream}"), user, None).await;
    match s {
        StatusCode::OK => Some(v["data"]["text"].as_str().unwrap_or_default().to_owned()),
        StatusCode::NOT_FOUND => None,
        other => panic!("GET output/{phase}: {other} {v}"),
    }
}

/// Waits until the scheduler holds no live job of task `id`.
async fn assert_nothing_left(s: Sched, id: &str) {
    let start = Instant::now();
    loop {
        let alive: Vec<SchedJob> = s.jobs_of(id).await.into_iter().filter(|j| j.alive).collect();
        if alive.is_empty() {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{s:?} still holds jobs of the task: {alive:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn a_task_runs_as_its_user_with_its_phases_in_order(s: Sched, t: TestStore) {
    let app = s.setup(&t).await;
    let me = s.owner();
    let task = submit(&app, &me, "sleep", s.cluster(), json!({ "sleep": 1 })).await;
    let id = task["id"].as_str().unwrap().to_owned();
    // Every phase has a job ID of the scheduler's own kind once the answer comes back.
    for p in ["prolog", "execute", "epilog"] {
        let j = job(&task, p);
        assert!(s.is_job_id(&j, p), "{s:?} {p}: {j}");
    }
    let done = wait_for(&app, &me, &id, 120, "the task to end", is_final).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    let (pro, exe, epi) = (phase(&done, "prolog"), phase(&done, "execute"), phase(&done, "epilog"));
    assert!(time_of(pro, "ended_at") <= time_of(exe, "started_at"), "execute started before the prolog ended");
    assert!(time_of(exe, "ended_at") <= time_of(epi, "started_at"), "epilog started before execute ended");
    for p in [pro, exe, epi] {
        assert_eq!(p["exit_code"], 0, "{p}");
    }
    // The job's own output, read through the API where the templates put it, says
    // who ran it; so does the scheduler.
    let out = output(&app, &me, &id, "execute", false).await.expect("execute wrote its output");
    assert!(out.contains(&format!("execute: sleeping 1s as {me}")), "{out}");
    for p in ["prolog", "execute", "epilog"] {
        assert_eq!(s.job_owner(&done, &job(&done, p), p).await, me, "{s:?} ran {p} as the owner");
    }
    // And the task's record tells the story.
    let events: Vec<&str> = done["events"].as_array().unwrap().iter().map(|e| e["message"].as_str().unwrap()).collect();
    assert!(events.iter().any(|e| e.starts_with("execute: running → completed")), "{events:#?}");
    let last = events.last().unwrap();
    assert!(last.starts_with("task: ") && last.ends_with("→ completed"), "{last}");
}

async fn a_failing_execute_still_runs_the_epilog_and_the_task_fails_with_its_exit_code(s: Sched, t: TestStore) {
    let app = s.setup(&t).await;
    let me = s.owner();
    put(
        &app,
        "/api/v1/applications/failing",
        &variant("failing", &[("app_execute", "#!/bin/bash\necho going to fail\nexit 3\n")]),
    )
    .await;
    let task = submit(&app, &me, "failing", s.cluster(), json!({})).await;
    let id = task["id"].as_str().unwrap();
    let done = wait_for(&app, &me, id, 120, "the task to end", is_final).await;
    assert_eq!(done["state"], "failed", "{done:#}");
    let exe = phase(&done, "execute");
    assert_eq!((exe["state"].as_str(), exe["exit_code"].as_i64()), (Some("failed"), Some(3)), "{done:#}");
    assert_eq!(phase(&done, "epilog")["state"], "completed", "the epilog runs whatever execute did");
    assert!(time_of(exe, "ended_at") <= time_of(phase(&done, "epilog"), "started_at"));
    assert!(output(&app, &me, id, "execute", false).await.unwrap_or_default().contains("going to fail"));
}

async fn a_failed_prolog_stops_execute_but_the_epilog_runs(s: Sched, t: TestStore) {
    let app = s.setup(&t).await;
    let me = s.owner();
    put(&app, "/api/v1/applications/badprolog", &variant("badprolog", &[("app_prolog", "#!/bin/bash\nexit 1\n")]))
        .await;
    let task = submit(&app, &me, "badprolog", s.cluster(), json!({})).await;
    let id = task["id"].as_str().unwrap();
    let done = wait_for(&app, &me, id, 120, "the task to end", is_final).await;
    assert_eq!(done["state"], "failed", "{done:#}");
    let pro = phase(&done, "prolog");
    assert_eq!((pro["state"].as_str(), pro["exit_code"].as_i64()), (Some("failed"), Some(1)), "{done:#}");
    let exe = phase(&done, "execute");
    assert_eq!(
        (exe["state"].as_str(), exe["reason"].as_str()),
        (Some("cancelled"), Some("DependencyNeverSatisfied")),
        "{done:#}"
    );
    assert_eq!(
        exe["explanation"],
        "not run: a phase it waits for did not end as it needs (succeeded, or not, as declared)"
    );
    assert_eq!(phase(&done, "epilog")["state"], "completed", "{done:#}");
    // The application's execute script never ran; where the job itself ran, it says why.
    let out = output(&app, &me, id, "execute", false).await.unwrap_or_default();
    assert!(!out.contains("execute: sleeping"), "{out}");
    if let Some(says) = s.skipped_says() {
        let err = output(&app, &me, id, "execute", true).await.unwrap_or_default();
        assert!(err.contains(says), "{err}");
    }
}

async fn cancel_stops_running_jobs_and_cancels_the_rest(s: Sched, t: TestStore) {
    let app = s.setup(&t).await;
    let me = s.owner();
    let task = submit(&app, &me, "sleep", s.cluster(), json!({ "sleep": 300 })).await;
    let id = task["id"].as_str().unwrap();
    wait_for(&app, &me, id, 120, "execute to run", |t| phase(t, "execute")["state"] == "running").await;
    let held = s.jobs_of(id).await;
    assert!(held.iter().any(|j| j.alive && j.phase == "execute"), "{s:?} shows the running execute: {held:?}");
    let (st, v) = call(&app, Method::DELETE, &format!("/api/v1/tasks/{id}"), &me, None).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let done = wait_for(&app, &me, id, 60, "the task to end", is_final).await;
    assert_eq!(done["state"], "cancelled", "{done:#}");
    assert_eq!(phase(&done, "execute")["state"], "cancelled", "{done:#}");
    assert_eq!(phase(&done, "epilog")["state"], "cancelled", "the waiting epilog is cancelled too, not started");
    // The scheduler agrees: nothing of the task is alive.
    assert_nothing_left(s, id).await;
    // Cancelling what ended is a conflict, said plainly.
    let (st, v) = call(&app, Method::DELETE, &format!("/api/v1/tasks/{id}"), &me, None).await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
}

async fn restart_from_execute_reruns_only_execute_and_epilog(s: Sched, t: TestStore) {
    let app = s.setup(&t).await;
    let me = s.owner();
    let task = submit(&app, &me, "sleep", s.cluster(), json!({ "sleep": 1 })).await;
    let id = task["id"].as_str().unwrap();
    let first = wait_for(&app, &me, id, 120, "the task to end", is_final).await;
    assert_eq!(first["state"], "completed", "{first:#}");
    // A phase the task does not have: said plainly, under the field that names it.
    let wrong = json!({ "from": "postprocess" });
    let (st, v) = call(&app, Method::POST, &format!("/api/v1/tasks/{id}/restart"), &me, Some(&wrong)).await;
    assert_eq!((st, v["errors"][0]["pointer"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("/from")), "{v}");
    assert!(v["errors"][0]["message"].as_str().unwrap().contains("has no phase `postprocess`"), "{v}");
    let restart = json!({ "from": "execute" });
    let (st, v) = call(&app, Method::POST, &format!("/api/v1/tasks/{id}/restart"), &me, Some(&restart)).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let again = wait_for(&app, &me, id, 120, "the restarted task to end", |t| {
        is_final(t) && phase(t, "execute")["attempt"] == 2
    })
    .await;
    assert_restarted_from_execute(&first, &again);
    for p in ["execute", "epilog"] {
        assert!(s.is_job_id(&job(&again, p), p), "{again:#}");
    }
    let wanted = format!("restart from execute (execute, epilog) requested by {me}");
    assert!(again["events"].as_array().unwrap().iter().any(|e| e["message"] == wanted.as_str()), "{again:#}");
}

async fn one_user_cannot_see_or_act_on_anothers_task(s: Sched, t: TestStore) {
    let app = s.setup(&t).await;
    let me = s.owner();
    let task = submit(&app, &me, "sleep", s.cluster(), json!({ "sleep": 1 })).await;
    let id = task["id"].as_str().unwrap();
    for (method, path, body) in [
        (Method::GET, format!("/api/v1/tasks/{id}"), None),
        (Method::DELETE, format!("/api/v1/tasks/{id}"), None),
        (Method::POST, format!("/api/v1/tasks/{id}/restart"), Some(json!({ "from": "execute" }))),
        (Method::GET, format!("/api/v1/tasks/{id}/scripts/execute"), None),
        (Method::GET, format!("/api/v1/tasks/{id}/output/execute"), None),
    ] {
        let (st, v) = call(&app, method.clone(), &path, "bob", body.as_ref()).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{method} {path}: {v}");
        assert_eq!(v["message"], format!("there is no task {id}"), "the same answer as for a task that does not exist");
    }
    let (st, v) = call(&app, Method::GET, "/api/v1/tasks", "bob", None).await;
    assert_eq!((st, v["data"]["tasks"].as_array().unwrap().len()), (StatusCode::OK, 0));
    // Its owner reads the script it was submitted with.
    let resp = app.req(Method::GET, &format!("/api/v1/tasks/{id}/scripts/execute"), &me).await.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let script = resp.text().await.unwrap();
    assert!(script.starts_with("#!/bin/bash\n"), "{script}");
    if let Some(prefix) = s.directive_prefix() {
        assert!(script.lines().nth(1).unwrap().starts_with(prefix), "{script}");
    }
    let done = wait_for(&app, &me, id, 120, "the task to end", is_final).await;
    assert_eq!(done["state"], "completed", "bob's attempts changed nothing: {done:#}");
}

async fn a_scheduler_refusal_fails_the_phase_with_the_schedulers_own_words(s: Sched, t: TestStore) {
    let app = s.setup(&t).await;
    let me = s.owner();
    // A cluster without queue limits, so the scheduler itself gets to say no.
    let mut open = cluster_body(s.cluster());
    open["definition"]["name"] = json!("open");
    open["definition"].as_object_mut().unwrap().remove("limits");
    open["definition"]["defaults"].as_object_mut().unwrap().remove("partition");
    put(&app, "/api/v1/clusters/open", &open).await;
    register_key(&app, &me, "open").await;
    let mut body = variant("badpart", &[("cluster/open", "true\n")]);
    body["definition"]["resources"]["default"]["partition"] = json!("nope");
    put(&app, "/api/v1/applications/badpart", &body).await;
    let task = submit(&app, &me, "badpart", "open", json!({})).await;
    assert_eq!(task["state"], "failed", "{task:#}");
    let pro = phase(&task, "prolog");
    let (words, explanation) = s.refusal();
    assert_eq!(pro["state"], "failed", "{task:#}");
    assert!(pro["scheduler_message"].as_str().unwrap_or_default().contains(words), "{pro}");
    assert!(pro["explanation"].as_str().unwrap_or_default().starts_with(explanation), "{pro}");
    for p in ["execute", "epilog"] {
        assert_eq!(
            (phase(&task, p)["state"].as_str(), phase(&task, p)["explanation"].as_str()),
            (Some("cancelled"), Some("not submitted: the prolog job was refused"))
        );
    }
    assert!(s.jobs_of(task["id"].as_str().unwrap()).await.is_empty(), "nothing reached the scheduler");
}

/// The `workflow` example (preprocess → fit ∥ histogram → postprocess, waits derived
/// from the files each phase needs and produces, its own resources per phase): every
/// phase starts only once each phase it waits for has ended, and the result is the
/// analysis of the data the first phase wrote.
async fn the_workflow_example_runs_each_phase_after_the_phases_it_needs(s: Sched, t: TestStore) {
    let app = s.setup(&t).await;
    let me = s.owner();
    put(&app, "/api/v1/applications/workflow", &crate::mediator::app_body("workflow")).await;
    let task = submit(&app, &me, "workflow", s.cluster(), json!({ "points": 3000, "bins": 10 })).await;
    let id = task["id"].as_str().unwrap().to_owned();
    let names: Vec<&str> = task["phases"].as_array().unwrap().iter().map(|p| p["phase"].as_str().unwrap()).collect();
    assert_eq!(names, ["preprocess", "fit", "histogram", "postprocess"]);
    // The graph travels with the task: postprocess waits for both analyses.
    let waits = &phase(&task, "postprocess")["after"];
    assert_eq!(
        waits,
        &json!([{ "phase": "fit", "when": "succeeded" }, { "phase": "histogram", "when": "succeeded" }]),
        "{task:#}"
    );
    for p in &names {
        assert!(s.is_job_id(&job(&task, p), p), "{s:?} {p}: {task:#}");
    }
    let done = wait_for(&app, &me, &id, 180, "the workflow to end", is_final).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    let ended = |p: &str| time_of(phase(&done, p), "ended_at");
    let started = |p: &str| time_of(phase(&done, p), "started_at");
    for (p, before) in
        [("fit", "preprocess"), ("histogram", "preprocess"), ("postprocess", "fit"), ("postprocess", "histogram")]
    {
        assert!(ended(before) <= started(p), "{p} started before {before} ended: {done:#}");
    }
    let out = output(&app, &me, &id, "postprocess", false).await.expect("postprocess wrote its output");
    assert!(out.contains("\"points\": 3000") && out.contains("\"bins\": 10"), "{out}");
    let fit = output(&app, &me, &id, "fit", false).await.unwrap_or_default();
    assert!(fit.contains("fit: y = 2.5"), "the fit found the line the data was made from: {fit}");
    // The scheduler ran each phase as the owner.
    for p in &names {
        assert_eq!(s.job_owner(&done, &job(&done, p), p).await, me, "{s:?} ran {p} as the owner");
    }

    // The data is touched after the analyses: a restart from preprocess keeps
    // preprocess (its output is newer than its inputs, it has none), and reruns the
    // analyses (their outputs are now older than the data) and what waits for them.
    let run_dir = done["run_dir"].as_str().unwrap();
    s.run_as_owner(&format!("touch '{run_dir}/data.csv'")).await;
    let from = json!({ "from": "preprocess" });
    let (code, v) = call(&app, Method::POST, &format!("/api/v1/tasks/{id}/restart"), &me, Some(&from)).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{v}");
    let again =
        wait_for(&app, &me, &id, 180, "the rerun to end", |t| is_final(t) && phase(t, "fit")["attempt"] == 2).await;
    assert_eq!(again["state"], "completed", "{again:#}");
    assert_eq!(phase(&again, "preprocess")["attempt"], 1, "preprocess is kept: {again:#}");
    assert_eq!(job(&again, "preprocess"), job(&done, "preprocess"));
    for p in ["fit", "histogram", "postprocess"] {
        assert_eq!(phase(&again, p)["attempt"], 2, "{p} reruns: {again:#}");
    }
    let events: Vec<&str> =
        again["events"].as_array().unwrap().iter().map(|e| e["message"].as_str().unwrap()).collect();
    assert!(events.contains(&"preprocess: kept, its outputs are newer than its inputs (data.csv)"), "{events:#?}");
    // Asked to, it reruns it anyway.
    let forced = json!({ "from": "preprocess", "force": true });
    let (code, v) = call(&app, Method::POST, &format!("/api/v1/tasks/{id}/restart"), &me, Some(&forced)).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{v}");
    let third = wait_for(&app, &me, &id, 180, "the forced rerun to end", |t| {
        is_final(t) && phase(t, "preprocess")["attempt"] == 2
    })
    .await;
    assert_eq!(third["state"], "completed", "{third:#}");
    assert_eq!(phase(&third, "fit")["attempt"], 3, "{third:#}");
}

/// An application whose `solve` fails on its first run only (it leaves a mark in the
/// run directory), with a `rescue` that runs only if solve did not succeed, a `plot`
/// only if it did, and a `report` once both have ended whatever they did.
fn solver_body(cluster: &str) -> Value {
    let script = |body: &str| format!("#!/bin/bash\n{body}\n");
    json!({
        "definition": {
            "name": "solver",
            "phases": [
                { "name": "prep" },
                { "name": "solve", "after": ["prep"] },
                { "name": "rescue", "after": [{ "phase": "solve", "when": "failed" }] },
                { "name": "plot", "after": ["solve"] },
                { "name": "report", "after": [{ "phase": "plot", "when": "ended" }, { "phase": "rescue", "when": "ended" }] }
            ],
            "resources": { "default": { "cpus": 1, "walltime": "00:05:00" } }
        },
        "files": {
            "app_prep": script("echo prep ran"),
            "app_solve": script("if [ ! -e solve.tried ]; then touch solve.tried; echo 'solve: diverged' >&2; exit 4; fi\necho solve: converged"),
            "app_rescue": script("echo rescue ran"),
            "app_plot": script("echo plot ran"),
            "app_report": script("echo report ran"),
            format!("cluster/{cluster}"): "true\n",
        }
    })
}

/// The conditions mean the same on every scheduler (Slurm's own `afternotok`, Grid
/// Engine's scripts checking for themselves, the local supervisor): after a failed
/// solve the rescue runs and the plot does not; a restart of only `plot` is refused
/// with the reason; a restart without `from` reruns solve and what waits for it, not
/// prep, and this time the plot runs and the rescue, not needed, does not.
async fn conditions_choose_what_runs_and_a_restart_reruns_only_what_did_not_succeed(s: Sched, t: TestStore) {
    let app = s.setup(&t).await;
    let me = s.owner();
    put(&app, "/api/v1/applications/solver", &solver_body(s.cluster())).await;
    let task = submit(&app, &me, "solver", s.cluster(), json!({})).await;
    let id = task["id"].as_str().unwrap().to_owned();
    let first = wait_for(&app, &me, &id, 180, "the first run to end", is_final).await;
    let st = |t: &Value, p: &str| phase(t, p)["state"].as_str().unwrap().to_owned();
    assert_eq!(first["state"], "failed", "{first:#}");
    assert_eq!((st(&first, "solve"), phase(&first, "solve")["exit_code"].as_i64()), ("failed".into(), Some(4)));
    assert_eq!(st(&first, "rescue"), "completed", "the rescue runs because solve failed: {first:#}");
    assert!(time_of(phase(&first, "solve"), "ended_at") <= time_of(phase(&first, "rescue"), "started_at"));
    assert_eq!(
        (st(&first, "plot"), phase(&first, "plot")["reason"].as_str()),
        ("cancelled".into(), Some("DependencyNeverSatisfied")),
        "{first:#}"
    );
    assert!(!output(&app, &me, &id, "plot", false).await.unwrap_or_default().contains("plot ran"));
    assert_eq!(st(&first, "report"), "completed", "report waits for ends only: {first:#}");

    // The task lists its restart choices, each with what it would rerun or why not.
    let choices = &first["restart_choices"];
    assert_eq!(choices[0], json!({ "reruns": ["solve", "rescue", "plot", "report"] }), "{choices:#}");
    let from = |p: &str| choices.as_array().unwrap().iter().find(|c| c["from"] == p).unwrap().clone();
    assert_eq!(from("rescue")["reruns"], json!(["rescue", "report"]));
    assert!(from("plot")["refused"].as_str().unwrap().contains("waits for `solve` to have succeeded"), "{choices:#}");
    // Only the plot: it waits for solve to succeed, which it did not.
    let (code, v) =
        call(&app, Method::POST, &format!("/api/v1/tasks/{id}/restart"), &me, Some(&json!({ "from": "plot" }))).await;
    assert_eq!(code, StatusCode::CONFLICT, "{v}");
    assert!(v["message"].as_str().unwrap().contains("it waits for `solve` to have succeeded"), "{v}");

    // What did not succeed, and what waits for it.
    let (code, v) = call(&app, Method::POST, &format!("/api/v1/tasks/{id}/restart"), &me, Some(&json!({}))).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{v}");
    let again =
        wait_for(&app, &me, &id, 180, "the rerun to end", |t| is_final(t) && phase(t, "solve")["attempt"] == 2).await;
    assert_eq!(again["state"], "completed", "a rescue not needed is no failure: {again:#}");
    assert_eq!(phase(&again, "prep")["attempt"], 1, "prep succeeded and keeps its run");
    assert_eq!(job(&again, "prep"), job(&first, "prep"));
    for p in ["solve", "rescue", "plot", "report"] {
        assert_eq!(phase(&again, p)["attempt"], 2, "{p} reruns: {again:#}");
    }
    assert_eq!(st(&again, "solve"), "completed");
    assert_eq!(st(&again, "plot"), "completed");
    assert_eq!(st(&again, "rescue"), "cancelled", "solve succeeded, so no rescue: {again:#}");
    assert_eq!(phase(&again, "rescue")["reason"], "DependencyNeverSatisfied");
    assert!(output(&app, &me, &id, "plot", false).await.unwrap_or_default().contains("plot ran"));
}

/// A failed phase, the application fixed, and the task rerun with the fixed version:
/// forged again from the current definitions with the task's own inputs, stored as a
/// new version of its scripts; the phases not rerun keep the scripts they ran. A
/// current version with other phases is refused with the reason, and nothing changes.
async fn a_restart_with_the_current_definitions_runs_the_fixed_script(s: Sched, t: TestStore) {
    let app = s.setup(&t).await;
    let me = s.owner();
    let broken = "#!/bin/bash\necho \"execute v1 for @@ sleep @@ s\"\nexit 3\n";
    put(&app, "/api/v1/applications/fixme", &variant("fixme", &[("app_execute", broken)])).await;
    let task = submit(&app, &me, "fixme", s.cluster(), json!({ "sleep": 2 })).await;
    let id = task["id"].as_str().unwrap().to_owned();
    let first = wait_for(&app, &me, &id, 120, "the task to fail", is_final).await;
    assert_eq!(first["state"], "failed", "{first:#}");
    let fixed = "#!/bin/bash\necho \"execute v2 for @@ sleep @@ s\"\n";
    put(&app, "/api/v1/applications/fixme", &variant("fixme", &[("app_execute", fixed)])).await;
    // Recorded definitions (the default) would rerun the broken script; ask for the current ones.
    let body = json!({ "definitions": "current" });
    let (code, v) = call(&app, Method::POST, &format!("/api/v1/tasks/{id}/restart"), &me, Some(&body)).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{v}");
    let again =
        wait_for(&app, &me, &id, 120, "the rerun to end", |t| is_final(t) && phase(t, "execute")["attempt"] == 2).await;
    assert_eq!(again["state"], "completed", "{again:#}");
    assert_eq!(again["application"]["version"], 2, "{again:#}");
    assert_eq!(phase(&again, "prolog")["attempt"], 1, "the prolog succeeded and was not rerun");
    let out = output(&app, &me, &id, "execute", false).await.unwrap_or_default();
    assert!(out.contains("execute v2 for 2 s"), "the fixed script ran, with the task's own input: {out}");
    let script = |phase: &'static str| {
        let app = &app;
        let (id, me) = (id.clone(), me.clone());
        async move {
            let r = app.req(Method::GET, &format!("/api/v1/tasks/{id}/scripts/{phase}"), &me).await.send().await;
            r.unwrap().text().await.unwrap()
        }
    };
    assert!(script("execute").await.contains("execute v2"), "the task shows the script it ran now");
    assert_ne!(phase(&again, "execute")["script_sha256"], phase(&first, "execute")["script_sha256"]);
    assert_eq!(phase(&again, "prolog")["script_sha256"], phase(&first, "prolog")["script_sha256"]);
    assert_eq!(phase(&again, "prolog")["script_version"], 1, "{again:#}");
    let events: Vec<&str> =
        again["events"].as_array().unwrap().iter().map(|e| e["message"].as_str().unwrap()).collect();
    assert!(
        events.iter().any(|e| e.starts_with("forged again for the restart: application fixme v1 → v2")),
        "{events:#?}"
    );

    // A version with other phases cannot run this task: refused, and nothing changes.
    let mut other = variant("fixme", &[]);
    other["definition"]["phases"] = json!([{ "name": "prolog" }, { "name": "execute" }, { "name": "epilog" }]);
    put(&app, "/api/v1/applications/fixme", &other).await;
    let before = crate::mediator::get_task(&app, &me, &id).await;
    let body = json!({ "from": "execute", "definitions": "current" });
    let (code, v) = call(&app, Method::POST, &format!("/api/v1/tasks/{id}/restart"), &me, Some(&body)).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["errors"][0]["pointer"], "/definitions", "{v}");
    assert!(v["errors"][0]["message"].as_str().unwrap().contains("has other phases or waits"), "{v}");
    let after = crate::mediator::get_task(&app, &me, &id).await;
    // Not the revision: the monitor may still be writing what the ended jobs used.
    let restartable = |t: &Value| {
        let phases: Vec<Value> = t["phases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| json!([p["phase"], p["state"], p["attempt"], p["job_id"], p["script_sha256"]]))
            .collect();
        json!([t["state"], t["application"], t["scripts_version"], phases])
    };
    assert_eq!(restartable(&after), restartable(&before), "a refused restart changes nothing");
}

/// Every value of the forge's hostile corpus (quotes, command substitutions, here-
/// document delimiters, markup, directive look-alikes, Unicode) as one task's inputs:
/// the job receives each byte for byte, and none of the commands in them runs (each
/// would create the canary file).
async fn hostile_values_reach_the_job_intact_and_nothing_in_them_runs(s: Sched, t: TestStore) {
    let app = s.setup(&t).await;
    let me = s.owner();
    let canary = format!("/tmp/hpcforge-canary-{}", uuid::Uuid::new_v4().simple());
    let values = crate::forge::corpus(std::path::Path::new(&canary));
    let mut body = variant("hostile", &[]);
    body["definition"]["inputs"] = values
        .iter()
        .enumerate()
        .map(|(i, _)| json!({ "name": format!("v{i}"), "type": "string", "required": false }))
        .collect();
    // `sleep`'s prolog and epilog, kept here, read this one.
    body["definition"]["inputs"].as_array_mut().unwrap().push(json!({ "name": "sleep", "type": "int", "value": 0 }));
    let mut execute = String::from("#!/bin/bash\n");
    for i in 0..values.len() {
        execute.push_str(&format!("printf 'V{i} %s\\n' \"$(printf '%s' @@ v{i} @@ | base64 -w0)\"\n"));
    }
    body["files"]["app_execute"] = json!(execute);
    put(&app, "/api/v1/applications/hostile", &body).await;
    let inputs: serde_json::Map<String, Value> =
        values.iter().enumerate().map(|(i, v)| (format!("v{i}"), json!(v))).collect();
    let task = submit(&app, &me, "hostile", s.cluster(), Value::Object(inputs)).await;
    let id = task["id"].as_str().unwrap();
    let done = wait_for(&app, &me, id, 120, "the task to end", is_final).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    let (st, v) = call(&app, Method::GET, &format!("/api/v1/tasks/{id}/output/execute?lines=1000"), &me, None).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let out = v["data"]["text"].as_str().unwrap();
    use base64::Engine as _;
    for (i, value) in values.iter().enumerate() {
        let line = out.lines().find_map(|l| l.strip_prefix(&format!("V{i} "))).unwrap_or_else(|| panic!("v{i}: {out}"));
        let got = base64::engine::general_purpose::STANDARD.decode(line.trim()).unwrap();
        assert!(got == value.as_bytes(), "corpus #{i} arrived changed: {:?}", String::from_utf8_lossy(&got));
    }
    assert!(!std::path::Path::new(&canary).exists(), "a command in a value ran on {s:?}");
}

/// A phase that asks for two CPUs is given two by the scheduler (Slurm's
/// `--cpus-per-task`, Grid Engine's slots in the cluster's parallel environment), and
/// its threaded code is told so (`OMP_NUM_THREADS`, which the default templates set
/// from the scheduler's grant).
async fn a_phase_asking_for_two_cpus_is_given_two_by_the_scheduler(s: Sched, t: TestStore) {
    let app = s.setup(&t).await;
    let me = s.owner();
    let mut body = variant("wide", &[("app_execute", "#!/bin/bash\necho \"threads: $OMP_NUM_THREADS\"\n")]);
    body["definition"]["resources"]["execute"]["cpus"] = json!(2);
    put(&app, "/api/v1/applications/wide", &body).await;
    let task = submit(&app, &me, "wide", s.cluster(), json!({})).await;
    let id = task["id"].as_str().unwrap();
    let done = wait_for(&app, &me, id, 120, "the task to end", is_final).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    let out = output(&app, &me, id, "execute", false).await.unwrap_or_default();
    assert!(out.contains("threads: 2\n"), "{s:?} gave execute other than 2 CPUs: {out}");
}

/// Hole 4 of issue 9 (a job stopped at its wall time read as failed or unknown).
async fn a_job_over_its_wall_time_ends_as_timeout_and_the_epilog_still_runs(s: Sched, t: TestStore) {
    let app = s.setup(&t).await;
    let me = s.owner();
    let (limit, signal, reason) = s.wall_time_story();
    let mut body = variant("overtime", &[("app_execute", "#!/bin/bash\necho going long\nsleep 600\n")]);
    body["definition"]["resources"]["execute"]["walltime"] = json!(limit);
    put(&app, "/api/v1/applications/overtime", &body).await;
    let task = submit(&app, &me, "overtime", s.cluster(), json!({})).await;
    let id = task["id"].as_str().unwrap();
    let done = wait_for(&app, &me, id, 240, "the task to end", is_final).await;
    let exe = phase(&done, "execute");
    assert_eq!((exe["state"].as_str(), exe["signal"].as_i64()), (Some("timeout"), Some(signal)), "{done:#}");
    assert_eq!(exe["reason"], reason, "{done:#}");
    assert!(exe["explanation"].as_str().unwrap().contains("wall-time limit"), "{done:#}");
    assert_eq!(done["state"], "failed");
    assert_eq!(phase(&done, "epilog")["state"], "completed", "the epilog runs after a timeout too");
    assert!(output(&app, &me, id, "execute", false).await.unwrap_or_default().contains("going long"));
}

async fn an_unreachable_cluster_blocks_the_task_until_it_is_back(s: Sched, t: TestStore) {
    let app = s.setup(&t).await;
    let me = s.owner();
    let mut flaky = cluster_body(s.cluster());
    flaky["definition"]["name"] = json!("flaky");
    flaky["definition"]["port"] = json!(1);
    // An absolute base: nothing needs the cluster before submission.
    flaky["definition"]["run_dir_base"] = json!("/home/{user}/hpcforge");
    put(&app, "/api/v1/clusters/flaky", &flaky).await;
    register_key(&app, &me, "flaky").await;
    put(&app, "/api/v1/applications/sleepy", &variant("sleepy", &[("cluster/flaky", "true\n")])).await;
    let task = submit(&app, &me, "sleepy", "flaky", json!({ "sleep": 1 })).await;
    let id = task["id"].as_str().unwrap();
    assert_eq!(task["state"], "blocked", "{task:#}");
    assert!(phase(&task, "prolog")["reason"].as_str().unwrap().contains("Connection refused"), "{task:#}");
    assert!(s.jobs_of(id).await.is_empty(), "nothing reached the scheduler");
    // The cluster comes back (its definition is fixed): the task goes through.
    flaky["definition"]["port"] = json!(test_env().ssh_port);
    put(&app, "/api/v1/clusters/flaky", &flaky).await;
    let done = wait_for(&app, &me, id, 120, "the task to recover and end", is_final).await;
    assert_eq!(done["state"], "completed", "{done:#}");
    assert!(done["events"].as_array().unwrap().iter().any(|e| e["message"].as_str().unwrap().contains("→ blocked")));
    for p in ["prolog", "execute", "epilog"] {
        assert!(s.is_job_id(&job(&done, p), p), "{done:#}");
    }
}

/// The server dies between the submission and the database write (a failpoint aborts
/// it there); after a restart on the same data directory the scheduler holds exactly
/// one job per phase, and the task knows their IDs. The prolog sleeps, so every job is
/// still queued or running when the scheduler is asked (Grid Engine keeps no tag of
/// ended jobs), and a second submission after the restart would show.
async fn a_server_killed_right_after_submitting_leaves_exactly_one_job_per_phase(s: Sched) {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Server::start(dir.path(), &["--no-examples"], &[("HPCFORGE_FAILPOINT", "after-submit")]);
    let admin = first.token("admin", "admin");
    let me = s.owner();
    let owner = first.token(&me, "user");
    let http = crate::helpers::http();
    let put_json = |path: String, body: Value| {
        let (http, admin, base) = (http.clone(), admin.clone(), first.base.clone());
        async move {
            let resp = http.put(format!("{base}{path}")).bearer_auth(admin).json(&body).send().await.unwrap();
            assert!(resp.status().is_success(), "{path}: {}", resp.text().await.unwrap());
        }
    };
    let slow = variant("slowstart", &[("app_prolog", "#!/bin/bash\nsleep 20\n")]);
    put_json("/api/v1/applications/slowstart".into(), slow).await;
    put_json(format!("/api/v1/clusters/{}", s.cluster()), cluster_body(s.cluster())).await;
    if s != Sched::Local {
        let key = std::fs::read_to_string(&test_env().keys[&me]).unwrap();
        put_json(format!("/api/v1/credentials/{me}/{}", s.cluster()), json!({ "private_key": key })).await;
    }
    let resp = http
        .post(format!("{}/api/v1/tasks", first.base))
        .bearer_auth(&owner)
        .json(&json!({ "application": "slowstart", "cluster": s.cluster(), "inputs": { "sleep": 1 } }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let id = resp.json::<Value>().await.unwrap()["data"]["id"].as_str().unwrap().to_owned();
    // The submission reaches the scheduler, then the server aborts before recording it.
    let status = tokio::task::spawn_blocking(move || {
        let st = first.wait_exit(Duration::from_secs(60));
        drop(first);
        st
    })
    .await
    .unwrap()
    .expect("the failpoint aborts the server");
    assert!(!status.success(), "{status}");
    let before = s.jobs_of(&id).await;
    let phases: Vec<&str> = before.iter().map(|j| j.phase.as_str()).collect();
    assert_eq!(phases, ["epilog", "execute", "prolog"], "the jobs reached {s:?} before the abort: {before:?}");

    // The same data directory (store and server key), no failpoint.
    let second = Server::start(dir.path(), &["--no-examples"], &[]);
    let fetch = || async {
        crate::helpers::get_json(&format!("{}/api/v1/tasks/{id}", second.base), &owner).await["data"].clone()
    };
    let start = Instant::now();
    let task = loop {
        let t = fetch().await;
        if t["phases"].as_array().unwrap().iter().all(|p| p["job_id"].is_string()) {
            break t;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the restarted server did not recover the jobs: {t:#}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let after = s.jobs_of(&id).await;
    assert_eq!(after, before, "no job was submitted twice");
    for j in &after {
        assert_eq!(job(&task, &j.phase), j.id, "the task records the job {s:?} has for {}", j.phase);
    }
    assert!(
        task["events"].as_array().unwrap().iter().any(|e| e["message"].as_str().unwrap().contains("found again")),
        "{task:#}"
    );
    let done = loop {
        let t = fetch().await;
        if is_final(&t) {
            break t;
        }
        assert!(start.elapsed() < Duration::from_secs(150), "{t:#}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(done["state"], "completed", "{done:#}");
    drop(second);
}

/// One module per scheduler: `scheduler_contract::<scheduler>::{embedded,mongodb}::<scenario>`,
/// the scenarios on the scheduler's clock in `<scheduler>::embedded_only`, and
/// `<scheduler>::a_server_killed_...` (on its own data directory).
macro_rules! scheduler_module {
    ($module:ident, $sched:ident, [$($test:ident),* $(,)?], clock: [$($slow:ident),* $(,)?]) => {
        mod $module {
            use super::*;
            $crate::tests_on_store!(embedded, Embedded, with: super::Sched::$sched, $($test),*);
            $crate::tests_on_store!(mongodb, Mongo, with: super::Sched::$sched, $($test),*);
            // Waiting on the scheduler's own clock: one store is enough, nothing in
            // these depends on which.
            $crate::tests_on_store!(embedded_only, Embedded, with: super::Sched::$sched, $($slow),*);
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_server_killed_right_after_submitting_leaves_exactly_one_job_per_phase() {
                super::a_server_killed_right_after_submitting_leaves_exactly_one_job_per_phase(Sched::$sched).await;
            }
        }
    };
}

/// The contract: `every` scenario for every scheduler; `scheduler` ones for those with
/// a scheduler of their own reached over SSH (a connection to lose, a daemon that
/// refuses, limits and CPUs it grants); `clock` ones (waiting on the scheduler's own
/// clock) for those too, on one store.
macro_rules! scheduler_contract {
    (every: [$($test:ident),* $(,)?], scheduler: [$($ssh:ident),* $(,)?], clock: [$($slow:ident),* $(,)?] $(,)?) => {
        scheduler_module!(slurm, Slurm, [$($test,)* $($ssh,)*], clock: [$($slow),*]);
        scheduler_module!(grid_engine, GridEngine, [$($test,)* $($ssh,)*], clock: [$($slow),*]);
        // `local` has no connection to be unreachable and no scheduler to refuse a
        // job, grant CPUs or stop it at a wall-time limit.
        scheduler_module!(local, Local, [$($test),*], clock: []);
    };
}

scheduler_contract!(
    every: [
        a_task_runs_as_its_user_with_its_phases_in_order,
        a_failing_execute_still_runs_the_epilog_and_the_task_fails_with_its_exit_code,
        a_failed_prolog_stops_execute_but_the_epilog_runs,
        cancel_stops_running_jobs_and_cancels_the_rest,
        restart_from_execute_reruns_only_execute_and_epilog,
        one_user_cannot_see_or_act_on_anothers_task,
        hostile_values_reach_the_job_intact_and_nothing_in_them_runs,
        the_workflow_example_runs_each_phase_after_the_phases_it_needs,
        conditions_choose_what_runs_and_a_restart_reruns_only_what_did_not_succeed,
        a_restart_with_the_current_definitions_runs_the_fixed_script,
    ],
    scheduler: [
        a_scheduler_refusal_fails_the_phase_with_the_schedulers_own_words,
        a_phase_asking_for_two_cpus_is_given_two_by_the_scheduler,
        an_unreachable_cluster_blocks_the_task_until_it_is_back,
    ],
    clock: [a_job_over_its_wall_time_ends_as_timeout_and_the_epilog_still_runs],
);

/// A phase over a frame range becomes one job array; each frame runs with
/// `HPCG_FRAME`, two per job side by side, and the task counts what they did, listing
/// the failed frame with its exit status. A phase waiting frame by frame runs each
/// frame only once the same frame rendered, and never the frame that failed. A
/// restart reruns only the failed frame (and the frames waiting on it), then a
/// restart of one chosen frame reruns just that frame.
async fn a_frame_phase_runs_as_one_job_array_and_counts_its_frames(s: Sched, t: TestStore) {
    let app = s.setup(&t).await;
    let me = s.owner();
    let body = json!({
        "definition": {
            "name": "frames",
            "inputs": [{ "name": "frames", "type": "range", "value": "1-5" }],
            "phases": [
                { "name": "render", "frames": "frames", "frames_per_job": 2, "max_parallel": 2 },
                { "name": "check", "frames": "frames", "frames_per_job": 2,
                  "after": [{ "phase": "render", "per_frame": true }] },
                { "name": "gather", "after": [{ "phase": "render", "when": "ended" }, { "phase": "check", "when": "ended" }] }
            ],
            "resources": { "default": { "cpus": 2, "walltime": "00:05:00" } }
        },
        "files": {
            // Frame 4 fails the first time it runs (a flaky frame), then succeeds.
            "app_render": "#!/bin/bash\necho \"ran $HPCG_FRAME\" >> runs.log\necho \"frame $HPCG_FRAME\" > \"frame-$HPCG_FRAME.txt\"\nif [ \"$HPCG_FRAME\" = 4 ] && [ ! -e failed-once ]; then touch failed-once; exit 1; fi\n",
            "app_check": "#!/bin/bash\ngrep -qx \"frame $HPCG_FRAME\" \"frame-$HPCG_FRAME.txt\" && echo \"checked $HPCG_FRAME\" >> checks.log\n",
            "app_gather": "#!/bin/bash\ncat frame-*.txt; sort -n -k2 runs.log | tr '\\n' ' '; echo; sort -n -k2 checks.log | tr '\\n' ' '; echo\n",
            format!("cluster/{}", s.cluster()): "true\n",
        }
    });
    put(&app, "/api/v1/applications/frames", &body).await;
    let task = submit(&app, &me, "frames", s.cluster(), json!({})).await;
    let id = task["id"].as_str().unwrap().to_owned();
    let render = phase(&task, "render");
    assert_eq!(render["frames"]["total"], 5, "{task:#}");
    let done = wait_for(&app, &me, &id, 120, "the task to end", is_final).await;
    let render = phase(&done, "render");
    assert_eq!(render["state"], "failed", "{done:#}");
    assert_eq!(
        (render["frames"]["completed"].as_u64(), render["frames"]["failed"].as_u64()),
        (Some(4), Some(1)),
        "{done:#}"
    );
    assert_eq!(render["frames"]["failures"], json!([{ "frame": 4, "exit_code": 1 }]));
    // Frame by frame: check did not run frame 4 (Slurm holds back the whole element
    // holding it, so frame 3 may wait too), and failed for it.
    let check = phase(&done, "check");
    assert_eq!(check["state"], "failed", "{done:#}");
    assert_eq!(phase(&done, "gather")["state"], "completed", "{done:#}");
    let out = output(&app, &me, &id, "gather", false).await.unwrap_or_default();
    for f in 1..=5 {
        assert!(out.contains(&format!("frame {f}")), "{out}");
    }
    assert!(out.contains("ran 1 ran 2 ran 3 ran 4 ran 5 \n"), "{out}");
    for f in [1, 2, 5] {
        assert!(out.contains(&format!("checked {f} ")), "{out}");
    }
    assert!(!out.contains("checked 4"), "frame 4 of check waited for frame 4 of render, which failed: {out}");
    // Frame by frame detail, paged, read from the records on the cluster.
    let get = |path: String| {
        let (app, me) = (&app, &me);
        async move {
            let (st, v) = call(app, Method::GET, &path, me, None).await;
            assert_eq!(st, StatusCode::OK, "{path}: {v:#}");
            v["data"].clone()
        }
    };
    let failed = get(format!("/api/v1/tasks/{id}/frames/render?state=failed")).await;
    assert_eq!((failed["matched"].as_u64(), failed["frames"][0]["frame"].as_u64()), (Some(1), Some(4)), "{failed:#}");
    assert_eq!(
        (failed["frames"][0]["state"].as_str(), failed["frames"][0]["exit_code"].as_i64()),
        (Some("failed"), Some(1))
    );
    let page = get(format!("/api/v1/tasks/{id}/frames/render?offset=2&limit=2")).await;
    let states: Vec<(u64, &str)> = page["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["frame"].as_u64().unwrap(), f["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states, [(3, "completed"), (4, "failed")], "{page:#}");
    assert_eq!((page["total"].as_u64(), page["next_offset"].as_u64()), (Some(5), Some(4)), "{page:#}");
    // Each frame measured itself: its CPU time and its node.
    for f in page["frames"].as_array().unwrap() {
        assert!(f["cpu_seconds"].as_f64().is_some_and(|c| c >= 0.0), "{f:#}");
        assert!(f["node"].as_str().is_some_and(|n| !n.is_empty()), "{f:#}");
    }
    let check_page = get(format!("/api/v1/tasks/{id}/frames/check")).await;
    assert_eq!(check_page["frames"][3]["state"], "not_run", "{check_page:#}");
    assert!(check_page["frames"][0]["job"].as_str().is_some_and(|j| j.contains('_')), "{check_page:#}");

    // Restart what did not succeed: frame 4 of render, check's frames that did not
    // run, and gather (which waits for all of render).
    let (st, v) = call(&app, Method::POST, &format!("/api/v1/tasks/{id}/restart"), &me, Some(&json!({}))).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v:#}");
    let render = phase(&v["data"], "render");
    assert_eq!(
        (render["frames"]["selection"].as_str(), render["frames"]["completed"].as_u64()),
        (Some("4"), Some(4)),
        "{v:#}"
    );
    let again = wait_for(&app, &me, &id, 120, "the restarted task to end", is_final).await;
    assert_eq!(again["state"], "completed", "{again:#}");
    for p in ["render", "check"] {
        let f = &phase(&again, p)["frames"];
        assert_eq!((f["completed"].as_u64(), f["failed"].as_u64()), (Some(5), Some(0)), "{p}: {again:#}");
    }
    let out = output(&app, &me, &id, "gather", false).await.unwrap_or_default();
    assert!(out.contains("ran 1 ran 2 ran 3 ran 4 ran 4 ran 5 \n"), "only frame 4 rendered again: {out}");
    assert!(out.contains("checked 1 checked 2 checked 3 checked 4 checked 5 \n"), "each frame checked once: {out}");

    // One chosen frame: render frame 2 again, and check's frame 2 after it.
    let ask = json!({ "from": "render", "frames": "2" });
    let (st, v) = call(&app, Method::POST, &format!("/api/v1/tasks/{id}/restart"), &me, Some(&ask)).await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v:#}");
    let bad = json!({ "from": "gather", "frames": "2" });
    let third = wait_for(&app, &me, &id, 120, "the third run to end", is_final).await;
    assert_eq!(third["state"], "completed", "{third:#}");
    let out = output(&app, &me, &id, "gather", false).await.unwrap_or_default();
    assert!(out.contains("ran 1 ran 2 ran 2 ran 3 ran 4 ran 4 ran 5 \n"), "{out}");
    assert!(out.contains("checked 1 checked 2 checked 2 checked 3 checked 4 checked 5 \n"), "{out}");
    let (st, v) = call(&app, Method::POST, &format!("/api/v1/tasks/{id}/restart"), &me, Some(&bad)).await;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{v:#}");
    assert!(v.to_string().contains("`gather` does not run per frame"), "{v:#}");
}

/// The `render` example end to end: twelve frames rendered four per job, measured
/// frame by frame, bundled. Frame 7 fails the first time (`flaky_frame`), so render
/// and gather fail and bundle never runs; a restart with no arguments reruns frame 7
/// of render, the frames of gather that did not run, and bundle, and the task
/// completes with every frame rendered once but frame 7.
async fn the_render_example_reruns_only_its_failed_frame(s: Sched, t: TestStore) {
    let app = s.setup(&t).await;
    let me = s.owner();
    put(&app, "/api/v1/applications/render", &crate::mediator::app_body("render")).await;
    let inputs = json!({ "frames": "1-12", "width": 48, "height": 36, "iterations": 60, "flaky_frame": 7 });
    let task = submit(&app, &me, "render", s.cluster(), inputs).await;
    let id = task["id"].as_str().unwrap().to_owned();
    let gather_waits = &phase(&task, "gather")["after"];
    assert_eq!(gather_waits, &json!([{ "phase": "render", "when": "succeeded", "per_frame": true }]), "{task:#}");
    let first = wait_for(&app, &me, &id, 180, "the render to end", is_final).await;
    assert_eq!(first["state"], "failed", "{first:#}");
    let render = &phase(&first, "render")["frames"];
    assert_eq!((render["total"].as_u64(), render["completed"].as_u64()), (Some(12), Some(11)), "{first:#}");
    assert_eq!(render["failures"], json!([{ "frame": 7, "exit_code": 1 }]), "{first:#}");
    assert_eq!(phase(&first, "gather")["state"], "failed", "{first:#}");
    assert_eq!(phase(&first, "bundle")["state"], "cancelled", "{first:#}");
    // Without `from`, the restart reruns render's failed frame and what waits for it.
    let choice = &first["restart_choices"][0];
    assert_eq!(choice["reruns"], json!(["render", "gather", "bundle"]), "{first:#}");

    let (code, v) = call(&app, Method::POST, &format!("/api/v1/tasks/{id}/restart"), &me, Some(&json!({}))).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{v}");
    assert_eq!(phase(&v["data"], "render")["frames"]["selection"], "7", "{v:#}");
    let again = wait_for(&app, &me, &id, 180, "the rerun to end", is_final).await;
    assert_eq!(again["state"], "completed", "{again:#}");
    let out = output(&app, &me, &id, "bundle", false).await.expect("bundle wrote its output");
    assert!(out.contains("bundle: 12 frames in render.tar.gz"), "{out}");
    let once: Vec<String> = (1..=12).map(|f| format!("{f}x{}", if f == 7 { 2 } else { 1 })).collect();
    assert!(out.contains(&format!("renders: {}", once.join(" "))), "only frame 7 rendered again: {out}");
    let events: Vec<&str> =
        again["events"].as_array().unwrap().iter().map(|e| e["message"].as_str().unwrap()).collect();
    assert!(
        events.iter().any(|e| e.starts_with("restart of what did not succeed (render frames 7, gather frames ")),
        "{events:#?}"
    );
    // Each gather frame posted its measurement once (frame 7's only in the rerun), and
    // each post says its frame.
    let started = Instant::now();
    loop {
        let t = crate::mediator::get_task(&app, &me, &id).await;
        let mut measured: Vec<u64> = t["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["post"]["event"] == "measured")
            .map(|e| {
                assert_eq!(e["post"]["data"]["frame"], e["post"]["frame"], "{e:#}");
                assert_eq!(e["phase"], "gather", "{e:#}");
                e["post"]["frame"].as_u64().unwrap()
            })
            .collect();
        measured.sort_unstable();
        if measured.len() >= 12 {
            assert_eq!(measured, (1..=12).collect::<Vec<u64>>(), "{t:#}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the frames' posts: {measured:?} {t:#}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Frames on each scheduler, on the embedded store (the store's part is the same as
/// for any phase).
mod frames {
    crate::tests_on_store!(local, Embedded, with: super::Sched::Local, a_frame_phase_runs_as_one_job_array_and_counts_its_frames);
    crate::tests_on_store!(slurm, Embedded, with: super::Sched::Slurm, a_frame_phase_runs_as_one_job_array_and_counts_its_frames);
    crate::tests_on_store!(grid_engine, Embedded, with: super::Sched::GridEngine, a_frame_phase_runs_as_one_job_array_and_counts_its_frames);
    use super::*;
}

/// The render example on each scheduler: on Slurm on both stores, elsewhere on the
/// embedded one.
mod render_example {
    crate::tests_on_store!(local, Embedded, with: super::Sched::Local, the_render_example_reruns_only_its_failed_frame);
    crate::tests_on_store!(slurm, Embedded, with: super::Sched::Slurm, the_render_example_reruns_only_its_failed_frame);
    crate::tests_on_store!(slurm_mongo, Mongo, with: super::Sched::Slurm, the_render_example_reruns_only_its_failed_frame);
    crate::tests_on_store!(grid_engine, Embedded, with: super::Sched::GridEngine, the_render_example_reruns_only_its_failed_frame);
    use super::*;
}
