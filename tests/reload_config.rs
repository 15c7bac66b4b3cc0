//! SIGHUP (`Control::Reload`): the configuration is read again; what can change live changes,
//! and a configuration with errors is reported while the running one is kept.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::time::Duration;

use lumos_agent::app::Control;
use lumos_agent_integration::*;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

async fn until_code(
    agent: &TestAgent,
    app: &str,
    capability: &str,
    body: serde_json::Value,
    code: &str,
) {
    eventually_ok(WAIT, code, || async {
        let (_, answer) = agent.call(app, capability, body.clone()).await;
        if answer["error"]["error_code"] == code {
            Ok(())
        } else {
            Err(answer)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_config_applies_live_a_bad_one_is_reported_and_the_old_one_kept() {
    captured_logs();
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &test_connector(), "app");
    let agent = TestAgent::start(&dirs, "").await;
    let one_mib = json!({"request": {"mb": 1}});

    // 1 MiB of non-JSON is under the default output cap: it is bad output, not too large.
    let (_, answer) = agent.call("app", "flood", one_mib.clone()).await;
    assert_eq!(
        answer["error"]["error_code"], "agent.bad_output",
        "{answer}"
    );

    // A good change applies without a restart.
    TestAgent::write_config(&dirs, &dirs.plugins(), "[calls]\nmax_output_bytes = 1024\n");
    agent.control.send(Control::Reload).await.unwrap();
    until_code(
        &agent,
        "app",
        "flood",
        one_mib.clone(),
        "agent.output_too_large",
    )
    .await;

    // A bad config is reported, every error of it, and the running one stays.
    TestAgent::write_config(
        &dirs,
        &dirs.plugins(),
        "[calls]\nmax_output_bytes = \"lots\"\ntimeout_secs = -1\n",
    );
    agent.control.send(Control::Reload).await.unwrap();
    eventually(WAIT, "the failed reload to be logged", || {
        captured_logs().contains("configuration reload failed")
    })
    .await;
    let logs = captured_logs();
    assert!(
        logs.contains("calls.max_output_bytes") && logs.contains("calls.timeout_secs"),
        "every error is reported"
    );
    let (_, answer) = agent.call("app", "flood", one_mib.clone()).await;
    assert_eq!(
        answer["error"]["error_code"], "agent.output_too_large",
        "the previous config still rules: {answer}"
    );
    let (status, _) = agent.call("app", "echo", json!({})).await;
    assert_eq!(status, hyper::StatusCode::OK, "and the agent still serves");

    // The plugins folder can move.
    let moved = dirs.root.path().join("plugins-moved");
    std::fs::create_dir_all(&moved).unwrap();
    install_plugin(&moved, &test_connector(), "moved");
    TestAgent::write_config(&dirs, &moved, "[calls]\nmax_output_bytes = 1024\n");
    agent.control.send(Control::Reload).await.unwrap();
    eventually_ok(
        WAIT,
        "the new folder's connectors to replace the old",
        || async {
            let names: Vec<String> = agent
                .connectors()
                .await
                .iter()
                .map(|c| c["app_id"].as_str().unwrap_or("").to_string())
                .collect();
            if names == ["moved"] {
                Ok(())
            } else {
                Err(names)
            }
        },
    )
    .await;
    agent.shutdown().await;
}

/// The record serving `app_id` now.
fn serving(agent: &TestAgent, app_id: &str) -> std::sync::Arc<lumos_agent::plugins::Connector> {
    agent.registry.snapshot().resolve(app_id).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_loads_again_only_the_connectors_whose_load_time_limits_changed() {
    captured_logs();
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &test_connector(), "one");
    install_plugin(&dirs.plugins(), &test_connector(), "two");
    let agent = TestAgent::start(&dirs, "[connectors.one]\nmax_concurrency = 1\n").await;
    let (one, two) = (serving(&agent, "one"), serving(&agent, "two"));
    let permits = |c: &lumos_agent::plugins::Connector| {
        c.runnable.as_ref().unwrap().limiter.available_permits()
    };
    assert_eq!(permits(&one), 1);

    // A limit read per call: no connector is loaded again. Then one connector's own table:
    // only it is. (Reloads run in order, so once the second has loaded `one` again, the first
    // has finished.)
    TestAgent::write_config(
        &dirs,
        &dirs.plugins(),
        "[calls]\nkill_grace_secs = 3\n[connectors.one]\nmax_concurrency = 1\n",
    );
    agent.control.send(Control::Reload).await.unwrap();
    TestAgent::write_config(
        &dirs,
        &dirs.plugins(),
        "[calls]\nkill_grace_secs = 3\n[connectors.one]\nmax_concurrency = 2\n",
    );
    agent.control.send(Control::Reload).await.unwrap();
    eventually(WAIT, "`one` to be loaded again under its new limit", || {
        !std::sync::Arc::ptr_eq(&serving(&agent, "one"), &one)
    })
    .await;
    assert_eq!(permits(&serving(&agent, "one")), 2);
    assert!(
        std::sync::Arc::ptr_eq(&serving(&agent, "two"), &two),
        "`two` was loaded again though nothing of it changed"
    );
    let logs = captured_logs();
    assert!(logs.contains("calls.kill_grace_secs"), "{logs}");
    assert!(
        logs.contains("connectors.one (its connector reloaded)"),
        "{logs}"
    );

    // A default every connector is loaded under: both are loaded again.
    let two = serving(&agent, "two");
    TestAgent::write_config(
        &dirs,
        &dirs.plugins(),
        "[calls]\nkill_grace_secs = 3\nmax_concurrency = 5\n[connectors.one]\nmax_concurrency = 2\n",
    );
    agent.control.send(Control::Reload).await.unwrap();
    eventually(
        WAIT,
        "`two` to be loaded again under the new default",
        || permits(&serving(&agent, "two")) == 5,
    )
    .await;
    assert!(!std::sync::Arc::ptr_eq(&serving(&agent, "two"), &two));
    agent.shutdown().await;
}
