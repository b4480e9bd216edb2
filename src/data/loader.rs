//! The training loader: worker threads decode, augment and tokenise whole batches ahead of the
//! trainer (bounded prefetch), in an order fixed by the seed alone, so a run and its resumption
//! see the same batches. Corrupt or missing samples are skipped and reported with the batch.
//!
//! Map-style sources (shapes, manifests) give batch k to worker k mod W, and the trainer reads
//! the workers round-robin. A tar stream is read by one thread (shard order and a shuffle
//! buffer seeded per epoch) that hands raw batches round-robin to the decode workers.

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::batch::{Batch, CaptionTruth};
use super::image::{decode_rgb, load_rgb, ImageProcessor, RgbImage};
use super::manifest::Entry;
use super::resample::resize_rgb8;
use super::shapes::{self, ShapesConfig};
use super::text::TextTokenizer;
use super::webdataset;
use crate::dist::shard_range;
use crate::error::{Error, Result};
use crate::rng;

/// Where training samples come from.
#[derive(Clone)]
pub enum Source {
    /// The synthetic shapes stream (infinite; sample i is generated from the seed and i).
    Shapes(ShapesConfig),
    /// A manifest's entries, reshuffled every epoch.
    Manifest(Arc<Vec<Entry>>),
    /// WebDataset shards, streamed.
    Tar(Vec<PathBuf>),
}

impl Source {
    /// Samples per epoch, when known without reading the data.
    pub fn epoch_len(&self) -> Option<u64> {
        match self {
            Source::Shapes(_) => None,
            Source::Manifest(e) => Some(e.len() as u64),
            Source::Tar(_) => None,
        }
    }
}

/// Training-time augmentation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Augment {
    /// The deterministic eval preprocessing.
    None,
    /// torchvision's RandomResizedCrop (area fraction in `scale`, aspect ratio 3/4..4/3), then
    /// resized to the model's input with bicubic, as open_clip trains.
    RandomResizedCrop { scale: (f32, f32) },
}

#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub workers: usize,
    /// Batches each worker may run ahead.
    pub prefetch: usize,
    pub seed: u64,
    pub augment: Augment,
    /// Shuffle buffer of the tar stream, in samples.
    pub shuffle_buffer: usize,
    /// (rank, ranks) of a data-parallel run: every rank reads the same sequence of global
    /// batches of `batch_size` samples and decodes only its part ([`shard_range`]).
    pub shard: (usize, usize),
}

/// A decoded sample.
struct Decoded {
    image: RgbImage,
    caption: String,
    truth: Option<Arc<dyn CaptionTruth>>,
    /// Equal for samples of one image ([`Batch::image_ids`]).
    image_id: u64,
}

/// A sample at a stream position: decoded, or why it was skipped.
type Sample = (u64, std::result::Result<Decoded, String>);

/// A sample's image id in read data, where one image may come with several captions (lines of
/// a manifest naming the same file): FNV-1a of its path or key.
fn image_id_of(name: &[u8]) -> u64 {
    rng::fnv1a(name)
}
/// A raw (undecoded) batch from the tar stream, with the stream position after it.
type RawBatch = (u64, Vec<(u64, webdataset::RawSample)>);

/// Everything a worker needs to turn samples into a batch.
struct Prep {
    processor: ImageProcessor,
    tokenizer: Arc<TextTokenizer>,
    augment: Augment,
    seed: u64,
}

impl Prep {
    fn pixels(
        &self,
        img: &RgbImage,
        position: u64,
    ) -> std::result::Result<(Vec<f32>, (usize, usize)), String> {
        match self.augment {
            Augment::None => self.processor.preprocess(img),
            Augment::RandomResizedCrop { scale } => {
                let mut rng = rng::stream(self.seed, rng::AUGMENT, position);
                let (h, w) = self
                    .processor
                    .output_size()
                    .unwrap_or((img.height, img.width));
                let cropped = random_resized_crop(img, scale, &mut rng);
                let resized = RgbImage::new(
                    w,
                    h,
                    resize_rgb8(
                        &cropped.data,
                        cropped.width,
                        cropped.height,
                        w,
                        h,
                        self.processor.filter,
                    ),
                );
                let plain = ImageProcessor {
                    resize: None,
                    crop: None,
                    ..self.processor.clone()
                };
                plain.preprocess(&resized)
            }
        }
    }

    fn batch(&self, samples: Vec<Sample>, end: u64) -> Result<Batch> {
        let mut pixels = Vec::new();
        let mut captions = Vec::new();
        let mut truths = Vec::new();
        let mut image_ids = Vec::new();
        let mut skipped = Vec::new();
        let mut hw = (0, 0);
        for (pos, s) in samples {
            match s {
                Ok(d) => {
                    let (px, size) = match self.pixels(&d.image, pos) {
                        Ok(v) => v,
                        Err(why) => {
                            skipped.push(format!("sample {pos}: {why}"));
                            continue;
                        }
                    };
                    if hw != (0, 0) && size != hw {
                        skipped.push(format!(
                            "sample {pos}: preprocessed to {size:?}, batch is {hw:?}"
                        ));
                        continue;
                    }
                    hw = size;
                    pixels.extend(px);
                    captions.push(d.caption);
                    truths.push(d.truth);
                    image_ids.push(d.image_id);
                }
                Err(why) => skipped.push(why),
            }
        }
        let tokens = self.tokenizer.encode(&captions)?.batch;
        Ok(Batch {
            pixels,
            hw,
            tokens,
            captions,
            truths,
            image_ids,
            skipped,
            position: end,
        })
    }
}

/// torchvision `RandomResizedCrop.get_params`: ten tries at a random area and log-uniform
/// aspect ratio, else a centre crop clamped to the ratio range.
fn random_resized_crop(img: &RgbImage, scale: (f32, f32), rng: &mut ChaCha8Rng) -> RgbImage {
    let (w, h) = (img.width as f32, img.height as f32);
    let area = w * h;
    let (lr0, lr1) = ((3.0f32 / 4.0).ln(), (4.0f32 / 3.0).ln());
    let mut pick = None;
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..=scale.1);
        let ratio = rng.random_range(lr0..=lr1).exp();
        let cw = (target * ratio).sqrt().round();
        let ch = (target / ratio).sqrt().round();
        if cw > 0.0 && ch > 0.0 && cw <= w && ch <= h {
            let top = rng.random_range(0..=(h - ch) as usize);
            let left = rng.random_range(0..=(w - cw) as usize);
            pick = Some((left, top, cw as usize, ch as usize));
            break;
        }
    }
    let (left, top, cw, ch) = pick.unwrap_or_else(|| {
        let ratio = w / h;
        let (cw, ch) = if ratio < 3.0 / 4.0 {
            (w, (w / (3.0 / 4.0)).round())
        } else if ratio > 4.0 / 3.0 {
            ((h * 4.0 / 3.0).round(), h)
        } else {
            (w, h)
        };
        (
            ((w - cw) / 2.0) as usize,
            ((h - ch) / 2.0) as usize,
            cw as usize,
            ch as usize,
        )
    });
    let mut data = Vec::with_capacity(cw * ch * 3);
    for y in top..top + ch {
        let row = (y * img.width + left) * 3;
        data.extend_from_slice(&img.data[row..row + cw * 3]);
    }
    RgbImage::new(cw, ch, data)
}

/// The permutation of epoch `epoch` over `n` items (Fisher–Yates from the seed).
fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = rng::stream(seed, rng::EPOCH_ORDER, epoch);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    order
}

/// Reads sample `pos` of a map-style source.
fn map_sample(source: &Source, seed: u64, pos: u64, order: &mut (u64, Vec<usize>)) -> Sample {
    match source {
        Source::Shapes(cfg) => {
            let s = shapes::generate(cfg, seed, pos);
            let d = Decoded {
                image: s.image,
                caption: s.caption,
                truth: Some(Arc::new(s.truth) as Arc<dyn CaptionTruth>),
                // Every generated image is distinct (twins differ in shape).
                image_id: pos,
            };
            (pos, Ok(d))
        }
        Source::Manifest(entries) => {
            let n = entries.len() as u64;
            let epoch = pos / n;
            if order.1.is_empty() || order.0 != epoch {
                *order = (epoch, epoch_order(entries.len(), seed, epoch));
            }
            let e = &entries[order.1[(pos % n) as usize]];
            let r = load_rgb(&e.image)
                .map(|image| Decoded {
                    image,
                    caption: e.caption.clone(),
                    truth: None,
                    image_id: image_id_of(e.image.as_os_str().as_encoded_bytes()),
                })
                .map_err(|err| err.to_string());
            (pos, r)
        }
        Source::Tar(_) => unreachable!("tar sources are streamed"),
    }
}

pub struct Loader {
    outputs: Vec<Receiver<Result<Batch>>>,
    next: usize,
    /// Samples per epoch when the source knows it.
    epoch_len: Option<u64>,
    _threads: Vec<JoinHandle<()>>,
}

impl Loader {
    /// Starts the workers; the first batch begins at sample `position` of the stream.
    pub fn start(
        source: Source,
        cfg: &LoaderConfig,
        processor: ImageProcessor,
        tokenizer: Arc<TextTokenizer>,
        position: u64,
    ) -> Result<Self> {
        if cfg.batch_size == 0 {
            return Err(Error::input("batch size must be at least 1"));
        }
        let (rank, ranks) = cfg.shard;
        if rank >= ranks || cfg.batch_size < ranks {
            return Err(Error::input(format!(
                "a global batch of {} samples cannot be shared by {ranks} ranks (rank {rank}): \
                 train.batch_size must be at least the number of ranks",
                cfg.batch_size
            )));
        }
        let part = shard_range(cfg.batch_size, rank, ranks);
        let workers = cfg.workers.max(1);
        let epoch_len = source.epoch_len();
        let prep = Arc::new(Prep {
            processor,
            tokenizer,
            augment: cfg.augment,
            seed: cfg.seed,
        });
        let mut outputs = Vec::new();
        let mut threads = Vec::new();
        match &source {
            Source::Tar(shards) => {
                let mut raw_tx: Vec<SyncSender<RawBatch>> = Vec::new();
                for _ in 0..workers {
                    let (rtx, rrx) = sync_channel::<RawBatch>(cfg.prefetch.max(1));
                    let (otx, orx) = sync_channel(cfg.prefetch.max(1));
                    let (prep, part) = (prep.clone(), part.clone());
                    threads.push(std::thread::spawn(move || {
                        for (end, mut raw) in rrx {
                            // This rank's part of the global batch (a short last batch cannot
                            // occur: the stream hands out full batches only).
                            let raw: Vec<_> = raw
                                .drain(part.start.min(raw.len())..part.end.min(raw.len()))
                                .collect();
                            let samples = raw
                                .into_iter()
                                .map(|(pos, r)| {
                                    let s = r.and_then(|(bytes, cap, id)| {
                                        decode_rgb(&bytes, std::path::Path::new(&id))
                                            .map(|image| Decoded {
                                                image,
                                                caption: cap,
                                                truth: None,
                                                image_id: image_id_of(id.as_bytes()),
                                            })
                                            .map_err(|e| e.to_string())
                                    });
                                    (pos, s)
                                })
                                .collect();
                            if otx.send(prep.batch(samples, end)).is_err() {
                                return;
                            }
                        }
                    }));
                    raw_tx.push(rtx);
                    outputs.push(orx);
                }
                let shards = shards.clone();
                let (b, seed, buffer) = (cfg.batch_size, cfg.seed, cfg.shuffle_buffer.max(1));
                threads.push(std::thread::spawn(move || {
                    stream_tar(&shards, seed, buffer, b, position, &raw_tx);
                }));
            }
            _ => {
                for w in 0..workers {
                    let (tx, rx) = sync_channel(cfg.prefetch.max(1));
                    let (source, prep) = (source.clone(), prep.clone());
                    let (b, seed) = (cfg.batch_size as u64, cfg.seed);
                    let (lo, hi) = (part.start as u64, part.end as u64);
                    threads.push(std::thread::spawn(move || {
                        let mut order = (0, Vec::new());
                        let mut k = w as u64;
                        loop {
                            let start = position + k * b;
                            let samples: Vec<Sample> = (start + lo..start + hi)
                                .map(|p| map_sample(&source, seed, p, &mut order))
                                .collect();
                            if tx.send(prep.batch(samples, start + b)).is_err() {
                                return;
                            }
                            k += workers as u64;
                        }
                    }));
                    outputs.push(rx);
                }
            }
        }
        Ok(Self {
            outputs,
            next: 0,
            epoch_len,
            _threads: threads,
        })
    }

    /// Samples per epoch, when the source knows it without reading the data (manifests).
    pub fn epoch_len(&self) -> Option<u64> {
        self.epoch_len
    }

    /// The next batch in stream order.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let rx = &self.outputs[self.next % self.outputs.len()];
        self.next += 1;
        rx.recv()
            .map_err(|_| Error::input("the data loader stopped (no more data)"))?
    }
}

/// The tar stream: epochs over shuffled shards, a seeded shuffle buffer, raw batches handed
/// round-robin to the decode workers. The first `skip` samples are read but not sent (resume).
fn stream_tar(
    shards: &[PathBuf],
    seed: u64,
    buffer: usize,
    batch: usize,
    skip: u64,
    workers: &[SyncSender<RawBatch>],
) {
    let mut pos = 0u64;
    let mut pending: Vec<(u64, webdataset::RawSample)> = Vec::new();
    let mut k = 0usize;
    for epoch in 0.. {
        let mut rng = rng::stream(seed, rng::TAR_SHUFFLE, epoch);
        let order = epoch_order(shards.len(), seed, epoch);
        let mut buf: Vec<webdataset::RawSample> = Vec::new();
        let mut stop = false;
        let mut emit = |s: webdataset::RawSample, pending: &mut Vec<_>, pos: &mut u64| -> bool {
            let p = *pos;
            *pos += 1;
            if p < skip {
                return true;
            }
            pending.push((p, s));
            if pending.len() == batch {
                let raw = std::mem::take(pending);
                if workers[k % workers.len()].send((*pos, raw)).is_err() {
                    return false;
                }
                k += 1;
            }
            true
        };
        for &i in &order {
            let r = webdataset::read_shard(&shards[i], |s| {
                if stop {
                    return;
                }
                buf.push(s);
                if buf.len() >= buffer {
                    let j = rng.random_range(0..buf.len());
                    let s = buf.swap_remove(j);
                    if !emit(s, &mut pending, &mut pos) {
                        stop = true;
                    }
                }
            });
            if let Err(e) = r {
                if !emit(Err(e.to_string()), &mut pending, &mut pos) {
                    return;
                }
            }
            if stop {
                return;
            }
        }
        while !buf.is_empty() {
            let j = rng.random_range(0..buf.len());
            let s = buf.swap_remove(j);
            if !emit(s, &mut pending, &mut pos) {
                return;
            }
        }
        if pos == 0 {
            // No samples at all: stop (the trainer then reports that the loader ran dry)
            // rather than spin over empty shards.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(50, 1, 0);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(50, 1, 0));
        assert_ne!(a, epoch_order(50, 1, 1));
        assert_ne!(a, epoch_order(50, 2, 0));
    }

    #[test]
    fn random_resized_crop_stays_inside() {
        let img = RgbImage::new(40, 30, vec![1; 40 * 30 * 3]);
        let mut rng = crate::rng::stream(0, 0, 0);
        for _ in 0..100 {
            let c = random_resized_crop(&img, (0.3, 1.0), &mut rng);
            assert!(c.width <= 40 && c.height <= 30 && c.width > 0 && c.height > 0);
            let area = (c.width * c.height) as f32 / 1200.0;
            assert!(area > 0.25 && area <= 1.0, "{area}");
        }
    }
}
