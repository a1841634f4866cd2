//! Which positions take the MM-LoRA visual branch: the release's fixed span or the real image positions.
use crate::error::{Error, Result};
use std::ops::Range;
use tch::{Device, Kind, Tensor};

/// The release's fixed visual span `[35, 35 + 576 + 64)` (`SLoRA.forward` with no mask): BOS + the
/// `llava_v1` system prompt + "USER: " is 35 Vicuna tokens, then 640 visual tokens.
pub const RELEASE_VISUAL_START: i64 = 35;
pub const RELEASE_VISUAL_LEN: i64 = 576 + 64;

/// How the MM-LoRA visual mask is chosen on each forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MaskPolicy {
    /// As the release: a multi-token forward marks `[35, 675)` (cut to the sequence length) visual, a
    /// one-token forward is all language, wherever the image really is.
    #[default]
    Release,
    /// The real image positions of the prompt; generated tokens are language.
    Image,
}

/// The release's mask for a forward of `seq_len` positions: bool `[batch, seq_len]`.
pub fn release_visual_mask(batch: i64, seq_len: i64, device: Device) -> Result<Tensor> {
    let mask = Tensor::f_zeros([batch, seq_len], (Kind::Bool, device))?;
    if seq_len > 1 {
        let start = RELEASE_VISUAL_START.min(seq_len);
        let end = (RELEASE_VISUAL_START + RELEASE_VISUAL_LEN).min(seq_len);
        if end > start {
            let mut span = mask.f_narrow(1, start, end - start)?;
            let _ = span.f_fill_(1)?;
        }
    }
    Ok(mask)
}

/// A mask with `spans[b]` set in row `b`: bool `[spans.len(), seq_len]`.
pub fn span_mask(spans: &[Vec<Range<i64>>], seq_len: i64, device: Device) -> Result<Tensor> {
    let mut flat = vec![false; spans.len() * seq_len.max(0) as usize];
    for (b, row) in spans.iter().enumerate() {
        for r in row {
            if r.start < 0 || r.end > seq_len || r.start > r.end {
                return Err(Error::InvalidInput(format!("visual span {r:?} outside a sequence of {seq_len}")));
            }
            for p in r.clone() {
                flat[b * seq_len as usize + p as usize] = true;
            }
        }
    }
    Ok(Tensor::f_from_slice(&flat)?.f_reshape([spans.len() as i64, seq_len])?.f_to_device(device)?)
}

/// The prefill's visual mask under `policy`, given where each row's images are.
pub fn prefill_visual_mask(
    policy: MaskPolicy,
    image_spans: &[Vec<Range<i64>>],
    seq_len: i64,
    device: Device,
) -> Result<Tensor> {
    match policy {
        MaskPolicy::Release => release_visual_mask(image_spans.len() as i64, seq_len, device),
        MaskPolicy::Image => span_mask(image_spans, seq_len, device),
    }
}

/// Whether the release's mask and the real image positions disagree for this prompt's prefill (the
/// release then applies the visual LoRA to text, or the language LoRA to image features).
pub fn policies_differ(image_spans: &[Vec<Range<i64>>], seq_len: i64) -> bool {
    let release =
        |p: i64| seq_len > 1 && (RELEASE_VISUAL_START..RELEASE_VISUAL_START + RELEASE_VISUAL_LEN).contains(&p);
    image_spans.iter().any(|row| (0..seq_len).any(|p| release(p) != row.iter().any(|r| r.contains(&p))))
}
