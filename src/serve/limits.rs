//! What one request may ask of the server, checked before any work is queued: each bound is a
//! 413 or 422 naming it, never an allocation sized by the client.

use serde::Serialize;

/// Request and batching limits (`vlalign serve` flags; `/info` reports them).
#[derive(Clone, Debug, Serialize)]
pub struct Limits {
    /// Largest request body (413 above it). Images come base64-encoded inside the JSON.
    pub max_body_bytes: usize,
    /// Most inputs (texts + images, labels, candidate images) one request may carry.
    pub max_inputs: usize,
    /// Longest text in characters (422 above it): bounds tokenisation work before the context
    /// truncation applies.
    pub max_text_chars: usize,
    /// Over-long texts are cut to the model's context (keeping end-of-text) when true, else 422.
    pub truncate: bool,
    /// Jobs waiting for the model thread (429 when full).
    pub max_queue: usize,
    /// Most images the model thread runs in one forward pass.
    pub max_batch_images: usize,
    /// Most text tokens (rows × longest row) in one forward pass.
    pub max_batch_tokens: usize,
    /// Form batches across requests (false: one request's inputs per forward pass).
    pub batching: bool,
    /// Largest `top` a search or rerank may ask for, and `max_new_tokens`/`beams` of a caption.
    pub max_top: usize,
    pub max_new_tokens: usize,
    pub max_beams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 32 << 20,
            max_inputs: 256,
            max_text_chars: 10_000,
            truncate: true,
            max_queue: 1024,
            max_batch_images: 32,
            max_batch_tokens: 16_384,
            batching: true,
            max_top: 1000,
            max_new_tokens: 128,
            max_beams: 8,
        }
    }
}
