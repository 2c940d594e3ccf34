//! Calls cannot reach the host (DESIGN 4, README "Network"): with the
//! firewall on (the default), a call on the daemon's network reaches
//! neither the host's addresses (the bridge's gateway, another address of
//! the host, the daemon's own port) nor a link-local metadata address, but
//! does reach a destination the operator allowed; the rules go when the
//! daemon stops. And a daemon that cannot install them does not start.
//!
//! Everything happens in a network namespace the test makes (`NetNs`), on a
//! private dockerd started there: the rules, the addresses, the listeners
//! and every packet stay inside it. The shared Engine, its network and this
//! machine's own iptables rules are never touched.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A call of this function says whether it could open a TCP connection to
/// `X-Host`:`X-Port` (request headers are its variables), and what the
/// other end said.
const PROBE: &str = r#"if out=$(nc -w 3 "$HTTP_X_HOST" "$HTTP_X_PORT" </dev/null 2>&1); then echo "reached $out"; else echo "unreachable $out"; fi"#;

/// A TCP listener in the test's namespace that greets every connection with
/// its banner and counts them.
struct Listener {
    addr: SocketAddr,
    banner: &'static str,
    hits: Arc<AtomicUsize>,
}

impl Listener {
    fn start(ip: &str, port: u16, banner: &'static str) -> Listener {
        let socket =
            TcpListener::bind((ip, port)).unwrap_or_else(|e| panic!("bind {ip}:{port}: {e}"));
        let addr = socket.local_addr().expect("listener address");
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&hits);
        std::thread::spawn(move || {
            for mut conn in socket.incoming().flatten() {
                counted.fetch_add(1, Ordering::SeqCst);
                let _ = writeln!(conn, "{banner}");
            }
        });
        let l = Listener { addr, banner, hits };
        // It answers, from the namespace itself: the address is the host's.
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("{addr} does not answer the test itself: {e}"));
        let mut greeting = String::new();
        conn.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        conn.read_to_string(&mut greeting).expect("greeting");
        assert_eq!(greeting.trim(), banner);
        l
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// What a call of `probe` says of `ip:port`.
fn probe(d: &Daemon, url: &str, ip: &str, port: u16) -> String {
    let (code, body) = d.curl(&[
        "-H",
        &format!("X-Host: {ip}"),
        "-H",
        &format!("X-Port: {port}"),
        "--data-binary",
        "",
        &format!("{url}/sync"),
    ]);
    let text = String::from_utf8_lossy(&body).trim().to_string();
    assert_eq!(code, 200, "{ip}:{port}: {text}\n{}", d.log());
    text
}

fn port_of(endpoint: &str) -> u16 {
    endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("endpoint port")
}

#[test]
fn calls_reach_neither_the_host_nor_link_local_addresses_only_what_is_allowed() {
    let ns = NetNs::enter();
    // The host's other addresses: a metadata service's, and one of the
    // host's private network with a database the operator lets calls use.
    ns.add_address("hfmeta0", "169.254.169.254/32");
    ns.add_address("hfhost0", "10.213.0.5/32");
    let metadata = Listener::start("169.254.169.254", 80, "metadata-credentials");
    let allowed = Listener::start("10.213.0.5", 0, "allowed-database");
    let other = Listener::start("10.213.0.5", 0, "host-service");

    let engine = PrivateEngine::start_in(&ns);
    let d = Daemon::start_on_all_addresses(&format!(
        "[docker]\nsocket = \"{}\"\n[container]\nnetwork_mode = \"hyperfuncd\"\n\
         allow_host = [\"10.213.0.5:{}\"]\n",
        engine.host,
        allowed.addr.port()
    ));
    let gateway = engine
        .docker(&[
            "network",
            "inspect",
            "-f",
            "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
            "hyperfuncd",
        ])
        .trim()
        .to_string();
    assert!(!gateway.is_empty(), "no gateway on the call network");
    let on_gateway = Listener::start(&gateway, 0, "gateway-service");
    let daemon_port = port_of(&d.endpoint);

    let rules = ns.iptables_rules();
    assert!(
        rules
            .lines()
            .any(|l| l.starts_with("-A INPUT -i br-") && l.contains("-j HYPERFUNCD-IN-")),
        "{rules}"
    );
    assert!(
        rules
            .lines()
            .any(|l| l.starts_with("-A DOCKER-USER -i br-") && l.contains("-j HYPERFUNCD-FWD-")),
        "{rules}"
    );
    assert!(d.log().contains("call firewall installed"), "{}", d.log());

    let url = d.create("probe", &[IMAGE, "sh", "-c", PROBE]);
    // The allowed destination answers: the bridge and the routes work.
    let seen = probe(&d, &url, "10.213.0.5", allowed.addr.port());
    assert_eq!(seen, format!("reached {}", allowed.banner));
    let before = [&metadata, &other, &on_gateway].map(Listener::hits);
    for (what, ip, port) in [
        ("the metadata address", "169.254.169.254", 80),
        (
            "another port of an allowed address",
            "10.213.0.5",
            other.addr.port(),
        ),
        (
            "a service on the bridge's gateway",
            gateway.as_str(),
            on_gateway.addr.port(),
        ),
        ("the daemon's port", gateway.as_str(), daemon_port),
    ] {
        let seen = probe(&d, &url, ip, port);
        assert!(
            seen.starts_with("unreachable"),
            "{what} ({ip}:{port}): {seen}"
        );
    }
    assert_eq!(
        [&metadata, &other, &on_gateway].map(Listener::hits),
        before,
        "a listener was reached"
    );

    // The network removed behind the daemon's back (`docker network
    // prune`) and made again by the next call: the rules follow its new
    // bridge before that call's container is made.
    d.wait_until(30, "the calls' containers to be removed", || {
        engine.containers(&d.instance).is_empty()
    });
    let old_bridge = rules
        .lines()
        .find_map(|l| l.strip_prefix("-A INPUT -i "))
        .and_then(|l| l.split_whitespace().next())
        .expect("the bridge of the rules")
        .to_string();
    engine.docker(&["network", "rm", "hyperfuncd"]);
    let seen = probe(&d, &url, "169.254.169.254", 80);
    assert!(
        seen.starts_with("unreachable"),
        "after the network was made again: {seen}"
    );
    let rules = ns.iptables_rules();
    assert!(!rules.contains(&old_bridge), "{rules}");
    assert_eq!(
        rules
            .lines()
            .filter(|l| l.contains("-j HYPERFUNCD-IN-"))
            .count(),
        1,
        "{rules}"
    );
    assert_eq!(
        metadata.hits(),
        before[0],
        "the metadata listener was reached"
    );

    // The rules go with the daemon, and they were what kept the calls out:
    // a container on the same network now reaches the metadata address.
    let mut d = d;
    d.stop();
    let rules = ns.iptables_rules();
    assert!(!rules.contains("HYPERFUNCD"), "left after stop:\n{rules}");
    let seen = engine.docker(&[
        "run",
        "--rm",
        "--network",
        "hyperfuncd",
        IMAGE,
        "nc",
        "-w",
        "3",
        "169.254.169.254",
        "80",
    ]);
    assert_eq!(seen.trim(), metadata.banner, "the path the rules closed");
    drop(engine);
    drop(ns);
}

/// Without what installing the rules needs (iptables, CAP_NET_ADMIN) the
/// daemon refuses to start and says why. It stops before it asks the
/// Engine for anything, so this runs on the shared Engine without touching
/// its network or rules.
#[test]
fn a_daemon_that_cannot_install_the_firewall_does_not_start() {
    require_root("dropping a capability");
    test_image();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[container]\nnetwork_mode = \"hyperfuncd-test-fw-{}\"\n",
            dir.path().join("data").display(),
            std::process::id()
        ),
    )
    .expect("config");
    let serve = |cmd: &mut Command| {
        let out = cmd
            .env("HYPERFUNCD_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run hyperfuncd");
        assert!(!out.status.success(), "it started: {}", stdout(&out));
        stderr(&out)
    };
    let no_iptables = serve(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&config)
            .env("PATH", dir.path()),
    );
    assert!(
        no_iptables.contains("iptables is not installed")
            && no_iptables.contains("[container] firewall = false"),
        "{no_iptables}"
    );
    let no_capability = serve(
        Command::new("setpriv")
            .args(["--inh-caps=-net_admin", "--bounding-set=-net_admin", "--"])
            .arg(BIN)
            .args(["serve", "--config"])
            .arg(&config),
    );
    assert!(
        no_capability.contains("needs root (CAP_NET_ADMIN)"),
        "{no_capability}"
    );
    let network = format!("hyperfuncd-test-fw-{}", std::process::id());
    let made = Command::new("docker")
        .args(["network", "inspect", &network])
        .output()
        .expect("docker CLI");
    assert!(!made.status.success(), "the network was made after all");
}
