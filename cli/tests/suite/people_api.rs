//! The people's API (`/api/v1/` with user tokens) over real HTTP against a real PostgreSQL,
//! and the remote CLI against it: roles and ownership, refusals that change nothing, JSON
//! errors with the CLI's diagnostics, pagination, the OpenAPI document, and the remote CLI
//! printing what the local one prints.

use crate::common;

use serde_json::{Value, json};

use certo_orchestrator::api;
use certo_orchestrator::app::users;
use certo_orchestrator::store::Role;

async fn call(method: &str, url: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut req = match method {
        "GET" => client.get(url),
        _ => client.post(url),
    };
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v)
}

fn file(name: &str) -> Value {
    let path = common::fixtures().join("valid").join(name);
    json!({"name": format!("valid/{name}"), "content": std::fs::read_to_string(path).expect("fixture")})
}

/// The people's routes of the OpenAPI document (not the host or guest protocols), as
/// (method, path with sample parameters).
fn people_routes(doc: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        for (method, op) in ops.as_object().expect("operations") {
            let tags: Vec<&str> = op["tags"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            // The protocols have their own tests (hosts_api); the document itself is public.
            if tags
                .iter()
                .any(|t| matches!(*t, "guest" | "host protocol" | "meta"))
            {
                continue;
            }
            let concrete = path.replace("{id}", "3213").replace("{name}", "alice");
            out.push((method.to_uppercase(), concrete));
        }
    }
    out
}

#[tokio::test]
async fn every_route_refuses_a_missing_wrong_or_revoked_token_and_the_wrong_role() {
    let db = common::scratch().await;
    let srv = common::people_server(&db, false).await;
    let store = &db.store;
    let alice = users::add(store, "alice", Role::Certifier)
        .await
        .expect("alice");
    let gone = users::add(store, "gone", Role::Admin).await.expect("gone");
    users::revoke(store, "gone").await.expect("revoke");
    // A host's and a guest's tokens are no user's.
    let host_token = "h".repeat(64);
    store
        .add_host("h1", &api::token_digest(&host_token))
        .await
        .expect("host");

    let (status, doc) = call(
        "GET",
        &format!("{}/api/v1/openapi.json", srv.base),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200);
    let routes = people_routes(&doc);
    assert!(routes.len() >= 20, "{routes:?}");
    let before = common::snapshot_but_last_seen(&db).await;
    for (method, path) in &routes {
        let url = format!("{}{path}", srv.base);
        for (token, why) in [
            (None, "a user token is required"),
            (Some("not-a-token"), "unknown user token"),
            (Some(host_token.as_str()), "unknown user token"),
            (Some(gone.as_str()), "was revoked"),
        ] {
            let (status, v) = call(method, &url, token, Some(json!({}))).await;
            assert_eq!(status, 401, "{method} {path} with {token:?}: {v}");
            assert_eq!(v["error"]["code"], "unauthorized", "{method} {path}: {v}");
            assert!(
                v["error"]["message"].as_str().unwrap_or("").contains(why),
                "{method} {path}: {v}"
            );
        }
    }
    // The admins' routes refuse a certifier, whatever the body.
    for (method, path) in [
        ("GET", "/api/v1/users"),
        ("POST", "/api/v1/users"),
        ("POST", "/api/v1/users/alice/revoke"),
        ("POST", "/api/v1/hosts/h1/quarantine"),
        ("POST", "/api/v1/hosts/h1/release"),
        ("POST", "/api/v1/sweeps"),
    ] {
        let body = json!({"name": "mallory", "role": "admin", "reason": "x", "cells": "*/*/*"});
        let (status, v) = call(
            method,
            &format!("{}{path}", srv.base),
            Some(&alice),
            Some(body),
        )
        .await;
        assert_eq!(status, 403, "{method} {path}: {v}");
        assert_eq!(v["error"]["code"], "forbidden");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("for admins"),
            "{v}"
        );
    }
    // Nothing changed (the users' last-seen times aside, which a refused call may set).
    let after = common::snapshot_but_last_seen(&db).await;
    assert_eq!(before, after);
    assert_eq!(users::list(store).await.expect("users").len(), 2);
}

#[tokio::test]
async fn a_certifier_acts_only_on_their_own_patches_and_refused_submissions_store_nothing() {
    let db = common::scratch().await;
    let srv = common::people_server(&db, false).await;
    let store = &db.store;
    let alice = users::add(store, "alice", Role::Certifier)
        .await
        .expect("alice");
    let bob = users::add(store, "bob", Role::Certifier)
        .await
        .expect("bob");
    let admin = users::add(store, "root", Role::Admin).await.expect("root");
    let url = |p: &str| format!("{}{p}", srv.base);

    // Alice stores 3213 r1: it is hers.
    let (status, v) = call(
        "POST",
        &url("/api/v1/submit"),
        Some(&alice),
        Some(json!({"files": [file("3213-lb-r1.txt")], "certify": true})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["records"][0]["outcome"], "stored");
    let run = v["runs"][0]["run"].as_i64().expect("a run started");
    let (_, shown) = call("GET", &url("/api/v1/patches/3213"), Some(&bob), None).await;
    assert_eq!(shown["owner"], "alice", "{shown}");
    assert_eq!(shown["run_id"], run);

    let before = common::snapshot_but_last_seen(&db).await;
    // Bob may read it, but not submit its next revision, cancel or rerun it.
    let (status, v) = call(
        "POST",
        &url("/api/v1/submit"),
        Some(&bob),
        Some(json!({"files": [file("3213-lb-r2.yaml")]})),
    )
    .await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["error"]["code"], "not_yours");
    let d = &v["error"]["diagnostics"][0];
    assert_eq!(
        (d["file"].as_str(), d["line"].as_u64(), d["field"].as_str()),
        (Some("valid/3213-lb-r2.yaml"), Some(2), Some("id")),
        "{v}"
    );
    assert!(
        d["message"]
            .as_str()
            .unwrap_or("")
            .contains("belongs to alice")
    );
    for what in ["cancel", "rerun"] {
        let (status, v) = call(
            "POST",
            &url(&format!("/api/v1/patches/3213/{what}")),
            Some(&bob),
            Some(json!({})),
        )
        .await;
        assert_eq!(status, 403, "{what}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("belongs to alice"),
            "{v}"
        );
    }
    // An invalid record: the same FILE:LINE:COL diagnostics as `certo validate`, nothing stored.
    let bad = common::fixtures().join("invalid/02-unknown-node-type.yaml");
    let bad_name = bad.display().to_string();
    let content = std::fs::read_to_string(&bad).expect("invalid fixture");
    let (status, v) = call(
        "POST",
        &url("/api/v1/submit"),
        Some(&alice),
        Some(json!({"files": [{"name": bad_name, "content": content}]})),
    )
    .await;
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["error"]["code"], "invalid_record");
    let validate = common::certo(&db.url, &["validate", &bad_name]);
    let cli_lines: Vec<String> = String::from_utf8_lossy(&validate.stderr)
        .lines()
        .filter(|l| l.starts_with(&bad_name))
        .map(str::to_owned)
        .collect();
    let api_lines: Vec<String> = v["error"]["diagnostics"]
        .as_array()
        .expect("diagnostics")
        .iter()
        .map(|d| {
            format!(
                "{}:{}:{}: {}: {}",
                d["file"].as_str().unwrap_or(""),
                d["line"],
                d["col"],
                d["field"].as_str().unwrap_or(""),
                d["message"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert!(!api_lines.is_empty());
    assert_eq!(api_lines, cli_lines);
    // A body that is not JSON: a JSON error, nothing stored.
    let resp = reqwest::Client::new()
        .post(url("/api/v1/submit"))
        .header("authorization", format!("Bearer {alice}"))
        .header("content-type", "application/json")
        .body("{\"files\": [")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 400);
    let v: Value = serde_json::from_str(&resp.text().await.expect("body")).expect("a JSON error");
    assert_eq!(v["error"]["code"], "bad_request");
    let after = common::snapshot_but_last_seen(&db).await;
    assert_eq!(before, after, "a refused call changed the store");

    // Alice may cancel her own; an admin may rerun anyone's.
    let (status, v) = call(
        "POST",
        &url("/api/v1/patches/3213/cancel"),
        Some(&alice),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["cancelled"], json!([run]));
    let (status, v) = call(
        "POST",
        &url("/api/v1/patches/3213/cancel"),
        Some(&alice),
        None,
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("refused")),
        "{v}"
    );
    let (status, v) = call(
        "POST",
        &url("/api/v1/patches/3213/rerun"),
        Some(&admin),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["run"].as_i64().is_some_and(|r| r > run));
    let (status, v) = call("GET", &url("/api/v1/patches/99999"), Some(&bob), None).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{v}"
    );
    // Revoked: Alice's token acts for nothing, and says why.
    users::revoke(store, "alice").await.expect("revoke");
    let (status, v) = call("GET", &url("/api/v1/patches"), Some(&alice), None).await;
    assert_eq!(status, 401);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("revoked"),
        "{v}"
    );
}

#[tokio::test]
async fn lists_come_in_pages_and_the_openapi_document_covers_every_route() {
    let db = common::scratch().await;
    let srv = common::people_server(&db, false).await;
    db.store
        .submit(&common::load_valid())
        .await
        .expect("submit the fixtures");
    let token = users::add(&db.store, "reader", Role::Certifier)
        .await
        .expect("user");
    let total = db
        .store
        .list_patches(None, None)
        .await
        .expect("list")
        .iter()
        .filter(|p| p.state != certo_orchestrator::store::PatchState::Superseded)
        .count() as i64;
    assert!(total > 10);
    let mut seen = Vec::new();
    let mut offset = Some(0);
    let mut pages = 0;
    while let Some(o) = offset {
        let (status, page) = call(
            "GET",
            &format!("{}/api/v1/patches?limit=7&offset={o}", srv.base),
            Some(&token),
            None,
        )
        .await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["total"], total);
        assert!(page["items"].as_array().expect("items").len() <= 7);
        for p in page["items"].as_array().expect("items") {
            seen.push((p["patch_id"].as_u64(), p["revision"].as_u64()));
        }
        offset = page["next_offset"].as_i64();
        pages += 1;
    }
    assert_eq!(seen.len() as i64, total);
    assert_eq!(pages, (total + 6) / 7);
    let mut unique = seen.clone();
    unique.dedup();
    assert_eq!(unique, seen, "a page repeated an item");
    // The same list by cursor: each page continues after the last one's `next_after`.
    let mut by_cursor = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let q = after
            .as_deref()
            .map(|a| format!("&after={a}"))
            .unwrap_or_default();
        let (status, page) = call(
            "GET",
            &format!("{}/api/v1/patches?limit=7{q}", srv.base),
            Some(&token),
            None,
        )
        .await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["total"], total);
        for p in page["items"].as_array().expect("items") {
            by_cursor.push((p["patch_id"].as_u64(), p["revision"].as_u64()));
        }
        match page["next_after"].as_str() {
            Some(a) => after = Some(a.to_owned()),
            None => break,
        }
    }
    assert_eq!(by_cursor, seen, "by cursor and by offset the same list");
    let (status, v) = call(
        "GET",
        &format!("{}/api/v1/patches?limit=x", srv.base),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{v}"
    );
    // A cursor beside an offset, or one that is not this list's; pages that cannot be; a
    // NUL byte (which PostgreSQL's text cannot hold): refused, saying what, never an
    // internal error.
    for (q, code, what) in [
        ("patches?after=3213.1&offset=7", 422, "after"),
        ("patches?after=../etc", 422, "after"),
        ("patches?after=3213", 422, "after"),
        ("patches?limit=0", 422, "limit=0"),
        ("patches?offset=-1", 422, "offset=-1"),
        ("runs?patch=9223372036854775808", 422, "that large"),
        ("sweeps/diff?cell=3.2%00x", 400, "NUL"),
        ("patches?release=3%002", 422, "unknown release"),
    ] {
        let (status, v) = call(
            "GET",
            &format!("{}/api/v1/{q}", srv.base),
            Some(&token),
            None,
        )
        .await;
        assert_eq!(status, code, "{q}: {v}");
        if code == 422 {
            assert_eq!(v["error"]["code"], "refused", "{q}: {v}");
        }
        assert!(
            v["error"]["message"].as_str().unwrap_or("").contains(what),
            "{q}: {v}"
        );
    }
    // A body that is JSON but not an object (serde would read an array as fields).
    let admin = users::add(&db.store, "pager-admin", Role::Admin)
        .await
        .expect("admin");
    let (status, v) = call(
        "POST",
        &format!("{}/api/v1/sweeps", srv.base),
        Some(&admin),
        Some(json!([null])),
    )
    .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (422, Some("bad_request")),
        "{v}"
    );
    let (_, sweeps) = call(
        "GET",
        &format!("{}/api/v1/sweeps", srv.base),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(sweeps["total"], 0, "no sweep was started: {sweeps}");

    // The document: OpenAPI 3.1, every operation answers for itself, every reference
    // resolves, and every path it names is served (no 404 or 405 from the router).
    let (_, doc) = call(
        "GET",
        &format!("{}/api/v1/openapi.json", srv.base),
        None,
        None,
    )
    .await;
    assert!(
        doc["openapi"].as_str().unwrap_or("").starts_with("3.1"),
        "{doc}"
    );
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    let text = doc.to_string();
    for piece in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = piece.split('"').next().unwrap_or("");
        assert!(schemas.contains_key(name), "dangling $ref to {name}");
    }
    let mut operations = 0;
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        for (method, op) in ops.as_object().expect("ops") {
            operations += 1;
            assert!(
                op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                "{method} {path}"
            );
            assert!(
                op["security"].is_array(),
                "{method} {path} names no credential"
            );
            let url = format!(
                "{}{}",
                srv.base,
                path.replace("{id}", "1").replace("{name}", "x")
            );
            let (status, v) = call(&method.to_uppercase(), &url, None, Some(json!({}))).await;
            assert!(
                status != 404 && status != 405 || v["error"]["code"] == "not_found",
                "{method} {path} is in the document but not served: {status} {v}"
            );
        }
    }
    assert!(operations >= 30, "{operations} operations");
    // And an OpenAPI validator of its own (openapi-spec-validator, which scripts/test
    // installs from PyPI): the document is valid OpenAPI 3.1, operation ids unique.
    let validator = pytool("openapi-spec-validator");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("openapi.json");
    let validate = |doc: &Value| {
        std::fs::write(&file, doc.to_string()).expect("write the document");
        std::process::Command::new(&validator)
            .arg(&file)
            .output()
            .expect("run openapi-spec-validator")
    };
    let out = validate(&doc);
    assert!(
        out.status.success(),
        "the published OpenAPI document does not validate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The validator does look: the same document with one operation id used twice fails.
    let mut twice = doc.clone();
    twice["paths"]["/api/v1/runs"]["get"]["operationId"] =
        twice["paths"]["/api/v1/patches"]["get"]["operationId"].clone();
    let out = validate(&twice);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stdout).contains("not unique"),
        "a repeated operation id passed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The routes the document leaves out would not be found: a sample of unknown ones.
    let (status, _) = call(
        "GET",
        &format!("{}/api/v1/nothing", srv.base),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 404);
}

// Multi-threaded: the server runs on this runtime while the test waits for a `certo` process.
#[tokio::test(flavor = "multi_thread")]
async fn the_remote_cli_prints_what_the_local_one_prints() {
    let db = common::scratch().await;
    let srv = common::people_server(&db, false).await;
    let admin = users::add(&db.store, "root", Role::Admin)
        .await
        .expect("admin");
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{admin}\n")).expect("token file");
    let valid = common::fixtures().join("valid");
    let files: Vec<String> = ["3213-lb-r1.txt", "3213-lb-r2.yaml", "3509-two-records.yaml"]
        .iter()
        .map(|f| valid.join(f).display().to_string())
        .collect();
    let remote = |args: &[&str]| {
        let mut all = vec!["--server", &srv.base, "--user-token-file"];
        let tf = token_file.to_str().expect("utf-8");
        all.push(tf);
        all.extend_from_slice(args);
        // No database: a remote command must not need one.
        common::certo("postgres://nobody@127.0.0.1:1/none", &all)
    };
    let mut submit = vec!["submit"];
    submit.extend(files.iter().map(String::as_str));
    let out = remote(&submit);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        stored.contains("stored     patch 3213 r2 (supersedes r1)"),
        "{stored}"
    );
    // The same submission again, locally: unchanged, the same lines as remotely.
    let local = common::certo(&db.url, &submit);
    let out = remote(&submit);
    assert_eq!(
        String::from_utf8_lossy(&local.stdout),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("unchanged  patch 3213 r2"));
    // A run to show.
    let run = certo_orchestrator::app::runs::rerun(&srv.ctx, 3213, false)
        .await
        .expect("run");
    for args in [
        vec!["patches"],
        vec!["patches", "--json"],
        vec!["patches", "--all-revisions"],
        vec!["show", "3213"],
        vec!["show", "3213", "--json"],
        vec!["show", "3213@1"],
        vec!["runs"],
        vec!["runs", "--json"],
        vec!["show", "4242"],
        vec!["cancel", "3509"],
    ] {
        let l = common::certo(&db.url, &args);
        let r = remote(&args);
        assert_eq!(
            (l.status.code(), String::from_utf8_lossy(&l.stdout)),
            (r.status.code(), String::from_utf8_lossy(&r.stdout)),
            "certo {args:?}: local and remote differ\nlocal stderr: {}\nremote stderr: {}",
            String::from_utf8_lossy(&l.stderr),
            String::from_utf8_lossy(&r.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&l.stderr),
            String::from_utf8_lossy(&r.stderr),
            "certo {args:?}"
        );
    }
    let shown = String::from_utf8_lossy(&remote(&["show", "3213"]).stdout).into_owned();
    assert!(
        shown.contains(&format!("Timeline (run {run}, running)")),
        "{shown}"
    );
    // A refused submission: the same diagnostics and exit status as locally.
    let bad = common::fixtures().join("invalid/02-unknown-node-type.yaml");
    let bad = bad.to_str().expect("utf-8");
    let l = common::certo(&db.url, &["submit", bad]);
    let r = remote(&["submit", bad]);
    assert_eq!(l.status.code(), Some(1));
    assert_eq!(r.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&l.stderr),
        String::from_utf8_lossy(&r.stderr)
    );
    // Cancel through the API: the same line and status as locally would print.
    let r = remote(&["cancel", "3213"]);
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        format!("run {run} of patch 3213 cancelled (teardown still runs)\n")
    );
    // Without a token, the remote CLI says how to get one.
    let out = common::certo(
        "postgres://nobody@127.0.0.1:1/none",
        &["--server", &srv.base, "patches"],
    );
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("certo user add"));
}

#[tokio::test]
async fn metrics_are_prometheus_text_for_a_user_and_nothing_for_anyone_else() {
    let db = common::scratch().await;
    let srv = common::people_server(&db, false).await;
    let token = users::add(&db.store, "ops", Role::Admin)
        .await
        .expect("user");
    db.store
        .submit(&common::load_valid())
        .await
        .expect("submit");
    certo_orchestrator::app::runs::rerun(&srv.ctx, 3213, false)
        .await
        .expect("a run");
    db.store
        .add_host("h1", &api::token_digest(&"h".repeat(64)))
        .await
        .expect("host");
    db.store
        .quarantine("h1", "disk full")
        .await
        .expect("quarantine");
    let url = format!("{}/metrics", srv.base);
    let (status, v) = call("GET", &url, None, None).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let resp = reqwest::Client::new()
        .get(&url)
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(resp.status().as_u16(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap_or("")
            .starts_with("text/plain; version=0.0.4")
    );
    let text = resp.text().await.expect("text");
    // Every line is a comment or `name{labels} value` with a number; every family has its
    // TYPE before its samples.
    let mut typed = std::collections::BTreeSet::new();
    let mut samples = std::collections::BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            typed.insert(it.next().expect("name").to_owned());
            assert!(
                matches!(it.next(), Some("gauge" | "counter" | "histogram")),
                "{line}"
            );
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        assert!(value.parse::<f64>().is_ok(), "{line}");
        let name = key.split('{').next().expect("name");
        let family = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(
            typed.contains(family) || typed.contains(name),
            "{line} before its TYPE"
        );
        samples.insert(key.to_owned(), value.to_owned());
    }
    assert_eq!(samples["certo_runs{state=\"running\"}"], "1", "{text}");
    assert_eq!(samples["certo_hosts_quarantined"], "1");
    assert_eq!(samples["certo_users"], "1");
    for family in [
        "certo_steps",
        "certo_step_duration_seconds",
        "certo_verdicts_total",
        "certo_infrastructure_retries_total",
        "certo_layer_cache_total",
        "certo_transfer_bytes_sent_total",
        "certo_transfer_bytes_saved_total",
    ] {
        assert!(typed.contains(family), "no {family} in {text}");
    }
    assert!(
        samples.contains_key("certo_steps{state=\"runnable\"}"),
        "{text}"
    );
}

/// A Python test tool scripts/test installs from PyPI into target/pytools (CERTO_PYTOOLS
/// in scripts/lib.sh); missing, the test fails saying how to install it.
fn pytool(name: &str) -> std::path::PathBuf {
    let dir = std::env::var_os("CERTO_PYTOOLS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pytools")
        });
    let tool = dir.join("bin").join(name);
    assert!(
        tool.exists(),
        "{} is missing: install it with `bash -c '. scripts/lib.sh; certo_install_pytools'` \
         (scripts/test does), or name another directory with CERTO_PYTOOLS_DIR",
        tool.display()
    );
    tool
}

/// The API against its own document, under requests made from it (schemathesis, from
/// PyPI): thousands of generated requests, valid and not, to every operation, then chains
/// of them that follow the document's links. No answer is a server error; every status,
/// content type and body is one the document describes; a request with its credential
/// left out or wrong is refused; a request the document forbids is refused too. The
/// generation is deterministic, so a failure shows again on the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_generated_requests_as_its_openapi_document_says() {
    let db = common::scratch().await;
    let srv = common::people_server(&db, false).await;
    db.store
        .submit(&common::load_valid())
        .await
        .expect("submit the fixtures");
    let token = users::add(&db.store, "fuzzer", Role::Admin)
        .await
        .expect("user");
    let work = tempfile::tempdir().expect("tempdir");
    // The token travels in the environment, not on the command line.
    let config = work.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        "headers = { Authorization = \"Bearer ${CERTO_FUZZ_TOKEN}\" }\n",
    )
    .expect("write the configuration");
    let out = tokio::process::Command::new(pytool("schemathesis"))
        .current_dir(work.path())
        .env("CERTO_FUZZ_TOKEN", &token)
        .arg("--config-file")
        .arg(&config)
        .args([
            "--no-color",
            "run",
            &format!("{}/api/v1/openapi.json", srv.base),
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_schema_conformance,ignored_auth,negative_data_rejection",
            // Revoking its own token would end the run's authority half-way.
            "--exclude-operation-id",
            "revoke_user",
            "--max-examples",
            "25",
            "--generation-deterministic",
            // A loaded machine makes generation slow and answers late: neither is the
            // API's fault. An answer later than a minute still fails.
            "--suppress-health-check",
            "all",
            "--request-timeout",
            "60",
            "--workers",
            "2",
        ])
        .output()
        .await
        .expect("run schemathesis");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "schemathesis found the API and its document apart:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It did test: every operation but the one left out, thousands of requests.
    let number_after = |label: &str| -> u64 {
        let at = text
            .find(label)
            .unwrap_or_else(|| panic!("no {label:?} in:\n{text}"));
        text[at + label.len()..]
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number after {label:?} in:\n{text}"))
    };
    let selected = number_after("Selected:");
    let all = number_after(&format!("Selected: {selected}/"));
    assert_eq!(
        (number_after("Tested:"), selected),
        (selected, all - 1),
        "{text}"
    );
    assert!(all >= 30, "{text}");
    assert!(number_after("Test cases:") >= 1000, "{text}");
    // The token never shows in what the tool printed.
    assert!(!text.contains(&token));
}
