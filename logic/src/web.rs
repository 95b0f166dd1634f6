//! The browser chat client, served by the HTTP role at `/`: its files (`web/` at the
//! repository root: plain ES modules and CSS, no build step) are embedded in the binary and
//! served with their content type, `Cache-Control: no-cache` and a strict
//! `Content-Security-Policy` (scripts from this origin only; sockets to any `ws:`/`wss:` origin,
//! since the gateway listens on another port; images by URL for media messages).

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

/// The policy sent with every file: nothing inline, nothing from elsewhere but media images
/// and the gateway's socket.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self' ws: wss:; \
                   img-src 'self' http: https: data: blob:; media-src 'self' blob:; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

/// The embedded files: (path, content type, bytes).
const FILES: &[(&str, &str, &[u8])] = &[
    ("/", "text/html; charset=utf-8", include_bytes!("../../web/index.html")),
    ("/app.css", "text/css; charset=utf-8", include_bytes!("../../web/app.css")),
    ("/client.js", "text/javascript; charset=utf-8", include_bytes!("../../web/client.js")),
    ("/store.js", "text/javascript; charset=utf-8", include_bytes!("../../web/store.js")),
    ("/views.js", "text/javascript; charset=utf-8", include_bytes!("../../web/views.js")),
    ("/call.js", "text/javascript; charset=utf-8", include_bytes!("../../web/call.js")),
    ("/app.js", "text/javascript; charset=utf-8", include_bytes!("../../web/app.js")),
];

/// Routes serving the client's files (merged into the client router by `http`).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    FILES.iter().fold(Router::new(), |r, &(path, mime, bytes)| {
        r.route(
            path,
            get(move || async move {
                (
                    [
                        (header::CONTENT_TYPE, mime),
                        (header::CACHE_CONTROL, "no-cache"),
                        (header::CONTENT_SECURITY_POLICY, CSP),
                        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                        (header::REFERRER_POLICY, "no-referrer"),
                    ],
                    bytes,
                )
                    .into_response()
            }),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::FILES;

    #[test]
    fn every_file_is_embedded_and_index_links_only_local_files() {
        for (path, _, bytes) in FILES {
            assert!(!bytes.is_empty(), "{path} is empty");
        }
        let index = std::str::from_utf8(FILES[0].2).unwrap();
        for remote in ["src=\"http", "href=\"http", "src=\"//", "href=\"//"] {
            assert!(!index.contains(remote), "index.html must not load remote files ({remote})");
        }
    }
}
