//! Image search over the index `serve --index` loaded: `POST /search` (a text or an image
//! query, exact cosine top-k), `GET /images/{i}` (an indexed file, so the page can show it),
//! and `GET /` (the search page: one self-contained HTML file, no external assets).

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::Shared;
use super::error::ApiError;
use super::input::{check_texts, ApiJson};

/// The approximate search's default candidate list, and its bound.
pub const DEFAULT_EF: usize = 64;
const MAX_EF: usize = 10_000;

/// The search page (served as is).
const PAGE: &str = include_str!("search.html");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    top: Option<usize>,
    /// Scan every entry even when the index has an approximate graph.
    #[serde(default)]
    exact: bool,
    /// The approximate search's candidate list (default 64; at least `top`).
    #[serde(default)]
    ef: Option<usize>,
}

/// `POST /search` `{"query" | "image", "top"?, "exact"?, "ef"?}` → `{"results": [{"index", "path", "score"}]}`.
pub async fn search(
    State(s): State<Shared>,
    ApiJson(r): ApiJson<SearchRequest>,
) -> Result<Json<Value>, ApiError> {
    let m = s.model()?;
    let index = m.index.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unsupported",
            "no index loaded: start the server with --index INDEX",
        )
    })?;
    let top = r.top.unwrap_or(10);
    if top == 0 || top > s.limits.max_top {
        return Err(ApiError::invalid(format!(
            "top ({top}) must be between 1 and {}",
            s.limits.max_top
        )));
    }
    let q = match (r.query, r.image) {
        (Some(q), None) => {
            check_texts(std::slice::from_ref(&q), &s.limits)?;
            m.embed_texts(vec![q], &s.limits).await?.0
        }
        (None, Some(img)) => m.embed_images(vec![img]).await?,
        _ => return Err(ApiError::invalid("give exactly one of query and image")),
    };
    let ef = r.ef.unwrap_or(DEFAULT_EF);
    if ef == 0 || ef > MAX_EF {
        return Err(ApiError::invalid(format!(
            "ef ({ef}) must be between 1 and {MAX_EF}"
        )));
    }
    let hits = if r.exact {
        index.search_exact(&q[0], top)?
    } else {
        index.search(&q[0], top, ef)?
    };
    Ok(Json(json!({
        "results": hits.iter().map(|(i, score)| json!({
            "index": i,
            "path": index.paths[*i],
            "score": score,
        })).collect::<Vec<_>>(),
    })))
}

/// `GET /images/{i}`: the bytes of indexed image `i` (only indexed files are ever read).
pub async fn image(State(s): State<Shared>, Path(i): Path<String>) -> Response {
    let found = s.model().ok().and_then(|m| m.index.clone()).and_then(|ix| {
        i.parse::<usize>()
            .ok()
            .and_then(|i| ix.paths.get(i).cloned())
    });
    let Some(path) = found else {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no image {i}"))
            .into_response();
    };
    let mime = match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_lowercase)
        .as_deref()
    {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        _ => "application/octet-stream",
    };
    // The same bound as any image file vlalign reads.
    const MAX_FILE: u64 = 1 << 30;
    let read = match tokio::fs::metadata(&path).await {
        Ok(m) if m.is_file() && m.len() <= MAX_FILE => tokio::fs::read(&path).await,
        Ok(_) => Err(std::io::Error::other("not a regular file of at most 1 GiB")),
        Err(e) => Err(e),
    };
    match read {
        Ok(bytes) => ([(header::CONTENT_TYPE, mime)], bytes).into_response(),
        Err(e) => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("image {i} ({}) cannot be read: {e}", path.display()),
        )
        .into_response(),
    }
}

/// `GET /`: the search page.
pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}
