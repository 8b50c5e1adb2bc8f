//! The `ferry` binary: CLI, logging and metrics setup, and the wiring of sources, publisher,
//! data plane and admin server.
//!
//! Data flows one way: a source (files today) feeds the `Index`, the publisher hands immutable
//! snapshots to the data plane and the admin server. Nothing is served before the first
//! snapshot; SIGHUP reloads the configuration, SIGTERM/SIGINT drains and exits 0.

mod admin;
mod check;
mod cli;
mod daemon;
mod dns;
mod lb;
mod node;
mod probe;
mod telemetry;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = telemetry::init_logging(cli.log_format, &cli.log_level) {
        eprintln!("ferry: {error:#}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Check(args) => return check::run(&args),
        Command::Probe(args) => return probe::run(&args),
        Command::Lb(args) => lb::run(args),
        Command::Node(args) => node::run(*args),
        Command::Dns(args) => dns::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}
