//! `hpcforge resources ...`: the site's pools (licences, users' shares of clusters),
//! who holds what, and for admins the size of site-wide licence pools and releasing a
//! stuck holder by hand.

use std::process::ExitCode;

use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};

use super::output::{done, when};
use super::{ServerArgs, client};
use crate::api::resources::{PoolView, Resources};

/// `hpcforge resources ...`
#[derive(Debug, Subcommand)]
pub enum ResourcesCommand {
    /// The pools: how many each has, how many are held, and by which tasks.
    List {
        /// Print the JSON answer as it came.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Set how many licences a site-wide pool has (admin).
    Licence {
        /// The licence (`maya`).
        name: String,
        /// How many the site has.
        count: u32,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Release what a task holds of a pool by hand (admin); recorded with your name.
    Release {
        /// The pool's key, as `resources list` shows it (`licence/maya`).
        pool: String,
        /// The task holding it.
        task: String,
        /// Only what it holds for this phase.
        #[arg(long)]
        phase: Option<String>,
        #[command(flatten)]
        server: ServerArgs,
    },
}

pub async fn resources_command(cmd: ResourcesCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ResourcesCommand::List { json, server } => {
            let c = client(&server)?;
            if json {
                let a = c.call::<Value>(Method::GET, "/api/v1/resources", None::<&()>).await?;
                println!("{}", serde_json::to_string_pretty(&a.data)?);
                return Ok(ExitCode::SUCCESS);
            }
            let a = c.call::<Resources>(Method::GET, "/api/v1/resources", None::<&()>).await?;
            print!("{}", table(&a.data));
            Ok(ExitCode::SUCCESS)
        }
        ResourcesCommand::Licence { name, count, server } => {
            let c = client(&server)?;
            let path = format!("/api/v1/resources/licences/{name}");
            Ok(done(c.call::<PoolView>(Method::PUT, &path, Some(&json!({ "count": count }))).await?))
        }
        ResourcesCommand::Release { pool, task, phase, server } => {
            let c = client(&server)?;
            let body = json!({ "pool": pool, "task": task, "phase": phase });
            Ok(done(c.call::<Value>(Method::POST, "/api/v1/resources/release", Some(&body)).await?))
        }
    }
}

/// The pools as a table, each holder under its pool.
fn table(r: &Resources) -> String {
    let mut out = format!("{:<40} {:>6} {:>6}\n", "POOL", "IN USE", "OF");
    for p in &r.pools {
        out.push_str(&format!("{:<40} {:>6} {:>6}\n", p.key, p.in_use, p.count));
        for h in &p.holders {
            let phase = h.phase.map_or_else(|| "(task)".to_owned(), |p| p.to_string());
            out.push_str(&format!(
                "    {} {:<10} {:>3}  {} since {}\n",
                h.task,
                phase,
                h.amount,
                h.owner,
                when(h.since)
            ));
        }
    }
    out.push_str(&format!("{} task(s) queued\n", r.queued));
    out
}
