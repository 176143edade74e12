//! `hpcforge task ...`: submit (and watch), show, list, watch, output, cancel,
//! restart.

use std::path::PathBuf;

use anyhow::Context as _;
use std::process::ExitCode;

use clap::Subcommand;
use reqwest::Method;
use serde_json::Value;

use super::client::{Client, ClientError};
use super::output::{done, url_escape, when};
use super::{ServerArgs, client};
use crate::model::{Task, TaskEvent, TaskState};

/// `hpcforge task ...`
#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Submit a task (a JSON file: `{"application", "cluster", "inputs"}`; `-` for stdin).
    Submit {
        /// The task file.
        file: PathBuf,
        /// Follow the task until it ends; the exit code says whether it completed.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Show a task: its phases, jobs and events.
    Show {
        /// Task ID, or its URI (`hpcforge://<site>/tasks/<id>`).
        id: String,
        /// Print the task as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List your tasks (an admin: everyone's), newest first.
    List {
        /// Only in these states (comma-separated: running,pending).
        #[arg(long)]
        state: Option<String>,
        /// Only of this application.
        #[arg(long)]
        application: Option<String>,
        /// Only on this cluster.
        #[arg(long)]
        cluster: Option<String>,
        /// Only this user's (admins).
        #[arg(long)]
        owner: Option<String>,
        /// Only created at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// How many (all pages are followed until this many are shown).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Follow a task's events live until it ends.
    Watch {
        /// Task ID, or its URI (`hpcforge://<site>/tasks/<id>`).
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Print the end of a phase job's output, read on the cluster as the task's owner.
    Output {
        /// Task ID, or its URI (`hpcforge://<site>/tasks/<id>`).
        id: String,
        /// The phase.
        #[arg(default_value = "execute")]
        phase: crate::model::Phase,
        /// Standard error instead of standard output.
        #[arg(long)]
        stderr: bool,
        /// How many lines from the end.
        #[arg(long, default_value_t = 100)]
        lines: usize,
        /// A phase that runs per frame: this frame's own output.
        #[arg(long)]
        frame: Option<u32>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List the task's run directory on the cluster: kind, size, time, path.
    Files {
        /// Task ID, or its URI (`hpcforge://<site>/tasks/<id>`).
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Download one file of the task's run directory, or without PATH its outputs as
    /// one .tar.gz, streamed (to a file of the same name here unless `--output`; `-`
    /// for standard output).
    Download {
        /// Task ID, or its URI (`hpcforge://<site>/tasks/<id>`).
        id: String,
        /// The file, relative to the run directory; none: the outputs' tarball.
        path: Option<String>,
        /// Where to write it.
        #[arg(long, short)]
        output: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// One page of a frame phase's frames: state, exit status, times, job.
    Frames {
        /// Task ID, or its URI (`hpcforge://<site>/tasks/<id>`).
        id: String,
        /// The phase (one that runs per frame).
        phase: crate::model::Phase,
        /// Only `failed` or `completed` frames.
        #[arg(long)]
        state: Option<String>,
        /// Where the page starts.
        #[arg(long, default_value_t = 0)]
        offset: u32,
        /// Page size (at most 1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// The data the task's jobs posted: each key's newest value, or every value of one key.
    Data {
        /// Task ID, or its URI (`hpcforge://<site>/tasks/<id>`).
        id: String,
        /// Only this key, with every value it had, oldest first.
        key: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Cancel a task: phases not yet submitted, and live jobs.
    Cancel {
        /// Task ID, or its URI (`hpcforge://<site>/tasks/<id>`).
        id: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Run a phase and the ones after it again (keeping the history).
    Restart {
        /// Task ID, or its URI (`hpcforge://<site>/tasks/<id>`).
        id: String,
        /// The phase to start from (it and every phase that waits for it rerun).
        /// Without it, the phases that did not succeed rerun, with what waits for them.
        #[arg(long)]
        from: Option<crate::model::Phase>,
        /// With `--from` a phase that runs per frame: rerun these of its frames
        /// (`3,17,40-45`), with any others that did not succeed, and the same frames
        /// of the phases that wait for them frame by frame.
        #[arg(long)]
        frames: Option<String>,
        /// Forge the task again from the current versions of its application and
        /// cluster (with its recorded inputs) instead of rerunning its recorded scripts.
        #[arg(long)]
        current_definitions: bool,
        /// Rerun phases whose declared outputs are all newer than their inputs too.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// One line per phase: state, job, exit code, and what went wrong.
fn print_task(t: &crate::model::Task) {
    println!(
        "task {}  {}  ({} v{} on {} v{}, owner {})",
        t.id,
        t.state.as_str(),
        t.application.name,
        t.application.version,
        t.cluster.name,
        t.cluster.version,
        t.owner
    );
    if let Some(q) = &t.queue {
        println!(
            "  queued since {}{}: {}",
            super::output::when(q.since),
            if t.priority != 0 { format!(" (priority {})", t.priority) } else { String::new() },
            q.waiting_for.as_deref().unwrap_or("waiting for the queue's first look")
        );
    }
    if let Some(a) = &t.archive {
        println!("  outputs: {}", archive_line(a));
    }
    let width = t.phases.iter().map(|p| p.phase.as_str().len()).max().unwrap_or(8).max(8);
    for p in &t.phases {
        let mut line = format!(
            "  {:<width$} {:<12} job {:<14}",
            p.phase.as_str(),
            p.state.as_str(),
            p.job_id.as_deref().unwrap_or("-")
        );
        if let Some(f) = &p.frames {
            line.push_str(&format!(" frames {} ({}): {} done, {} failed", f.range, f.total, f.completed, f.failed));
            let left = f.unrecorded();
            if left > 0 {
                line.push_str(&format!(
                    ", {left} {}",
                    if p.state.is_final() { "did not run" } else { "to run or running" }
                ));
            }
            if let Some(sel) = &f.selection {
                line.push_str(&format!(" (this run: {sel})"));
            }
            let listed: Vec<String> =
                f.failures.iter().take(10).map(|x| format!("{} exit {}", x.frame, x.exit_code)).collect();
            if !listed.is_empty() {
                line.push_str(&format!(" [{}]", listed.join(", ")));
            }
        }
        let waits = t.waits_of(p.phase);
        if !waits.is_empty() {
            let w: Vec<String> = waits
                .iter()
                .map(|w| format!("{} {}{}", w.phase, w.when.as_str(), if w.per_frame { " per frame" } else { "" }))
                .collect();
            line.push_str(&format!(" (after {})", w.join(", ")));
        }
        if let Some(c) = p.exit_code {
            line.push_str(&format!(" exit {c}"));
        }
        if let Some(s) = p.signal {
            line.push_str(&format!(" signal {s}"));
        }
        if let Some(r) = p.reason.as_deref().or(p.explanation.as_deref()) {
            line.push_str(&format!("  {r}"));
        }
        println!("{line}");
        if let Some(m) = &p.scheduler_message {
            for l in m.lines() {
                println!("             | {l}");
            }
        }
        if let Some(u) = &p.usage {
            println!("             used: {}", crate::model::usage::describe(u));
        } else if p.usage_due {
            println!("             used: (being read)");
        }
    }
    // Once it ended: what each restart would rerun (`task restart ID [--from P]`).
    for c in crate::mediator::transitions::restart_choices(t) {
        let how = c.from.map_or_else(|| "restart".to_owned(), |p| format!("restart --from {p}"));
        match c.refused {
            Some(why) => println!("  {how}: refused ({why})"),
            None => {
                let reruns: Vec<&str> = c.reruns.iter().map(|p| p.as_str()).collect();
                println!("  {how}: reruns {}", reruns.join(", "));
            }
        }
    }
}

pub async fn task_command(cmd: TaskCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TaskCommand::Submit { file, watch, server } => {
            let body: Value = if file.as_os_str() == "-" {
                serde_json::from_reader(std::io::stdin())?
            } else {
                let text =
                    std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
                serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{} is not JSON: {e}", file.display()))?
            };
            let c = client(&server)?;
            let task = c.call::<Task>(Method::POST, "/api/v1/tasks?wait=submitted", Some(&body)).await?.data;
            print_task(&task);
            if !watch {
                return Ok(ExitCode::SUCCESS);
            }
            let seen = task.events.last().map_or(0, |e| e.seq);
            watch_to_end(&c, &task.id.to_string(), seen).await
        }
        TaskCommand::Watch { id, server } => {
            let c = client(&server)?;
            watch_to_end(&c, &segment(&id), 0).await
        }
        TaskCommand::Output { id, phase, stderr, lines, frame, server } => {
            let c = client(&server)?;
            let id = segment(&id);
            let mut path = format!(
                "/api/v1/tasks/{id}/output/{phase}?stream={}&lines={lines}",
                if stderr { "stderr" } else { "stdout" }
            );
            if let Some(f) = frame {
                path.push_str(&format!("&frame={f}"));
            }
            match c.call::<crate::mediator::OutputTail>(Method::GET, &path, None::<&()>).await {
                Ok(a) => {
                    eprintln!("==> {} <==", a.message);
                    print!("{}", a.data.text);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(e.into()),
            }
        }
        TaskCommand::Files { id, server } => {
            let (c, id) = (client(&server)?, segment(&id));
            let a = c
                .call::<crate::mediator::files::RunFiles>(
                    Method::GET,
                    &format!("/api/v1/tasks/{id}/files"),
                    None::<&()>,
                )
                .await?;
            eprintln!("{}", a.message);
            for f in &a.data.files {
                let kind = match f.kind {
                    crate::mediator::files::FileKind::File => "-",
                    crate::mediator::files::FileKind::Dir => "d",
                    crate::mediator::files::FileKind::Link => "l",
                    crate::mediator::files::FileKind::Other => "?",
                };
                println!("{kind} {:>12}  {}  {}", f.size, when(f.modified), f.path);
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::Download { id, path, output, server } => {
            let (c, id) = (client(&server)?, segment(&id));
            let (url, default_name) = match &path {
                Some(path) => {
                    let encoded: Vec<String> = path.split('/').map(segment).collect();
                    let name = path.rsplit('/').next().unwrap_or("download").to_owned();
                    (format!("/api/v1/tasks/{id}/files/{}", encoded.join("/")), name)
                }
                None => (format!("/api/v1/tasks/{id}/outputs.tar.gz"), format!("{id}-outputs.tar.gz")),
            };
            let path = path.unwrap_or_else(|| "the outputs".to_owned());
            let target = output.unwrap_or(default_name);
            let written = if target == "-" {
                c.download(&url, &mut std::io::stdout()).await?
            } else {
                // Written beside, then renamed: a broken transfer leaves no partial file.
                let part = format!("{target}.part");
                let mut file =
                    std::io::BufWriter::new(std::fs::File::create(&part).with_context(|| format!("creating {part}"))?);
                let n = match c.download(&url, &mut file).await {
                    Ok(n) => n,
                    Err(e) => {
                        drop(file);
                        let _ = std::fs::remove_file(&part);
                        return Err(e.into());
                    }
                };
                drop(file);
                std::fs::rename(&part, &target).with_context(|| format!("renaming {part} to {target}"))?;
                n
            };
            eprintln!(
                "{written} bytes of {path}{}",
                if target == "-" { String::new() } else { format!(" written to {target}") }
            );
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::Frames { id, phase, state, offset, limit, server } => {
            let (c, id) = (client(&server)?, segment(&id));
            let mut path = format!("/api/v1/tasks/{id}/frames/{phase}?offset={offset}&limit={limit}");
            if let Some(state) = state {
                path.push_str(&format!("&state={state}"));
            }
            let a = c.call::<crate::mediator::FramePage>(Method::GET, &path, None::<&()>).await?;
            eprintln!("{}", a.message);
            println!("{:>10}  {:<10} {:>5}  {:<21} {:<21} JOB", "FRAME", "STATE", "EXIT", "STARTED", "ENDED");
            for f in &a.data.frames {
                let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
                println!(
                    "{:>10}  {:<10} {:>5}  {:<21} {:<21} {}",
                    f.frame,
                    f.state,
                    f.exit_code.map_or("-".into(), |c| c.to_string()),
                    opt(&f.started_at),
                    opt(&f.ended_at),
                    opt(&f.job)
                );
            }
            if let Some(next) = a.data.next_offset {
                eprintln!("more: --offset {next}");
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::Data { id, key, json, server } => {
            let (c, id) = (client(&server)?, segment(&id));
            let place = |phase: &crate::model::Phase, frame: Option<u32>| match frame {
                Some(f) => format!("{phase}/{f}"),
                None => phase.to_string(),
            };
            match key {
                None => {
                    let a = c
                        .call::<std::collections::BTreeMap<String, crate::model::posts::DataPoint>>(
                            Method::GET,
                            &format!("/api/v1/tasks/{id}/data"),
                            None::<&()>,
                        )
                        .await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&a.data)?);
                        return Ok(ExitCode::SUCCESS);
                    }
                    eprintln!("{}", a.message);
                    println!("{:<24} {:<16} {:>6}  {:<21} VALUE", "KEY", "FROM", "VALUES", "AT");
                    for (k, d) in &a.data {
                        println!(
                            "{k:<24} {:<16} {:>6}  {:<21} {}",
                            place(&d.phase, d.frame),
                            d.values.unwrap_or(1),
                            when(d.at),
                            d.value
                        );
                    }
                }
                Some(key) => {
                    let a = c
                        .call::<Vec<crate::model::posts::DataPoint>>(
                            Method::GET,
                            &format!("/api/v1/tasks/{id}/data/{}", segment(&key)),
                            None::<&()>,
                        )
                        .await?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&a.data)?);
                        return Ok(ExitCode::SUCCESS);
                    }
                    eprintln!("{}", a.message);
                    println!("{:<21} {:<16} VALUE", "AT", "FROM");
                    for p in &a.data {
                        println!("{:<21} {:<16} {}", when(p.at), place(&p.phase, p.frame), p.value);
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::Show { id, json, server } => {
            let (c, id) = (client(&server)?, segment(&id));
            let t = c.call::<Task>(Method::GET, &format!("/api/v1/tasks/{id}"), None::<&()>).await?.data;
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                print_task(&t);
                for e in &t.events {
                    println!("  {:>3}  {}  {}{}", e.seq, when(e.at), job_mark(e), e.message);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::List { state, application, cluster, owner, since, limit, server } => {
            let c = client(&server)?;
            let mut query: Vec<(&str, String)> = Vec::new();
            for (k, v) in [
                ("state", state),
                ("application", application),
                ("cluster", cluster),
                ("owner", owner),
                ("since", since),
            ] {
                if let Some(v) = v {
                    query.push((k, v));
                }
            }
            let mut shown = 0;
            let mut cursor: Option<String> = None;
            while shown < limit {
                let mut q = query.clone();
                q.push(("limit", (limit - shown).min(200).to_string()));
                if let Some(cur) = &cursor {
                    q.push(("cursor", cur.clone()));
                }
                let qs: Vec<String> = q.iter().map(|(k, v)| format!("{k}={}", url_escape(v))).collect();
                let page = c
                    .call::<crate::api::tasks::TaskPage>(
                        Method::GET,
                        &format!("/api/v1/tasks?{}", qs.join("&")),
                        None::<&()>,
                    )
                    .await?
                    .data;
                for t in &page.tasks {
                    let jobs: Vec<&str> = t.phases.iter().map(|p| p.job_id.as_deref().unwrap_or("-")).collect();
                    println!(
                        "{}  {:<10} {:<12} {:<14} {:<10} {}  jobs {}",
                        t.id,
                        t.state.as_str(),
                        t.application.name,
                        t.cluster.name,
                        t.owner,
                        when(t.created_at),
                        jobs.join(",")
                    );
                }
                shown += page.tasks.len();
                match page.next_cursor {
                    Some(next) if !page.tasks.is_empty() => cursor = Some(next),
                    _ => break,
                }
            }
            if shown == 0 {
                eprintln!("no tasks");
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::Cancel { id, server } => {
            let (c, id) = (client(&server)?, segment(&id));
            Ok(done(c.call::<Task>(Method::DELETE, &format!("/api/v1/tasks/{id}"), None::<&()>).await?))
        }
        TaskCommand::Restart { id, from, frames, current_definitions, force, server } => {
            let (c, id) = (client(&server)?, segment(&id));
            let mut body = serde_json::json!({});
            if let Some(from) = from {
                body["from"] = serde_json::json!(from);
            }
            if let Some(frames) = frames {
                body["frames"] = serde_json::json!(frames);
            }
            if current_definitions {
                body["definitions"] = serde_json::json!("current");
            }
            if force {
                body["force"] = serde_json::json!(true);
            }
            Ok(done(c.call::<Task>(Method::POST, &format!("/api/v1/tasks/{id}/restart"), Some(&body)).await?))
        }
    }
}

/// `id` as one path segment: a task URI's `:` and `/` percent-encoded (a plain ID
/// is unchanged).
fn segment(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => char::from(b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Follows task `id` until it ends, printing each event as it happens (the event
/// stream, resumed after drops), then the phases. Exits 0 if it completed.
async fn watch_to_end(c: &Client, id: &str, seen: u64) -> anyhow::Result<ExitCode> {
    let mut last = seen;
    let mut drops = 0;
    loop {
        let mut events = match c.stream(&format!("/api/v1/tasks/{id}/events/stream"), Some(last)).await {
            Ok(r) => r,
            Err(e @ ClientError::Server { .. }) => return Err(e.into()),
            Err(e) => {
                drops += 1;
                if drops > 10 {
                    return Err(e.into());
                }
                eprintln!("note: {e}; trying again");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                continue;
            }
        };
        let mut ended = false;
        while let Some(msg) = events.next().await {
            match msg.event.as_str() {
                "event" => {
                    if let Ok(e) = serde_json::from_str::<TaskEvent>(&msg.data) {
                        println!("{}  {}{}", when(e.at), job_mark(&e), e.message);
                        last = last.max(e.seq);
                    }
                }
                "end" => {
                    ended = true;
                    break;
                }
                _ => {}
            }
        }
        if ended {
            break;
        }
        drops += 1;
        if drops > 10 {
            anyhow::bail!("the event stream of task {id} keeps dropping");
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let t = c.call::<Task>(Method::GET, &format!("/api/v1/tasks/{id}"), None::<&()>).await?.data;
    print_task(&t);
    Ok(if t.state == TaskState::Completed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// How an event the job posted is marked among the engine's: `[job execute] `.
fn job_mark(e: &crate::model::TaskEvent) -> String {
    match (&e.post, e.phase) {
        (Some(_), Some(p)) => format!("[job {p}] "),
        (Some(_), None) => "[job] ".into(),
        _ => String::new(),
    }
}

/// What `task show` says of a task's outputs kept in the store.
fn archive_line(a: &crate::model::archive::Archive) -> String {
    use crate::model::archive::ArchiveState;
    match a.state {
        ArchiveState::Waiting if a.attempts > 0 => format!(
            "to be kept in the store; try {} failed ({}), trying again{}",
            a.attempts,
            a.error.as_deref().unwrap_or("no reason given"),
            a.next_try.map(|n| format!(" {}", super::output::when(n))).unwrap_or_default()
        ),
        ArchiveState::Waiting => "to be kept in the store when the task ends".into(),
        ArchiveState::Done => a.summary(),
        ArchiveState::Failed => format!("not kept in the store: {}", a.error.as_deref().unwrap_or("no reason given")),
        ArchiveState::Skipped => "not kept in the store (the task was cancelled)".into(),
    }
}
