//! `vlalign caption --model DIR --image P... [--prompt TEXT] [--beams K] [--max-new-tokens N]
//! [--json]`: captions from a Q-Former's ITG head (stage 1) or from a BLIP-2 stage-2 model's
//! language model, greedy (`--beams 1`), by beam search, or sampled (`--top-p` with `--seed`).
//! `vlalign ask` (below) wraps a question in BLIP-2's VQA prompt.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use rand::SeedableRng;
use serde_json::json;
use vlalign::data::image::load_rgb;
use vlalign::infer::blip2::QUESTION_PROMPT;
use vlalign::infer::lm_generate::{Decoding, GenerationConfig};
use vlalign::infer::{Blip2Pipeline, Pipeline};

use super::device::DeviceOpt;

/// Decoding flags shared by `caption` and `ask`.
#[derive(clap::Args)]
pub struct DecodeArgs {
    /// Beam width; 1 = greedy.
    #[arg(long, default_value_t = 3)]
    beams: usize,
    /// Most tokens to generate (the prompt and the visual queries do not count).
    #[arg(long, visible_alias = "max-len", default_value_t = 30)]
    max_new_tokens: usize,
    /// Fewest tokens before a stop token may end the text (BLIP-2 stage-2 models).
    #[arg(long, default_value_t = 0)]
    min_new_tokens: usize,
    /// Above 1 makes repeating earlier tokens less likely (BLIP-2 stage-2 models).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Beam search: hypothesis score = summed log-probability / length^penalty.
    #[arg(long, default_value_t = 1.0)]
    length_penalty: f32,
    /// Sample from the top-p nucleus instead of searching (BLIP-2 stage-2 models).
    #[arg(long)]
    top_p: Option<f32>,
    /// Sampling temperature (with --top-p).
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Seed of the sampling streams (image i draws from its own stream).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(clap::Args)]
pub struct Args {
    /// A Q-Former directory with an ITG head, or a BLIP-2 stage-2 directory
    /// (Blip2ForConditionalGeneration).
    #[arg(long)]
    model: PathBuf,
    /// Image file(s) to caption.
    #[arg(long, num_args = 1.., required = true)]
    image: Vec<PathBuf>,
    /// Text the language model continues (BLIP-2 stage-2 models; e.g. "a photo of").
    #[arg(long)]
    prompt: Option<String>,
    #[command(flatten)]
    decode: DecodeArgs,
    /// Print one JSON object: {"captions": [{"image", "prompt", "text", "token_ids", "score"}]}
    /// in input order (token_ids: the generated ids after the prompt, the stop token included
    /// when one was produced).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceOpt,
}

#[derive(clap::Args)]
pub struct AskArgs {
    /// A BLIP-2 stage-2 directory.
    #[arg(long)]
    model: PathBuf,
    /// Image file(s) the question is about.
    #[arg(long, num_args = 1.., required = true)]
    image: Vec<PathBuf>,
    /// The question; the model reads "Question: {question} Answer:".
    #[arg(long)]
    question: String,
    #[command(flatten)]
    decode: DecodeArgs,
    /// Print one JSON object, as `caption --json` does.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceOpt,
}

impl DecodeArgs {
    fn config(&self, stop: Vec<u32>) -> GenerationConfig {
        let decoding = match self.top_p {
            Some(top_p) => Decoding::Sample {
                temperature: self.temperature,
                top_p,
            },
            None if self.beams <= 1 => Decoding::Greedy,
            None => Decoding::Beam {
                beams: self.beams,
                length_penalty: self.length_penalty,
            },
        };
        GenerationConfig {
            max_new_tokens: self.max_new_tokens,
            min_new_tokens: self.min_new_tokens,
            repetition_penalty: self.repetition_penalty,
            stop,
            decoding,
        }
    }
}

/// One row of output.
struct Row {
    text: String,
    token_ids: Vec<u32>,
    score: f32,
}

fn print(images: &[PathBuf], prompt: Option<&str>, rows: &[Row], as_json: bool) {
    if as_json {
        let list: Vec<_> = images
            .iter()
            .zip(rows)
            .map(|(i, r)| {
                json!({"image": i, "prompt": prompt.unwrap_or(""), "text": r.text,
                       "token_ids": r.token_ids, "score": r.score})
            })
            .collect();
        println!("{}", json!({"captions": list}));
    } else {
        for (i, r) in images.iter().zip(rows) {
            println!("{}: {}", i.display(), r.text);
        }
    }
}

fn blip2_rows(
    p: &Blip2Pipeline,
    images: &[PathBuf],
    prompt: Option<&str>,
    d: &DecodeArgs,
) -> Result<Vec<Row>> {
    let imgs = images
        .iter()
        .map(|path| load_rgb(path))
        .collect::<vlalign::error::Result<Vec<_>>>()?;
    let cfg = d.config(p.stop_tokens());
    let mut rngs: Vec<rand_chacha::ChaCha8Rng> = match cfg.decoding {
        Decoding::Sample { .. } => (0..imgs.len() as u64)
            .map(|i| {
                // One stream per image, from the seed and the image's position.
                let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(d.seed);
                r.set_stream(i);
                r
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(p.generate(&imgs, prompt, &cfg, &mut rngs)?
        .into_iter()
        .map(|g| Row {
            text: g.text,
            token_ids: g.token_ids,
            score: g.score,
        })
        .collect())
}

fn load(model: &Path, device: &DeviceOpt) -> Result<Pipeline> {
    Ok(Pipeline::load(model, &device.resolve()?)?)
}

pub fn run(a: Args) -> Result<()> {
    if a.decode.beams == 0 || a.decode.max_new_tokens == 0 {
        bail!("--beams and --max-new-tokens must be at least 1");
    }
    let rows = match load(&a.model, &a.device)? {
        Pipeline::Blip2(p) => blip2_rows(&p, &a.image, a.prompt.as_deref(), &a.decode)?,
        other => {
            let p = other.into_qformer("`vlalign caption`")?;
            if a.prompt.is_some() || a.decode.top_p.is_some() {
                bail!(
                    "--prompt and --top-p need a BLIP-2 stage-2 model (a language model); {} \
                     is a Q-Former, whose ITG head captions from [DEC] alone",
                    a.model.display()
                );
            }
            let images = a
                .image
                .iter()
                .map(|path| load_rgb(path))
                .collect::<vlalign::error::Result<Vec<_>>>()?;
            let caps = p.caption(
                &p.image_embeds(&images)?,
                a.decode.beams,
                a.decode.max_new_tokens,
            )?;
            caps.into_iter()
                .map(|c| Row {
                    text: c.text,
                    token_ids: c.ids,
                    score: c.score,
                })
                .collect()
        }
    };
    print(&a.image, a.prompt.as_deref(), &rows, a.json);
    Ok(())
}

pub fn ask(a: AskArgs) -> Result<()> {
    if a.question.trim().is_empty() {
        bail!("--question is empty");
    }
    let p = load(&a.model, &a.device)?.into_blip2("`vlalign ask`")?;
    let prompt = QUESTION_PROMPT.replace("{}", a.question.trim());
    let rows = blip2_rows(&p, &a.image, Some(&prompt), &a.decode)?;
    print(&a.image, Some(&prompt), &rows, a.json);
    Ok(())
}
