//! The Query Ladder adapter (`clip_qladder.py` of the release): one cross-attention layer per CLIP layer,
//! whose learned queries read CLIP's hidden states and whose outputs join CLIP's patch features.
use crate::config::VisionConfig;
use crate::error::Result;
use crate::layers::LayerNorm;
use crate::quant::LinearStorage;
use crate::vision::clip::{ClipAttention, ClipMlp};
use crate::weights::Weights;
use tch::Tensor;

/// `LadderCLIPEncoderLayer`: `q = q + cross_attn(ln0(q), ln1(kv)); q = q + mlp(ln2(q))`.
#[derive(Debug)]
pub struct LadderLayer {
    pub layer_norm0: LayerNorm,
    pub cross_attn: ClipAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: ClipMlp,
    pub layer_norm2: LayerNorm,
}

impl LadderLayer {
    pub fn load(w: &Weights, config: &VisionConfig, linears: LinearStorage) -> Result<Self> {
        let (dim, eps) = (config.hidden_size, config.layer_norm_eps);
        Ok(Self {
            layer_norm0: LayerNorm::load(&w.pp("layer_norm0"), dim, eps)?,
            cross_attn: ClipAttention::load(&w.pp("cross_attn"), config, linears)?,
            layer_norm1: LayerNorm::load(&w.pp("layer_norm1"), dim, eps)?,
            mlp: ClipMlp::load(&w.pp("mlp"), config, linears)?,
            layer_norm2: LayerNorm::load(&w.pp("layer_norm2"), dim, eps)?,
        })
    }

    pub fn forward(&self, queries: &Tensor, clip_hidden: &Tensor) -> Result<Tensor> {
        let attended =
            self.cross_attn.forward(&self.layer_norm0.forward(queries)?, &self.layer_norm1.forward(clip_hidden)?)?;
        let queries = queries.f_add(&attended)?;
        let mlp_out = self.mlp.forward(&self.layer_norm2.forward(&queries)?)?;
        Ok(queries.f_add(&mlp_out)?)
    }
}

/// `LadderAdapters` plus `qladder_embeds` ([1, Q, hidden]; the release uses Q = 64).
#[derive(Debug)]
pub struct QueryLadder {
    pub qladder_embeds: Tensor,
    pub layers: Vec<LadderLayer>,
}

impl QueryLadder {
    /// `w` points at the vision tower (`model.vision_tower.vision_tower`).
    pub fn load(w: &Weights, config: &VisionConfig, linears: LinearStorage) -> Result<Self> {
        let shape = w.shape("qladder_embeds")?;
        let queries = if shape.len() == 3 { shape[1] } else { -1 };
        let qladder_embeds = w.get("qladder_embeds", &[1, queries, config.hidden_size])?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| LadderLayer::load(&w.pp("LadderAdapters").pp(i), config, linears))
            .collect::<Result<_>>()?;
        Ok(Self { qladder_embeds, layers })
    }

    pub fn num_queries(&self) -> i64 {
        self.qladder_embeds.size()[1]
    }

    /// `ladder_hidden_states`: layer i reads CLIP's `hidden_states[i]`, the input of CLIP layer i.
    pub fn forward(&self, clip_hidden_states: &[Tensor]) -> Result<Vec<Tensor>> {
        self.forward_upto(clip_hidden_states, self.layers.len())
    }

    /// The outputs of the first `layers` ladder layers.
    pub fn forward_upto(&self, clip_hidden_states: &[Tensor], layers: usize) -> Result<Vec<Tensor>> {
        let batch = clip_hidden_states[0].size()[0];
        let mut queries = self.qladder_embeds.f_repeat([batch, 1, 1])?;
        let mut outputs = Vec::with_capacity(layers);
        for (layer, clip_hidden) in self.layers.iter().take(layers).zip(clip_hidden_states) {
            queries = layer.forward(&queries, clip_hidden)?;
            outputs.push(queries.shallow_clone());
        }
        Ok(outputs)
    }
}
