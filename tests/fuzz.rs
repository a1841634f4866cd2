//! A bounded, seeded fuzzing pass over the parsers that read untrusted or hand-edited bytes: encoded
//! images (`decode_rgb` and the image preprocessor), safetensors files (the checkpoint loader),
//! tokenizer files, config files, and request bodies sent to real `arcana-serve` processes.
//!
//! Each target starts from valid seeds, replays the inputs under `tests/fixtures/fuzz/<target>/`
//! (every input that once failed), then checks `ARCANA_FUZZ_ITERATIONS` (default: a count per
//! target that keeps the file near a minute in a debug build) mutated inputs drawn from a fixed seed
//! (`ARCANA_FUZZ_SEED` to draw others). An input fails when the parser panics, takes longer than its
//! time limit, or answers in a way its contract forbids (an error that does not name the file, a
//! decoded image past the pixel limit, a 5xx reply or none at all); failing inputs are written to the
//! corpus folder so the next run replays them first.
mod common;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arcana::config::{ArcanaConfig, VisionConfig};
use arcana::tokenizer::Tokenizer;
use arcana::vision::decode::{decode_rgb, PixelLimit};
use arcana::vision::preprocess::{ImagePreprocessor, PreprocessConfig};
use arcana::weights::{Checkpoint, WeightLoader};
use serde_json::{json, Value};
use tch::{Device, Kind};

// ---------------------------------------------------------------------------------------------
// The mutator: deterministic, byte-level and format-aware.

/// xorshift64*: small, fast and the same on every platform.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

const INTERESTING_BYTES: [u8; 9] = [0x00, 0x01, 0x7f, 0x80, 0xff, 0xfe, 0x10, 0x20, 0x40];
const INTERESTING_U32: [u32; 10] =
    [0, 1, 0x7f, 0xffff, 0x1_0000, 0x7fff_ffff, 0x8000_0000, 0xffff_fffe, 0xffff_ffff, 0x4000_0000];

/// One to four random byte-level mutations of `input`; `other` is the splicing partner.
fn mutate_bytes(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut data = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(9) {
            0 if len > 0 => {
                let at = rng.below(len);
                data[at] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let at = rng.below(len);
                data[at] = *rng.pick(&INTERESTING_BYTES);
            }
            2 if len >= 4 => {
                let at = rng.below(len - 3);
                let value = *rng.pick(&INTERESTING_U32);
                let bytes = if rng.one_in(2) { value.to_le_bytes() } else { value.to_be_bytes() };
                data[at..at + 4].copy_from_slice(&bytes);
            }
            3 if len > 0 => data.truncate(rng.below(len)),
            4 if len > 0 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(64)).min(len);
                let chunk = data[start..end].to_vec();
                let at = rng.below(len + 1);
                data.splice(at..at, chunk);
            }
            5 if len > 0 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(64)).min(len);
                data.drain(start..end);
            }
            6 if !other.is_empty() => {
                let at = rng.below(len + 1);
                let from = rng.below(other.len());
                data.truncate(at);
                data.extend_from_slice(&other[from..]);
            }
            7 if len > 0 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(16)).min(len);
                for byte in &mut data[start..end] {
                    *byte = rng.next() as u8;
                }
            }
            _ => {
                // Insert bytes that are never valid UTF-8 (a lone continuation byte, an overlong NUL).
                let at = rng.below(len + 1);
                const NOT_UTF8: [&[u8]; 4] = [b"\x80", b"\xc0\x80", b"\xff\xfe", b"\xed\xa0\x80"];
                let junk = *rng.pick(&NOT_UTF8);
                data.splice(at..at, junk.iter().copied());
            }
        }
    }
    data
}

// ---------------------------------------------------------------------------------------------
// The driver: inputs run on a worker thread, so that a hang is caught by a deadline.

/// Iterations per target: `ARCANA_FUZZ_ITERATIONS` when set, else `default`.
fn iterations(default: usize) -> usize {
    std::env::var("ARCANA_FUZZ_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn fuzz_seed() -> u64 {
    std::env::var("ARCANA_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_a7ca_9a00_0021)
}

fn corpus_dir(target: &str) -> PathBuf {
    common::repo_root().join("tests/fixtures/fuzz").join(target)
}

/// The inputs of `tests/fixtures/fuzz/<target>/`, sorted by name.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(corpus_dir(target)) else { return Vec::new() };
    let mut files: Vec<(String, Vec<u8>)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "bin"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    files.sort();
    files
}

/// FNV-1a: corpus files are named by their content's hash, and each target draws from its own stream.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

fn content_name(bytes: &[u8]) -> String {
    format!("{:016x}.bin", fnv1a(bytes))
}

/// Saves a failing input to the corpus (once) and returns its file name.
fn record_failure(target: &str, input: &[u8]) -> String {
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir).unwrap();
    let name = content_name(input);
    let path = dir.join(&name);
    if !path.exists() {
        std::fs::write(&path, input).unwrap();
    }
    name
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

type Check = Arc<dyn Fn(&[u8]) -> Result<(), String> + Send + Sync>;

/// A format-aware mutation of a seed; `None` where the seed is not of its format.
type SpecialMutation = fn(&mut Rng, &[u8]) -> Option<Vec<u8>>;

/// How one target is fuzzed.
struct Target {
    name: &'static str,
    seeds: Vec<Vec<u8>>,
    /// A format-aware mutation (e.g. a header that claims a huge size), tried for a quarter of the inputs.
    special: Option<SpecialMutation>,
    /// The time one input may take before it counts as a hang.
    limit: Duration,
}

/// Replays the target's corpus, then checks `count` mutated inputs. Returns the failures as
/// "corpus file: what went wrong"; a hang stops the run at once (its thread cannot be stopped).
fn run(target: &Target, count: usize, check: Check) -> Vec<String> {
    let (to_checker, inputs) = mpsc::channel::<Vec<u8>>();
    let (to_driver, results) = mpsc::channel::<Result<(), String>>();
    std::thread::spawn(move || {
        for input in inputs {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&input)))
                .unwrap_or_else(|payload| Err(format!("panic: {}", panic_message(payload.as_ref()))));
            if to_driver.send(outcome).is_err() {
                break;
            }
        }
    });
    let mut rng = Rng::new(fuzz_seed() ^ fnv1a(target.name.as_bytes()));
    let replayed = corpus(target.name);
    let mut failures = Vec::new();
    let started = Instant::now();
    let total = replayed.len() + target.seeds.len() + count;
    for i in 0..total {
        let input = if i < replayed.len() {
            replayed[i].1.clone()
        } else if i < replayed.len() + target.seeds.len() {
            target.seeds[i - replayed.len()].clone()
        } else {
            let seed = rng.pick(&target.seeds).clone();
            let other = rng.pick(&target.seeds).clone();
            let special = target.special.filter(|_| rng.one_in(4)).and_then(|f| f(&mut rng, &seed));
            match special {
                Some(input) if rng.one_in(2) => input,
                Some(input) => mutate_bytes(&mut rng, &input, &other),
                None => mutate_bytes(&mut rng, &seed, &other),
            }
        };
        to_checker.send(input.clone()).unwrap();
        match results.recv_timeout(target.limit) {
            Ok(Ok(())) => {}
            Ok(Err(what)) => failures.push(format!("{}: {what}", record_failure(target.name, &input))),
            Err(_) => {
                let name = record_failure(target.name, &input);
                failures.push(format!("{name}: no answer within {:?} (hang?)", target.limit));
                break;
            }
        }
    }
    println!(
        "fuzz {}: {} corpus + {} seeds + {count} mutated inputs in {:.1} s, {} failures",
        target.name,
        replayed.len(),
        target.seeds.len(),
        started.elapsed().as_secs_f64(),
        failures.len()
    );
    failures
}

fn assert_no_failures(target: &str, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{target}: {} inputs failed (saved under tests/fixtures/fuzz/{target}/):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Peak resident memory of this process (VmHWM) in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

// ---------------------------------------------------------------------------------------------
// Images.

/// The pixel limit of the image targets: small, so that whatever it admits is cheap to allocate.
const FUZZ_MAX_PIXELS: u64 = 1 << 20;
/// The padded square of an image of n pixels can take n² pixels (a one-pixel-high strip), so the
/// `pad` preprocessor runs with a limit whose square stays small (4096² RGB = 48 MiB).
const PAD_MAX_PIXELS: u64 = 1 << 12;
/// How much the image targets may raise this process's peak RSS: the limits above admit at most a
/// 1 Mpixel decode (8 bytes per pixel plus the decoder's 64 MiB of scratch space) and a 48 MiB square.
const IMAGE_RSS_BOUND_MIB: f64 = 384.0;

/// A 37x23 RGB test pattern in each format that `decode_rgb` reads.
fn image_seeds() -> Vec<Vec<u8>> {
    use image::{DynamicImage, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
    let rgb = RgbImage::from_fn(37, 23, |x, y| Rgb([(x * 7) as u8, (y * 11) as u8, ((x + y) * 5) as u8]));
    let encode = |image: DynamicImage, format: ImageFormat| {
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, format).unwrap();
        out.into_inner()
    };
    let mut seeds = vec![
        encode(DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::Png),
        encode(DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::Jpeg),
        encode(DynamicImage::ImageRgba8(RgbaImage::from_fn(37, 23, |x, y| Rgba([x as u8, y as u8, 9, 200]))), {
            ImageFormat::WebP
        }),
        encode(DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::Gif),
        encode(DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::Tiff),
        encode(DynamicImage::ImageRgb8(rgb), ImageFormat::Bmp),
    ];
    // The committed decoder fixtures: palettes, 16-bit, gray, CMYK, progressive and restart JPEGs,
    // animation, lossless WebP (the small ones, to keep each input cheap).
    let dir = common::repo_root().join("tests/fixtures/preprocess/images");
    let mut fixtures: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    fixtures.sort();
    for path in fixtures {
        let bytes = std::fs::read(&path).unwrap();
        if bytes.len() <= 32 * 1024 {
            seeds.push(bytes);
        }
    }
    seeds
}

/// The CRC-32 of PNG chunks.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// `bytes` with its header's width and height replaced by `width` x `height` (truncated to the field's
/// size), where the format is one this knows; the PNG chunk CRC is kept valid so that the claim is read.
fn claim_size(bytes: &[u8], width: u32, height: u32) -> Option<Vec<u8>> {
    let mut out = bytes.to_vec();
    if bytes.starts_with(b"\x89PNG") && bytes.len() >= 33 {
        out[16..20].copy_from_slice(&width.to_be_bytes());
        out[20..24].copy_from_slice(&height.to_be_bytes());
        let crc = crc32(&out[12..29]);
        out[29..33].copy_from_slice(&crc.to_be_bytes());
    } else if bytes.starts_with(b"GIF8") && bytes.len() >= 10 {
        out[6..8].copy_from_slice(&(width as u16).to_le_bytes());
        out[8..10].copy_from_slice(&(height as u16).to_le_bytes());
        // The first frame's descriptor too, so that the frame itself claims the size.
        let palette = if bytes[10] & 0x80 != 0 { 3 << ((bytes[10] & 7) + 1) } else { 0 };
        let mut at = 13 + palette;
        while at < bytes.len() && bytes[at] == 0x21 {
            // Skip extension blocks: introducer, label, then sub-blocks up to a zero length.
            at += 2;
            while at < bytes.len() && bytes[at] != 0 {
                at += usize::from(bytes[at]) + 1;
            }
            at += 1;
        }
        if at + 9 <= bytes.len() && bytes[at] == 0x2c {
            out[at + 5..at + 7].copy_from_slice(&(width as u16).to_le_bytes());
            out[at + 7..at + 9].copy_from_slice(&(height as u16).to_le_bytes());
        }
    } else if bytes.starts_with(b"BM") && bytes.len() >= 26 {
        out[18..22].copy_from_slice(&width.to_le_bytes());
        out[22..26].copy_from_slice(&height.to_le_bytes());
    } else if bytes.starts_with(b"\xff\xd8") {
        let sof =
            (2..bytes.len().saturating_sub(9)).find(|&i| bytes[i] == 0xff && matches!(bytes[i + 1], 0xc0..=0xc2))?;
        out[sof + 5..sof + 7].copy_from_slice(&(height as u16).to_be_bytes());
        out[sof + 7..sof + 9].copy_from_slice(&(width as u16).to_be_bytes());
    } else if bytes.starts_with(b"RIFF") && bytes.len() >= 30 && &bytes[8..12] == b"WEBP" {
        match &bytes[12..16] {
            b"VP8X" => {
                out[24..27].copy_from_slice(&(width.saturating_sub(1)).to_le_bytes()[..3]);
                out[27..30].copy_from_slice(&(height.saturating_sub(1)).to_le_bytes()[..3]);
            }
            b"VP8L" => {
                let (w, h) = (width.saturating_sub(1) & 0x3fff, height.saturating_sub(1) & 0x3fff);
                let rest = u32::from_le_bytes(out[21..25].try_into().unwrap()) & 0xf000_0000;
                out[21..25].copy_from_slice(&(w | (h << 14) | rest).to_le_bytes());
            }
            b"VP8 " => {
                out[26..28].copy_from_slice(&((width & 0x3fff) as u16).to_le_bytes());
                out[28..30].copy_from_slice(&((height & 0x3fff) as u16).to_le_bytes());
            }
            _ => return None,
        }
    } else if (bytes.starts_with(b"II*\0") || bytes.starts_with(b"MM\0*")) && bytes.len() >= 8 {
        let le = bytes[0] == b'I';
        let u16_at = |at: usize| {
            let b = [bytes[at], bytes[at + 1]];
            if le {
                u16::from_le_bytes(b)
            } else {
                u16::from_be_bytes(b)
            }
        };
        let u32_bytes = |v: u32| if le { v.to_le_bytes() } else { v.to_be_bytes() };
        let ifd = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
        let ifd = if le { ifd } else { u32::from_be_bytes(bytes[4..8].try_into().unwrap()) } as usize;
        if ifd + 2 > bytes.len() {
            return None;
        }
        for entry in 0..usize::from(u16_at(ifd)) {
            let at = ifd + 2 + entry * 12;
            if at + 12 > bytes.len() {
                break;
            }
            let value = match u16_at(at) {
                256 => width,
                257 => height,
                _ => continue,
            };
            // Rewrite as one LONG so that values past 65535 fit.
            let (kind, count) =
                if le { (4u16.to_le_bytes(), 1u32.to_le_bytes()) } else { (4u16.to_be_bytes(), 1u32.to_be_bytes()) };
            out[at + 2..at + 4].copy_from_slice(&kind);
            out[at + 4..at + 8].copy_from_slice(&count);
            out[at + 8..at + 12].copy_from_slice(&u32_bytes(value));
        }
    } else {
        return None;
    }
    Some(out)
}

/// Sizes a header may claim: huge squares, strips past the limit, the fields' maxima, zero.
const CLAIMED_SIZES: [(u32, u32); 9] = [
    (65_535, 65_535),
    (16_384, 16_384),
    (60_000, 2),
    (2, 60_000),
    (1 << 20, 2),
    (u32::MAX, u32::MAX),
    (0x8000_0000, 1),
    (0, 23),
    (37, 0),
];

fn special_image(rng: &mut Rng, seed: &[u8]) -> Option<Vec<u8>> {
    let (w, h) = if rng.one_in(3) { (rng.next() as u32, rng.next() as u32) } else { *rng.pick(&CLAIMED_SIZES) };
    claim_size(seed, w, h)
}

/// The image targets' check: an error naming the input, or an image within the pixel limit; the
/// preprocessors (plain and padded) answer a tensor of the crop size or an error.
fn image_check() -> Check {
    let config = PreprocessConfig::from_json_file(
        &common::repo_root().join("tests/fixtures/parity/lm-gqa/clip-qladder-tiny/preprocessor_config.json"),
    )
    .unwrap();
    let plain =
        ImagePreprocessor::new(config.clone(), arcana::config::AspectMode::Plain).with_max_pixels(FUZZ_MAX_PIXELS);
    let padded = ImagePreprocessor::new(config, arcana::config::AspectMode::Pad).with_max_pixels(PAD_MAX_PIXELS);
    Arc::new(move |bytes: &[u8]| {
        let name = Path::new("fuzzed-image.bin");
        match decode_rgb(bytes, name, PixelLimit::decoded(FUZZ_MAX_PIXELS)) {
            Ok(rgb) if u64::from(rgb.width()) * u64::from(rgb.height()) > FUZZ_MAX_PIXELS => {
                return Err(format!(
                    "decoded {}x{} past the limit of {FUZZ_MAX_PIXELS} pixels",
                    rgb.width(),
                    rgb.height()
                ))
            }
            Ok(_) => {}
            Err(e) if !e.to_string().contains("fuzzed-image.bin") => {
                return Err(format!("error without the name: {e}"))
            }
            Err(_) => {}
        }
        for preprocessor in [&plain, &padded] {
            match preprocessor.encoded_image_tensor(bytes, "fuzzed-image.bin") {
                Ok(tensor) => {
                    let expected = [3, preprocessor.config.crop_height as i64, preprocessor.config.crop_width as i64];
                    if tensor.size() != expected {
                        return Err(format!("preprocessed to {:?}, expected {expected:?}", tensor.size()));
                    }
                }
                Err(e) if !e.to_string().contains("fuzzed-image.bin") => {
                    return Err(format!("preprocessor error without the name: {e}"))
                }
                Err(_) => {}
            }
        }
        Ok(())
    })
}

#[test]
fn mutated_images_are_decoded_or_refused_within_the_pixel_limit() {
    let target =
        Target { name: "image", seeds: image_seeds(), special: Some(special_image), limit: Duration::from_secs(20) };
    let before = peak_rss_mib();
    let failures = run(&target, iterations(1000), image_check());
    let growth = peak_rss_mib() - before;
    println!("fuzz image: peak RSS grew by {growth:.0} MiB (bound {IMAGE_RSS_BOUND_MIB} MiB)");
    assert_no_failures(target.name, &failures);
    assert!(growth < IMAGE_RSS_BOUND_MIB, "peak RSS grew by {growth:.0} MiB, past {IMAGE_RSS_BOUND_MIB} MiB");
}

#[test]
fn headers_that_claim_huge_sizes_are_refused_before_allocation() {
    let seeds = image_seeds();
    let before = peak_rss_mib();
    let mut claimed = 0;
    for seed in &seeds[..6] {
        for &(w, h) in &CLAIMED_SIZES {
            let Some(bytes) = claim_size(seed, w, h) else { continue };
            claimed += 1;
            let result = decode_rgb(&bytes, Path::new("claim.bin"), PixelLimit::decoded(FUZZ_MAX_PIXELS));
            let Err(e) = result else {
                let rgb = result.unwrap();
                // A decoder may read the real size from elsewhere (GIF frames, WebP chunks): fine within the limit.
                assert!(u64::from(rgb.width()) * u64::from(rgb.height()) <= FUZZ_MAX_PIXELS);
                continue;
            };
            let message = e.to_string();
            println!("claimed {w}x{h} ({} bytes): {message}", bytes.len());
            assert!(message.contains("claim.bin"), "{message}");
            // Sizes every format's fields can hold (libjpeg stops at 65500), in the formats whose size is
            // read from the header alone: refused by the pixel limit itself (TIFF and WebP refuse the claim
            // as inconsistent with their strips and bitstreams first).
            let representable = w <= 60_000 && h <= 60_000 && u64::from(w) * u64::from(h) > FUZZ_MAX_PIXELS;
            let header_only = [&b"\x89PNG"[..], b"BM", b"\xff\xd8", b"GIF8"].iter().any(|m| bytes.starts_with(m));
            if representable && header_only {
                assert!(message.contains("exceeds the limit of 1048576 pixels"), "{w}x{h}: {message}");
            }
        }
    }
    assert!(claimed >= 40, "only {claimed} claims made: the header rewriting lost a format");
    let growth = peak_rss_mib() - before;
    // Each claim is refused from the header: no decode buffer is ever sized from it.
    assert!(growth < 64.0, "peak RSS grew by {growth:.0} MiB while refusing huge claims");
}

// ---------------------------------------------------------------------------------------------
// Safetensors.

/// A small file with float, integer, empty and multi-dimensional tensors.
fn safetensors_seed() -> Vec<u8> {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let a: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let b: Vec<u8> = (0..4).flat_map(|i| (i as i64 - 2).to_le_bytes()).collect();
    let c: Vec<u8> = vec![0x80, 0x3f, 0, 0x40, 0x40, 0x40, 0x80, 0x40];
    let tensors = vec![
        ("a", TensorView::new(Dtype::F32, vec![2, 3], &a).unwrap()),
        ("b", TensorView::new(Dtype::I64, vec![4], &b).unwrap()),
        ("c", TensorView::new(Dtype::BF16, vec![1, 2, 2], &c).unwrap()),
        ("empty", TensorView::new(Dtype::F32, vec![0, 3], &[]).unwrap()),
    ];
    let metadata = Some([("format".to_string(), "pt".to_string())].into_iter().collect());
    safetensors::serialize(tensors, &metadata).unwrap()
}

/// Values a header field may be replaced with: wrong types, huge and negative numbers, bad dtypes.
fn header_value(rng: &mut Rng) -> Value {
    let choices = [
        json!(null),
        json!(true),
        json!(-1),
        json!(0),
        json!(1.5),
        json!(u64::MAX),
        json!(i64::MAX),
        json!(i64::MIN),
        json!(1e300),
        json!("F32"),
        json!("F8_E4M3"),
        json!("BOOL"),
        json!("U64"),
        json!("nonsense"),
        json!([]),
        json!([0]),
        json!([u64::MAX]),
        json!([1u64 << 32, 1u64 << 32]),
        json!([0, u64::MAX]),
        json!([u64::MAX, 0]),
        json!([0, 1u64 << 62, 4]),
        json!([1u64 << 62, 4, 0]),
        json!([-1, 2]),
        json!([3, 1]),
        json!([0, 1_000_000_000]),
        json!({}),
        json!({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}),
    ];
    rng.pick(&choices).clone()
}

/// A structured mutation of the JSON header: a field of a tensor (or the metadata, or a new tensor)
/// replaced, the header re-encoded with a correct or wrong length prefix.
fn special_safetensors(rng: &mut Rng, seed: &[u8]) -> Option<Vec<u8>> {
    let length = u64::from_le_bytes(seed.get(..8)?.try_into().ok()?) as usize;
    let mut header: Value = serde_json::from_slice(seed.get(8..8 + length)?).ok()?;
    let data = &seed[8 + length..];
    let object = header.as_object_mut()?;
    let names: Vec<String> = object.keys().cloned().collect();
    for _ in 0..1 + rng.below(3) {
        let name = rng.pick(&names).clone();
        match rng.below(5) {
            0 => {
                object.remove(&name);
            }
            1 => {
                object.insert(format!("extra{}", rng.below(3)), header_value(rng));
            }
            2 => {
                object.insert(name, header_value(rng));
            }
            _ => {
                if let Some(tensor) = object.get_mut(&name).and_then(Value::as_object_mut) {
                    let field = *rng.pick(&["dtype", "shape", "data_offsets", "unknown"]);
                    if rng.one_in(6) {
                        tensor.remove(field);
                    } else {
                        tensor.insert(field.to_string(), header_value(rng));
                    }
                }
            }
        }
    }
    let mut text = serde_json::to_vec(&header).ok()?;
    if rng.one_in(4) {
        // Padding with spaces, as writers that align the data do.
        text.resize(text.len() + rng.below(9), b' ');
    }
    let prefix = match rng.below(6) {
        0 => u64::MAX,
        1 => text.len() as u64 + 1 + rng.below(64) as u64,
        2 => (text.len() as u64).saturating_sub(1 + rng.below(8) as u64),
        3 => 100_000_001,
        _ => text.len() as u64,
    };
    let mut out = prefix.to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(data);
    Some(out)
}

/// Opens the file as a checkpoint folder; a file that opens is loaded whole, copied and in place.
fn safetensors_check() -> Check {
    let dir = tempfile::tempdir().unwrap();
    Arc::new(move |bytes: &[u8]| {
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, bytes).unwrap();
        let checkpoint = match Checkpoint::open_dir(dir.path()) {
            Ok(checkpoint) => checkpoint,
            Err(e) if e.to_string().contains(&*path.to_string_lossy()) => return Ok(()),
            Err(e) => return Err(format!("error without the file's path: {e}")),
        };
        let names: Vec<String> = checkpoint.names().map(String::from).collect();
        let copying = WeightLoader::new(checkpoint, Kind::Float, Device::Cpu);
        let _ = copying.numels();
        for name in &names {
            let _ = copying.root().get_any_shape(name);
        }
        // SAFETY: the tensors are dropped inside this block, before the mappings `finish` returns.
        unsafe {
            let in_place =
                WeightLoader::new(Checkpoint::open_dir(dir.path()).unwrap(), Kind::Float, Device::Cpu).in_place();
            let tensors: Vec<_> = names.iter().map(|n| in_place.root().get_any_shape(n)).collect();
            drop(tensors);
            let _ = in_place.finish();
        }
        Ok(())
    })
}

#[test]
fn mutated_safetensors_files_load_or_fail_with_an_error_naming_the_file() {
    let target = Target {
        name: "safetensors",
        seeds: vec![safetensors_seed()],
        special: Some(special_safetensors),
        limit: Duration::from_secs(10),
    };
    let before = peak_rss_mib();
    let failures = run(&target, iterations(3000), safetensors_check());
    let growth = peak_rss_mib() - before;
    assert_no_failures(target.name, &failures);
    // The files are a few hundred bytes: nothing may be sized from a claimed shape.
    assert!(growth < 64.0, "peak RSS grew by {growth:.0} MiB loading tiny files");
}

// ---------------------------------------------------------------------------------------------
// Tokenizer and config files.

/// The SentencePiece model the tests can use: the shared copy, or the one `scripts/setup-python.sh` fetches.
fn tokenizer_model() -> Option<Vec<u8>> {
    let candidates = [
        common::repo_root().join("../shared/tokenizers/mistral-7b-v0.1-tokenizer.model"),
        PathBuf::from(std::env::var("HOME").unwrap_or_default())
            .join(".cache/arcana/tokenizers/mistral-7b-v0.1-tokenizer.model"),
    ];
    let found = candidates.iter().find_map(|p| std::fs::read(p).ok());
    if found.is_none() {
        eprintln!("skipping the tokenizer.model target: no Mistral tokenizer.model (run scripts/setup-python.sh)");
    }
    found
}

/// A folder holding `name` with the input's bytes beside the seed's other files; loads it as a tokenizer
/// and, when it loads, encodes and decodes a text with special tokens in it.
fn tokenizer_check(files: Vec<(&'static str, Vec<u8>)>, name: &'static str) -> Check {
    let dir = tempfile::tempdir().unwrap();
    for (file, bytes) in &files {
        std::fs::write(dir.path().join(file), bytes).unwrap();
    }
    Arc::new(move |bytes: &[u8]| {
        std::fs::write(dir.path().join(name), bytes).unwrap();
        if let Ok(tokenizer) = Tokenizer::from_folder(dir.path()) {
            let ids = tokenizer.encode_with("<s>Hello, wörld! 日本 \u{1F600}</s> <unk>\n\t12", true);
            let _ = tokenizer.decode(&ids);
            let _ = tokenizer.decode_with_special_tokens(&ids);
            let vocab = tokenizer.vocab_size() as u32;
            let _ = tokenizer.decode(&[0, vocab.saturating_sub(1), vocab, u32::MAX]);
            let mut stream = tokenizer.stream();
            for id in ids.iter().chain(&[vocab, 3]) {
                let _ = stream.push(*id);
            }
        }
        Ok(())
    })
}

fn special_json(rng: &mut Rng, seed: &[u8]) -> Option<Vec<u8>> {
    let mut value: Value = serde_json::from_slice(seed).ok()?;
    mutate_json(rng, &mut value, &[]);
    serde_json::to_vec(&value).ok()
}

/// Replaces one node of `value` (at a random depth) with a hostile value; `safe_strings` are the only
/// strings it may write where a string was.
fn mutate_json(rng: &mut Rng, node: &mut Value, safe_strings: &[&str]) {
    let descend = rng.below(3) != 0;
    match node {
        Value::Object(map) if descend && !map.is_empty() => {
            let key = map.keys().nth(rng.below(map.len())).unwrap().clone();
            if rng.one_in(8) {
                map.remove(&key);
            } else if rng.one_in(8) {
                map.insert(format!("{key}_unknown"), json!(1));
            } else {
                mutate_json(rng, map.get_mut(&key).unwrap(), safe_strings);
            }
            return;
        }
        Value::Array(items) if descend && !items.is_empty() => {
            let at = rng.below(items.len());
            if rng.one_in(8) {
                let copy = items[at].clone();
                items.push(copy);
            } else {
                mutate_json(rng, &mut items[at], safe_strings);
            }
            return;
        }
        _ => {}
    }
    let was_string = node.is_string();
    let mut deep = json!(1);
    for _ in 0..rng.below(300) {
        deep = json!([deep]);
    }
    let mut choices = vec![
        json!(null),
        json!(false),
        json!(0),
        json!(-1),
        json!(-1e300),
        json!(1e300),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(4_294_967_296u64),
        json!(0.5),
        json!([]),
        json!({}),
        deep,
    ];
    if safe_strings.is_empty() || !was_string {
        choices.extend([
            json!(""),
            json!("NaN"),
            json!("Infinity"),
            json!("-1"),
            json!("a\u{0}b\nforged: line"),
            json!("\u{202e}\u{fffd}\u{1F600}"),
            json!("x".repeat(20_000)),
            json!(["<s>", "</s>"]),
        ]);
    }
    for s in safe_strings {
        choices.push(json!(s));
    }
    *node = rng.pick(&choices).clone();
}

fn read_seed(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn mutated_tokenizer_files_load_or_fail_without_panicking() {
    let Some(model) = tokenizer_model() else { return };
    // As the exported checkpoints hold them (transformers 4.37's save_pretrained of LlamaTokenizer).
    let token = |content: &str| json!({"content": content, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false});
    let added = |content: &str| {
        let mut value = token(content);
        value["__type"] = json!("AddedToken");
        value
    };
    let config = json!({
        "add_bos_token": true, "add_eos_token": false, "bos_token": added("<s>"), "clean_up_tokenization_spaces": false,
        "eos_token": added("</s>"), "legacy": false, "model_max_length": 2048, "pad_token": null,
        "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": added("<unk>")
    });
    let special_tokens_map = json!({"bos_token": token("<s>"), "eos_token": token("</s>"), "pad_token": "<unk>", "unk_token": token("<unk>")});
    let config = serde_json::to_vec_pretty(&config).unwrap();
    let special_tokens_map = serde_json::to_vec_pretty(&special_tokens_map).unwrap();
    // The seeds must load, or the fuzzing would only test the first error.
    let seed_dir = tempfile::tempdir().unwrap();
    for (file, bytes) in [
        ("tokenizer.model", &model),
        ("tokenizer_config.json", &config),
        ("special_tokens_map.json", &special_tokens_map),
    ] {
        std::fs::write(seed_dir.path().join(file), bytes).unwrap();
    }
    Tokenizer::from_folder(seed_dir.path()).unwrap();

    let mut failures = Vec::new();
    let model_target =
        Target { name: "tokenizer-model", seeds: vec![model.clone()], special: None, limit: Duration::from_secs(30) };
    let others =
        vec![("tokenizer_config.json", config.clone()), ("special_tokens_map.json", special_tokens_map.clone())];
    failures.extend(run(&model_target, iterations(100), tokenizer_check(others, "tokenizer.model")));
    for (name, seed, file) in [
        ("tokenizer-config", config.clone(), "tokenizer_config.json"),
        ("special-tokens-map", special_tokens_map.clone(), "special_tokens_map.json"),
    ] {
        let target = Target { name, seeds: vec![seed], special: Some(special_json), limit: Duration::from_secs(30) };
        let mut files = vec![("tokenizer.model", model.clone())];
        files.extend(
            [("tokenizer_config.json", config.clone()), ("special_tokens_map.json", special_tokens_map.clone())]
                .into_iter()
                .filter(|(n, _)| *n != file),
        );
        failures.extend(run(&target, iterations(600), tokenizer_check(files, file)));
    }
    assert_no_failures("tokenizer", &failures);
}

#[test]
fn mutated_fast_tokenizer_files_load_or_fail_without_panicking() {
    // tokenizer.json as transformers writes it for a tiny BPE vocabulary with byte fallback.
    let tokenizer_json = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": null,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
            "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "▁": 4, "h": 5, "e": 6, "l": 7, "o": 8, "▁h": 9, "he": 10, "ll": 11, "▁he": 12, "llo": 13},
            "merges": ["▁ h", "h e", "l l", "▁h e", "ll o"]}
    });
    let config = json!({"add_bos_token": true, "add_eos_token": false, "legacy": false,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer"});
    let tokenizer_json = serde_json::to_vec(&tokenizer_json).unwrap();
    let config = serde_json::to_vec(&config).unwrap();
    let seed_dir = tempfile::tempdir().unwrap();
    std::fs::write(seed_dir.path().join("tokenizer.json"), &tokenizer_json).unwrap();
    std::fs::write(seed_dir.path().join("tokenizer_config.json"), &config).unwrap();
    Tokenizer::from_folder(seed_dir.path()).unwrap();

    let target = Target {
        name: "tokenizer-json",
        seeds: vec![tokenizer_json],
        special: Some(special_json),
        limit: Duration::from_secs(20),
    };
    let failures =
        run(&target, iterations(600), tokenizer_check(vec![("tokenizer_config.json", config)], "tokenizer.json"));
    assert_no_failures(target.name, &failures);
}

/// Reads a mutated model config, vision config or preprocessor config; what validates is used as the
/// loaders use it (derived sizes, the image preprocessor on a small image).
fn config_check(file: &'static str) -> Check {
    let dir = tempfile::tempdir().unwrap();
    let image = image_seeds().swap_remove(0);
    Arc::new(move |bytes: &[u8]| {
        let path = dir.path().join(file);
        std::fs::write(&path, bytes).unwrap();
        let named = |e: arcana::Error| {
            let message = e.to_string();
            if message.contains(&*path.to_string_lossy()) {
                Ok(())
            } else {
                Err(format!("error without the file's path: {message}"))
            }
        };
        match file {
            "config.json" => match ArcanaConfig::from_file(&path) {
                Ok(config) => {
                    let _ = (config.head_dim(), config.num_kv_heads(), config.lora_scaling(), config.projector_kind());
                    let _ = config.vision_tower_name();
                    Ok(())
                }
                Err(e) => named(e),
            },
            "vision_config.json" => match VisionConfig::from_file(&path) {
                Ok(config) => {
                    let _ = (config.head_dim(), config.num_patches());
                    Ok(())
                }
                Err(e) => named(e),
            },
            _ => match PreprocessConfig::from_json_file(&path) {
                Ok(config) => {
                    // Sizes are not bounded here (the vision tower's image size bounds them at load);
                    // run the preprocessor where its output stays small.
                    let sizes = [config.crop_height, config.crop_width];
                    let resize_small = match config.size {
                        arcana::vision::preprocess::ResizeTarget::ShortestEdge(edge) => edge <= 1024,
                        arcana::vision::preprocess::ResizeTarget::Exact { height, width } => height.max(width) <= 1024,
                    };
                    if sizes.iter().all(|&s| s <= 1024) && resize_small {
                        for aspect in [arcana::config::AspectMode::Plain, arcana::config::AspectMode::Pad] {
                            let preprocessor = ImagePreprocessor::new(config.clone(), aspect);
                            let _ = preprocessor.encoded_image_tensor(&image, "seed.png");
                        }
                    }
                    Ok(())
                }
                Err(e) => named(e),
            },
        }
    })
}

#[test]
fn mutated_config_files_load_or_fail_with_an_error_naming_the_file() {
    let fixtures = common::repo_root().join("tests/fixtures/parity");
    let mut failures = Vec::new();
    let cases: [(&'static str, &'static str, Vec<PathBuf>); 3] = [
        (
            "config",
            "config.json",
            vec![fixtures.join("lm-gqa/config.json"), fixtures.join("vision-linear/config.json")],
        ),
        ("vision-config", "vision_config.json", vec![fixtures.join("lm-gqa/clip-qladder-tiny/config.json")]),
        (
            "preprocessor-config",
            "preprocessor_config.json",
            vec![fixtures.join("lm-gqa/clip-qladder-tiny/preprocessor_config.json")],
        ),
    ];
    for (name, file, seeds) in cases {
        let seeds: Vec<Vec<u8>> = seeds.iter().map(|p| read_seed(p)).collect();
        let target = Target { name, seeds, special: Some(special_json), limit: Duration::from_secs(10) };
        failures.extend(run(&target, iterations(800), config_check(file)));
    }
    assert_no_failures("config", &failures);
}

// ---------------------------------------------------------------------------------------------
// Request bodies, through real servers.

/// The addresses a mutated body may name as a worker: loopback ports where nothing listens, and junk.
/// Never the controller (a request loop) nor the real worker (unregistering it would break the run).
const SAFE_WORKER_NAMES: [&str; 5] =
    ["http://127.0.0.1:1", "http://127.0.0.1:1/#", "http://[::1]:1", "127.0.0.1:1", "not a url"];

/// The strings a structured mutation may put where a string was.
fn safe_strings(image: &'static str) -> Vec<&'static str> {
    let mut strings = SAFE_WORKER_NAMES.to_vec();
    strings.extend([
        "",
        "NaN",
        "-Infinity",
        "1e999",
        "arcana-cli-tiny-v1",
        "USER: <image>\nHi ASSISTANT:",
        "<image><image><image>",
        "a\u{0}b\nforged: line",
        "Pad",
        "Crop",
        "Resize",
        "upvote",
        "vicuna_v1",
        "data:image/png;base64,",
        "data:image/png;base64,!!!!",
        "user",
        "assistant",
        "system",
        "image_url",
        "text",
        image,
    ]);
    strings
}

/// A mutated body, made safe to send: a `worker_name` that parses is one of [`SAFE_WORKER_NAMES`].
fn request_body(rng: &mut Rng, seed: &Value, strings: &[&str]) -> Vec<u8> {
    let mut value = seed.clone();
    let structured = rng.below(3) != 0;
    if structured {
        for _ in 0..1 + rng.below(2) {
            mutate_json(rng, &mut value, strings);
        }
    }
    let text = serde_json::to_vec(&value).unwrap();
    let mut body = if !structured || rng.one_in(3) { mutate_bytes(rng, &text, &text) } else { text };
    if rng.one_in(6) {
        // A number where it parses as one the JSON parser cannot hold.
        const UNHOLDABLE: [&[u8]; 6] = [b"1e999", b"-1e999", b"18446744073709551616", b"-0", b"NaN", b"0x10"];
        let huge = *rng.pick(&UNHOLDABLE);
        if let Some(at) = body.iter().position(|b| b.is_ascii_digit()) {
            let end = at + body[at..].iter().take_while(|b| b.is_ascii_digit()).count();
            body.splice(at..end, huge.iter().copied());
        }
    }
    if let Ok(Value::Object(mut map)) = serde_json::from_slice::<Value>(&body) {
        if map.get("worker_name").and_then(Value::as_str).is_some_and(|name| !SAFE_WORKER_NAMES.contains(&name)) {
            map.insert("worker_name".into(), json!(rng.pick(&SAFE_WORKER_NAMES)));
            body = serde_json::to_vec(&map).unwrap();
        }
    }
    body
}

/// The tiny checkpoint, exported once per test binary by `parity/export.py make-checkpoint` (the
/// same weights as the CLI fixtures, without their reference runs); `None` without Python.
fn tiny_checkpoint() -> Option<&'static Path> {
    static DIR: std::sync::OnceLock<Option<tempfile::TempDir>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let python = common::python_with_torch()?;
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(python)
            .arg(common::export_py())
            .args(["make-checkpoint", "--preset", "cli-tiny", "--seed", "0", "--out"])
            .arg(dir.path().join("arcana-cli-tiny-v1"))
            .output()
            .unwrap();
        assert!(out.status.success(), "export.py failed: {}", String::from_utf8_lossy(&out.stderr));
        Some(dir)
    })
    .as_ref()
    .map(|d| d.path())
}

/// What went wrong with one request, if anything: no reply within the timeout, or a 5xx.
fn send(client: &reqwest::blocking::Client, url: &str, body: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .map_err(|e| format!("{url}: no reply: {e}"))?;
    let status = response.status().as_u16();
    let bytes = response.bytes().map_err(|e| format!("{url}: reply {status} cut off: {e}"))?;
    if status >= 500 {
        return Err(format!("{url}: {status} {}", String::from_utf8_lossy(&bytes)));
    }
    Ok((status, bytes.to_vec()))
}

#[test]
fn mutated_request_bodies_get_replies_and_the_servers_keep_serving() {
    let Some(dir) = tiny_checkpoint() else { return };
    use base64::Engine as _;
    use common::serve::{start, wait_ready};
    let png = image_seeds().swap_remove(0);
    let image: &'static str = Box::leak(base64::engine::general_purpose::STANDARD.encode(&png).into_boxed_str());
    let data_url = format!("data:image/png;base64,{image}");
    let controller = start(dir, &["controller"]);
    let worker = start(
        dir,
        &[
            "worker",
            "--model-path",
            "arcana-cli-tiny-v1",
            "--controller-address",
            &controller.url,
            "--heart-beat-interval",
            "1",
        ],
    );
    let logs = tempfile::tempdir().unwrap();
    let web =
        start(logs.path(), &["web", "--controller-url", &controller.url, "--log-dir", &logs.path().to_string_lossy()]);
    wait_ready(&worker.url);
    common::serve::wait_until("the worker's registration", 30, || {
        let body = json!({"model": "arcana-cli-tiny-v1"});
        common::serve::client()
            .post(format!("{}/get_worker_address", controller.url))
            .json(&body)
            .send()
            .ok()
            .and_then(|r| r.json::<Value>().ok())
            .is_some_and(|v| v["address"] == json!(worker.url))
    });

    let generate = json!({"model": "arcana-cli-tiny-v1", "prompt": "USER: <image>\nHi ASSISTANT:", "images": [image],
        "temperature": 0, "top_p": 1.0, "max_new_tokens": 4, "stop": "</s>"});
    let openai = json!({"model": "arcana-cli-tiny-v1", "max_tokens": 4, "temperature": 0, "stream": false,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": data_url}}]}]});
    let chat = json!({"model": "arcana-cli-tiny-v1", "messages": [["Hi", null]], "new_message": true, "image": image,
        "image_process_mode": "Default", "temperature": 0, "top_p": 1.0, "max_new_tokens": 4});
    let register = json!({"worker_name": "http://127.0.0.1:1", "check_heart_beat": true,
        "worker_status": {"model_names": ["fuzz-model"], "speed": 1, "queue_length": 0}});
    let endpoints: Vec<(String, Value)> = vec![
        (format!("{}/register_worker", controller.url), register),
        (
            format!("{}/receive_heart_beat", controller.url),
            json!({"worker_name": "http://127.0.0.1:1", "queue_length": 0}),
        ),
        (format!("{}/get_worker_address", controller.url), json!({"model": "arcana-cli-tiny-v1"})),
        (format!("{}/list_models", controller.url), json!({})),
        (format!("{}/unregister_worker", controller.url), json!({"worker_name": "http://127.0.0.1:1"})),
        (format!("{}/worker_generate_stream", controller.url), generate.clone()),
        (format!("{}/v1/chat/completions", controller.url), openai.clone()),
        (format!("{}/worker_generate_stream", worker.url), generate.clone()),
        (format!("{}/worker_get_status", worker.url), json!({})),
        (format!("{}/v1/chat/completions", worker.url), openai),
        (format!("{}/api/chat", web.url), chat.clone()),
        (
            format!("{}/api/vote", web.url),
            json!({"type": "upvote", "model": "arcana-cli-tiny-v1", "template": "vicuna_v1", "messages": [["Hi", "Hello"]], "has_image": false}),
        ),
    ];
    let strings = safe_strings(image);
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let mut rng = Rng::new(fuzz_seed() ^ fnv1a(b"request"));
    let mut failures = Vec::new();
    let started = Instant::now();
    // The corpus first (each file: the endpoint's path, a newline, the body), then every seed, then mutations.
    let mut inputs: Vec<(String, Vec<u8>)> = corpus("request")
        .into_iter()
        .filter_map(|(_, bytes)| {
            let split = bytes.iter().position(|&b| b == b'\n')?;
            let path = String::from_utf8_lossy(&bytes[..split]).into_owned();
            let (url, _) = endpoints.iter().find(|(url, _)| url.ends_with(&path))?;
            Some((url.clone(), bytes[split + 1..].to_vec()))
        })
        .collect();
    inputs.extend(endpoints.iter().map(|(url, seed)| (url.clone(), serde_json::to_vec(seed).unwrap())));
    for _ in 0..iterations(120) {
        let (url, seed) = rng.pick(&endpoints);
        inputs.push((url.clone(), request_body(&mut rng, seed, &strings)));
    }
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for (url, body) in &inputs {
        let sent = Instant::now();
        let reply = send(&client, url, body);
        if let Ok((status, _)) = &reply {
            *statuses.entry(*status).or_default() += 1;
        }
        if let Err(what) = reply {
            let path = &url[url.find("://").map_or(0, |i| i + 3)..];
            let path = &path[path.find('/').unwrap_or(0)..];
            let mut saved = format!("{path}\n").into_bytes();
            saved.extend_from_slice(body);
            failures.push(format!(
                "{}: {what} (after {:.1} s)",
                record_failure("request", &saved),
                sent.elapsed().as_secs_f64()
            ));
        }
    }
    println!(
        "fuzz request: {} requests in {:.1} s, {} failures; replies by status: {statuses:?}",
        inputs.len(),
        started.elapsed().as_secs_f64(),
        failures.len()
    );

    // Every server still answers, and a normal request still gets its answer.
    for server in [&controller, &worker, &web] {
        let health = client.get(format!("{}/health", server.url)).send();
        assert!(health.is_ok_and(|r| r.status().is_success()), "{} stopped answering /health", server.url);
    }
    let (status, answer) =
        send(&client, &format!("{}/worker_generate_stream", controller.url), &serde_json::to_vec(&generate).unwrap())
            .unwrap();
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&answer).contains("\"error_code\":0"), "{}", String::from_utf8_lossy(&answer));
    let (status, answer) =
        send(&client, &format!("{}/api/chat", web.url), &serde_json::to_vec(&chat).unwrap()).unwrap();
    assert_eq!(status, 200);
    let last = String::from_utf8_lossy(&answer).lines().last().map(String::from).unwrap_or_default();
    assert!(!last.contains("\"error\""), "{last}");
    assert_no_failures("request", &failures);
}
