//! The Windows service: `lumos-agent service install | uninstall | start | stop`, and the service
//! host the service control manager starts (`lumos-agent service run`, not for people).
//!
//! The service is `lumos-agent`, starts automatically, runs as LocalSystem, and is restarted by
//! the SCM 5 s after a crash (twice, then 60 s). Stop and system shutdown drain like SIGTERM;
//! `sc control lumos-agent paramchange` reloads like SIGHUP. A service has no console, so the
//! host logs to `<state_dir>\logs\agent.<YYYY-MM-DD>.log`, a file per day (UTC), the last
//! [`crate::telemetry::AGENT_LOG_FILES_KEPT`] kept.

use std::ffi::OsString;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::sync::mpsc;
use windows_service::service::{
    ServiceAccess, ServiceAction, ServiceActionType, ServiceControl, ServiceControlAccept,
    ServiceErrorControl, ServiceExitCode, ServiceFailureActions, ServiceFailureResetPeriod,
    ServiceInfo, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::service_dispatcher;
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};

use crate::app::Control;
use crate::config::Overrides;
use crate::daemon::{self, StopCounter};
use crate::exit;

/// The service's name in the SCM.
pub const SERVICE_NAME: &str = "lumos-agent";
const DISPLAY_NAME: &str = "Lumos Agent";
const DESCRIPTION: &str =
    "Hosts Lumos connectors on-prem and serves the Lumos cloud's capability calls.";

/// What the service host needs from the command line it was installed with.
static OVERRIDES: OnceLock<Overrides> = OnceLock::new();

fn manager(access: ServiceManagerAccess) -> Result<ServiceManager, String> {
    ServiceManager::local_computer(None::<&str>, access).map_err(|e| {
        format!("cannot open the service control manager: {e} (run this from an elevated prompt)")
    })
}

/// Registers the service to run this executable with `overrides` (the config file, folders).
pub fn install(overrides: &Overrides) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let mut args: Vec<OsString> = vec!["service".into(), "run".into()];
    if let Some(config) = &overrides.config_file {
        let config = std::path::absolute(config)
            .map_err(|e| format!("cannot resolve {}: {e}", config.display()))?;
        args.extend(["--config".into(), config.into_os_string()]);
    }
    for (flag, dir) in [
        ("--plugins-dir", &overrides.plugins_dir),
        ("--state-dir", &overrides.state_dir),
    ] {
        if let Some(dir) = dir {
            let dir = std::path::absolute(dir)
                .map_err(|e| format!("cannot resolve {}: {e}", dir.display()))?;
            args.extend([flag.into(), dir.into_os_string()]);
        }
    }
    if let Some(listen) = &overrides.listen {
        args.extend(["--listen".into(), listen.into()]);
    }
    let info = ServiceInfo {
        name: SERVICE_NAME.into(),
        display_name: DISPLAY_NAME.into(),
        service_type: ServiceType::OWN_PROCESS,
        start_type: ServiceStartType::AutoStart,
        error_control: ServiceErrorControl::Normal,
        executable_path: exe,
        launch_arguments: args,
        dependencies: vec![],
        account_name: None,
        account_password: None,
    };
    let manager = manager(ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE)?;
    let service = manager
        .create_service(&info, ServiceAccess::CHANGE_CONFIG | ServiceAccess::START)
        .map_err(|e| format!("cannot create the service {SERVICE_NAME}: {e}"))?;
    service
        .set_description(DESCRIPTION)
        .map_err(|e| format!("cannot describe the service: {e}"))?;
    let restart = |secs| ServiceAction {
        action_type: ServiceActionType::Restart,
        delay: Duration::from_secs(secs),
    };
    service
        .update_failure_actions(ServiceFailureActions {
            reset_period: ServiceFailureResetPeriod::After(Duration::from_secs(86_400)),
            reboot_msg: None,
            command: None,
            actions: Some(vec![restart(5), restart(5), restart(60)]),
        })
        .map_err(|e| format!("cannot set the service's restart policy: {e}"))?;
    Ok(())
}

/// Stops (if running) and removes the service.
pub fn uninstall() -> Result<(), String> {
    let manager = manager(ServiceManagerAccess::CONNECT)?;
    let service = manager
        .open_service(
            SERVICE_NAME,
            ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE,
        )
        .map_err(|e| format!("cannot open the service {SERVICE_NAME}: {e}"))?;
    let status = service
        .query_status()
        .map_err(|e| format!("cannot query the service: {e}"))?;
    if status.current_state != ServiceState::Stopped {
        service
            .stop()
            .map_err(|e| format!("cannot stop the service: {e}"))?;
    }
    service
        .delete()
        .map_err(|e| format!("cannot delete the service: {e}"))
}

/// Starts the installed service.
pub fn start() -> Result<(), String> {
    let manager = manager(ServiceManagerAccess::CONNECT)?;
    let service = manager
        .open_service(SERVICE_NAME, ServiceAccess::START)
        .map_err(|e| format!("cannot open the service {SERVICE_NAME}: {e}"))?;
    service
        .start::<&str>(&[])
        .map_err(|e| format!("cannot start the service: {e}"))
}

/// Asks the running service to stop (it drains first).
pub fn stop() -> Result<(), String> {
    let manager = manager(ServiceManagerAccess::CONNECT)?;
    let service = manager
        .open_service(SERVICE_NAME, ServiceAccess::STOP)
        .map_err(|e| format!("cannot open the service {SERVICE_NAME}: {e}"))?;
    service
        .stop()
        .map(|_| ())
        .map_err(|e| format!("cannot stop the service: {e}"))
}

/// Hands this process to the SCM, which calls back into [`service_main`] on its own thread;
/// returns when the service has stopped.
pub fn run(overrides: Overrides) -> Result<(), String> {
    let _ = OVERRIDES.set(overrides);
    service_dispatcher::start(SERVICE_NAME, ffi_service_main).map_err(|e| {
        format!("cannot reach the service control manager: {e} (`service run` is started by Windows; use `lumos-agent run` in a console)")
    })
}

/// The SCM's entry point. The arguments Windows passes (from `sc start`) are not used: the
/// agent's own are on its command line, in [`OVERRIDES`].
extern "system" fn ffi_service_main(_argc: u32, _argv: *mut *mut u16) {
    service_main();
}

fn service_main() {
    let overrides = OVERRIDES.get().cloned().unwrap_or_default();
    let (tx, rx) = mpsc::channel(8);
    let mut stops = StopCounter::default();
    let handler = move |event| match event {
        ServiceControl::Stop | ServiceControl::Shutdown | ServiceControl::Preshutdown => {
            let _ = tx.try_send(stops.control());
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::ParamChange => {
            let _ = tx.try_send(Control::Reload);
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    };
    let Ok(status) = service_control_handler::register(SERVICE_NAME, handler) else {
        return;
    };
    let report = |state, code: u8, wait: Duration| {
        let controls = if state == ServiceState::Running {
            ServiceControlAccept::STOP
                | ServiceControlAccept::SHUTDOWN
                | ServiceControlAccept::PARAM_CHANGE
        } else {
            ServiceControlAccept::empty()
        };
        let _ = status.set_service_status(ServiceStatus {
            service_type: ServiceType::OWN_PROCESS,
            current_state: state,
            controls_accepted: controls,
            exit_code: if code == exit::OK {
                ServiceExitCode::Win32(0)
            } else {
                ServiceExitCode::ServiceSpecific(u32::from(code))
            },
            checkpoint: 0,
            wait_hint: wait,
            process_id: None,
        });
    };
    report(
        ServiceState::StartPending,
        exit::OK,
        Duration::from_secs(60),
    );
    let code = serve(overrides, rx, || {
        report(ServiceState::Running, exit::OK, Duration::ZERO);
    });
    report(ServiceState::Stopped, code, Duration::ZERO);
}

/// Loads the config, logs to a file, and serves until the SCM says stop. A config error is
/// reported to the SCM as service-specific error 3 (`lumos-agent check-config` explains it).
fn serve(overrides: Overrides, control: mpsc::Receiver<Control>, on_ready: impl FnOnce()) -> u8 {
    let config = match crate::config::load(&overrides) {
        Ok(config) => config,
        Err(_) => return exit::CONFIG,
    };
    let log_dir = crate::state::StatePaths::new(config.state_dir.clone()).logs();
    let log_file = std::fs::create_dir_all(&log_dir)
        .map_err(|e| e.to_string())
        .and_then(|()| crate::telemetry::daily_log_file(&log_dir));
    match log_file {
        Ok(file) => crate::telemetry::init_with_writer(
            &config.log,
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(file),
            false,
        ),
        Err(_) => return exit::STARTUP,
    }
    let runtime = match daemon::runtime_builder().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return exit::STARTUP;
        }
    };
    let code = runtime.block_on(daemon::serve(config, overrides, control, on_ready));
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}
