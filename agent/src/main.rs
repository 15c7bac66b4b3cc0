//! `lumos-agent`: parse the command line, and for `run`: load the config (exit 3 on error),
//! init logging, start the agent on a runtime, turn signals into [`Control`], drain, exit with a
//! code that says how it ended. Everything else lives in the library.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use lumos_agent::app::{stage_dev_connectors, Control, RunningAgent, Stopped};
use lumos_agent::cli::{self, Cli, Command};
use lumos_agent::{exit, telemetry};
use tokio::signal::unix::{signal, SignalKind};
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
    if cli.dev {
        match stage_dev_connectors(&config) {
            Ok(staged) if !staged.is_empty() => tracing::info!(
                "--dev: copied {} into {}",
                staged.join(", "),
                config.plugins_dir.display()
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "--dev: cannot stage the example connectors"),
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lumos-agent: cannot start the runtime: {e}");
            return ExitCode::from(exit::STARTUP);
        }
    };
    let code = runtime.block_on(async {
        let mut agent = match RunningAgent::start(config).await {
            Ok(agent) => agent,
            Err(e) => {
                tracing::error!("cannot start: {e}");
                return exit::STARTUP;
            }
        };
        // SIGHUP re-reads the same file, environment and flags.
        let overrides = cli.overrides();
        agent.set_config_source(Box::new(move || lumos_agent::config::load(&overrides)));
        let (control_tx, control_rx) = mpsc::channel(8);
        if let Err(e) = forward_signals(control_tx) {
            tracing::error!("cannot install signal handlers: {e}");
            return exit::STARTUP;
        }
        match agent.run(control_rx).await {
            Ok(Stopped::Drained) => {
                tracing::info!("stopped: every call finished");
                exit::OK
            }
            Ok(stopped) => {
                tracing::warn!(?stopped, "stopped with calls cancelled");
                exit::FORCED_STOP
            }
            Err(failed) => {
                tracing::error!("{failed}");
                exit::INTERNAL
            }
        }
    });
    // Calls still running were cancelled above; their process groups are already killed.
    runtime.shutdown_timeout(Duration::from_secs(1));
    ExitCode::from(code)
}

/// SIGTERM and SIGINT ask for a drain (a second one quits); SIGHUP rescans the plugins folder.
fn forward_signals(tx: mpsc::Sender<Control>) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        let mut stops = 0;
        loop {
            let control = tokio::select! {
                _ = term.recv() => Control::Shutdown,
                _ = int.recv() => Control::Shutdown,
                _ = hup.recv() => Control::Reload,
            };
            let control = if control == Control::Shutdown {
                stops += 1;
                if stops > 1 {
                    Control::Quit
                } else {
                    Control::Shutdown
                }
            } else {
                control
            };
            if tx.send(control).await.is_err() {
                break;
            }
        }
    });
    Ok(())
}
