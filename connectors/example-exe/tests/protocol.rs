//! The example connector speaks the Lumos connector CLI protocol like connector-py connectors do.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::process::Command;

use serde_json::Value;
use sha2::Digest;

const EXE: &str = env!("CARGO_BIN_EXE_lumos-example-connector");

fn run(args: &[&str]) -> Value {
    let out = Command::new(EXE).args(args).output().unwrap();
    assert!(out.status.success(), "connector-py exits 0 even on errors");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn info_describes_the_connector() {
    let info = run(&["info"]);
    assert_eq!(info["response"]["app_id"], "lumos_example");
    assert_eq!(
        info["response"]["capabilities"],
        serde_json::json!(["list_accounts", "validate_credentials"])
    );
}

#[test]
fn validate_credentials_reports_the_token_hash_from_auth_or_credentials() {
    let expected = &hex::encode(sha2::Sha256::digest(b"abc"))[..16];
    let single = run(&[
        "validate_credentials",
        "--json",
        r#"{"auth": {"oauth": {"access_token": "abc"}}}"#,
    ]);
    assert_eq!(single["response"]["unique_tenant_id"], *expected);
    // Removed when dropped, at the end of the test (or its panic).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.json");
    std::fs::write(
        &file,
        r#"{"credentials": [{"id": "x", "oauth": {"access_token": "abc"}}]}"#,
    )
    .unwrap();
    let multi = run(&[
        "validate_credentials",
        "--json-file",
        file.to_str().unwrap(),
    ]);
    assert_eq!(multi["response"]["unique_tenant_id"], *expected);
    let missing = run(&["validate_credentials", "--json", "{}"]);
    assert_eq!(missing["is_error"], true);
    assert_eq!(
        missing["error"]["error_code"],
        "lumos_example.missing_credentials"
    );
    // A whole envelope: the parts it does not read are skipped, whatever they hold.
    let full = run(&[
        "validate_credentials",
        "--json",
        r#"{"request": {}, "settings": {"deep": [{"x": [1, 2, {"y": null}]}]}, "auth": {"access_token": "abc"}, "page": null, "include_raw_data": true}"#,
    ]);
    assert_eq!(full["response"]["unique_tenant_id"], *expected);
    for bad in ["[1, 2]", "not json", r#"{"auth": "#] {
        let out = run(&["validate_credentials", "--json", bad]);
        assert_eq!(
            out["error"]["error_code"], "lumos_example.bad_request",
            "{bad}: {out}"
        );
    }
}

#[test]
fn list_accounts_pages_through_exactly_n_accounts() {
    let mut seen = Vec::new();
    let mut page = Value::Null;
    loop {
        let input = serde_json::json!({"request": {"count": 7}, "page": if page.is_null() { serde_json::json!({"size": 3}) } else { page.clone() }});
        let out = run(&["list_accounts", "--json", &input.to_string()]);
        for account in out["response"].as_array().unwrap() {
            seen.push(
                account["integration_specific_id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        page = out["page"].clone();
        if page.is_null() {
            break;
        }
    }
    let expected: Vec<String> = (0..7).map(|i| format!("user-{i}")).collect();
    assert_eq!(seen, expected);
    let bad = run(&["list_accounts", "--json", r#"{"page": {"token": "bogus"}}"#]);
    assert_eq!(bad["is_error"], true);
}
