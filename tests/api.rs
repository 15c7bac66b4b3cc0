//! The local API: authentication, routes, tenants without secrets, errors in the Lumos shape.
#![allow(clippy::unwrap_used, reason = "tests")]

use hyper::{Method, StatusCode};
use lumos_agent_integration::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_v1_route_needs_the_bearer_token() {
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &example_connector(), "example");
    let agent = TestAgent::start(&dirs, "").await;

    // Health is open (for load balancers and systemd); nothing else is.
    let (status, _) = agent
        .request_with(Method::GET, "/healthz", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let routes = [
        (Method::GET, "/v1/connectors"),
        (Method::GET, "/v1/connectors/lumos_example"),
        (Method::POST, "/v1/connectors/lumos_example/list_accounts"),
        (Method::GET, "/v1/tenants"),
        (Method::PUT, "/v1/tenants/t"),
        (Method::DELETE, "/v1/tenants/t"),
    ];
    let wrong_same_length = "0".repeat(agent.token.len());
    for (method, path) in routes {
        for token in [
            None,
            Some("wrong"),
            Some(wrong_same_length.as_str()),
            Some(""),
        ] {
            let (status, body) = agent
                .request_with(method.clone(), path, Some(json!({"app_id": "x"})), token)
                .await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {token:?}: {}",
                String::from_utf8_lossy(&body)
            );
        }
    }
    // Nothing was created by the refused PUT.
    let (_, tenants) = agent.request(Method::GET, "/v1/tenants", None).await;
    assert_eq!(tenants, json!([]));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connectors_list_and_detail() {
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &example_connector(), "example");
    let agent = TestAgent::start(&dirs, "").await;

    let (status, bytes) = agent
        .request_with(
            Method::GET,
            "/v1/connectors",
            None,
            Some(&agent.token.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let list: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let entry = &list[0];
    for key in [
        "app_id",
        "version",
        "kind",
        "status",
        "reason",
        "path",
        "sha256",
        "capabilities",
    ] {
        assert!(entry.get(key).is_some(), "{key} missing from {entry}");
    }
    assert_eq!(entry["kind"], "executable");
    assert_eq!(
        entry["capabilities"],
        json!(["list_accounts", "validate_credentials"])
    );
    assert!(entry.get("info").is_none(), "the list stays small: no info");

    let (status, detail) = agent
        .request(Method::GET, "/v1/connectors/lumos_example", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        detail["info"]["user_friendly_name"],
        "Lumos example connector"
    );

    let (status, body) = agent
        .request(Method::GET, "/v1/connectors/nope", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["error_code"], "agent.unknown_connector");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_stored_listed_without_secrets_and_deleted() {
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &example_connector(), "example");
    let agent = TestAgent::start(&dirs, "").await;
    let secret = "SECRET-ACCESS-TOKEN-9f8e";
    agent
        .put_tenant(
            "acme",
            json!({"app_id": "lumos_example", "settings": {"account_id": "a1"},
                   "credentials": [{"id": "oauth", "oauth": {"access_token": secret, "refresh_token": "RT-SECRET"}}]}),
        )
        .await;

    for path in ["/v1/tenants", "/v1/tenants/acme"] {
        let (status, body) = agent.request(Method::GET, path, None).await;
        assert_eq!(status, StatusCode::OK);
        let text = body.to_string();
        assert!(
            !text.contains(secret) && !text.contains("RT-SECRET"),
            "{path} leaked a secret: {text}"
        );
        assert!(text.contains("account_id"), "{text}");
    }
    let (_, one) = agent.request(Method::GET, "/v1/tenants/acme", None).await;
    assert_eq!(one["credentials"], json!(["oauth"]));

    // The stored credentials are what the connector receives.
    let (status, body) = agent
        .call(
            "lumos_example",
            "validate_credentials",
            json!({"tenant_id": "acme"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["response"]["unique_tenant_id"], token_hash(secret));

    // The store on disk is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dirs.state().join("tenants.json"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    let (status, _) = agent
        .request(Method::DELETE, "/v1/tenants/acme", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = agent.request(Method::GET, "/v1/tenants/acme", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["error_code"], "agent.unknown_tenant");
    let (status, _) = agent
        .request(Method::DELETE, "/v1/tenants/acme", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    let dirs = TestDirs::new();
    install_plugin(&dirs.plugins(), &example_connector(), "example");
    let agent = TestAgent::start(&dirs, "").await;
    let token = agent.token.clone();

    // Not JSON.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let req = hyper::Request::post(format!(
        "{}/v1/connectors/lumos_example/list_accounts",
        agent.base
    ))
    .header("authorization", format!("Bearer {token}"))
    .body(http_body_util::Full::new(bytes::Bytes::from_static(
        b"{not json",
    )))
    .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    // Unknown fields are refused rather than silently dropped.
    let (status, body) = agent
        .call("lumos_example", "list_accounts", json!({"tenant": "typo"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tenant"),
        "{body}"
    );

    // A capability the connector does not offer, or that could be read as an option.
    for capability in ["delete_everything", "--json"] {
        let (status, body) = agent.call("lumos_example", capability, json!({})).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{capability}: {body}");
        assert_eq!(body["error"]["error_code"], "agent.unsupported_capability");
    }

    // Tenants: bad ids and bodies.
    let (status, _) = agent
        .request(
            Method::PUT,
            "/v1/tenants/bad%20id",
            Some(json!({"app_id": "x"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = agent
        .request(Method::PUT, "/v1/tenants/ok", Some(json!({"settings": {}})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = agent
        .request(
            Method::PUT,
            "/v1/tenants/ok",
            Some(json!({"app_id": "x", "surprise": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, _) = agent.request(Method::GET, "/v1/nothing-here", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    agent.shutdown().await;
}
