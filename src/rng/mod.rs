//! Every random choice of a run flows from its seed through one of these named streams (the
//! brief: "every random choice flows from a seed; the same seed gives the same run on CPU").
//! [`stream`]`(seed, SALT, k)` is ChaCha8 seeded with `seed ^ SALT` on stream `k`, so each use
//! draws from its own sequence, indexed by what it is for (a step, a sample, an epoch), and never
//! depends on the order in which other draws happen.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Generated shapes scenes: stream = sample index; the seed is the data set's, unsalted.
pub const SHAPES_SCENE: u64 = 0;
/// The shape drawn for each object of a shapes scene, apart from its layout so that twins can
/// share a layout: stream = sample index.
pub const SHAPES_SHAPE: u64 = 0x5a4e_5e5a_11ce_d00d;
/// Which shapes samples get another scene's caption, and the donor scene: stream = sample index.
pub const SHAPES_NOISE: u64 = 0x0015_e0ca_9710;
/// CapFilt's nucleus sampling of synthetic captions: stream = the image's index in the manifest.
pub const CAPFILT: u64 = 0xcab_f117;
/// Training augmentation (random resized crops): stream = the sample's position in the data.
pub const AUGMENT: u64 = 0x5eed_a06e;
/// The order of a map-style source (and of tar shards) in each epoch: stream = epoch.
pub const EPOCH_ORDER: u64 = 0x0e_90c4;
/// The tar stream's shuffle buffer: stream = epoch.
pub const TAR_SHUFFLE: u64 = 0x7a5;
/// ITM's hard negatives (BLIP-2 §3.2): stream = optimiser step.
pub const HARD_NEGATIVES: u64 = 0x17e3_0001;
/// The benchmark's random inputs (`vlalign bench`): stream 0.
pub const BENCH_INPUTS: u64 = 0;
/// Initial weights: the seed unsalted, stream = a hash of the tensor name (`nn::init`).
pub const INIT: u64 = 0;

/// FNV-1a of `bytes`: a stable 64-bit id for a name (a tensor's init stream, a sample's image
/// id in read data).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The generator of stream `index` under `seed ^ salt`.
pub fn stream(seed: u64, salt: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ salt);
    rng.set_stream(index);
    rng
}
