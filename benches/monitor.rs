//! One monitor tick over many live jobs, on a real store:
//!
//!     cargo bench --bench monitor -- --users 20 --tasks-per-user 250 --ticks 10
//!     cargo bench --bench monitor -- --store mongodb      # needs scripts/test-env (SecantusDB)
//!     cargo bench --bench monitor -- --users 0 --frames 10000 --ticks 10
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
//! `--frames N` adds one task whose `render` phase runs N frames as one job array,
//! running (50 elements running, the rest pending, as `squeue` lists them). Its frames'
//! records are real files in a run directory, tallied each tick by the real script
//! (`common::frame_records_script`, run by `sh` here as it would run over SSH) and
//! parser; between ticks `--changed` percent of the frames (at least one) record how
//! they ended, one in ten failing. Bar (issue 12): 10,000 live frames, a tick under
//! 1 s, one store write a tick for the task whose counts moved.
//!
//! `--posts N` gives every task a run directory whose execute job posts N new event
//! lines (`HPCG_EVENTS`, about 70 bytes each) before each tick; the tick reads them
//! with the real script (`scheduler::posts`, run by `sh` over the real files) and
//! stores them as the tasks' events. Issue 13's figure: 1,000 running jobs each with
//! 100 new events a tick:
//!
//!     cargo bench --bench monitor -- --users 2 --tasks-per-user 500 --posts 100 --ticks 5
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
fn answer(
    jobs: &[hpcforge::scheduler::JobQuery],
    posts: &[hpcforge::scheduler::posts::PostsQuery],
    done: &BTreeSet<String>,
) -> Statuses {
    let mut text = String::new();
    for j in jobs {
        let (state, reason, end, exit) = match j.phase {
            Phase::EXECUTE if done.contains(&j.job_id) => ("COMPLETED", "None", "2026-11-22T05:15:12", "0"),
            Phase::EXECUTE => ("RUNNING", "None", "2026-11-23T04:15:12", "0"),
            _ => ("PENDING", "Dependency", "NONE", "0"),
        };
        let start = if j.phase == Phase::EXECUTE { "2026-11-22T04:15:12" } else { "N/A" };
        if j.frames {
            // 50 elements running, each its own line; the others pending, as one.
            for i in 1..=50 {
                text.push_str(&format!(
                    "{}|{}|{i}|RUNNING|None|hpcforge:t:render|2026-11-22T04:15:12|2026-11-23T04:15:12|0\n",
                    900_000 + i,
                    j.job_id
                ));
            }
            text.push_str(&format!(
                "{0}|{0}|51-100000|PENDING|JobArrayTaskLimit|hpcforge:t:render|N/A|NONE|0\n",
                j.job_id
            ));
            continue;
        }
        text.push_str(&format!(
            "{0}|{0}|N/A|{state}|{reason}|hpcforge:t:{1}|{start}|{end}|{exit}\n",
            j.job_id,
            j.phase.as_str()
        ));
    }
    let mut statuses = Slurm { accounting: false }.parse_status(&format!("SQUEUE 0 {}\n", b64(&text)))?;
    // The frames' records, tallied by the real script over the real files, and the
    // jobs' posts read by the real script from the real files.
    let script = String::from(hpcforge::scheduler::common::HELPERS)
        + &hpcforge::scheduler::common::frame_records_script(jobs)
        + &hpcforge::scheduler::posts::posts_script(posts);
    // On its standard input, as the engine sends it over SSH (`sh -s`): a long
    // script would not fit in one argument.
    let mut child = std::process::Command::new("sh")
        .arg("-s")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    }
    let sh = child.wait_with_output().unwrap();
    let body = String::from_utf8_lossy(&sh.stdout);
    for (job, tally) in hpcforge::scheduler::common::parse_frames(&body) {
        if let Some(st) = statuses.get_mut(&job) {
            st.frames = Some(tally);
        }
    }
    Ok(monitor::Answers { statuses, posts: hpcforge::scheduler::posts::parse_posts(&body), usage: Default::default() })
}

/// A task whose `render` phase runs `frames` frames as job array 777777, running, in
/// `run_dir`.
fn frame_task(frames: usize, run_dir: &str, now: time::OffsetDateTime) -> Task {
    let mut problems = hpcforge::model::Problems::default();
    let decl: hpcforge::model::workflow::PhaseDecl =
        toml::from_str("name = 'render'\nframes = 'frames'").expect("a phase");
    let graph = hpcforge::model::workflow::PhaseGraph::resolve(&[decl], &mut problems).unwrap();
    let mut t = Task::new(
        UserName::parse("framer").unwrap(),
        DefinitionRef { name: AppName::parse("render").unwrap(), version: 1 },
        DefinitionRef { name: ClusterName::parse("big").unwrap(), version: 1 },
        serde_json::json!([{ "name": "frames", "type": "range", "value": format!("1-{frames}") }]),
        &graph,
        now,
    );
    t.run_dir = run_dir.to_owned();
    let render = Phase::parse("render").unwrap();
    t.phase_mut(render).frames = Some(hpcforge::model::task::FrameProgress {
        range: format!("1-{frames}"),
        total: frames as u32,
        per_job: 1,
        max_parallel: Some(50),
        selection: None,
        completed: 0,
        failed: 0,
        failures: Vec::new(),
    });
    t.phase_mut(render).job_id = Some("777777".into());
    t.set_phase_state(now, render, PhaseState::Submitting, None);
    t.set_phase_state(now, render, PhaseState::Pending, Some("job 777777"));
    t.set_phase_state(now, render, PhaseState::Running, None);
    t
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
    let frames = num("--frames", 0);
    let run = tempfile::tempdir().unwrap();
    let records = run.path().join(".hpcforge/frames/render");
    if frames > 0 {
        std::fs::create_dir_all(&records).unwrap();
        store.insert_task(&frame_task(frames, run.path().to_str().unwrap(), now)).await.unwrap();
    }
    let posts = num("--posts", 0);
    let n_tasks = users * per_user;
    // Each task's run directory, when its jobs post.
    let post_files: Vec<std::path::PathBuf> = if posts > 0 {
        let mut files = Vec::new();
        let all = TaskFilter::default();
        for mut t in store.list_tasks(&all, usize::MAX).await.unwrap() {
            let dir = run.path().join(format!("t-{}", t.id));
            std::fs::create_dir_all(dir.join(".hpcforge/posts")).unwrap();
            files.push(dir.join(".hpcforge/posts/execute.jsonl"));
            let before = t.clone();
            t.run_dir = dir.to_str().unwrap().to_owned();
            store.update_task(&before, &t).await.unwrap();
        }
        files
    } else {
        Vec::new()
    };
    eprintln!("{kind}: {n_tasks} tasks, {} live jobs, stored in {:.1} s", n_tasks * 2, filled.elapsed().as_secs_f64());

    let key = Arc::new(ServerKey::from_bytes(&[9u8; 32]).unwrap());
    let forge = Arc::new(hpcforge::forge::Forge::new());
    let m = Mediator::new(store.clone(), forge, key, MediatorConfig::default(), Default::default());
    let done: Done = Default::default();
    let per_tick = ((running.len() as f64) * changed_pct / 100.0).round() as usize;
    println!(
        "{:>5} {:>10} {:>8} {:>8} {:>8} {:>10} {:>8}",
        "tick", "ms", "tasks", "changed", "writes", "commands", "posts"
    );
    let mut times = Vec::new();
    for n in 0..=ticks {
        // Tick 0 settles nothing (no job changed yet); later ticks see `per_tick` more done.
        if n > 0 {
            let mut d = done.lock().unwrap();
            for j in running.iter().skip((n - 1) * per_tick).take(per_tick) {
                d.insert(j.clone());
            }
            // Frames that ended since the last tick write their records.
            let step = ((frames as f64) * changed_pct / 100.0).round().max(1.0) as usize;
            for f in ((n - 1) * step + 1..=n * step).filter(|f| *f <= frames) {
                let rc = if f % 10 == 3 { 1 } else { 0 };
                let line = format!("{rc} 2026-11-22T04:15:12 2026-11-22T04:16:12 777777 {f}\n");
                std::fs::write(records.join(f.to_string()), line).unwrap();
            }
        }
        if n > 0 {
            for (k, f) in post_files.iter().enumerate() {
                use std::io::Write as _;
                let mut text = String::new();
                for i in 0..posts {
                    text.push_str(&format!(
                        "{{\"event\":\"step\",\"data\":{{\"i\":{}}},\"time\":\"2026-12-05T10:00:00Z\"}}\n",
                        (n - 1) * posts + i + k
                    ));
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(f)
                    .unwrap()
                    .write_all(text.as_bytes())
                    .unwrap();
            }
        }
        let before = revisions(store.as_ref()).await;
        let cmds = mongo.as_ref().map(|s| s.commands_sent());
        let snapshot = done.lock().unwrap().clone();
        let started = Instant::now();
        let report = monitor::tick_with(&m, |_, _, _, q| {
            let out = answer(q.jobs, q.posts, &snapshot);
            Box::pin(async move { out })
        })
        .await
        .unwrap();
        let took = started.elapsed();
        let cmds = mongo.as_ref().zip(cmds).map(|(s, c)| s.commands_sent() - c);
        let writes = revisions(store.as_ref()).await - before;
        let kept: u64 = if posts > 0 {
            store
                .list_tasks(&TaskFilter::default(), usize::MAX)
                .await
                .unwrap()
                .iter()
                .map(|t| u64::from(t.posted.kept))
                .sum()
        } else {
            0
        };
        println!(
            "{n:>5} {:>10.1} {:>8} {:>8} {:>8} {:>10} {:>8}",
            took.as_secs_f64() * 1000.0,
            report.tasks,
            report.changed,
            writes,
            cmds.map_or("-".into(), |c| c.to_string()),
            kept
        );
        assert_eq!(writes as usize, report.changed, "every write is a changed task, and only those");
        if n > 0 {
            times.push(took.as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "median tick: {:.1} ms over {} live jobs of {n_tasks} tasks{}, {per_tick} jobs changed a tick ({kind} store; bar < 1000 ms on embedded)",
        median * 1000.0,
        n_tasks * 2,
        if frames > 0 { format!(" and one job array of {frames} live frames") } else { String::new() }
    );
    if posts > 0 {
        println!("  each of the {n_tasks} running jobs posted {posts} new events before each tick");
    }
    if let Some(s) = &mongo {
        let _ = s.database().drop().await;
    }
}
