//! `lumos-agent`: parse the command line, and for `run`: load the config (exit 3 on error),
//! init logging, start the agent on a runtime, turn signals into `Control`s, drain, let a
//! captured stderr log its last lines, exit with a code that says how it ended. Everything else
//! lives in the library.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use lumos_agent::cli::{self, Cli, Command};
use lumos_agent::{daemon, exit, stderr_capture, telemetry};
use tokio::sync::mpsc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run) {
        return ExitCode::from(cli::execute(&cli));
    }
    let config = match cli::load_config(&cli) {
        Ok(config) => config,
        Err(code) => return ExitCode::from(code),
    };
    telemetry::init(&config.log);
    let runtime = match daemon::runtime_builder().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lumos-agent: cannot start the runtime: {e}");
            return ExitCode::from(exit::STARTUP);
        }
    };
    let code = runtime.block_on(async {
        let (control_tx, control_rx) = mpsc::channel(8);
        if let Err(e) = daemon::forward_signals(control_tx) {
            tracing::error!("cannot install signal handlers: {e}");
            return exit::STARTUP;
        }
        daemon::serve(config, cli.overrides(), control_rx, || {}).await
    });
    // Calls still running were cancelled above; their process groups are already killed.
    runtime.shutdown_timeout(Duration::from_secs(1));
    stderr_capture::finish(Duration::from_secs(1));
    ExitCode::from(code)
}
