//! Image pulls at `func create` / `func update` show their progress: against
//! a registry the test serves itself on 127.0.0.1 (`common/pull_registry.py`;
//! the Engine pulls from 127.0.0.0/8 over plain HTTP) with an image made
//! here, whose layer is new to the Engine so each pull downloads it.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The loopback registry process; killed (and waited for) on drop, and the
/// images pulled from it removed.
struct Registry {
    child: Child,
    port: u16,
}

impl Registry {
    /// Serves `saved` (a `docker save` tar) as `hf-pull/busybox:TAG`.
    fn start(saved: &Path, tags: &[&str]) -> Registry {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/common/pull_registry.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(saved)
            .arg("hf-pull/busybox")
            .args(tags)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3");
        let mut first = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut first)
            .expect("registry port");
        let port = first.trim().parse().unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("the registry did not start: {first:?}")
        });
        Registry { child, port }
    }

    fn image(&self, tag: &str) -> String {
        format!("127.0.0.1:{}/hf-pull/busybox:{tag}", self.port)
    }

    /// Removes the pulled `image` from the Engine, so the next pull downloads.
    fn forget(&self, image: &str) {
        let _ = Command::new("docker").args(["rmi", "-f", image]).output();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let prefix = format!("127.0.0.1:{}/hf-pull/busybox", self.port);
        let out = Command::new("docker")
            .args(["images", "-q", "--no-trunc", &prefix])
            .output()
            .expect("docker images");
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

/// The test image plus a file of random bytes (a layer no Engine has),
/// saved to `dir/saved.tar`; the built image is removed again.
fn image_with_a_new_layer(dir: &Path) -> std::path::PathBuf {
    let base = test_image();
    let ctx = dir.join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    let mut random = vec![0u8; 1_500_000];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random))
        .expect("/dev/urandom");
    std::fs::write(ctx.join("blob"), &random).expect("blob");
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {base}\nCOPY blob /blob\n"),
    )
    .expect("Dockerfile");
    let tag = format!("hf-pull-src:{}", std::process::id());
    let run = |args: &[&str]| {
        let out = Command::new("docker").args(args).output().expect("docker");
        assert!(
            out.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["build", "-q", "-t", &tag, &ctx.to_string_lossy()]);
    let saved = dir.join("saved.tar");
    run(&["save", "-o", &saved.to_string_lossy(), &tag]);
    run(&["rmi", &tag]);
    saved
}

/// The lines of an NDJSON answer, each parsed.
fn ndjson(body: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(body)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not a JSON line: {l:?}")))
        .collect()
}

#[test]
fn create_and_update_show_the_pull_on_a_terminal_and_stream_it_on_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let saved = image_with_a_new_layer(dir.path());
    let reg = Registry::start(&saved, &["one", "two"]);
    let (one, two) = (reg.image("one"), reg.image("two"));
    let d = Daemon::start_with(&format!(
        "[images]\nregistries = [\"docker.io\", \"127.0.0.1:{}\"]\n",
        reg.port
    ));
    let key = d.admin_key();

    // Off a terminal: today's request, the one line, nothing on stderr.
    let out = d.cli(&["func", "create", "--name", "plain", &one, "cat"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("plain is created with the address of https://"),
        "{}",
        stdout(&out)
    );
    assert_eq!(stdout(&out).lines().count(), 1, "{}", stdout(&out));
    assert_eq!(stderr(&out), "", "stderr off a terminal");
    d.ok(&["func", "rm", "plain"]);
    reg.forget(&one);

    // On a terminal: the pull drawn with layers and bytes, a line that
    // stays with what was pulled, then the usual line.
    let screen = d.on_a_terminal(&format!("func create --name tty {one} cat"));
    assert!(
        screen.contains(&format!("creating tty: pulling {one}: ")),
        "{screen:?}"
    );
    assert!(screen.contains(" layers, "), "{screen:?}");
    let pulled = screen
        .lines()
        .find(|l| l.contains(&format!("pulled {one}: ")))
        .unwrap_or_else(|| panic!("no pulled line: {screen:?}"));
    // Three layers (busybox, its links, the random file), the file's 1.5 MB
    // among their bytes.
    assert!(pulled.contains(": 3 layer(s), "), "{pulled:?}");
    assert!(pulled.contains(" MiB in "), "{pulled:?}");
    assert!(
        screen.contains("tty is created with the address of https://"),
        "{screen:?}"
    );
    // The function runs a call on the pulled image.
    let id = d.call("tty", b"pulled and running");
    assert_eq!(
        d.ok(&["func", "get", "--wait", &id]).trim_end(),
        "pulled and running"
    );

    // The same on update, to another tag (not on the Engine yet).
    let screen = d.on_a_terminal(&format!("func update tty --image {two}"));
    assert!(
        screen.contains(&format!("updating tty: pulling {two}: ")),
        "{screen:?}"
    );
    assert!(screen.contains(&format!("pulled {two}: ")), "{screen:?}");
    assert!(
        screen.contains("tty is updated with the address of https://"),
        "{screen:?}"
    );
    // An image already there: no pull to show, the spinner as before.
    let screen = d.on_a_terminal(&format!("func update tty --image {one}"));
    assert!(!screen.contains("pulled "), "{screen:?}");
    assert!(
        screen.contains(&format!("updating tty: pulling/checking image {one}…")),
        "{screen:?}"
    );
    reg.forget(&one);
    reg.forget(&two);

    // NDJSON by curl: 200, a Pull line, layer progress with byte counts,
    // then exactly one final line with the function and the plain status.
    let post = |name: &str, image: &str, accept: &str| {
        d.curl(&[
            "-X",
            "POST",
            "-H",
            &format!("Authorization: Bearer {key}"),
            "-H",
            "Content-Type: application/json",
            "-H",
            &format!("Accept: {accept}"),
            "--data-binary",
            &format!("{{\"Name\":\"{name}\",\"Image\":\"{image}\",\"Command\":[\"cat\"]}}"),
            &format!("https://{}/v1/functions", d.addr()),
        ])
    };
    let (code, body) = post("streamed", &one, "application/x-ndjson");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let lines = ndjson(&body);
    assert_eq!(lines[0], serde_json::json!({"Pull": {"Image": one}}));
    let last = lines.last().expect("lines");
    assert_eq!(last["Status"], 201, "{last}");
    assert_eq!(last["Function"]["Name"], "streamed", "{last}");
    assert_eq!(last["Function"]["Image"], one.as_str(), "{last}");
    let middle = &lines[1..lines.len() - 1];
    assert!(
        middle.iter().all(|l| l["Progress"]["Id"].is_string()
            && l["Progress"]["Status"].is_string()
            && l.as_object().is_some_and(|o| o.len() == 1)),
        "{middle:?}"
    );
    assert!(
        middle
            .iter()
            .any(|l| l["Progress"]["Status"] == "Downloading"
                && l["Progress"]["Current"].as_u64().is_some()
                && l["Progress"]["Total"].as_u64().is_some()),
        "no byte counts: {middle:?}"
    );
    assert!(
        middle
            .iter()
            .any(|l| l["Progress"]["Status"] == "Pull complete"),
        "{middle:?}"
    );
    let id = d.call("streamed", b"streamed too");
    assert_eq!(
        d.ok(&["func", "get", "--wait", &id]).trim_end(),
        "streamed too"
    );

    // With the image present the answer is the plain one, header or not;
    // so is every refusal before the pull.
    let (code, body) = post("present", &one, "application/x-ndjson");
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(v["Name"], "present");
    let (code, body) = post("present", &one, "application/x-ndjson");
    assert_eq!(code, 409, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(v["error"]["code"], "conflict");

    // A pull that fails ends the stream with the error the plain request
    // would have answered, in our words.
    let missing = reg.image("missing");
    let (code, body) = post("gone", &missing, "application/x-ndjson");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let lines = ndjson(&body);
    assert_eq!(lines[0], serde_json::json!({"Pull": {"Image": missing}}));
    let last = lines.last().expect("lines");
    assert_eq!(last["Status"], 400, "{last}");
    assert_eq!(last["Error"]["code"], "bad_request", "{last}");
    assert_eq!(
        last["Error"]["message"],
        format!(
            "image {missing} is not present and could not be pulled: not found in its registry"
        )
    );
    let out = d.cli(&["func", "inspect", "gone"]);
    assert!(!out.status.success(), "gone was not created");

    for f in ["tty", "streamed", "present"] {
        d.ok(&["func", "rm", f]);
    }
    d.finish();
    drop(reg);
}
