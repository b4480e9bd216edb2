//! The endpoints: request and response shapes and what each computes. Embedding endpoints go
//! through the batching queue; Q-Former endpoints run whole on the model thread.

use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::batcher::{Queue, Work};
use super::error::ApiError;
use super::input::{
    blocking, check_count, check_texts, decode_images, is_image_uri, prepare_images, prepare_texts,
    ApiJson,
};
use super::limits::Limits;
use super::metrics::Metrics;
use crate::data::image::ImageProcessor;
use crate::data::text::TextTokenizer;
use crate::infer::Pipeline;

/// What the handlers know of the loaded model.
pub struct Loaded {
    /// `"clip"` or `"qformer"`.
    pub kind: &'static str,
    pub model: String,
    /// Shared, never cloned per request (the CLIP BPE's tables are megabytes).
    pub tokenizer: Option<Arc<TextTokenizer>>,
    pub processor: Option<Arc<ImageProcessor>>,
    /// Embedding width (CLIP) or ITC width (Q-Former).
    pub dim: usize,
    /// exp(logit_scale) of a CLIP, for zero-shot logits.
    pub logit_scale: f32,
    pub queue: Queue,
    /// The image-search index, when `--index` was given.
    pub index: Option<Arc<crate::infer::index::Index>>,
}

/// Shared by every handler.
pub struct AppState {
    pub loaded: OnceLock<Arc<Loaded>>,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
}

pub type Shared = Arc<AppState>;

impl AppState {
    pub(super) fn model(&self) -> Result<Arc<Loaded>, ApiError> {
        self.loaded
            .get()
            .cloned()
            .ok_or_else(|| ApiError::unavailable("the model is still loading"))
    }
}

impl Loaded {
    fn clip(&self, what: &str) -> Result<(), ApiError> {
        match self.kind {
            "clip" => Ok(()),
            _ => Err(ApiError::unsupported(what, "BLIP-2 Q-Former")),
        }
    }

    fn qformer(&self, what: &str) -> Result<(), ApiError> {
        match self.kind {
            "qformer" => Ok(()),
            _ => Err(ApiError::unsupported(what, "CLIP")),
        }
    }

    fn tokenizer(&self) -> Result<Arc<TextTokenizer>, ApiError> {
        self.tokenizer
            .clone()
            .ok_or_else(|| ApiError::invalid("this model has no text tower"))
    }

    fn processor(&self) -> Result<Arc<ImageProcessor>, ApiError> {
        self.processor
            .clone()
            .ok_or_else(|| ApiError::invalid("this model has no image tower"))
    }

    /// Embeddings of texts (tokenised on the blocking pool, embedded through the queue), and
    /// their token count.
    pub(super) async fn embed_texts(
        &self,
        texts: Vec<String>,
        limits: &Limits,
    ) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
        if texts.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let (tok, limits) = (self.tokenizer()?, limits.clone());
        let (rows, tokens) = blocking(move || prepare_texts(&tok, &texts, &limits)).await?;
        Ok((self.queue.embed(Work::Texts(rows)).await?, tokens))
    }

    /// Embeddings of base64 images (decoded on the blocking pool, embedded through the queue).
    pub(super) async fn embed_images(
        &self,
        images: Vec<String>,
    ) -> Result<Vec<Vec<f32>>, ApiError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let processor = self.processor()?;
        let pixels = blocking(move || prepare_images(&processor, &images)).await?;
        self.queue.embed(Work::Images(pixels)).await
    }
}

/// `GET /health`: 200 once the model is loaded, 503 before.
pub async fn health(State(s): State<Shared>) -> impl IntoResponse {
    match s.loaded.get() {
        Some(_) => (StatusCode::OK, Json(json!({"status": "ok"}))),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        ),
    }
}

/// `GET /info`: the model's kind, widths and the server's limits.
pub async fn info(State(s): State<Shared>) -> Result<Json<Value>, ApiError> {
    let m = s.model()?;
    let endpoints: &[&str] = match m.kind {
        "clip" => &["/embed", "/v1/embeddings", "/zeroshot", "/rerank"],
        _ => &["/itm", "/caption", "/rerank"],
    };
    Ok(Json(json!({
        "kind": m.kind,
        "model": m.model,
        "dim": m.dim,
        "context_length": m.tokenizer.as_ref().map(|t| t.context()),
        "image_size": m.processor.as_ref().and_then(|p| p.output_size()).map(|(h, _)| h),
        "endpoints": endpoints,
        "limits": s.limits,
        "version": env!("CARGO_PKG_VERSION"),
    })))
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedRequest {
    #[serde(default)]
    texts: Vec<String>,
    #[serde(default)]
    images: Vec<String>,
}

/// `POST /embed`: `{"texts", "images"}` → `vlalign embed --json`'s shape (images without paths).
pub async fn embed(
    State(s): State<Shared>,
    ApiJson(r): ApiJson<EmbedRequest>,
) -> Result<Json<Value>, ApiError> {
    let m = s.model()?;
    m.clip("/embed")?;
    check_count(r.texts.len() + r.images.len(), "texts + images", &s.limits)?;
    let texts = r.texts.clone();
    // Both kinds queued at once: the model thread can take them in one batch.
    let (t, i) = tokio::join!(m.embed_texts(r.texts, &s.limits), m.embed_images(r.images));
    let ((t, _), i) = (t?, i?);
    Ok(Json(json!({
        "images": i.iter().map(|e| json!({"embedding": e})).collect::<Vec<_>>(),
        "texts": texts.iter().zip(&t).map(|(x, e)| json!({"text": x, "embedding": e})).collect::<Vec<_>>(),
    })))
}

/// `input` of the OpenAI embeddings API: one string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
pub struct OpenAiRequest {
    input: OneOrMany,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    encoding_format: Option<String>,
}

/// `POST /v1/embeddings`, OpenAI-compatible; an input that is a `data:image/...` URI is embedded
/// as an image.
pub async fn openai_embeddings(
    State(s): State<Shared>,
    ApiJson(r): ApiJson<OpenAiRequest>,
) -> Result<Json<Value>, ApiError> {
    let m = s.model()?;
    m.clip("/v1/embeddings")?;
    if let Some(f) = r.encoding_format.as_deref().filter(|f| *f != "float") {
        return Err(ApiError::invalid(format!(
            "encoding_format {f:?}: only \"float\" is served"
        )));
    }
    let inputs = match r.input {
        OneOrMany::One(x) => vec![x],
        OneOrMany::Many(v) => v,
    };
    check_count(inputs.len(), "input", &s.limits)?;
    let (mut texts, mut images) = (Vec::new(), Vec::new());
    for (i, x) in inputs.iter().enumerate() {
        if is_image_uri(x) {
            images.push((i, x.clone()));
        } else {
            texts.push((i, x.clone()));
        }
    }
    let (t, im) = tokio::join!(
        m.embed_texts(texts.iter().map(|(_, x)| x.clone()).collect(), &s.limits),
        m.embed_images(images.iter().map(|(_, x)| x.clone()).collect())
    );
    let ((t, tokens), im) = (t?, im?);
    let mut rows: Vec<(usize, Vec<f32>)> = texts
        .iter()
        .map(|(i, _)| *i)
        .zip(t)
        .chain(images.iter().map(|(i, _)| *i).zip(im))
        .collect();
    rows.sort_by_key(|(i, _)| *i);
    Ok(Json(json!({
        "object": "list",
        "data": rows.iter().map(|(i, e)| json!({"object": "embedding", "index": i, "embedding": e})).collect::<Vec<_>>(),
        "model": r.model.unwrap_or_else(|| m.model.clone()),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })))
}

/// A template: one string with `{}`, or several (their class embeddings are averaged).
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Templates {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZeroshotRequest {
    image: String,
    labels: Vec<String>,
    #[serde(default)]
    template: Option<Templates>,
}

/// `POST /zeroshot`: CLIP §3.1.4 over the given labels, most probable first.
pub async fn zeroshot(
    State(s): State<Shared>,
    ApiJson(r): ApiJson<ZeroshotRequest>,
) -> Result<Json<Value>, ApiError> {
    let m = s.model()?;
    m.clip("/zeroshot")?;
    check_count(r.labels.len(), "labels", &s.limits)?;
    check_texts(&r.labels, &s.limits)?;
    let templates = match r.template {
        None => vec!["a photo of a {}.".to_string()],
        Some(Templates::One(t)) => vec![t],
        Some(Templates::Many(v)) => v,
    };
    if templates.is_empty() || templates.iter().any(|t| !t.contains("{}")) {
        return Err(ApiError::invalid(
            "every template needs a {} where the label goes",
        ));
    }
    check_count(
        r.labels.len() * templates.len(),
        "labels × templates",
        &s.limits,
    )?;
    let prompts: Vec<String> = r
        .labels
        .iter()
        .flat_map(|l| templates.iter().map(move |t| t.replace("{}", l)))
        .collect();
    let (t, _) = m.embed_texts(prompts, &s.limits).await?;
    let img = m.embed_images(vec![r.image]).await?;
    let preds = crate::infer::zeroshot::rank_rows(&img[0], &t, templates.len(), m.logit_scale)
        .map_err(ApiError::from)?;
    Ok(Json(json!({
        "templates": templates,
        "predictions": preds.iter().map(|p| json!({"label": r.labels[p.0], "prob": p.1, "logit": p.2})).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RerankRequest {
    query: String,
    images: Vec<String>,
}

/// `POST /rerank`: the images ordered by how well they match the query — CLIP cosine, or the
/// Q-Former's ITM probability — as `[{"index", "score"}]`, best first.
pub async fn rerank(
    State(s): State<Shared>,
    ApiJson(r): ApiJson<RerankRequest>,
) -> Result<Json<Value>, ApiError> {
    let m = s.model()?;
    check_count(r.images.len(), "images", &s.limits)?;
    check_texts(std::slice::from_ref(&r.query), &s.limits)?;
    let scores: Vec<f32> = if m.kind == "clip" {
        let (q, _) = m.embed_texts(vec![r.query], &s.limits).await?;
        let im = m.embed_images(r.images).await?;
        im.iter()
            .map(|e| e.iter().zip(&q[0]).map(|(a, b)| a * b).sum())
            .collect()
    } else {
        let images = blocking(move || decode_images(&r.images, 0)).await?;
        let query = r.query;
        m.queue
            .run(move |p| {
                let Pipeline::Qformer(p) = p else {
                    return Err(ApiError::backend("not a Q-Former"));
                };
                let emb = p.image_embeds(&images)?;
                let texts = vec![query; images.len()];
                Ok(p.itm_probs(&emb, &texts)?)
            })
            .await?
    };
    let order = crate::infer::rank::topk(&scores, scores.len());
    Ok(Json(json!(order
        .iter()
        .map(|&i| json!({"index": i, "score": scores[i]}))
        .collect::<Vec<_>>())))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItmRequest {
    image: String,
    texts: Vec<String>,
}

/// `POST /itm` (Q-Former): ITM match probability and ITC score of the image against each text,
/// as `vlalign itm --json`.
pub async fn itm(
    State(s): State<Shared>,
    ApiJson(r): ApiJson<ItmRequest>,
) -> Result<Json<Value>, ApiError> {
    let m = s.model()?;
    m.qformer("/itm")?;
    check_count(r.texts.len(), "texts", &s.limits)?;
    check_texts(&r.texts, &s.limits)?;
    let images = blocking(move || decode_images(&[r.image], 0)).await?;
    let texts = r.texts.clone();
    let (itm, itc) = m
        .queue
        .run(move |p| {
            let Pipeline::Qformer(p) = p else {
                return Err(ApiError::backend("not a Q-Former"));
            };
            let emb = p.image_embeds(&images)?;
            let itc = p.itc_scores(&p.itc_image(&emb)?, &p.itc_text(&texts)?)?;
            let itc: Vec<f32> = itc
                .squeeze(0)
                .and_then(|t| t.to_vec1())
                .map_err(crate::error::Error::from)?;
            let rows = emb
                .repeat((texts.len(), 1, 1))
                .map_err(crate::error::Error::from)?;
            Ok((p.itm_probs(&rows, &texts)?, itc))
        })
        .await?;
    Ok(Json(json!({
        "results": r.texts.iter().zip(itm.iter().zip(&itc)).map(|(t, (a, c))| json!({"text": t, "itm": a, "itc": c})).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptionRequest {
    image: String,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    max_new_tokens: Option<usize>,
    #[serde(default)]
    beams: Option<usize>,
}

/// `POST /caption` (Q-Former ITG): greedy, or beam search with `beams`.
pub async fn caption(
    State(s): State<Shared>,
    ApiJson(r): ApiJson<CaptionRequest>,
) -> Result<Json<Value>, ApiError> {
    let m = s.model()?;
    m.qformer("/caption")?;
    if r.prompt.is_some() {
        return Err(ApiError::invalid(
            "prompt: a Q-Former's ITG head captions without a prompt (prompts need a BLIP-2 LM)",
        ));
    }
    let (beams, max_new) = (r.beams.unwrap_or(1), r.max_new_tokens.unwrap_or(30));
    if beams == 0 || beams > s.limits.max_beams {
        return Err(ApiError::invalid(format!(
            "beams ({beams}) must be between 1 and {}",
            s.limits.max_beams
        )));
    }
    if max_new == 0 || max_new > s.limits.max_new_tokens {
        return Err(ApiError::invalid(format!(
            "max_new_tokens ({max_new}) must be between 1 and {}",
            s.limits.max_new_tokens
        )));
    }
    let images = blocking(move || decode_images(&[r.image], 0)).await?;
    let cap = m
        .queue
        .run(move |p| {
            let Pipeline::Qformer(p) = p else {
                return Err(ApiError::backend("not a Q-Former"));
            };
            let mut caps = p.caption(&p.image_embeds(&images)?, beams, max_new)?;
            caps.pop()
                .ok_or_else(|| ApiError::backend("no caption was produced"))
        })
        .await?;
    Ok(Json(json!({"caption": cap.text, "score": cap.score})))
}

/// Any other path: a JSON 404.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no endpoint at {}", uri.path()),
    )
}
