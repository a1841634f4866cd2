//! `LlamaAttention` (transformers 4.37.2, eager) with MM-LoRA projections.
use super::cache::KvCache;
use super::fp16_attention;
use super::mmlora::{MmLoraLinear, MmLoraMode};
use super::rope::apply_rotary;
use crate::config::ArcanaConfig;
use crate::error::Result;
use crate::quant::WeightForms;
use crate::weights::Weights;
use tch::{Kind, Tensor};

#[derive(Debug)]
pub struct Attention {
    pub q_proj: MmLoraLinear,
    pub k_proj: MmLoraLinear,
    pub v_proj: MmLoraLinear,
    pub o_proj: MmLoraLinear,
    pub num_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub layer_idx: usize,
}

/// `repeat_kv`: `[B, kv, L, D]` to `[B, kv * n_rep, L, D]` by expand + reshape; unchanged for `n_rep == 1`.
pub fn repeat_kv(x: &Tensor, n_rep: i64) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.shallow_clone());
    }
    let s = x.size();
    let (b, kv, l, d) = (s[0], s[1], s[2], s[3]);
    Ok(x.f_unsqueeze(2)?.f_expand([b, kv, n_rep, l, d], false)?.f_reshape([b, kv * n_rep, l, d])?)
}

impl Attention {
    pub fn load(w: &Weights, config: &ArcanaConfig, layer_idx: usize, storage: WeightForms) -> Result<Self> {
        let (h, d) = (config.hidden_size, config.head_dim());
        let (nh, nkv) = (config.num_attention_heads, config.num_kv_heads());
        let (bias, s) = (config.attention_bias, MmLoraMode::from_config(config));
        Ok(Self {
            q_proj: MmLoraLinear::load(&w.pp("q_proj"), h, nh * d, bias, s, storage)?,
            k_proj: MmLoraLinear::load(&w.pp("k_proj"), h, nkv * d, bias, s, storage)?,
            v_proj: MmLoraLinear::load(&w.pp("v_proj"), h, nkv * d, bias, s, storage)?,
            o_proj: MmLoraLinear::load(&w.pp("o_proj"), nh * d, h, bias, s, storage)?,
            num_heads: nh,
            num_key_value_heads: nkv,
            head_dim: d,
            layer_idx,
        })
    }

    /// `x`: `[B, L, hidden]`; `cos`/`sin`: gathered by position, `[B, 1, L, head_dim]`; `mask`: additive
    /// `[B, 1, L, past + L]`. With a cache, attends over the cached positions too and appends this step's.
    pub fn forward(
        &self,
        x: &Tensor,
        visual: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &KeyMask,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let s = x.size();
        let (b, l) = (s[0], s[1]);
        let heads =
            |t: Tensor, n: i64| -> Result<Tensor> { Ok(t.f_view([b, l, n, self.head_dim])?.f_transpose(1, 2)?) };
        let q = heads(self.q_proj.forward(x, visual)?, self.num_heads)?;
        let k = heads(self.k_proj.forward(x, visual)?, self.num_key_value_heads)?;
        let v = heads(self.v_proj.forward(x, visual)?, self.num_key_value_heads)?;
        let q = apply_rotary(&q, cos, sin)?;
        let k = apply_rotary(&k, cos, sin)?;
        let (k, v) = match cache {
            Some(cache) => cache.update(self.layer_idx, &k, &v)?,
            None => (k, v),
        };
        if k.kind() == Kind::Half && q.kind() == Kind::Float {
            // A cache kept in fp16 beside fp32 compute: read in place, each row over its own keys.
            let out = fp16_attention::attend(&q, &k, &v, mask.additive.as_ref(), mask.row_starts.as_deref())?;
            return self.project_out(out, visual, b, l);
        }
        let n_rep = self.num_heads / self.num_key_value_heads;
        let k = repeat_kv(&k, n_rep)?;
        let v = repeat_kv(&v, n_rep)?;
        let out = match &mask.row_starts {
            // Each row over its own keys, as it would be alone: the softmax and the weighted sum then
            // add the same terms in the same order, whatever padding the other rows bring.
            Some(starts) => {
                let kv_len = k.size()[2];
                let rows = starts
                    .iter()
                    .enumerate()
                    .map(|(row, &start)| {
                        let (row, n) = (row as i64, kv_len - start);
                        let own = |t: &Tensor| t.f_narrow(0, row, 1)?.f_narrow(2, start, n);
                        let additive = match &mask.additive {
                            Some(m) => Some(m.f_narrow(0, row, 1)?.f_narrow(3, start, n)?),
                            None => None,
                        };
                        self.attend(&q.f_narrow(0, row, 1)?, &own(&k)?, &own(&v)?, additive.as_ref())
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::f_cat(&rows, 0)?
            }
            None => self.attend(&q, &k, &v, mask.additive.as_ref())?,
        };
        self.project_out(out, visual, b, l)
    }

    /// `o_proj` of the heads' outputs `[B, heads, L, d]`.
    fn project_out(&self, out: Tensor, visual: &Tensor, b: i64, l: i64) -> Result<Tensor> {
        let out = out.f_transpose(1, 2)?.f_contiguous()?.f_reshape([b, l, self.num_heads * self.head_dim])?;
        self.o_proj.forward(&out, visual)
    }

    /// `softmax(q k^T / sqrt(d) + mask) v` for `[B, heads, L, d]` queries.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let mut weights = q.f_matmul(&k.f_transpose(2, 3)?)?.f_div_scalar((self.head_dim as f64).sqrt())?;
        if let Some(mask) = mask {
            weights = weights.f_add(mask)?;
        }
        // Softmax upcast to fp32, then back to the query's dtype.
        let weights = weights.f_softmax(-1, Kind::Float)?.f_to_kind(q.kind())?;
        Ok(weights.f_matmul(v)?)
    }
}

/// Which keys each query sees in one forward.
#[derive(Debug, Default)]
pub struct KeyMask {
    /// Added to the attention scores, `[B, 1, L, kv]` (0 where allowed); none: every key.
    pub additive: Option<Tensor>,
    /// For a decoding step of several left-padded rows: each row's first real key. Each row then
    /// attends over its own keys only, computing what it would alone.
    pub row_starts: Option<Vec<i64>>,
}
