//! A release-layout model folder and the parts of the model built from it.
use crate::config::{resolve_vision_tower, ArcanaConfig, VisionConfig, VisionTowerSource};
use crate::error::{Error, Result};
use crate::generate::{
    decode, prefill, prefill_next, token_step, DecodeOptions, Decoded, Flow, GenerationConfig, Prefilled, Stepping,
    TokenChooser,
};
use crate::llm::llama::DecoderSites;
use crate::llm::placement::PartSizes;
use crate::llm::{CausalLmOutput, KvCache, LlamaForCausalLM, StepInputs};
use crate::mm::projector::Projector;
use crate::mm::splice::{prepare_inputs, spliced_length, Spliced};
use crate::mm::visual_span::{policies_differ, prefill_visual_mask, MaskPolicy};
use crate::quant::prequantized::{QuantizedManifest, MANIFEST_FILE};
use crate::quant::{BaseWeight, LinearStorage, WeightForms};
use crate::vision::preprocess::{ImagePreprocessor, PreprocessConfig};
use crate::vision::{VisionOutputs, VisionTower};
use crate::weights::{is_derived_buffer, Checkpoint, MappedPages, Mappings, WeightLoader};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Where the main checkpoint keeps the vision tower's tensors.
pub const VISION_TOWER_PREFIX: &str = "model.vision_tower.vision_tower.";
pub const PROJECTOR_PREFIX: &str = "model.mm_projector.";

/// The parts of a full CLIP checkpoint (CLIPModel) that a vision tower does not use.
fn is_unused_clip_part(name: &str) -> bool {
    name.starts_with("text_model.")
        || matches!(name, "logit_scale" | "text_projection.weight" | "visual_projection.weight")
        || is_derived_buffer(name)
}

/// The files of a model folder, resolved and validated, before any weight is read.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub config: ArcanaConfig,
    pub vision_config: VisionConfig,
    pub vision_source: VisionTowerSource,
    /// `generation_config.json` (or the config's ids where the folder has none).
    pub generation: GenerationConfig,
    /// The manifest of a pre-quantized folder (`arcana-convert --quantize`), checked against its files.
    pub prequantized: Option<QuantizedManifest>,
}

impl ModelFiles {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model folder does not exist"),
            ));
        }
        let config_path = dir.join("config.json");
        let config = ArcanaConfig::from_file(&config_path)?;
        let tower_name = config.vision_tower_name().ok_or_else(|| Error::Config {
            path: config_path.clone(),
            field: "mm_vision_tower".into(),
            message: "missing: the model names no vision tower".into(),
        })?;
        let vision_source = resolve_vision_tower(dir, tower_name)?;
        let vision_config = match &vision_source {
            VisionTowerSource::Folder(folder) => VisionConfig::from_file(&folder.join("config.json"))?,
            VisionTowerSource::Embedded(_) => VisionConfig::clip_vit_large_patch14_336(),
        };
        let generation = GenerationConfig::from_model_dir(dir, &config)?;
        let prequantized = QuantizedManifest::open(dir)?;
        Ok(Self { dir: dir.to_path_buf(), config_path, config, vision_config, vision_source, generation, prequantized })
    }

    /// The image processor the release pairs with this vision tower: the tower folder's
    /// `preprocessor_config.json` when it has one, else CLIP ViT-L/14-336's, and the config's aspect mode.
    pub fn image_preprocessor(&self) -> Result<ImagePreprocessor> {
        let aspect = self.config.image_aspect_ratio;
        match &self.vision_source {
            VisionTowerSource::Folder(folder) if folder.join("preprocessor_config.json").is_file() => {
                ImagePreprocessor::from_files(&folder.join("preprocessor_config.json"), aspect)
            }
            _ => Ok(ImagePreprocessor::new(PreprocessConfig::default(), aspect)),
        }
    }

    /// A loader over the main checkpoint, falling back to the vision tower folder's weights
    /// (which the release loads first and then overrides with the main checkpoint's).
    pub fn weight_loader(&self, kind: Kind, device: Device) -> Result<WeightLoader> {
        let checkpoint = Checkpoint::open_dir(&self.dir)?;
        if let Some(manifest) = &self.prequantized {
            for file in checkpoint.files() {
                let name = file.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                if !manifest.lists(&name) {
                    return Err(Error::Safetensors {
                        path: file.path().to_path_buf(),
                        message: format!("not listed in {MANIFEST_FILE}: the folder's files do not match its manifest"),
                    });
                }
            }
        }
        let mut loader = WeightLoader::new(checkpoint, kind, device);
        if self.prequantized.is_some() {
            loader = loader.exact_forms();
        }
        Ok(match &self.vision_source {
            // A folder with configs only (as `arcana-convert` writes) leaves every tensor to the main checkpoint.
            VisionTowerSource::Folder(folder) if Checkpoint::exists_in(folder) => {
                loader.with_fallback(Checkpoint::open_dir(folder)?, VISION_TOWER_PREFIX, is_unused_clip_part)
            }
            _ => loader,
        })
    }
}

impl ModelFiles {
    /// Bytes of each part's weights in `kind`, from the checkpoint's shapes (nothing is read): the vision
    /// side and embeddings, each decoder layer, norm and lm_head (counting a tied lm_head once more).
    pub fn part_sizes(&self, kind: Kind) -> Result<PartSizes> {
        let n = self.config.num_hidden_layers as usize;
        let bytes = kind.elt_size_in_bytes() as u64;
        let numels = self.weight_loader(kind, Device::Cpu)?.numels();
        let mut sizes = PartSizes { front: 0, layers: vec![0; n], head: 0 };
        for (name, &numel) in &numels {
            let size = numel.max(0) as u64 * bytes;
            let layer = name.strip_prefix("model.layers.").and_then(|r| r.split('.').next()?.parse::<usize>().ok());
            match layer {
                Some(i) if i < n => sizes.layers[i] += size,
                _ if name.starts_with("model.norm.") || name.starts_with("lm_head.") => sizes.head += size,
                _ => sizes.front += size,
            }
        }
        if self.config.tie_word_embeddings && !numels.contains_key("lm_head.weight") {
            sizes.head += numels.get("model.embed_tokens.weight").copied().unwrap_or(0).max(0) as u64 * bytes;
        }
        Ok(sizes)
    }
}

/// Vision tower and projector: pixels to the language model's embedding space.
#[derive(Debug)]
pub struct VisionSide {
    pub tower: VisionTower,
    pub projector: Projector,
}

/// One forward of the vision side, with the intermediate tensors.
pub struct EncodedImages {
    pub vision: VisionOutputs,
    /// `[batch, tokens_per_image, hidden_size]`.
    pub projected: Tensor,
}

impl VisionSide {
    /// The vision side with its linear layers stored as `linears` says.
    pub fn load(files: &ModelFiles, loader: &WeightLoader, linears: LinearStorage) -> Result<Self> {
        let root = loader.root();
        let tower = VisionTower::load(
            &root.pp("model").pp("vision_tower").pp("vision_tower"),
            &files.vision_config,
            &files.config,
            &files.config_path,
            linears,
        )?;
        let projector = Projector::load(&root.pp("model").pp("mm_projector"), &files.config)?;
        Ok(Self { tower, projector })
    }

    /// Loads only the vision side, checking strictly every tensor under its prefixes.
    pub fn load_standalone(dir: &Path, kind: Kind, device: Device) -> Result<(ModelFiles, Self)> {
        let files = ModelFiles::open(dir)?;
        let loader = files.weight_loader(kind, device)?;
        let side = Self::load(&files, &loader, LinearStorage::Dense)?;
        loader.finish_under(&[VISION_TOWER_PREFIX, PROJECTOR_PREFIX])?;
        Ok((files, side))
    }

    pub fn encode(&self, pixel_values: &Tensor) -> Result<EncodedImages> {
        let _guard = tch::no_grad_guard();
        let vision = self.tower.forward(pixel_values)?;
        let projected = self.projector.forward(&vision.features)?;
        Ok(EncodedImages { vision, projected })
    }

    /// The projected features alone (`encode(..).projected`, without the layers nothing reads).
    pub fn project(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.project_in_stages(pixel_values, || {})
    }

    /// `project`, calling `after_clip` between CLIP's layers and the ladder's.
    pub fn project_in_stages(&self, pixel_values: &Tensor, after_clip: impl FnOnce()) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        self.projector.forward(&self.tower.features_in_stages(pixel_values, after_clip)?)
    }
}

/// The vision side's in-place pages in the order an image reads them: CLIP's layers, then the ladder's
/// and the projector, so that only one of the two halves is in memory at a time.
#[derive(Debug, Default)]
struct VisionPages {
    clip: MappedPages,
    rest: MappedPages,
}

impl VisionPages {
    fn of(loader: &WeightLoader) -> Self {
        let clip_prefix = format!("{VISION_TOWER_PREFIX}vision_model.");
        let vision = |name: &str| name.starts_with(VISION_TOWER_PREFIX) || name.starts_with(PROJECTOR_PREFIX);
        Self {
            clip: loader.pages_of(|name| name.starts_with(&clip_prefix)),
            rest: loader.pages_of(|name| vision(name) && !name.starts_with(&clip_prefix)),
        }
    }
}

/// The whole model: vision side and the MM-LoRA Llama.
#[derive(Debug)]
pub struct ArcanaModel {
    pub files: ModelFiles,
    pub vision: VisionSide,
    pub llm: LlamaForCausalLM,
    /// How the weights were stored: as asked, or as a pre-quantized folder holds them.
    pub forms: WeightForms,
    /// The file pages of the vision side's weights read in place: read in for each image and dropped
    /// after it, so that between images (while the decoder prefills and decodes) they hold no memory.
    vision_pages: VisionPages,
    /// The checkpoint files that weights stored in the compute dtype are read from in place. Declared
    /// after every tensor so that it is dropped after them.
    _mappings: Mappings,
}

impl ArcanaModel {
    /// Loads every part; every tensor of the checkpoint must be used.
    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        Self::load_with_progress(dir, kind, device, WeightForms::default(), |_, _| {})
    }

    /// `load`, with the decoder's weights stored as `storage` says, calling
    /// `progress(tensors loaded, tensors in the checkpoint files)` after each tensor.
    pub fn load_with_progress(
        dir: &Path,
        kind: Kind,
        device: Device,
        storage: WeightForms,
        progress: impl Fn(usize, usize) + 'static,
    ) -> Result<Self> {
        let files = ModelFiles::open(dir)?;
        let sites = DecoderSites::single(kind, device, files.config.num_hidden_layers as usize);
        Self::load_on(files, &sites, storage, progress)
    }

    /// Loads every part straight to its site: the vision side beside the embeddings (the front), each
    /// decoder layer on its own, norm and lm_head on the head's.
    pub fn load_on(
        files: ModelFiles,
        sites: &DecoderSites,
        storage: WeightForms,
        progress: impl Fn(usize, usize) + 'static,
    ) -> Result<Self> {
        let storage = match &files.prequantized {
            Some(manifest) => {
                manifest.check_int8_codes(sites.front.kind, sites.front.device, &files.dir)?;
                manifest.forms(storage, &files.dir)?
            }
            None => storage,
        };
        // SAFETY: the mappings go into the model, which drops them after every tensor (field order);
        // no tensor leaves the model without its data being copied (features and logits are computed).
        let loader =
            unsafe { files.weight_loader(sites.front.kind, sites.front.device)?.in_place() }.with_progress(progress);
        let vision = VisionSide::load(&files, &loader, storage.vision)?;
        let vision_pages = VisionPages::of(&loader);
        // Out of memory while the decoder loads, as between images.
        vision_pages.clip.release();
        vision_pages.rest.release();
        let llm = LlamaForCausalLM::load_on(&loader.root(), &files.config, sites, storage)?;
        let mappings = loader.finish()?;
        crate::weights::release_free_heap();
        Ok(Self { files, vision, llm, forms: storage, vision_pages, _mappings: mappings })
    }

    /// The dtype and device of the front: embeddings and vision side (for a split model, the decoder's
    /// other parts are in `self.llm.model.sites`).
    pub fn kind_and_device(&self) -> (Kind, Device) {
        (self.llm.model.embed_tokens.kind(), self.llm.model.embed_tokens.device())
    }

    /// The model folder's parsed files: config, generation config, vision tower.
    pub fn files(&self) -> &ModelFiles {
        &self.files
    }

    /// The decoder's projection weights and lm_head, in their stored forms.
    pub fn base_weights(&self) -> impl Iterator<Item = &BaseWeight> {
        self.llm.base_weights()
    }

    /// Positions the decoder can attend over (prompt, image features and new tokens together).
    pub fn context_length(&self) -> i64 {
        self.files.config.max_position_embeddings
    }

    /// An empty KV cache for `batch` rows and room for `capacity` positions.
    pub fn new_cache(&self, batch: i64, capacity: i64) -> Result<KvCache> {
        self.llm.model.new_cache(batch, capacity)
    }

    /// The language model's input for `input_ids` (`[B, T]`, -200 = image, right-padded with
    /// `attention_mask`) and the images `[N, 3, S, S]` (or one `[3, S, S]`), one per placeholder: the
    /// release's splice. Pixels are cast to the model's dtype and device, as the release's CLI does.
    pub fn prepare_inputs(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        pixel_values: Option<&Tensor>,
    ) -> Result<Spliced> {
        let features = pixel_values.map(|p| self.image_features(p)).transpose()?;
        self.splice(input_ids, attention_mask, features.as_ref())
    }

    /// The projected features `[N, tokens_per_image, hidden]` of images `[N, 3, S, S]` (or one
    /// `[3, S, S]`), cast to the model's dtype and device first, as the release's CLI does.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let p = if pixel_values.dim() == 3 { pixel_values.f_unsqueeze(0)? } else { pixel_values.shallow_clone() };
        let (kind, device) = self.kind_and_device();
        let p = p.f_to_kind(kind)?.f_to_device(device)?;
        let pages = &self.vision_pages;
        pages.clip.populate();
        let features = self.vision.project_in_stages(&p, || {
            pages.clip.release();
            pages.rest.populate();
        });
        // Both again: when CLIP fails, the closure has not run and its pages are still in.
        pages.clip.release();
        pages.rest.release();
        features
    }

    /// Bytes of the vision side's weights that are read from the checkpoint's file for each image and
    /// leave the process's memory after it (those read in place; copies stay).
    pub fn vision_bytes_read_per_image(&self) -> usize {
        self.vision_pages.clip.bytes() + self.vision_pages.rest.bytes()
    }

    /// [`Self::prepare_inputs`] with the images' features already computed.
    pub fn splice(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        features: Option<&Tensor>,
    ) -> Result<Spliced> {
        prepare_inputs(
            &self.llm.model,
            input_ids,
            attention_mask,
            features,
            self.files.config.tokenizer_model_max_length,
        )
    }

    /// The prompt positions [`Self::prepare_inputs`] gives `ids` with one image per placeholder, before
    /// any image is encoded.
    pub fn prompt_positions(&self, ids: &[i64]) -> i64 {
        spliced_length(ids, self.vision.tower.tokens_per_image(), self.files.config.tokenizer_model_max_length)
    }

    /// One forward over every prompt position, as the release's `forward`: positions `0..L-1` in every
    /// row, the visual mask of `policy`, the spliced padding mask. `keep_layers` keeps each layer's output.
    pub fn prefill(&self, inputs: &Spliced, policy: MaskPolicy, keep_layers: bool) -> Result<CausalLmOutput> {
        let s = inputs.inputs_embeds.size();
        let (b, l) = (s[0], s[1]);
        let device = inputs.inputs_embeds.device();
        let positions = Tensor::f_arange(l, (Kind::Int64, device))?.f_unsqueeze(0)?.f_expand([b, l], false)?;
        let visual = prefill_visual_mask(policy, &inputs.image_spans, l, device)?;
        let step =
            StepInputs { position_ids: &positions, attention_mask: Some(&inputs.attention_mask), visual: &visual };
        self.llm.forward(&inputs.inputs_embeds, &step, None, keep_layers)
    }

    /// Whether `policy` and the release's mask give different prefills for these inputs.
    pub fn mask_policies_differ(inputs: &Spliced) -> bool {
        policies_differ(&inputs.image_spans, inputs.inputs_embeds.size()[1])
    }

    pub fn generation_config(&self) -> &GenerationConfig {
        &self.files.generation
    }

    /// The decoding loop on `inputs` with this model's generation config; see [`crate::generate`].
    pub fn decode(
        &self,
        inputs: &Spliced,
        chooser: TokenChooser,
        policy: MaskPolicy,
        max_new_tokens: usize,
        stepping: Stepping,
        on_step: impl FnMut(&[i64]) -> Flow,
    ) -> Result<Decoded> {
        let options = DecodeOptions { generation: self.generation_config(), chooser, policy, max_new_tokens };
        decode(&self.llm, inputs, &options, stepping, on_step)
    }

    /// A decoding's first step on `inputs`, filling `cache`; see [`crate::generate::prefill`].
    pub fn first_step(&self, inputs: &Spliced, policy: MaskPolicy, cache: &mut KvCache) -> Result<Prefilled> {
        prefill(&self.llm, inputs, policy, Some(cache))
    }

    /// The next part of one row's first step, after the positions `cache` holds: a chunk of `chunk`
    /// positions, or the rest; see [`crate::generate::prefill_next`].
    pub fn prefill_next(
        &self,
        inputs: &Spliced,
        policy: MaskPolicy,
        cache: &mut KvCache,
        chunk: Option<i64>,
    ) -> Result<Option<Prefilled>> {
        prefill_next(&self.llm, inputs, policy, cache, chunk)
    }

    /// A cached step of one token per row; see [`crate::generate::token_step`].
    pub fn token_step(&self, tokens: &[i64], mask: &Tensor, visual: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        token_step(&self.llm, tokens, mask, visual, cache)
    }

    /// Greedy ids `[B, 1 + n]` as the release's `generate(do_sample=False)`, with a fresh cache sized
    /// for the prompt and every new token.
    pub fn generate_greedy(&self, inputs: &Spliced, policy: MaskPolicy, max_new_tokens: usize) -> Result<Tensor> {
        let s = inputs.inputs_embeds.size();
        let mut cache = self.new_cache(s[0], s[1] + max_new_tokens as i64)?;
        let decoded =
            self.decode(inputs, TokenChooser::GREEDY, policy, max_new_tokens, Stepping::Cached(&mut cache), |_| {
                Flow::Continue
            })?;
        decoded.ids_tensor()
    }
}
