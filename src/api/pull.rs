//! `POST /v1/functions` and `PATCH /v1/functions/{name}` answered with the
//! image pull's progress, for a client that asks with
//! `Accept: application/x-ndjson` (the CLI on a terminal).
//!
//! Everything that can fail before the pull (auth, input, 409, the image's
//! registry, ceilings, the runtime) and a request whose image is already on
//! the Engine answer as without the header: status and JSON. Only once the
//! service reports that the pull starts does the answer become 200 with one
//! JSON line per pull event and a last line carrying the status and the
//! function or error the plain request would have had. A client that goes
//! away ends the request as it would without the header (the work is dropped).

use super::types::{ErrorDetail, PullLine, PullProgressView, PullStart};
use super::{async_stream, json_response, saved_view, with_type, ApiError, ApiResult};
use crate::service::{PullEvent, PullProgress};
use crate::service::{Saved, Service, ServiceError};
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use warp::http::{HeaderMap, StatusCode};
use warp::Reply;

/// The media type of the streamed answer.
pub const NDJSON: &str = "application/x-ndjson";
/// Pull events buffered between the pull and the client; more are dropped.
const EVENTS: usize = 256;

/// Whether the request asks for the streamed answer.
pub fn wanted(headers: &HeaderMap) -> bool {
    headers
        .get_all(warp::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case(NDJSON))
        })
}

type Work = Pin<Box<dyn Future<Output = Result<Saved, ServiceError>> + Send>>;

/// Runs `work` (a create or update given the sender of its pull events) and
/// answers as the module says; `status` is the plain request's success status.
pub async fn answer<F, Fut>(svc: &Arc<Service>, status: StatusCode, work: F) -> ApiResult
where
    F: FnOnce(PullProgress) -> Fut,
    Fut: Future<Output = Result<Saved, ServiceError>> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel(EVENTS);
    let mut work: Work = Box::pin(work(tx));
    // Until the pull starts, the answer is the plain one.
    let first = tokio::select! {
        biased;
        e = rx.recv() => e,
        r = &mut work => {
            let saved = r?;
            return Ok(json_response(status, &saved_view(svc, &saved).await?));
        }
    };
    let mut head = Vec::new();
    if let Some(e) = first {
        push(&mut head, &line(e));
    }
    let svc = Arc::clone(svc);
    let stream = async_stream(move |out| async move {
        if out.send(Bytes::from(head)).await.is_err() {
            return;
        }
        let result = loop {
            tokio::select! {
                biased;
                Some(e) = rx.recv() => {
                    let mut b = Vec::new();
                    push(&mut b, &line(e));
                    // A client gone away drops `work`: the request ends.
                    if out.send(Bytes::from(b)).await.is_err() {
                        return;
                    }
                }
                r = &mut work => break r,
            }
        };
        let mut tail = Vec::new();
        while let Ok(e) = rx.try_recv() {
            push(&mut tail, &line(e));
        }
        let last = match result {
            Ok(saved) => match saved_view(&svc, &saved).await {
                Ok(v) => PullLine {
                    status: Some(status.as_u16()),
                    function: Some(v),
                    ..Default::default()
                },
                Err(e) => error_line(e),
            },
            Err(e) => error_line(ApiError::from(e)),
        };
        push(&mut tail, &last);
        let _ = out.send(Bytes::from(tail)).await;
    });
    Ok(with_type(
        warp::reply::stream(stream).into_response(),
        NDJSON,
    ))
}

fn line(e: PullEvent) -> PullLine {
    match e {
        PullEvent::Started { image } => PullLine {
            pull: Some(PullStart { image }),
            ..Default::default()
        },
        PullEvent::Layer {
            id,
            status,
            current,
            total,
        } => PullLine {
            progress: Some(PullProgressView {
                id,
                status: status.to_string(),
                current,
                total,
            }),
            ..Default::default()
        },
    }
}

fn error_line(e: ApiError) -> PullLine {
    PullLine {
        status: Some(e.status.as_u16()),
        error: Some(ErrorDetail {
            code: e.code.to_string(),
            message: e.message,
        }),
        ..Default::default()
    }
}

fn push(out: &mut Vec<u8>, l: &PullLine) {
    // A struct of strings and numbers serializes.
    if let Ok(mut b) = serde_json::to_vec(l) {
        b.push(b'\n');
        out.extend(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_is_matched_as_a_media_type() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                warp::http::header::ACCEPT,
                warp::http::HeaderValue::from_str(v).expect("value"),
            );
            wanted(&h)
        };
        assert!(with("application/x-ndjson"));
        assert!(with("application/json, Application/X-NDJSON;q=0.9"));
        assert!(!with("application/json"));
        assert!(!with("*/*"));
        assert!(!wanted(&HeaderMap::new()));
    }
}
