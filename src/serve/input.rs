//! Request bodies into model inputs, checked against the limits first: JSON (400 when it is not
//! JSON, 422 when it is the wrong shape), base64 images (bare or `data:image/...;base64,`),
//! decoded with the header checked before any pixel is allocated, then preprocessed; texts
//! bounded, tokenised and cut to the context (or refused). The decoding and tokenising run on
//! the blocking pool, never on the async runtime.

use std::path::Path;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use base64::Engine;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::limits::Limits;
use crate::data::image::{decode_rgb, ImageProcessor, RgbImage};
use crate::data::text::TextTokenizer;

/// A JSON body parsed into `T`, or the 4xx that says why not.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            let status = r.status();
            let kind = if status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                "payload_too_large"
            } else {
                "malformed_request"
            };
            ApiError::new(status, kind, r.body_text())
        })?;
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|e| {
            if e.is_data() {
                ApiError::invalid(format!("request body: {e}"))
            } else {
                ApiError::malformed(format!("request body is not JSON: {e}"))
            }
        })
    }
}

/// Whether `s` is a `data:image/...` URI (how `/v1/embeddings` tells images from texts).
pub fn is_image_uri(s: &str) -> bool {
    s.starts_with("data:image/")
}

/// The bytes of a base64 image, bare or as a `data:image/...;base64,` URI.
fn image_bytes(s: &str, what: &str) -> Result<Vec<u8>, ApiError> {
    let payload = match s.strip_prefix("data:") {
        Some(rest) => {
            let (media, data) = rest.split_once(',').ok_or_else(|| {
                ApiError::malformed(format!("{what}: a data URI needs a comma before its data"))
            })?;
            if !media.ends_with(";base64") {
                return Err(ApiError::malformed(format!(
                    "{what}: only base64 data URIs are taken (data:image/png;base64,...)"
                )));
            }
            data
        }
        None => s,
    };
    base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| ApiError::malformed(format!("{what}: not valid base64 ({e})")))
}

/// Decodes base64 images into RGB (the header's size checked before decoding).
pub fn decode_images(images: &[String], first: usize) -> Result<Vec<RgbImage>, ApiError> {
    images
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let what = format!("images[{}]", first + i);
            let bytes = image_bytes(s, &what)?;
            decode_rgb(&bytes, Path::new(&what)).map_err(ApiError::from)
        })
        .collect()
}

/// Decodes and preprocesses base64 images into model inputs (`3 · H · W` floats each).
pub fn prepare_images(
    processor: &ImageProcessor,
    images: &[String],
) -> Result<Vec<Vec<f32>>, ApiError> {
    decode_images(images, 0)?
        .iter()
        .enumerate()
        .map(|(i, img)| {
            processor
                .preprocess(img)
                .map(|(v, _)| v)
                .map_err(|m| ApiError::image(format!("images[{i}]: {m}")))
        })
        .collect()
}

/// Token rows (no padding) of `texts`, and their total number of tokens. Over-long texts are
/// cut to the context, or refused when `limits.truncate` is off.
pub fn prepare_texts(
    tokenizer: &TextTokenizer,
    texts: &[String],
    limits: &Limits,
) -> Result<(Vec<Vec<u32>>, usize), ApiError> {
    check_texts(texts, limits)?;
    let enc = tokenizer.encode(texts)?;
    if let (false, Some(i)) = (limits.truncate, enc.truncated.iter().position(|t| *t)) {
        return Err(ApiError::invalid(format!(
            "texts[{i}] is longer than the model's context of {} tokens (the server does not \
             truncate)",
            tokenizer.context()
        )));
    }
    let rows: Vec<Vec<u32>> = enc
        .batch
        .ids
        .into_iter()
        .zip(&enc.batch.mask)
        .map(|(ids, mask)| {
            let n = mask.iter().filter(|m| **m == 1).count();
            ids[..n].to_vec()
        })
        .collect();
    let tokens = rows.iter().map(Vec::len).sum();
    Ok((rows, tokens))
}

/// Texts are non-empty and within `max_text_chars`.
pub fn check_texts(texts: &[String], limits: &Limits) -> Result<(), ApiError> {
    for (i, t) in texts.iter().enumerate() {
        if t.trim().is_empty() {
            return Err(ApiError::invalid(format!("texts[{i}] is empty")));
        }
        let n = t.chars().count();
        if n > limits.max_text_chars {
            return Err(ApiError::invalid(format!(
                "texts[{i}] has {n} characters; at most {}",
                limits.max_text_chars
            )));
        }
    }
    Ok(())
}

/// At least one and at most `max_inputs` inputs.
pub fn check_count(n: usize, what: &str, limits: &Limits) -> Result<(), ApiError> {
    if n == 0 {
        return Err(ApiError::invalid(format!("{what}: nothing given")));
    }
    if n > limits.max_inputs {
        return Err(ApiError::invalid(format!(
            "{what}: {n} inputs; at most {} per request",
            limits.max_inputs
        )));
    }
    Ok(())
}

/// Runs `f` on the blocking pool (decoding, tokenising).
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(ApiError::backend(format!("a worker failed: {e}"))))
}
