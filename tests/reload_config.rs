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

/// Call limits change in place, on the version serving: no connector is loaded again for
/// them. Only `in_process` (where a connector runs) loads its connector again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_limits_apply_in_place_and_only_in_process_loads_a_connector_again() {
    captured_logs();
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &test_connector(), "one");
    install_plugin(&dirs.plugins(), &test_connector(), "two");
    let agent = TestAgent::start(&dirs, "[connectors.one]\nmax_concurrency = 1\n").await;
    let (one, two) = (serving(&agent, "one"), serving(&agent, "two"));
    let limits = |c: &lumos_agent::plugins::Connector| {
        let limits = &c.runnable.as_ref().unwrap().limits;
        (limits.available(), limits.timeout())
    };
    assert_eq!(limits(&one), (1, Duration::from_secs(300)));
    let reload = |toml: &str| {
        TestAgent::write_config(&dirs, &dirs.plugins(), toml);
        agent.control.send(Control::Reload)
    };

    // A default and one connector's own table: in place, on the same records.
    reload(
        "[calls]\nkill_grace_secs = 3\nmax_concurrency = 5\n\
         [connectors.one]\nmax_concurrency = 2\ntimeout_secs = 1\n",
    )
    .await
    .unwrap();
    eventually(WAIT, "the new limits on both connectors", || {
        limits(&one) == (2, Duration::from_secs(1)) && limits(&two).0 == 5
    })
    .await;
    assert!(std::sync::Arc::ptr_eq(&serving(&agent, "one"), &one));
    assert!(std::sync::Arc::ptr_eq(&serving(&agent, "two"), &two));
    let logs = captured_logs();
    for applied in [
        "calls.kill_grace_secs",
        "calls.max_concurrency",
        "connectors.one (its call limits)",
    ] {
        assert!(logs.contains(applied), "{applied}: {logs}");
    }
    // The API shows the limits in force.
    let row = agent.connector_by_file("one").await;
    assert_eq!(
        (
            &row["max_concurrency"],
            &row["timeout_secs"],
            &row["running"]
        ),
        (&json!(2), &json!(1), &json!(0)),
        "{row}"
    );
    // The dispatcher reads the deadline in force.
    let (_, answer) = agent
        .call("one", "sleep", json!({"request": {"secs": 30}}))
        .await;
    assert_eq!(answer["error"]["error_code"], "agent.timeout", "{answer}");

    // Where a connector runs is fixed when it is loaded: that one is loaded again.
    reload(
        "[calls]\nkill_grace_secs = 3\nmax_concurrency = 5\n\
         [connectors.one]\nmax_concurrency = 2\ntimeout_secs = 1\n\
         [connectors.two]\nin_process = true\n",
    )
    .await
    .unwrap();
    eventually(WAIT, "`two` to be loaded again", || {
        !std::sync::Arc::ptr_eq(&serving(&agent, "two"), &two)
    })
    .await;
    assert!(std::sync::Arc::ptr_eq(&serving(&agent, "one"), &one));
    assert!(captured_logs().contains("connectors.two (its connector reloaded)"));

    // What the connectors' processes are given is fixed at load too: every one is loaded again.
    let (one, two) = (serving(&agent, "one"), serving(&agent, "two"));
    reload(
        "[calls]\nkill_grace_secs = 3\nmax_concurrency = 5\nconnector_log_level = \"DEBUG\"\n\
         [connectors.one]\nmax_concurrency = 2\ntimeout_secs = 1\n\
         [connectors.two]\nin_process = true\n",
    )
    .await
    .unwrap();
    eventually(WAIT, "both to be loaded again", || {
        !std::sync::Arc::ptr_eq(&serving(&agent, "one"), &one)
            && !std::sync::Arc::ptr_eq(&serving(&agent, "two"), &two)
    })
    .await;
    assert_eq!(limits(&serving(&agent, "one")), (2, Duration::from_secs(1)));
    agent.shutdown().await;
}

/// A reload that loads connectors again under new settings cannot give them to a version kept
/// serving behind a rejected replacement (its file no longer holds it): the log says so, and
/// that version keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_kept_behind_a_rejected_replacement_is_said_to_keep_its_settings() {
    captured_logs();
    let dirs = TestDirs::new();
    let p = dirs.plugins();
    versioned_connector(&p, "kept_settings", "kept_settings", "1.0.0");
    let agent = TestAgent::start(&dirs, "").await;
    // A replacement whose `info` fails: rejected, and 1.0.0 keeps serving beside it.
    write_script(&p, "kept_settings", "#!/bin/bash\nexit 3\n");
    agent.until_rows("kept_settings", 2).await;
    // A setting fixed at load: every file is loaded again.
    TestAgent::write_config(&dirs, &p, "[calls]\nmax_output_bytes = 2097152\n");
    agent.control.send(Control::Reload).await.unwrap();
    eventually(WAIT, "the reload's word on the version kept", || {
        captured_logs().contains(
            "kept_settings: loaded again by the reload, it is rejected; kept_settings 1.0.0 \
             keeps serving as it was loaded, with the settings fixed then",
        )
    })
    .await;
    let (_, answer) = agent.call("kept_settings", "echo", json!({})).await;
    assert!(
        answer["error"].is_null() && answer["response"].is_object(),
        "{answer}"
    );
    agent.shutdown().await;
}
