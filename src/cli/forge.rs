//! `hpcforge forge preview`: the scripts a task would get, from a server or straight
//! from the definition folders; nothing is submitted or stored.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::Value;

use super::output::print_problems;
use super::{ServerArgs, client, who_am_i};

/// `hpcforge forge ...`
#[derive(Debug, Subcommand)]
pub enum ForgeCommand {
    /// Show the scripts a task would get (one per phase); nothing is submitted or stored.
    Preview(PreviewArgs),
}

/// `hpcforge forge preview` options.
#[derive(Debug, Args)]
pub struct PreviewArgs {
    /// The application (or the inputs file's `application`).
    #[arg(long)]
    pub app: Option<String>,
    /// The cluster (or the inputs file's `cluster`).
    #[arg(long)]
    pub cluster: Option<String>,
    /// The task's inputs, as JSON (`-` for standard input): the portal's list of inputs,
    /// an object of name: value, or a whole task body. Without it, the defaults.
    #[arg(long, value_name = "FILE")]
    pub inputs: Option<PathBuf>,
    /// Forge from the definition folders under DIR (default: here) instead of asking a
    /// server: `DIR/applications/<app>`, `DIR/clusters/<cluster>`.
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = ".")]
    pub from_dir: Option<PathBuf>,
    /// With --from-dir: where template sets live (default: the nearest forge-templates/).
    #[arg(long)]
    pub templates_dir: Option<PathBuf>,
    /// Print only this phase's script, as is (e.g. to pipe into `bash -n`).
    #[arg(long)]
    pub phase: Option<crate::model::Phase>,
    /// Write script_<phase> files into this folder instead of printing.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// Reads `--inputs` into a task body, with `--app` / `--cluster` winning over the file.
fn task_body(args: &PreviewArgs) -> anyhow::Result<crate::forge::TaskBody> {
    use anyhow::Context as _;
    let given: Value = match &args.inputs {
        None => Value::Null,
        Some(p) if p.as_os_str() == "-" => {
            serde_json::from_reader(std::io::stdin()).context("reading the inputs (JSON) from standard input")?
        }
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{} is not JSON", p.display()))?
        }
    };
    let is_body = given.as_object().is_some_and(|o| o.contains_key("inputs") || o.contains_key("application"));
    let (mut app, mut cluster, inputs) = if is_body {
        let o = given.as_object().expect("checked");
        let s = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_owned);
        (s("application"), s("cluster"), o.get("inputs").cloned().unwrap_or(Value::Null))
    } else {
        (None, None, given)
    };
    if args.app.is_some() {
        app = args.app.clone();
    }
    if args.cluster.is_some() {
        cluster = args.cluster.clone();
    }
    let app = app.context("which application? give --app (or `application` in the inputs file)")?;
    let cluster = cluster.context("which cluster? give --cluster (or `cluster` in the inputs file)")?;
    Ok(crate::forge::TaskBody {
        application: crate::model::AppName::parse(&app)?,
        cluster: crate::model::ClusterName::parse(&cluster)?,
        inputs,
        priority: None,
    })
}

pub async fn preview(args: PreviewArgs) -> anyhow::Result<ExitCode> {
    let body = task_body(&args)?;
    let user_text = who_am_i(&args.server).unwrap_or_else(|| "anonymous".to_owned());
    let user = crate::model::UserName::parse(&user_text)?;
    let (scripts, source) = match &args.from_dir {
        Some(root) => {
            use crate::forge::local::{self, LocalError};
            let compiled = local::application(root, &body.application)
                .and_then(|a| local::cluster(root, &body.cluster, args.templates_dir.as_deref()).map(|c| (a, c)));
            let (app, cluster) = match compiled {
                Ok(x) => x,
                Err(LocalError::Folder(p)) => {
                    eprintln!("error: the definition folders have problems:");
                    for x in &p.0 {
                        eprintln!("  {x}");
                    }
                    return Ok(ExitCode::FAILURE);
                }
                Err(LocalError::Compile(p)) => return Ok(print_problems("the definitions cannot be forged", &p)),
            };
            let inputs = match app.validator.validate(&body.inputs, &cluster.spec) {
                Ok(i) => i,
                Err(p) => return Ok(print_problems("the inputs are invalid", &p)),
            };
            let home = crate::forge::assumed_home(&user);
            let req = crate::forge::ForgeRequest {
                task_id: crate::model::TaskId::new(),
                user: &user,
                home: &home,
                workspace: None,
            };
            match crate::forge::render::forge(&app, &cluster, &inputs, &req) {
                Ok(f) => {
                    (f.scripts, format!("from the folders under {} (run directory {})", root.display(), f.run_dir))
                }
                Err(p) => return Ok(print_problems("the task cannot be forged", &p)),
            }
        }
        None => {
            let c = client(&args.server)?;
            match c.call::<crate::api::forge::Preview>(Method::POST, "/api/v1/forge/preview", Some(&body)).await {
                Ok(a) => (
                    a.data.scripts,
                    format!(
                        "application {} v{}, cluster {} v{}, run directory {}",
                        a.data.application.name,
                        a.data.application.version,
                        a.data.cluster.name,
                        a.data.cluster.version,
                        a.data.run_dir
                    ),
                ),
                Err(e) => return Err(e.into()),
            }
        }
    };
    if let Some(dir) = &args.output_dir {
        std::fs::create_dir_all(dir)?;
        for s in &scripts {
            let path = dir.join(format!("script_{}", s.phase));
            std::fs::write(&path, &s.text)?;
            println!("{}  sha256 {}  {} bytes", path.display(), s.sha256, s.text.len());
        }
        return Ok(ExitCode::SUCCESS);
    }
    for s in scripts.iter().filter(|s| args.phase.is_none_or(|p| p == s.phase)) {
        if args.phase.is_none() {
            println!("==> script_{} ({} bytes, sha256 {}; {source}) <==", s.phase, s.text.len(), s.sha256);
        }
        print!("{}", s.text);
    }
    Ok(ExitCode::SUCCESS)
}
