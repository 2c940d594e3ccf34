//! Calls over time (issue 26): `GET /v1/functions/NAME/activity` and
//! `GET /v1/activity` count what `/metrics` counts, per minute and per
//! quarter hour, only over the caller's own functions, and keep their
//! counts across a clean restart.

mod common;

use common::scope::api_as;
use common::*;

/// `hyperfuncd_calls_total{function=NAME,state=STATE}` as `/metrics` shows it to the admin.
fn metric_calls(d: &Daemon, function: &str, state: &str) -> u64 {
    let auth = format!("Authorization: Bearer {}", d.admin_key());
    let (_, body) = d.curl(&["-H", &auth, &format!("{}/metrics", d.endpoint)]);
    let text = String::from_utf8_lossy(&body);
    text.lines()
        .filter(|l| l.starts_with("hyperfuncd_calls_total{"))
        .filter(|l| {
            l.contains(&format!("function=\"{function}\""))
                && l.contains(&format!("state=\"{state}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn activity_by_function_and_host_survives_a_clean_restart() {
    let mut d = Daemon::start();
    d.create(
        "act",
        &[
            test_image(),
            "sh",
            "-c",
            "read x; [ \"$x\" = fail ] && exit 3; echo ok",
        ],
    );
    for payload in ["a\n", "b\n", "c\n", "fail\n"] {
        // Sync: each call has ended when the CLI returns.
        let _ = d.cli_stdin(&["func", "call", "--sync", "act"], Some(payload.as_bytes()));
    }

    let (code, a) = d.api("/v1/functions/act/activity");
    assert_eq!(code, 200, "{a}");
    assert_eq!(
        (a["Window"].as_str(), a["Step"].as_u64()),
        (Some("hour"), Some(60)),
        "{a}"
    );
    assert_eq!(a["Points"].as_array().map(Vec::len), Some(60), "{a}");
    let total = &a["Total"];
    assert_eq!(
        (
            total["Accepted"].as_u64(),
            total["Finished"].as_u64(),
            total["Failed"].as_u64()
        ),
        (Some(4), Some(3), Some(1)),
        "{a}"
    );
    assert!(total["P50"].as_f64().is_some_and(|p| p > 0.0), "{a}");
    assert!(total["P95"].as_f64() >= total["P50"].as_f64(), "{a}");
    // The same figures as the Prometheus counters.
    assert_eq!(metric_calls(&d, "act", "finished"), 3);
    assert_eq!(metric_calls(&d, "act", "failed"), 1);
    // The newest point holds them (the calls took seconds, not minutes),
    // unless the minute turned meanwhile: then the two newest do.
    let points = a["Points"].as_array().cloned().unwrap_or_default();
    let recent: u64 = points
        .iter()
        .rev()
        .take(2)
        .filter_map(|p| p["Accepted"].as_u64())
        .sum();
    assert_eq!(recent, 4, "{a}");

    let (code, day) = d.api("/v1/functions/act/activity?window=day");
    assert_eq!(code, 200, "{day}");
    assert_eq!(day["Points"].as_array().map(Vec::len), Some(96));
    assert_eq!(day["Total"]["Finished"].as_u64(), Some(3));
    let (code, bad) = d.api("/v1/functions/act/activity?window=week");
    assert_eq!(code, 400, "{bad}");

    // A tenant sees only their own functions: none of the admin's calls.
    let bob = d.add_user("bob", 1);
    let (code, mine) = api_as(&d, &bob, "GET", "/v1/activity");
    assert_eq!(code, 200, "{mine}");
    assert_eq!(mine["Total"]["Accepted"].as_u64(), Some(0), "{mine}");
    let (code, _) = api_as(&d, &bob, "GET", "/v1/functions/act/activity?owner=admin");
    assert_eq!(code, 404);
    let (code, host) = d.api("/v1/activity");
    assert_eq!(code, 200);
    assert_eq!(host["Total"]["Accepted"].as_u64(), Some(4), "{host}");

    // A clean stop writes the counts; the next start reads them.
    d.restart_clean();
    let (code, again) = d.api("/v1/functions/act/activity");
    assert_eq!(code, 200, "{again}");
    assert_eq!(again["Total"], a["Total"], "{again}");
    d.finish();
}
