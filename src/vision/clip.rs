//! CLIP vision transformer as transformers 4.37.2 `CLIPVisionModel` computes it (eager attention).
//! Module and field names follow the PyTorch state dict (`vision_model.encoder.layers.N.self_attn.q_proj`).
use crate::config::VisionConfig;
use crate::error::Result;
use crate::layers::LayerNorm;
use crate::quant::{BaseWeight, LinearStorage};
use crate::weights::Weights;
use tch::Tensor;

pub use crate::config::Activation;

impl Activation {
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::QuickGelu => x.f_mul(&x.f_mul_scalar(1.702)?.f_sigmoid()?)?,
            Self::Gelu => x.f_gelu("none")?,
        })
    }
}

/// `CLIPAttention`, written once for self-attention (`q_in == kv_in`) and the Query Ladder's cross-attention
/// (queries from the ladder, keys and values from CLIP's hidden states), which the release computes the same way.
#[derive(Debug)]
pub struct ClipAttention {
    pub q_proj: BaseWeight,
    pub k_proj: BaseWeight,
    pub v_proj: BaseWeight,
    pub out_proj: BaseWeight,
    num_heads: i64,
    head_dim: i64,
    scale: f64,
}

impl ClipAttention {
    pub fn load(w: &Weights, config: &VisionConfig, linears: LinearStorage) -> Result<Self> {
        let dim = config.hidden_size;
        let head_dim = config.head_dim();
        let projection = |name: &str| BaseWeight::load(&w.pp(name), dim, dim, true, linears);
        Ok(Self {
            q_proj: projection("q_proj")?,
            k_proj: projection("k_proj")?,
            v_proj: projection("v_proj")?,
            out_proj: projection("out_proj")?,
            num_heads: config.num_attention_heads,
            head_dim,
            // Python's `head_dim**-0.5`.
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// `[b, len, dim]` -> `[b * heads, len, head_dim]` via `view(b, len, heads, hd).transpose(1, 2).contiguous()`.
    fn split_heads(&self, x: &Tensor, batch: i64) -> Result<Tensor> {
        let heads = x.f_view([batch, -1, self.num_heads, self.head_dim])?.f_transpose(1, 2)?.f_contiguous()?;
        Ok(heads.f_view([batch * self.num_heads, -1, self.head_dim])?)
    }

    /// q, k, v and out projections.
    pub fn linears(&self) -> [&BaseWeight; 4] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.out_proj]
    }

    pub fn forward(&self, q_in: &Tensor, kv_in: &Tensor) -> Result<Tensor> {
        let (batch, tgt_len, dim) = q_in.size3()?;
        let query = self.q_proj.forward(q_in)?.f_mul_scalar(self.scale)?;
        let key = self.split_heads(&self.k_proj.forward(kv_in)?, batch)?;
        let value = self.split_heads(&self.v_proj.forward(kv_in)?, batch)?;
        let query = self.split_heads(&query, batch)?;
        let weights = query.f_bmm(&key.f_transpose(1, 2)?)?;
        // Softmax in the input dtype; dropout is off at inference.
        let probs = weights.f_softmax(-1, weights.kind())?;
        let out = probs
            .f_bmm(&value)?
            .f_view([batch, self.num_heads, tgt_len, self.head_dim])?
            .f_transpose(1, 2)?
            .f_reshape([batch, tgt_len, dim])?;
        self.out_proj.forward(&out)
    }
}

/// `CLIPMLP`: `fc2(act(fc1(x)))`.
#[derive(Debug)]
pub struct ClipMlp {
    pub fc1: BaseWeight,
    pub fc2: BaseWeight,
    activation: Activation,
}

impl ClipMlp {
    pub fn load(w: &Weights, config: &VisionConfig, linears: LinearStorage) -> Result<Self> {
        let (dim, inner) = (config.hidden_size, config.intermediate_size);
        Ok(Self {
            fc1: BaseWeight::load(&w.pp("fc1"), dim, inner, true, linears)?,
            fc2: BaseWeight::load(&w.pp("fc2"), inner, dim, true, linears)?,
            activation: config.hidden_act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.activation.forward(&self.fc1.forward(x)?)?)
    }
}

/// `CLIPEncoderLayer`: pre-norm residual attention and MLP.
#[derive(Debug)]
pub struct ClipEncoderLayer {
    pub layer_norm1: LayerNorm,
    pub self_attn: ClipAttention,
    pub layer_norm2: LayerNorm,
    pub mlp: ClipMlp,
}

impl ClipEncoderLayer {
    pub fn load(w: &Weights, config: &VisionConfig, linears: LinearStorage) -> Result<Self> {
        let (dim, eps) = (config.hidden_size, config.layer_norm_eps);
        Ok(Self {
            self_attn: ClipAttention::load(&w.pp("self_attn"), config, linears)?,
            layer_norm1: LayerNorm::load(&w.pp("layer_norm1"), dim, eps)?,
            mlp: ClipMlp::load(&w.pp("mlp"), config, linears)?,
            layer_norm2: LayerNorm::load(&w.pp("layer_norm2"), dim, eps)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let normed = self.layer_norm1.forward(x)?;
        let x = x.f_add(&self.self_attn.forward(&normed, &normed)?)?;
        let mlp_out = self.mlp.forward(&self.layer_norm2.forward(&x)?)?;
        Ok(x.f_add(&mlp_out)?)
    }
}

/// `CLIPVisionEmbeddings`: patch convolution, class token, learned positions.
#[derive(Debug)]
pub struct ClipVisionEmbeddings {
    pub class_embedding: Tensor,
    pub patch_embedding: Tensor,
    pub position_embedding: Tensor,
    patch_size: i64,
}

impl ClipVisionEmbeddings {
    pub fn load(w: &Weights, config: &VisionConfig) -> Result<Self> {
        let dim = config.hidden_size;
        let positions = config.num_patches() + 1;
        Ok(Self {
            class_embedding: w.get("class_embedding", &[dim])?,
            patch_embedding: w
                .pp("patch_embedding")
                .get("weight", &[dim, config.num_channels, config.patch_size, config.patch_size])?,
            position_embedding: w.pp("position_embedding").get("weight", &[positions, dim])?,
            patch_size: config.patch_size,
        })
    }

    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let batch = pixel_values.size()[0];
        let pixels = pixel_values.f_to_kind(self.patch_embedding.kind())?;
        let stride = [self.patch_size, self.patch_size];
        let patches = pixels.f_conv2d(&self.patch_embedding, None::<Tensor>, stride, [0, 0], [1, 1], 1)?;
        let patches = patches.f_flatten(2, -1)?.f_transpose(1, 2)?;
        let class = self.class_embedding.f_expand([batch, 1, -1], false)?;
        let embeddings = Tensor::f_cat(&[class, patches], 1)?;
        // `position_embedding(arange(n))` selects every row in order: the weight itself.
        Ok(embeddings.f_add(&self.position_embedding.f_unsqueeze(0)?)?)
    }
}

/// `CLIPVisionTransformer` without the pooled output (the release's features never use it).
#[derive(Debug)]
pub struct ClipVisionTransformer {
    pub embeddings: ClipVisionEmbeddings,
    pub pre_layrnorm: LayerNorm,
    pub layers: Vec<ClipEncoderLayer>,
    /// Loaded so the checkpoint is matched exactly; unused by the release's features.
    pub post_layernorm: LayerNorm,
}

impl ClipVisionTransformer {
    /// `w` points at `vision_model`.
    pub fn load(w: &Weights, config: &VisionConfig, linears: LinearStorage) -> Result<Self> {
        let (dim, eps) = (config.hidden_size, config.layer_norm_eps);
        let layers = (0..config.num_hidden_layers)
            .map(|i| ClipEncoderLayer::load(&w.pp("encoder").pp("layers").pp(i), config, linears))
            .collect::<Result<_>>()?;
        Ok(Self {
            embeddings: ClipVisionEmbeddings::load(&w.pp("embeddings"), config)?,
            pre_layrnorm: LayerNorm::load(&w.pp("pre_layrnorm"), dim, eps)?,
            layers,
            post_layernorm: LayerNorm::load(&w.pp("post_layernorm"), dim, eps)?,
        })
    }

    /// The encoder's `hidden_states`: L + 1 tensors, [0] the output of `pre_layrnorm`, [i] that of layer i - 1.
    pub fn hidden_states(&self, pixel_values: &Tensor) -> Result<Vec<Tensor>> {
        self.hidden_states_upto(pixel_values, self.layers.len())
    }

    /// The embeddings' output and the outputs of the first `layers` layers: what a selected layer needs,
    /// without running the layers after it.
    pub fn hidden_states_upto(&self, pixel_values: &Tensor, layers: usize) -> Result<Vec<Tensor>> {
        let mut states = Vec::with_capacity(layers + 1);
        states.push(self.pre_layrnorm.forward(&self.embeddings.forward(pixel_values)?)?);
        for layer in self.layers.iter().take(layers) {
            let next = layer.forward(states.last().expect("starts non-empty"))?;
            states.push(next);
        }
        Ok(states)
    }
}
