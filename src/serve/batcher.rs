//! The queue and the one model thread, as text-embeddings-inference builds them: handlers put
//! jobs on a bounded queue (full: 429); the model thread takes the first job waiting, adds the
//! jobs behind it while the batch stays within the image and token limits, runs one forward
//! pass per input kind, and sends each job its own rows back. Inputs arrive already decoded,
//! preprocessed and tokenised (the handlers do that on the blocking pool), so the model thread
//! only runs the model. Jobs that are not embeddings (ITM, captions) run alone, in queue order.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use tokio::sync::oneshot;

use super::error::ApiError;
use super::limits::Limits;
use super::metrics::Metrics;
use crate::infer::{ClipPipeline, Pipeline};
use crate::nn::ops::{ensure_finite, l2_normalize};

/// Inputs to embed, prepared off the model thread.
pub enum Work {
    /// Preprocessed images, each `3 · H · W` floats at the model's input size.
    Images(Vec<Vec<f32>>),
    /// Token ids of each text, without padding.
    Texts(Vec<Vec<u32>>),
}

impl Work {
    fn len(&self) -> usize {
        match self {
            Work::Images(v) => v.len(),
            Work::Texts(v) => v.len(),
        }
    }
}

type Rows = Result<Vec<Vec<f32>>, ApiError>;
type Task = Box<dyn FnOnce(&Pipeline) + Send>;

enum Kind {
    Embed {
        work: Work,
        reply: oneshot::Sender<Rows>,
    },
    Run(Task),
}

struct Job {
    kind: Kind,
    queued: Instant,
}

/// The handlers' side of the queue.
#[derive(Clone)]
pub struct Queue {
    tx: SyncSender<Job>,
    capacity: usize,
    metrics: Arc<Metrics>,
}

impl Queue {
    fn push(&self, kind: Kind) -> Result<(), ApiError> {
        let job = Job {
            kind,
            queued: Instant::now(),
        };
        self.metrics.queue_size.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queue_size.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    TrySendError::Full(_) => ApiError::overloaded(self.capacity),
                    TrySendError::Disconnected(_) => {
                        ApiError::unavailable("the model thread stopped")
                    }
                })
            }
        }
    }

    /// L2-normalised embeddings of `work`, one row per input, in order.
    pub async fn embed(&self, work: Work) -> Rows {
        if work.len() == 0 {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        self.push(Kind::Embed { work, reply })?;
        rx.await
            .unwrap_or_else(|_| Err(ApiError::backend("the model thread dropped the job")))
    }

    /// Runs `f` on the model thread, alone, after the jobs queued before it.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Pipeline) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.push(Kind::Run(Box::new(move |p| {
            let _ = reply.send(f(p));
        })))?;
        rx.await
            .unwrap_or_else(|_| Err(ApiError::backend("the model thread dropped the job")))
    }
}

/// Starts the model thread over `pipeline`; it ends when every [`Queue`] is dropped.
pub fn spawn(pipeline: Pipeline, limits: &Limits, metrics: Arc<Metrics>) -> Queue {
    let (tx, rx) = sync_channel(limits.max_queue);
    let queue = Queue {
        tx,
        capacity: limits.max_queue,
        metrics: metrics.clone(),
    };
    let limits = limits.clone();
    std::thread::Builder::new()
        .name("vlalign-model".into())
        .spawn(move || model_loop(pipeline, rx, limits, metrics))
        .expect("spawn the model thread");
    queue
}

/// What a job adds to a batch: images, text tokens (rows × longest row).
fn cost(work: &Work) -> (usize, usize) {
    match work {
        Work::Images(v) => (v.len(), 0),
        Work::Texts(v) => (0, v.len() * v.iter().map(Vec::len).max().unwrap_or(0)),
    }
}

fn model_loop(p: Pipeline, rx: Receiver<Job>, limits: Limits, metrics: Arc<Metrics>) {
    let mut pending: Option<Job> = None;
    loop {
        let Some(first) = pending.take().or_else(|| rx.recv().ok()) else {
            return;
        };
        let take = |job: &Job| {
            metrics.queue_size.fetch_sub(1, Ordering::Relaxed);
            metrics.queued(job.queued.elapsed().as_secs_f64());
        };
        take(&first);
        let mut batch = match first.kind {
            Kind::Run(f) => {
                let t0 = Instant::now();
                // A panic inside the model drops this job's reply (the handler answers 500) and
                // leaves the thread serving.
                let _ = catch_unwind(AssertUnwindSafe(|| f(&p)));
                metrics.batch(1, t0.elapsed().as_secs_f64());
                continue;
            }
            Kind::Embed { work, reply } => vec![(work, reply)],
        };
        let (mut images, mut tokens) = cost(&batch[0].0);
        while let Some(next) = limits.batching.then(|| rx.try_recv().ok()).flatten() {
            let fits = match &next.kind {
                Kind::Embed { work, .. } => {
                    let (i, t) = cost(work);
                    images + i <= limits.max_batch_images && tokens + t <= limits.max_batch_tokens
                }
                Kind::Run(_) => false,
            };
            if !fits {
                // Still waiting (and counted so): it starts the next batch.
                pending = Some(next);
                break;
            }
            take(&next);
            if let Kind::Embed { work, reply } = next.kind {
                let (i, t) = cost(&work);
                (images, tokens) = (images + i, tokens + t);
                batch.push((work, reply));
            }
        }
        let _ = catch_unwind(AssertUnwindSafe(|| run_batch(&p, batch, &limits, &metrics)));
    }
}

/// Embeds every job of `batch`: images in one group, texts in another, each in forward passes
/// within the limits; each job gets its rows, or the error of a pass it took part in.
fn run_batch(
    p: &Pipeline,
    batch: Vec<(Work, oneshot::Sender<Rows>)>,
    limits: &Limits,
    metrics: &Metrics,
) {
    let Pipeline::Clip(clip) = p else {
        for (_, reply) in batch {
            let _ = reply.send(Err(ApiError::backend("embeddings need a CLIP model")));
        }
        return;
    };
    let (mut image_jobs, mut text_jobs) = (Vec::new(), Vec::new());
    for (work, reply) in batch {
        match work {
            Work::Images(v) => image_jobs.push((v, reply)),
            Work::Texts(v) => text_jobs.push((v, reply)),
        }
    }
    if !image_jobs.is_empty() {
        let all: Vec<&Vec<f32>> = image_jobs.iter().flat_map(|(v, _)| v).collect();
        let rows = embed_images(clip, &all, limits, metrics);
        fan_out(image_jobs, rows);
    }
    if !text_jobs.is_empty() {
        let all: Vec<&Vec<u32>> = text_jobs.iter().flat_map(|(v, _)| v).collect();
        let rows = embed_texts(clip, &all, limits, metrics);
        fan_out(text_jobs, rows);
    }
}

/// Sends each job its slice of `rows` (or the shared error).
fn fan_out<T>(jobs: Vec<(Vec<T>, oneshot::Sender<Rows>)>, rows: Rows) {
    match rows {
        Ok(rows) => {
            let mut rows = rows.into_iter();
            for (inputs, reply) in jobs {
                let _ = reply.send(Ok(rows.by_ref().take(inputs.len()).collect()));
            }
        }
        Err(e) => {
            for (_, reply) in jobs {
                let _ = reply.send(Err(ApiError::new(e.status, e.kind, e.message.clone())));
            }
        }
    }
}

fn rows_of(features: &Tensor, what: &str) -> Rows {
    let e = l2_normalize(features)?;
    ensure_finite(&e, what)?;
    Ok(e.to_vec2::<f32>().map_err(crate::error::Error::from)?)
}

fn embed_images(p: &ClipPipeline, all: &[&Vec<f32>], limits: &Limits, metrics: &Metrics) -> Rows {
    let size = p
        .model
        .image_size()
        .ok_or_else(|| ApiError::backend("this CLIP has no image tower"))?;
    let mut out = Vec::with_capacity(all.len());
    for chunk in all.chunks(limits.max_batch_images.max(1)) {
        let t0 = Instant::now();
        let flat: Vec<f32> = chunk.iter().flat_map(|v| v.iter().copied()).collect();
        let pixels = Tensor::from_vec(flat, (chunk.len(), 3, size, size), &p.device)
            .map_err(crate::error::Error::from)?;
        let f = p
            .model
            .image_features(&pixels)
            .map_err(crate::error::Error::from)?;
        out.extend(rows_of(&f, "image embeddings")?);
        metrics.batch(chunk.len(), t0.elapsed().as_secs_f64());
    }
    Ok(out)
}

fn embed_texts(p: &ClipPipeline, all: &[&Vec<u32>], limits: &Limits, metrics: &Metrics) -> Rows {
    let (Some(text), Some(tok)) = (&p.model.text, &p.tokenizer) else {
        return Err(ApiError::backend("this CLIP has no text tower"));
    };
    let mut out = Vec::with_capacity(all.len());
    let mut start = 0;
    while start < all.len() {
        // As many rows as keep rows × longest within the token budget (at least one).
        let (mut end, mut longest) = (start, 0);
        while end < all.len() {
            let l = longest.max(all[end].len());
            if end > start && (end + 1 - start) * l > limits.max_batch_tokens {
                break;
            }
            (end, longest) = (end + 1, l);
        }
        let t0 = Instant::now();
        let chunk = &all[start..end];
        let ids: Vec<Vec<u32>> = chunk
            .iter()
            .map(|r| {
                let mut r = (*r).clone();
                r.resize(longest, tok.pad_id());
                r
            })
            .collect();
        let mask: Vec<Vec<u32>> = chunk
            .iter()
            .map(|r| (0..longest).map(|i| u32::from(i < r.len())).collect())
            .collect();
        text.check_batch(&ids, &mask).map_err(ApiError::invalid)?;
        let f = p
            .model
            .text_features(&ids, &mask)
            .map_err(crate::error::Error::from)?;
        out.extend(rows_of(&f, "text embeddings")?);
        metrics.batch(chunk.len(), t0.elapsed().as_secs_f64());
        start = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full queue refuses at once with 429 (never blocks the handler), and the gauge counts
    /// only what is waiting.
    #[test]
    fn a_full_queue_is_a_429() {
        let (tx, _rx) = sync_channel(2);
        let metrics = Arc::new(Metrics::default());
        let q = Queue {
            tx,
            capacity: 2,
            metrics: metrics.clone(),
        };
        let job = || Kind::Run(Box::new(|_| {}));
        assert!(q.push(job()).is_ok());
        assert!(q.push(job()).is_ok());
        let e = q.push(job()).unwrap_err();
        assert_eq!((e.status.as_u16(), e.kind), (429, "overloaded"));
        assert_eq!(metrics.queue_size.load(Ordering::Relaxed), 2);
    }
}
