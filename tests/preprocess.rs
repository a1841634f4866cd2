//! Preprocessing parity with the release (Pillow 10.2 + transformers 4.37.2 CLIPImageProcessor): every fixture
//! image must give bit-identical pixel values, in pad and plain mode, or the same failure the release has.
//!
//! Recorded values: tests/fixtures/preprocess/expected.json, produced by
//! `source scripts/env.sh && python parity/preprocess_fixtures.py`. On a mismatch, rerun with
//! `ARCANA_PREPROCESS_DUMP=/tmp/dump cargo test --test preprocess` and compare full tensors with
//! `python parity/preprocess_fixtures.py --check --rust-dump /tmp/dump`.

use std::path::{Path, PathBuf};

use arcana::vision::preprocess::{
    decode_rgb, load_rgb, AspectMode, ImagePreprocessor, NamedImage, PixelLimit, PixelValues, PreprocessConfig,
    ResizeTarget, DEFAULT_MAX_PIXELS,
};
use arcana::Error;
use serde_json::Value;

mod common;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).expect("expected.json is committed");
    serde_json::from_str(&text).expect("expected.json is valid JSON")
}

fn preprocessor(mode: AspectMode) -> ImagePreprocessor {
    ImagePreprocessor::new(PreprocessConfig::default(), mode)
}

fn load(name: &str) -> NamedImage {
    let path = fixtures().join("images").join(name);
    let rgb = load_rgb(&path, PixelLimit::decoded(DEFAULT_MAX_PIXELS)).unwrap_or_else(|e| panic!("{name}: {e}"));
    NamedImage { path, rgb }
}

fn f32_bytes(values: &PixelValues) -> Vec<u8> {
    values.data.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Differences between our result and one recorded `{shape, sha256, samples}` or `{error}` entry.
fn compare(label: &str, got: &arcana::Result<PixelValues>, want: &Value) -> Vec<String> {
    match (got, want.get("error")) {
        (Err(_), Some(_)) => vec![],
        (Err(e), None) => vec![format!("{label}: failed ({e}), the release succeeds")],
        (Ok(_), Some(release_error)) => vec![format!("{label}: succeeded, the release fails with {release_error}")],
        (Ok(values), None) => {
            let shape: Vec<u64> = want["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
            if shape != [3, values.height as u64, values.width as u64] {
                return vec![format!("{label}: shape [3, {}, {}], expected {shape:?}", values.height, values.width)];
            }
            let mut problems = vec![];
            for sample in want["samples"].as_array().unwrap() {
                let [c, y, x, bits] = [0, 1, 2, 3].map(|i| sample[i].as_u64().unwrap() as usize);
                let v = values.data[(c * values.height + y) * values.width + x];
                if v.to_bits() as usize != bits {
                    problems.push(format!("{label}: [{c}, {y}, {x}] = {v}, expected {}", f32::from_bits(bits as u32)));
                }
            }
            if sha256_hex(&f32_bytes(values)) != want["sha256"].as_str().unwrap() {
                problems.push(format!("{label}: sha256 of the float32 bytes differs"));
            }
            problems
        }
    }
}

fn dump(label: &str, values: &arcana::Result<PixelValues>) {
    if let (Some(dir), Ok(values)) = (std::env::var_os("ARCANA_PREPROCESS_DUMP"), values) {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(Path::new(&dir).join(format!("{label}.f32")), f32_bytes(values)).unwrap();
    }
}

#[test]
fn fixture_config_is_the_default() {
    let json = &expected()["processor_config"];
    let parsed = PreprocessConfig::from_json(json, Path::new("expected.json")).unwrap();
    assert_eq!(parsed, PreprocessConfig::default());
    assert_eq!(parsed.pad_color(), [122, 116, 104]);
}

/// Saves the processor of `argv[1]` (a preprocessor_config.json) with `save_pretrained` into `argv[2]`.
const SAVE_PRETRAINED: &str = r#"
import sys
from transformers import CLIPImageProcessor
CLIPImageProcessor.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
"#;

#[test]
fn to_json_writes_what_transformers_saves_and_reads_back() {
    let exact = PreprocessConfig { size: ResizeTarget::Exact { height: 224, width: 300 }, ..Default::default() };
    for config in [PreprocessConfig::default(), exact] {
        let json = config.to_json();
        assert_eq!(PreprocessConfig::from_json(&json, Path::new("to_json")).unwrap(), config);
        let Some(python) = common::python_with_torch() else { continue };
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("preprocessor_config.json"), json.to_string()).unwrap();
        let saved = tmp.path().join("saved");
        let out = std::process::Command::new(python).args(["-c", SAVE_PRETRAINED]).arg(tmp.path()).arg(&saved).output();
        let out = out.unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let theirs: Value =
            serde_json::from_slice(&std::fs::read(saved.join("preprocessor_config.json")).unwrap()).unwrap();
        assert_eq!(json, theirs, "{config:?}");
    }
}

#[test]
fn every_fixture_image_is_bit_identical_in_pad_and_plain_mode() {
    let expected = expected();
    let images = expected["images"].as_array().unwrap();
    assert!(images.len() >= 30);
    // Pillow's JPEG modes (RGB, L, CMYK) decode through libjpeg-turbo on both sides.
    let jpegs = images.iter().filter(|e| e["file"].as_str().unwrap().ends_with(".jpg"));
    assert!(jpegs.map(|e| e["pillow_mode"].as_str().unwrap()).collect::<std::collections::BTreeSet<_>>().len() == 3);
    let mut problems = vec![];
    let (mut identical, mut same_failure) = (0, 0);
    for entry in images {
        let name = entry["file"].as_str().unwrap();
        let image = load(name);
        let rgb_sha = sha256_hex(image.rgb.as_raw());
        if rgb_sha != entry["rgb_sha256"].as_str().unwrap() {
            problems.push(format!("{name}: decoded RGB differs from Pillow's convert(\"RGB\")"));
        }
        for (mode_name, mode) in [("pad", AspectMode::Pad), ("plain", AspectMode::Plain)] {
            let label = format!("{name}.{mode_name}");
            let got = preprocessor(mode).pixel_values(std::slice::from_ref(&image)).map(|mut v| v.remove(0));
            dump(&label, &got);
            let found = compare(&label, &got, &entry[mode_name]);
            if found.is_empty() {
                *if got.is_ok() { &mut identical } else { &mut same_failure } += 1;
            }
            problems.extend(found);
        }
    }
    eprintln!(
        "{} image/mode cases: {identical} bit-identical tensors, {same_failure} failing as the release fails",
        2 * images.len()
    );
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n"));
}

#[test]
fn other_processor_settings_are_bit_identical() {
    // Crops larger than the image, no resize, exact-size resize, no rescale or normalize.
    let mut problems = vec![];
    for variant in expected()["config_variants"].as_array().unwrap() {
        let config = PreprocessConfig::from_json(&variant["processor_config"], Path::new("expected.json")).unwrap();
        for case in variant["cases"].as_array().unwrap() {
            let image = load(case["file"].as_str().unwrap());
            for (mode_name, mode) in [("pad", AspectMode::Pad), ("plain", AspectMode::Plain)] {
                let p = ImagePreprocessor::new(config.clone(), mode);
                let got = p.pixel_values(std::slice::from_ref(&image)).map(|mut v| v.remove(0));
                let label = format!("{} {mode_name} {}", case["file"], variant["processor_config"]);
                problems.extend(compare(&label, &got, &case[mode_name]));
            }
        }
    }
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n"));
}

#[test]
fn plain_batches_read_axes_like_their_first_image() {
    for batch in expected()["batches"].as_array().unwrap() {
        let names: Vec<&str> = batch["files"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        let images: Vec<NamedImage> = names.iter().map(|n| load(n)).collect();
        let got = preprocessor(AspectMode::Plain).pixel_values(&images);
        for (i, want) in batch["plain"].as_array().unwrap().iter().enumerate() {
            let got_i = got.as_ref().map(|v| v[i].clone()).map_err(|e| Error::InvalidInput(e.to_string()));
            let problems = compare(&format!("{names:?}[{i}]"), &got_i, want);
            assert!(problems.is_empty(), "{}", problems.join("\n"));
        }
    }
}

#[test]
fn tensors_have_the_processor_shape() {
    let p = preprocessor(AspectMode::Pad);
    let a = fixtures().join("images/rgb_641x479.png");
    let b = fixtures().join("images/gray_640x480.png");
    assert_eq!(p.image_tensor(&a).unwrap().size(), [3, 336, 336]);
    let batch = p.batch_tensor(&[&a, &b]).unwrap();
    assert_eq!(batch.size(), [2, 3, 336, 336]);
    assert_eq!(batch.kind(), tch::Kind::Float);
    let single = p.pixel_values(&[load("gray_640x480.png")]).unwrap().remove(0);
    assert_eq!(Vec::<f32>::try_from(batch.get(1).flatten(0, -1)).unwrap(), single.data);
}

// ------------------------------------------------------------------------------------------- errors

fn image_error_message(result: arcana::Result<impl std::fmt::Debug>, path: &Path) -> String {
    match result {
        Err(e @ Error::Image { .. }) => {
            let message = e.to_string();
            assert!(message.contains(&path.display().to_string()), "error does not name the file: {message}");
            message
        }
        other => panic!("expected an image error for {}, got {other:?}", path.display()),
    }
}

fn png_header(width: u32, height: u32) -> Vec<u8> {
    // Signature and an IHDR chunk (8-bit RGB); its CRC is computed so that only the size is unusual.
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(13u32.to_be_bytes());
    out.extend(&ihdr);
    out.extend(crc32(&ihdr).to_be_bytes());
    out
}

/// A PNG header followed by a tiny IDAT chunk: decoders reach the pixel data, which is far too short.
fn png_header_and_data(width: u32, height: u32) -> Vec<u8> {
    let mut out = png_header(width, height);
    let idat = b"IDAT\x78\x9c\x03\x00\x00\x00\x00\x01";
    out.extend(((idat.len() - 4) as u32).to_be_bytes());
    out.extend(idat);
    out.extend(crc32(idat).to_be_bytes());
    out
}

#[test]
fn anyres_is_refused_and_other_values_are_plain() {
    let err = AspectMode::from_image_aspect_ratio(Some("anyres")).unwrap_err().to_string();
    assert!(err.contains("anyres") && err.contains("not supported"), "{err}");
    assert_eq!(AspectMode::from_image_aspect_ratio(Some("pad")).unwrap(), AspectMode::Pad);
    assert_eq!(AspectMode::from_image_aspect_ratio(Some("square")).unwrap(), AspectMode::Plain);
    assert_eq!(AspectMode::from_image_aspect_ratio(None).unwrap(), AspectMode::Plain);
}

#[test]
fn decompression_bombs_are_refused_before_decoding() {
    // 100000 x 100000 in the header and almost no pixel data: refused on the header alone.
    let path = Path::new("bomb.png");
    let message = image_error_message(
        decode_rgb(&png_header_and_data(100_000, 100_000), path, PixelLimit::decoded(DEFAULT_MAX_PIXELS)),
        path,
    );
    assert!(message.contains("exceeds the limit of 89478485 pixels"), "{message}");
    // 60000 x 2 is 120000 pixels, but a model that pads makes it a square of 3.6 billion: refused from
    // the header when padding applies, before anything is allocated.
    let wide = png_header_and_data(60_000, 2);
    let path = Path::new("wide.png");
    let message = image_error_message(decode_rgb(&wide, path, PixelLimit::padded(DEFAULT_MAX_PIXELS)), path);
    assert!(message.contains("60000x60000 = 3600000000 pixels"), "{message}");
    let message = image_error_message(preprocessor(AspectMode::Pad).encoded_image_tensor(&wide, "wide.png"), path);
    assert!(message.contains("padded to a square"), "{message}");
    let message = image_error_message(decode_rgb(&wide, path, PixelLimit::decoded(DEFAULT_MAX_PIXELS)), path);
    assert!(!message.contains("limit"), "not padded, only the missing pixel data is refused: {message}");
    // A configurable limit: a real 641 x 479 file against a limit one pixel too small; padded, its
    // 641 x 641 square counts.
    let file = fixtures().join("images/rgb_641x479.png");
    let p = preprocessor(AspectMode::Plain).with_max_pixels(641 * 479 - 1);
    image_error_message(p.image_tensor(&file), &file);
    assert!(preprocessor(AspectMode::Plain).with_max_pixels(641 * 479).image_tensor(&file).is_ok());
    let message =
        image_error_message(preprocessor(AspectMode::Pad).with_max_pixels(641 * 641 - 1).image_tensor(&file), &file);
    assert!(message.contains("641x641 = 410881 pixels") && message.contains("limit of 410880 pixels"), "{message}");
    assert!(preprocessor(AspectMode::Pad).with_max_pixels(641 * 641).image_tensor(&file).is_ok());
    // JPEG: the size comes from libjpeg's header read, before decompression starts.
    let mut jpeg = std::fs::read(fixtures().join("images/jpeg_baseline_420_161x121.jpg")).unwrap();
    let sof = jpeg.windows(2).position(|w| w == [0xff, 0xc0]).expect("baseline SOF0");
    jpeg[sof + 5..sof + 9].copy_from_slice(&[0xff, 0xdc, 0xff, 0xdc]); // 65500 x 65500
    let path = Path::new("bomb.jpg");
    let message = image_error_message(decode_rgb(&jpeg, path, PixelLimit::decoded(DEFAULT_MAX_PIXELS)), path);
    assert!(message.contains("65500x65500") && message.contains("exceeds the limit"), "{message}");
    let file = fixtures().join("images/jpeg_baseline_420_161x121.jpg");
    image_error_message(preprocessor(AspectMode::Pad).with_max_pixels(161 * 161 - 1).image_tensor(&file), &file);
    assert!(preprocessor(AspectMode::Pad).with_max_pixels(161 * 161).image_tensor(&file).is_ok());
}

#[test]
fn truncated_corrupt_and_empty_files_give_errors_naming_the_file() {
    let dir = std::env::temp_dir().join(format!("arcana-preprocess-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let png = std::fs::read(fixtures().join("images/rgb_641x479.png")).unwrap();
    let gif = std::fs::read(fixtures().join("images/animated_150x100.gif")).unwrap();
    let webp = std::fs::read(fixtures().join("images/rgb_lossless_260x170.webp")).unwrap();
    let tiff = std::fs::read(fixtures().join("images/rgb_250x180.tif")).unwrap();
    let jpeg = {
        let mut out = Vec::new();
        let rgb = load("rgb_641x479.png").rgb;
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&rgb).unwrap();
        out
    };
    let progressive = std::fs::read(fixtures().join("images/jpeg_progressive_420_161x121.jpg")).unwrap();
    let mut flipped = png.clone();
    let middle = flipped.len() / 2;
    flipped[middle..middle + 64].iter_mut().for_each(|b| *b ^= 0x5a);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated.png", png[..png.len() / 2].to_vec()),
        ("corrupt.png", flipped),
        ("truncated.gif", gif[..gif.len() / 3].to_vec()),
        ("truncated.jpg", jpeg[..jpeg.len() / 2].to_vec()),
        // Pillow raises "image file is truncated" for both; libjpeg alone would pad and warn.
        ("no_eoi.jpg", jpeg[..jpeg.len() - 2].to_vec()),
        ("truncated_progressive.jpg", progressive[..progressive.len() * 3 / 4].to_vec()),
        ("header_only.jpg", jpeg[..600.min(jpeg.len())].to_vec()),
        ("truncated.webp", webp[..webp.len() / 2].to_vec()),
        ("truncated.tif", tiff[..tiff.len() / 2].to_vec()),
        ("header_only.png", png_header(64, 64)),
        ("short_data.png", png_header_and_data(64, 64)),
        ("zero_width.png", png_header(0, 10)),
        ("empty.png", vec![]),
        ("text.png", b"not an image at all".to_vec()),
    ];
    for (name, bytes) in cases {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let message = image_error_message(preprocessor(AspectMode::Pad).image_tensor(&path), &path);
        eprintln!("{name}: {message}");
    }
    let missing = dir.join("missing.png");
    let err = preprocessor(AspectMode::Pad).image_tensor(&missing).unwrap_err();
    assert!(matches!(err, Error::Io { .. }) && err.to_string().contains("missing.png"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn images_the_release_cannot_process_give_clear_errors() {
    // 1 pixel high: transformers reads the array channels-first with one channel and `normalize` fails.
    let image = load("rgb_3000x1.png");
    let err = preprocessor(AspectMode::Plain).pixel_values(std::slice::from_ref(&image)).unwrap_err().to_string();
    assert!(err.contains("rgb_3000x1.png") && err.contains("channels-first"), "{err}");
    // Padded to 3000 x 3000 it is fine.
    assert!(preprocessor(AspectMode::Pad).pixel_values(&[image]).is_ok());
}

#[test]
fn config_fields_follow_clip_image_processor() {
    let path = Path::new("preprocessor_config.json");
    let parse = |text: &str| PreprocessConfig::from_json(&serde_json::from_str(text).unwrap(), path);
    // Missing fields take CLIPImageProcessor's own defaults (224), as `from_pretrained` would.
    let bare = parse("{}").unwrap();
    assert_eq!((bare.size, bare.crop_height, bare.crop_width), (ResizeTarget::ShortestEdge(224), 224, 224));
    let dicts = parse(r#"{"size": {"shortest_edge": 336}, "crop_size": {"height": 300, "width": 200}}"#).unwrap();
    assert_eq!((dicts.size, dicts.crop_height, dicts.crop_width), (ResizeTarget::ShortestEdge(336), 300, 200));
    let exact = parse(r#"{"size": {"height": 10, "width": 20}}"#).unwrap();
    assert_eq!(exact.size, ResizeTarget::Exact { height: 10, width: 20 });
    for (bad, field) in [
        (r#"{"resample": 2}"#, "resample"),
        (r#"{"size": "big"}"#, "size"),
        (r#"{"crop_size": 0}"#, "crop_size"),
        (r#"{"image_mean": [0.5, 0.5]}"#, "image_mean"),
        (r#"{"do_resize": "yes"}"#, "do_resize"),
    ] {
        let err = parse(bad).unwrap_err().to_string();
        assert!(err.contains(field) && err.contains("preprocessor_config.json"), "{bad}: {err}");
    }
}

/// Decode the JPEGs listed in ARCANA_JPEG_FILES (colon-separated) into ARCANA_JPEG_DUMP/<name>.rgb, for
/// `python parity/preprocess_fixtures.py --jpeg-report DUMP JPEG...` (see parity/README.md).
#[test]
#[ignore]
fn jpeg_decode_dump() {
    let (Some(files), Some(dir)) = (std::env::var("ARCANA_JPEG_FILES").ok(), std::env::var_os("ARCANA_JPEG_DUMP"))
    else {
        return;
    };
    std::fs::create_dir_all(&dir).unwrap();
    for file in files.split(':') {
        let path = Path::new(file);
        let rgb = load_rgb(path, PixelLimit::decoded(DEFAULT_MAX_PIXELS)).unwrap();
        let name = format!("{}.rgb", path.file_name().unwrap().to_string_lossy());
        std::fs::write(Path::new(&dir).join(name), rgb.as_raw()).unwrap();
    }
}

// ------------------------------------------------------------------------------------ small hashes

/// CRC-32 (ISO-HDLC, as PNG uses), for hand-made PNG headers.
fn crc32(bytes: &[u8]) -> u32 {
    !bytes.iter().fold(!0u32, |crc, &b| {
        (0..8).fold(crc ^ u32::from(b), |c, _| if c & 1 == 1 { (c >> 1) ^ 0xEDB8_8320 } else { c >> 1 })
    })
}

/// SHA-256 (FIPS 180-4), to compare with the Python side's `hashlib.sha256` without another dependency.
fn sha256_hex(bytes: &[u8]) -> String {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
        0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
        0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
        0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
        0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
        0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
        0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] =
        [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
    let mut message = bytes.to_vec();
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend((bytes.len() as u64 * 8).to_be_bytes());
    for block in message.chunks_exact(64) {
        let mut w = [0u32; 64];
        for i in 0..64 {
            w[i] = if i < 16 {
                u32::from_be_bytes(block[4 * i..4 * i + 4].try_into().unwrap())
            } else {
                let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
                let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
                w[i - 16].wrapping_add(s0).wrapping_add(w[i - 7]).wrapping_add(s1)
            };
        }
        let mut v = h;
        for i in 0..64 {
            let s1 = v[4].rotate_right(6) ^ v[4].rotate_right(11) ^ v[4].rotate_right(25);
            let ch = (v[4] & v[5]) ^ (!v[4] & v[6]);
            let t1 = v[7].wrapping_add(s1).wrapping_add(ch).wrapping_add(K[i]).wrapping_add(w[i]);
            let s0 = v[0].rotate_right(2) ^ v[0].rotate_right(13) ^ v[0].rotate_right(22);
            let maj = (v[0] & v[1]) ^ (v[0] & v[2]) ^ (v[1] & v[2]);
            let t2 = s0.wrapping_add(maj);
            v = [t1.wrapping_add(t2), v[0], v[1], v[2], v[3].wrapping_add(t1), v[4], v[5], v[6]];
        }
        for (a, b) in h.iter_mut().zip(v) {
            *a = a.wrapping_add(b);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}

#[test]
fn sha256_matches_known_digests() {
    assert_eq!(sha256_hex(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    assert_eq!(sha256_hex(&[b'a'; 1000]), "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3");
}
