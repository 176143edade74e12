//! hpcforge: the submission engine behind an HPC portal.
//!
//! Portal frontends POST a task (an application, a cluster, the user's inputs); the
//! engine validates the inputs, forges one standalone batch script per phase (prolog,
//! execute, epilog) and submits them to the cluster's scheduler as the user, over SSH.
//! Admins upload application and cluster definitions, kept in MongoDB + GridFS or in
//! the embedded store. `docs/architecture.md` has the full picture.
//!
//! # Layout
//!
//! - [`model`]: the domain — names that parse, applications with the portal's input
//!   specs, clusters, tasks, phases, resources. Pure data and checks.
//! - [`definitions`]: definitions as uploaded — the wire format, the folder format
//!   (`applications/<name>/`, `clusters/<name>/`), script rules, all-problems-at-once checks.
//! - [`examples`]: the example definitions built in (`local` cluster, `sleep`, `pi`).
//! - [`forge`]: task inputs validated against a JSON Schema compiled from the specs;
//!   one standalone script per phase from the cluster's templates and the
//!   application's scripts (Tera 2, `@@ NAME @@`, shell-quoted values).
//! - [`mediator`]: submits each phase as the user over SSH (or locally), at most once,
//!   with dependencies; the monitor follows the jobs to the end.
//! - [`store`]: the storage contract, with MongoDB/GridFS and embedded SQLite
//!   implementations; append-only revision histories.
//! - [`api`]: the HTTP API (axum): one router per resource, one error type, the
//!   portal's `{data, message, errors}` envelope.
//! - [`secrets`]: the server key, and SSH private keys sealed with it.
//! - [`server`]: opening the store and serving the API on a listener until shutdown.
//! - [`config`]: configuration layers (file, `HPCFORGE_*` environment, flags).
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
pub mod secrets;
pub mod server;
pub mod store;
