//! The TLS material: the configured certificate and key, or a self-signed
//! certificate made at first start and renewed before it expires (its
//! expiry read from the DER), and the rustls acceptor (ring provider).

use super::*;

pub(super) struct Tls {
    pub(super) acceptor: tokio_rustls::TlsAcceptor,
    /// The PEM a client should trust: the self-signed certificate, or the configured chain.
    pub(super) ca: PathBuf,
}

pub(super) fn tls_acceptor(
    config: &Config,
    data_dir: &Path,
    public_host: &str,
    local: SocketAddr,
) -> anyhow::Result<Tls> {
    let (cert_path, key_path) = match (&config.tls.cert, &config.tls.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => {
            let dir = data_dir.join("tls");
            create_private_dir(&dir)?;
            let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
            let mut sans = vec![
                "localhost".to_string(),
                "127.0.0.1".to_string(),
                "::1".to_string(),
            ];
            sans.push(gethostname::gethostname().to_string_lossy().into_owned());
            sans.push(public_host.trim_matches(['[', ']']).to_string());
            if !local.ip().is_unspecified() {
                sans.push(local.ip().to_string());
            }
            sans.sort();
            sans.dedup();
            if !c.exists() || !k.exists() {
                self_signed(&c, &k, sans)?;
            } else {
                let left = not_after(&c)
                    .map(|t| Duration::from_secs(t).saturating_sub(unix_now()))
                    .unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "unreadable self-signed certificate; making a new one");
                        Duration::ZERO
                    });
                // Also longer than a fresh one: made by a version that
                // signed them until the year 4096.
                if left < RENEW_BEFORE || left > SELF_SIGNED_VALIDITY + Duration::from_secs(86_400)
                {
                    self_signed(&c, &k, sans)?;
                    tracing::info!(
                        cert = %c.display(),
                        days_left = left.as_secs() / 86_400,
                        valid_days = SELF_SIGNED_VALIDITY.as_secs() / 86_400,
                        "renewed the self-signed TLS certificate (same key)"
                    );
                }
            }
            (c, k)
        }
    };
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(&cert_path)
            .with_context(|| format!("cannot read {}", cert_path.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("invalid certificate PEM {}", cert_path.display()))?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(&key_path)
            .with_context(|| format!("cannot read {}", key_path.display()))?,
    ))
    .with_context(|| format!("invalid key PEM {}", key_path.display()))?
    .ok_or_else(|| anyhow!("no private key in {}", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("certificate and key do not match")?;
    // HTTP/1.1 only: over h2, answering 413 before an oversized body has been
    // read resets the stream and curl reports a framing error instead of the 413.
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Tls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        ca: cert_path,
    })
}

/// How long the self-signed certificate made at first start is valid.
pub(super) const SELF_SIGNED_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// A self-signed certificate with less left than this is renewed at start.
pub(super) const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Makes (or renews) the self-signed certificate `cert` for `sans`, signed
/// with the key in `key` if there is one (so clients pinning the key, or
/// trusting the old certificate as their CA, keep working), else a new key.
pub(super) fn self_signed(cert: &Path, key: &Path, sans: Vec<String>) -> anyhow::Result<()> {
    let key_pair = if key.exists() {
        let pem = std::fs::read_to_string(key)
            .with_context(|| format!("cannot read {}", key.display()))?;
        rcgen::KeyPair::from_pem(&pem)
            .map_err(|e| anyhow!("invalid key PEM {}: {e}", key.display()))?
    } else {
        let made = rcgen::KeyPair::generate().map_err(|e| anyhow!("cannot make a TLS key: {e}"))?;
        write_private(key, made.serialize_pem().as_bytes())?;
        made
    };
    let mut params = rcgen::CertificateParams::new(sans)
        .map_err(|e| anyhow!("cannot make a TLS certificate: {e}"))?;
    let now = unix_now();
    // A day back, for clients whose clock is a little behind.
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + now.saturating_sub(Duration::from_secs(24 * 3600));
    params.not_after = epoch + now + SELF_SIGNED_VALIDITY;
    // A fresh serial each time: browsers refuse two certificates with one
    // issuer and serial.
    let mut serial = *uuid::Uuid::new_v4().as_bytes();
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let made = params
        .self_signed(&key_pair)
        .map_err(|e| anyhow!("cannot make a TLS certificate: {e}"))?;
    write_private(cert, made.pem().as_bytes())
}

pub(super) fn unix_now() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// When the first certificate of the PEM file `path` expires (Unix seconds).
pub(super) fn not_after(path: &Path) -> anyhow::Result<u64> {
    let pem =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let first = rustls_pemfile::certs(&mut std::io::BufReader::new(pem))
        .next()
        .ok_or_else(|| anyhow!("no certificate in {}", path.display()))?
        .with_context(|| format!("invalid certificate PEM {}", path.display()))?;
    der_not_after(first.as_ref()).ok_or_else(|| {
        anyhow!(
            "cannot read the validity of the certificate in {}",
            path.display()
        )
    })
}

/// One DER element: its tag, its contents and what follows it.
pub(super) fn der_next(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |l, &d| (l << 8) | usize::from(d));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The notAfter of an X.509 certificate (RFC 5280 4.1), in Unix seconds.
pub(super) fn der_not_after(der: &[u8]) -> Option<u64> {
    const SEQUENCE: u8 = 0x30;
    let (SEQUENCE, cert, _) = der_next(der)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = der_next(cert)? else {
        return None;
    };
    let (mut tag, _, mut rest) = der_next(tbs)?;
    if tag == 0xa0 {
        // [0] version, then the serial number.
        (tag, _, rest) = der_next(rest)?;
    }
    if tag != 0x02 {
        return None;
    }
    let (_, _, rest) = der_next(rest)?; // signature algorithm
    let (_, _, rest) = der_next(rest)?; // issuer
    let (SEQUENCE, validity, _) = der_next(rest)? else {
        return None;
    };
    let (_, _, validity) = der_next(validity)?; // notBefore
    let (tag, time, _) = der_next(validity)?;
    let text = std::str::from_utf8(time).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        // UTCTime: two-digit years, 1950-2049.
        0x17 => {
            let yy: i64 = text.get(..2)?.parse().ok()?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, text.get(2..)?)
        }
        0x18 => (text.get(..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    let field = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let days = days_from_civil(year, field(0)?, field(2)?);
    let secs = days * 86_400 + field(4)? * 3600 + field(6)? * 60 + field(8)?;
    u64::try_from(secs).ok()
}

/// Days from 1970-01-01 to the given date (proleptic Gregorian; Howard
/// Hinnant's `days_from_civil`).
pub(super) fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Refuses a configured TLS key that its group or others can read: anyone
/// who can read it can impersonate the daemon and read every key sent to it.
pub(super) fn refuse_readable_key(key: &Path) -> anyhow::Result<()> {
    let mode = std::fs::metadata(key)
        .with_context(|| format!("cannot read {}", key.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(anyhow!(
            "the TLS key {} can be read by its group or by others (mode {:o}); \
             make it private with: chmod 600 {}",
            key.display(),
            mode & 0o777,
            key.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_from_civil_counts_from_the_epoch() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(4096, 1, 1), 776_506);
    }

    #[test]
    fn a_self_signed_certificate_is_valid_a_year_and_renewal_keeps_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        self_signed(&cert, &key, vec!["localhost".into()]).unwrap();
        let year = not_after(&cert).unwrap();
        let expected = (unix_now() + SELF_SIGNED_VALIDITY).as_secs();
        assert!(year.abs_diff(expected) < 60, "{year} vs {expected}");
        let first_key = std::fs::read(&key).unwrap();
        let first_cert = std::fs::read(&cert).unwrap();
        self_signed(&cert, &key, vec!["localhost".into()]).unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), first_key);
        assert_ne!(std::fs::read(&cert).unwrap(), first_cert);
        // rcgen's own default, GeneralizedTime past 2049.
        let kp = rcgen::KeyPair::generate().unwrap();
        let old = rcgen::CertificateParams::new(vec!["x".to_string()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        assert_eq!(
            der_not_after(old.der()),
            Some(776_506 * 86_400),
            "rcgen's default ends 4096-01-01"
        );
        assert_eq!(der_not_after(b"\x30\x03\x02\x01\x00"), None);
    }
}
