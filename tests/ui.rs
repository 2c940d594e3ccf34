//! The dashboard at `/ui/` in a real browser: Debian's headless Chromium,
//! driven through chromedriver (WebDriver) by fantoccini, against the real
//! binary and the real Docker Engine. Chromium resolves no host name and
//! the page may load nothing but the daemon's own files (its CSP), so
//! whatever works here works without a CDN or any network.
//!
//! Writes screenshots (desktop 1280x800, phone 390x844) to
//! `target/ui-screenshots/`.

mod common;

use anyhow::{bail, Context, Result};
use common::*;
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The whole browser session, start to sign-out (the daemon and chromedriver
/// start before it). The test fails rather than outlive it.
const BROWSER_BUDGET: Duration = Duration::from_secs(120);
/// Calls of `ui-hist`, whose history the page lists 20 at a time.
const HISTORY_CALLS: usize = 64;
/// Longest wait for one thing to appear on the page.
const STEP: Duration = Duration::from_secs(20);

/// chromedriver on a free loopback port, in its own process group so that
/// the Chromium it starts dies with it, even when the test fails.
struct Chromedriver {
    child: Child,
    url: String,
    /// Chromium's profile and chromedriver's log; removed after both exit.
    dir: tempfile::TempDir,
}

impl Chromedriver {
    fn start() -> Chromedriver {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("port").port()
        };
        use std::os::unix::process::CommandExt;
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", dir.path().join("chromedriver.log").display()))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start chromedriver ({e}): run scripts/deps (Debian packages chromium, chromium-driver)")
            });
        let mut d = Chromedriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("chromedriver exited ({status}):\n{}", d.log());
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("chromedriver.log")).unwrap_or_default()
    }

    /// Headless Chromium that trusts this session's self-signed daemon
    /// certificate (WebDriver's `acceptInsecureCerts`), reaches loopback
    /// only, and makes no background requests of its own.
    fn capabilities(&self) -> fantoccini::wd::Capabilities {
        let profile = self.dir.path().join("profile");
        let args = vec![
            "--headless=new".to_string(),
            // The CI runs as root, where Chromium's sandbox cannot start.
            "--no-sandbox".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-gpu".into(),
            "--window-size=1280,800".into(),
            format!("--user-data-dir={}", profile.display()),
            "--no-first-run".into(),
            "--no-default-browser-check".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-extensions".into(),
            "--disable-breakpad".into(),
            "--disable-crash-reporter".into(),
            "--disable-default-apps".into(),
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1".into(),
        ];
        let caps = json!({
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {"binary": chromium_binary(), "args": args},
        });
        match caps {
            Value::Object(m) => m,
            _ => unreachable!("a JSON object literal"),
        }
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        // The whole group: chromedriver and every Chromium process it started.
        // SAFETY: kill(2) on the process group of our own child.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

fn chromium_binary() -> &'static str {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("chromium is not installed: run scripts/deps")
}

fn screenshot_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is `target/tmp`.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("ui-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

#[test]
fn dashboard_in_headless_chromium() {
    // Webhooks may go to loopback: the one the test sets has nothing
    // listening there, so its delivery fails and waits to be tried again.
    let d = Daemon::start_with(
        "[scheduler]\ndefault_rate = 100000\n[webhooks]\nallow_private = [\"127.0.0.0/8\"]\n",
    );

    // The policy the browser enforces below, as the daemon sends it.
    let (code, head) = d.curl(&["-D", "-", "-o", "/dev/null", &format!("{}/ui/", d.endpoint)]);
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert_eq!(code, 200, "{head}");
    for h in [
        "content-security-policy: default-src 'self'; script-src 'self'; style-src 'self';",
        "frame-ancestors 'none'",
        "content-type: text/html",
    ] {
        assert!(head.contains(h), "missing {h:?} in:\n{head}");
    }

    // 64 calls for the history, every fourth failing, ended before the
    // browser starts (the session's budget is for the page).
    let url = d.create(
        "ui-hist",
        &[
            test_image(),
            "sh",
            "-c",
            "read x; [ \"$x\" = fail ] && exit 3; echo ok",
        ],
    );
    let payloads: Vec<Vec<u8>> = (0..HISTORY_CALLS)
        .map(|i| {
            if i % 4 == 0 {
                b"fail\n".to_vec()
            } else {
                b"x\n".to_vec()
            }
        })
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    assert_eq!(
        submit_all(&d.ca(), &url, payloads, 4, stop).len(),
        HISTORY_CALLS
    );
    d.wait_until(180, "the history's calls to end", || {
        let s = d.status("ui-hist");
        s["Finished"].as_u64().unwrap_or(0) + s["Failed"].as_u64().unwrap_or(0)
            == HISTORY_CALLS as u64
    });

    let driver = Chromedriver::start();
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let outcome = rt.block_on(async {
        let deadline = tokio::time::Instant::now() + BROWSER_BUDGET;
        let over = || anyhow::anyhow!("the browser session took over {BROWSER_BUDGET:?}");
        let mut builder =
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
        builder.capabilities(driver.capabilities());
        let connect = builder.connect(&driver.url);
        let client = tokio::time::timeout_at(deadline, connect)
            .await
            .map_err(|_| over())?
            .context("WebDriver session")?;
        let result = tokio::time::timeout_at(deadline, scenario(&client, &d)).await;
        // Closing the session quits Chromium; the guard kills what remains.
        let _ = tokio::time::timeout(Duration::from_secs(5), client.close()).await;
        result.map_err(|_| over())?
    });
    if let Err(e) = outcome {
        panic!(
            "{e:#}\n--- chromedriver log (tail) ---\n{}\n--- daemon log ---\n{}",
            tail(&driver.log(), 40),
            d.log()
        );
    }
    drop(driver);
    // The scenario removed its function: no container of the daemon remains.
    d.finish();
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

async fn scenario(c: &Client, d: &Daemon) -> Result<()> {
    let key = d.admin_key();
    let payload = "hello from the browser, 1 2 3";
    viewport(c, 1280, 800).await?;
    // The server's address leads to the dashboard.
    c.goto(&format!("{}/", d.endpoint)).await?;
    visible(c, "#signin-key").await?;
    if !c.current_url().await?.as_str().ends_with("/ui/") {
        bail!("/ leads to {}", c.current_url().await?);
    }
    contrast(c, "light sign-in").await?;

    // A wrong key: the API's own error, nothing kept.
    let input = visible(c, "#signin-key").await?;
    input.send_keys("hfk_not-a-key").await?;
    click(c, "#signin-form button[type=submit]").await?;
    let err = text_of(c, "#error-text", |t| !t.is_empty()).await?;
    if !err.contains("401 unauthorized: missing or unknown API key") {
        bail!("wrong key shows {err:?}");
    }
    if js(c, "return sessionStorage.length").await? != json!(0) {
        bail!("a refused key was stored");
    }
    shot(c, "desktop-signin-error").await?;

    // The admin key: the function list, empty, with the create form open.
    visible(c, "#signin-key").await?.send_keys(&key).await?;
    click(c, "#signin-form button[type=submit]").await?;
    visible(c, "#view-functions").await?;
    visible(c, "#nav-users").await?;
    if js(c, "return document.getElementById('signin-key').value").await? != json!("") {
        bail!("the key stayed in the sign-in field");
    }

    // Create `cat` on the real Engine (the form is closed: the list has
    // ui-hist).
    click(c, "#create summary").await?;
    visible(c, "#create-form input[name=name]")
        .await?
        .send_keys("ui-cat")
        .await?;
    type_into(c, "#create-form input[name=image]", test_image()).await?;
    type_into(c, "#create-form input[name=command]", "cat").await?;
    type_into(c, "#create-form input[name=timeout]", "30s").await?;
    type_into(c, "#create-form textarea[name=env]", "GREETING=hi").await?;
    type_into(c, "#create-form input[name=runtime]", "runc").await?;
    click(c, "#create-form button[type=submit]").await?;
    text_of(c, "#fn-title", |t| t == "ui-cat").await?;
    let (code, f) = d.api("/v1/functions/ui-cat");
    if code != 200
        || f["Env"] != json!(["GREETING=hi"])
        || f["Timeout"] != json!("30s")
        || f["Runtime"] != json!("runc")
    {
        bail!("created function: {code} {f}");
    }
    let address = f["Address"].as_str().unwrap_or_default().to_string();
    text_of(c, "#fn-address", |t| t == address).await?;
    // The log stream is open before the call: what follows arrives live.
    text_of(c, "#logs-state", |t| t == "following…").await?;

    // An async call: its CallId, the FINISHED line live, then the output.
    type_into(c, "#payload-text", payload).await?;
    click(c, "#call-submit").await?;
    let id = text_of(c, "#call-id", |t| t.len() == 36).await?;
    visible(
        c,
        &format!("#logs li[data-event=FINISHED][data-callid='{id}']"),
    )
    .await?;
    let newest = text_of(c, "#logs li:first-child", |t| !t.is_empty()).await?;
    if !newest.contains(&format!("[FINISHED] CallId: {id}, ShortStdout: {payload}")) {
        bail!("newest log line is {newest:?}");
    }
    // Fetched by the page itself once the call ended: nothing left to get.
    visible(c, "#call-output-box").await?;
    if c.find(Locator::Css("#call-wait"))
        .await?
        .is_displayed()
        .await?
    {
        bail!("Get output is still offered for an output already fetched");
    }
    let out = js(
        c,
        "return document.getElementById('call-output').textContent",
    )
    .await?;
    if out != json!(payload) {
        bail!("output {out} is not the payload {payload:?}");
    }
    text_of(c, "#call-state", |t| t == "FINISHED").await?;
    // The call is on the charts, drawn by the page from `/activity`.
    visible(c, "#fn-charts svg rect.bar-ok[data-count='1']").await?;
    poll(c, "a p50 point on the run-time chart", || async move {
        let n = js(
            c,
            "return document.querySelectorAll('#fn-charts circle.dot50').length",
        )
        .await?;
        Ok((n.as_u64() > Some(0)).then_some(()))
    })
    .await?;
    text_of(c, "#fn-charts figcaption", |t| t.starts_with("1 finished")).await?;
    // The history shows the call this page made without a refresh.
    text_of(c, "#history-body", |t| {
        t.contains(&id) && t.contains("FINISHED")
    })
    .await?;
    shot(c, "desktop-function").await?;
    js(c, "document.getElementById('logs').scrollIntoView()").await?;
    shot(c, "desktop-logs").await?;
    viewport(c, 390, 844).await?;
    js(c, "document.getElementById('call-result').scrollIntoView()").await?;
    shot(c, "phone-function").await?;
    fits(c, "function").await?;
    dark(c, true).await?;
    shot(c, "phone-function-dark").await?;
    dark(c, false).await?;
    c.goto(&format!("{}/ui/#/functions", d.endpoint)).await?;
    text_of(c, "#functions-body", |t| t.contains("ui-cat")).await?;
    shot(c, "phone-functions").await?;
    fits(c, "functions").await?;
    viewport(c, 1280, 800).await?;
    shot(c, "desktop-functions").await?;

    contrast(c, "light function").await?;
    dark(c, true).await?;
    contrast(c, "dark function").await?;
    dark(c, false).await?;

    // A slow call seen live: PENDING or RUNNING, then FINISHED and its
    // output, without a reload.
    let slow = d.cli(&[
        "func",
        "create",
        "--name",
        "ui-slow",
        test_image(),
        "sh",
        "-c",
        "sleep 2; echo slept",
    ]);
    if !slow.status.success() {
        bail!(
            "func create ui-slow: {}",
            String::from_utf8_lossy(&slow.stderr)
        );
    }
    c.goto(&format!("{}/ui/#/functions/ui-slow", d.endpoint))
        .await?;
    text_of(c, "#fn-title", |t| t == "ui-slow").await?;
    click(c, "#call-submit").await?;
    text_of(c, "#call-state", |t| t == "RUNNING").await?;
    text_of(c, "#call-timer", |t| t.starts_with("running")).await?;
    text_of(c, "#call-state", |t| t == "FINISHED").await?;
    text_of(c, "#call-output", |t| t == "slept").await?;
    // Watched through the call's event stream, not by polling its record.
    let asked = js(
        c,
        "return performance.getEntriesByType('resource').map((e) => new URL(e.name).pathname).filter((p) => p.startsWith('/v1/calls/'))",
    )
    .await?;
    let asked: Vec<&str> = asked
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if !asked.iter().any(|p| p.ends_with("/events"))
        || asked.iter().any(|p| p.split('/').count() == 4)
    {
        bail!("the slow call was not watched through its event stream alone: {asked:?}");
    }

    // The call history, 20 a page over 64 calls: older and newer pages, a
    // state filter, a call's detail and its output fetched once.
    let (_, newest) = d.api("/v1/functions/ui-hist/calls?limit=1");
    let newest = newest["Calls"][0]["CallId"]
        .as_str()
        .unwrap_or("?")
        .to_string();
    c.goto(&format!("{}/ui/#/functions/ui-hist", d.endpoint))
        .await?;
    text_of(c, "#history-empty", |t| t == "calls 1–20").await?;
    history_rows(c, 20).await?;
    let first = js(
        c,
        "return document.querySelector('#history-body tr').dataset.call",
    )
    .await?;
    if first != json!(newest) {
        bail!("the history starts with {first}, not the newest call {newest}");
    }
    shot(c, "desktop-history").await?;
    for want in [
        "calls 21–40",
        "calls 41–60",
        "calls 61–64 (the oldest kept)",
    ] {
        click(c, "#history-older").await?;
        text_of(c, "#history-empty", |t| t == want).await?;
    }
    history_rows(c, 4).await?;
    if js(
        c,
        "return document.getElementById('history-older').disabled",
    )
    .await?
        != json!(true)
    {
        bail!("Older is offered past the oldest call");
    }
    click(c, "#history-newer").await?;
    text_of(c, "#history-empty", |t| t == "calls 41–60").await?;
    pick_state(c, "FAILED").await?;
    text_of(c, "#history-empty", |t| t == "calls 1–16 (the oldest kept)").await?;
    history_rows(c, 16).await?;
    let states = js(
        c,
        "return [...document.querySelectorAll('#history-body .badge')].map((b) => b.textContent)",
    )
    .await?;
    if states
        .as_array()
        .is_none_or(|a| a.iter().any(|s| s != "FAILED"))
    {
        bail!("the FAILED filter shows {states}");
    }
    click(c, "#history-body tr:first-child button").await?;
    text_of(c, "#cd-details", |t| {
        t.contains("Exit code") && t.contains('3')
    })
    .await?;
    if c.find(Locator::Id("cd-output"))
        .await?
        .is_displayed()
        .await?
    {
        bail!("Get output is offered for a failed call");
    }
    shot(c, "desktop-history-failed").await?;
    contrast(c, "light history").await?;
    dark(c, true).await?;
    contrast(c, "dark history").await?;
    dark(c, false).await?;
    viewport(c, 390, 844).await?;
    js(c, "document.getElementById('fn-history').scrollIntoView()").await?;
    shot(c, "phone-history").await?;
    fits(c, "history").await?;
    viewport(c, 1280, 800).await?;
    pick_state(c, "FINISHED").await?;
    text_of(c, "#history-empty", |t| t == "calls 1–20").await?;
    click(c, "#history-body tr:first-child button").await?;
    click(c, "#cd-output").await?;
    text_of(c, "#cd-output-text", |t| t == "ok").await?;
    // The detail names the image digest that ran.
    text_of(c, "#cd-details", |t| t.contains("sha256:")).await?;
    // Fetched once: asked again, the server says it is gone, as a note.
    click(c, "#history-body tr:first-child button").await?;
    click(c, "#cd-output").await?;
    text_of(c, "#cd-failed", |t| t.starts_with("Output already fetched")).await?;
    shot(c, "desktop-history-detail").await?;
    d.ok(&["func", "rm", "--force", "ui-hist"]);

    // A webhook and a schedule set from the edit form: the secret shown
    // once, the schedule's next ticks; a call's delivery in its detail.
    let refused = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    d.ok(&["func", "create", "--name", "ui-hooks", IMAGE, "cat"]);
    c.goto(&format!("{}/ui/#/functions/ui-hooks", d.endpoint))
        .await?;
    text_of(c, "#fn-title", |t| t == "ui-hooks").await?;
    click(c, "#fn-edit").await?;
    type_into(
        c,
        "#edit-form input[name=webhook]",
        &format!("https://127.0.0.1:{refused}/hook"),
    )
    .await?;
    type_into(c, "#edit-form input[name=schedule]", "@every 1h").await?;
    click(c, "#edit-form button[type=submit]").await?;
    text_of(c, "#fn-secret-text", |t| t.starts_with("whsec_")).await?;
    text_of(c, "#fn-details", |t| {
        t.contains("@every 1h (UTC)") && t.contains("next:")
    })
    .await?;
    text_of(c, "#fn-details", |t| {
        t.contains(&format!("127.0.0.1:{refused}/hook"))
    })
    .await?;
    let (_, f) = d.api("/v1/functions/ui-hooks");
    assert_eq!(f["Schedule"]["Expression"], "@every 1h", "{f}");
    assert!(
        f.get("WebhookSecret").is_none(),
        "the secret is not shown again: {f}"
    );
    let out = d.ok(&["func", "call", "ui-hooks"]);
    let hooked = out.trim().trim_start_matches("CallId: ").to_string();
    let hooked = hooked.as_str();
    poll(c, "the webhook's first attempt", || async move {
        let (_, call) = d.api(&format!("/v1/calls/{hooked}"));
        Ok((call["Webhook"]["Attempts"].as_u64() > Some(0)).then_some(()))
    })
    .await?;
    click(c, "#history-refresh").await?;
    click(c, "#history-body tr:first-child button").await?;
    text_of(c, "#cd-webhook", |t| {
        t.contains("PENDING") && t.contains("attempt")
    })
    .await?;
    visible(c, "#cd-redeliver").await?;
    shot(c, "desktop-webhook").await?;
    // Left for another function's page, the secret is gone for good.
    c.goto(&format!("{}/ui/#/functions", d.endpoint)).await?;
    c.goto(&format!("{}/ui/#/functions/ui-hooks", d.endpoint))
        .await?;
    text_of(c, "#fn-title", |t| t == "ui-hooks").await?;
    if c.find(Locator::Id("fn-secret"))
        .await?
        .is_displayed()
        .await?
    {
        bail!("the webhook secret is shown again");
    }
    d.ok(&["func", "rm", "--force", "ui-hooks"]);

    // A function that is not there: nothing of the last one stays, and
    // nothing can be called or removed.
    c.goto(&format!("{}/ui/#/functions/nothere", d.endpoint))
        .await?;
    text_of(c, "#fn-title", |t| t == "Function not found").await?;
    visible(c, "#fn-missing").await?;
    for id in ["fn-remove", "call-submit", "fn-details", "call-result"] {
        if c.find(Locator::Id(id)).await?.is_displayed().await? {
            bail!("#{id} is shown for a function that is not there");
        }
    }
    shot(c, "desktop-not-found").await?;

    // A hundred functions: the list comes from one request, in pages, and
    // search narrows it.
    create_functions(d, 98)?;
    c.goto(&format!("{}/ui/#/functions", d.endpoint)).await?;
    text_of(c, "#functions-count", |t| t == "100 functions").await?;
    js(c, "performance.clearResourceTimings()").await?;
    click(c, "#functions-refresh").await?;
    let requests = poll(c, "the list to be fetched again", || async move {
        let v = js(
            c,
            "return performance.getEntriesByType('resource').map((e) => new URL(e.name).pathname).filter((p) => p.startsWith('/v1/functions'))",
        )
        .await?;
        Ok(v.as_array().filter(|a| !a.is_empty()).cloned())
    })
    .await?;
    // The list is one request (the host's chart is one more, /v1/activity).
    if requests.iter().any(|p| p != "/v1/functions") {
        bail!("the list asked more than the list: {requests:?}");
    }
    text_of(c, "#functions-page", |t| t == "1–25 of 100").await?;
    visible(c, "#host-charts svg rect.bar-ok").await?;
    if c.find_all(Locator::Css("#functions-body tr")).await?.len() != 25 {
        bail!("a page of the list is not 25 rows");
    }
    shot(c, "desktop-functions-100").await?;
    type_into(c, "#functions-search", "list-4").await?;
    text_of(c, "#functions-count", |t| t == "10 of 100 functions match").await?;
    if c.find_all(Locator::Css("#functions-body tr")).await?.len() != 10 {
        bail!("search shows other rows than list-40..list-49");
    }
    let search = c.find(Locator::Id("functions-search")).await?;
    search.clear().await?;
    search.send_keys("ui-").await?;
    text_of(c, "#functions-count", |t| t == "2 of 100 functions match").await?;

    // Update the command; a sync call that fails shows the reason.
    click(c, "#functions-body a[href$='/ui-cat']").await?;
    text_of(c, "#fn-title", |t| t == "ui-cat").await?;
    if js(c, "return document.getElementById('payload-text').value").await? != json!("") {
        bail!("the call form kept the payload typed for another function");
    }
    click(c, "#fn-edit").await?;
    let command = visible(c, "#edit-form input[name=command]").await?;
    command.clear().await?;
    command.send_keys("sh -c 'echo oops >&2; exit 3'").await?;
    click(c, "#edit-form button[type=submit]").await?;
    text_of(c, "#flash", |t| t == "ui-cat is updated").await?;
    click(c, "#call-sync").await?;
    click(c, "#call-submit").await?;
    let failed = text_of(c, "#call-failed", |t| !t.is_empty()).await?;
    if !(failed.contains("500 call_failed")
        && failed.contains("exit code 3")
        && failed.matches("exit code 3").count() == 1
        && failed.contains("oops"))
    {
        bail!("failed sync call shows {failed:?}");
    }
    // The sync answer named its call.
    text_of(c, "#call-id", |t| t.len() == 36).await?;

    // Admin: add a user (the key shown once), then remove it.
    click(c, "#nav-users").await?;
    visible(c, "#view-users").await?;
    click(c, "#adduser summary").await?;
    type_into(c, "#adduser-form input[name=name]", "ui-bob").await?;
    type_into(c, "#adduser-form input[name=max]", "3").await?;
    click(c, "#adduser-form button[type=submit]").await?;
    let bob_key = text_of(c, "#newkey-value", |t| t.starts_with("hfk_")).await?;
    text_of(c, "tr[data-user=ui-bob]", |t| t.contains("ui-bob")).await?;
    let quota = js(
        c,
        "return document.querySelector('tr[data-user=ui-bob] input.quota').value",
    )
    .await?;
    if quota != json!("3") {
        bail!("ui-bob's quota shows {quota}");
    }
    shot(c, "desktop-users").await?;
    click(c, "#newkey-done").await?;
    if c.source().await?.contains(&bob_key) {
        bail!("the new key stayed in the page after it was dismissed");
    }
    // Another user's key: no own-key warning, and the tab keeps its key.
    click(c, "tr[data-user=ui-bob] button[data-action=rotate]").await?;
    text_of(c, "#confirm-text", |t| {
        t.starts_with("Give ui-bob a new key?")
    })
    .await?;
    click(c, "#confirm-ok").await?;
    text_of(c, "#newkey-value", |t| {
        t.starts_with("hfk_") && t != bob_key
    })
    .await?;
    if js(c, "return sessionStorage.getItem('hyperfuncd.key')").await? != json!(key) {
        bail!("rotating another user's key changed the tab's");
    }
    click(c, "#newkey-done").await?;
    click(c, "tr[data-user=ui-bob] button.danger").await?;
    click(c, "#confirm-ok").await?;
    poll(c, "ui-bob's row to go", || async move {
        let rows = c.find_all(Locator::Css("tr[data-user=ui-bob]")).await?;
        Ok(rows.is_empty().then_some(()))
    })
    .await?;
    if d.cli(&["user", "ls"])
        .stdout
        .windows(6)
        .any(|w| w == b"ui-bob")
    {
        bail!("ui-bob is still a user");
    }

    // Remove the function (confirmed); the server no longer has it.
    c.goto(&format!("{}/ui/#/functions/ui-cat", d.endpoint))
        .await?;
    text_of(c, "#fn-title", |t| t == "ui-cat").await?;
    click(c, "#fn-remove").await?;
    text_of(c, "#confirm-text", |t| t.starts_with("Remove ui-cat?")).await?;
    click(c, "#confirm-ok").await?;
    visible(c, "#view-functions").await?;
    poll(c, "ui-cat to leave the list", || async move {
        let t = c.find(Locator::Id("functions-body")).await?.text().await?;
        Ok((!t.contains("ui-cat")).then_some(()))
    })
    .await?;
    let (code, _) = d.api("/v1/functions/ui-cat");
    if code != 404 {
        bail!("ui-cat answers {code} after removal");
    }

    // Rotating one's own key: the tab warns first (it knows whose key it
    // holds, from /v1/whoami), then carries on with the new one.
    click(c, "#nav-users").await?;
    click(c, "tr[data-user=admin] button[data-action=rotate]").await?;
    text_of(c, "#confirm-text", |t| {
        t.starts_with("This is your own key: the one this tab is signed in with.")
    })
    .await?;
    text_of(c, "#confirm-ok", |t| t == "Rotate my key").await?;
    shot(c, "desktop-rotate-own-key").await?;
    // Cancelled: the key still works.
    click(c, "#confirm-cancel").await?;
    let (code, _) = d.api("/v1/whoami");
    if code != 200 {
        bail!("the key changed though the rotation was cancelled: {code}");
    }
    click(c, "tr[data-user=admin] button[data-action=rotate]").await?;
    click(c, "#confirm-ok").await?;
    text_of(c, "#flash", |t| t.starts_with("Your key is rotated")).await?;
    let new_key = text_of(c, "#newkey-value", |t| t.starts_with("hfk_")).await?;
    if js(c, "return sessionStorage.getItem('hyperfuncd.key')").await? != json!(new_key) {
        bail!("the tab did not take the new key");
    }
    click(c, "#newkey-done").await?;
    click(c, "#users-refresh").await?;
    text_of(c, "tr[data-user=admin]", |t| t.contains("admin")).await?;
    if c.find(Locator::Id("error")).await?.is_displayed().await? {
        bail!("the users page failed after rotating the tab's own key");
    }

    // Registry logins: a refused one shows the server's reason, and the
    // password leaves the form and the page.
    click(c, "#nav-registries").await?;
    visible(c, "#view-registries").await?;
    click(c, "#reglogin summary").await?;
    type_into(c, "#reglogin-form input[name=host]", "127.0.0.1:1").await?;
    type_into(c, "#reglogin-form input[name=username]", "ci").await?;
    type_into(c, "#reglogin-form input[name=password]", "ui-registry-pw").await?;
    click(c, "#reglogin-form button[type=submit]").await?;
    text_of(c, "#error", |t| t.contains("not in [images] registries")).await?;
    if js(
        c,
        "return document.querySelector('#reglogin-form input[name=password]').value",
    )
    .await?
        != json!("")
    {
        bail!("the password stayed in the form");
    }
    if c.source().await?.contains("ui-registry-pw") {
        bail!("the registry password is in the page");
    }
    shot(c, "registries").await?;

    // Sign out: no key in storage or in the page.
    click(c, "#signout").await?;
    visible(c, "#signin-key").await?;
    if js(c, "return sessionStorage.length").await? != json!(0) {
        bail!("sign-out left the session storage");
    }
    let page = c.source().await?;
    if page.contains(&key) || page.contains(&address) || page.contains(&new_key) {
        bail!("a secret is in the page after sign-out");
    }
    Ok(())
}

/// Waits until the history table shows `n` rows.
async fn history_rows(c: &Client, n: usize) -> Result<()> {
    poll(c, &format!("{n} rows of history"), || async move {
        let rows = c.find_all(Locator::Css("#history-body tr")).await?;
        Ok((rows.len() == n).then_some(()))
    })
    .await
}

/// Picks `state` in the history's filter (what choosing it does: the
/// value, then a change event; headless Chromium draws no popup to click).
async fn pick_state(c: &Client, state: &str) -> Result<()> {
    js(
        c,
        &format!(
            "const s = document.getElementById('history-state'); s.value = '{state}'; s.dispatchEvent(new Event('change'))"
        ),
    )
    .await?;
    Ok(())
}

/// A Chrome DevTools command through chromedriver's `goog/cdp/execute`.
#[derive(Debug)]
struct Cdp(Value);

impl fantoccini::wd::WebDriverCompatibleCommand for Cdp {
    fn endpoint(
        &self,
        base: &url::Url,
        session: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base.join(&format!(
            "session/{}/goog/cdp/execute",
            session.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (warp::http::Method, Option<String>) {
        (warp::http::Method::POST, Some(self.0.to_string()))
    }
}

/// Emulates `prefers-color-scheme: dark` (or stops emulating).
async fn dark(c: &Client, on: bool) -> Result<()> {
    let features = if on {
        json!([{"name": "prefers-color-scheme", "value": "dark"}])
    } else {
        json!([])
    };
    c.issue_cmd(Cdp(json!({
        "cmd": "Emulation.setEmulatedMedia",
        "params": {"features": features},
    })))
    .await?;
    Ok(())
}

/// Creates `n` functions `list-00`... through the API, in one curl process.
fn create_functions(d: &Daemon, n: usize) -> Result<()> {
    let auth = format!("Authorization: Bearer {}", d.admin_key());
    let url = format!("{}/v1/functions", d.endpoint);
    let ca = d.ca();
    let mut args: Vec<String> = Vec::new();
    for i in 0..n {
        if i > 0 {
            args.push("--next".into());
        }
        let body =
            json!({"Name": format!("list-{i:02}"), "Image": test_image(), "Command": ["cat"]});
        args.extend([
            "--cacert".into(),
            ca.display().to_string(),
            "-s".into(),
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{http_code}\n".into(),
            "-H".into(),
            auth.clone(),
            "-H".into(),
            "Content-Type: application/json".into(),
            "--data".into(),
            body.to_string(),
            url.clone(),
        ]);
    }
    let out = Command::new("curl").args(&args).output()?;
    let codes = String::from_utf8_lossy(&out.stdout);
    if codes.lines().count() != n || codes.lines().any(|c| !c.starts_with('2')) {
        bail!("creating {n} functions answered {codes}");
    }
    Ok(())
}

/// WCAG AA contrast of what is on screen, computed from the page's own
/// styles: 4.5:1 for text (3:1 at 24px, or 18.66px bold) against the
/// nearest opaque background, 3:1 for the borders of form fields and for the
/// focus outline (WCAG 1.4.11). Returns the failures, worst first.
const CONTRAST_JS: &str = r#"
const rgb = (s) => { const m = s.match(/[\d.]+/g); return m ? m.map(Number) : null; };
const lum = ([r, g, b]) => {
  const f = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
  return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
};
const ratio = (a, b) => { const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p); return (x + 0.05) / (y + 0.05); };
const bg = (el) => {
  for (let e = el; e; e = e.parentElement) {
    const c = rgb(getComputedStyle(e).backgroundColor);
    if (c && (c.length < 4 || c[3] === 1)) { return c.slice(0, 3); }
  }
  return rgb(getComputedStyle(document.documentElement).backgroundColor) ?? [255, 255, 255];
};
const shown = (el) => el.getClientRects().length > 0 && getComputedStyle(el).visibility !== 'hidden';
const bad = [];
for (const el of document.querySelectorAll('body *')) {
  if (!shown(el) || ['SCRIPT', 'STYLE', 'OPTION', 'METER'].includes(el.tagName)) { continue; }
  const cs = getComputedStyle(el);
  const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
  if (own && Number(cs.opacity) === 1 && !el.closest('button:disabled')) {
    const size = parseFloat(cs.fontSize);
    const large = size >= 24 || (size >= 18.66 && Number(cs.fontWeight) >= 700);
    const r = ratio(rgb(cs.color).slice(0, 3), bg(el));
    if (r < (large ? 3 : 4.5)) { bad.push([r, `text of <${el.tagName.toLowerCase()} id=${el.id} class=${el.className}>`]); }
  }
  if (['INPUT', 'TEXTAREA', 'SELECT'].includes(el.tagName) && !['checkbox', 'radio', 'file'].includes(el.type)) {
    const r = ratio(rgb(cs.borderTopColor).slice(0, 3), bg(el.parentElement));
    if (r < 3) { bad.push([r, `border of <${el.tagName.toLowerCase()} name=${el.name}>`]); }
  }
}
// The focus ring is `--focus`, a #rrggbb colour of the stylesheet.
const hex = getComputedStyle(document.body).getPropertyValue('--focus').trim();
const fc = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
for (const where of [document.body, document.querySelector('.card') ?? document.body]) {
  const r = ratio(fc, bg(where));
  if (r < 3) { bad.push([r, `focus outline on ${where.className || where.tagName}`]); }
}
return bad.sort((a, b) => a[0] - b[0]).map(([r, w]) => `${r.toFixed(2)}:1 ${w}`);
"#;

async fn contrast(c: &Client, what: &str) -> Result<()> {
    tokio::time::sleep(Duration::from_millis(100)).await;
    let bad = js(c, CONTRAST_JS).await?;
    match bad.as_array() {
        Some(list) if list.is_empty() => Ok(()),
        _ => bail!("contrast below WCAG AA on the {what} page: {bad}"),
    }
}

/// Nothing on screen wider than the viewport, unless inside a box that
/// scrolls or clips it (a table's wrap, a `pre`): a phone shows no sideways
/// scroll. Returns the widest offenders.
const FITS_JS: &str = r#"
const w = document.documentElement.clientWidth;
const clipped = (el) => {
  for (let e = el.parentElement; e && e !== document.body; e = e.parentElement) {
    if (getComputedStyle(e).overflowX !== 'visible') { return true; }
  }
  return false;
};
const bad = [];
for (const el of document.querySelectorAll('body *')) {
  const r = el.getBoundingClientRect();
  if (r.width === 0 || r.right <= w + 1 || clipped(el)) { continue; }
  bad.push([r.right, `<${el.tagName.toLowerCase()} id=${el.id} class=${el.className}> ends at ${Math.round(r.right)}px`]);
}
const page = document.documentElement.scrollWidth;
return { page, width: w, bad: bad.sort((a, b) => b[0] - a[0]).slice(0, 6).map(([, d]) => d) };
"#;

async fn fits(c: &Client, what: &str) -> Result<()> {
    let v = js(c, FITS_JS).await?;
    let (page, width) = (
        v["page"].as_u64().unwrap_or(0),
        v["width"].as_u64().unwrap_or(0),
    );
    if page > width || v["bad"].as_array().is_some_and(|b| !b.is_empty()) {
        bail!(
            "the {what} page is wider than the phone's {width}px ({page}px): {}",
            v["bad"]
        );
    }
    Ok(())
}

/// Resizes the window so that the page's viewport is `w` x `h`.
async fn viewport(c: &Client, w: u32, h: u32) -> Result<()> {
    c.set_window_size(w, h).await?;
    let inner = js(c, "return [window.innerWidth, window.innerHeight]").await?;
    let (iw, ih) = (
        inner[0].as_u64().unwrap_or(0),
        inner[1].as_u64().unwrap_or(0),
    );
    if iw > 0 && (iw != u64::from(w) || ih != u64::from(h)) {
        let dw = i64::from(w) - iw as i64;
        let dh = i64::from(h) - ih as i64;
        c.set_window_size((i64::from(w) + dw) as u32, (i64::from(h) + dh) as u32)
            .await?;
    }
    Ok(())
}

async fn shot(c: &Client, name: &str) -> Result<()> {
    // Let layout settle after a resize or a render.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let png = c.screenshot().await?;
    std::fs::write(screenshot_dir().join(format!("{name}.png")), png)?;
    Ok(())
}

async fn js(c: &Client, script: &str) -> Result<Value> {
    Ok(c.execute(script, vec![]).await?)
}

/// Polls `f` every 100 ms until it yields a value, for up to `STEP`.
async fn poll<T, F, Fut>(c: &Client, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            let error = js(
                c,
                "return document.getElementById('error-text').textContent",
            )
            .await
            .unwrap_or_default();
            bail!("timed out waiting for {what} (page error: {error})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The element matching `css`, once it is displayed.
async fn visible(c: &Client, css: &str) -> Result<Element> {
    poll(c, &format!("{css} to be visible"), || async move {
        match c.find_all(Locator::Css(css)).await?.into_iter().next() {
            // Stale: the page re-rendered it meanwhile; look again.
            Some(e) if e.is_displayed().await.unwrap_or(false) => Ok(Some(e)),
            _ => Ok(None),
        }
    })
    .await
}

/// The text of `css` once it satisfies `ok`.
async fn text_of(c: &Client, css: &str, ok: impl Fn(&str) -> bool) -> Result<String> {
    let last = std::cell::RefCell::new(String::new());
    let (last_ref, ok) = (&last, &ok);
    poll(c, &format!("the text of {css}"), || async move {
        if let Some(e) = c.find_all(Locator::Css(css)).await?.into_iter().next() {
            // Stale: the page re-rendered it meanwhile; look again.
            let Ok(t) = e.text().await else {
                return Ok(None);
            };
            if ok(&t) {
                return Ok(Some(t));
            }
            *last_ref.borrow_mut() = t;
        }
        Ok(None)
    })
    .await
    .with_context(|| format!("last text of {css}: {:?}", last.borrow()))
}

async fn click(c: &Client, css: &str) -> Result<()> {
    // A list the page re-renders may replace the element between the
    // find and the click: find it again, a few times.
    for _ in 0..5 {
        match visible(c, css).await?.click().await {
            Err(fantoccini::error::CmdError::Standard(e))
                if e.error == fantoccini::error::ErrorStatus::StaleElementReference =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            r => return Ok(r?),
        }
    }
    bail!("{css} kept going stale")
}

async fn type_into(c: &Client, css: &str, text: &str) -> Result<()> {
    visible(c, css).await?.send_keys(text).await?;
    Ok(())
}
