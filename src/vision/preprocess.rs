//! Image preprocessing as the release does it: `mm_utils.process_images` (optional pad to a square) followed by
//! transformers 4.37.2 `CLIPImageProcessor.preprocess` (shortest-edge bicubic resize through Pillow, center
//! crop, rescale, normalize, CHW), bit for bit.

use std::path::{Path, PathBuf};

use image::RgbImage;
use serde_json::Value;
use tch::Tensor;

pub use super::decode::{decode_rgb, load_rgb, PixelLimit, DEFAULT_MAX_PIXELS};
use super::resample::{resize_bicubic_window, Window};
use crate::{Error, Result};

pub use crate::config::AspectMode;

/// What `size` asks of the resize step (`CLIPImageProcessor.resize`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeTarget {
    /// Shortest edge to this length, long edge `int(len * long / short)`.
    ShortestEdge(u32),
    /// Exactly this size, aspect ratio ignored.
    Exact { height: u32, width: u32 },
}

/// Pillow's `Image.BICUBIC`, the only `resample` value implemented.
pub const RESAMPLE_BICUBIC: u64 = 3;

/// The settings of a `preprocessor_config.json` that `CLIPImageProcessor` uses.
#[derive(Clone, Debug, PartialEq)]
pub struct PreprocessConfig {
    pub do_resize: bool,
    pub size: ResizeTarget,
    pub do_center_crop: bool,
    pub crop_height: u32,
    pub crop_width: u32,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    /// Kept in double precision: the pad color is `int(255 * mean)` computed in Python floats.
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
}

/// OpenAI CLIP's normalization constants (transformers' `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

impl Default for PreprocessConfig {
    /// The vision tower's settings: CLIP ViT-L/14-336 (`openai/clip-vit-large-patch14-336`).
    fn default() -> Self {
        Self {
            do_resize: true,
            size: ResizeTarget::ShortestEdge(336),
            do_center_crop: true,
            crop_height: 336,
            crop_width: 336,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
        }
    }
}

impl PreprocessConfig {
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let json: Value = crate::config::read_json(path)?;
        Self::from_json(&json, path)
    }

    /// The `preprocessor_config.json` that `CLIPImageProcessor.save_pretrained` writes for these
    /// settings (bicubic resampling, RGB conversion).
    pub fn to_json(&self) -> Value {
        let size = match self.size {
            ResizeTarget::ShortestEdge(edge) => serde_json::json!({ "shortest_edge": edge }),
            ResizeTarget::Exact { height, width } => serde_json::json!({ "height": height, "width": width }),
        };
        serde_json::json!({
            "crop_size": { "height": self.crop_height, "width": self.crop_width },
            "do_center_crop": self.do_center_crop,
            "do_convert_rgb": true,
            "do_normalize": self.do_normalize,
            "do_rescale": self.do_rescale,
            "do_resize": self.do_resize,
            "image_mean": self.image_mean,
            "image_processor_type": "CLIPImageProcessor",
            "image_std": self.image_std,
            "resample": RESAMPLE_BICUBIC,
            "rescale_factor": self.rescale_factor,
            "size": size,
        })
    }

    /// Reads the fields as `CLIPImageProcessor.__init__` does; a missing field takes the class default
    /// (note: size and crop 224, as transformers would use), `path` only names the file in errors.
    pub fn from_json(json: &Value, path: &Path) -> Result<Self> {
        let field_error = |field: &str, message: String| Error::Config {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };
        let flag = |field: &str| -> Result<bool> {
            match json.get(field) {
                None | Some(Value::Null) => Ok(true),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(field_error(field, format!("expected true or false, found {other}"))),
            }
        };
        let triple = |field: &str, default: [f64; 3]| -> Result<[f64; 3]> {
            match json.get(field) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Array(items)) if items.len() == 3 => {
                    let mut out = [0.0; 3];
                    for (slot, item) in out.iter_mut().zip(items) {
                        *slot = item.as_f64().ok_or_else(|| field_error(field, format!("{item} is not a number")))?;
                    }
                    Ok(out)
                }
                Some(other) => Err(field_error(field, format!("expected three numbers, found {other}"))),
            }
        };
        let size = match json.get("size") {
            None | Some(Value::Null) => ResizeTarget::ShortestEdge(224),
            Some(value) => match parse_size(value, false).map_err(|m| field_error("size", m))? {
                SizeDict::ShortestEdge(edge) => ResizeTarget::ShortestEdge(edge),
                SizeDict::HeightWidth(height, width) => ResizeTarget::Exact { height, width },
            },
        };
        let (crop_height, crop_width) = match json.get("crop_size") {
            None | Some(Value::Null) => (224, 224),
            Some(value) => match parse_size(value, true).map_err(|m| field_error("crop_size", m))? {
                SizeDict::HeightWidth(h, w) => (h, w),
                SizeDict::ShortestEdge(_) => {
                    return Err(field_error("crop_size", "needs height and width".into()));
                }
            },
        };
        match json.get("resample") {
            None | Some(Value::Null) => {}
            Some(value) if value.as_u64() == Some(RESAMPLE_BICUBIC) => {}
            Some(other) => {
                return Err(field_error("resample", format!("only 3 (bicubic) is supported, found {other}")));
            }
        }
        let rescale_factor = match json.get("rescale_factor") {
            None | Some(Value::Null) => 1.0 / 255.0,
            Some(value) => {
                value.as_f64().ok_or_else(|| field_error("rescale_factor", format!("{value} is not a number")))?
            }
        };
        Ok(Self {
            do_resize: flag("do_resize")?,
            size,
            do_center_crop: flag("do_center_crop")?,
            crop_height,
            crop_width,
            do_rescale: flag("do_rescale")?,
            rescale_factor,
            do_normalize: flag("do_normalize")?,
            image_mean: triple("image_mean", CLIP_MEAN)?,
            image_std: triple("image_std", CLIP_STD)?,
        })
    }

    /// The pad color of `expand2square`: `tuple(int(x * 255) for x in image_mean)`.
    pub fn pad_color(&self) -> [u8; 3] {
        self.image_mean.map(|m| (m * 255.0).clamp(0.0, 255.0) as u8)
    }
}

enum SizeDict {
    ShortestEdge(u32),
    HeightWidth(u32, u32),
}

/// transformers' `get_size_dict`: an int is a square (`default_to_square`) or a shortest edge; a list is
/// (height, width); a dict names its keys.
fn parse_size(value: &Value, default_to_square: bool) -> std::result::Result<SizeDict, String> {
    let length = |v: &Value| -> std::result::Result<u32, String> {
        v.as_u64()
            .filter(|&n| n > 0)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("{v} is not a positive integer"))
    };
    match value {
        Value::Number(_) if default_to_square => Ok(SizeDict::HeightWidth(length(value)?, length(value)?)),
        Value::Number(_) => Ok(SizeDict::ShortestEdge(length(value)?)),
        Value::Array(items) if items.len() == 2 => Ok(SizeDict::HeightWidth(length(&items[0])?, length(&items[1])?)),
        Value::Object(map) => {
            // The resize step looks for `shortest_edge` first, then height and width.
            if let Some(edge) = map.get("shortest_edge") {
                Ok(SizeDict::ShortestEdge(length(edge)?))
            } else if let (Some(h), Some(w)) = (map.get("height"), map.get("width")) {
                Ok(SizeDict::HeightWidth(length(h)?, length(w)?))
            } else {
                Err(format!("expected `shortest_edge` or `height` and `width`, found {value}"))
            }
        }
        _ => Err(format!("cannot read a size from {value}")),
    }
}

/// Preprocessed pixels of one image: float32, channels first.
#[derive(Clone, Debug, PartialEq)]
pub struct PixelValues {
    pub height: usize,
    pub width: usize,
    /// `3 * height * width` values, channel-major.
    pub data: Vec<f32>,
}

impl PixelValues {
    /// The values as a `[3, height, width]` float32 tensor.
    pub fn to_tensor(&self) -> Result<Tensor> {
        Ok(Tensor::f_from_slice(&self.data)?.f_view([3, self.height as i64, self.width as i64])?)
    }
}

/// An RGB image with the file it came from, for error messages.
#[derive(Clone, Debug)]
pub struct NamedImage {
    pub path: PathBuf,
    pub rgb: RgbImage,
}

/// `process_images` with a `CLIPImageProcessor`: files in, `pixel_values` out.
#[derive(Clone, Debug)]
pub struct ImagePreprocessor {
    pub config: PreprocessConfig,
    pub aspect: AspectMode,
    /// Images with more pixels than this are refused from their header, before decoding; with `Pad`
    /// the square they are padded to counts.
    pub max_pixels: u64,
}

impl ImagePreprocessor {
    pub fn new(config: PreprocessConfig, aspect: AspectMode) -> Self {
        Self { config, aspect, max_pixels: DEFAULT_MAX_PIXELS }
    }

    /// From the vision tower's `preprocessor_config.json` and the model config's `image_aspect_ratio`.
    pub fn from_files(preprocessor_config: &Path, aspect: AspectMode) -> Result<Self> {
        Ok(Self::new(PreprocessConfig::from_json_file(preprocessor_config)?, aspect))
    }

    pub fn with_max_pixels(mut self, max_pixels: u64) -> Self {
        self.max_pixels = max_pixels;
        self
    }

    /// What an image may take before it is decoded: its pixels, and its padded square with `Pad`.
    pub fn pixel_limit(&self) -> PixelLimit {
        match self.aspect {
            AspectMode::Pad => PixelLimit::padded(self.max_pixels),
            AspectMode::Plain => PixelLimit::decoded(self.max_pixels),
        }
    }

    /// Decode a file to RGB (`Image.open(path).convert("RGB")`).
    pub fn load(&self, path: &Path) -> Result<NamedImage> {
        Ok(NamedImage { path: path.to_path_buf(), rgb: load_rgb(path, self.pixel_limit())? })
    }

    /// An encoded image held in memory as a `[3, crop_h, crop_w]` float32 tensor; `name` labels errors.
    pub fn encoded_image_tensor(&self, bytes: &[u8], name: &str) -> Result<Tensor> {
        let path = PathBuf::from(name);
        let rgb = decode_rgb(bytes, &path, self.pixel_limit())?;
        let values = self.pixel_values(&[NamedImage { path, rgb }])?;
        let first = values.first().ok_or_else(|| Error::InvalidInput(format!("{name}: no pixels")))?;
        first.to_tensor()
    }

    /// One image file as a `[3, crop_h, crop_w]` float32 tensor.
    pub fn image_tensor(&self, path: &Path) -> Result<Tensor> {
        self.batch_tensor(&[path])?.f_squeeze_dim(0).map_err(Error::from)
    }

    /// Image files as a `[n, 3, crop_h, crop_w]` float32 tensor (all outputs must have one size).
    pub fn batch_tensor<P: AsRef<Path>>(&self, paths: &[P]) -> Result<Tensor> {
        let images = paths.iter().map(|p| self.load(p.as_ref())).collect::<Result<Vec<_>>>()?;
        let values = self.pixel_values(&images)?;
        if let Some(first) = values.first() {
            if let Some((i, other)) =
                values.iter().enumerate().find(|(_, v)| (v.height, v.width) != (first.height, first.width))
            {
                return Err(Error::InvalidInput(format!(
                    "cannot batch {} ({}x{}) with {} ({}x{}): preprocessed sizes differ",
                    images[0].path.display(),
                    first.width,
                    first.height,
                    images[i].path.display(),
                    other.width,
                    other.height
                )));
            }
        }
        let tensors = values.iter().map(PixelValues::to_tensor).collect::<Result<Vec<_>>>()?;
        if tensors.is_empty() {
            return Err(Error::InvalidInput("no images to preprocess".into()));
        }
        Ok(Tensor::f_stack(&tensors, 0)?)
    }

    /// `process_images` on decoded images. With `Pad` each image is processed on its own; otherwise the batch
    /// goes through the processor in one call, which reads the axis layout of every image from the first one.
    pub fn pixel_values(&self, images: &[NamedImage]) -> Result<Vec<PixelValues>> {
        match self.aspect {
            AspectMode::Pad => images
                .iter()
                .map(|image| {
                    // Images decoded elsewhere are checked too, before the square is allocated.
                    let (width, height) = image.rgb.dimensions();
                    self.pixel_limit()
                        .check(width, height)
                        .map_err(|message| Error::Image { path: image.path.clone(), message })?;
                    let square = expand_to_square(&image.rgb, self.config.pad_color());
                    let reading = AxisReading::infer(&square);
                    self.process(&square, reading, &image.path)
                })
                .collect(),
            AspectMode::Plain => {
                let reading = images.first().map_or(AxisReading::ChannelsLast, |first| AxisReading::infer(&first.rgb));
                images.iter().map(|image| self.process(&image.rgb, reading, &image.path)).collect()
            }
        }
    }

    /// `CLIPImageProcessor.preprocess` on one RGB image.
    fn process(&self, rgb: &RgbImage, reading: AxisReading, path: &Path) -> Result<PixelValues> {
        let permuted;
        let image = match reading {
            AxisReading::ChannelsLast => rgb,
            AxisReading::ChannelsFirst => {
                permuted = read_as_channels_first(rgb, path)?;
                &permuted
            }
        };
        let cfg = &self.config;
        let (in_h, in_w) = (image.height(), image.width());
        if in_h == 0 || in_w == 0 {
            return Err(Error::Image {
                path: path.to_path_buf(),
                message: format!("image has zero size ({in_w}x{in_h})"),
            });
        }
        let (resized_h, resized_w) = match (cfg.do_resize, cfg.size) {
            (false, _) => (in_h, in_w),
            (true, ResizeTarget::Exact { height, width }) => (height, width),
            (true, ResizeTarget::ShortestEdge(edge)) => {
                shortest_edge_size(in_h, in_w, edge).ok_or_else(|| Error::Image {
                    path: path.to_path_buf(),
                    message: format!("{in_w}x{in_h} resized to a shortest edge of {edge} exceeds Pillow's size limit"),
                })?
            }
        };
        let (rows, cols) = if cfg.do_center_crop {
            (center_crop_axis(resized_h, cfg.crop_height), center_crop_axis(resized_w, cfg.crop_width))
        } else {
            (CropAxis::whole(resized_h), CropAxis::whole(resized_w))
        };
        let window = Window {
            left: cols.kept.start,
            top: rows.kept.start,
            width: cols.kept.len() as u32,
            height: rows.kept.len() as u32,
        };
        let kept = if window.width == 0 || window.height == 0 {
            RgbImage::new(window.width, window.height)
        } else if cfg.do_resize {
            resize_bicubic_window(image, resized_w, resized_h, window)
        } else {
            image::imageops::crop_imm(image, window.left, window.top, window.width, window.height).to_image()
        };
        Ok(self.rescale_normalize(&kept, &rows, &cols))
    }

    /// Place the kept pixels in the (zero-padded) crop, then rescale and normalize into CHW float32.
    fn rescale_normalize(&self, kept: &RgbImage, rows: &CropAxis, cols: &CropAxis) -> PixelValues {
        let cfg = &self.config;
        let (height, width) = (rows.output_len as usize, cols.output_len as usize);
        let mean = cfg.image_mean.map(|m| m as f32);
        let std = cfg.image_std.map(|s| s as f32);
        let to_f32 = |v: u8, c: usize| {
            // transformers multiplies the uint8 array by a Python float (float64) and casts to float32.
            let mut x = if cfg.do_rescale { (f64::from(v) * cfg.rescale_factor) as f32 } else { f32::from(v) };
            if cfg.do_normalize {
                x = (x - mean[c]) / std[c];
            }
            x
        };
        let mut data = Vec::with_capacity(3 * height * width);
        for c in 0..3 {
            for y in 0..height {
                for x in 0..width {
                    // Output index -> kept-image index, or the zero padding of `center_crop`.
                    let ky = (y as u32).checked_sub(rows.kept_offset).filter(|&v| v < kept.height());
                    let kx = (x as u32).checked_sub(cols.kept_offset).filter(|&v| v < kept.width());
                    let v = match (ky, kx) {
                        (Some(ky), Some(kx)) => kept.get_pixel(kx, ky).0[c],
                        _ => 0,
                    };
                    data.push(to_f32(v, c));
                }
            }
        }
        PixelValues { height, width, data }
    }
}

/// `expand2square`: paste onto a square of side max(w, h) filled with `fill`, centered on the short axis.
pub fn expand_to_square(image: &RgbImage, fill: [u8; 3]) -> RgbImage {
    let (w, h) = image.dimensions();
    if w == h {
        return image.clone();
    }
    let side = w.max(h);
    let mut square = RgbImage::from_pixel(side, side, image::Rgb(fill));
    let (x, y) = if w > h { (0, (w - h) / 2) } else { ((h - w) / 2, 0) };
    image::imageops::replace(&mut square, image, i64::from(x), i64::from(y));
    square
}

/// transformers' `get_resize_output_image_size` with `default_to_square=False`: (height, width); `None` when
/// the long edge would pass Pillow's limit of `i32::MAX`.
pub fn shortest_edge_size(height: u32, width: u32, edge: u32) -> Option<(u32, u32)> {
    let (short, long) = if width <= height { (width, height) } else { (height, width) };
    // Python: int(edge * long / short), true division in double precision, truncated.
    let new_long = f64::from(edge) * f64::from(long) / f64::from(short);
    if new_long.is_nan() || new_long > f64::from(i32::MAX) {
        return None;
    }
    let new_long = new_long as u32;
    Some(if width <= height { (new_long, edge) } else { (edge, new_long) })
}

/// How transformers 4.37.2 reads an H x W x 3 array: `infer_channel_dimension_format` takes a first axis of
/// length 1 or 3 for the channels, so images 1 or 3 pixels high are read channels-first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AxisReading {
    ChannelsLast,
    ChannelsFirst,
}

impl AxisReading {
    fn infer(image: &RgbImage) -> Self {
        if matches!(image.height(), 1 | 3) {
            Self::ChannelsFirst
        } else {
            Self::ChannelsLast
        }
    }
}

/// The image the processor sees when it reads an H x W x 3 array as channels-first: 3 rows become the channels,
/// columns become rows and channels become 3 columns. Any other height fails in the release (1 row gives a
/// 1-channel image that `normalize` rejects), so it is refused here.
fn read_as_channels_first(image: &RgbImage, path: &Path) -> Result<RgbImage> {
    if image.height() != 3 {
        return Err(Error::Image {
            path: path.to_path_buf(),
            message: format!(
                "the release cannot preprocess this image: transformers 4.37.2 reads a {}x{} image as channels-first \
                 ({} channel(s)) and fails",
                image.width(),
                image.height(),
                image.height()
            ),
        });
    }
    Ok(RgbImage::from_fn(3, image.width(), |x, y| {
        image::Rgb([0, 1, 2].map(|row| image.get_pixel(y, row).0[x as usize]))
    }))
}

/// One axis of `center_crop`: which resized indices are kept and where they land in the output.
/// Output index `o` shows resized index `kept.start + o - kept_offset` when that lies in `kept`, else 0.
struct CropAxis {
    kept: std::ops::Range<u32>,
    kept_offset: u32,
    output_len: u32,
}

impl CropAxis {
    fn whole(len: u32) -> Self {
        Self { kept: 0..len, kept_offset: 0, output_len: len }
    }
}

/// transformers' `center_crop` along one axis: `start = (size - crop) // 2`; when the image is smaller than the
/// crop it is zero-padded to `max(size, crop)` at `(padded - size) // 2` and the slice clamped to the padded
/// canvas (which loses a row or column when the difference is odd, as upstream does).
fn center_crop_axis(size: u32, crop: u32) -> CropAxis {
    let (size, crop) = (i64::from(size), i64::from(crop));
    let padded = size.max(crop);
    let pad = (padded - size).div_euclid(2);
    let start = (size - crop).div_euclid(2) + pad;
    let (first, end) = (start.max(0), (start + crop).min(padded));
    // Canvas indices first..end; the image occupies pad..pad + size.
    let kept = (first.max(pad) - pad)..(end.min(pad + size) - pad).max(first.max(pad) - pad);
    CropAxis {
        kept: kept.start as u32..kept.end as u32,
        kept_offset: (pad - first).max(0) as u32,
        output_len: (end - first).max(0) as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_inside_the_image() {
        let axis = center_crop_axis(500, 336);
        assert_eq!((axis.kept, axis.kept_offset, axis.output_len), (82..418, 0, 336));
    }

    #[test]
    fn crop_larger_than_the_image_pads_and_loses_one_on_odd_difference() {
        let even = center_crop_axis(334, 336);
        assert_eq!((even.kept, even.kept_offset, even.output_len), (0..334, 1, 336));
        let odd = center_crop_axis(335, 336);
        assert_eq!((odd.kept, odd.kept_offset, odd.output_len), (0..335, 0, 335));
    }
}
