//! The HTTP client of the CLI: the management API over HTTPS, errors turned
//! into one readable line.

use super::Profile;
use crate::api::types::{ErrorBody, FunctionView, PullLine};
use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::{Response, StatusCode};
use serde::{de::DeserializeOwned, Serialize};
use std::time::Duration;

pub struct Client {
    http: reqwest::Client,
    endpoint: String,
    key: Option<String>,
    /// The CA file in force, named by the hint of a certificate error.
    ca: Option<std::path::PathBuf>,
}

impl Client {
    pub fn new(p: &Profile) -> anyhow::Result<Client> {
        let endpoint = p.endpoint.clone().ok_or_else(|| {
            anyhow!("no endpoint: use --endpoint, HYPERFUNC_ENDPOINT or a profile, or run on the host of `hyperfuncd serve`")
        })?;
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("hyperfuncd-cli/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &p.ca {
            let pem = std::fs::read(ca)
                .with_context(|| format!("cannot read CA file {}", ca.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("invalid CA file {}", ca.display()))?;
            builder = builder.add_root_certificate(cert);
        }
        Ok(Client {
            http: builder.build().context("cannot set up the HTTP client")?,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            key: p.key.clone(),
            ca: p.ca.clone(),
        })
    }

    /// The HTTPS client itself (trusting the profile's CA, keeping
    /// connections alive), for capability URLs: they take no key, and their
    /// callers read the status themselves.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self
            .http
            .request(method, format!("{}{}", self.endpoint, path));
        if let Some(k) = &self.key {
            r = r.bearer_auth(k);
        }
        r
    }

    async fn send(&self, r: reqwest::RequestBuilder) -> anyhow::Result<Response> {
        let resp = r
            .send()
            .await
            .map_err(|e| unreachable_error(&self.endpoint, self.ca.as_deref(), &e))?;
        check(resp).await
    }

    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        json(self.send(self.request(reqwest::Method::GET, path)).await?).await
    }

    pub async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        json(
            self.send(self.request(reqwest::Method::POST, path).json(body))
                .await?,
        )
        .await
    }

    pub async fn put_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        json(
            self.send(self.request(reqwest::Method::PUT, path).json(body))
                .await?,
        )
        .await
    }

    pub async fn patch_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        json(
            self.send(self.request(reqwest::Method::PATCH, path).json(body))
                .await?,
        )
        .await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.send(self.request(reqwest::Method::DELETE, path))
            .await?;
        Ok(())
    }

    /// A call request, under an idempotency key if one is given.
    pub async fn post_call(
        &self,
        path: &str,
        body: Vec<u8>,
        key: Option<&crate::model::IdempotencyKey>,
    ) -> anyhow::Result<Response> {
        let mut req = self.request(reqwest::Method::POST, path).body(body);
        if let Some(k) = key {
            req = req.header(crate::api::IDEMPOTENCY_KEY_HEADER, k.as_str());
        }
        self.send(req).await
    }

    /// A call's STDOUT; with `wait`, long-polls until the call has ended.
    /// On a terminal the wait shows a spinner with the call's state: the
    /// first poll answers at once, later ones hold at most two seconds
    /// (`wait=1` would mean the server's longest), so the state stays current.
    pub async fn output(&self, call_id: &str, wait: bool) -> anyhow::Result<Bytes> {
        let progress = wait.then(|| super::progress::Waiting::start(call_id));
        let mut poll = match &progress {
            Some(p) if p.shown() => "?wait=0",
            Some(_) => "?wait=60",
            None => "",
        };
        loop {
            let path = format!("/v1/calls/{call_id}/output{poll}");
            let resp = self.send(self.request(reqwest::Method::GET, &path)).await?;
            match (resp.status(), &progress) {
                (StatusCode::CREATED, Some(p)) => p.state("RUNNING"),
                (StatusCode::ACCEPTED, Some(p)) => p.state("PENDING"),
                (StatusCode::CREATED, None) => {
                    bail!("call {call_id} is still running (use --wait)")
                }
                (StatusCode::ACCEPTED, None) => {
                    bail!("call {call_id} is still pending (use --wait)")
                }
                _ => return output_bytes(resp).await,
            }
            if poll == "?wait=0" {
                poll = "?wait=2";
            }
        }
    }

    /// `func create` / `func update`: sends `body` with `method` to `path`
    /// and returns the function. With `on_pull`, asks for the pull's progress
    /// (`Accept: application/x-ndjson`) and hands it each line before the
    /// last; a server that needs no pull (or predates the stream) answers
    /// the plain JSON, which is read as without.
    pub async fn put_function<B: Serialize>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &B,
        on_pull: Option<&mut dyn FnMut(&PullLine)>,
    ) -> anyhow::Result<FunctionView> {
        let mut r = self.request(method, path).json(body);
        let Some(on_pull) = on_pull else {
            return json(self.send(r).await?).await;
        };
        r = r.header(reqwest::header::ACCEPT, "application/x-ndjson");
        let resp = self.send(r).await?;
        let ndjson = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-ndjson"));
        if !ndjson {
            return json(resp).await;
        }
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| anyhow!("connection lost: {}", error_chain(&e)))?;
            buf.extend_from_slice(&chunk);
            while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                let raw: Vec<u8> = buf.drain(..=pos).collect();
                let line: PullLine =
                    serde_json::from_slice(&raw).context("unexpected answer from the server")?;
                if let Some(f) = line.function {
                    return Ok(f);
                }
                if let Some(e) = line.error {
                    bail!(e.message);
                }
                on_pull(&line);
            }
        }
        bail!("the server ended its answer before the function was saved")
    }

    /// Reads a line-oriented body as it arrives; returns the answer's
    /// headers once it has ended.
    pub async fn stream_lines(
        &self,
        path: &str,
        mut on_line: impl FnMut(&str) -> anyhow::Result<()>,
    ) -> anyhow::Result<reqwest::header::HeaderMap> {
        let resp = self.send(self.request(reqwest::Method::GET, path)).await?;
        let headers = resp.headers().clone();
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| anyhow!("connection lost: {}", error_chain(&e)))?;
            buf.extend_from_slice(&chunk);
            while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                on_line(String::from_utf8_lossy(&line[..line.len() - 1]).trim_end())?;
            }
        }
        Ok(headers)
    }
}

/// The body of a 200 output answer (other statuses were turned into errors by `check`).
pub async fn output_bytes(resp: Response) -> anyhow::Result<Bytes> {
    match resp.status() {
        StatusCode::OK => Ok(resp.bytes().await?),
        s => bail!("unexpected answer {s} from the server"),
    }
}

pub async fn json<T: DeserializeOwned>(resp: Response) -> anyhow::Result<T> {
    let bytes = resp.bytes().await?;
    serde_json::from_slice(&bytes).context("unexpected answer from the server")
}

/// Turns an error status into one line: the server's message.
async fn check(resp: Response) -> anyhow::Result<Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp.bytes().await.unwrap_or_default();
    match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(e) if e.error.code == "call_failed" => {
            let detail: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let id = detail["CallId"].as_str().unwrap_or("");
            let stderr = detail["ShortStderr"].as_str().unwrap_or("").trim();
            let mut msg = format!("call {id} failed: {}", e.error.message);
            if !stderr.is_empty() {
                msg.push_str(&format!(" (stderr: {})", stderr.replace('\n', " ")));
            }
            Err(anyhow!(msg))
        }
        Ok(e) => Err(anyhow!(e.error.message)),
        Err(_) => Err(anyhow!("server answered {status}")),
    }
}

/// "cannot reach": the cause, and what to do about the two usual ones.
fn unreachable_error(
    endpoint: &str,
    ca: Option<&std::path::Path>,
    e: &reqwest::Error,
) -> anyhow::Error {
    let chain = error_chain(e);
    anyhow!("cannot reach {endpoint}: {chain}{}", hint(&chain, ca))
}

fn hint(chain: &str, ca: Option<&std::path::Path>) -> String {
    let lower = chain.to_ascii_lowercase();
    if lower.contains("connection refused") {
        "; is `hyperfuncd serve` running there?".into()
    } else if lower.contains("certificate") || lower.contains("unknownissuer") {
        match ca {
            Some(ca) => format!(
                "; the CA certificate in use ({}, from --ca, HYPERFUNC_CA or the profile's `ca`) does not certify this server: pass the right one with --ca FILE",
                ca.display()
            ),
            None => "; pass the server's CA certificate with --ca FILE (or HYPERFUNC_CA, or `ca` in the profile), e.g. DATA_DIR/tls/cert.pem of a self-signed server".into(),
        }
    } else {
        String::new()
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::hint;

    #[test]
    fn hints_say_what_to_do() {
        assert!(hint(
            "client error (Connect): tcp connect error: Connection refused (os error 111)",
            None
        )
        .contains("hyperfuncd serve"));
        let h = hint("invalid peer certificate: UnknownIssuer", None);
        assert!(h.contains("--ca") && h.contains("profile"), "{h}");
        let h = hint(
            "invalid peer certificate: UnknownIssuer",
            Some(std::path::Path::new("/x/ca.pem")),
        );
        assert!(h.contains("/x/ca.pem") && h.contains("--ca"), "{h}");
        assert_eq!(hint("dns error: failed to lookup address", None), "");
    }
}
