//! The built-in synthetic image–caption set (DESIGN.md §5): anti-aliased coloured shapes on
//! noisy backgrounds, captioned from several templates and paraphrases, deterministic from a
//! seed and an index. A fixed list of colour–shape pairs never appears in training data, so
//! zero-shot accuracy on them measures compositional generalisation.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::image::RgbImage;
use crate::rng;

/// Colour names and their base RGB (jittered per object).
pub const COLORS: [(&str, [u8; 3]); 8] = [
    ("red", [215, 35, 35]),
    ("green", [35, 160, 55]),
    ("blue", [35, 75, 215]),
    ("yellow", [235, 210, 30]),
    ("purple", [130, 50, 175]),
    ("orange", [245, 135, 20]),
    ("pink", [245, 125, 195]),
    ("cyan", [30, 200, 215]),
];

pub const SHAPES: [&str; 6] = ["circle", "square", "triangle", "star", "cross", "diamond"];
pub const SIZES: [&str; 2] = ["small", "large"];
pub const POSITIONS: [&str; 5] = ["left", "right", "top", "bottom", "center"];

/// Colour–shape pairs that never appear in training data (each colour and each shape at most
/// once, so every word is still seen with other partners).
pub const HELD_OUT: [(&str, &str); 6] = [
    ("red", "star"),
    ("green", "cross"),
    ("blue", "triangle"),
    ("yellow", "circle"),
    ("purple", "square"),
    ("orange", "diamond"),
];

/// Anchor of each position, as a fraction of the canvas (x, y).
const ANCHORS: [(f32, f32); 5] = [(0.2, 0.5), (0.8, 0.5), (0.5, 0.2), (0.5, 0.8), (0.5, 0.5)];

/// One object as the manifest records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectSpec {
    pub color: String,
    pub shape: String,
    pub size: String,
    pub position: String,
}

impl ObjectSpec {
    /// The zero-shot class name, "COLOR SHAPE".
    pub fn class_name(&self) -> String {
        format!("{} {}", self.color, self.shape)
    }
}

/// Which images a generator makes.
#[derive(Clone, Debug)]
pub struct ShapesConfig {
    /// Side of the square canvas in pixels.
    pub image_size: usize,
    pub min_objects: usize,
    pub max_objects: usize,
    /// Which colour–shape pairs may appear.
    pub pairs: PairSet,
    /// Pair up consecutive samples (2k, 2k+1) that differ only in their shapes: in-batch hard
    /// negatives, without which contrastive training learns colour, size and position long
    /// before shape (colour alone already separates most captions of a batch).
    pub twins: bool,
    /// Relative frequency of each object count from `min_objects` to `max_objects`; empty means
    /// uniform. Zero-shot classification is judged on single-object images, and training on
    /// more of them (e.g. weights 2:1:1 for 1–3 objects) teaches shape far sooner.
    pub object_weights: Vec<f32>,
    /// Fraction of samples whose caption is replaced by another scene's (web alt-text noise,
    /// as ALBEF §3.3 and BLIP §3.3 describe it); each sample's draw is seeded by its index.
    /// Evaluation sets keep 0.
    pub caption_noise: f32,
}

/// A subset of the colour × shape classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairSet {
    /// Every pair except [`HELD_OUT`] (training data).
    Seen,
    /// Only [`HELD_OUT`] pairs.
    HeldOut,
    /// All pairs.
    All,
}

impl PairSet {
    fn allows(self, color: usize, shape: usize) -> bool {
        let held = is_held_out(COLORS[color].0, SHAPES[shape]);
        match self {
            PairSet::Seen => !held,
            PairSet::HeldOut => held,
            PairSet::All => true,
        }
    }
}

impl Default for ShapesConfig {
    fn default() -> Self {
        Self {
            image_size: 64,
            min_objects: 1,
            max_objects: 3,
            pairs: PairSet::Seen,
            twins: false,
            object_weights: Vec::new(),
            caption_noise: 0.0,
        }
    }
}

pub fn is_held_out(color: &str, shape: &str) -> bool {
    HELD_OUT.iter().any(|&(c, s)| c == color && s == shape)
}

/// The indices into [`COLORS`] and [`SHAPES`] of a "COLOR SHAPE" class name.
pub fn class_indices(class: &str) -> Option<(usize, usize)> {
    let (c, s) = class.split_once(' ')?;
    Some((
        COLORS.iter().position(|k| k.0 == c)?,
        SHAPES.iter().position(|&k| k == s)?,
    ))
}

/// All "COLOR SHAPE" classes of a pair set, in colour-major order.
pub fn classes(pairs: PairSet) -> Vec<String> {
    let mut out = Vec::new();
    for (ci, (c, _)) in COLORS.iter().enumerate() {
        for (si, s) in SHAPES.iter().enumerate() {
            if pairs.allows(ci, si) {
                out.push(format!("{c} {s}"));
            }
        }
    }
    out
}

/// One generated image with its caption and objects.
#[derive(Clone, Debug)]
pub struct ShapesSample {
    pub image: RgbImage,
    pub caption: String,
    pub objects: Vec<ObjectSpec>,
    /// The scene and its caption's claims, to tell which captions are true of which image.
    pub truth: SceneTruth,
    /// The caption is another scene's and false of this image ([`ShapesConfig::caption_noise`]).
    pub noisy: bool,
}

/// What a caption asserts of one object: colour and shape always, size and position only when
/// the caption words them (indices into [`COLORS`], [`SHAPES`], [`SIZES`], [`POSITIONS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Claim {
    color: usize,
    shape: usize,
    size: Option<usize>,
    position: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Claims {
    objects: Vec<Claim>,
    /// "… and … above it": where the second object lies relative to the first.
    relation: Option<&'static str>,
}

/// A generated scene with what its caption claims. Captions name every object of their image,
/// so a caption is true of a scene when it names as many objects and they can be paired one to
/// one with every worded attribute (and relation) right. Training uses it as LAVIS uses
/// `image_id`: a caption true of an image is never drawn as that image's hard negative.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SceneTruth {
    objects: Vec<Placed>,
    claims: Claims,
}

impl SceneTruth {
    /// Whether the caption of `other` is true of this scene.
    pub fn caption_fits(&self, other: &SceneTruth) -> bool {
        let claims = &other.claims;
        if claims.objects.len() != self.objects.len() {
            return false;
        }
        let mut used = vec![false; self.objects.len()];
        let mut assigned = vec![0usize; claims.objects.len()];
        self.pair_up(claims, 0, &mut used, &mut assigned)
    }

    /// Backtracking over one-to-one pairings of claims `k..` with unused objects.
    fn pair_up(&self, c: &Claims, k: usize, used: &mut [bool], assigned: &mut [usize]) -> bool {
        if k == c.objects.len() {
            return match c.relation {
                Some(r) => {
                    let (a, b) = (&self.objects[assigned[0]], &self.objects[assigned[1]]);
                    relation_of(a.position, b.position) == r
                }
                None => true,
            };
        }
        let claim = c.objects[k];
        for (i, o) in self.objects.iter().enumerate() {
            let fits = !used[i]
                && o.color == claim.color
                && o.shape == claim.shape
                && claim.size.is_none_or(|s| s == o.size)
                && claim.position.is_none_or(|p| p == o.position);
            if fits {
                used[i] = true;
                assigned[k] = i;
                if self.pair_up(c, k + 1, used, assigned) {
                    return true;
                }
                used[i] = false;
            }
        }
        false
    }
}

impl crate::data::batch::CaptionTruth for SceneTruth {
    fn caption_fits(&self, other: &dyn crate::data::batch::CaptionTruth) -> bool {
        other
            .as_any()
            .downcast_ref::<SceneTruth>()
            .is_some_and(|o| SceneTruth::caption_fits(self, o))
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    /// The tag, the objects (colour, shape, size, position), then the claims (colour, shape,
    /// size and position or 255 when unworded) and the relation (an index into [`RELATIONS`]
    /// or 255), one byte each.
    fn encode(&self) -> Vec<u8> {
        let mut b = vec![SCENE_TRUTH_TAG, self.objects.len() as u8];
        for o in &self.objects {
            b.extend([o.color, o.shape, o.size, o.position].map(|x| x as u8));
        }
        b.push(self.claims.objects.len() as u8);
        let opt = |x: Option<usize>| x.map_or(NONE, |v| v as u8);
        for c in &self.claims.objects {
            b.extend([c.color as u8, c.shape as u8, opt(c.size), opt(c.position)]);
        }
        let rel = self
            .claims
            .relation
            .and_then(|r| RELATIONS.iter().position(|x| *x == r));
        b.push(opt(rel));
        b
    }
}

/// The kind tag of an encoded [`SceneTruth`].
pub const SCENE_TRUTH_TAG: u8 = 1;
/// "Not worded" in an encoded claim.
const NONE: u8 = 255;
/// Every relation [`relation_of`] names.
const RELATIONS: [&str; 4] = ["above it", "below it", "to its left", "to its right"];

impl SceneTruth {
    /// Reads [`crate::data::batch::CaptionTruth::encode`]'s bytes after the tag; `None` when
    /// they do not describe a scene of this generator.
    pub fn decode(b: &[u8]) -> Option<SceneTruth> {
        let mut it = b.iter().copied();
        let mut next = || it.next();
        let index = |x: u8, n: usize| ((x as usize) < n).then_some(x as usize);
        let opt = |x: u8, n: usize| match x {
            NONE => Some(None),
            _ => index(x, n).map(Some),
        };
        let mut objects = Vec::new();
        for _ in 0..next()? {
            objects.push(Placed {
                color: index(next()?, COLORS.len())?,
                shape: index(next()?, SHAPES.len())?,
                size: index(next()?, SIZES.len())?,
                position: index(next()?, POSITIONS.len())?,
            });
        }
        let mut claims = Vec::new();
        for _ in 0..next()? {
            claims.push(Claim {
                color: index(next()?, COLORS.len())?,
                shape: index(next()?, SHAPES.len())?,
                size: opt(next()?, SIZES.len())?,
                position: opt(next()?, POSITIONS.len())?,
            });
        }
        let relation = opt(next()?, RELATIONS.len())?.map(|r| RELATIONS[r]);
        if next().is_some() {
            return None;
        }
        Some(SceneTruth {
            objects,
            claims: Claims {
                objects: claims,
                relation,
            },
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Placed {
    color: usize,
    shape: usize,
    size: usize,
    position: usize,
}

/// Generates sample `index` of the stream `seed` (deterministic).
pub fn generate(cfg: &ShapesConfig, seed: u64, index: u64) -> ShapesSample {
    let mut s = generate_inner(cfg, seed, index, None);
    if cfg.caption_noise > 0.0 {
        add_caption_noise(cfg, seed, index, &mut s);
    }
    s
}

/// Stream indices of the scenes that donate noisy captions: far beyond any training position,
/// so a donor is never a sample of the run itself.
const DONOR_BASE: u64 = 1 << 62;

/// With probability `cfg.caption_noise` (drawn from the sample's own stream), gives `s` the
/// caption of another generated scene that is false of `s`'s image; the truth then pairs this
/// image's objects with the donor caption's claims.
fn add_caption_noise(cfg: &ShapesConfig, seed: u64, index: u64, s: &mut ShapesSample) {
    let mut r = rng::stream(seed, rng::SHAPES_NOISE, index);
    if r.random::<f32>() >= cfg.caption_noise {
        return;
    }
    let donor_cfg = ShapesConfig {
        twins: false,
        caption_noise: 0.0,
        ..cfg.clone()
    };
    // A donor caption that happens to be true of this image is drawn again (rare: the same
    // objects, with every worded attribute equal).
    for _ in 0..16 {
        let d = generate_inner(
            &donor_cfg,
            seed,
            DONOR_BASE + r.random_range(0..1u64 << 40),
            None,
        );
        if !s.truth.caption_fits(&d.truth) {
            s.caption = d.caption;
            s.truth.claims = d.truth.claims;
            s.noisy = true;
            return;
        }
    }
}

/// A single-object image of the class "COLOR SHAPE" (by index into [`COLORS`] and [`SHAPES`]),
/// with random size, position and background: the zero-shot evaluation images.
pub fn generate_class(
    size: usize,
    seed: u64,
    index: u64,
    color: usize,
    shape: usize,
) -> ShapesSample {
    let cfg = ShapesConfig {
        image_size: size,
        min_objects: 1,
        max_objects: 1,
        pairs: PairSet::All,
        twins: false,
        object_weights: Vec::new(),
        caption_noise: 0.0,
    };
    generate_inner(&cfg, seed, index, Some((color, shape)))
}

/// The number of objects of a sample, drawn with `cfg.object_weights`.
fn object_count(cfg: &ShapesConfig, rng: &mut ChaCha8Rng) -> usize {
    let (lo, hi) = (cfg.min_objects, cfg.max_objects.max(cfg.min_objects));
    let w = &cfg.object_weights;
    if w.len() != hi - lo + 1 || w.iter().any(|&x| x < 0.0) || w.iter().sum::<f32>() <= 0.0 {
        return rng.random_range(lo..=hi);
    }
    let mut u = rng.random_range(0.0..w.iter().sum::<f32>());
    for (k, &x) in w.iter().enumerate() {
        if u < x {
            return lo + k;
        }
        u -= x;
    }
    hi
}

/// Draws a shape for `color` allowed by `pairs`, different from `avoid` when given.
fn draw_shape(
    rng: &mut ChaCha8Rng,
    pairs: PairSet,
    color: usize,
    avoid: Option<usize>,
) -> Option<usize> {
    let options: Vec<usize> = (0..SHAPES.len())
        .filter(|&s| pairs.allows(color, s) && Some(s) != avoid)
        .collect();
    (!options.is_empty()).then(|| options[rng.random_range(0..options.len())])
}

fn generate_inner(
    cfg: &ShapesConfig,
    seed: u64,
    index: u64,
    forced: Option<(usize, usize)>,
) -> ShapesSample {
    // With twins, samples 2k and 2k+1 share layout, colours, sizes, background and caption
    // template, and differ only in their shapes.
    let layout_index = if cfg.twins { index / 2 } else { index };
    let mut rng = rng::stream(seed, rng::SHAPES_SCENE, layout_index);
    let n = object_count(cfg, &mut rng);
    let mut positions: Vec<usize> = (0..POSITIONS.len()).collect();
    // Partial Fisher–Yates: distinct positions for the objects.
    for i in 0..n.min(positions.len()) {
        let j = rng.random_range(i..positions.len());
        positions.swap(i, j);
    }
    let mut objects = Vec::with_capacity(n);
    for &position in positions.iter().take(n) {
        let (color, size) = match forced {
            Some((c, _)) => (c, rng.random_range(0..SIZES.len())),
            None => {
                // A colour with at least one allowed shape.
                let c = loop {
                    let c = rng.random_range(0..COLORS.len());
                    if (0..SHAPES.len()).any(|s| cfg.pairs.allows(c, s)) {
                        break c;
                    }
                };
                (c, rng.random_range(0..SIZES.len()))
            }
        };
        objects.push(Placed {
            color,
            shape: forced.map_or(0, |f| f.1),
            size,
            position,
        });
    }
    if forced.is_none() {
        let shapes_of = |i: u64, avoid: Option<&[usize]>| -> Vec<usize> {
            let mut r = rng::stream(seed, rng::SHAPES_SHAPE, i);
            objects
                .iter()
                .enumerate()
                .map(|(k, o)| {
                    let a = avoid.map(|v| v[k]);
                    draw_shape(&mut r, cfg.pairs, o.color, a)
                        .or_else(|| draw_shape(&mut r, cfg.pairs, o.color, None))
                        .expect("every colour drawn has an allowed shape")
                })
                .collect()
        };
        let shapes = if cfg.twins && index % 2 == 1 {
            let first = shapes_of(index - 1, None);
            shapes_of(index, Some(&first))
        } else {
            shapes_of(index, None)
        };
        for (o, s) in objects.iter_mut().zip(shapes) {
            o.shape = s;
        }
    }
    let image = render(cfg.image_size, &objects, &mut rng);
    let (caption, claims) = caption(&objects, &mut rng);
    let truth = SceneTruth {
        objects: objects.clone(),
        claims,
    };
    let objects = objects
        .iter()
        .map(|o| ObjectSpec {
            color: COLORS[o.color].0.into(),
            shape: SHAPES[o.shape].into(),
            size: SIZES[o.size].into(),
            position: POSITIONS[o.position].into(),
        })
        .collect();
    ShapesSample {
        image,
        caption,
        objects,
        truth,
        noisy: false,
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering

/// Outline of a shape as a polygon in unit coordinates (radius 1), or `None` for the circle.
fn outline(shape: usize) -> Option<Vec<(f32, f32)>> {
    use std::f32::consts::PI;
    let regular = |n: usize, r: f32, phase: f32| -> Vec<(f32, f32)> {
        (0..n)
            .map(|k| {
                let a = phase + 2.0 * PI * k as f32 / n as f32;
                (r * a.cos(), r * a.sin())
            })
            .collect()
    };
    match SHAPES[shape] {
        "circle" => None,
        "square" => Some(regular(4, 1.2, PI / 4.0)),
        // Pointing up (image y grows downwards).
        "triangle" => Some(regular(3, 1.25, -PI / 2.0)),
        "star" => Some(
            (0..10)
                .map(|k| {
                    let r = if k % 2 == 0 { 1.3 } else { 0.55 };
                    let a = -PI / 2.0 + PI * k as f32 / 5.0;
                    (r * a.cos(), r * a.sin())
                })
                .collect(),
        ),
        // A plus sign: arms of half-width 0.4 reaching 1.15.
        "cross" => {
            let (a, w) = (1.15f32, 0.4f32);
            Some(vec![
                (-w, -a),
                (w, -a),
                (w, -w),
                (a, -w),
                (a, w),
                (w, w),
                (w, a),
                (-w, a),
                (-w, w),
                (-a, w),
                (-a, -w),
                (-w, -w),
            ])
        }
        "diamond" => Some(vec![(0.0, -1.3), (0.85, 0.0), (0.0, 1.3), (-0.85, 0.0)]),
        other => unreachable!("unknown shape {other}"),
    }
}

/// Even–odd point-in-polygon test.
fn inside(poly: &[(f32, f32)], x: f32, y: f32) -> bool {
    let mut c = false;
    let mut j = poly.len() - 1;
    for i in 0..poly.len() {
        let (xi, yi) = poly[i];
        let (xj, yj) = poly[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            c = !c;
        }
        j = i;
    }
    c
}

/// Supersampling per pixel edge: 4×4 samples give 17 coverage levels of anti-aliasing.
const SS: usize = 4;

fn render(size: usize, objects: &[Placed], rng: &mut ChaCha8Rng) -> RgbImage {
    let s = size as f32;
    // Background: a low-saturation tint, a linear gradient and per-pixel noise.
    let base: f32 = rng.random_range(70.0..190.0);
    let tint: [f32; 3] = std::array::from_fn(|_| rng.random_range(-18.0..18.0));
    let grad: (f32, f32) = (rng.random_range(-30.0..30.0), rng.random_range(-30.0..30.0));
    let noise: f32 = rng.random_range(4.0..14.0);
    let mut img = vec![0f32; size * size * 3];
    for y in 0..size {
        for x in 0..size {
            let g = grad.0 * (x as f32 / s - 0.5) + grad.1 * (y as f32 / s - 0.5);
            for (c, t) in tint.iter().enumerate() {
                img[(y * size + x) * 3 + c] = base + t + g + rng.random_range(-noise..noise);
            }
        }
    }
    for o in objects {
        let (ax, ay) = ANCHORS[o.position];
        let cx = (ax + rng.random_range(-0.03..0.03)) * s;
        let cy = (ay + rng.random_range(-0.03..0.03)) * s;
        let r = if o.size == 0 {
            rng.random_range(0.095..0.11)
        } else {
            rng.random_range(0.15..0.17)
        } * s;
        let rot: f32 = rng.random_range(-0.2..0.2);
        let (sin, cos) = rot.sin_cos();
        let rgb: [f32; 3] = std::array::from_fn(|c| {
            (COLORS[o.color].1[c] as f32 + rng.random_range(-14.0..14.0)).clamp(0.0, 255.0)
        });
        let poly = outline(o.shape);
        let reach = 1.35 * r;
        let x0 = ((cx - reach).floor().max(0.0)) as usize;
        let x1 = ((cx + reach).ceil() as usize).min(size);
        let y0 = ((cy - reach).floor().max(0.0)) as usize;
        let y1 = ((cy + reach).ceil() as usize).min(size);
        for py in y0..y1 {
            for px in x0..x1 {
                let mut hits = 0;
                for sy in 0..SS {
                    for sx in 0..SS {
                        // Sample point relative to the centre, rotated into shape coordinates.
                        let dx = (px as f32 + (sx as f32 + 0.5) / SS as f32 - cx) / r;
                        let dy = (py as f32 + (sy as f32 + 0.5) / SS as f32 - cy) / r;
                        let (ux, uy) = (cos * dx + sin * dy, -sin * dx + cos * dy);
                        let hit = match &poly {
                            None => ux * ux + uy * uy <= 1.0,
                            Some(p) => inside(p, ux, uy),
                        };
                        hits += usize::from(hit);
                    }
                }
                if hits > 0 {
                    let a = hits as f32 / (SS * SS) as f32;
                    for (c, v) in rgb.iter().enumerate() {
                        let p = &mut img[(py * size + px) * 3 + c];
                        *p = *p * (1.0 - a) + v * a;
                    }
                }
            }
        }
    }
    let data = img
        .iter()
        .map(|v| v.round().clamp(0.0, 255.0) as u8)
        .collect();
    RgbImage::new(size, size, data)
}

// ---------------------------------------------------------------------------------------------
// Captions

fn pick<'a>(rng: &mut ChaCha8Rng, options: &[&'a str]) -> &'a str {
    options[rng.random_range(0..options.len())]
}

fn article(next: &str) -> &'static str {
    if next.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// "a big red circle" / "an orange square" (the size word is sometimes left out), and what it
/// claims of the object.
fn noun_phrase(o: &Placed, rng: &mut ChaCha8Rng) -> (String, Claim) {
    let size = match o.size {
        0 => pick(rng, &["small", "little", "tiny", ""]),
        _ => pick(rng, &["large", "big", "large", ""]),
    };
    let words: Vec<&str> = [size, COLORS[o.color].0, SHAPES[o.shape]]
        .into_iter()
        .filter(|w| !w.is_empty())
        .collect();
    let claim = Claim {
        color: o.color,
        shape: o.shape,
        size: (!size.is_empty()).then_some(o.size),
        position: None,
    };
    (format!("{} {}", article(words[0]), words.join(" ")), claim)
}

fn where_phrase(position: usize, rng: &mut ChaCha8Rng) -> &'static str {
    match POSITIONS[position] {
        "left" => pick(rng, &["on the left", "at the left", "to the left"]),
        "right" => pick(rng, &["on the right", "at the right", "to the right"]),
        "top" => pick(rng, &["at the top", "on top", "near the top"]),
        "bottom" => pick(rng, &["at the bottom", "near the bottom"]),
        _ => pick(rng, &["in the center", "in the middle"]),
    }
}

/// Where `b` lies relative to `a`, from their anchors.
fn relation_of(a: usize, b: usize) -> &'static str {
    let (ax, ay) = ANCHORS[a];
    let (bx, by) = ANCHORS[b];
    let (dx, dy) = (bx - ax, by - ay);
    if dy.abs() >= dx.abs() {
        if dy < 0.0 {
            "above it"
        } else {
            "below it"
        }
    } else if dx < 0.0 {
        "to its left"
    } else {
        "to its right"
    }
}

/// The caption of `objects` and what it claims: every object with its colour and shape, its size
/// and position where worded, and for "… and … above it" where the second lies from the first.
fn caption(objects: &[Placed], rng: &mut ChaCha8Rng) -> (String, Claims) {
    let (np, mut claims): (Vec<String>, Vec<Claim>) =
        objects.iter().map(|o| noun_phrase(o, rng)).unzip();
    let wp: Vec<&str> = objects
        .iter()
        .map(|o| where_phrase(o.position, rng))
        .collect();
    let label = |o: &Placed| POSITIONS[o.position];
    let mut relation = None;
    let mut placed = true;
    let text = match objects.len() {
        1 => match rng.random_range(0..5) {
            0 => format!("{} {}", np[0], wp[0]),
            1 => format!("{}: {}", label(&objects[0]), np[0]),
            2 => format!("there is {} {}", np[0], wp[0]),
            3 => format!("a photo of {} {}", np[0], wp[0]),
            _ => {
                placed = false;
                np[0].clone()
            }
        },
        2 => match rng.random_range(0..3) {
            0 => format!("{} {} and {} {}", np[0], wp[0], np[1], wp[1]),
            1 => format!(
                "{}: {}, {}: {}",
                label(&objects[0]),
                np[0],
                label(&objects[1]),
                np[1]
            ),
            _ => {
                placed = false;
                let r = relation_of(objects[0].position, objects[1].position);
                relation = Some(r);
                format!("{} and {} {}", np[0], np[1], r)
            }
        },
        _ => {
            let parts: Vec<String> = np
                .iter()
                .zip(&wp)
                .map(|(n, w)| format!("{n} {w}"))
                .collect();
            let (last, init) = parts.split_last().expect("at least one object");
            format!("{} and {last}", init.join(", "))
        }
    };
    if placed {
        for (c, o) in claims.iter_mut().zip(objects) {
            c.position = Some(o.position);
        }
    }
    (
        text,
        Claims {
            objects: claims,
            relation,
        },
    )
}

/// Every word the captions and the standard prompt templates use, for a word-level tokenizer.
pub fn vocabulary() -> Vec<String> {
    let mut words: Vec<&str> = vec![
        "a", "an", "the", "and", "there", "is", "photo", "of", "on", "at", "to", "near", "in",
        "center", "middle", "above", "below", "it", "its", "left", "right", "top", "bottom",
        "small", "little", "tiny", "large", "big", "image", "picture", "shape", "with", "colored",
        ":", ",", ".",
    ];
    words.extend(COLORS.iter().map(|c| c.0));
    words.extend(SHAPES);
    let mut out: Vec<String> = Vec::new();
    for w in words {
        if !out.iter().any(|o| o == w) {
            out.push(w.to_string());
        }
    }
    out
}

/// Prompt templates for zero-shot classification on shapes (class = "COLOR SHAPE").
pub const TEMPLATES: [&str; 4] = [
    "a {}.",
    "a photo of a {}.",
    "an image of a {}.",
    "a picture of a {}.",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(color: usize, shape: usize, size: usize, position: usize) -> Placed {
        Placed {
            color,
            shape,
            size,
            position,
        }
    }

    fn scene(objects: Vec<Placed>) -> SceneTruth {
        SceneTruth {
            objects,
            claims: Claims {
                objects: Vec::new(),
                relation: None,
            },
        }
    }

    fn said(objects: Vec<Claim>, relation: Option<&'static str>) -> SceneTruth {
        SceneTruth {
            objects: Vec::new(),
            claims: Claims { objects, relation },
        }
    }

    fn claim(color: usize, shape: usize, size: Option<usize>, position: Option<usize>) -> Claim {
        Claim {
            color,
            shape,
            size,
            position,
        }
    }

    /// Indices: red 0, blue 2; circle 0, square 1; small 0, large 1; left 0, right 1, top 2,
    /// bottom 3, center 4.
    #[test]
    fn a_caption_is_true_of_the_scenes_it_describes() {
        let small_red_circle_left = scene(vec![placed(0, 0, 0, 0)]);
        let large_red_circle_top = scene(vec![placed(0, 0, 1, 2)]);
        // "a red circle": any single red circle.
        let vague = said(vec![claim(0, 0, None, None)], None);
        assert!(small_red_circle_left.caption_fits(&vague));
        assert!(large_red_circle_top.caption_fits(&vague));
        // "a small red circle on the left": size and position count.
        let exact = said(vec![claim(0, 0, Some(0), Some(0))], None);
        assert!(small_red_circle_left.caption_fits(&exact));
        assert!(!large_red_circle_top.caption_fits(&exact));
        assert!(
            !scene(vec![placed(0, 0, 1, 0)]).caption_fits(&exact),
            "size"
        );
        assert!(
            !scene(vec![placed(2, 0, 0, 0)]).caption_fits(&exact),
            "colour"
        );
        assert!(
            !scene(vec![placed(0, 1, 0, 0)]).caption_fits(&exact),
            "shape"
        );
        // Captions name every object: one red circle is not a scene of two objects.
        let two = scene(vec![placed(0, 0, 0, 0), placed(2, 1, 1, 1)]);
        assert!(!two.caption_fits(&vague));
        // "a blue square and a red circle" in either order, positions unworded.
        let pair = said(vec![claim(2, 1, None, None), claim(0, 0, None, None)], None);
        assert!(two.caption_fits(&pair));
        // "a red circle and a blue square to its right": the square lies right of the circle.
        let rel = said(
            vec![claim(0, 0, None, None), claim(2, 1, None, None)],
            Some("to its right"),
        );
        assert!(two.caption_fits(&rel));
        let swapped = scene(vec![placed(0, 0, 0, 1), placed(2, 1, 1, 0)]);
        assert!(!swapped.caption_fits(&rel));
        // "a red circle at the bottom and a red circle at the top": pairing is one to one.
        let twins = said(
            vec![claim(0, 0, None, Some(3)), claim(0, 0, None, Some(2))],
            None,
        );
        assert!(scene(vec![placed(0, 0, 0, 2), placed(0, 0, 1, 3)]).caption_fits(&twins));
        assert!(!scene(vec![placed(0, 0, 0, 2), placed(0, 0, 1, 2)]).caption_fits(&twins));
    }

    #[test]
    fn every_generated_caption_is_true_of_its_own_scene_only_as_worded() {
        let cfg = ShapesConfig::default();
        let samples: Vec<ShapesSample> = (0..400).map(|i| generate(&cfg, 3, i)).collect();
        let mut others = 0;
        for (i, a) in samples.iter().enumerate() {
            assert!(a.truth.caption_fits(&a.truth), "{}", a.caption);
            for b in &samples[i + 1..] {
                if a.truth.caption_fits(&b.truth) {
                    others += 1;
                    assert_eq!(a.objects.len(), b.objects.len());
                }
            }
        }
        // Vague captions ("a red circle") are true of other scenes too, but not of most.
        assert!(others > 0 && others < 400, "{others}");
    }

    #[test]
    fn deterministic_and_index_independent() {
        let cfg = ShapesConfig::default();
        let a = generate(&cfg, 7, 3);
        let b = generate(&cfg, 7, 3);
        assert_eq!(a.image, b.image);
        assert_eq!(a.caption, b.caption);
        assert_ne!(generate(&cfg, 7, 4).image, a.image);
        assert_ne!(generate(&cfg, 8, 3).image, a.image);
    }

    /// Encoded and decoded, a scene's truth is equal and answers every caption as before.
    #[test]
    fn scene_truths_survive_encoding() {
        use crate::data::batch::{decode_truth, CaptionTruth};
        let cfg = ShapesConfig {
            max_objects: 3,
            ..ShapesConfig::default()
        };
        let truths: Vec<SceneTruth> = (0..60).map(|k| generate(&cfg, 5, k).truth).collect();
        for a in &truths {
            let bytes = CaptionTruth::encode(a);
            let back = decode_truth(&bytes).expect("decodes");
            let back = back.as_any().downcast_ref::<SceneTruth>().unwrap();
            assert_eq!(back, a);
            for b in &truths {
                assert_eq!(back.caption_fits(b), a.caption_fits(b));
            }
            assert!(decode_truth(&bytes[..bytes.len() - 1]).is_none());
            assert!(SceneTruth::decode(&[1, 9, 9, 9, 9]).is_none());
        }
    }

    #[test]
    fn twins_differ_only_in_shape() {
        let cfg = ShapesConfig {
            twins: true,
            ..ShapesConfig::default()
        };
        for k in 0..50 {
            let (a, b) = (generate(&cfg, 4, 2 * k), generate(&cfg, 4, 2 * k + 1));
            assert_eq!(a.objects.len(), b.objects.len());
            for (x, y) in a.objects.iter().zip(&b.objects) {
                assert_eq!(
                    (&x.color, &x.size, &x.position),
                    (&y.color, &y.size, &y.position)
                );
                assert_ne!(x.shape, y.shape, "twin {k}");
                assert!(!is_held_out(&y.color, &y.shape));
            }
        }
    }

    /// Caption noise: about the asked fraction of samples (binomial: 2000 draws at 0.3 lie
    /// within ±0.04 with probability > 0.99), every noisy caption false of its image, images
    /// and clean samples exactly as without noise.
    #[test]
    fn caption_noise_swaps_a_seeded_fraction_of_captions_for_false_ones() {
        let clean_cfg = ShapesConfig {
            twins: true,
            ..ShapesConfig::default()
        };
        let noisy_cfg = ShapesConfig {
            caption_noise: 0.3,
            ..clean_cfg.clone()
        };
        let mut noisy = 0;
        for i in 0..2000 {
            let (c, n) = (generate(&clean_cfg, 7, i), generate(&noisy_cfg, 7, i));
            assert_eq!(c.image.data, n.image.data);
            assert_eq!(c.objects, n.objects);
            assert!(!c.noisy);
            if n.noisy {
                noisy += 1;
                assert!(!c.truth.caption_fits(&n.truth), "{i}: {:?}", n.caption);
                assert_ne!(c.caption, n.caption);
            } else {
                assert_eq!(c.caption, n.caption);
                assert_eq!(c.truth, n.truth);
            }
        }
        let f = noisy as f64 / 2000.0;
        assert!((f - 0.3).abs() < 0.04, "{f}");
        assert_eq!(
            generate(&noisy_cfg, 7, 11).caption,
            generate(&noisy_cfg, 7, 11).caption
        );
    }

    #[test]
    fn training_pairs_exclude_the_held_out_list() {
        let cfg = ShapesConfig::default();
        for i in 0..500 {
            for o in generate(&cfg, 1, i).objects {
                assert!(!is_held_out(&o.color, &o.shape), "{o:?} at {i}");
            }
        }
        let held = ShapesConfig {
            pairs: PairSet::HeldOut,
            max_objects: 1,
            ..cfg
        };
        for i in 0..50 {
            let o = &generate(&held, 1, i).objects[0];
            assert!(is_held_out(&o.color, &o.shape));
        }
        assert_eq!(
            classes(PairSet::Seen).len() + classes(PairSet::HeldOut).len(),
            48
        );
    }

    #[test]
    fn captions_name_every_object_and_use_known_words() {
        let cfg = ShapesConfig::default();
        let vocab = vocabulary();
        for i in 0..300 {
            let s = generate(&cfg, 2, i);
            for o in &s.objects {
                assert!(
                    s.caption.contains(&o.color) && s.caption.contains(&o.shape),
                    "{}",
                    s.caption
                );
            }
            for w in s.caption.replace([':', ','], " ").split_whitespace() {
                assert!(vocab.iter().any(|v| v == w), "{w:?} in {:?}", s.caption);
            }
        }
    }

    #[test]
    fn objects_are_drawn_in_their_colour() {
        // A single large object at the centre: the centre pixel has the object's hue.
        let cfg = ShapesConfig {
            max_objects: 1,
            pairs: PairSet::All,
            ..ShapesConfig::default()
        };
        let mut checked = 0;
        for i in 0..200 {
            let s = generate(&cfg, 3, i);
            let o = &s.objects[0];
            if o.position != "center" || o.size != "large" {
                continue;
            }
            let c = (32 * 64 + 32) * 3;
            let px = &s.image.data[c..c + 3];
            let want = COLORS.iter().find(|k| k.0 == o.color).unwrap().1;
            let dist: i32 = px
                .iter()
                .zip(want)
                .map(|(&a, b)| (a as i32 - b as i32).abs())
                .sum();
            assert!(dist < 60, "{o:?}: {px:?} vs {want:?}");
            checked += 1;
        }
        assert!(checked > 3);
    }
}
