//! `vlalign zeroshot --model DIR --image P --labels a,b,c [--template "a photo of a {}."]`

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde_json::json;
use vlalign::infer::zeroshot::classify;
use vlalign::infer::Pipeline;

use super::device::DeviceOpt;

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
    #[command(flatten)]
    device: DeviceOpt,
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

pub fn run(a: Args) -> Result<()> {
    let labels = parse_labels(&a.labels)?;
    if !a.template.contains("{}") {
        bail!(
            "--template {:?} has no {{}} where the label goes",
            a.template
        );
    }
    let p = Pipeline::load(&a.model, &a.device.resolve()?)?.into_clip("`vlalign zeroshot`")?;
    let images = p.embed_image_files(&a.image)?;
    let results = classify(
        &p,
        &images,
        &labels,
        std::slice::from_ref(&a.template),
        a.top,
    )?;
    if a.json {
        let obj = json!({
            "template": a.template,
            "labels": labels,
            "images": a.image.iter().zip(&results).map(|(path, preds)| json!({
                "path": path,
                "predictions": preds.iter().map(|p| json!({"label": p.label, "prob": p.prob, "logit": p.logit})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        println!("{obj}");
    } else {
        for (path, preds) in a.image.iter().zip(&results) {
            println!("{}", path.display());
            for p in preds {
                println!("  {:6.2}%  {}", p.prob * 100.0, p.label);
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
