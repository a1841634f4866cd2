//! JPEG decoding with libjpeg-turbo's own decoder, so that pixels equal Pillow 10.2's (its wheels bundle
//! libjpeg-turbo 3.0.1). `mozjpeg-sys` compiles that decoder (mozjpeg's fork, whose decoding is libjpeg-turbo's)
//! from C with `cc`, without SIMD; the C and SIMD paths of ISLOW IDCT, fancy upsampling and colour conversion
//! give the same samples.
//!
//! Settings as Pillow's `JpegDecode.c`: libjpeg defaults (ISLOW, fancy upsampling, full scale), the output
//! colour space from the component count (1: gray, 3: RGB, 4: CMYK), then `convert("RGB")` as Pillow does it.

use std::ffi::c_int;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use image::RgbImage;
use mozjpeg::{ColorSpace, Decompress};
use mozjpeg_sys as ffi;

/// What libjpeg's error exit carries out of the C code (unwinding is allowed: mozjpeg-sys builds it with
/// `-fexceptions` and declares its callbacks `C-unwind`).
struct Failure(String);

/// Decode `bytes` to RGB; `check_size(width, height)` runs on the header's size before any pixel is decoded.
/// Errors are messages without the file name.
pub(super) fn decode(
    bytes: &[u8],
    check_size: impl FnOnce(u32, u32) -> Result<(), String>,
) -> Result<RgbImage, String> {
    match catch_unwind(AssertUnwindSafe(|| decode_inner(bytes, check_size))) {
        Ok(result) => result,
        Err(payload) => Err(match payload.downcast::<Failure>() {
            Ok(failure) => failure.0,
            Err(_) => "the JPEG decoder failed on this file (corrupt data?)".to_string(),
        }),
    }
}

fn decode_inner(bytes: &[u8], check_size: impl FnOnce(u32, u32) -> Result<(), String>) -> Result<RgbImage, String> {
    let io = |e: std::io::Error| format!("cannot decode as JPEG: {e}");
    let header = Decompress::builder().with_err(error_manager()).from_mem(bytes).map_err(io)?;
    let (width, height) = (header.width() as u32, header.height() as u32);
    check_size(width, height)?;
    // Pillow's modes by component count (`JpegImagePlugin.SOF`); it refuses other counts.
    let (space, channels) = match header.components().len() {
        1 => (ColorSpace::JCS_GRAYSCALE, 1),
        3 => (ColorSpace::JCS_RGB, 3),
        4 => (ColorSpace::JCS_CMYK, 4),
        n => return Err(format!("cannot handle {n}-layer JPEG images (Pillow neither)")),
    };
    let mut started = header.to_colorspace(space).map_err(io)?;
    let samples: Vec<u8> = started.read_scanlines().map_err(io)?;
    // Reading up to EOI makes a file without one an error, as in Pillow ("image file is truncated").
    started.finish().map_err(io)?;
    let pixels = samples.chunks_exact(channels);
    let rgb: Vec<u8> = match channels {
        1 => pixels.flat_map(|p| [p[0]; 3]).collect(),
        3 => samples,
        _ => pixels.flat_map(|p| cmyk_to_rgb([p[0], p[1], p[2], p[3]])).collect(),
    };
    RgbImage::from_raw(width, height, rgb).ok_or_else(|| "the JPEG decoder returned a short image".to_string())
}

/// Pillow reads 4-component JPEGs as inverted CMYK (`CMYK;I`, Adobe's convention), then `cmyk2rgb` in
/// Convert.c: `nk = 255 - k; out = clip(nk - nk * c / 255)` with its rounding MULDIV255.
fn cmyk_to_rgb(libjpeg: [u8; 4]) -> [u8; 3] {
    let [c, m, y, k] = libjpeg.map(|v| 255 - i32::from(v));
    let nk = 255 - k;
    let muldiv255 = |a: i32| {
        let t = a * nk + 128;
        ((t >> 8) + t) >> 8
    };
    [c, m, y].map(|v| (nk - muldiv255(v)).clamp(0, 255) as u8)
}

fn error_manager() -> ffi::jpeg_error_mgr {
    // SAFETY: jpeg_std_error fills every field of the zeroed struct.
    let mut err: ffi::jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { ffi::jpeg_std_error(&mut err) };
    err.error_exit = Some(error_exit);
    err.emit_message = Some(emit_message);
    err
}

extern "C-unwind" fn error_exit(cinfo: &mut ffi::jpeg_common_struct) {
    resume_unwind(Box::new(Failure(format!("cannot decode as JPEG: {}", message(cinfo)))))
}

/// Warnings are ignored as Pillow ignores them, except running out of data: libjpeg would pad the image,
/// Pillow raises "image file is truncated".
extern "C-unwind" fn emit_message(cinfo: &mut ffi::jpeg_common_struct, level: c_int) {
    // SAFETY: libjpeg calls this with the error manager set up in `error_manager`.
    let code = unsafe { (*cinfo.err).msg_code };
    if level < 0 && code == ffi::JWRN_JPEG_EOF {
        resume_unwind(Box::new(Failure("image file is truncated (premature end of JPEG data)".to_string())))
    }
}

fn message(cinfo: &mut ffi::jpeg_common_struct) -> String {
    // SAFETY: format_message writes at most JMSG_LENGTH_MAX (80) bytes, NUL-terminated, into the buffer; the
    // binding types the buffer as `&[u8; 80]`, so it is passed as the raw pointer that it is.
    unsafe {
        let Some(format) = (*cinfo.err).format_message else { return "unknown libjpeg error".to_string() };
        type Raw = unsafe extern "C-unwind" fn(&mut ffi::jpeg_common_struct, *mut u8);
        let format: Raw = std::mem::transmute(format);
        let mut buffer = [0u8; 80];
        format(cinfo, buffer.as_mut_ptr());
        let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
        String::from_utf8_lossy(&buffer[..end]).into_owned()
    }
}
