//! The `hpcforge` binary: parse the command line, set up logging, run the command.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser as _;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = hpcforge::cli::Cli::parse();
    let filter = EnvFilter::try_new(&cli.log).unwrap_or_else(|e| {
        eprintln!("warning: ignoring the log filter {:?}: {e}", cli.log);
        EnvFilter::new("info")
    });
    // Logs go to stderr so command output on stdout stays clean for pipes.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    hpcforge::cli::run(cli).await
}
