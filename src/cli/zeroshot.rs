//! `vlalign zeroshot --model DIR --image P --labels a,b,c [--template "a photo of a {}."]`

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::Device;
use serde_json::json;
use vlalign::pipeline::ClipPipeline;

#[derive(clap::Args)]
pub struct Args {
    /// CLIP model directory.
    #[arg(long)]
    model: PathBuf,
    /// Image file(s) to classify.
    #[arg(long, num_args = 1.., required = true)]
    image: Vec<PathBuf>,
    /// Comma-separated class names.
    #[arg(long)]
    labels: String,
    /// Prompt template; `{}` is replaced by each label.
    #[arg(long, default_value = "a photo of a {}.")]
    template: String,
    /// How many of the most probable labels to show (0 = all).
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Print one JSON object: {"template", "labels", "images": [{"path", "predictions": [{"label", "prob", "logit"}]}]}.
    #[arg(long)]
    json: bool,
}

/// Splits `a,b,c`, trimming blanks; an empty list or an empty label is an error.
fn parse_labels(s: &str) -> Result<Vec<String>> {
    let labels: Vec<String> = s.split(',').map(|l| l.trim().to_string()).collect();
    if s.trim().is_empty() {
        bail!("--labels is empty: give comma-separated class names, e.g. --labels cat,dog");
    }
    if let Some(i) = labels.iter().position(String::is_empty) {
        bail!("--labels has an empty label at position {} in {s:?}", i + 1);
    }
    Ok(labels)
}

pub fn run(a: Args, device: &Device) -> Result<()> {
    let labels = parse_labels(&a.labels)?;
    if !a.template.contains("{}") {
        bail!(
            "--template {:?} has no {{}} where the label goes",
            a.template
        );
    }
    let p = ClipPipeline::load(&a.model, device)?;
    let prompts: Vec<String> = labels.iter().map(|l| a.template.replace("{}", l)).collect();
    let text = p.embed_texts(&prompts)?;
    let images = p.embed_image_files(&a.image)?;
    let scale = p.model.logit_scale_exp()?;
    let logits = (images.matmul(&text.t()?)? * scale as f64)?;
    let probs = candle_nn::ops::softmax_last_dim(&logits)?.to_vec2::<f32>()?;
    let logits = logits.to_vec2::<f32>()?;
    let top = if a.top == 0 {
        labels.len()
    } else {
        a.top.min(labels.len())
    };
    let mut results = Vec::new();
    for ((path, pr), lg) in a.image.iter().zip(&probs).zip(&logits) {
        let mut order: Vec<usize> = (0..labels.len()).collect();
        order.sort_by(|&i, &j| pr[j].total_cmp(&pr[i]));
        order.truncate(top);
        results.push((
            path,
            order
                .into_iter()
                .map(|i| (&labels[i], pr[i], lg[i]))
                .collect::<Vec<_>>(),
        ));
    }
    if a.json {
        let obj = json!({
            "template": a.template,
            "labels": labels,
            "images": results.iter().map(|(path, preds)| json!({
                "path": path,
                "predictions": preds.iter().map(|(l, p, g)| json!({"label": l, "prob": p, "logit": g})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        println!("{obj}");
    } else {
        for (path, preds) in &results {
            println!("{}", path.display());
            for (l, pr, _) in preds {
                println!("  {:6.2}%  {l}", pr * 100.0);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_labels;

    #[test]
    fn labels_are_split_and_checked() {
        assert_eq!(parse_labels(" cat , dog").unwrap(), ["cat", "dog"]);
        assert!(parse_labels("").unwrap_err().to_string().contains("empty"));
        assert!(parse_labels("cat,,dog")
            .unwrap_err()
            .to_string()
            .contains("position 2"));
    }
}
