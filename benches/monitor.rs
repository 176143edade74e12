//! One monitor tick over many live jobs, on a real store:
//!
//!     cargo bench --bench monitor -- --users 20 --tasks-per-user 250 --ticks 10
//!     cargo bench --bench monitor -- --store mongodb      # needs scripts/test-env (SecantusDB)
//!
//! The store holds `users × tasks-per-user` tasks of one Slurm cluster, each with its
//! prolog done, its execute job running and its epilog pending: two live jobs a task
//! (20 × 250 × 2 = 10,000 live jobs). Each tick runs the monitor's own code
//! (`monitor::tick_with`): it reads the live tasks, groups their jobs per (cluster,
//! user), and for each group takes the text `squeue -O ...` would print, fed through
//! the real Slurm parser (`Slurm::parse_status`), in the line format of
//! `tests/fixtures/slurm/squeue-O-all-states.txt`. Between ticks, `--changed` percent
//! of the running jobs (default 1 %) complete; the rest are unchanged.
//!
//! It prints per tick: the time, the tasks changed, and the store's writes (task
//! revisions that moved, counted from the store itself) and, on MongoDB, the commands
//! sent. The bar (issue 9): under 1 s a tick on the embedded store, writes equal to the
//! changed tasks.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hpcforge::mediator::monitor::{self, Statuses};
use hpcforge::mediator::{Mediator, MediatorConfig};
use hpcforge::model::{AppName, ClusterName, DefinitionRef, Phase, PhaseState, Task, UserName};
use hpcforge::scheduler::Scheduler as _;
use hpcforge::scheduler::common::b64;
use hpcforge::scheduler::slurm::Slurm;
use hpcforge::secrets::ServerKey;
use hpcforge::store::{Store, TaskFilter};

mod common;
use common::{arg, num, should_run, test_env};

/// Jobs of the execute phase that have completed (by job ID).
type Done = Arc<Mutex<BTreeSet<String>>>;

fn task(owner: &UserName, n: usize, now: time::OffsetDateTime) -> Task {
    let mut t = Task::new(
        owner.clone(),
        DefinitionRef { name: AppName::parse("sleep").unwrap(), version: 1 },
        DefinitionRef { name: ClusterName::parse("big").unwrap(), version: 1 },
        serde_json::json!([{ "name": "sleep", "type": "int", "value": 600 }]),
        &hpcforge::model::workflow::PhaseGraph::default_shape(),
        now,
    );
    for (i, p) in Phase::DEFAULT.into_iter().enumerate() {
        let job = (n * 3 + i + 1000).to_string();
        t.phase_mut(p).job_id = Some(job.clone());
        t.set_phase_state(now, p, PhaseState::Submitting, None);
        t.set_phase_state(now, p, PhaseState::Pending, Some(&format!("job {job}")));
    }
    t.set_phase_state(now, Phase::PROLOG, PhaseState::Running, None);
    t.phase_mut(Phase::PROLOG).started_at = Some(now);
    t.set_phase_state(now, Phase::PROLOG, PhaseState::Completed, Some("exit code 0"));
    t.phase_mut(Phase::PROLOG).exit_code = Some(0);
    t.phase_mut(Phase::EXECUTE).started_at = Some(hpcforge::store::to_millis(
        time::OffsetDateTime::parse("2026-11-22T04:15:12Z", &time::format_description::well_known::Rfc3339).unwrap(),
    ));
    t.phase_mut(Phase::EXECUTE).reason = None;
    t.set_phase_state(now, Phase::EXECUTE, PhaseState::Running, None);
    t.phase_mut(Phase::EPILOG).reason = Some("Dependency".into());
    t
}

/// What `squeue --states=all -u <user> -O <fields>` would print for `jobs`, wrapped as
/// the status script reports it, parsed by the real parser.
fn answer(jobs: &[hpcforge::scheduler::JobQuery], done: &BTreeSet<String>) -> Statuses {
    let mut text = String::new();
    for j in jobs {
        let (state, reason, end, exit) = match j.phase {
            Phase::EXECUTE if done.contains(&j.job_id) => ("COMPLETED", "None", "2026-11-22T05:15:12", "0"),
            Phase::EXECUTE => ("RUNNING", "None", "2026-11-23T04:15:12", "0"),
            _ => ("PENDING", "Dependency", "NONE", "0"),
        };
        let start = if j.phase == Phase::EXECUTE { "2026-11-22T04:15:12" } else { "N/A" };
        text.push_str(&format!("{}|{state}|{reason}|hpcforge:t:{}|{start}|{end}|{exit}\n", j.job_id, j.phase.as_str()));
    }
    Slurm { accounting: false }.parse_status(&format!("SQUEUE 0 {}\n", b64(&text)))
}

async fn revisions(store: &dyn Store) -> u64 {
    let all = TaskFilter::default();
    store.list_tasks(&all, usize::MAX).await.unwrap().iter().map(|t| t.revision).sum()
}

#[tokio::main]
async fn main() {
    if !should_run("benches/monitor.rs is a benchmark: cargo bench --bench monitor -- --ticks 10") {
        return;
    }
    let users = num("--users", 20);
    let per_user = num("--tasks-per-user", 250);
    let ticks = num("--ticks", 10);
    let changed_pct: f64 = arg("--changed", "1").parse().unwrap();
    let kind = arg("--store", "embedded");
    let dir = tempfile::tempdir().unwrap();
    let mut mongo = None;
    let store: Arc<dyn Store> = match kind.as_str() {
        "embedded" => Arc::new(hpcforge::store::embedded::EmbeddedStore::open(dir.path()).unwrap()),
        "mongodb" => {
            let uri = test_env().remove("HPCFORGE_TEST_MONGODB_URI").unwrap();
            let db = format!("bench_monitor_{}", std::process::id());
            let s = hpcforge::store::mongo::MongoStore::connect(&uri, &db, Default::default()).await.unwrap();
            mongo = Some(s.clone());
            Arc::new(s)
        }
        other => panic!("--store is embedded or mongodb, not {other}"),
    };
    let now = hpcforge::store::to_millis(time::OffsetDateTime::now_utc());
    let names: Vec<UserName> = (0..users).map(|i| UserName::parse(&format!("user{i:03}")).unwrap()).collect();
    let filled = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let mut running = Vec::new();
    for (u, name) in names.iter().enumerate() {
        for i in 0..per_user {
            let t = task(name, u * per_user + i, now);
            running.push(t.phase(Phase::EXECUTE).job_id.clone().unwrap());
            let store = store.clone();
            set.spawn(async move { store.insert_task(&t).await.unwrap() });
            while set.len() >= 8 {
                set.join_next().await.unwrap().unwrap();
            }
        }
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    let n_tasks = users * per_user;
    eprintln!("{kind}: {n_tasks} tasks, {} live jobs, stored in {:.1} s", n_tasks * 2, filled.elapsed().as_secs_f64());

    let key = Arc::new(ServerKey::from_bytes(&[9u8; 32]).unwrap());
    let forge = Arc::new(hpcforge::forge::Forge::new());
    let m = Mediator::new(store.clone(), forge, key, MediatorConfig::default(), Default::default());
    let done: Done = Default::default();
    let per_tick = ((running.len() as f64) * changed_pct / 100.0).round() as usize;
    println!("{:>5} {:>10} {:>8} {:>8} {:>8} {:>10}", "tick", "ms", "tasks", "changed", "writes", "commands");
    let mut times = Vec::new();
    for n in 0..=ticks {
        // Tick 0 settles nothing (no job changed yet); later ticks see `per_tick` more done.
        if n > 0 {
            let mut d = done.lock().unwrap();
            for j in running.iter().skip((n - 1) * per_tick).take(per_tick) {
                d.insert(j.clone());
            }
        }
        let before = revisions(store.as_ref()).await;
        let cmds = mongo.as_ref().map(|s| s.commands_sent());
        let snapshot = done.lock().unwrap().clone();
        let started = Instant::now();
        let report = monitor::tick_with(&m, |_, _, _, jobs| {
            let out = answer(jobs, &snapshot);
            Box::pin(async move { out })
        })
        .await
        .unwrap();
        let took = started.elapsed();
        let cmds = mongo.as_ref().zip(cmds).map(|(s, c)| s.commands_sent() - c);
        let writes = revisions(store.as_ref()).await - before;
        println!(
            "{n:>5} {:>10.1} {:>8} {:>8} {:>8} {:>10}",
            took.as_secs_f64() * 1000.0,
            report.tasks,
            report.changed,
            writes,
            cmds.map_or("-".into(), |c| c.to_string())
        );
        assert_eq!(writes as usize, report.changed, "every write is a changed task, and only those");
        if n > 0 {
            times.push(took.as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "median tick: {:.1} ms over {} live jobs of {n_tasks} tasks, {per_tick} jobs changed a tick ({kind} store; bar < 1000 ms on embedded)",
        median * 1000.0,
        n_tasks * 2
    );
    if let Some(s) = &mongo {
        let _ = s.database().drop().await;
    }
}
