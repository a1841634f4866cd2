//! `LlamaDecoderLayer`, `LlamaModel` and `LlamaForCausalLM` (transformers 4.37.2, eager), every
//! projection an MM-LoRA linear.
use super::attention::{Attention, KeyMask};
use super::cache::KvCache;
use super::mask::causal_4d_mask;
use super::mlp::Mlp;
use super::mmlora::{Branch, MmLoraLinear};
use super::norm::RmsNorm;
use super::placement::{Place, Plan};
use super::rope::{gather_positions, RotaryEmbedding};
use crate::config::ArcanaConfig;
use crate::error::{Error, Result};
use crate::layers::Linear;
use crate::quant::{BaseWeight, WeightForms};
use crate::weights::Weights;
use tch::{Device, Kind, Tensor};

/// Where a part of the decoder keeps its weights and computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Site {
    pub kind: Kind,
    pub device: Device,
}

/// The sites of the decoder's parts: the front (token embeddings; the vision side loads beside them),
/// each layer, and the head (final norm, lm_head).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecoderSites {
    pub front: Site,
    pub layers: Vec<Site>,
    pub head: Site,
}

impl DecoderSites {
    pub fn single(kind: Kind, device: Device, num_layers: usize) -> Self {
        let site = Site { kind, device };
        Self { front: site, layers: vec![site; num_layers], head: site }
    }

    /// A plan's devices with the model's dtype, except that an fp16 model computes its CPU parts in fp32
    /// when it also runs on a GPU: libtorch 2.0.1 has no fp16 matmul on the CPU. Widening fp16 weights to
    /// fp32 is exact; the hidden states are rounded back to fp16 where they return to a GPU.
    pub fn from_plan(plan: &Plan, kind: Kind) -> Self {
        let widen = kind == Kind::Half && plan.uses_cuda();
        let site = |place: Place| match place {
            Place::Cpu => Site { kind: if widen { Kind::Float } else { kind }, device: Device::Cpu },
            Place::Cuda(_) => Site { kind, device: place.into() },
        };
        Self { front: site(plan.front), layers: plan.layers.iter().map(|&p| site(p)).collect(), head: site(plan.head) }
    }

    /// Whether any part sits elsewhere than the front.
    pub fn is_split(&self) -> bool {
        self.head != self.front || self.layers.iter().any(|&s| s != self.front)
    }
}

#[derive(Debug)]
pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    pub fn load(w: &Weights, config: &ArcanaConfig, layer_idx: usize, storage: WeightForms) -> Result<Self> {
        let (h, eps) = (config.hidden_size, config.rms_norm_eps);
        Ok(Self {
            self_attn: Attention::load(&w.pp("self_attn"), config, layer_idx, storage)?,
            mlp: Mlp::load(&w.pp("mlp"), config, storage)?,
            input_layernorm: RmsNorm::load(&w.pp("input_layernorm"), h, eps)?,
            post_attention_layernorm: RmsNorm::load(&w.pp("post_attention_layernorm"), h, eps)?,
        })
    }

    /// `x + attn(ln1(x))`, then `h + mlp(ln2(h))`.
    pub fn forward(
        &self,
        x: &Tensor,
        visual: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &KeyMask,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let attn = self.self_attn.forward(&self.input_layernorm.forward(x)?, visual, cos, sin, mask, cache)?;
        let h = x.f_add(&attn)?;
        let mlp = self.mlp.forward(&self.post_attention_layernorm.forward(&h)?, visual)?;
        Ok(h.f_add(&mlp)?)
    }
}

/// What one forward of the decoder computed.
pub struct LlamaOutput {
    /// Output of each decoder layer (only when asked for).
    pub layers: Vec<Tensor>,
    /// After the final RMSNorm: `[B, L, hidden]`.
    pub hidden: Tensor,
}

/// One forward's inputs besides the embeddings.
pub struct StepInputs<'a> {
    /// `[B, L]` int64.
    pub position_ids: &'a Tensor,
    /// 2D padding mask `[B, past + L]` (1 = attend), or none (every position attends).
    pub attention_mask: Option<&'a Tensor>,
    /// bool `[B, L]`: the positions that take the visual LoRA branch.
    pub visual: &'a Tensor,
}

/// Forwards of at least this many rows (prefills) return the freed heap to the system after each layer;
/// decoding steps, whose temporaries are small, do not pay for it.
const TRIM_AFTER_LAYERS_FROM_ROWS: i64 = 256;

#[derive(Debug)]
pub struct LlamaModel {
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub rotary_emb: RotaryEmbedding,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    /// Where each part computes (one site for an unsplit model).
    pub sites: DecoderSites,
    /// Layers computing in fp32 on the CPU keep their keys and values in fp16 (the compact modes, whose
    /// projections are not exact anyway): half the cache's memory and of the bytes each step reads.
    pub kv_fp16: bool,
}

/// What every layer on one site reads besides the hidden states, made once per forward and site.
struct SiteInputs {
    site: Site,
    mask: KeyMask,
    cos: Tensor,
    sin: Tensor,
    visual: Tensor,
}

impl LlamaModel {
    /// `w` points at `model`; each part's weights are loaded straight to its site, the projections
    /// stored as `storage` says.
    pub fn load(w: &Weights, config: &ArcanaConfig, sites: &DecoderSites, storage: WeightForms) -> Result<Self> {
        let n = config.num_hidden_layers as usize;
        if sites.layers.len() != n {
            return Err(Error::Placement(format!("{} layer sites for a decoder of {n} layers", sites.layers.len())));
        }
        fn on<'a>(w: Weights<'a>, site: Site) -> Weights<'a> {
            w.placed(site.kind, site.device)
        }
        let embed_tokens =
            on(w.pp("embed_tokens"), sites.front).get_sparse("weight", &[config.vocab_size, config.hidden_size])?;
        let layers = (0..n)
            .map(|i| {
                let layer = DecoderLayer::load(&on(w.pp("layers").pp(i), sites.layers[i]), config, i, storage);
                crate::weights::release_free_heap();
                layer
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(&on(w.pp("norm"), sites.head), config.hidden_size, config.rms_norm_eps)?;
        let rotary_emb = RotaryEmbedding::new(config, sites.front.device)?;
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            rotary_emb,
            num_key_value_heads: config.num_kv_heads(),
            head_dim: config.head_dim(),
            sites: sites.clone(),
            kv_fp16: storage.storage.is_some(),
        })
    }

    /// `embed_tokens(ids)`; every id must be in the vocabulary.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let vocab = self.embed_tokens.size()[0];
        if ids.numel() > 0 {
            let (lo, hi) = (ids.f_min()?.f_int64_value(&[])?, ids.f_max()?.f_int64_value(&[])?);
            if lo < 0 || hi >= vocab {
                return Err(Error::InvalidInput(format!(
                    "token id out of the vocabulary [0, {vocab}): {}",
                    if lo < 0 { lo } else { hi }
                )));
            }
        }
        Ok(Tensor::f_embedding(&self.embed_tokens, &ids.f_to_device(self.embed_tokens.device())?, -1, false, false)?)
    }

    /// An empty cache fitting this decoder.
    pub fn new_cache(&self, batch: i64, capacity: i64) -> Result<KvCache> {
        let half_on_cpu = |s: &Site| self.kv_fp16 && s.kind == Kind::Float && s.device == Device::Cpu;
        let sites: Vec<(Kind, Device)> =
            self.sites.layers.iter().map(|s| (if half_on_cpu(s) { Kind::Half } else { s.kind }, s.device)).collect();
        KvCache::with_sites(&sites, batch, self.num_key_value_heads, self.head_dim, capacity)
    }

    /// The mask, rotary tables and visual mask for the layers on `site`: made on the front (where the
    /// inputs are), then moved, so that every site sees the same values in its own dtype.
    fn site_inputs(&self, site: Site, step: &StepInputs, b: i64, l: i64, past: i64) -> Result<SiteInputs> {
        let front = self.sites.front.device;
        let attention_mask = step.attention_mask.map(|m| m.f_to_device(site.device)).transpose()?;
        let additive = causal_4d_mask(attention_mask.as_ref(), b, l, past, site.kind, site.device)?;
        let row_starts = match &attention_mask {
            // Left padding ends where a row's mask first holds 1.
            Some(m) if l == 1 && b > 1 => Some(Vec::<i64>::try_from(m.f_argmax(1, false)?.f_to_device(Device::Cpu)?)?),
            _ => None,
        };
        let mask = KeyMask { additive, row_starts };
        // Every layer's rotary module returns the same tables for the same kv length; gathered once.
        let (cos, sin) = self.rotary_emb.cos_sin(past + l, site.kind, front)?;
        let (cos, sin) = (gather_positions(&cos, step.position_ids)?, gather_positions(&sin, step.position_ids)?);
        Ok(SiteInputs {
            site,
            mask,
            cos: cos.f_to_device(site.device)?,
            sin: sin.f_to_device(site.device)?,
            visual: step.visual.f_to_device(site.device)?,
        })
    }

    /// `LlamaModel.forward(inputs_embeds=...)`; with a cache, positions continue after the cached ones.
    pub fn forward(
        &self,
        inputs_embeds: &Tensor,
        step: &StepInputs,
        mut cache: Option<&mut KvCache>,
        keep_layers: bool,
    ) -> Result<LlamaOutput> {
        let s = inputs_embeds.size();
        if s.len() != 3 || s[2] != self.embed_tokens.size()[1] {
            return Err(Error::InvalidInput(format!(
                "inputs_embeds {s:?}, expected [B, L, {}]",
                self.embed_tokens.size()[1]
            )));
        }
        let (b, l) = (s[0], s[1]);
        if step.position_ids.size() != [b, l] || step.visual.size() != [b, l] {
            return Err(Error::InvalidInput(format!(
                "position ids {:?} / visual mask {:?}, expected [{b}, {l}]",
                step.position_ids.size(),
                step.visual.size()
            )));
        }
        let past = match cache.as_deref_mut() {
            Some(c) => {
                if c.batch() != b || c.num_layers() != self.layers.len() {
                    return Err(Error::InvalidInput(format!(
                        "KV cache for batch {} / {} layers used with batch {b} / {} layers",
                        c.batch(),
                        c.num_layers(),
                        self.layers.len()
                    )));
                }
                c.reserve(l)?;
                c.len()
            }
            None => 0,
        };
        let mut prepared: Vec<SiteInputs> = Vec::new();
        let mut h = inputs_embeds.shallow_clone();
        let mut layers = Vec::new();
        for (layer, &site) in self.layers.iter().zip(&self.sites.layers) {
            let index = match prepared.iter().position(|p| p.site == site) {
                Some(index) => index,
                None => {
                    prepared.push(self.site_inputs(site, step, b, l, past)?);
                    prepared.len() - 1
                }
            };
            let inputs = &prepared[index];
            // A layer computes where its weights are, so the hidden states follow the layers from device
            // to device (as accelerate's hooks move a module's inputs for the release's device_map).
            h = to_site(h, site)?;
            h = layer.forward(&h, &inputs.visual, &inputs.cos, &inputs.sin, &inputs.mask, cache.as_deref_mut())?;
            if b * l >= TRIM_AFTER_LAYERS_FROM_ROWS {
                // A long prefill's layer frees tens of MB of temporaries that glibc would keep.
                crate::weights::release_free_heap();
            }
            if keep_layers {
                layers.push(h.shallow_clone());
            }
        }
        if let Some(c) = cache {
            c.advance(l);
        }
        Ok(LlamaOutput { layers, hidden: self.norm.forward(&to_site(h, self.sites.head)?)? })
    }
}

#[derive(Debug)]
pub struct LlamaForCausalLM {
    pub model: LlamaModel,
    pub lm_head: BaseWeight,
    /// Loaded as stored, with nothing merged: computes what the release computes, bit for bit.
    pub exact: bool,
}

/// Logits and the decoder's outputs of one forward.
pub struct CausalLmOutput {
    /// `[B, L, vocab]`, fp32, every position (as upstream).
    pub logits: Tensor,
    pub decoder: LlamaOutput,
}

impl LlamaForCausalLM {
    /// `w` is the checkpoint's root.
    pub fn load(w: &Weights, config: &ArcanaConfig) -> Result<Self> {
        Self::load_with(w, config, WeightForms::default())
    }

    /// `load`, storing the projections (and `lm_head`) as `storage` says. `lm_head` takes int8 where the
    /// projections take int4: it has no MM-LoRA branch and every logit goes through it.
    pub fn load_with(w: &Weights, config: &ArcanaConfig, storage: WeightForms) -> Result<Self> {
        let sites = DecoderSites::single(w.kind(), w.device(), config.num_hidden_layers as usize);
        Self::load_on(w, config, &sites, storage)
    }

    /// `load_with`, each part's weights loaded straight to its site.
    pub fn load_on(w: &Weights, config: &ArcanaConfig, sites: &DecoderSites, storage: WeightForms) -> Result<Self> {
        let model = LlamaModel::load(&w.pp("model"), config, sites, storage)?;
        let head = w.pp("lm_head").placed(sites.head.kind, sites.head.device);
        let exact = storage == WeightForms::default();
        if let (true, Some(mode)) = (storage.prequantized, storage.storage) {
            let lm_head =
                BaseWeight::load_compact(&head, mode.for_lm_head(), config.hidden_size, config.vocab_size, false)?;
            return Ok(Self { model, lm_head, exact });
        }
        let lm_head = if config.tie_word_embeddings && !head.contains("weight") {
            // Tied to the embeddings: a copy where the head sits on another device.
            Linear { weight: to_site(model.embed_tokens.shallow_clone(), sites.head)?, bias: None }
        } else {
            let shape = [config.vocab_size, config.hidden_size];
            let weight = if storage.storage.is_some() {
                head.get_transient("weight", &shape)?
            } else {
                head.get("weight", &shape)?
            };
            Linear { weight, bias: None }
        };
        let lm_head = match storage.storage {
            Some(mode) => BaseWeight::quantized(lm_head, mode.for_lm_head())?,
            None => BaseWeight::Dense(lm_head),
        };
        Ok(Self { model, lm_head, exact })
    }

    /// Whether the projections' base weights hold the MM-LoRA language branch (merged at load or in the
    /// checkpoint).
    pub fn language_merged(&self) -> bool {
        self.model.layers.first().is_some_and(|layer| layer.self_attn.q_proj.language_merged)
    }

    /// Every MM-LoRA projection of the decoder, layer by layer.
    pub fn projections(&self) -> impl Iterator<Item = &MmLoraLinear> {
        self.model.layers.iter().flat_map(|layer| {
            let (a, m) = (&layer.self_attn, &layer.mlp);
            [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
        })
    }

    /// The MM-LoRA branches' size and form, branch by branch (`visual 40.0 MiB in fp16, language ...`).
    pub fn describe_lora_branches(&self) -> String {
        let mut parts = Vec::new();
        for branch in [Branch::Visual, Branch::Language] {
            let weights: Vec<&BaseWeight> = (self.projections().flat_map(|p| p.branches()))
                .filter_map(|(b, pair)| (b == branch).then_some(pair))
                .flatten()
                .collect();
            let bytes = weights.iter().map(|w| w.bytes()).sum::<usize>();
            let mut forms: Vec<String> = weights.iter().map(|w| w.form()).collect();
            forms.sort();
            forms.dedup();
            let name = format!("{branch:?}").to_lowercase();
            parts.push(format!("{name} {:.1} MiB in {}", bytes as f64 / 1048576.0, forms.join("/")));
        }
        parts.join(", ")
    }

    /// The decoder's projections' base weights and `lm_head`.
    pub fn base_weights(&self) -> impl Iterator<Item = &BaseWeight> {
        self.projections().map(|p| &p.base).chain(std::iter::once(&self.lm_head))
    }

    pub fn forward(
        &self,
        inputs_embeds: &Tensor,
        step: &StepInputs,
        cache: Option<&mut KvCache>,
        keep_layers: bool,
    ) -> Result<CausalLmOutput> {
        let _guard = tch::no_grad_guard();
        let decoder = self.model.forward(inputs_embeds, step, cache, keep_layers)?;
        let logits = self.lm_head.forward(&decoder.hidden)?.f_to_kind(Kind::Float)?;
        Ok(CausalLmOutput { logits, decoder })
    }

    /// The last position's fp32 logits `[B, vocab]`, which decoding reads. Outside the exact mode only
    /// that row goes through `lm_head`; the exact mode runs every row, as the release does, because
    /// one row alone takes another GEMM path with other low bits.
    pub fn next_token_logits(
        &self,
        inputs_embeds: &Tensor,
        step: &StepInputs,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let hidden = self.model.forward(inputs_embeds, step, cache, false)?.hidden;
        let last = hidden.size()[1] - 1;
        let logits = if self.exact {
            self.lm_head.forward(&hidden)?.f_select(1, last)?
        } else {
            self.lm_head.forward(&hidden.f_select(1, last)?)?
        };
        Ok(logits.f_to_kind(Kind::Float)?)
    }
}

/// `t` on `site`'s device and dtype; the same tensor where it is already there.
fn to_site(t: Tensor, site: Site) -> Result<Tensor> {
    let t = if t.device() == site.device { t } else { t.f_to_device(site.device)? };
    Ok(if t.kind() == site.kind { t } else { t.f_to_kind(site.kind)? })
}
