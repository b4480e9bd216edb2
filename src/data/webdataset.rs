//! WebDataset tar shards: samples are consecutive files sharing a key (the name up to its first
//! dot), an image `KEY.jpg|jpeg|png|webp` and a caption `KEY.txt` or `KEY.json` (field `caption`,
//! else `text`). Shard lists use brace patterns, `shard-{0000..0099}.tar` or `{a,b}.tar`.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The largest tar member read (an image or a caption file).
pub const MAX_MEMBER_BYTES: u64 = crate::data::image::MAX_IMAGE_FILE_BYTES;

/// The most shard names one pattern may expand to (checked before any name is made).
pub const MAX_SHARDS: u64 = 1_000_000;

/// How many names `pattern` expands to, saturating (no name is built).
fn expansion_count(pattern: &str) -> Result<u64> {
    let Some(open) = pattern.find('{') else {
        return Ok(1);
    };
    let Some(close) = pattern[open..].find('}').map(|c| open + c) else {
        return Err(Error::input(format!(
            "unclosed '{{' in shard pattern {pattern:?}"
        )));
    };
    let body = &pattern[open + 1..close];
    let here = match body.split_once("..") {
        Some((a, b)) => match (a.parse::<u64>(), b.parse::<u64>()) {
            (Ok(lo), Ok(hi)) if lo <= hi => (hi - lo).saturating_add(1),
            _ => {
                return Err(Error::input(format!(
                    "bad range {{{body}}} in shard pattern {pattern:?}"
                )))
            }
        },
        None => body.split(',').count() as u64,
    };
    Ok(here.saturating_mul(expansion_count(&pattern[close + 1..])?))
}

/// Expands brace patterns: numeric ranges keep the zero padding of the first bound. A pattern
/// of more than [`MAX_SHARDS`] names is refused before any is made.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>> {
    let n = expansion_count(pattern)?;
    if n > MAX_SHARDS {
        return Err(Error::input(format!(
            "shard pattern {pattern:?} names {n} files; at most {MAX_SHARDS}"
        )));
    }
    expand_unchecked(pattern)
}

fn expand_unchecked(pattern: &str) -> Result<Vec<String>> {
    let Some(open) = pattern.find('{') else {
        return Ok(vec![pattern.to_string()]);
    };
    let close = pattern[open..]
        .find('}')
        .map(|c| open + c)
        .ok_or_else(|| Error::input(format!("unclosed '{{' in shard pattern {pattern:?}")))?;
    let (head, body, tail) = (
        &pattern[..open],
        &pattern[open + 1..close],
        &pattern[close + 1..],
    );
    let options: Vec<String> = if let Some((a, b)) = body.split_once("..") {
        let (lo, hi): (u64, u64) = match (a.parse(), b.parse()) {
            (Ok(lo), Ok(hi)) if lo <= hi => (lo, hi),
            _ => {
                return Err(Error::input(format!(
                    "bad range {{{body}}} in shard pattern {pattern:?}"
                )))
            }
        };
        (lo..=hi)
            .map(|i| format!("{i:0width$}", width = a.len()))
            .collect()
    } else {
        body.split(',').map(String::from).collect()
    };
    let mut out = Vec::new();
    for o in options {
        for rest in expand_unchecked(tail)? {
            out.push(format!("{head}{o}{rest}"));
        }
    }
    Ok(out)
}

/// Whether a data argument names tar shards.
pub fn is_tar_pattern(s: &str) -> bool {
    s.ends_with(".tar") || s.contains(".tar}") || (s.contains('{') && s.contains(".tar"))
}

/// One raw sample: encoded image bytes and the caption, or why it is unusable.
pub type RawSample = std::result::Result<(Vec<u8>, String, String), String>;

const IMAGE_EXTS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// Reads every sample of one shard in file order, calling `f` for each; a sample with no image
/// or no caption is passed as `Err` naming it (the loader counts and skips those).
pub fn read_shard(path: &Path, mut f: impl FnMut(RawSample)) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let entries = archive.entries().map_err(|e| Error::io(path, e))?;
    let mut key = String::new();
    let mut image: Option<Vec<u8>> = None;
    let mut caption: Option<String> = None;
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                // A truncated or corrupt archive ends the shard; what came before is kept.
                flush(path, &key, &mut image, &mut caption, &mut f);
                f(Err(format!("{}: corrupt tar entry: {e}", path.display())));
                return Ok(());
            }
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let base = name.rsplit('/').next().unwrap_or(&name);
        let (k, ext) = match base.split_once('.') {
            Some((k, e)) => (
                format!("{}{k}", &name[..name.len() - base.len()]),
                e.to_ascii_lowercase(),
            ),
            None => continue,
        };
        if k != key {
            flush(path, &key, &mut image, &mut caption, &mut f);
            key = k;
        }
        // A member's claimed size bounds what is read into memory.
        let size = entry.header().size().unwrap_or(u64::MAX);
        if size > MAX_MEMBER_BYTES {
            f(Err(format!(
                "{}:{name}: claims {size} bytes; members of at most {MAX_MEMBER_BYTES} are read",
                path.display()
            )));
            continue;
        }
        let mut bytes = Vec::new();
        if let Err(e) = (&mut entry).take(MAX_MEMBER_BYTES).read_to_end(&mut bytes) {
            f(Err(format!("{}:{name}: unreadable: {e}", path.display())));
            continue;
        }
        if IMAGE_EXTS.contains(&ext.as_str()) {
            image = Some(bytes);
        } else if ext == "txt" {
            caption = Some(String::from_utf8_lossy(&bytes).trim().to_string());
        } else if ext == "json" && caption.is_none() {
            let v: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
            caption = v.and_then(|v| {
                v.get("caption")
                    .or_else(|| v.get("text"))
                    .and_then(|c| c.as_str())
                    .map(String::from)
            });
        }
    }
    flush(path, &key, &mut image, &mut caption, &mut f);
    Ok(())
}

/// Emits the sample gathered under `key`, if any.
fn flush(
    path: &Path,
    key: &str,
    image: &mut Option<Vec<u8>>,
    caption: &mut Option<String>,
    f: &mut impl FnMut(RawSample),
) {
    if key.is_empty() {
        return;
    }
    let id = format!("{}:{key}", path.display());
    match (image.take(), caption.take()) {
        (Some(i), Some(c)) => f(Ok((i, c, id))),
        (None, _) => f(Err(format!("{id}: no image file"))),
        (_, None) => f(Err(format!("{id}: no caption (.txt or .json)"))),
    }
}

/// The shard paths of a pattern; every one must exist.
pub fn shards(pattern: &str) -> Result<Vec<PathBuf>> {
    let paths: Vec<PathBuf> = expand_braces(pattern)?
        .into_iter()
        .map(PathBuf::from)
        .collect();
    if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
        return Err(Error::input(format!(
            "shard {} (from {pattern:?}) does not exist",
            missing.display()
        )));
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces() {
        assert_eq!(
            expand_braces("s-{08..11}.tar").unwrap(),
            ["s-08.tar", "s-09.tar", "s-10.tar", "s-11.tar"]
        );
        assert_eq!(
            expand_braces("{a,b}/{0..1}.tar").unwrap(),
            ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
        );
        assert_eq!(expand_braces("plain.tar").unwrap(), ["plain.tar"]);
        assert!(expand_braces("s-{3..1}.tar").is_err());
        assert!(expand_braces("s-{1..3.tar").is_err());
        assert!(is_tar_pattern("s-{0000..0099}.tar") && !is_tar_pattern("m.jsonl"));
        // Counted before anything is built: this used to expand 10^11 names.
        let t = std::time::Instant::now();
        let e = expand_braces("x-{0..99999999999}.tar")
            .unwrap_err()
            .to_string();
        assert!(e.contains("100000000000 files"), "{e}");
        let e = expand_braces("{0..99999}-{0..99999}.tar")
            .unwrap_err()
            .to_string();
        assert!(e.contains("10000000000 files"), "{e}");
        assert!(t.elapsed().as_millis() < 100);
    }
}
