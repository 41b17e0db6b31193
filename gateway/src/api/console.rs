//! The operator console: a single-page application served at `/`, its files
//! compiled into the binary (nothing to install, no network access at run
//! time).
//!
//! `GET /` is the page and `GET /console/{file}` its scripts and style
//! sheet. They need no token: the page asks for one and sends it with each
//! API call, which the API checks as any other. Every response carries a
//! strict Content-Security-Policy (scripts and styles from this origin only,
//! no inline script, API calls to this origin only) and a strong `ETag`
//! (a hash of the file's content): browsers revalidate (`no-cache`) and get
//! a `304` while the file is unchanged. These routes are not part of the API
//! and not in the OpenAPI document.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::error::ApiError;

/// The Content-Security-Policy of every console response.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// The path prefix of the console's files.
pub const ASSETS: &str = "/console";

/// One file of the console.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const FILES: &[Asset] = &[
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../../console/index.html"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../console/app.js"),
    },
    Asset {
        name: "api.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../console/api.js"),
    },
    Asset {
        name: "charts.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../console/charts.js"),
    },
    Asset {
        name: "console.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../console/console.css"),
    },
];

/// Each file's strong ETag: the first 128 bits of its SHA-256, in hex.
static ETAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    FILES
        .iter()
        .map(|f| {
            let digest = Sha256::digest(f.body);
            let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
            format!("\"{hex}\"")
        })
        .collect()
});

/// Whether `If-None-Match` names `etag` (or is `*`).
fn not_modified(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == etag || t == "*")
}

fn serve(name: &str, headers: &HeaderMap) -> Response {
    let Some(i) = FILES.iter().position(|f| f.name == name) else {
        return ApiError::from_status(StatusCode::NOT_FOUND).into_response();
    };
    let (file, etag) = (&FILES[i], &ETAGS[i]);
    let status = if not_modified(headers, etag) {
        StatusCode::NOT_MODIFIED
    } else {
        StatusCode::OK
    };
    let mut res = if status == StatusCode::OK {
        file.body.into_response()
    } else {
        status.into_response()
    };
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(file.content_type),
    );
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    res
}

/// `GET /`: the console's page.
pub async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

/// `GET /console/{file}`: one of its files (404 problem for any other name).
pub async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    serve(&file, &headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_differ_per_file_and_match_if_none_match() {
        let mut seen = std::collections::BTreeSet::new();
        for e in ETAGS.iter() {
            assert!(seen.insert(e.clone()), "two files share the ETag {e}");
        }
        let mut h = HeaderMap::new();
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_str(&format!("\"x\", W/{}", ETAGS[0])).expect("header"),
        );
        assert!(not_modified(&h, &ETAGS[0]));
        assert!(!not_modified(&h, &ETAGS[1]));
    }

    #[test]
    fn the_page_loads_no_inline_script_and_only_files_served_here() {
        let page = std::str::from_utf8(FILES[0].body).expect("utf-8");
        for tag in page.split("<script").skip(1) {
            let head = tag.split('>').next().unwrap_or_default();
            assert!(head.contains("src="), "an inline script: <script{head}>");
            assert!(
                tag.split('>')
                    .nth(1)
                    .is_some_and(|b| b.starts_with("</script")),
                "a script with a body"
            );
        }
        for attr in ["src=\"", "href=\""] {
            for r in page.split(attr).skip(1) {
                let url = r.split('"').next().unwrap_or_default();
                if url.starts_with('#') {
                    continue;
                }
                let name = url
                    .strip_prefix(&format!("{ASSETS}/"))
                    .unwrap_or_else(|| panic!("{url} is not a console file"));
                assert!(FILES.iter().any(|f| f.name == name), "{url} is not served");
            }
        }
        assert!(!page.contains("style=\""), "an inline style attribute");
    }
}
