//! The additive causal attention mask (transformers 4.37.2's `_prepare_4d_causal_attention_mask`).
use crate::error::{Error, Result};
use tch::{Device, Kind, Tensor};

/// `torch.finfo(kind).min`.
pub fn finfo_min(kind: Kind) -> Result<f64> {
    match kind {
        Kind::Float => Ok(f32::MIN as f64),
        Kind::Double => Ok(f64::MIN),
        Kind::Half => Ok(-65504.0),
        Kind::BFloat16 => Ok(-3.3895313892515355e38),
        other => Err(Error::InvalidInput(format!("no attention mask for dtype {other:?}"))),
    }
}

/// transformers' `_prepare_4d_causal_attention_mask` (eager): `[B, 1, q_len, past + q_len]` of 0 where a
/// query may attend and `finfo.min` elsewhere; causal only for `q_len > 1`; `attention_mask` is the 2D
/// `[B, past + q_len]` padding mask (1 = attend). `None` when there is nothing to mask, like upstream.
pub fn causal_4d_mask(
    attention_mask: Option<&Tensor>,
    batch: i64,
    q_len: i64,
    past: i64,
    kind: Kind,
    device: Device,
) -> Result<Option<Tensor>> {
    let kv_len = past + q_len;
    let mut allowed: Option<Tensor> = None;
    if q_len > 1 {
        let q = Tensor::f_arange_start(past, kv_len, (Kind::Int64, device))?.f_view([q_len, 1])?;
        let k = Tensor::f_arange(kv_len, (Kind::Int64, device))?.f_view([1, kv_len])?;
        allowed = Some(k.f_le_tensor(&q)?.f_view([1, 1, q_len, kv_len])?);
    }
    if let Some(m) = attention_mask {
        if m.size() != [batch, kv_len] {
            return Err(Error::InvalidInput(format!("attention mask {:?}, expected [{batch}, {kv_len}]", m.size())));
        }
        let pad = m.f_eq(1)?.f_view([batch, 1, 1, kv_len])?;
        allowed = Some(match allowed {
            Some(c) => c.f_logical_and(&pad)?,
            None => pad,
        });
    }
    let Some(allowed) = allowed else { return Ok(None) };
    let allowed = allowed.f_expand([batch, 1, q_len, kv_len], false)?;
    let min = Tensor::f_scalar_tensor(finfo_min(kind)?, (Kind::Double, device))?.f_to_kind(kind)?;
    let zero = Tensor::f_zeros([], (kind, device))?;
    Ok(Some(zero.f_where_self(&allowed, &min)?))
}
