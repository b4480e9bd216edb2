//! Image–caption manifests: JSONL (`{"image": path, "caption": text, "objects": [...]}` per line)
//! or CSV/TSV with a header (image column `image`, `filepath` or `path`; caption column
//! `caption`, `title` or `text`, as open_clip's `--csv-img-key` / `--csv-caption-key` defaults
//! use). Image paths are relative to the manifest's directory unless absolute.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::shapes::ObjectSpec;
use crate::error::{Error, Result};

/// One line of a manifest, with the image path resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub image: PathBuf,
    pub caption: String,
    /// The objects of a shapes image (absent for other data).
    pub objects: Option<Vec<ObjectSpec>>,
    /// Whether the caption is known to be false of the image (generated caption noise,
    /// `vlalign data shapes --caption-noise`); `None` when the data does not say.
    pub noisy: Option<bool>,
}

#[derive(Serialize, Deserialize)]
struct Line {
    image: String,
    caption: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    objects: Option<Vec<ObjectSpec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    noisy: Option<bool>,
}

fn resolve(root: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        root.join(p)
    }
}

/// Reads a manifest; the format follows the extension (`.jsonl`/`.json` or `.csv`/`.tsv`).
/// A malformed line is an error naming the file and line: it is found before training starts.
pub fn read(path: &Path) -> Result<Vec<Entry>> {
    let text = crate::io::read_to_string(path)?;
    // A byte-order mark, as some editors write, is not part of the first line.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let root = path.parent().unwrap_or(Path::new("."));
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let entries = match ext.as_str() {
        "jsonl" | "json" => read_jsonl(text, root, path)?,
        "csv" | "tsv" => read_csv(text, root, path)?,
        other => {
            return Err(Error::config(
                path,
                format!("unknown manifest extension `.{other}` (use .jsonl, .csv or .tsv)"),
            ))
        }
    };
    if entries.is_empty() {
        return Err(Error::config(path, "manifest has no entries"));
    }
    Ok(entries)
}

fn read_jsonl(text: &str, root: &Path, path: &Path) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(line)
            .map_err(|e| Error::config(path, format!("line {}: {e}", i + 1)))?;
        out.push(Entry {
            image: resolve(root, &l.image),
            caption: l.caption,
            objects: l.objects,
            noisy: l.noisy,
        });
    }
    Ok(out)
}

fn read_csv(text: &str, root: &Path, path: &Path) -> Result<Vec<Entry>> {
    let first = text.lines().next().unwrap_or("");
    let delim = if first.contains('\t') { b'\t' } else { b',' };
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(delim)
        .from_reader(text.as_bytes());
    let headers = rdr
        .headers()
        .map_err(|e| Error::config(path, format!("header: {e}")))?
        .clone();
    let find = |names: &[&str]| headers.iter().position(|h| names.contains(&h.trim()));
    let img = find(&["image", "filepath", "path"]).ok_or_else(|| {
        Error::config(
            path,
            "no image column (image, filepath or path) in the header",
        )
    })?;
    let cap = find(&["caption", "title", "text"]).ok_or_else(|| {
        Error::config(
            path,
            "no caption column (caption, title or text) in the header",
        )
    })?;
    let mut out = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.map_err(|e| Error::config(path, format!("row {}: {e}", i + 2)))?;
        let field = |k: usize| {
            rec.get(k).ok_or_else(|| {
                Error::config(path, format!("row {}: missing column {}", i + 2, k + 1))
            })
        };
        out.push(Entry {
            image: resolve(root, field(img)?),
            caption: field(cap)?.to_string(),
            objects: None,
            noisy: None,
        });
    }
    Ok(out)
}

/// Writes a JSONL manifest line by line, image paths relative to `root`: a manifest of any
/// length without holding its entries.
pub struct JsonlWriter {
    f: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
    root: PathBuf,
}

impl JsonlWriter {
    pub fn create(path: &Path, root: &Path) -> Result<Self> {
        let f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
        Ok(Self {
            f: std::io::BufWriter::new(f),
            path: path.to_path_buf(),
            root: root.to_path_buf(),
        })
    }

    pub fn write(&mut self, e: &Entry) -> Result<()> {
        let rel = e.image.strip_prefix(&self.root).unwrap_or(&e.image);
        let line = Line {
            image: rel.to_string_lossy().into_owned(),
            caption: e.caption.clone(),
            objects: e.objects.clone(),
            noisy: e.noisy,
        };
        let json = serde_json::to_string(&line).expect("manifest lines serialise");
        writeln!(self.f, "{json}").map_err(|e| Error::io(&self.path, e))
    }

    pub fn finish(mut self) -> Result<()> {
        self.f.flush().map_err(|e| Error::io(&self.path, e))
    }
}

/// Writes a JSONL manifest with image paths relative to `root`.
pub fn write_jsonl(path: &Path, root: &Path, entries: &[Entry]) -> Result<()> {
    let mut w = JsonlWriter::create(path, root)?;
    for e in entries {
        w.write(e)?;
    }
    w.finish()
}

/// The image files of `src`: a directory's `.png`/`.jpg`/`.jpeg`/`.webp` files (sorted by
/// name, not recursive), or the `image` column of a manifest.
pub fn image_list(src: &Path) -> Result<Vec<PathBuf>> {
    if src.is_dir() {
        let mut v = Vec::new();
        for e in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
            let p = e.map_err(|e| Error::io(src, e))?.path();
            let ext = p
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_lowercase);
            if p.is_file()
                && ext.is_some_and(|e| ["png", "jpg", "jpeg", "webp"].contains(&e.as_str()))
            {
                v.push(p);
            }
        }
        v.sort();
        return Ok(v);
    }
    if src.is_file() {
        return Ok(read(src)?.into_iter().map(|e| e.image).collect());
    }
    Err(Error::input(format!(
        "{}: no such directory or manifest",
        src.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vlalign-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn jsonl_csv_and_tsv() {
        let p = tmp("a.jsonl", "{\"image\": \"i/1.png\", \"caption\": \"a cat\"}\n\n{\"image\": \"/abs.png\", \"caption\": \"x\", \"objects\": [{\"color\": \"red\", \"shape\": \"star\", \"size\": \"small\", \"position\": \"left\"}]}\n");
        let e = read(&p).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].image, p.parent().unwrap().join("i/1.png"));
        assert_eq!(e[1].image, PathBuf::from("/abs.png"));
        assert_eq!(e[1].objects.as_ref().unwrap()[0].class_name(), "red star");
        let p = tmp("b.csv", "filepath,title\n1.png,\"a cat, sleeping\"\n");
        assert_eq!(read(&p).unwrap()[0].caption, "a cat, sleeping");
        let p = tmp("c.tsv", "filepath\ttitle\n1.png\ta dog\n");
        assert_eq!(read(&p).unwrap()[0].caption, "a dog");
    }

    #[test]
    fn malformed_lines_name_the_line() {
        let p = tmp(
            "bad.jsonl",
            "{\"image\": \"1.png\", \"caption\": \"a\"}\n{\"image\": 3}\n",
        );
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl") && e.contains("line 2"), "{e}");
        let p = tmp("bad.csv", "file,words\n1.png,a\n");
        assert!(read(&p)
            .unwrap_err()
            .to_string()
            .contains("no image column"));
        let p = tmp("empty.jsonl", "\n");
        assert!(read(&p).unwrap_err().to_string().contains("no entries"));
    }
}
