//! `vlalign serve --model DIR [--addr 127.0.0.1:8080] [--device ...]`: the HTTP API
//! (`vlalign::serve`), its limits as flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use vlalign::serve::{Limits, ServeOptions};

use super::device::DeviceOpt;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (CLIP or BLIP-2 Q-Former; either CLIP layout).
    #[arg(long)]
    model: PathBuf,
    /// An image-search index (`vlalign index build`) for `POST /search` and the page at `/`.
    #[arg(long)]
    index: Option<PathBuf>,
    /// Address to listen on; port 0 picks a free port (printed on the first line).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Largest request body in bytes (413 above it).
    #[arg(long, default_value_t = Limits::default().max_body_bytes)]
    max_body_bytes: usize,
    /// Most inputs one request may carry.
    #[arg(long, default_value_t = Limits::default().max_inputs)]
    max_inputs: usize,
    /// Longest text in characters.
    #[arg(long, default_value_t = Limits::default().max_text_chars)]
    max_text_chars: usize,
    /// Refuse (422) texts longer than the model's context instead of truncating them.
    #[arg(long)]
    no_truncate: bool,
    /// Jobs waiting for the model (429 when full).
    #[arg(long, default_value_t = Limits::default().max_queue)]
    max_queue: usize,
    /// Most images per forward pass.
    #[arg(long, default_value_t = Limits::default().max_batch_images)]
    max_batch_images: usize,
    /// Most text tokens (rows × longest) per forward pass.
    #[arg(long, default_value_t = Limits::default().max_batch_tokens)]
    max_batch_tokens: usize,
    /// One request's inputs per forward pass (no batching across requests).
    #[arg(long)]
    no_batching: bool,
    #[command(flatten)]
    device: DeviceOpt,
}

pub fn run(a: Args) -> Result<()> {
    for (flag, v) in [
        ("--max-body-bytes", a.max_body_bytes),
        ("--max-inputs", a.max_inputs),
        ("--max-text-chars", a.max_text_chars),
        ("--max-queue", a.max_queue),
        ("--max-batch-images", a.max_batch_images),
        ("--max-batch-tokens", a.max_batch_tokens),
    ] {
        if v == 0 {
            anyhow::bail!("{flag} must be at least 1");
        }
    }
    let limits = Limits {
        max_body_bytes: a.max_body_bytes,
        max_inputs: a.max_inputs,
        max_text_chars: a.max_text_chars,
        truncate: !a.no_truncate,
        max_queue: a.max_queue,
        max_batch_images: a.max_batch_images,
        max_batch_tokens: a.max_batch_tokens,
        batching: !a.no_batching,
        ..Limits::default()
    };
    let opts = ServeOptions {
        model: a.model,
        addr: a.addr,
        device: a.device.resolve()?,
        limits,
        index: a.index,
    };
    vlalign::serve::run(opts, |addr| {
        println!("listening on http://{addr}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })?;
    Ok(())
}
