//! The operator's ceilings (issue 20, point 6): a non-admin runs under the
//! default OCI runtime or one of `[container] allowed_runtimes`; memory and
//! CPUs are capped at half of the Engine host unless configured; and a
//! function without a timeout gets the one-hour `max_timeout`. Only
//! creates and updates: the runtimes named are the shared Engine's own
//! (`docker info`), nothing is registered.

mod common;

use common::scope::send_as;
use common::*;

/// The Engine host's memory and CPUs, as `docker info` tells them.
fn host() -> (u64, u64) {
    let out = std::process::Command::new("docker")
        .args(["info", "-f", "{{.MemTotal}} {{.NCPU}}"])
        .output()
        .expect("docker info");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace().map(|v| v.parse::<u64>());
    match (it.next(), it.next()) {
        (Some(Ok(m)), Some(Ok(c))) => (m, c),
        _ => panic!("docker info: {text:?}"),
    }
}

fn create(d: &Daemon, key: &str, name: &str, extra: &str) -> (u16, serde_json::Value) {
    send_as(
        d,
        key,
        "POST",
        "/v1/functions",
        &format!(r#"{{"Name":"{name}","Image":"{IMAGE}","Command":["cat"]{extra}}}"#),
    )
}

fn assert_code(got: (u16, serde_json::Value), code: &str, words: &str, what: &str) {
    let (status, v) = got;
    assert_eq!(status, 400, "{what}: {v}");
    assert_eq!(v["error"]["code"], code, "{what}: {v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(words), "{what}: {message:?}");
}

#[test]
fn a_tenant_runs_under_the_default_runtime_unless_the_operator_allows_another() {
    // A default other than runc, which the Engine has under another name.
    let mut d = Daemon::start_with("[container]\nruntime = \"io.containerd.runc.v2\"\n");
    let tenant = d.add_user("tenant", 2);

    let out = d.cli_as(
        &tenant,
        &[
            "func",
            "create",
            "--name",
            "plain",
            "--runtime",
            "runc",
            IMAGE,
            "cat",
        ],
        None,
    );
    assert_cli_error(
        &out,
        "OCI runtime \"runc\" is not allowed on this server (functions may use: io.containerd.runc.v2)",
    );
    assert_code(
        create(&d, &tenant, "plain", r#","Runtime":"runc""#),
        "runtime_not_allowed",
        "not allowed",
        "create",
    );
    // Not allowed is said before registered: a tenant learns nothing of
    // the Engine's runtimes.
    assert_code(
        create(&d, &tenant, "plain", r#","Runtime":"nosuch""#),
        "runtime_not_allowed",
        "not allowed",
        "unregistered",
    );
    // The default, named or not, is fine; leaving it by update is not.
    d.create_as(&tenant, "gv", &[IMAGE, "cat"]);
    d.create_as(
        &tenant,
        "named",
        &["--runtime", "io.containerd.runc.v2", IMAGE, "cat"],
    );
    assert_code(
        send_as(
            &d,
            &tenant,
            "PATCH",
            "/v1/functions/gv",
            r#"{"Runtime":"runc"}"#,
        ),
        "runtime_not_allowed",
        "not allowed",
        "update",
    );
    assert_eq!(d.inspect("gv")["Runtime"], "io.containerd.runc.v2");
    // The admin is the operator's key: any registered runtime.
    d.create("adm", &["--runtime", "runc", IMAGE, "cat"]);
    assert_eq!(d.inspect("adm")["Runtime"], "runc");

    // Listed, runc is a tenant's choice; what is not listed still is not.
    d.restart_with(
        "[container]\nruntime = \"io.containerd.runc.v2\"\nallowed_runtimes = [\"runc\"]\n",
    );
    d.create_as(&tenant, "plain", &["--runtime", "runc", IMAGE, "cat"]);
    assert_eq!(d.inspect("plain")["Runtime"], "runc");
    assert_code(
        send_as(
            &d,
            &tenant,
            "PATCH",
            "/v1/functions/plain",
            r#"{"Runtime":"io.containerd.runtime.v1.linux"}"#,
        ),
        "runtime_not_allowed",
        "functions may use: io.containerd.runc.v2, runc",
        "update to an unlisted one",
    );

    // No configured default: the Engine's (runc) is the default.
    d.restart_with("");
    d.create_as(&tenant, "engine", &["--runtime", "runc", IMAGE, "cat"]);
    assert_code(
        create(
            &d,
            &tenant,
            "other",
            r#","Runtime":"io.containerd.runc.v2""#,
        ),
        "runtime_not_allowed",
        "functions may use: runc",
        "another than the Engine's default",
    );
    d.finish();
}

#[test]
fn memory_and_cpus_above_half_the_host_are_refused_and_timeouts_have_a_ceiling() {
    let (memory, cpus) = host();
    let mut d = Daemon::start();
    let tenant = d.add_user("tenant", 2);
    let half = memory / 2;

    // Above half the host, below the host: only the default ceiling refuses.
    let mut over = vec![half + 1024 * 1024];
    if 25_000_000_000 > half && 25_000_000_000 <= memory {
        over.push(25_000_000_000);
    }
    for m in over {
        let out = d.cli_as(
            &tenant,
            &[
                "func",
                "create",
                "--name",
                "big",
                "--memory",
                &m.to_string(),
                IMAGE,
                "cat",
            ],
            None,
        );
        assert_cli_error(
            &out,
            "above this server's default ceiling (half of the host's memory)",
        );
    }
    let (code, v) = create(&d, &tenant, "big", &format!(r#","Memory":{half}"#));
    assert_eq!(code, 201, "at the ceiling: {v}");
    if cpus >= 2 {
        let c = cpus as f64 / 2.0 + 0.5;
        assert_code(
            create(&d, &tenant, "wide", &format!(r#","Cpus":{c}"#)),
            "bad_request",
            "half of the host's CPUs",
            "cpus",
        );
        let (code, v) = create(
            &d,
            &tenant,
            "wide",
            &format!(r#","Cpus":{}"#, cpus as f64 / 2.0),
        );
        assert_eq!(code, 201, "at the ceiling: {v}");
    }
    // The admin too: ceilings are the host's room, not a tenant's budget.
    let (code, v) = create(
        &d,
        &d.admin_key(),
        "big",
        &format!(r#","Memory":{}"#, half + (1 << 20)),
    );
    assert_eq!(code, 400, "{v}");

    // A function without a timeout gets the default ceiling, an hour; up
    // to it a function asks for what it likes.
    d.create_as(&tenant, "plain", &[IMAGE, "cat"]);
    let (_, v) = scope::api_as(&d, &tenant, "GET", "/v1/functions/plain");
    assert_eq!(v["Timeout"], "1h", "{v}");
    let out = d.cli_as(
        &tenant,
        &["func", "update", "plain", "--timeout", "2h"],
        None,
    );
    assert_cli_error(&out, "timeout 2h is above this server's ceiling of 1h");
    let out = d.cli_as(
        &tenant,
        &["func", "update", "plain", "--timeout", "59m"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = d.cli_as(
        &tenant,
        &["func", "update", "plain", "--timeout", "none"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let (_, v) = scope::api_as(&d, &tenant, "GET", "/v1/functions/plain");
    assert_eq!(v["Timeout"], "1h", "none is the ceiling's: {v}");

    // Configured ceilings replace the defaults: more memory than half the
    // host, and no timeout ceiling at all.
    let above = half + (half / 2);
    d.restart_with(&format!(
        "[limits]\nmax_memory_bytes = {above}\nmax_timeout = \"none\"\n"
    ));
    let (code, v) = create(&d, &tenant, "bigger", &format!(r#","Memory":{above}"#));
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["Timeout"], serde_json::Value::Null, "{v}");
    d.finish();
}
