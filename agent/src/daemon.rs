//! Running the agent until it is told to stop: what `lumos-agent run` and the Windows service
//! host share. Signals (or the service control manager) become [`Control`]s; how the run ended
//! becomes a documented exit code.

use tokio::sync::mpsc;

use crate::app::{stage_dev_connectors, Control, RunningAgent, StartError, Stopped};
use crate::config::{Config, Overrides};
use crate::exit;

/// How many tasks a runtime worker polls between looks at the I/O driver; tokio's default
/// is 61.
///
/// Why 1: the tunnel session runs a burst of calls in place for up to 50 µs per poll (see
/// `tunnel::session`), and while both workers are busy, a call arriving on the socket, or
/// room to write a result, waits until a worker looks at the driver. Looking after every
/// task also lets a worker with queued tasks wake a parked one sooner. On the tunnel
/// benchmark the agent in-process at c=64 gained about 15% in calls per second, and the
/// bare echo measured on the same runtime did not move (BENCHMARKS.md, session 33). An idle
/// agent does not pay for it: a worker with nothing to run parks on the driver anyway.
pub const EVENT_INTERVAL: u32 = 1;

/// The runtime the agent runs on: multi-threaded, one worker per core, I/O and timers on,
/// the driver looked at after every task ([`EVENT_INTERVAL`]). `lumos-agent run`, the Windows
/// service and the tunnel benchmark all build it here, so the benchmark measures the agent as
/// it runs.
pub fn runtime_builder() -> tokio::runtime::Builder {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().event_interval(EVENT_INTERVAL);
    builder
}

/// Starts the agent, serves until `control` says stop, drains, and returns the exit code.
/// `on_ready` runs once the agent is up (the Windows service reports "running" then).
pub async fn serve(
    config: Config,
    overrides: Overrides,
    control_in: mpsc::Receiver<Control>,
    on_ready: impl FnOnce(),
) -> u8 {
    if let Some(note) = config.relative_paths_note() {
        tracing::warn!("{note}");
    }
    if overrides.dev {
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
    // Every control goes on to the run as it came; a stop also ends a start still scanning
    // the plugins folder, which a connector's hanging `info` can make long.
    let stop = tokio_util::sync::CancellationToken::new();
    let (forward, control) = mpsc::channel(8);
    tokio::spawn({
        let stop = stop.clone();
        let mut control = control_in;
        async move {
            while let Some(message) = control.recv().await {
                if message != Control::Reload {
                    stop.cancel();
                }
                if forward.send(message).await.is_err() {
                    break;
                }
            }
        }
    });
    let mut agent = match RunningAgent::start_until(config, &stop).await {
        Ok(agent) => agent,
        Err(StartError::Stopped) => {
            tracing::info!("stopped before the agent was ready");
            return exit::OK;
        }
        Err(e) => {
            tracing::error!("cannot start: {e}");
            return exit::STARTUP;
        }
    };
    // A reload re-reads the same file, environment and flags.
    agent.set_config_source(Box::new(move || crate::config::load(&overrides)));
    on_ready();
    match agent.run(control).await {
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
}

/// Counts stop requests: the first drains, any later one quits at once.
#[derive(Debug, Default)]
pub struct StopCounter(u32);

impl StopCounter {
    /// The control for one more stop request.
    pub fn control(&mut self) -> Control {
        self.0 += 1;
        if self.0 > 1 {
            Control::Quit
        } else {
            Control::Shutdown
        }
    }
}

/// Turns the process's signals into controls on `tx`: SIGTERM and SIGINT (Ctrl-C, Ctrl-Break,
/// console close on Windows) drain, a second one quits; SIGHUP reloads (Unix only; the Windows
/// service reloads on `sc control lumos-agent paramchange`).
pub fn forward_signals(tx: mpsc::Sender<Control>) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        tokio::spawn(async move {
            let mut stops = StopCounter::default();
            loop {
                let control = tokio::select! {
                    _ = term.recv() => stops.control(),
                    _ = int.recv() => stops.control(),
                    _ = hup.recv() => Control::Reload,
                };
                if tx.send(control).await.is_err() {
                    break;
                }
            }
        });
    }
    #[cfg(windows)]
    {
        use tokio::signal::windows::{ctrl_break, ctrl_c, ctrl_close, ctrl_shutdown};
        let mut c = ctrl_c()?;
        let mut brk = ctrl_break()?;
        let mut close = ctrl_close()?;
        let mut shutdown = ctrl_shutdown()?;
        tokio::spawn(async move {
            let mut stops = StopCounter::default();
            loop {
                tokio::select! {
                    _ = c.recv() => {}
                    _ = brk.recv() => {}
                    _ = close.recv() => {}
                    _ = shutdown.recv() => {}
                }
                if tx.send(stops.control()).await.is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_stop_drains_and_any_later_one_quits() {
        let mut stops = StopCounter::default();
        assert_eq!(stops.control(), Control::Shutdown);
        assert_eq!(stops.control(), Control::Quit);
        assert_eq!(stops.control(), Control::Quit);
    }
}
