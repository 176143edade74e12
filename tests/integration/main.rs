//! Integration tests against real components: SecantusDB (MongoDB wire protocol),
//! Slurm and OpenSSH from `scripts/test-env`, and the `hpcforge` binary itself.
//! They fail, never skip, when the environment is missing.

mod api;
mod browser;
mod cli;
mod environment;
mod files;
mod forge;
mod helpers;
mod layout;
mod mediator;
mod openapi;
mod portal;
mod queue;
mod regressions;
mod replicas;
mod scheduler_contract;
mod store_contract;
mod takeover;
