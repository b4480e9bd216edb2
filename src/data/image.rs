//! Image decoding and the eval preprocessing of transformers' image processors, read from
//! `preprocessor_config.json`: `CLIPImageProcessor` (resize the shortest edge, centre crop) and
//! `BlipImageProcessor` (resize straight to a fixed size), then rescale and normalise.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::resample::{resize_rgb8, Filter};
use crate::error::{Error, Result};

/// OpenAI CLIP's normalisation constants (transformers' OPENAI_CLIP_MEAN / _STD).
#[allow(clippy::excessive_precision)]
pub const OPENAI_CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const OPENAI_CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// An 8-bit RGB image, interleaved rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Self {
        assert_eq!(data.len(), width * height * 3, "RGB buffer size");
        Self {
            width,
            height,
            data,
        }
    }
}

/// PIL's decompression-bomb threshold (`Image.MAX_IMAGE_PIXELS`): the largest image decoded
/// unless `VLALIGN_MAX_IMAGE_PIXELS` says otherwise.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 89_478_485;
/// Longest side over shortest side: beyond it a shortest-edge resize would make a huge image
/// of a tiny file (a 1 × 200000 strip becomes 224 × 44.8 M).
pub const MAX_ASPECT_RATIO: usize = 100;
/// The largest side a preprocessor may resize or crop to.
pub const MAX_PREPROCESS_SIDE: usize = 8192;
/// The largest image file read (`--image /dev/zero` must not read forever).
pub const MAX_IMAGE_FILE_BYTES: u64 = 1 << 30;

/// The pixel limit in force: `VLALIGN_MAX_IMAGE_PIXELS` when set to a number, else
/// [`DEFAULT_MAX_IMAGE_PIXELS`].
pub fn max_image_pixels() -> u64 {
    static LIMIT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("VLALIGN_MAX_IMAGE_PIXELS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_MAX_IMAGE_PIXELS)
    })
}

/// Refuses, from the header alone, an image too large or too elongated to decode safely.
pub fn check_dimensions(w: usize, h: usize) -> std::result::Result<(), String> {
    if w == 0 || h == 0 {
        return Err("image has no pixels".into());
    }
    let limit = max_image_pixels();
    if (w as u64).saturating_mul(h as u64) > limit {
        return Err(format!(
            "{w}x{h} is more than {limit} pixels (set VLALIGN_MAX_IMAGE_PIXELS to allow it)"
        ));
    }
    if w.max(h) > MAX_ASPECT_RATIO * w.min(h) {
        return Err(format!(
            "{w}x{h} is more elongated than {MAX_ASPECT_RATIO}:1; crop it first"
        ));
    }
    Ok(())
}

/// Decodes PNG, JPEG or WebP bytes (format sniffed from the content) into RGB the way
/// transformers' `convert_to_rgb` does: grayscale and palette are expanded, and an image with
/// transparency is alpha-composited onto white (PIL's `alpha_composite`, integer arithmetic).
pub fn decode_rgb(bytes: &[u8], origin: &Path) -> Result<RgbImage> {
    let err = |msg: String| Error::Image {
        path: origin.to_path_buf(),
        msg,
    };
    if super::jpeg::is_jpeg(bytes) {
        let (w, h, data) = super::jpeg::decode(bytes, check_dimensions).map_err(err)?;
        return Ok(RgbImage::new(w, h, data));
    }
    let reader = || {
        image::ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| err(e.to_string()))
    };
    let mut decoder = reader()?;
    if decoder.format().is_none() {
        return Err(err(
            "unknown format; PNG, JPEG and WebP are supported".into()
        ));
    }
    // The header's size first: a small file may claim a huge image.
    let (hw, hh) = reader()?
        .into_dimensions()
        .map_err(|e| err(e.to_string()))?;
    check_dimensions(hw as usize, hh as usize).map_err(err)?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(hw);
    limits.max_image_height = Some(hh);
    // Decoded RGBA at 16 bits per channel, with room for the decoder's own buffers.
    limits.max_alloc = Some((hw as u64) * (hh as u64) * 8 * 2 + (64 << 20));
    decoder.limits(limits);
    let img = pil_depth(decoder.decode().map_err(|e| err(e.to_string()))?);
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err(err("image has no pixels".into()));
    }
    let data = if img.color().has_alpha() {
        let rgba = img.to_rgba8();
        let mut out = Vec::with_capacity(w * h * 3);
        for px in rgba.pixels() {
            let a = px[3] as u32;
            for &c in &px.0[..3] {
                out.push(composite_on_white(c as u32, a));
            }
        }
        out
    } else {
        img.to_rgb8().into_raw()
    };
    Ok(RgbImage::new(w, h, data))
}

/// Brings a 16-bit image to 8 bits as PIL reads it: grey (PIL's mode I;16) is clipped to 255 by
/// its conversion to RGB, not scaled; RGB, RGBA and grey + alpha keep the high byte (rawmodes
/// "RGB;16B", "RGBA;16B", "LA;16B"). Pillow 13, checked on tests/fixtures/images/decode.
fn pil_depth(img: image::DynamicImage) -> image::DynamicImage {
    use image::DynamicImage as D;
    let high = |v: u16| (v >> 8) as u8;
    match img {
        D::ImageLuma16(g) => D::ImageLuma8(narrow(g, |v| v.min(255) as u8)),
        D::ImageLumaA16(g) => D::ImageLumaA8(narrow(g, high)),
        D::ImageRgb16(g) => D::ImageRgb8(narrow(g, high)),
        D::ImageRgba16(g) => D::ImageRgba8(narrow(g, high)),
        other => other,
    }
}

/// The same pixels, each 16-bit channel value mapped to 8 bits by `f`.
fn narrow<P, Q>(
    g: image::ImageBuffer<P, Vec<u16>>,
    f: impl Fn(u16) -> u8,
) -> image::ImageBuffer<Q, Vec<u8>>
where
    P: image::Pixel<Subpixel = u16>,
    Q: image::Pixel<Subpixel = u8>,
{
    let (w, h) = g.dimensions();
    let px = g.into_raw().into_iter().map(f).collect();
    image::ImageBuffer::from_raw(w, h, px).expect("as many values as the 16-bit image had")
}

/// PIL's `alpha_composite` of (c, a) over opaque white: round((c·a + 255·(255 − a)) / 255) with
/// its fixed-point division (AlphaComposite.c, PRECISION_BITS = 7).
fn composite_on_white(c: u32, a: u32) -> u8 {
    let s = c * a + 255 * (255 - a);
    let t = 128 * (s + 128);
    ((((t >> 8) + t) >> 8) >> 7).min(255) as u8
}

/// Reads and decodes an image file: a regular file of at most [`MAX_IMAGE_FILE_BYTES`] (not a
/// device, FIFO or directory, which could block or never end).
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let refuse = |msg: String| Error::Image {
        path: path.to_path_buf(),
        msg,
    };
    if !meta.is_file() {
        return Err(refuse("not a regular file".into()));
    }
    if meta.len() > MAX_IMAGE_FILE_BYTES {
        return Err(refuse(format!(
            "{} bytes; image files of at most {MAX_IMAGE_FILE_BYTES} bytes are read",
            meta.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_rgb(&bytes, path)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum SizeSpec {
    Int(usize),
    Dict {
        shortest_edge: Option<usize>,
        height: Option<usize>,
        width: Option<usize>,
    },
}

/// The keys of `preprocessor_config.json` we use (others are ignored, as transformers ignores
/// unknown ones); absent keys take the defaults of the named `image_processor_type`.
#[derive(Clone, Debug, Default, Deserialize)]
struct RawConfig {
    image_processor_type: Option<String>,
    feature_extractor_type: Option<String>,
    do_resize: Option<bool>,
    size: Option<SizeSpec>,
    resample: Option<u32>,
    do_center_crop: Option<bool>,
    crop_size: Option<SizeSpec>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<Vec<f32>>,
    image_std: Option<Vec<f32>>,
}

/// How the image is resized before cropping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resize {
    /// Shortest edge to `n`, the other edge scaled and truncated (`int(n · long / short)`).
    ShortestEdge(usize),
    /// Straight to `(height, width)`.
    Exact(usize, usize),
}

/// The deterministic eval preprocessing of one model directory.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessor {
    pub resize: Option<Resize>,
    pub filter: Filter,
    /// `(height, width)` of the centre crop.
    pub crop: Option<(usize, usize)>,
    /// How the crop's offset is rounded when the margin is odd.
    pub crop_rounding: CropRounding,
    pub rescale_factor: Option<f32>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub normalize: bool,
}

impl ImageProcessor {
    /// `CLIPImageProcessor`'s defaults for a model whose vision tower takes `size`² pixels.
    pub fn clip_default(size: usize) -> Self {
        Self {
            resize: Some(Resize::ShortestEdge(size)),
            filter: Filter::Bicubic,
            crop: Some((size, size)),
            crop_rounding: CropRounding::Floor,
            rescale_factor: Some(1.0 / 255.0),
            mean: OPENAI_CLIP_MEAN,
            std: OPENAI_CLIP_STD,
            normalize: true,
        }
    }

    /// Reads `preprocessor_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: RawConfig = crate::io::read_json(path)?;
        Self::from_raw(raw).map_err(|m| Error::config(path, m))
    }

    fn from_raw(raw: RawConfig) -> std::result::Result<Self, String> {
        let kind = raw
            .image_processor_type
            .or(raw.feature_extractor_type)
            .unwrap_or_else(|| "CLIPImageProcessor".into());
        let blip = kind.starts_with("Blip");
        if !blip && !kind.starts_with("CLIP") {
            return Err(format!(
                "image_processor_type `{kind}` is not supported (CLIPImageProcessor, BlipImageProcessor)"
            ));
        }
        let size = match (raw.size, blip) {
            (Some(SizeSpec::Int(n)), false) => Resize::ShortestEdge(n),
            (Some(SizeSpec::Int(n)), true) => Resize::Exact(n, n),
            (
                Some(SizeSpec::Dict {
                    shortest_edge: Some(n),
                    ..
                }),
                _,
            ) => Resize::ShortestEdge(n),
            (
                Some(SizeSpec::Dict {
                    height: Some(h),
                    width: Some(w),
                    ..
                }),
                _,
            ) => Resize::Exact(h, w),
            (Some(SizeSpec::Dict { .. }), _) => {
                return Err("`size` needs `shortest_edge` or both `height` and `width`".into())
            }
            (None, false) => Resize::ShortestEdge(224),
            (None, true) => Resize::Exact(384, 384),
        };
        let crop = match raw.crop_size {
            Some(SizeSpec::Int(n)) => (n, n),
            Some(SizeSpec::Dict {
                height: Some(h),
                width: Some(w),
                ..
            }) => (h, w),
            Some(SizeSpec::Dict { .. }) => {
                return Err("`crop_size` needs `height` and `width`".into())
            }
            None => (224, 224),
        };
        // Every size of the pipeline bounds an allocation.
        let sides = match size {
            Resize::ShortestEdge(n) => vec![("size", n)],
            Resize::Exact(h, w) => vec![("size", h), ("size", w)],
        };
        for (key, v) in sides
            .into_iter()
            .chain([("crop_size", crop.0), ("crop_size", crop.1)])
        {
            if v == 0 || v > MAX_PREPROCESS_SIDE {
                return Err(format!(
                    "`{key}` of {v} pixels: use 1 to {MAX_PREPROCESS_SIDE}"
                ));
            }
        }
        let resample = raw.resample.unwrap_or(3);
        let filter = Filter::from_pil(resample).ok_or_else(|| {
            format!("resample = {resample} is not supported (2 = bilinear, 3 = bicubic)")
        })?;
        let triple = |v: Option<Vec<f32>>, default: [f32; 3], key: &str| match v {
            None => Ok(default),
            Some(v) if v.len() == 3 => Ok([v[0], v[1], v[2]]),
            Some(v) if v.len() == 1 => Ok([v[0]; 3]),
            Some(v) => Err(format!("`{key}` has {} values, expected 3", v.len())),
        };
        let std = triple(raw.image_std, OPENAI_CLIP_STD, "image_std")?;
        if std.iter().any(|&s| !(s.is_finite() && s > 0.0)) {
            return Err("`image_std` values must be positive".into());
        }
        let mean = triple(raw.image_mean, OPENAI_CLIP_MEAN, "image_mean")?;
        if mean.iter().any(|m| !m.is_finite()) {
            return Err("`image_mean` values must be finite".into());
        }
        let rescale = raw.rescale_factor.unwrap_or(1.0 / 255.0);
        if !(rescale.is_finite() && rescale > 0.0) {
            return Err(format!(
                "`rescale_factor` ({rescale}) must be positive (1/255 maps 8-bit pixels to [0, 1])"
            ));
        }
        Ok(Self {
            resize: raw.do_resize.unwrap_or(true).then_some(size),
            filter,
            crop: raw.do_center_crop.unwrap_or(!blip).then_some(crop),
            crop_rounding: CropRounding::Floor,
            rescale_factor: raw.do_rescale.unwrap_or(true).then_some(rescale as f32),
            mean,
            std,
            normalize: raw.do_normalize.unwrap_or(true),
        })
    }

    /// Resize and centre crop in 8 bits, as the reference does before its float steps. A resize
    /// that would make more than [`max_image_pixels`] pixels (a long thin image under a large
    /// `shortest_edge`) is an error, before anything is allocated.
    pub fn resize_and_crop(&self, img: &RgbImage) -> std::result::Result<RgbImage, String> {
        let (w, h) = (img.width, img.height);
        let img = match self.resize {
            None => img.clone(),
            Some(r) => {
                let (oh, ow) = match r {
                    Resize::Exact(oh, ow) => (oh, ow),
                    Resize::ShortestEdge(n) => {
                        let (short, long) = if w <= h { (w, h) } else { (h, w) };
                        let new_long = (n as f64 * long as f64 / short as f64) as usize;
                        if w <= h {
                            (new_long, n)
                        } else {
                            (n, new_long)
                        }
                    }
                };
                if (ow, oh) == (w, h) {
                    img.clone()
                } else if (ow as u64).saturating_mul(oh as u64) > max_image_pixels() {
                    return Err(format!(
                        "resizing {w}x{h} to {ow}x{oh} would make {} pixels, over the limit \
                         of {} (VLALIGN_MAX_IMAGE_PIXELS)",
                        ow as u64 * oh as u64,
                        max_image_pixels()
                    ));
                } else {
                    RgbImage::new(ow, oh, resize_rgb8(&img.data, w, h, ow, oh, self.filter))
                }
            }
        };
        Ok(match self.crop {
            Some((ch, cw)) => center_crop(&img, ch, cw, self.crop_rounding),
            None => img,
        })
    }

    /// Full preprocessing into a CHW float tensor's data (`3 × H × W`) and its `(H, W)`.
    pub fn preprocess(
        &self,
        img: &RgbImage,
    ) -> std::result::Result<(Vec<f32>, (usize, usize)), String> {
        let img = self.resize_and_crop(img)?;
        let (w, h) = (img.width, img.height);
        // transformers fuses rescale into normalise: (x − mean/r) / (std/r), in float32.
        let (sub, div) = match (self.rescale_factor, self.normalize) {
            (Some(r), true) => {
                let inv = (1.0 / r as f64) as f32;
                (self.mean.map(|m| m * inv), self.std.map(|s| s * inv))
            }
            (Some(r), false) => ([0.0; 3], [(1.0 / r as f64) as f32; 3]),
            (None, true) => (self.mean, self.std),
            (None, false) => ([0.0; 3], [1.0; 3]),
        };
        let mut out = vec![0f32; 3 * h * w];
        for c in 0..3 {
            for i in 0..h * w {
                out[c * h * w + i] = (img.data[i * 3 + c] as f32 - sub[c]) / div[c];
            }
        }
        Ok((out, (h, w)))
    }

    /// The `preprocessor_config.json` transformers reads back as the same processor.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let (kind, size) = match self.resize {
            Some(Resize::Exact(h, w)) => (
                "BlipImageProcessor",
                serde_json::json!({"height": h, "width": w}),
            ),
            Some(Resize::ShortestEdge(n)) => (
                "CLIPImageProcessor",
                serde_json::json!({"shortest_edge": n}),
            ),
            None => (
                "CLIPImageProcessor",
                serde_json::json!({"shortest_edge": 224}),
            ),
        };
        let (ch, cw) = self.crop.unwrap_or((224, 224));
        serde_json::json!({
            "image_processor_type": kind,
            "do_resize": self.resize.is_some(),
            "size": size,
            "resample": match self.filter { Filter::Bilinear => 2, Filter::Bicubic => 3 },
            "do_center_crop": self.crop.is_some(),
            "crop_size": {"height": ch, "width": cw},
            "do_rescale": self.rescale_factor.is_some(),
            "rescale_factor": self.rescale_factor.map_or(1.0 / 255.0, f64::from),
            "do_normalize": self.normalize,
            "image_mean": self.mean,
            "image_std": self.std,
            "do_convert_rgb": true,
        })
    }

    /// The `(height, width)` this processor produces, when it does not depend on the input.
    pub fn output_size(&self) -> Option<(usize, usize)> {
        match (self.crop, self.resize) {
            (Some(c), _) => Some(c),
            (None, Some(Resize::Exact(h, w))) => Some((h, w)),
            _ => None,
        }
    }
}

/// Where a centre crop starts when the margin (`size − crop`) is odd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CropRounding {
    /// `(size − crop) // 2`, transformers' image processors.
    Floor,
    /// `int(round((size − crop) / 2))` with Python's half-to-even `round`: torchvision's
    /// `CenterCrop`, which open_clip uses (margin 1 → 0, 3 → 2, 5 → 2, 7 → 4).
    HalfEven,
}

impl CropRounding {
    fn offset(self, margin: usize) -> usize {
        match self {
            CropRounding::Floor => margin / 2,
            // margin / 2 is k + ½ for odd margins: k when k is even, k + 1 when it is odd.
            CropRounding::HalfEven => {
                let k = margin / 2;
                if margin % 2 == 1 && k % 2 == 1 {
                    k + 1
                } else {
                    k
                }
            }
        }
    }
}

/// A centre crop as transformers' image processors (and torchvision) do it: zero-pad to at least
/// the crop size (extra pixel on the right/bottom), then take the window whose offset is the
/// margin halved and rounded by `rounding`.
pub fn center_crop(img: &RgbImage, ch: usize, cw: usize, rounding: CropRounding) -> RgbImage {
    let (w, h) = (img.width, img.height);
    let (pl, pt) = (cw.saturating_sub(w) / 2, ch.saturating_sub(h) / 2);
    let (pw, ph) = (w.max(cw), h.max(ch));
    let top = rounding.offset(ph - ch);
    let left = rounding.offset(pw - cw);
    let mut out = vec![0u8; cw * ch * 3];
    for y in 0..ch {
        let sy = (y + top) as isize - pt as isize;
        if sy < 0 || sy >= h as isize {
            continue;
        }
        for x in 0..cw {
            let sx = (x + left) as isize - pl as isize;
            if sx < 0 || sx >= w as isize {
                continue;
            }
            let s = (sy as usize * w + sx as usize) * 3;
            out[(y * cw + x) * 3..(y * cw + x) * 3 + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    RgbImage::new(cw, ch, out)
}

/// A model directory's image preprocessing: `preprocessor_config.json`, else the
/// `image_processor` section of the `processor_config.json` that transformers 5 writes from
/// `CLIPProcessor.save_pretrained`, else `None`.
pub fn processor_for_dir(dir: &Path) -> Result<Option<(ImageProcessor, PathBuf)>> {
    let path = dir.join("preprocessor_config.json");
    if path.is_file() {
        return Ok(Some((ImageProcessor::from_file(&path)?, path)));
    }
    let path = dir.join("processor_config.json");
    if path.is_file() {
        let value: serde_json::Value = crate::io::read_json(&path)?;
        if let Some(section) = value.get("image_processor") {
            let raw: RawConfig = serde_json::from_value(section.clone())
                .map_err(|e| Error::config(&path, format!("image_processor: {e}")))?;
            let p = ImageProcessor::from_raw(raw).map_err(|m| Error::config(&path, m))?;
            return Ok(Some((p, path)));
        }
    }
    Ok(None)
}

/// Saves an image as PNG, naming the file on failure.
pub fn save_png(path: &Path, img: &RgbImage) -> Result<()> {
    image::save_buffer(
        path,
        &img.data,
        img.width as u32,
        img.height as u32,
        image::ExtendedColorType::Rgb8,
    )
    .map_err(|e| Error::Image {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// Preprocesses decoded images into one `[N, 3, H, W]` tensor.
pub fn pixel_tensor(
    processor: &ImageProcessor,
    images: &[RgbImage],
    device: &candle_core::Device,
) -> candle_core::Result<candle_core::Tensor> {
    let mut data = Vec::new();
    let mut hw = (0, 0);
    for img in images {
        let (v, size) = processor.preprocess(img).map_err(candle_core::Error::msg)?;
        hw = size;
        data.extend(v);
    }
    candle_core::Tensor::from_vec(data, (images.len(), 3, hw.0, hw.1), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Python: `[int(round(m / 2.0)) for m in range(8)]` = [0, 0, 1, 2, 2, 2, 3, 4].
    #[test]
    fn half_even_crop_offsets_match_python_round() {
        let got: Vec<usize> = (0..8).map(|m| CropRounding::HalfEven.offset(m)).collect();
        assert_eq!(got, [0, 0, 1, 2, 2, 2, 3, 4]);
        let floor: Vec<usize> = (0..8).map(|m| CropRounding::Floor.offset(m)).collect();
        assert_eq!(floor, [0, 0, 1, 1, 2, 2, 3, 3]);
    }

    #[test]
    fn composite_matches_pil_on_the_extremes() {
        assert_eq!(composite_on_white(10, 255), 10);
        assert_eq!(composite_on_white(10, 0), 255);
        // (100·128 + 255·127) / 255 = 177.2 → 177.
        assert_eq!(composite_on_white(100, 128), 177);
    }

    #[test]
    fn center_crop_pads_small_images() {
        let img = RgbImage::new(1, 1, vec![9, 9, 9]);
        let out = center_crop(&img, 3, 2, CropRounding::Floor);
        // Pad left (2-1)/2 = 0, top (3-1)/2 = 1: the pixel lands at (x=0, y=1).
        assert_eq!(out.data[(2) * 3], 9);
        assert_eq!(out.data.iter().filter(|&&v| v == 9).count(), 3);
    }

    #[test]
    fn shortest_edge_truncates_the_long_side() {
        let p = ImageProcessor {
            crop: None,
            crop_rounding: CropRounding::Floor,
            ..ImageProcessor::clip_default(224)
        };
        let img = RgbImage::new(451, 300, vec![0; 451 * 300 * 3]);
        let out = p.resize_and_crop(&img).unwrap();
        // int(224 · 451 / 300) = 336.
        assert_eq!((out.width, out.height), (336, 224));
    }
}
