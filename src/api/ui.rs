//! The web dashboard at `/ui/`: static files from `assets/ui/`, embedded in
//! the binary at build time, each answered with a strict
//! Content-Security-Policy. It owns nothing else: the pages talk only to the
//! `/v1` API with the user's bearer key, like the CLI, so this module must
//! never grow a route of its own that reads or changes platform state.
//!
//! `/ui/` is not part of the API, so it is not in `assets/openapi.yaml`.

use bytes::Bytes;
use warp::http::{header, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::Reply;

/// Same origin only, no inline script or style, no plugins, no framing, no
/// `<base>` or form posts elsewhere. `img-src data:` is for CSS icons. (The
/// "download output" link is a `blob:` URL: a navigation, which CSP leaves alone.)
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// (path under `/ui/`, content type, bytes). `""` is the page itself.
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "",
        "text/html; charset=utf-8",
        include_bytes!("../../assets/ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/ui/app.js"),
    ),
    (
        "api.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/ui/api.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/ui/style.css"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_bytes!("../../assets/ui/favicon.svg"),
    ),
];

/// The answer to `GET /`: a browser that opens the server's address lands
/// on the dashboard (a permanent redirect, as the address never changes).
pub fn to_dashboard() -> Response {
    let mut r = warp::http::Response::new(Bytes::new()).into_response();
    *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
    let h = r.headers_mut();
    h.insert(header::LOCATION, HeaderValue::from_static("/ui/"));
    for (name, value) in security_headers() {
        h.insert(name, HeaderValue::from_static(value));
    }
    r
}

/// The answer to `GET /ui/REST`: an embedded file, or a JSON 404.
pub fn serve(rest: &[&str]) -> Response {
    let path = match rest {
        [] | ["index.html"] => Some(""),
        [file] => Some(*file),
        _ => None,
    };
    let found = path.and_then(|path| FILES.iter().find(|(p, _, _)| *p == path));
    let (status, content_type, body): (_, &'static str, &'static [u8]) = match found {
        Some((_, content_type, body)) => (StatusCode::OK, content_type, body),
        // The same JSON error shape as every other refusal of the server.
        None => (
            StatusCode::NOT_FOUND,
            "application/json",
            br#"{"error":{"code":"not_found","message":"no such file in the dashboard"}}"#,
        ),
    };
    let mut r = warp::http::Response::new(Bytes::from_static(body)).into_response();
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    for (name, value) in security_headers() {
        h.insert(name, HeaderValue::from_static(value));
    }
    r
}

/// Headers on every `/ui/` answer, found or not.
fn security_headers() -> [(header::HeaderName, &'static str); 6] {
    [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        // The files change with the binary; revalidating costs little.
        (header::CACHE_CONTROL, "no-cache"),
        (
            header::HeaderName::from_static("cross-origin-opener-policy"),
            "same-origin",
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_is_served_with_the_policy() {
        for (path, content_type, _) in FILES {
            let rest: Vec<&str> = if path.is_empty() { vec![] } else { vec![path] };
            let r = serve(&rest);
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            assert_eq!(r.headers()[header::CONTENT_TYPE], *content_type);
            assert_eq!(r.headers()[header::CONTENT_SECURITY_POLICY], CSP);
        }
        assert_eq!(serve(&["index.html"]).status(), StatusCode::OK);
        for missing in [&["nope.js"][..], &["a", "app.js"]] {
            let r = serve(missing);
            assert_eq!(r.status(), StatusCode::NOT_FOUND);
            assert_eq!(r.headers()[header::CONTENT_SECURITY_POLICY], CSP);
        }
        let r = to_dashboard();
        assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(r.headers()[header::LOCATION], "/ui/");
    }

    /// The policy forbids inline code; a page that used some would break
    /// silently in the browser, so catch it here.
    #[test]
    fn no_inline_script_or_style() {
        let html = std::str::from_utf8(FILES[0].2).expect("utf-8");
        assert!(!html.contains("style="), "inline style attribute");
        assert!(!html.contains("<style"), "inline <style>");
        for tag in html.split("<script").skip(1) {
            let open = tag.split('>').next().unwrap_or_default();
            assert!(open.contains("src="), "inline <script>: {open}");
        }
        // An event-handler attribute: ` on` + letters + `=`.
        let lower = html.to_ascii_lowercase();
        for (i, _) in lower.match_indices(" on") {
            let name: String = lower[i + 3..]
                .chars()
                .take_while(char::is_ascii_alphabetic)
                .collect();
            let after = lower[i + 3 + name.len()..].trim_start();
            assert!(
                name.is_empty() || !after.starts_with('='),
                "inline handler on{name}"
            );
        }
        for (path, _, body) in FILES {
            let text = std::str::from_utf8(body).expect("utf-8");
            // SVG elements name their namespace; a name, not a request.
            let text = text.replace("http://www.w3.org/2000/svg", "");
            assert!(!text.contains("http://"), "{path} names another origin");
            assert!(!text.contains("https://"), "{path} names another origin");
            assert!(!text.contains("innerHTML"), "{path} builds HTML from text");
            assert!(!text.contains("eval("), "{path} evaluates code");
        }
        assert!(CSP.contains("frame-ancestors 'none'"));
        assert!(!CSP.contains("unsafe"));
    }
}
