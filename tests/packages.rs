//! The packages as an operator gets them: `scripts/package` builds the .deb
//! and the .rpm (from this test build's binary, so no release build), lintian
//! finds no error in the .deb, both list the completions, man pages and
//! notices; the .rpm owns its directories, installs, and `rpm -e` leaves
//! none of them (a modified config only as `config.toml.rpmsave`);
//! the .deb installs, its binary started as the unit starts it (with the
//! installed config, on a port of its own) runs a real call on the real
//! Engine, and `dpkg --purge` leaves what Debian policy allows.
//!
//! It installs system-wide, so it needs root, holds a machine-wide lock
//! (a second run waits), refuses to run where hyperfuncd is installed, and
//! purges what it installed even when it fails. Other hyperfuncd processes
//! and the Engine's other containers are left alone.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Serialises runs of this test across work trees on one machine.
const LOCK: &str = "/tmp/hyperfuncd-packages-test.lock";
const PROFILE: &str = "/var/lib/hyperfuncd/admin-profile.toml";
/// Shared directories the .rpm's files go in (not its own), deepest first.
const SHARED_DIRS: [&str; 6] = [
    "/usr/share/zsh/site-functions",
    "/usr/share/zsh",
    "/usr/share/fish/vendor_completions.d",
    "/usr/share/fish",
    "/usr/share/bash-completion/completions",
    "/usr/share/bash-completion",
];
/// The directories of the package's own (the config's first).
const OWN_DIRS: [&str; 3] = [
    "/etc/hyperfuncd",
    "/usr/share/hyperfuncd",
    "/usr/share/doc/hyperfuncd",
];

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (scripts/deps installs it)"))
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// Whether the package manager says hyperfuncd is installed.
fn installed() -> (bool, bool) {
    let deb = run(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Status}", "hyperfuncd"]));
    let deb = stdout(&deb);
    let rpm = run(Command::new("rpm").args(["-q", "hyperfuncd"]));
    (
        !deb.is_empty() && deb != "not-installed",
        rpm.status.success(),
    )
}

/// What this test installed and started; undone on drop, pass or fail.
#[derive(Default)]
struct Installed {
    daemon: Option<Child>,
    instance: String,
    deb: bool,
    rpm: bool,
}

impl Installed {
    fn stop_daemon(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.daemon.take()?;
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn containers(&self) -> Vec<String> {
        if self.instance.is_empty() {
            return vec![];
        }
        let filter = format!("label=io.hyperfuncd.instance={}", self.instance);
        let out = run(Command::new("docker").args(["ps", "-aq", "--filter", &filter]));
        stdout(&out).lines().map(str::to_string).collect()
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let ids = self.containers();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f"])
                .args(&ids)
                .output();
        }
        if self.rpm {
            let _ = Command::new("rpm")
                .args(["-e", "--nodeps", "hyperfuncd"])
                .output();
        }
        if self.deb {
            let _ = Command::new("dpkg")
                .args(["--purge", "hyperfuncd"])
                .output();
        }
    }
}

fn one_file(dir: &Path, suffix: &str) -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {suffix} in {}: {found:?}",
        dir.display()
    );
    found.remove(0)
}

/// The completions, the man pages and the notices, in a package's file list.
fn assert_lists_docs(what: &str, list: &str, zsh_dir: &str, man_suffix: &str) {
    for path in [
        "/usr/share/bash-completion/completions/hyperfuncd".to_string(),
        format!("{zsh_dir}/_hyperfuncd"),
        "/usr/share/fish/vendor_completions.d/hyperfuncd.fish".to_string(),
        format!("/usr/share/man/man1/hyperfuncd.1{man_suffix}"),
        format!("/usr/share/man/man1/hyperfuncd-func-create.1{man_suffix}"),
        format!("/usr/share/man/man1/hyperfuncd-user-add.1{man_suffix}"),
        "/usr/share/doc/hyperfuncd/THIRD-PARTY-NOTICES".to_string(),
    ] {
        assert!(
            list.lines().any(|l| l.ends_with(&path)),
            "{what} lacks {path}:\n{list}"
        );
    }
}

/// The unit's ExecStart, User and Group, read from the installed unit.
fn unit() -> (Vec<String>, String, String) {
    let text = std::fs::read_to_string("/lib/systemd/system/hyperfuncd.service")
        .expect("the installed unit");
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in the unit:\n{text}"))
            .to_string()
    };
    let exec = value("ExecStart")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    (exec, value("User"), value("Group"))
}

#[test]
fn packages_build_lint_install_call_and_purge() {
    // SAFETY: geteuid(2) has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(uid, 0, "installs packages: run as root (CI does)");
    let lock = std::fs::File::create(LOCK).expect("lock file");
    // SAFETY: flock(2) on a descriptor this function owns until it returns.
    let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(locked, 0, "flock {LOCK}");
    assert_eq!(
        installed(),
        (false, false),
        "hyperfuncd is installed on this machine; this test installs and purges it, so it stops here"
    );
    let image = test_image();

    // Build both packages from this build's binary into a target dir of
    // the test's own, kept between runs for scripts/package's cached notices.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("packages");
    for dir in ["debian", "rpm"] {
        let _ = std::fs::remove_dir_all(target.join(dir));
    }
    let started = Instant::now();
    ok(Command::new("scripts/package")
        .args(["--bin", BIN, "--fast"])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(env!("CARGO_MANIFEST_DIR")));
    eprintln!("scripts/package took {:?}", started.elapsed());
    let deb = one_file(&target.join("debian"), ".deb");
    let rpm = one_file(&target.join("rpm"), ".rpm");
    let logs = tempfile::tempdir().expect("tempdir");

    // lintian: no errors (warnings are printed for the log).
    let out = run(Command::new("lintian").arg(&deb));
    let report = format!("{}{}", stdout(&out), stderr(&out));
    eprintln!("lintian {}:\n{report}", deb.display());
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));

    let deb_list = ok(Command::new("dpkg-deb").arg("-c").arg(&deb));
    assert_lists_docs(
        ".deb",
        &deb_list.replace(" ./", " /"),
        "/usr/share/zsh/vendor-completions",
        ".gz",
    );
    let rpm_list = ok(Command::new("rpm").arg("-qlvp").arg(&rpm));
    assert_lists_docs(".rpm", &rpm_list, "/usr/share/zsh/site-functions", "");
    // The package's own directories are entries of its own (mode d...), so
    // rpm removes them on erase; shared ones (man1, completions) are not.
    let modes = ok(Command::new("rpm")
        .args(["-qp", "--qf", "[%{FILENAMES} %{FILEMODES:perms}\n]"])
        .arg(&rpm));
    for dir in OWN_DIRS {
        assert!(
            modes.lines().any(|l| l.starts_with(&format!("{dir} d"))),
            ".rpm does not own the directory {dir}:\n{modes}"
        );
    }
    for shared in ["/usr/share/man/man1", "/usr/lib/systemd/system", "/usr/bin"] {
        assert!(
            !modes.lines().any(|l| l.starts_with(&format!("{shared} "))),
            ".rpm owns the shared directory {shared}:\n{modes}"
        );
    }

    let mut state = Installed::default();

    // Shared directories the .rpm's files go in that this (Debian) host
    // lacks: rpm creates them and, as they are not the package's, leaves
    // them; the test removes them after its last `rpm -e`.
    let absent: Vec<&str> = SHARED_DIRS
        .into_iter()
        .filter(|d| !Path::new(d).exists())
        .collect();

    // The .rpm: installed (its scriptlets run: user, config) and erased,
    // after which none of its directories is left.
    state.rpm = true;
    ok(Command::new("rpm").args(["-i", "--nodeps"]).arg(&rpm));
    assert!(Path::new("/etc/hyperfuncd/config.toml").is_file());
    assert!(Path::new("/usr/share/doc/hyperfuncd/THIRD-PARTY-NOTICES").is_file());
    ok(Command::new("rpm").args(["-e", "--nodeps", "hyperfuncd"]));
    state.rpm = false;
    for dir in OWN_DIRS.iter().chain(&["/usr/bin/hyperfuncd"]) {
        assert!(!Path::new(dir).exists(), "{dir} is left after rpm -e");
    }
    // Again with an edited config: rpm keeps the edit as config.toml.rpmsave
    // (%config(noreplace)), so /etc/hyperfuncd stays with only that in it;
    // the other directories go.
    state.rpm = true;
    ok(Command::new("rpm").args(["-i", "--nodeps"]).arg(&rpm));
    let mut config = std::fs::OpenOptions::new()
        .append(true)
        .open("/etc/hyperfuncd/config.toml")
        .expect("the installed config");
    writeln!(config, "# edited by tests/packages.rs").expect("edit the config");
    drop(config);
    ok(Command::new("rpm").args(["-e", "--nodeps", "hyperfuncd"]));
    state.rpm = false;
    let mut kept: Vec<String> = std::fs::read_dir("/etc/hyperfuncd")
        .expect("/etc/hyperfuncd stays with the saved config")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    kept.sort();
    let saved = std::fs::read_to_string("/etc/hyperfuncd/config.toml.rpmsave").unwrap_or_default();
    std::fs::remove_dir_all("/etc/hyperfuncd").expect("remove the saved config");
    assert_eq!(
        kept,
        ["config.toml.rpmsave"],
        "left in /etc/hyperfuncd after rpm -e"
    );
    assert!(saved.contains("# edited by tests/packages.rs"), "{saved}");
    for dir in &OWN_DIRS[1..] {
        assert!(!Path::new(dir).exists(), "{dir} is left after rpm -e");
    }
    for dir in &absent {
        // Only if empty (deepest first): what is in it is not the test's.
        let _ = std::fs::remove_dir(dir);
    }
    eprintln!(
        "after rpm -e: none of its directories is left; rpm created and left {absent:?} (removed)"
    );

    // The .deb, started as its unit starts it.
    state.deb = true;
    ok(Command::new("dpkg").arg("-i").arg(&deb));
    let (mut exec, user, group) = unit();
    assert_eq!(exec[0], "/usr/bin/hyperfuncd");
    // systemd's StateDirectory=hyperfuncd, StateDirectoryMode=0700.
    ok(Command::new("install").args([
        "-d",
        "-o",
        &user,
        "-g",
        &group,
        "-m",
        "0700",
        "/var/lib/hyperfuncd",
    ]));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    // Its own port instead of the config's 0.0.0.0:8443.
    exec.extend(["--listen".to_string(), format!("127.0.0.1:{port}")]);
    // The unit lets it install the call firewall (README "Network"); here,
    // on the shared Engine, its rules would go into this machine's own
    // iptables, so the installed config turns it off (tests/firewall.rs
    // checks the firewall in a namespace of its own).
    let unit_text = std::fs::read_to_string("/lib/systemd/system/hyperfuncd.service")
        .expect("the installed unit");
    assert!(
        unit_text.contains("AmbientCapabilities=CAP_NET_ADMIN"),
        "{unit_text}"
    );
    let installed_config = "/etc/hyperfuncd/config.toml";
    let text = std::fs::read_to_string(installed_config).expect("the installed config");
    assert!(text.contains("\nfirewall = true\n"), "{text}");
    std::fs::write(
        installed_config,
        text.replace("\nfirewall = true\n", "\nfirewall = false\n"),
    )
    .expect("turn the firewall off");
    let log_path = logs.path().join("daemon.log");
    let mut daemon = Command::new("setpriv")
        .args([
            &format!("--reuid={user}"),
            &format!("--regid={group}"),
            "--init-groups",
            "--",
            "sh",
            "-c",
            "umask 0077; exec \"$@\"",
            "sh",
        ])
        .args(&exec)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        // The unit's Environment= lines.
        .env("HYPERFUNCD_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log_path).expect("daemon log"))
        .spawn()
        .expect("setpriv (util-linux)");
    let banner = daemon.stdout.take().expect("stdout");
    state.daemon = Some(daemon);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(banner).lines();
        if let Some(Ok(l)) = lines.next() {
            let _ = tx.send(l);
        }
        for _ in lines {}
    });
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("the installed daemon did not start; log:\n{}", log()));
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");

    let home = tempfile::tempdir().expect("tempdir");
    let cli = |args: &[&str], stdin: &[u8]| {
        let mut child = Command::new("/usr/bin/hyperfuncd")
            .arg("--profile")
            .arg(PROFILE)
            .args(args)
            .env("HOME", home.path())
            .env_remove("HYPERFUNC_ENDPOINT")
            .env_remove("HYPERFUNC_KEY")
            .env_remove("HYPERFUNC_CA")
            .env_remove("HYPERFUNC_PROFILE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the installed CLI");
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(stdin).expect("payload");
        drop(pipe);
        let out = child.wait_with_output().expect("CLI output");
        assert!(
            out.status.success(),
            "hyperfuncd {args:?}: {}\nlog:\n{}",
            stderr(&out),
            log()
        );
        stdout(&out)
    };
    let profile = std::fs::read_to_string(PROFILE).expect("admin profile");
    let health = ok(Command::new("curl").args([
        "-sf",
        "--cacert",
        "/var/lib/hyperfuncd/tls/cert.pem",
        &format!("https://127.0.0.1:{port}/healthz"),
    ]));
    let health: serde_json::Value = serde_json::from_str(&health).expect("healthz JSON");
    state.instance = health["Instance"].as_str().unwrap_or_default().to_string();
    assert!(!state.instance.is_empty(), "{health}\n{profile}");

    cli(&["func", "create", "--name", "pkgcheck", image, "cat"], b"");
    let payload = b"through the installed package";
    let output = cli(&["func", "call", "--sync", "pkgcheck"], payload);
    assert_eq!(output.as_bytes(), payload);
    cli(&["func", "rm", "pkgcheck"], b"");

    let status = state.stop_daemon().expect("daemon status");
    assert!(status.success(), "{status}; log:\n{}", log());
    assert!(
        state.containers().is_empty(),
        "containers left: {:?}",
        state.containers()
    );
    let log = log();
    assert!(!log.contains('\u{1b}'), "escape codes in the log:\n{log}");

    ok(Command::new("dpkg").args(["--purge", "hyperfuncd"]));
    state.deb = false;
    let mut stays = vec![];
    for path in [
        "/etc/hyperfuncd",
        "/usr/share/hyperfuncd",
        "/usr/share/doc/hyperfuncd",
        "/var/lib/hyperfuncd",
        "/usr/bin/hyperfuncd",
        "/lib/systemd/system/hyperfuncd.service",
    ] {
        if Path::new(path).exists() {
            stays.push(path);
        }
    }
    assert!(stays.is_empty(), "left after dpkg --purge: {stays:?}");
    // Debian policy lets the system user stay (files it owned may remain).
    let user = run(Command::new("getent").args(["passwd", "hyperfuncd"]));
    eprintln!(
        "after dpkg --purge: no file of the package is left; the user stays: {}",
        stdout(&user).trim()
    );
    assert_eq!(installed(), (false, false));
}
