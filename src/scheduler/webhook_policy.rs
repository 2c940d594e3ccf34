//! Where a completion webhook may go, decided without any I/O: the URL's
//! shape (https, or http to `[webhooks] allow_http_hosts`; no credentials,
//! no fragment), and each address its host resolves to (public, or inside
//! `[webhooks] allow_private`). `Service` asks it when a webhook is set
//! (the URL and a literal address; a name is not resolved then) and when
//! a call names one; the delivery worker asks it again for every
//! address it connects to (`Resolver`), so a name that later resolves
//! elsewhere (DNS rebinding) reaches nothing it may not. It must never
//! resolve or connect itself.

use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A URL the policy accepted, with what the connection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub url: reqwest::Url,
    /// The host as the URL names it (no brackets around a v6 address).
    pub host: String,
    pub port: u16,
    /// The address, when the host is one (the resolver is not asked then).
    pub literal: Option<IpAddr>,
    /// `scheme://host:port`: what deliveries are bounded per.
    pub receiver: String,
}

#[derive(Debug, Clone, Default)]
pub struct Policy {
    allow_http_hosts: Vec<String>,
    allow_private: Vec<IpNet>,
    /// When not empty, the only hosts (`example.com`, or `.example.com`
    /// for its subdomains) webhooks may name.
    allow_hosts: Vec<String>,
}

impl Policy {
    pub fn new(allow_http_hosts: Vec<String>, allow_private: Vec<IpNet>) -> Policy {
        Policy {
            allow_http_hosts: allow_http_hosts
                .into_iter()
                .map(|h| h.trim_matches(['[', ']']).to_ascii_lowercase())
                .collect(),
            allow_private,
            allow_hosts: Vec::new(),
        }
    }

    /// Restricts webhooks to these hosts (`[webhooks] allow_hosts`).
    pub fn only_hosts(mut self, hosts: Vec<String>) -> Policy {
        self.allow_hosts = hosts
            .into_iter()
            .map(|h| h.trim_matches(['[', ']']).to_ascii_lowercase())
            .collect();
        self
    }

    pub fn from_config(c: &crate::config::WebhooksConfig) -> Result<Policy, String> {
        Ok(
            Policy::new(c.allow_http_hosts.clone(), c.private_networks()?)
                .only_hosts(c.allow_hosts.clone()),
        )
    }

    /// The URL's shape, and its address if it names one.
    pub fn check_url(&self, url: &str) -> Result<Target, String> {
        if url.len() > crate::model::WEBHOOK_URL_MAX {
            return Err(format!(
                "webhook URL is longer than {} bytes",
                crate::model::WEBHOOK_URL_MAX
            ));
        }
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("invalid webhook URL: {e}"))?;
        let host = match parsed.host() {
            Some(url::Host::Domain(d)) => d.to_ascii_lowercase(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => a.to_string(),
            None => return Err("webhook URL has no host".into()),
        };
        let listed = |h: &String| h == &host || (h.starts_with('.') && host.ends_with(h.as_str()));
        if !self.allow_hosts.is_empty() && !self.allow_hosts.iter().any(listed) {
            return Err(format!(
                "webhook host {host} is not in [webhooks] allow_hosts"
            ));
        }
        match parsed.scheme() {
            "https" => {}
            "http" if self.allow_http_hosts.contains(&host) => {}
            "http" => {
                return Err(format!(
                    "webhook URL must be https (http only to hosts in [webhooks] allow_http_hosts, which {host} is not)"
                ))
            }
            s => return Err(format!("webhook URL must be https, not {s}")),
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err("webhook URL must not carry credentials".into());
        }
        if parsed.fragment().is_some() {
            return Err("webhook URL must not have a fragment".into());
        }
        let port = parsed
            .port_or_known_default()
            .ok_or("webhook URL has no port")?;
        let literal = host.parse::<IpAddr>().ok();
        if let Some(ip) = literal {
            self.check_addr(ip)?;
        }
        // Names that are loopback by definition (RFC 6761), refused as
        // their addresses would be, without a lookup.
        if host == "localhost" || host.ends_with(".localhost") {
            self.check_addr(IpAddr::V4(Ipv4Addr::LOCALHOST))
                .map_err(|_| format!("webhook host {host} is loopback: not allowed unless [webhooks] allow_private lists 127.0.0.1"))?;
        }
        let receiver = format!("{}://{}:{port}", parsed.scheme(), host);
        Ok(Target {
            url: parsed,
            host,
            port,
            literal,
            receiver,
        })
    }

    /// Whether a delivery may connect to `ip`: a public address, or one
    /// inside `allow_private`. An IPv4-mapped IPv6 address is judged as
    /// the IPv4 address it carries.
    pub fn check_addr(&self, ip: IpAddr) -> Result<(), String> {
        let ip = canonical(ip);
        if self.allow_private.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        match not_public(ip) {
            None => Ok(()),
            Some(why) => Err(format!(
                "webhook address {ip} is {why}: not allowed unless [webhooks] allow_private lists it"
            )),
        }
    }

    /// The addresses of a resolution a connection may use (at delivery:
    /// the others are dropped, so a rebinding reaches none of them).
    pub fn filter(&self, addrs: impl IntoIterator<Item = IpAddr>) -> Vec<IpAddr> {
        addrs
            .into_iter()
            .filter(|a| self.check_addr(*a).is_ok())
            .collect()
    }
}

/// An IPv4-mapped (`::ffff:a.b.c.d`) address as its IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Why `ip` is not a public unicast address, if it is not.
fn not_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) => not_public_v4(a),
        IpAddr::V6(a) => not_public_v6(a),
    }
}

fn not_public_v4(a: Ipv4Addr) -> Option<&'static str> {
    let [o0, o1, o2, _] = a.octets();
    Some(match () {
        _ if a.is_unspecified() || o0 == 0 => "unspecified (0.0.0.0/8)",
        _ if a.is_loopback() => "loopback",
        _ if a.is_private() => "private",
        _ if a.is_link_local() => "link-local (cloud metadata lives there)",
        _ if o0 == 100 && (o1 & 0xc0) == 64 => "shared address space (CGNAT, 100.64.0.0/10)",
        _ if o0 == 192 && o1 == 0 && o2 == 0 => "IETF protocol assignments (192.0.0.0/24)",
        _ if o0 == 192 && o1 == 0 && o2 == 2 => "documentation",
        _ if o0 == 198 && o1 == 51 && o2 == 100 => "documentation",
        _ if o0 == 203 && o1 == 0 && o2 == 113 => "documentation",
        _ if o0 == 198 && (o1 & 0xfe) == 18 => "benchmarking (198.18.0.0/15)",
        _ if a.is_multicast() => "multicast",
        _ if o0 >= 240 => "reserved (240.0.0.0/4, broadcast)",
        _ => return None,
    })
}

fn not_public_v6(a: Ipv6Addr) -> Option<&'static str> {
    let s = a.segments();
    Some(match () {
        _ if a.is_unspecified() => "unspecified",
        _ if a.is_loopback() => "loopback",
        _ if a.is_multicast() => "multicast",
        _ if (s[0] & 0xfe00) == 0xfc00 => "unique local (fc00::/7)",
        _ if (s[0] & 0xffc0) == 0xfe80 => "link-local (fe80::/10)",
        _ if (s[0] & 0xffc0) == 0xfec0 => "site-local (fec0::/10)",
        _ if s[0] == 0x2001 && s[1] == 0x0db8 => "documentation",
        // IPv4-compatible (deprecated), NAT64 and 6to4 carry an IPv4
        // address a gateway may reach: refused rather than decoded.
        _ if s[..6] == [0; 6] => "IPv4-compatible",
        _ if s[0] == 0x64 && s[1] == 0xff9b => "NAT64 (64:ff9b::/96)",
        _ if s[0] == 0x2002 => "6to4 (2002::/16)",
        _ if s[0] == 0x2001 && s[1] == 0 => "Teredo (2001::/32)",
        _ if s[0] == 0x100 && s[1..4] == [0; 3] => "discard-only (100::/64)",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_public_addresses_pass() {
        let p = Policy::default();
        for bad in [
            "127.0.0.1",
            "127.9.9.9",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "169.254.0.1",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.0.170",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.1.2.3",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "2001:db8::1",
        ] {
            assert!(p.check_addr(ip(bad)).is_err(), "{bad} passed");
        }
        for good in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.0",
            "172.32.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(p.check_addr(ip(good)).is_ok(), "{good} refused");
        }
    }

    #[test]
    fn allow_private_opens_exactly_its_networks() {
        let p = Policy::new(vec![], vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(p.check_addr(ip("127.0.0.1")).is_ok());
        assert!(p.check_addr(ip("::ffff:127.0.0.1")).is_ok());
        assert!(p.check_addr(ip("10.0.0.1")).is_err());
        assert!(p.check_addr(ip("169.254.169.254")).is_err());
        assert!(p.check_addr(ip("::1")).is_err());
    }

    #[test]
    fn urls_must_be_https_unless_allowed() {
        let p = Policy::new(vec!["hooks.internal".into()], vec![]);
        let t = p.check_url("https://Example.com/h?x=1").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.literal),
            ("example.com", 443, None)
        );
        assert_eq!(t.receiver, "https://example.com:443");
        assert!(p.check_url("http://example.com/h").is_err());
        assert!(p.check_url("http://hooks.internal:8080/h").is_ok());
        for bad in [
            "ftp://example.com/",
            "https://user:pw@example.com/",
            "https://example.com/#x",
            "not a url",
            "https://127.0.0.1/h",
            "https://[::1]:8443/h",
            "https://[::ffff:169.254.169.254]/",
            "https://169.254.169.254/latest/meta-data",
            "https://0x7f.1/",
            "https://2130706433/",
            "https://localhost:8443/",
            "https://a.localhost/",
        ] {
            assert!(p.check_url(bad).is_err(), "{bad} passed");
        }
        let only =
            Policy::default().only_hosts(vec!["hooks.example.com".into(), ".corp.example".into()]);
        assert!(only.check_url("https://hooks.example.com/").is_ok());
        assert!(only.check_url("https://a.corp.example/").is_ok());
        assert!(only.check_url("https://example.com/").is_err());
        assert!(only.check_url("https://evilcorp.example/").is_err());
        let long = format!("https://example.com/{}", "a".repeat(3000));
        assert!(p.check_url(&long).is_err());
    }

    #[test]
    fn resolutions_are_checked_address_by_address() {
        let p = Policy::default();
        // At connection the bad ones are dropped (a rebinding to metadata).
        assert_eq!(
            p.filter([ip("169.254.169.254"), ip("1.1.1.1"), ip("::1")]),
            vec![ip("1.1.1.1")]
        );
        assert!(p.filter([ip("127.0.0.1")]).is_empty());
    }
}
