#!/usr/bin/env python3
"""Image preprocessing fixtures: deterministic images and what the release computes from them.

The release preprocesses with `Image.open(f).convert("RGB")` (Pillow 10.2) and `mm_utils.process_images`:
with `image_aspect_ratio: pad` each image is expanded to a square filled with `int(255 * mean)` and run through
transformers 4.37.2 `CLIPImageProcessor.preprocess` on its own; otherwise the whole list goes through the
processor in one call. This script reproduces both and records, per image and mode, the sha256 of the exact
float32 bytes of `pixel_values[i]` plus sampled values (or the error the release raises).

  python parity/preprocess_fixtures.py                 # (re)write tests/fixtures/preprocess
  python parity/preprocess_fixtures.py --check         # regenerate in a temp dir, compare with the committed data
  python parity/preprocess_fixtures.py --check --rust-dump DIR
        # also compare full tensors with the Rust output written by
        # ARCANA_PREPROCESS_DUMP=DIR cargo test --test preprocess
  python parity/preprocess_fixtures.py --jpeg-report DIR [JPEG...]
        # per-pixel difference between Pillow's JPEG decoding and the Rust decoder's (dumped in DIR)

Run inside the reference environment: `source scripts/env.sh`.
"""
import argparse
import hashlib
import io
import json
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import CLIPImageProcessor

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "preprocess"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# openai/clip-vit-large-patch14-336's preprocessor_config.json, the vision tower's settings.
PROCESSOR_CONFIG = {
    "crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 3, "size": 336,
}
SAMPLES_PER_TENSOR = 32


# ---------------------------------------------------------------------------------------------- images

def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width, height, bit_depth, color_type, rows):
    """A PNG written byte by byte, for layouts Pillow cannot save (16-bit RGB/RGBA/LA, 2- and 4-bit gray)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    data = zlib.compress(b"".join(b"\x00" + row for row in rows), 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def pattern(width, height, channels, seed):
    """Smooth gradients, a sharp checker band and a noisy patch: compresses well, exercises the filter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    planes = []
    for c in range(channels):
        phase = rng.uniform(0, 6.28)
        v = 127.5 + 100 * np.sin(x / max(width, 1) * (3 + c) + phase) * np.cos(y / max(height, 1) * (2 + c))
        v += np.where(((x // 7 + y // 5) % 2 == 0) & (np.abs(y - height / 3) < max(height / 10, 1)), 60, -20)
        planes.append(v)
    img = np.stack(planes, axis=-1)
    ph, pw = min(max(height // 6, 1), 48), min(max(width // 6, 1), 48)
    img[height // 2: height // 2 + ph, width // 2: width // 2 + pw] = rng.integers(0, 256, (min(ph, height - height // 2), min(pw, width - width // 2), channels))
    return np.clip(img, 0, 255).astype(np.uint8)


def save_pil(array, mode, fmt, **kwargs):
    buf = io.BytesIO()
    image = Image.fromarray(array) if mode is None else Image.fromarray(array, mode)
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def make_images():
    """(file name, encoded bytes) of every fixture image; deterministic."""
    rgb = lambda w, h, seed=0: pattern(w, h, 3, seed)
    gray = lambda w, h, seed=0: pattern(w, h, 1, seed)[..., 0]
    images = [
        ("rgb_1x1.png", save_pil(np.array([[[200, 30, 90]]], np.uint8), None, "PNG")),
        ("rgb_3000x1.png", save_pil(rgb(3000, 1, 1), None, "PNG")),
        ("rgb_1x3000.png", save_pil(rgb(1, 3000, 2), None, "PNG")),
        ("rgb_3x3.png", save_pil(rgb(3, 3, 3), None, "PNG")),
        ("rgb_5x3.png", save_pil(rgb(5, 3, 4), None, "PNG")),
        ("rgb_7x4.png", save_pil(rgb(7, 4, 5), None, "PNG")),
        ("rgb_10x21.png", save_pil(rgb(10, 21, 6), None, "PNG")),
        ("rgb_100x100.png", save_pil(rgb(100, 100, 7), None, "PNG")),
        ("rgb_336x336.png", save_pil(rgb(336, 336, 8), None, "PNG")),
        ("rgb_336x500.png", save_pil(rgb(336, 500, 9), None, "PNG")),
        ("rgb_500x336.png", save_pil(rgb(500, 336, 10), None, "PNG")),
        ("rgb_337x336.png", save_pil(rgb(337, 336, 11), None, "PNG")),
        ("rgb_335x1001.png", save_pil(rgb(335, 1001, 12), None, "PNG")),
        ("rgb_641x479.png", save_pil(rgb(641, 479, 13), None, "PNG")),
        ("rgb_1999x1003.png", save_pil(rgb(1999, 1003, 14), None, "PNG")),
        ("rgb_4000x3000.png", save_pil(rgb(4000, 3000, 15), None, "PNG")),
        ("gray_640x480.png", save_pil(gray(640, 480, 16), "L", "PNG")),
        ("la_300x200.png", save_pil(pattern(300, 200, 2, 17), "LA", "PNG")),
        ("rgba_333x517.png", save_pil(pattern(333, 517, 4, 18), "RGBA", "PNG")),
        ("bilevel_101x61.png", save_pil(gray(101, 61, 19) > 128, None, "PNG")),
        ("palette_257x129.png", palette_png(257, 129, 20, transparency=True)),
        ("gray16_200x150.png", save_pil(gray16(200, 150), None, "PNG")),
        ("gray16_199x151.tif", save_pil(gray16(199, 151), "I;16", "TIFF")),
        ("rgb16_120x90.png", raw16_png(120, 90, 3, 21)),
        ("rgba16_91x120.png", raw16_png(91, 120, 4, 22)),
        ("la16_64x80.png", raw16_png(64, 80, 2, 23)),
        ("gray2_90x60.png", low_bit_gray_png(90, 60, 2, 24)),
        ("gray4_61x90.png", low_bit_gray_png(61, 90, 4, 25)),
        ("rgb_202x150.bmp", save_pil(rgb(202, 150, 26), None, "BMP")),
        ("palette_123x77.bmp", palette_bytes(123, 77, 27, "BMP")),
        ("animated_150x100.gif", animated_gif(150, 100, 28)),
        ("rgb_250x180.tif", save_pil(rgb(250, 180, 29), None, "TIFF", compression="tiff_lzw")),
        ("rgb_lossless_260x170.webp", save_pil(rgb(260, 170, 30), None, "WEBP", lossless=True)),
        ("rgba_lossless_170x260.webp", save_pil(pattern(170, 260, 4, 31), "RGBA", "WEBP", lossless=True)),
    ]
    return images + jpeg_images()


def jpeg_images():
    """JPEGs as Pillow writes them: subsamplings, progressive, restart markers, gray, CMYK, odd sizes.
    4:4:0 and 4:1:1 need another encoder; they are measured, not fixtures (parity/README.md)."""
    rgb = pattern(161, 121, 3, 32)
    jpeg = lambda array, mode=None, **kw: save_pil(array, mode, "JPEG", quality=kw.pop("quality", 90), **kw)
    return [
        ("jpeg_baseline_420_161x121.jpg", jpeg(rgb, subsampling=2)),
        ("jpeg_baseline_422_161x121.jpg", jpeg(rgb, subsampling=1)),
        ("jpeg_baseline_444_161x121.jpg", jpeg(rgb, subsampling=0)),
        ("jpeg_progressive_420_161x121.jpg", jpeg(rgb, subsampling=2, progressive=True)),
        ("jpeg_progressive_422_161x121.jpg", jpeg(rgb, subsampling=1, progressive=True)),
        ("jpeg_restart_420_161x121.jpg", jpeg(rgb, subsampling=2, restart_marker_blocks=3, quality=60)),
        ("jpeg_restart_progressive_444_161x121.jpg", jpeg(rgb, subsampling=0, progressive=True, restart_marker_rows=1)),
        ("jpeg_gray_161x121.jpg", jpeg(rgb[..., 1], "L")),
        ("jpeg_gray_progressive_161x121.jpg", jpeg(rgb[..., 2], "L", progressive=True)),
        ("jpeg_cmyk_97x61.jpg", jpeg(pattern(97, 61, 4, 33), "CMYK")),
        ("jpeg_420_1x1.jpg", jpeg(pattern(1, 1, 3, 34), subsampling=2)),
        ("jpeg_420_17x9.jpg", jpeg(pattern(17, 9, 3, 35), subsampling=2)),
        ("jpeg_422_1000x3.jpg", jpeg(pattern(1000, 3, 3, 36), subsampling=1)),
        ("jpeg_progressive_420_3x1000.jpg", jpeg(pattern(3, 1000, 3, 37), subsampling=2, progressive=True)),
    ]


def gray16(width, height):
    """16-bit gray whose low rows stay under 256 (kept by Pillow's clip) and whose high rows go over it."""
    y, x = np.mgrid[0:height, 0:width]
    return ((x * 3 + y * 5) % 256 + (y > height // 2) * (x * 400)).astype(np.uint16)


def raw16_png(width, height, channels, seed):
    values = pattern(width, height, channels, seed).astype(np.uint16) * 257 + np.arange(width, dtype=np.uint16)[None, :, None] % 251
    color_type = {2: 4, 3: 2, 4: 6}[channels]
    rows = [values[r].astype(">u2").tobytes() for r in range(height)]
    return raw_png(width, height, 16, color_type, rows)


def low_bit_gray_png(width, height, bits, seed):
    levels = pattern(width, height, 1, seed)[..., 0] >> (8 - bits)
    per_byte = 8 // bits
    rows = []
    for r in range(height):
        padded = np.concatenate([levels[r], np.zeros((-width) % per_byte, np.uint8)]).reshape(-1, per_byte)
        packed = np.zeros(len(padded), np.uint16)
        for i in range(per_byte):
            packed = packed | (padded[:, i].astype(np.uint16) << (8 - bits * (i + 1)))
        rows.append(packed.astype(np.uint8).tobytes())
    return raw_png(width, height, bits, 0, rows)


def palette_image(width, height, seed):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(pattern(width, height, 1, seed)[..., 0], "L").convert("P")
    image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    return image


def palette_png(width, height, seed, transparency):
    buf = io.BytesIO()
    palette_image(width, height, seed).save(buf, "PNG", transparency=bytes(range(0, 256)) if transparency else None)
    return buf.getvalue()


def palette_bytes(width, height, seed, fmt):
    buf = io.BytesIO()
    palette_image(width, height, seed).save(buf, fmt)
    return buf.getvalue()


def animated_gif(width, height, seed):
    frames = [palette_image(width, height, seed + i) for i in range(2)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0, optimize=False)
    return buf.getvalue()


# ------------------------------------------------------------------------------------- the release's way

def processor(config=None):
    return CLIPImageProcessor(**(config or PROCESSOR_CONFIG))


def expand_to_square(image, fill):
    """`mm_utils.expand2square`: paste centered on a square of side max(w, h)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return square


def release_pixel_values(paths, mode, config=None):
    """`process_images` on `Image.open(p).convert("RGB")`: a list with one float32 array or error per image."""
    proc = processor(config)
    images = [Image.open(p).convert("RGB") for p in paths]
    if mode == "pad":
        fill = tuple(int(x * 255) for x in proc.image_mean)
        out = []
        for image in images:
            try:
                out.append(proc.preprocess(expand_to_square(image, fill), return_tensors="pt")["pixel_values"][0].numpy())
            except Exception as e:  # the release raises: record it
                out.append(f"{type(e).__name__}: {e}")
        return out
    try:
        return list(proc(images, return_tensors="pt")["pixel_values"].numpy())
    except Exception as e:
        return [f"{type(e).__name__}: {e}"] * len(images)


def sample_positions(shape, name):
    """Corners, center and pseudo-random positions, seeded by the file name so they are stable."""
    c, h, w = shape
    rng = np.random.default_rng(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    fixed = [(0, 0, 0), (1, h - 1, 0), (2, 0, w - 1), (0, h - 1, w - 1), (1, h // 2, w // 2)]
    rand = [(int(rng.integers(c)), int(rng.integers(h)), int(rng.integers(w))) for _ in range(SAMPLES_PER_TENSOR - len(fixed))]
    return fixed + rand


def record(name, values):
    if isinstance(values, str):
        return {"error": values}
    values = np.ascontiguousarray(values, dtype="<f4")
    return {
        "shape": list(values.shape),
        "sha256": hashlib.sha256(values.tobytes()).hexdigest(),
        # [channel, row, column, float32 bits]
        "samples": [[c, y, x, int(values[c, y, x].view("<u4"))] for c, y, x in sample_positions(values.shape, name)],
    }


def expected_for(image_dir, names):
    """Per image: Pillow's mode and size, the sha256 of its RGB bytes, and the pad/plain records.
    Plain mode runs one processor call per image (the batch rule for layouts is tested separately)."""
    entries = []
    for name in names:
        path = image_dir / name
        opened = Image.open(path)
        rgb = np.asarray(opened.convert("RGB"))
        entry = {"file": name, "pillow_mode": opened.mode, "size": list(opened.size),
                 "rgb_sha256": hashlib.sha256(rgb.tobytes()).hexdigest()}
        for mode in ("pad", "plain"):
            entry[mode] = record(f"{name}/{mode}", release_pixel_values([path], mode)[0])
        entries.append(entry)
        print(f"  {name}: {opened.mode} {opened.size}", file=sys.stderr)
    return entries


def batch_expectations(image_dir):
    """Plain mode on lists: transformers reads every image's axes the way it reads the first one's."""
    batches = [["rgb_7x4.png", "rgb_5x3.png"], ["rgb_5x3.png", "rgb_7x4.png"], ["rgb_3x3.png", "rgb_5x3.png"]]
    out = []
    for names in batches:
        values = release_pixel_values([image_dir / n for n in names], "plain")
        out.append({"files": names, "plain": [record(f"batch/{'+'.join(names)}/{i}", v) for i, v in enumerate(values)]})
    return out


# Settings other than the vision tower's, for the paths it never takes: crops larger than the image (zero
# padding, one row/column lost on an odd difference), no resize, an exact-size resize, no normalize.
CONFIG_VARIANTS = [
    {"do_resize": False, "crop_size": 336},
    {"size": {"height": 300, "width": 350}, "crop_size": {"height": 320, "width": 331}, "do_normalize": False},
    {"size": 224, "crop_size": 224, "do_center_crop": False, "do_rescale": False,
     "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
]
VARIANT_FILES = ["rgb_100x100.png", "rgb_335x1001.png", "rgb_641x479.png", "rgb_7x4.png"]


def variant_expectations(image_dir):
    out = []
    for config in CONFIG_VARIANTS:
        cases = []
        for name in VARIANT_FILES:
            case = {"file": name}
            for mode in ("pad", "plain"):
                case[mode] = record(f"variant/{json.dumps(config)}/{name}/{mode}", release_pixel_values([image_dir / name], mode, config)[0])
            cases.append(case)
        out.append({"processor_config": config, "cases": cases})
    return out


def write_fixtures(out_dir):
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for name, data in make_images():
        (image_dir / name).write_bytes(data)
        names.append(name)
    expected = {
        "generated_by": "python parity/preprocess_fixtures.py (transformers 4.37.2, Pillow 10.2.0, numpy 1.26)",
        "processor_config": PROCESSOR_CONFIG,
        "images": expected_for(image_dir, names),
        "batches": batch_expectations(image_dir),
        "config_variants": variant_expectations(image_dir),
    }
    (out_dir / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------- checks

def check(rust_dump):
    """Regenerate into a temp dir; images must decode to the same pixels, expectations must match exactly."""
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        write_fixtures(fresh)
        for name, _ in make_images():
            old, new = FIXTURES / "images" / name, fresh / "images" / name
            if not old.exists():
                failures.append(f"{name}: not committed")
                continue
            a, b = Image.open(old), Image.open(new)
            if a.mode != b.mode or a.size != b.size or np.asarray(a).tobytes() != np.asarray(b).tobytes():
                failures.append(f"{name}: regenerated image differs from the committed one")
        committed = json.loads((FIXTURES / "expected.json").read_text())
        regenerated = json.loads((fresh / "expected.json").read_text())
        for old, new in zip(committed["images"], regenerated["images"]):
            if old != new:
                failures.append(f"{old['file']}: expected values differ from the committed ones")
        if committed["config_variants"] != regenerated["config_variants"]:
            failures.append("config variant expectations differ")
        if committed["batches"] != regenerated["batches"] or len(committed["images"]) != len(regenerated["images"]):
            failures.append("batch expectations or image list differ")
        if rust_dump:
            failures += compare_dump(Path(rust_dump), committed["images"])
    for f in failures:
        print("FAIL", f)
    print("check:", "ok" if not failures else f"{len(failures)} failure(s)")
    return not failures


def compare_dump(dump_dir, entries):
    """Full-tensor comparison with `<file>.<mode>.f32` files (raw little-endian float32, CHW) from the Rust test."""
    failures = []
    for entry in entries:
        for mode in ("pad", "plain"):
            dumped = dump_dir / f"{entry['file']}.{mode}.f32"
            want = release_pixel_values([FIXTURES / "images" / entry["file"]], mode)[0]
            if isinstance(want, str):
                continue
            if not dumped.exists():
                failures.append(f"{dumped}: missing")
                continue
            got = np.fromfile(dumped, "<f4")
            if got.size != want.size:
                failures.append(f"{entry['file']} {mode}: {got.size} values, expected {want.size}")
                continue
            got = got.reshape(want.shape)
            diff = np.abs(got.astype(np.float64) - want)
            if diff.max() > 0:
                where = np.argwhere(diff > 0)
                failures.append(f"{entry['file']} {mode}: max |diff| {diff.max():.6g} at {len(where)} values, first at {tuple(where[0])}")
    return failures


def jpeg_report(dump_dir, jpegs):
    """Per file: max and mean |Pillow RGB - Rust RGB| and the share of differing samples.
    The Rust side writes `<name>.rgb` (raw RGB bytes) into DUMP_DIR:
    ARCANA_JPEG_DUMP=DUMP_DIR ARCANA_JPEG_FILES=a.jpg:b.jpg cargo test --test preprocess -- --ignored jpeg"""
    for path in map(Path, jpegs):
        want = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
        got = np.fromfile(dump_dir / (path.name + ".rgb"), np.uint8).astype(np.int16).reshape(want.shape)
        diff = np.abs(got - want)
        print(f"{path.name}: {want.shape[1]}x{want.shape[0]} max {diff.max()} mean {diff.mean():.4f} differing {np.mean(diff > 0) * 100:.2f}%")


def make_jpegs(out_dir):
    """Baseline and progressive JPEGs at 4:4:4, 4:2:2 and 4:2:0 from one photo-like pattern (quality 90), plus
    gray, restart markers, CMYK, qualities 20 and 100, and sizes 1x1, 17x9, 1000x3, 3x1000."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = Image.fromarray(pattern(333, 250, 3, 40))
    saves = []
    for progressive in (False, True):
        for sub, label in ((0, "444"), (1, "422"), (2, "420")):
            saves.append((f"{'progressive' if progressive else 'baseline'}_{label}", base, dict(subsampling=sub, progressive=progressive)))
    saves += [
        ("gray", base.convert("L"), {}),
        ("gray_progressive", base.convert("L"), dict(progressive=True)),
        ("restart_blocks3_420", base, dict(subsampling=2, restart_marker_blocks=3)),
        ("restart_rows1_444_progressive", base, dict(subsampling=0, restart_marker_rows=1, progressive=True)),
        ("q100_444", base, dict(quality=100, subsampling=0)),
        ("q20_420", base, dict(quality=20, subsampling=2)),
        ("cmyk", Image.fromarray(pattern(131, 77, 4, 42), "CMYK"), {}),
        ("cmyk_progressive", Image.fromarray(pattern(131, 77, 4, 42), "CMYK"), dict(progressive=True)),
    ]
    for w, h in ((1, 1), (17, 9), (1000, 3), (3, 1000)):
        image = Image.fromarray(pattern(w, h, 3, 41))
        saves += [(f"odd_{w}x{h}_{label}", image, dict(subsampling=sub)) for sub, label in ((0, "444"), (1, "422"), (2, "420"))]
        saves.append((f"odd_{w}x{h}_progressive_420", image, dict(subsampling=2, progressive=True)))
    paths = []
    for name, image, options in saves:
        path = out_dir / f"{name}.jpg"
        image.save(path, "JPEG", **{"quality": 90, **options})
        paths.append(path)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--rust-dump", help="folder with the Rust test's tensor dumps (with --check)")
    parser.add_argument("--jpeg-report", metavar="DUMP_DIR", help="compare Rust JPEG decodes in DUMP_DIR with Pillow's")
    parser.add_argument("--make-jpegs", metavar="DIR", help="write the generated test JPEGs into DIR")
    parser.add_argument("jpegs", nargs="*")
    args = parser.parse_args()
    if args.make_jpegs:
        print("\n".join(str(p) for p in make_jpegs(Path(args.make_jpegs))))
    elif args.jpeg_report:
        jpeg_report(Path(args.jpeg_report), args.jpegs)
    elif args.check:
        sys.exit(0 if check(args.rust_dump) else 1)
    else:
        write_fixtures(FIXTURES)


if __name__ == "__main__":
    main()
