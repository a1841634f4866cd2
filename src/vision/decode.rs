//! Image files to 8-bit RGB, as the release's `Image.open(path).convert("RGB")` (Pillow 10.2) gives them.
//!
//! Mode rules reproduced from Pillow's `convert("RGB")`: gray is replicated; alpha is dropped, never
//! composited; palettes are looked up; 16-bit gray (Pillow modes `I;16` / `I`) is clipped to 255, not shifted;
//! 16-bit RGB, RGBA and LA keep the high byte (Pillow unpacks them with `RGB;16B`-style raw modes). No EXIF
//! rotation, as Pillow's `open` applies none.

use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use image::{DynamicImage, ImageFormat, RgbImage};

use crate::{Error, Result};

/// Pillow's `Image.MAX_IMAGE_PIXELS`: the default limit above which an image is refused as a decompression bomb.
pub const DEFAULT_MAX_PIXELS: u64 = 89_478_485;

/// The pixels one image may take, checked from its header before anything is decoded or allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PixelLimit {
    pub max_pixels: u64,
    /// The image is padded to a square of its long side afterwards (`expand2square`): the square counts,
    /// since a 60000x2 image becomes 60000x60000.
    pub padded_to_square: bool,
}

impl PixelLimit {
    /// The decoded image alone.
    pub fn decoded(max_pixels: u64) -> Self {
        Self { max_pixels, padded_to_square: false }
    }

    /// The decoded image and the square it is padded to.
    pub fn padded(max_pixels: u64) -> Self {
        Self { max_pixels, padded_to_square: true }
    }

    /// Refuses empty images and images whose pixels (or padded square) pass the limit; returns the
    /// decoded image's pixel count.
    pub fn check(&self, width: u32, height: u32) -> std::result::Result<u64, String> {
        if width == 0 || height == 0 {
            return Err(format!("image has zero size ({width}x{height})"));
        }
        let max_pixels = self.max_pixels;
        let pixels = u64::from(width) * u64::from(height);
        if pixels > max_pixels {
            return Err(format!(
                "image size ({width}x{height} = {pixels} pixels) exceeds the limit of {max_pixels} pixels (possible decompression bomb)"
            ));
        }
        let side = u64::from(width.max(height));
        if self.padded_to_square && side * side > max_pixels {
            return Err(format!(
                "image size ({width}x{height}) padded to a square ({side}x{side} = {} pixels) exceeds the limit of \
                 {max_pixels} pixels",
                side * side
            ));
        }
        Ok(pixels)
    }
}

/// Formats accepted: JPEG decoded by libjpeg-turbo (`jpeg.rs`), the others by the `image` crate.
const SUPPORTED: [ImageFormat; 6] =
    [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP, ImageFormat::Bmp, ImageFormat::Gif, ImageFormat::Tiff];

fn image_error(path: &Path, message: impl Into<String>) -> Error {
    Error::Image { path: path.to_path_buf(), message: message.into() }
}

/// Read and decode the image file at `path` to RGB; images over `limit` are refused.
pub fn load_rgb(path: &Path, limit: PixelLimit) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_rgb(&bytes, path, limit)
}

/// Decode an encoded image held in memory to RGB; `path` only names it in errors.
pub fn decode_rgb(bytes: &[u8], path: &Path, limit: PixelLimit) -> Result<RgbImage> {
    let reader = || {
        image::io::Reader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| image_error(path, format!("cannot read: {e}")))
    };
    let format = match reader()?.format() {
        Some(format) if SUPPORTED.contains(&format) => format,
        Some(format) => {
            return Err(image_error(
                path,
                format!("unsupported format {format:?} (supported: PNG, JPEG, WebP, BMP, GIF, TIFF)"),
            ))
        }
        None => {
            return Err(image_error(path, "not a recognised image format (supported: PNG, JPEG, WebP, BMP, GIF, TIFF)"))
        }
    };
    if format == ImageFormat::Jpeg {
        return super::jpeg::decode(bytes, |w, h| limit.check(w, h).map(|_| ()))
            .map_err(|message| image_error(path, message));
    }
    // Check the header's size before decoding anything, as Pillow's `_decompression_bomb_check` does.
    let (width, height) = guarded(path, || reader()?.into_dimensions().map_err(|e| decode_error(path, format, e)))?;
    let pixels = limit.check(width, height).map_err(|message| image_error(path, message))?;
    let mut reader = reader()?;
    let mut limits = image::io::Limits::default();
    // Room for the decoded image at 8 bytes per pixel (RGBA16) plus decoder scratch space.
    limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let decoded = guarded(path, || reader.decode().map_err(|e| decode_error(path, format, e)))?;
    to_rgb_like_pillow(decoded, path)
}

fn decode_error(path: &Path, format: ImageFormat, e: image::ImageError) -> Error {
    image_error(path, format!("cannot decode as {format:?} (truncated or corrupt?): {e}"))
}

/// Run a decoder step, turning a panic inside a third-party decoder into an error naming the file.
fn guarded<T>(path: &Path, step: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(step))
        .unwrap_or_else(|_| Err(image_error(path, "the decoder failed on this file (corrupt data?)")))
}

/// Map a 16-bit sample to 8 bits the way Pillow's unpackers for 16-bit RGB, RGBA and LA do: keep the high byte.
fn high_byte(v: u16) -> u8 {
    (v >> 8) as u8
}

fn to_rgb_like_pillow(image: DynamicImage, path: &Path) -> Result<RgbImage> {
    let (w, h) = (image.width(), image.height());
    let rgb = |f: &dyn Fn(u32, u32) -> [u8; 3]| RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
    Ok(match image {
        DynamicImage::ImageRgb8(buffer) => buffer,
        DynamicImage::ImageLuma8(b) => rgb(&|x, y| [b.get_pixel(x, y).0[0]; 3]),
        DynamicImage::ImageLumaA8(b) => rgb(&|x, y| [b.get_pixel(x, y).0[0]; 3]),
        DynamicImage::ImageRgba8(b) => rgb(&|x, y| {
            let [r, g, b, _alpha] = b.get_pixel(x, y).0;
            [r, g, b]
        }),
        // Pillow's I;16 -> L conversion clips at 255 (`I16_L`), it does not scale.
        DynamicImage::ImageLuma16(b) => rgb(&|x, y| [b.get_pixel(x, y).0[0].min(255) as u8; 3]),
        DynamicImage::ImageLumaA16(b) => rgb(&|x, y| [high_byte(b.get_pixel(x, y).0[0]); 3]),
        DynamicImage::ImageRgb16(b) => rgb(&|x, y| b.get_pixel(x, y).0.map(high_byte)),
        DynamicImage::ImageRgba16(b) => rgb(&|x, y| {
            let [r, g, b, _alpha] = b.get_pixel(x, y).0;
            [r, g, b].map(high_byte)
        }),
        other => return Err(image_error(path, format!("unsupported pixel format {:?}", other.color()))),
    })
}
