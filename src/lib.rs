//! hpcforge: the submission engine behind an HPC portal.
//!
//! Portal frontends POST a task (an application, a cluster, the user's inputs); the
//! engine validates the inputs, forges one standalone batch script per phase (prolog,
//! execute, epilog, or the phases the application declares) and submits them to the cluster's scheduler as the user, over SSH.
//! Admins upload application and cluster definitions, kept in MongoDB + GridFS or in
//! the embedded store. `docs/architecture.md` has the full picture.
//!
//! # Layout
//!
//! From the ground up; a module uses only those above it in this list.
//!
//! - [`shell`]: POSIX shell quoting and quoted here-documents.
//! - [`model`]: the domain — names that parse, applications with the portal's input
//!   specs, clusters, tasks, phases (named, and the graph of what each waits for),
//!   resources, what jobs post (the `HPCG_EVENTS` lines), log rules, the queue's pools
//!   and needs, the outputs a task keeps, accounts, tokens and credentials. Pure data
//!   and checks.
//! - [`secrets`]: the server key, and SSH private keys sealed with it.
//! - [`definitions`]: definitions as uploaded — the wire format, the folder format
//!   (`applications/<name>/`, `clusters/<name>/`), script rules, the markup language
//!   and its upload checks, all-problems-at-once checks.
//! - [`scheduler`]: the scheduler seam, one file per batch system (Slurm, Grid Engine,
//!   local): how its scripts are written, submission, batched status, find by tag,
//!   cancel, and which of its messages are transient; and the shared shell plumbing,
//!   frame phases' included (job arrays, frame records, their tallies and pages), the
//!   reading of what jobs posted (only new bytes, bounded), and of what ended jobs
//!   used (`sacct`, `qacct`, the jobs' own records).
//! - [`store`]: the storage contract, with MongoDB/GridFS and embedded SQLite
//!   implementations; append-only revision histories, tasks kept as state + inputs +
//!   events, leases (who holds which piece of work, with a fence), counters shared by
//!   the servers of one store, the site's pools (changed by compare-and-swap),
//!   tasks' outputs kept when they end (GridFS files, seen only once whole), and
//!   task changes as the store pushes them.
//! - [`examples`]: the example definitions built in (`local` cluster, `sleep`, `pi`,
//!   `workflow`, `render`).
//! - [`forge`]: task inputs validated against a JSON Schema compiled from the specs;
//!   one standalone script per phase from the cluster's templates and the
//!   application's scripts (Tera 2, `@@ NAME @@`, shell-quoted values), with the
//!   helpers a job posts events and data with (`hpcg_event`, `hpcg_data`) and the
//!   lines that record what it used.
//! - [`metrics`]: the counters `/metrics` shows.
//! - [`mediator`]: submits each phase as the user over SSH (or locally), at most once,
//!   with dependencies, under a claim with a fence so that exactly one replica submits
//!   a task; the monitor follows the jobs to the end; this server's place among the
//!   replicas sharing its store (who watches what, cluster pauses, the others'
//!   changes, handing work over on a graceful stop); what jobs posted, taken into
//!   their tasks' events; log rules matched against their output, acting as a user;
//!   what ended jobs used, with their efficiencies; a task's files listed and
//!   streamed back from the cluster as its owner; the queue in front of the
//!   clusters (licences, users' shares, granted from pools in the store, released
//!   when jobs end); run directories in the site's workspaces; outputs kept in the
//!   store when a task ends, and served from there.
//! - [`auth`]: issuing and checking bearer tokens, over the store.
//! - [`api`]: the HTTP API (axum): one router per resource, one error type, the
//!   portal's `{data, message, errors}` envelope.
//! - [`config`]: configuration layers (file, `HPCFORGE_*` environment, flags).
//! - [`server`]: opening the store and serving the API on a listener until shutdown.
//! - [`cli`]: the `hpcforge` command line and its HTTP client.

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod definitions;
pub mod examples;
pub mod forge;
pub mod mediator;
pub mod metrics;
pub mod model;
pub mod scheduler;
pub mod secrets;
pub mod server;
pub mod shell;
pub mod store;
