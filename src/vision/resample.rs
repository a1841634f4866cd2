//! Bicubic resize that reproduces Pillow 10.2's `Image.resize(..., BICUBIC)` on 8-bit RGB images bit for bit
//! (`src/libImaging/Resample.c`: separable convolution, double-precision weights turned into 22-bit fixed
//! point, horizontal pass then vertical pass, a pass skipped when its size is unchanged).
//!
//! Every output pixel depends only on its own row's and column's taps, so [`resize_bicubic_window`] can compute
//! just the part of the resized image that a later center crop keeps, with the same values Pillow gives.

use image::RgbImage;

/// Fraction bits of the fixed-point weights (Pillow: `32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

/// Pillow's bicubic kernel with a = -0.5; support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point taps of one output index: the first input index and one weight per input index after it.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the output indices in `outputs`.
fn precompute_taps(in_size: usize, out_size: usize, outputs: std::ops::Range<usize>) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    let inverse_filter_scale = 1.0 / filter_scale;
    outputs
        .map(|out_index| {
            let center = (out_index as f64 + 0.5) * scale;
            // C `(int)` truncates toward zero, as Rust's `as` does.
            let first = ((center - support + 0.5) as i64).max(0) as usize;
            let end = ((center + support + 0.5) as i64).min(in_size as i64).max(first as i64) as usize;
            let raw: Vec<f64> =
                (first..end).map(|i| bicubic((i as f64 - center + 0.5) * inverse_filter_scale)).collect();
            let sum: f64 = raw.iter().sum();
            let one = (1u32 << PRECISION_BITS) as f64;
            let weights = raw
                .iter()
                .map(|&w| {
                    let w = if sum != 0.0 { w / sum } else { w };
                    // Round half away from zero, then truncate (Pillow's normalize_coeffs_8bpc).
                    if w < 0.0 {
                        (-0.5 + w * one) as i32
                    } else {
                        (0.5 + w * one) as i32
                    }
                })
                .collect();
            Taps { first, weights }
        })
        .collect()
}

/// Pillow's `clip8`: drop the fraction bits of a rounded accumulator and clamp to 0..=255.
fn clip8(acc: i32) -> u8 {
    if acc >= (1 << (PRECISION_BITS + 8)) {
        255
    } else if acc <= 0 {
        0
    } else {
        (acc >> PRECISION_BITS) as u8
    }
}

/// Weighted sum of `taps` over the pixels at `first + i * stride` (3 channels), rounded like Pillow.
fn convolve(data: &[u8], first: usize, stride: usize, weights: &[i32]) -> [u8; 3] {
    let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
    for (i, &w) in weights.iter().enumerate() {
        let p = first + i * stride;
        for (c, a) in acc.iter_mut().enumerate() {
            *a = a.wrapping_add((data[p + c] as i32).wrapping_mul(w));
        }
    }
    acc.map(clip8)
}

/// A rectangle of the resized image: columns `left..left + width`, rows `top..top + height`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub left: u32,
    pub top: u32,
    pub width: u32,
    pub height: u32,
}

/// Resize `src` to `width` x `height` with Pillow's BICUBIC filter.
pub fn resize_bicubic(src: &RgbImage, width: u32, height: u32) -> RgbImage {
    resize_bicubic_window(src, width, height, Window { left: 0, top: 0, width, height })
}

/// The `window` part of `src` resized to `width` x `height` with Pillow's BICUBIC filter; the window must lie
/// inside the resized image and `src` must not be empty.
pub fn resize_bicubic_window(src: &RgbImage, width: u32, height: u32, window: Window) -> RgbImage {
    let (in_w, in_h) = (src.width() as usize, src.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    let cols = window.left as usize..(window.left + window.width) as usize;
    let rows = window.top as usize..(window.top + window.height) as usize;
    debug_assert!(cols.end <= out_w && rows.end <= out_h && in_w > 0 && in_h > 0);

    // Pillow skips a pass whose size is unchanged: the other pass then reads the input directly.
    let (mid, mid_w, mid_first_row) = if out_w != in_w {
        let col_taps = precompute_taps(in_w, out_w, cols.clone());
        // Only the input rows the kept output rows read (Pillow also limits the pass to ybox_first..ybox_last).
        let needed_rows = if out_h != in_h {
            let row_taps = precompute_taps(in_h, out_h, rows.clone());
            let first = row_taps.iter().map(|t| t.first).min().unwrap_or(0);
            let end = row_taps.iter().map(|t| t.first + t.weights.len()).max().unwrap_or(0);
            first..end
        } else {
            rows.clone()
        };
        let data = src.as_raw();
        let mut mid = Vec::with_capacity(needed_rows.len() * col_taps.len() * 3);
        for y in needed_rows.clone() {
            for taps in &col_taps {
                mid.extend_from_slice(&convolve(data, (y * in_w + taps.first) * 3, 3, &taps.weights));
            }
        }
        (mid, col_taps.len(), needed_rows.start)
    } else {
        // Columns of the window, every input row.
        let mut mid = Vec::with_capacity(in_h * cols.len() * 3);
        for row in src.as_raw().chunks_exact(in_w * 3) {
            mid.extend_from_slice(&row[cols.start * 3..cols.end * 3]);
        }
        (mid, cols.len(), 0)
    };

    let mut out = Vec::with_capacity(rows.len() * mid_w * 3);
    if out_h != in_h {
        for taps in precompute_taps(in_h, out_h, rows) {
            let first_row = taps.first - mid_first_row;
            for x in 0..mid_w {
                out.extend_from_slice(&convolve(&mid, (first_row * mid_w + x) * 3, mid_w * 3, &taps.weights));
            }
        }
    } else {
        let start = (rows.start - mid_first_row) * mid_w * 3;
        out.extend_from_slice(&mid[start..start + rows.len() * mid_w * 3]);
    }
    RgbImage::from_raw(window.width, window.height, out).expect("buffer length matches the window")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_size_is_a_copy() {
        let src = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 60, 7]));
        assert_eq!(resize_bicubic(&src, 5, 4), src);
    }

    #[test]
    fn window_equals_crop_of_full_resize() {
        let src =
            RgbImage::from_fn(13, 7, |x, y| image::Rgb([(x * 19 + y * 7) as u8, (x * y * 5) as u8, (x ^ y) as u8 * 9]));
        let full = resize_bicubic(&src, 29, 11);
        let window = Window { left: 3, top: 2, width: 20, height: 6 };
        let part = resize_bicubic_window(&src, 29, 11, window);
        let expected = image::imageops::crop_imm(&full, 3, 2, 20, 6).to_image();
        assert_eq!(part, expected);
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for taps in precompute_taps(1000, 336, 0..336) {
            let sum: i32 = taps.weights.iter().sum();
            assert!((sum - (1 << PRECISION_BITS)).abs() <= taps.weights.len() as i32, "sum {sum}");
        }
    }
}
