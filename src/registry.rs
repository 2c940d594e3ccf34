//! Registry credentials: which login a pull of an image uses (the owner's
//! own `registry login`, else the host's `[images] credentials_file`), and
//! reading that file (Docker's `config.json`). It never prints a password:
//! errors name the file and the entry, not its contents.

use crate::model::{normalize_registry, now_ms, RegistryLogin};
use base64::Engine as _;
use std::path::Path;

/// The parts of Docker's `config.json` read here; everything else in it
/// (credential helpers, proxies, ...) is left alone.
#[derive(serde::Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: std::collections::HashMap<String, DockerAuth>,
}

#[derive(serde::Deserialize)]
struct DockerAuth {
    /// base64 of `username:password`, as `docker login` writes it.
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// A `config.json` key (`https://index.docker.io/v1/`, `host:port`,
/// `https://host/`) as the registry host `ImageRef` names.
fn key_host(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    normalize_registry(k.split('/').next().unwrap_or(k))
}

/// The logins of a Docker `config.json`, by host. An entry without a
/// usable user and password (a credential helper's, an identity token) is
/// skipped; a file that is not such JSON is an error naming the file.
pub fn parse_config(text: &str, file: &Path) -> Result<Vec<RegistryLogin>, String> {
    let config: DockerConfig = serde_json::from_str(text).map_err(|e| {
        format!(
            "{}: not a Docker config.json (line {}, column {})",
            file.display(),
            e.line(),
            e.column()
        )
    })?;
    let mut logins = Vec::new();
    for (key, a) in config.auths {
        let pair = match (a.username, a.password, a.auth) {
            (Some(u), Some(p), _) => Some((u, p)),
            (_, _, Some(auth)) => base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| {
                    s.split_once(':')
                        .map(|(u, p)| (u.to_string(), p.to_string()))
                }),
            _ => None,
        };
        match pair {
            Some((username, password)) if !username.is_empty() => logins.push(RegistryLogin {
                host: key_host(&key),
                username,
                password,
                created_ms: 0,
            }),
            _ => tracing::warn!(
                file = %file.display(),
                entry = %key,
                "credentials_file: entry without a username and password; skipped"
            ),
        }
    }
    Ok(logins)
}

/// The host's login to `host` from `[images] credentials_file`, read now
/// (so an admin's `docker login` into it needs no restart).
pub async fn host_login(file: &Path, host: &str) -> Result<Option<RegistryLogin>, String> {
    let text = tokio::fs::read_to_string(file)
        .await
        .map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(parse_config(&text, file)?
        .into_iter()
        .find(|l| l.host == host))
}

/// Checks `[images] credentials_file` at start: readable, in the format,
/// and not readable by others (a warning: the admin chose where it is).
pub fn check_file(file: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    parse_config(&text, file)?;
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(file) {
        if m.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                file = %file.display(),
                "credentials_file can be read by other users than the daemon's: chmod 600 it"
            );
        }
    }
    Ok(())
}

/// A login as `registry login` takes it, checked before anything is asked.
pub fn new_login(host: &str, username: &str, password: &str) -> Result<RegistryLogin, String> {
    let host = crate::model::parse_registry_host(host)?;
    let printable = |s: &str| !s.chars().any(char::is_control);
    if username.is_empty() || username.len() > 255 || !printable(username) {
        return Err("the username must be 1 to 255 printable characters".into());
    }
    if password.is_empty() || password.len() > 4096 || !printable(password) {
        return Err("the password must be 1 to 4096 printable characters".into());
    }
    Ok(RegistryLogin {
        host,
        username: username.to_string(),
        password: password.to_string(),
        created_ms: now_ms(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_entries_by_host() {
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:s3:cret");
        let text = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{auth}"}},
                "Registry.Example.com:5000": {{"username": "ci", "password": "pw"}},
                "helper.example.com": {{}}
            }}, "credsStore": "desktop"}}"#
        );
        let mut logins = parse_config(&text, Path::new("c.json")).unwrap();
        logins.sort_by(|a, b| a.host.cmp(&b.host));
        let got: Vec<_> = logins
            .iter()
            .map(|l| (l.host.as_str(), l.username.as_str(), l.password.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("docker.io", "bob", "s3:cret"),
                ("registry.example.com:5000", "ci", "pw")
            ]
        );
        assert!(format!("{:?}", logins[0]).contains("<hidden>"));
        assert!(!format!("{:?}", logins[0]).contains("s3:cret"));
    }

    #[test]
    fn bad_file_names_itself_not_its_contents() {
        let e = parse_config("{\"auths\": secret", Path::new("/etc/x.json")).unwrap_err();
        assert!(
            e.starts_with("/etc/x.json: not a Docker config.json"),
            "{e}"
        );
        assert!(!e.contains("secret"));
    }

    #[test]
    fn login_input_checked() {
        assert!(new_login("https://r.example.com/", "u", "p").is_ok());
        assert_eq!(
            new_login("R.example.com:5000", "u", "p").unwrap().host,
            "r.example.com:5000"
        );
        assert!(new_login("r.example.com/path", "u", "p").is_err());
        assert!(new_login("r.example.com", "", "p").is_err());
        assert!(new_login("r.example.com", "u", "").is_err());
        assert!(new_login("r.example.com", "u", "a\nb").is_err());
    }
}
