//! Private registries (issue 24, credentials): a real registry (Debian's
//! `docker-registry`, the CNCF Distribution registry) started here on
//! loopback with TLS (a CA made by the test) and htpasswd auth, an image
//! built and pushed to it by the test. The shared Engine reaches it as it
//! reaches any registry on 127.0.0.0/8 (an insecure registry by default:
//! TLS without a check of the CA), so no Engine is reconfigured.

mod common;

use common::*;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The registry's one account.
const USER: &str = "ci";

/// A running registry; killed on drop, with the images pulled from it.
struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Registry {
    fn start(password: &str) -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |f: &str| dir.path().join(f);
        run(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=hf-test-ca",
            ])
            .arg("-keyout")
            .arg(p("ca.key"))
            .arg("-out")
            .arg(p("ca.pem")));
        run(Command::new("openssl")
            .args([
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
            ])
            .arg("-keyout")
            .arg(p("tls.key"))
            .arg("-out")
            .arg(p("tls.csr")));
        std::fs::write(p("ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "1", "-CAcreateserial"])
            .arg("-in")
            .arg(p("tls.csr"))
            .arg("-CA")
            .arg(p("ca.pem"))
            .arg("-CAkey")
            .arg(p("ca.key"))
            .arg("-extfile")
            .arg(p("ext"))
            .arg("-out")
            .arg(p("tls.pem")));
        run(Command::new("htpasswd")
            .args(["-Bbc"])
            .arg(p("htpasswd"))
            .args([USER, password]));
        let port = free_port();
        std::fs::write(
            p("config.yml"),
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {}\n    key: {}\n\
                 auth:\n  htpasswd:\n    realm: hf-test\n    path: {}\n",
                p("data").display(),
                p("tls.pem").display(),
                p("tls.key").display(),
                p("htpasswd").display()
            ),
        )
        .expect("config.yml");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(p("config.yml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        let ca = p("ca.pem");
        let reg = Registry { child, port, dir };
        // Up when it answers /v2/ with its 401, over TLS with our CA.
        let url = format!("https://127.0.0.1:{port}/v2/");
        let mut up = false;
        for _ in 0..100 {
            let out = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
                .arg(&ca)
                .arg(&url)
                .output()
                .expect("curl");
            if out.stdout == b"401" {
                up = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert!(up, "the registry did not come up on {url}");
        reg
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Builds an image whose `/marker` holds `marker` (a layer no Engine
    /// has), pushes it as `HOST/team/app:TAG` with the registry's login
    /// (a private docker CLI config), and removes the local copy.
    fn push(&self, tag: &str, marker: &str, password: &str) -> String {
        let base = test_image();
        let ctx = self.dir.path().join(format!("ctx-{tag}"));
        std::fs::create_dir_all(&ctx).expect("ctx");
        std::fs::write(ctx.join("marker"), marker).expect("marker");
        std::fs::write(
            ctx.join("Dockerfile"),
            format!("FROM {base}\nCOPY marker /marker\n"),
        )
        .expect("Dockerfile");
        let image = format!("{}/team/app:{tag}", self.host());
        let config = self.dir.path().join("docker-cli");
        run(Command::new("docker")
            .args(["build", "-q", "-t", &image])
            .arg(&ctx));
        let mut login = Command::new("docker")
            .env("DOCKER_CONFIG", &config)
            .args(["login", &self.host(), "-u", USER, "--password-stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("docker login");
        std::io::Write::write_all(&mut login.stdin.take().expect("stdin"), password.as_bytes())
            .expect("password");
        let out = login.wait_with_output().expect("docker login");
        assert!(
            out.status.success(),
            "docker login: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        run(Command::new("docker")
            .env("DOCKER_CONFIG", &config)
            .args(["push", "-q", &image]));
        run(Command::new("docker").args(["rmi", &image]));
        image
    }

    /// The CLI config `docker login` wrote: a host credentials file.
    fn docker_config(&self) -> PathBuf {
        self.dir.path().join("docker-cli/config.json")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let out = Command::new("docker")
            .args([
                "images",
                "-q",
                "--no-trunc",
                &format!("{}/team/app", self.host()),
            ])
            .output();
        if let Ok(out) = out {
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .collect();
            if !ids.is_empty() {
                let _ = Command::new("docker")
                    .args(["rmi", "-f"])
                    .args(&ids)
                    .output();
            }
        }
    }
}

/// Every file under `dir` whose bytes hold `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                todo.push(path);
            } else if let Ok(mut f) = std::fs::File::open(&path) {
                let mut bytes = Vec::new();
                let _ = f.read_to_end(&mut bytes);
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(path);
                }
            }
        }
    }
    found
}

fn login(d: &Daemon, key: &str, host: &str, user: &str, password: &str) -> std::process::Output {
    d.cli_as(
        key,
        &[
            "registry",
            "login",
            host,
            "--username",
            user,
            "--password-stdin",
        ],
        Some(format!("{password}\n").as_bytes()),
    )
}

#[test]
fn private_images_need_their_owners_login_which_never_leaves_the_daemon() {
    let password = format!("pw-{}", uuid_like());
    let reg = Registry::start(&password);
    let image = reg.push("1", "one", &password);
    let image2 = reg.push("2", "two", &password);
    let unreachable = format!("127.0.0.1:{}", free_port());
    let mut d = Daemon::start_with_env(
        &format!(
            "[images]\nregistries = [\"docker.io\", \"{}\", \"{unreachable}\"]\n",
            reg.host()
        ),
        &[("HYPERFUNCD_LOG", "debug")],
    );
    let bob = d.add_user("bob", 2);
    let alice = d.add_user("alice", 2);
    let mut answers = String::new();
    let mut keep = |o: &std::process::Output| {
        answers.push_str(&stdout(o));
        answers.push_str(&stderr(o));
    };

    // Without a login the registry says 401: the error says what to do.
    let o = d.cli_as(
        &bob,
        &["func", "create", "--name", "app", &image, "cat", "/marker"],
        None,
    );
    keep(&o);
    assert_cli_error(&o, "registry login");

    // Logins are checked with the registry first.
    let o = login(&d, &bob, &reg.host(), USER, "not-the-password");
    keep(&o);
    assert_cli_error(&o, "wrong username or password");
    let o = login(&d, &bob, &unreachable, USER, &password);
    keep(&o);
    assert_cli_error(&o, "could not be reached");
    let o = login(&d, &bob, "127.0.0.1:1", USER, &password);
    keep(&o);
    assert_cli_error(&o, "not in [images] registries");
    let o = login(&d, &bob, &reg.host(), USER, "");
    keep(&o);
    assert_cli_error(&o, "no password");

    let o = login(&d, &bob, &reg.host(), USER, &password);
    keep(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains(&format!("logged in to {} as {USER}", reg.host())));
    let o = d.cli_as(&bob, &["registry", "ls", "-o", "json"], None);
    keep(&o);
    let logins: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("ls json");
    assert_eq!(logins.as_array().map(Vec::len), Some(1), "{logins}");
    assert_eq!(logins[0]["Host"], reg.host());
    assert_eq!(logins[0]["Username"], USER);
    assert!(logins[0].get("Password").is_none());

    // Bob's login pulls his image; his function runs it.
    let o = d.cli_as(
        &bob,
        &["func", "create", "--name", "app", &image, "cat", "/marker"],
        None,
    );
    keep(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = d.cli_as(&bob, &["func", "call", "--sync", "app"], Some(b""));
    keep(&o);
    assert_eq!(stdout(&o), "one", "{}", stderr(&o));

    // Alice has no login: the Engine's copy is not hers to use.
    let o = d.cli_as(
        &alice,
        &["func", "create", "--name", "app", &image, "cat", "/marker"],
        None,
    );
    keep(&o);
    assert_cli_error(&o, "registry login");
    let o = d.cli_as(&alice, &["registry", "ls", "-o", "json"], None);
    keep(&o);
    assert_eq!(stdout(&o).trim(), "[]");

    // The API answers, the debug log and /metrics never hold the password.
    let (_, metrics) = d.curl(&[
        "-H",
        &format!("Authorization: Bearer {}", d.admin_key()),
        &format!("{}/metrics", d.endpoint),
    ]);
    answers.push_str(&String::from_utf8_lossy(&metrics));
    assert!(!answers.contains(&password), "the password in an answer");
    assert!(!d.log().contains(&password), "the password in the log");
    // At rest it is in clear (the Engine needs it so), only in the data
    // dir's files, which no other user can read.
    let holding = files_holding(&d.data_dir(), password.as_bytes());
    assert!(!holding.is_empty(), "the login is stored");
    for f in &holding {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(f).expect("metadata").permissions().mode();
        assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", f.display());
    }

    // The login survives a restart; logout forgets it, then alice's way:
    // the host's credentials file (docker login's config.json).
    d.restart();
    let o = d.cli_as(&bob, &["registry", "ls"], None);
    assert!(stdout(&o).contains(USER), "{}", stdout(&o));
    let o = d.cli_as(&bob, &["registry", "logout", &reg.host()], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = d.cli_as(&bob, &["registry", "logout", &reg.host()], None);
    assert_cli_error(&o, "no registry login");
    // The host stays private: the Engine's copy is not anyone's now.
    let o = d.cli_as(&bob, &["func", "update", "app", "--image", &image], None);
    assert_cli_error(&o, "registry login");
    let o = d.cli_as(&bob, &["func", "update", "app", "--image", &image2], None);
    assert_cli_error(&o, "registry login");

    let creds = d.dir.path().join("registry-auth.json");
    std::fs::copy(reg.docker_config(), &creds).expect("copy config.json");
    d.restart_with(&format!(
        "[images]\nregistries = [\"docker.io\", \"{}\"]\ncredentials_file = \"{}\"\n",
        reg.host(),
        creds.display()
    ));
    let o = d.cli_as(
        &alice,
        &["func", "create", "--name", "app", &image, "cat", "/marker"],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = d.cli_as(&alice, &["func", "call", "--sync", "app"], Some(b""));
    assert_eq!(stdout(&o), "one", "{}", stderr(&o));
    let o = d.cli_as(&alice, &["func", "update", "app", "--image", &image2], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = d.cli_as(&alice, &["func", "call", "--sync", "app"], Some(b""));
    assert_eq!(stdout(&o), "two", "{}", stderr(&o));
    assert!(!d.log().contains(&password), "the password in the log");
    d.ok(&["func", "rm", "--force", "bob/app", "alice/app"]);
}

/// A password no file holds by chance.
fn uuid_like() -> String {
    random_bytes(12)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The local image IDs the Engine has for `reference` (empty if none).
fn image_id(reference: &str) -> Option<String> {
    let out = Command::new("docker")
        .args(["image", "inspect", "-f", "{{.Id}}", reference])
        .output()
        .expect("docker image inspect");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The FINISHED/FAILED events of `name`'s log, as `func logs -o json` gives them.
fn end_events(d: &Daemon, key: &str, name: &str) -> Vec<serde_json::Value> {
    let o = d.cli_as(key, &["func", "logs", name, "-o", "json"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    stdout(&o)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["Event"] == "FINISHED" || e["Event"] == "FAILED")
        .collect()
}

/// Issue 24, pinned digests: a function runs the content its tag named at
/// create, whatever is pushed under the tag later, until `update --pull`;
/// every call record says which digest ran; an image removed from the
/// Engine is pulled again by digest with the owner's login.
#[test]
fn calls_run_the_pinned_digest_whatever_the_tag_names_later() {
    let password = format!("pw-{}", uuid_like());
    let reg = Registry::start(&password);
    let image = reg.push("1", "one", &password);
    let d = Daemon::start_with(&format!("[images]\nregistries = [\"{}\"]\n", reg.host()));
    let bob = d.add_user("bob", 2);
    let o = login(&d, &bob, &reg.host(), USER, &password);
    assert!(o.status.success(), "{}", stderr(&o));
    d.create_as(&bob, "app", &[&image, "cat", "/marker"]);
    let f = d.inspect("app");
    assert_eq!(f["Image"], image.as_str());
    let first = f["ImageDigest"].as_str().expect("ImageDigest").to_string();
    let repo = format!("{}/team/app@sha256:", reg.host());
    assert!(first.starts_with(&repo), "{first}");
    let o = d.cli_as(&bob, &["func", "call", "--sync", "app"], Some(b""));
    assert_eq!(stdout(&o), "one", "{}", stderr(&o));

    // Someone pushes other content under the same tag: calls keep running
    // the pinned digest, and their records say so.
    reg.push("1", "moved", &password);
    let o = d.cli_as(&bob, &["func", "call", "app"], Some(b""));
    assert!(o.status.success(), "{}", stderr(&o));
    let id = stdout(&o)
        .trim()
        .strip_prefix("CallId: ")
        .expect("call id")
        .to_string();
    d.wait_until(30, "the call ends", || {
        d.call_record(&id).1["State"] == "FINISHED"
    });
    let (_, record) = d.call_record(&id);
    assert_eq!(record["ImageDigest"], first.as_str(), "{record}");
    let (_, out) = d.output(&id);
    assert_eq!(out, b"one");
    let ends = end_events(&d, &bob, "app");
    assert!(!ends.is_empty());
    assert!(
        ends.iter().all(|e| e["ImageDigest"] == first.as_str()),
        "{ends:?}"
    );

    // `update --pull` moves to what the tag names now, and says so.
    let o = d.cli_as(&bob, &["func", "update", "app", "--pull"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let second = d.inspect("app")["ImageDigest"]
        .as_str()
        .expect("ImageDigest")
        .to_string();
    assert_ne!(second, first);
    assert!(second.starts_with(&repo), "{second}");
    assert!(
        stdout(&o).contains(&format!("image digest: {first} -> {second}")),
        "{}",
        stdout(&o)
    );
    let o = d.cli_as(&bob, &["func", "call", "--sync", "app"], Some(b""));
    assert_eq!(stdout(&o), "moved", "{}", stderr(&o));
    // An update that names no image keeps the digest.
    let o = d.cli_as(&bob, &["func", "update", "app", "-e", "X=1"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(d.inspect("app")["ImageDigest"], second.as_str());

    // Someone removes the pinned image from the Engine: the next call
    // pulls that digest again with bob's login and runs it.
    let gone = image_id(&second).expect("the pinned image is local");
    run(Command::new("docker").args(["rmi", "-f", &gone]));
    assert!(image_id(&second).is_none());
    let o = d.cli_as(&bob, &["func", "call", "--sync", "app"], Some(b""));
    assert_eq!(stdout(&o), "moved", "{}", stderr(&o));
    assert_eq!(image_id(&second).as_deref(), Some(gone.as_str()));
    assert!(d.log().contains("pinned image pulled again"));

    // Without a way to pull it (bob logged out, and the registry wants a
    // login), a gone image fails the call with the reason, never runs
    // anything else.
    let o = d.cli_as(&bob, &["registry", "logout", &reg.host()], None);
    assert!(o.status.success(), "{}", stderr(&o));
    run(Command::new("docker").args(["rmi", "-f", &gone]));
    let id = d.call("bob/app", b"");
    d.wait_until(60, "the call fails", || {
        d.call_record(&id).1["State"] == "FAILED"
    });
    let (_, record) = d.call_record(&id);
    let message = record["Message"].as_str().unwrap_or_default();
    assert!(message.contains("could not be pulled"), "{record}");
    assert_eq!(record["ImageDigest"], second.as_str(), "{record}");
    d.ok(&["func", "rm", "--force", "bob/app"]);
}

/// A warm pool makes its containers from the pinned digest too: one made
/// after the tag moved (the refill after a warm call) still runs the
/// pinned image, and `update --pull` drops the old digest's containers.
#[test]
fn warm_containers_are_made_from_the_pinned_digest() {
    let password = format!("pw-{}", uuid_like());
    let reg = Registry::start(&password);
    let image = reg.push("1", "one", &password);
    let d = Daemon::start_with(&format!(
        "[images]\nregistries = [\"{}\"]\n[pool]\nper_function = 1\n",
        reg.host()
    ));
    let bob = d.add_user("bob", 2);
    let o = login(&d, &bob, &reg.host(), USER, &password);
    assert!(o.status.success(), "{}", stderr(&o));
    d.create_as(&bob, "app", &[&image, "cat", "/marker"]);
    let sync = || {
        let o = d.cli_as(&bob, &["func", "call", "--sync", "app"], Some(b""));
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let warm = || d.ps(&["--filter", "label=io.hyperfuncd.pool"]).len();
    assert_eq!(sync(), "one");
    d.wait_until(60, "a warm container", || warm() == 1);
    reg.push("1", "moved", &password);
    // The warm container, made before the move, then its refill, made
    // after it: both run the pinned image.
    for round in 0..2 {
        assert_eq!(sync(), "one", "round {round}");
        d.wait_until(60, "the pool refilled", || warm() == 1);
    }
    let hits = d.curl(&[
        "-H",
        &format!("Authorization: Bearer {}", d.admin_key()),
        &format!("{}/metrics", d.endpoint),
    ]);
    let text = String::from_utf8_lossy(&hits.1).to_string();
    assert!(
        text.lines()
            .any(|l| l.starts_with("hyperfuncd_pool_hits_total") && !l.ends_with(" 0")),
        "the calls were warm: {text}"
    );
    let o = d.cli_as(&bob, &["func", "update", "app", "--pull"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(sync(), "moved");
    d.ok(&["func", "rm", "--force", "bob/app"]);
}

/// Issue 24, images do not pile up: an image hyperfuncd pulled goes from
/// the Engine `gc_after` after the last function using its digest was
/// removed or moved to another, also across a restart; one two functions
/// share stays until both are gone; one it did not pull is never removed.
#[test]
fn pulled_images_go_once_no_function_uses_them() {
    let password = format!("pw-{}", uuid_like());
    let reg = Registry::start(&password);
    let image1 = reg.push("1", "one", &password);
    let image2 = reg.push("2", "two", &password);
    let mut d = Daemon::start_with(&format!(
        "[images]\nregistries = [\"{}\", \"docker.io\"]\ngc_after = \"2s\"\n",
        reg.host()
    ));
    let bob = d.add_user("bob", 2);
    let o = login(&d, &bob, &reg.host(), USER, &password);
    assert!(o.status.success(), "{}", stderr(&o));
    d.create_as(&bob, "a1", &[&image1, "cat", "/marker"]);
    d.create_as(&bob, "a2", &[&image1, "cat", "/marker"]);
    d.create_as(&bob, "b", &[&image2, "cat", "/marker"]);
    // The test image was built here, not pulled by hyperfuncd.
    d.create_as(&bob, "local", &[test_image(), "true"]);
    let id1 = image_id(&image1).expect("image 1 pulled");
    let id2 = image_id(&image2).expect("image 2 pulled");
    let local = image_id(test_image()).expect("the test image");

    // `image ls` lists what functions use, with sizes and users.
    let o = d.cli(&["image", "ls", "-o", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let images: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("image ls json");
    let row = |id: &str| {
        images
            .as_array()
            .and_then(|a| a.iter().find(|i| i["Id"] == id))
            .cloned()
            .unwrap_or_else(|| panic!("{id} not in {images}"))
    };
    assert_eq!(
        row(&id1)["Functions"],
        serde_json::json!(["bob/a1", "bob/a2"])
    );
    assert_eq!(row(&id1)["Pulled"], true);
    assert!(row(&id1)["SizeBytes"].as_u64().unwrap_or(0) > 0);
    assert_eq!(row(&local)["Pulled"], false);
    let o = d.cli_as(&bob, &["image", "ls"], None);
    assert_cli_error(&o, "admin");

    // Shared by two: the first removal leaves it.
    d.ok(&["func", "rm", "bob/a1"]);
    std::thread::sleep(std::time::Duration::from_secs(5));
    assert_eq!(image_id(&id1).as_deref(), Some(id1.as_str()));
    // The last one goes: removed after the grace period, even with a
    // restart in between.
    d.ok(&["func", "rm", "bob/a2"]);
    d.restart();
    d.wait_until(30, "image 1 is removed", || image_id(&id1).is_none());
    assert!(d.log().contains("unused image removed"), "no audit line");

    // Moving to another digest frees the old one.
    let o = d.cli_as(
        &bob,
        &["func", "update", "b", "--image", test_image()],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    d.wait_until(30, "image 2 is removed", || image_id(&id2).is_none());

    // Never an image it did not pull.
    d.ok(&["func", "rm", "bob/b", "bob/local"]);
    std::thread::sleep(std::time::Duration::from_secs(5));
    assert_eq!(image_id(&local).as_deref(), Some(local.as_str()));
}
