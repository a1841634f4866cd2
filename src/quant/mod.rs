//! How linear weights are kept in memory (`--load-8bit`, `--load-4bit`, fp16 weights on CPU), chosen at
//! load and applied to each projection as soon as it is read, so that the fp32 decoder never exists
//! whole in memory.
//!
//! - int8 on CPU: fbgemm's dynamic int8 GEMM (`fbgemm_linear_int8_weight_fp32_activation`, the kernel of
//!   `torch.quantization.quantize_dynamic`). Weights are symmetric int8 with one scale per output row,
//!   folded out of the matrix before packing and multiplied back into the output columns. The kernel
//!   quantizes its activations to uint8 with one range per call; each row is first divided by its own
//!   largest magnitude and an anchor row pins that range to `[-1, 1]`, so a row's result never depends
//!   on the other rows of the call (the answers of a batch equal their solo answers).
//! - fp16 on CPU: fbgemm's fp16-weight GEMM with fp32 activations and accumulation
//!   (`fbgemm_linear_fp16_weight_fp32_activation`).
//! - int4: see [`crate::quant::int4`] (packed codes read directly when decoding on the CPU).
//! - int8 on other devices: integers with per-row scales, expanded to the compute dtype on each forward.
//!
//! None of these is bitsandbytes' LLM.int8() / NF4: results are close to, not equal to, the release's.
//! MM-LoRA branches, norms and embeddings stay in the compute dtype; the vision side's linear weights
//! can be kept in fp16 and expanded per forward ([`LinearStorage::Fp16`]).
use crate::error::{Error, Result};
use crate::layers::Linear;
use crate::weights::Weights;
use int4::Int4Matrix;
use tch::{Device, Kind, Tensor};

mod dense_rows;
mod fbgemm;
pub mod int4;
pub mod prequantized;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    Int8,
    Int4,
    /// fp16 weights with fp32 compute (CPU).
    Fp16,
}

/// What is done to the weights as they are loaded; not stored in the checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WeightForms {
    /// How the decoder's projections and lm_head are stored.
    pub storage: Option<Quantization>,
    /// Fold the language LoRA branch into the base weight (`W + s * L_B L_A`, as `arcana-convert
    /// --merge-lora` does) before it is stored, so language positions do no LoRA work.
    pub merge_lora: bool,
    /// How the vision side's linear layers (CLIP and the Query Ladder) are stored.
    pub vision: LinearStorage,
    /// The checkpoint already holds the projections and lm_head in `storage`'s form (a pre-quantized
    /// folder, see [`prequantized`]): they are read as stored, nothing is converted.
    pub prequantized: bool,
}

impl Quantization {
    /// lm_head's form beside projections in this mode: int8 where the projections take int4, since
    /// lm_head has no MM-LoRA branch and every logit goes through it.
    pub fn for_lm_head(self) -> Self {
        match self {
            Self::Int4 => Self::Int8,
            mode => mode,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Int8 => "int8",
            Self::Int4 => "int4",
            Self::Fp16 => "fp16",
        }
    }
}

/// How a block's linear layers are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinearStorage {
    /// In the compute dtype, as the checkpoint gives them.
    #[default]
    Dense,
    /// fp32 weights on the CPU kept in fp16 and expanded to fp32 for each forward: half the memory,
    /// results close to, not equal to, fp32's. For layers that run on many rows at once (an image's
    /// patches, once per image), where the expansion costs little beside the GEMM; packing for fbgemm's
    /// fp16 GEMM would cost more at load than it saves. Weights of another dtype or device stay dense.
    Fp16,
    /// fp32 weights on the CPU kept as int8 codes with one scale per output row, made from the weight's
    /// fp16 values (what a pre-quantized folder stores, so that a folder and a checkpoint give the same
    /// codes), and expanded to fp32 for each forward: a quarter of fp32's memory. For weights that only
    /// run on many rows at once and add a small correction (the MM-LoRA branches of image positions).
    Int8,
}

impl LinearStorage {
    /// Whether a weight computing in `kind` on `device` takes this storage: the compact ones are for
    /// fp32 on the CPU.
    fn applies_to(self, kind: Kind, device: Device) -> bool {
        self != Self::Dense && kind == Kind::Float && device == Device::Cpu
    }

    /// `weight` (any float dtype, `[out, in]`) in this storage, `Dense` meaning as it is.
    fn keep(self, weight: Tensor, bias: Option<Tensor>) -> Result<BaseWeight> {
        Ok(match self {
            Self::Dense => BaseWeight::Dense(Linear { weight, bias }),
            Self::Fp16 => BaseWeight::Fp16Stored { weight: weight.f_to_kind(Kind::Half)?, bias },
            Self::Int8 => {
                let values = weight.f_to_kind(Kind::Half)?.f_to_kind(Kind::Float)?;
                let (q, scale) = int8_rows(&values, 127.0)?;
                BaseWeight::Int8 { q, scale, bias, kind: Kind::Float }
            }
        })
    }
}

/// A linear layer's weight, dense or in a compact form.
#[derive(Debug)]
pub enum BaseWeight {
    Dense(Linear),
    Int8Packed(Int8Packed),
    Fp16Packed(Fp16Packed),
    Int8 {
        q: Tensor,
        scale: Tensor,
        bias: Option<Tensor>,
        kind: Kind,
    },
    Int4(Int4Matrix),
    /// fp16 values of an fp32 weight, expanded to fp32 for each forward: MKL's fp32 GEMM on many rows
    /// (an image's patches), half the memory.
    Fp16Stored {
        weight: Tensor,
        bias: Option<Tensor>,
    },
}

/// An int8 matrix packed inside fbgemm, with its per-row scales.
#[derive(Debug)]
pub struct Int8Packed {
    /// fbgemm's opaque handle; its bytes live inside fbgemm.
    packed: Tensor,
    /// Row sums of the int8 matrix (int32), which the kernel needs for the activations' zero point.
    col_offsets: Tensor,
    /// `[out]`: each row's scale, multiplied into the output columns.
    row_scale: Tensor,
    /// The kernel reads its weight argument for the sizes only: a zero-stride `[out, in]` stand-in.
    shape: Tensor,
    /// The kernel requires a bias; zeros, because the real one is added after the scales.
    zero_bias: Tensor,
    /// `[1, in]`: -1, then 1, then zeros; appended to every call's rows (see [`Int8Packed::forward`]).
    anchor: Tensor,
    bias: Option<Tensor>,
    bytes: usize,
}

impl Int8Packed {
    /// `x [.., in]` through the int8 GEMM, every row quantized on the same fixed grid.
    ///
    /// fbgemm's dynamic kernel quantizes all of its input with one range, `[min, max]` of the whole call,
    /// so in a batch each row's codes would depend on its neighbours. Here each row is divided by its own
    /// largest magnitude (its values fall in `[-1, 1]`, one of them at -1 or 1), and the anchor row
    /// holds both -1 and 1: the range is `[-1, 1]` in every call, whatever the rows. The integer products
    /// are exact, so a row's output is then the same alone and among others; the row's magnitude is
    /// multiplied back into its output, with the weight's row scales.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let in_dim = self.anchor.size()[1];
        let rows = x.f_reshape([-1, in_dim])?;
        let n = rows.size()[0];
        // The largest magnitude from the two extremes (no |x| temporary); the unit rows written into
        // their place beside the anchor, and the output scaled in place: the same values as the
        // out-of-place operations, with one [rows, in] and one [rows, out] tensor instead of three each.
        let dim = &[1i64][..];
        let magnitude = rows.f_amax(dim, true)?.f_maximum(&rows.f_amin(dim, true)?.f_neg()?)?;
        let magnitude = magnitude.f_clamp_min(f64::from(f32::MIN_POSITIVE))?;
        let unit_rows = Tensor::f_empty([n + 1, in_dim], (Kind::Float, Device::Cpu))?;
        unit_rows.f_narrow(0, 0, n)?.f_copy_(&rows)?;
        let _ = unit_rows.f_narrow(0, 0, n)?.f_div_(&magnitude)?;
        unit_rows.f_narrow(0, n, 1)?.f_copy_(&self.anchor)?;
        let y = fbgemm::linear_int8(&unit_rows, &self.shape, &self.packed, &self.col_offsets, 1.0, 0, &self.zero_bias)?;
        drop(unit_rows);
        let mut y = y.f_narrow(0, 0, n)?;
        let _ = y.f_mul_(&magnitude)?;
        let _ = y.f_mul_(&self.row_scale)?;
        if let Some(bias) = &self.bias {
            let _ = y.f_add_(bias)?;
        }
        let mut shape = x.size();
        if let Some(last) = shape.last_mut() {
            *last = self.row_scale.size()[0];
        }
        Ok(y.f_reshape(shape.as_slice())?)
    }
}

/// An fp16 matrix packed inside fbgemm.
#[derive(Debug)]
pub struct Fp16Packed {
    packed: Tensor,
    /// The layer's bias, or zeros (the kernel requires one).
    bias: Tensor,
    shape: [i64; 2],
    bytes: usize,
}

/// The contiguous CPU data of `t`, checked for dtype and length.
pub(crate) fn tensor_slice<T: tch::kind::Element>(t: &Tensor, len: usize) -> Result<&[T]> {
    check_cpu_data(t, T::KIND, len)?;
    // SAFETY: a contiguous CPU tensor of `len` elements of `T`, alive as long as the borrow of `t`.
    Ok(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, len) })
}

/// The contiguous CPU data of fp16 `t` as the values' bit patterns, checked for length.
pub(crate) fn half_bits(t: &Tensor, len: usize) -> Result<&[u16]> {
    check_cpu_data(t, Kind::Half, len)?;
    // SAFETY: a contiguous CPU tensor of `len` two-byte values, alive as long as the borrow of `t`.
    Ok(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u16, len) })
}

fn check_cpu_data(t: &Tensor, kind: Kind, len: usize) -> Result<()> {
    if t.kind() != kind || t.device() != Device::Cpu || !t.is_contiguous() || t.numel() != len {
        return Err(Error::InvalidInput(format!(
            "expected a contiguous CPU {kind:?} tensor of {len} values, got {:?} {:?} {:?}",
            t.kind(),
            t.device(),
            t.size()
        )));
    }
    Ok(())
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

impl BaseWeight {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(linear) if dense_rows::applies(x, &linear.weight) => {
                dense_rows::linear(x, &linear.weight, linear.bias.as_ref())
            }
            Self::Dense(linear) => linear.forward(x),
            Self::Int8Packed(w) => w.forward(x),
            Self::Fp16Packed(w) => Ok(fbgemm::linear_fp16(x, &w.packed, &w.bias)?),
            Self::Int8 { q, scale, bias, kind } => {
                let weight = q.f_to_kind(*kind)?.f_mul(scale)?;
                Ok(x.f_linear(&weight, bias.as_ref())?)
            }
            Self::Int4(m) => m.forward(x),
            Self::Fp16Stored { weight, bias } => Ok(x.f_linear(&weight.f_to_kind(Kind::Float)?, bias.as_ref())?),
        }
    }

    /// Bytes held by the weight (and its scales).
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(l) => tensor_bytes(&l.weight),
            Self::Int8Packed(w) => w.bytes,
            Self::Fp16Packed(w) => w.bytes,
            Self::Int8 { q, scale, .. } => tensor_bytes(q) + tensor_bytes(scale),
            Self::Int4(m) => m.bytes(),
            Self::Fp16Stored { weight, .. } => tensor_bytes(weight),
        }
    }

    /// How the weight is kept, for messages: its dtype when dense, else its compact form.
    pub fn form(&self) -> String {
        match self {
            Self::Dense(l) => format!("{:?}", l.weight.kind()),
            Self::Int8Packed(_) | Self::Int8 { .. } => "int8".into(),
            Self::Int4(_) => "int4".into(),
            Self::Fp16Packed(_) | Self::Fp16Stored { .. } => "fp16".into(),
        }
    }

    /// `[out, in]`.
    pub fn shape(&self) -> [i64; 2] {
        let two = |t: &Tensor| {
            let s = t.size();
            [s[0], s[1]]
        };
        match self {
            Self::Dense(l) => two(&l.weight),
            Self::Int8Packed(w) => two(&w.shape),
            Self::Fp16Packed(w) => w.shape,
            Self::Int8 { q, .. } => two(q),
            Self::Int4(m) => m.shape(),
            Self::Fp16Stored { weight, .. } => two(weight),
        }
    }

    /// `nn.Linear` `in_dim -> out_dim` (with its bias when `bias`) under `w`, stored as `storage` says.
    /// An fp32 weight kept in fp16 is read in place when the file stores it in fp16 (a pre-quantized
    /// folder), else converted from a copy whose file pages are dropped at once.
    pub fn load(w: &Weights, in_dim: i64, out_dim: i64, bias: bool, storage: LinearStorage) -> Result<Self> {
        if !storage.applies_to(w.kind(), w.device()) {
            return Ok(Self::Dense(Linear::load(w, in_dim, out_dim, bias)?));
        }
        let bias = if bias { Some(w.get("bias", &[out_dim])?) } else { None };
        let weight = match storage {
            // Its codes are made now from a copy; the fp16 values are not kept.
            LinearStorage::Int8 => w.get_transient_as("weight", &[out_dim, in_dim], Kind::Half)?,
            _ => w.get_as("weight", &[out_dim, in_dim], Kind::Half)?,
        };
        storage.keep(weight, bias)
    }

    /// A dense weight kept as `storage` says: rounded to fp16 once where [`BaseWeight::load`] would read
    /// it in fp16, so that both give the same values from the same fp32 weight.
    pub fn stored(linear: Linear, storage: LinearStorage) -> Result<Self> {
        if !storage.applies_to(linear.weight.kind(), linear.weight.device()) {
            return Ok(Self::Dense(linear));
        }
        storage.keep(linear.weight, linear.bias)
    }

    /// The dense weight, when it is kept dense.
    pub fn dense(&self) -> Option<&Linear> {
        match self {
            Self::Dense(linear) => Some(linear),
            _ => None,
        }
    }

    /// Stores a dense weight as `mode`; fbgemm's kernels where the weight is fp32 on the CPU.
    pub fn quantized(linear: Linear, mode: Quantization) -> Result<Self> {
        let (kind, device) = (linear.weight.kind(), linear.weight.device());
        let parts = CompactParts::of(&linear.weight, mode, int8_max_code_for(kind, device))?;
        Self::from_parts(parts, linear.bias, kind, device)
    }

    /// The weight `in_dim -> out_dim` under `w` as a pre-quantized folder stores it in `mode` (the parts
    /// named by [`CompactParts::names`] beside the bias), for compute in `w`'s dtype and device.
    pub fn load_compact(w: &Weights, mode: Quantization, in_dim: i64, out_dim: i64, bias: bool) -> Result<Self> {
        let parts = CompactParts::load(w, mode, in_dim, out_dim)?;
        let bias = if bias { Some(w.get("bias", &[out_dim])?) } else { None };
        Self::from_parts(parts, bias, w.kind(), w.device())
    }

    /// The weight that `parts` describe, computing in `kind` on `device`.
    fn from_parts(parts: CompactParts, bias: Option<Tensor>, kind: Kind, device: Device) -> Result<Self> {
        let on_cpu_fp32 = device == Device::Cpu && kind == Kind::Float;
        let on_device =
            |t: Tensor| -> Result<Tensor> { Ok(if t.device() == device { t } else { t.f_to_device(device)? }) };
        Ok(match parts {
            CompactParts::Int8 { codes, scale } if on_cpu_fp32 => Self::Int8Packed(pack_int8(&codes, &scale, bias)?),
            CompactParts::Int8 { codes, scale } => {
                Self::Int8 { q: on_device(codes)?, scale: on_device(scale.f_to_kind(kind)?)?, bias, kind }
            }
            CompactParts::Fp16 { values } if on_cpu_fp32 => {
                let (out_dim, in_dim) = values.size2()?;
                let bias = match bias {
                    Some(b) => b,
                    None => Tensor::f_zeros([out_dim], (Kind::Float, Device::Cpu))?,
                };
                let packed = fbgemm::pack_fp16(&values.f_to_kind(Kind::Float)?)?;
                let bytes = values.numel() * 2 + tensor_bytes(&bias);
                Self::Fp16Packed(Fp16Packed { packed, bias, shape: [out_dim, in_dim], bytes })
            }
            CompactParts::Fp16 { .. } => {
                return Err(Error::InvalidInput(format!(
                    "fp16 weights with fp32 compute are a CPU mode (fbgemm); this weight is for {kind:?} on \
                     {device:?}: load it with the fp16 dtype instead"
                )))
            }
            CompactParts::Int4 { codes, scale, low } => {
                let (codes, scale, low) = (on_device(codes)?, on_device(scale)?, on_device(low)?);
                Self::Int4(Int4Matrix::from_parts(codes, scale, low, bias, kind)?)
            }
        })
    }
}

/// What a compact weight is made of: exactly the tensors a pre-quantized folder stores, so that a
/// folder's weight and one quantized at load are built by the same code from the same values.
#[derive(Debug)]
pub enum CompactParts {
    /// `codes` int8 `[out, in]`, `scale` fp32 `[out, 1]`: `w = codes * scale`.
    Int8 { codes: Tensor, scale: Tensor },
    /// See [`Int4Matrix`]: `codes` u8 `[out, in / 2]`, `scale` and `low` fp32 `[out, in / group]`.
    Int4 { codes: Tensor, scale: Tensor, low: Tensor },
    /// `values` fp16 `[out, in]`.
    Fp16 { values: Tensor },
}

impl CompactParts {
    /// The parts of `weight` (`[out, in]`, any float dtype) in `mode`, computed in fp32; int8 codes reach
    /// at most `int8_max_code`.
    pub fn of(weight: &Tensor, mode: Quantization, int8_max_code: f64) -> Result<Self> {
        let w = weight.f_to_kind(Kind::Float)?;
        Ok(match mode {
            Quantization::Int8 => {
                let (codes, scale) = int8_rows(&w, int8_max_code)?;
                Self::Int8 { codes, scale }
            }
            Quantization::Int4 => {
                let (codes, scale, low) = int4::quantize_parts(&w)?;
                Self::Int4 { codes, scale, low }
            }
            Quantization::Fp16 => Self::Fp16 { values: w.f_to_kind(Kind::Half)?.f_contiguous()? },
        })
    }

    /// The parts' names (in place of `weight`), dtypes and shapes for an `[out, in]` weight in `mode`.
    pub fn names(mode: Quantization, in_dim: i64, out_dim: i64) -> Result<Vec<(&'static str, Kind, Vec<i64>)>> {
        Ok(match mode {
            Quantization::Int8 => {
                vec![(INT8_CODES, Kind::Int8, vec![out_dim, in_dim]), (INT8_SCALE, Kind::Float, vec![out_dim, 1])]
            }
            Quantization::Int4 => {
                let groups = in_dim / int4::group_for(in_dim)?;
                vec![
                    (INT4_CODES, Kind::Uint8, vec![out_dim, in_dim / 2]),
                    (INT4_LOW, Kind::Half, vec![out_dim, groups]),
                    (INT4_SCALE, Kind::Half, vec![out_dim, groups]),
                ]
            }
            Quantization::Fp16 => vec![(FP16_VALUES, Kind::Half, vec![out_dim, in_dim])],
        })
    }

    /// The parts by name, in the order of [`CompactParts::names`].
    pub fn into_named(self) -> Vec<(&'static str, Tensor)> {
        match self {
            Self::Int8 { codes, scale } => vec![(INT8_CODES, codes), (INT8_SCALE, scale)],
            Self::Int4 { codes, scale, low } => vec![(INT4_CODES, codes), (INT4_LOW, low), (INT4_SCALE, scale)],
            Self::Fp16 { values } => vec![(FP16_VALUES, values)],
        }
    }

    /// Reads the parts under `w`. On the CPU they are copies whose file pages are dropped at once: int8
    /// codes and fp16 values are repacked by fbgemm; int4 codes, which each decoding step streams whole,
    /// are kept in memory the kernel cannot lose to page-cache reclaim. Against views of the mapping, on
    /// the benchmark's 4 layers with an image, two alternating runs each: 64.5 / 53.8 ms per token
    /// against 67.3 / 59.9, load 1.59 / 1.45 s against 3.69 / 1.67 s, peak RSS +0.1 GB.
    fn load(w: &Weights, mode: Quantization, in_dim: i64, out_dim: i64) -> Result<Self> {
        let names = Self::names(mode, in_dim, out_dim)?;
        let copied = w.device() == Device::Cpu && w.kind() == Kind::Float;
        let mut parts = names.into_iter().map(|(name, kind, shape)| {
            if copied {
                w.get_transient_as(name, &shape, kind)
            } else {
                w.get_as(name, &shape, kind)
            }
        });
        let mut next = || parts.next().expect("one per name");
        Ok(match mode {
            Quantization::Int8 => Self::Int8 { codes: next()?, scale: next()? },
            Quantization::Int4 => {
                let (codes, low, scale) = (next()?, next()?, next()?);
                Self::Int4 { codes, scale, low }
            }
            Quantization::Fp16 => Self::Fp16 { values: next()? },
        })
    }
}

/// Names of the parts that stand in for a projection's `weight` in a pre-quantized folder.
pub const INT8_CODES: &str = "weight_int8";
pub const INT8_SCALE: &str = "weight_int8_scale";
pub const INT4_CODES: &str = "weight_int4";
pub const INT4_LOW: &str = "weight_int4_low";
pub const INT4_SCALE: &str = "weight_int4_scale";
pub const FP16_VALUES: &str = "weight_fp16";

/// The largest int8 code for weights computing in `kind` on `device`: fbgemm's limit on this CPU for
/// fp32 on the CPU, the full range elsewhere.
pub fn int8_max_code_for(kind: Kind, device: Device) -> f64 {
    if device == Device::Cpu && kind == Kind::Float {
        fbgemm_max_code()
    } else {
        127.0
    }
}

/// Symmetric int8 rows: `q = round(w / s)` with `s = max |w_row| / max_code`; returns `(q, s [out, 1])`.
/// Computed a block of rows at a time, so the float temporaries stay small beside a large matrix
/// (lm_head) that is being converted while the checkpoint streams in.
fn int8_rows(w: &Tensor, max_code: f64) -> Result<(Tensor, Tensor)> {
    const BLOCK: i64 = 512;
    let (rows, cols) = w.size2()?;
    let q = Tensor::f_empty([rows, cols], (Kind::Int8, w.device()))?;
    let scale = Tensor::f_empty([rows, 1], (w.kind(), w.device()))?;
    for start in (0..rows).step_by(BLOCK as usize) {
        let n = BLOCK.min(rows - start);
        let block = w.f_narrow(0, start, n)?;
        let s = block.f_abs()?.f_amax(&[1i64][..], true)?.f_clamp_min(1e-12)?.f_div_scalar(max_code)?;
        let codes = block.f_div(&s)?.f_round()?.f_clamp(-max_code, max_code)?.f_to_kind(Kind::Int8)?;
        q.f_narrow(0, start, n)?.f_copy_(&codes)?;
        scale.f_narrow(0, start, n)?.f_copy_(&s)?;
    }
    Ok((q, scale))
}

/// The largest weight code fbgemm's int8 GEMM can take on this CPU. Without AVX-512 VNNI its kernel
/// multiplies u8 activations by s8 weights with `vpmaddubsw`, which adds two products into a saturating
/// int16: full-range codes (255 * 127 * 2 = 64770) overflow it and the output is wrong. Codes up to 63
/// keep every pair under 32767, as PyTorch's `reduce_range` does on the activation side. Measured on an
/// AVX2-only AMD EPYC with `cargo test --lib every_mode` (16x128 matrix, relative error of the output):
/// 0.124 with codes to 127, 0.020 with codes to 63 (the test's bound is 0.03).
pub fn fbgemm_max_code() -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512vnni") {
        return 127.0;
    }
    63.0
}

/// fbgemm's packing of int8 `codes` `[out, in]` with their row scales `[out, 1]`.
fn pack_int8(codes: &Tensor, scale: &Tensor, bias: Option<Tensor>) -> Result<Int8Packed> {
    let (out_dim, in_dim) = codes.size2()?;
    if in_dim < 2 {
        return Err(Error::InvalidInput(format!("int8 weights need at least 2 input columns, got {in_dim}")));
    }
    // With weight zero point 0 the kernel's column offsets are the plain row sums.
    let col_offsets = codes.f_sum_dim_intlist(&[1i64][..], false, Kind::Int)?;
    let packed = fbgemm::pack_int8(codes)?;
    let row_scale = scale.f_to_kind(Kind::Float)?.f_reshape([out_dim])?;
    let shape = Tensor::f_zeros([1], (Kind::Float, Device::Cpu))?.f_expand([out_dim, in_dim], false)?;
    let zero_bias = Tensor::f_zeros([out_dim], (Kind::Float, Device::Cpu))?;
    let anchor = Tensor::f_zeros([1, in_dim], (Kind::Float, Device::Cpu))?;
    anchor.f_narrow(1, 0, 2)?.f_copy_(&Tensor::f_from_slice(&[-1.0f32, 1.0])?.f_view([1, 2])?)?;
    let bytes = (out_dim * in_dim) as usize
        + tensor_bytes(&col_offsets)
        + tensor_bytes(&row_scale)
        + bias.as_ref().map_or(0, tensor_bytes);
    Ok(Int8Packed { packed, col_offsets, row_scale, shape, zero_bias, anchor, bias, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense(out_dim: i64, in_dim: i64) -> Linear {
        tch::manual_seed(3);
        Linear { weight: Tensor::randn([out_dim, in_dim], (Kind::Float, Device::Cpu)), bias: None }
    }

    fn copy(l: &Linear) -> Linear {
        Linear { weight: l.weight.copy(), bias: l.bias.as_ref().map(Tensor::copy) }
    }

    fn relative_error(mode: Quantization, linear: Linear) -> f64 {
        let x = Tensor::randn([2, 5, linear.weight.size()[1]], (Kind::Float, Device::Cpu));
        let exact = linear.forward(&x).unwrap();
        let approx = BaseWeight::quantized(linear, mode).unwrap().forward(&x).unwrap();
        assert_eq!(approx.size(), exact.size());
        let err = (&approx - &exact).abs().max().double_value(&[]);
        err / exact.abs().max().double_value(&[])
    }

    #[test]
    fn every_mode_stays_close_and_fp16_is_closest() {
        let linear = dense(16, 128);
        let errors: Vec<f64> = [Quantization::Fp16, Quantization::Int8, Quantization::Int4]
            .into_iter()
            .map(|mode| relative_error(mode, copy(&linear)))
            .collect();
        // fp16 rounds weights to 11 bits; int8 also quantizes activations to 8 bits per call.
        assert!(errors[0] < 1e-3, "fp16 relative error {}", errors[0]);
        assert!(errors[1] < 0.03, "int8 relative error {}", errors[1]);
        assert!(errors[2] < 0.2, "int4 relative error {}", errors[2]);
        assert!(errors[0] < errors[1] && errors[1] < errors[2], "{errors:?}");
    }

    #[test]
    fn packed_int8_adds_the_bias_after_the_row_scales() {
        let mut linear = dense(8, 64);
        linear.bias = Some(Tensor::randn([8], (Kind::Float, Device::Cpu)) * 100.0);
        let x = Tensor::zeros([1, 64], (Kind::Float, Device::Cpu));
        let bias = linear.bias.as_ref().unwrap().copy();
        let y = BaseWeight::quantized(linear, Quantization::Int8).unwrap().forward(&x).unwrap();
        assert!(y.view([8]).allclose(&bias, 1e-6, 1e-6, false));
    }

    #[test]
    fn packed_int8_keeps_small_rows_accurate() {
        // Per-row scales: a row 1000x smaller than the others keeps its relative accuracy.
        let linear = dense(4, 64);
        let factors = Tensor::from_slice(&[1.0f32, 1.0, 1.0, 1e-3]).view([4, 1]);
        let scaled = Linear { weight: &linear.weight * &factors, bias: None };
        // Over 16 inputs: one output alone can be near zero by cancellation, which no error bound survives.
        let x = Tensor::randn([16, 64], (Kind::Float, Device::Cpu));
        let exact = scaled.forward(&x).unwrap().select(1, 3);
        let approx =
            BaseWeight::quantized(copy(&scaled), Quantization::Int8).unwrap().forward(&x).unwrap().select(1, 3);
        let rel = (&approx - &exact).norm().double_value(&[]) / exact.norm().double_value(&[]);
        assert!(rel < 0.05, "small row relative error {rel}");
    }

    #[test]
    fn packed_int8_rows_do_not_depend_on_their_neighbours() {
        let mut linear = dense(32, 64);
        linear.bias = Some(Tensor::randn([32], (Kind::Float, Device::Cpu)));
        let weight = BaseWeight::quantized(linear, Quantization::Int8).unwrap();
        // Rows of very different ranges, one of them all zeros: with one range per call the small rows'
        // codes would change with the large ones beside them.
        let factors = Tensor::from_slice(&[1.0f32, 50.0, 1e-3, 0.0, 7.0]).view([5, 1]);
        let x = Tensor::randn([5, 64], (Kind::Float, Device::Cpu)) * factors;
        let together = weight.forward(&x).unwrap();
        for i in 0..5 {
            let alone = weight.forward(&x.narrow(0, i, 1)).unwrap();
            assert!(alone.equal(&together.narrow(0, i, 1)), "row {i} differs alone");
        }
        // Leading dimensions are kept: [1, 5, in] gives the same rows as [5, in].
        let batched = weight.forward(&x.unsqueeze(0)).unwrap();
        assert_eq!(batched.size(), [1, 5, 32]);
        assert!(batched.squeeze_dim(0).equal(&together));
    }

    #[test]
    fn compact_weights_are_smaller() {
        let bytes = |mode| BaseWeight::quantized(dense(16, 128), mode).unwrap().bytes();
        let dense_bytes = 16 * 128 * 4;
        assert!(bytes(Quantization::Fp16) <= dense_bytes / 2 + 16 * 4);
        assert!(bytes(Quantization::Int8) * 3 < dense_bytes);
        assert!(bytes(Quantization::Int4) * 4 < dense_bytes);
    }
}
