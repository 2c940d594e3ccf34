//! The call network's firewall (`[container] firewall`, README "Network"):
//! iptables rules that keep call containers away from the host and from
//! link-local addresses (a cloud's metadata service).
//!
//! It owns two chains per daemon, named after its instance (`HYPERFUNCD-IN-…`
//! for traffic from the call bridge to the host itself, jumped to from
//! `INPUT`; `HYPERFUNCD-FWD-…` for traffic the host forwards, jumped to from
//! the Engine's `DOCKER-USER`, which the Engine keeps ahead of its own
//! rules), and the jumps into them. It never changes a rule it did not make,
//! and it only drops or returns: an allowed destination goes on through the
//! host's own rules. It runs iptables in the daemon's network namespace,
//! which must be the Engine's: the bridge must be seen here.
//!
//! Several daemons on one Engine share the call network; each has its own
//! chains, so one stopping leaves the others' rules, and a packet must pass
//! every daemon's chains (their allow lists intersect).

use crate::config::HostAllow;
use std::sync::atomic::{AtomicBool, Ordering};

/// Link-local addresses, where clouds serve instance metadata
/// (169.254.169.254, AWS's fd00:ec2::254) and credentials with it.
const LINK_LOCAL_V4: &[&str] = &["169.254.0.0/16"];
const LINK_LOCAL_V6: &[&str] = &["fe80::/10", "fd00:ec2::254/128"];
/// CAP_NET_ADMIN, bit 12 of the capability sets in /proc/self/status.
const CAP_NET_ADMIN: u32 = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn binary(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
}

/// What is installed: for which bridge, and whether for IPv6 too.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Installed {
    bridge: String,
    ipv6: bool,
}

pub struct Firewall {
    /// `HYPERFUNCD-IN-{tag}` and `HYPERFUNCD-FWD-{tag}`: the instance's
    /// first 12 characters (iptables takes chain names up to 28).
    input_chain: String,
    forward_chain: String,
    allow: Vec<HostAllow>,
    /// One install or removal at a time; what is installed now.
    installed: tokio::sync::Mutex<Option<Installed>>,
    /// Whether rules are in place, read before every container create
    /// without taking the lock.
    ready: AtomicBool,
    /// The bridge they are for, as `ready` is read: if it is gone, the
    /// network was removed (and maybe made again, by anyone) since.
    bridge: std::sync::Mutex<Option<String>>,
}

impl Firewall {
    pub fn new(instance: &str, allow: Vec<HostAllow>) -> Firewall {
        let tag: String = instance
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(12)
            .collect();
        Firewall {
            input_chain: format!("HYPERFUNCD-IN-{tag}"),
            forward_chain: format!("HYPERFUNCD-FWD-{tag}"),
            allow,
            installed: tokio::sync::Mutex::new(None),
            ready: AtomicBool::new(false),
            bridge: std::sync::Mutex::new(None),
        }
    }

    /// Whether the rules are in place for the call network as last seen,
    /// and its bridge still exists (a network made anew has another).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && self
                .bridge
                .lock()
                .is_ok_and(|b| b.as_deref().is_some_and(interface_exists))
    }

    /// What installing needs and this process may lack, said before the
    /// Engine is asked anything: CAP_NET_ADMIN (root) and `iptables`.
    pub fn check(&self) -> Result<(), String> {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        if !has_capability(&status, CAP_NET_ADMIN) {
            return Err(
                "installing iptables rules needs root (CAP_NET_ADMIN); run hyperfuncd as root, \
                 or set [container] firewall = false and keep calls from the host yourself"
                    .into(),
            );
        }
        if find_in_path(Family::V4.binary()).is_none() {
            return Err(
                "iptables is not installed (Debian: apt-get install iptables), or not in PATH; \
                 or set [container] firewall = false and keep calls from the host yourself"
                    .into(),
            );
        }
        Ok(())
    }

    /// Installs the rules for `bridge` (the call network's Linux bridge),
    /// for IPv6 too if the network has it; nothing if they are in place for
    /// it already. Rules a crashed run of this daemon left (for this or an
    /// older bridge) are replaced.
    pub async fn apply(&self, bridge: &str, ipv6: bool) -> Result<(), String> {
        let want = Installed {
            bridge: bridge.to_string(),
            ipv6,
        };
        let mut installed = self.installed.lock().await;
        if installed.as_ref() == Some(&want) {
            return Ok(());
        }
        self.ready.store(false, Ordering::Release);
        if !interface_exists(bridge) {
            return Err(format!(
                "the call network's bridge {bridge} is not in this network namespace (is the \
                 Docker Engine on another host, or in a namespace of its own?); set [container] \
                 firewall = false and keep calls from the host where the Engine runs"
            ));
        }
        let mut families = vec![Family::V4];
        if ipv6 {
            families.push(Family::V6);
        } else {
            // Left by an earlier run on an IPv6 network; ip6tables may be
            // missing where nothing needs it.
            if find_in_path(Family::V6.binary()).is_some() {
                self.remove_family(Family::V6).await;
            }
        }
        for family in families {
            self.install_family(family, bridge).await?;
        }
        *installed = Some(want);
        if let Ok(mut b) = self.bridge.lock() {
            *b = Some(bridge.to_string());
        }
        self.ready.store(true, Ordering::Release);
        tracing::info!(
            bridge,
            ipv6,
            chains = format!("{} {}", self.input_chain, self.forward_chain),
            allow = self
                .allow
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" "),
            "call firewall installed: calls cannot reach the host or link-local addresses"
        );
        Ok(())
    }

    /// Removes every rule and chain this daemon made (at stop).
    pub async fn remove(&self) {
        let mut installed = self.installed.lock().await;
        self.ready.store(false, Ordering::Release);
        let Some(was) = installed.take() else {
            return;
        };
        self.remove_family(Family::V4).await;
        if was.ipv6 {
            self.remove_family(Family::V6).await;
        }
        tracing::info!(bridge = was.bridge, "call firewall removed");
    }

    async fn install_family(&self, family: Family, bridge: &str) -> Result<(), String> {
        let bin = family.binary();
        if find_in_path(bin).is_none() {
            return Err(format!(
                "{bin} is not installed and the call network has IPv6 (Debian: apt-get install iptables)"
            ));
        }
        self.unjump(family).await;
        let (input, forward) = chain_rules(family, &self.allow);
        for (chain, rules) in [(&self.input_chain, input), (&self.forward_chain, forward)] {
            if iptables(bin, &["-S", chain]).await.is_ok() {
                iptables(bin, &["-F", chain]).await?;
            } else {
                iptables(bin, &["-N", chain]).await?;
            }
            for rule in rules {
                let mut args = vec!["-A", chain.as_str()];
                args.extend(rule.iter().map(String::as_str));
                iptables(bin, &args).await?;
            }
        }
        // The Engine's own chain for rules of the operator's, ahead of its
        // own accepts; without it (an Engine run with --iptables=false),
        // FORWARD itself.
        let forward_hook = if iptables(bin, &["-S", "DOCKER-USER"]).await.is_ok() {
            "DOCKER-USER"
        } else {
            "FORWARD"
        };
        iptables(
            bin,
            &["-I", "INPUT", "1", "-i", bridge, "-j", &self.input_chain],
        )
        .await?;
        iptables(
            bin,
            &[
                "-I",
                forward_hook,
                "1",
                "-i",
                bridge,
                "-j",
                &self.forward_chain,
            ],
        )
        .await?;
        Ok(())
    }

    async fn remove_family(&self, family: Family) {
        let bin = family.binary();
        self.unjump(family).await;
        for chain in [&self.input_chain, &self.forward_chain] {
            if iptables(bin, &["-S", chain]).await.is_ok() {
                for args in [["-F", chain.as_str()], ["-X", chain.as_str()]] {
                    if let Err(e) = iptables(bin, &args).await {
                        tracing::warn!(error = %e, "cannot remove the call firewall's chain");
                    }
                }
            }
        }
    }

    /// Deletes every jump into this daemon's chains, whatever bridge it names.
    async fn unjump(&self, family: Family) {
        let bin = family.binary();
        for hook in ["INPUT", "DOCKER-USER", "FORWARD"] {
            let Ok(listing) = iptables(bin, &["-S", hook]).await else {
                continue;
            };
            for rule in listing.lines() {
                let words: Vec<&str> = rule.split_whitespace().collect();
                let ours = words.len() > 2
                    && words[0] == "-A"
                    && words[words.len() - 2] == "-j"
                    && [&self.input_chain, &self.forward_chain]
                        .iter()
                        .any(|c| c.as_str() == words[words.len() - 1]);
                if ours {
                    let mut args = vec!["-D"];
                    args.extend(&words[1..]);
                    if let Err(e) = iptables(bin, &args).await {
                        tracing::warn!(error = %e, "cannot remove a jump into the call firewall");
                    }
                }
            }
        }
    }
}

/// The rules of the input and the forward chain for `family`, in order,
/// without `-A CHAIN`. Everything ends in RETURN or DROP: an allowed
/// destination still meets the host's own rules.
fn chain_rules(family: Family, allow: &[HostAllow]) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
    let rule = |words: &[&str]| words.iter().map(|w| w.to_string()).collect::<Vec<_>>();
    let replies = rule(&[
        "-m",
        "conntrack",
        "--ctstate",
        "ESTABLISHED,RELATED",
        "-j",
        "RETURN",
    ]);
    let mine: Vec<&HostAllow> = allow
        .iter()
        .filter(|a| a.addr.is_ipv4() == (family == Family::V4))
        .collect();

    let mut input = vec![replies.clone()];
    let mut forward = vec![replies];
    for a in mine {
        let net = format!("{}/{}", a.addr, a.prefix);
        match a.port {
            Some(port) => {
                let port = port.to_string();
                for proto in ["tcp", "udp"] {
                    input.push(rule(&[
                        "-d", &net, "-p", proto, "--dport", &port, "-j", "RETURN",
                    ]));
                    // Forwarded traffic may have been translated on its way
                    // (a port the host publishes for a container): match
                    // where it was sent, not where it goes.
                    forward.push(rule(&[
                        "-p",
                        proto,
                        "-m",
                        "conntrack",
                        "--ctorigdst",
                        &net,
                        "--ctorigdstport",
                        &port,
                        "-j",
                        "RETURN",
                    ]));
                }
            }
            None => {
                input.push(rule(&["-d", &net, "-j", "RETURN"]));
                forward.push(rule(&[
                    "-m",
                    "conntrack",
                    "--ctorigdst",
                    &net,
                    "-j",
                    "RETURN",
                ]));
            }
        }
    }
    // Every address of the host itself: the bridge's gateway, the daemon's
    // port, the host's other addresses and services.
    input.push(rule(&["-j", "DROP"]));
    let link_local = match family {
        Family::V4 => LINK_LOCAL_V4,
        Family::V6 => LINK_LOCAL_V6,
    };
    for net in link_local {
        forward.push(rule(&["-d", net, "-j", "DROP"]));
    }
    // A port the host publishes (for a container) is the host's too.
    forward.push(rule(&[
        "-m",
        "conntrack",
        "--ctstate",
        "DNAT",
        "-j",
        "DROP",
    ]));
    (input, forward)
}

/// Runs `bin -w ARGS` (`-w`: wait for the xtables lock the Engine also
/// takes); its stdout, or what it said on failure.
async fn iptables(bin: &str, args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new(bin)
        .arg("-w")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run {bin}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{bin} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether the effective capability set in `status` (/proc/self/status)
/// holds capability `bit`.
fn has_capability(status: &str, bit: u32) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << bit) != 0)
}

fn find_in_path(bin: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(bin))
        .find(|p| p.is_file())
}

/// Whether this network namespace has an interface `name` (sysfs may show
/// another namespace's, so ask the kernel).
fn interface_exists(name: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(rules: &[Vec<String>]) -> Vec<String> {
        rules.iter().map(|r| r.join(" ")).collect()
    }

    #[test]
    fn rules_drop_the_host_and_link_local_after_the_allowed() {
        let allow: Vec<HostAllow> = ["10.0.0.5:5432", "192.168.7.0/24", "[fd00::1]:443"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let (input, forward) = chain_rules(Family::V4, &allow);
        assert_eq!(
            joined(&input),
            [
                "-m conntrack --ctstate ESTABLISHED,RELATED -j RETURN",
                "-d 10.0.0.5/32 -p tcp --dport 5432 -j RETURN",
                "-d 10.0.0.5/32 -p udp --dport 5432 -j RETURN",
                "-d 192.168.7.0/24 -j RETURN",
                "-j DROP",
            ]
        );
        assert_eq!(
            joined(&forward),
            [
                "-m conntrack --ctstate ESTABLISHED,RELATED -j RETURN",
                "-p tcp -m conntrack --ctorigdst 10.0.0.5/32 --ctorigdstport 5432 -j RETURN",
                "-p udp -m conntrack --ctorigdst 10.0.0.5/32 --ctorigdstport 5432 -j RETURN",
                "-m conntrack --ctorigdst 192.168.7.0/24 -j RETURN",
                "-d 169.254.0.0/16 -j DROP",
                "-m conntrack --ctstate DNAT -j DROP",
            ]
        );
        let (input, forward) = chain_rules(Family::V6, &allow);
        assert_eq!(input.len(), 4, "{input:?}");
        assert!(joined(&input).contains(&"-d fd00::1/128 -p tcp --dport 443 -j RETURN".into()));
        let forward = joined(&forward);
        assert!(forward.contains(&"-d fd00:ec2::254/128 -j DROP".to_string()));
        assert!(forward.contains(&"-d fe80::/10 -j DROP".to_string()));
        assert!(
            !forward.iter().any(|r| r.contains("10.0.0.5")),
            "{forward:?}"
        );
    }

    #[test]
    fn chains_are_named_within_iptables_limits() {
        let f = Firewall::new("0123456789abcdef0123456789abcdef", Vec::new());
        assert_eq!(f.input_chain, "HYPERFUNCD-IN-0123456789ab");
        assert_eq!(f.forward_chain, "HYPERFUNCD-FWD-0123456789ab");
        assert!(f.forward_chain.len() <= 28);
        let odd = Firewall::new("a b;c", Vec::new());
        assert_eq!(odd.input_chain, "HYPERFUNCD-IN-abc");
    }

    #[test]
    fn capabilities_are_read_from_the_effective_set() {
        let root = "Name:\thyperfuncd\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert!(has_capability(root, CAP_NET_ADMIN));
        let user = "CapEff:\t0000000000000000\n";
        assert!(!has_capability(user, CAP_NET_ADMIN));
        let without = format!("CapEff:\t{:016x}\n", 0x1ff_ffff_ffffu64 & !(1 << 12));
        assert!(!has_capability(&without, CAP_NET_ADMIN));
        assert!(!has_capability("", CAP_NET_ADMIN));
    }
}
