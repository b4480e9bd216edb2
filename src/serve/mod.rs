//! `vlalign serve`: an HTTP API over one model directory (DESIGN.md §2: axum + tokio, the
//! design of HF text-embeddings-inference). The router ([`router`]) maps endpoints to
//! handlers (`api`); inputs are checked and prepared on the blocking pool (`input`), embedded by
//! one model thread that forms batches across requests (`batcher`); every answer is JSON, every
//! bad input a 4xx (`error`), bounded by `limits`; `metrics` counts it all.

pub mod api;
pub mod batcher;
pub mod error;
pub mod input;
pub mod limits;
pub mod metrics;
pub mod search;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use candle_core::Device;

use crate::error::{Error, Result};
use crate::infer::Pipeline;
use api::{AppState, Loaded, Shared};
pub use limits::Limits;
use metrics::Metrics;

/// What `vlalign serve` was asked to serve.
pub struct ServeOptions {
    pub model: PathBuf,
    pub addr: SocketAddr,
    pub device: Device,
    pub limits: Limits,
    /// An image-search index (`vlalign index build`) for `/search` and the search page.
    pub index: Option<PathBuf>,
}

/// The app over `state`: every endpoint, the body limit, request metrics, the JSON 404.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/health", get(api::health))
        .route("/info", get(api::info))
        .route("/metrics", get(api::metrics))
        .route("/embed", post(api::embed))
        .route("/v1/embeddings", post(api::openai_embeddings))
        .route("/zeroshot", post(api::zeroshot))
        .route("/rerank", post(api::rerank))
        .route("/itm", post(api::itm))
        .route("/caption", post(api::caption))
        .route("/search", post(search::search))
        .route("/images/{i}", get(search::image))
        .route("/", get(search::page))
        .fallback(api::not_found)
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .with_state(state)
}

/// Counts each answer by endpoint (the route, or "other" for unknown paths) and status.
async fn count(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("other".to_string(), |p| p.as_str().to_string());
    let res = next.run(req).await;
    s.metrics.request(&endpoint, res.status().as_u16());
    res
}

/// Loads the model on its own thread and makes the handlers' view of it.
fn load(opts: &ServeOptions, s: &AppState) -> Result<Loaded> {
    let pipeline = Pipeline::load(&opts.model, &opts.device)?;
    let (kind, tokenizer, processor, dim, logit_scale) = match &pipeline {
        Pipeline::Clip(p) => (
            "clip",
            p.tokenizer.clone().map(Arc::new),
            p.processor.clone().map(Arc::new),
            p.model.config.projection_dim,
            p.model.logit_scale_exp()?,
        ),
        Pipeline::Qformer(p) => (
            "qformer",
            None,
            None,
            p.model.config().image_text_hidden_size,
            1.0,
        ),
        Pipeline::Blip2(_) => {
            return Err(Error::input(format!(
                "{}: `vlalign serve` runs CLIP and Q-Former (stage-1) directories; a BLIP-2 \
                 stage-2 directory generates text with `vlalign caption` / `vlalign ask`",
                opts.model.display()
            )))
        }
    };
    let index = match &opts.index {
        None => None,
        Some(dir) => {
            if kind != "clip" {
                return Err(Error::input(format!(
                    "--index {}: search needs a CLIP model",
                    dir.display()
                )));
            }
            let ix = crate::infer::index::Index::load(dir, &opts.device)?;
            if ix.dim() != dim {
                return Err(Error::input(format!(
                    "--index {} holds {}-wide embeddings (from {}); the model gives {dim}",
                    dir.display(),
                    ix.dim(),
                    ix.model.display()
                )));
            }
            if ix.model != opts.model {
                tracing::warn!(
                    "--index {} was built with {}; serving it with {}",
                    dir.display(),
                    ix.model.display(),
                    opts.model.display()
                );
            }
            Some(Arc::new(ix))
        }
    };
    Ok(Loaded {
        index,
        kind,
        model: opts.model.display().to_string(),
        tokenizer,
        processor,
        dim,
        logit_scale,
        queue: batcher::spawn(pipeline, &s.limits, s.metrics.clone()),
    })
}

/// Serves until SIGTERM or Ctrl-C, then lets in-flight requests finish. `ready` is called
/// with the bound address (port 0 picks a free one) before the model loads: `/health`
/// answers 503 until it has.
pub fn run(opts: ServeOptions, ready: impl FnOnce(SocketAddr)) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::input(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(async move {
        let state: Shared = Arc::new(AppState {
            loaded: OnceLock::new(),
            limits: opts.limits.clone(),
            metrics: Arc::new(Metrics::default()),
        });
        let listener = tokio::net::TcpListener::bind(opts.addr)
            .await
            .map_err(|e| Error::input(format!("cannot listen on {}: {e}", opts.addr)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::input(format!("{}: {e}", opts.addr)))?;
        ready(addr);
        let app = router(state.clone());
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<Error>();
        let loader = state.clone();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            match load(&opts, &loader) {
                Ok(l) => {
                    tracing::info!("{} loaded in {:.1} s", l.model, t0.elapsed().as_secs_f64());
                    let _ = loader.loaded.set(Arc::new(l));
                }
                Err(e) => {
                    let _ = failed_tx.send(e);
                }
            }
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = stop_rx.await;
        });
        let server = tokio::spawn(async move { server.await });
        let outcome = tokio::select! {
            e = failed_rx => match e {
                Ok(e) => Err(e),
                Err(_) => { shutdown_signal().await; Ok(()) }
            },
            _ = shutdown_signal() => Ok(()),
        };
        let _ = stop_tx.send(());
        let _ = server.await;
        outcome
    })
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("stopping: finishing the requests in flight");
}
