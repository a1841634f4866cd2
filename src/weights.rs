//! Strict weight loading from safetensors files and sharded folders.
//!
//! Files are memory-mapped. By default each tensor is copied into a libtorch tensor of the requested
//! dtype, then its pages are dropped from the mapping, so loading peaks near the size of the loaded
//! weights. A loader told to load in place hands out CPU tensors stored in the requested dtype as views
//! of the mapping (no copy; the pages are shared with the page cache), which the model then keeps
//! mapped. Every tensor
//! must be asked for by the model with its exact shape, and every tensor in the files must be used:
//! `WeightLoader::finish` reports the first one left over. Errors name the tensor and the file.
use crate::error::{Error, Result};
use memmap2::{Advice, MmapMut, MmapOptions, UncheckedAdvice};
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Display;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

pub const SINGLE_FILE: &str = "model.safetensors";
/// The alignment of libtorch's CPU allocations (c10's `gAlignment`), which in-place views must have.
pub const TENSOR_ALIGNMENT: usize = 64;
pub const SHARD_INDEX: &str = "model.safetensors.index.json";
pub const TORCH_SINGLE_FILE: &str = "pytorch_model.bin";
pub const TORCH_SHARD_INDEX: &str = "pytorch_model.bin.index.json";
/// The projector that pretraining saves alone.
pub const PROJECTOR_FILE: &str = "mm_projector.bin";
/// The files of LoRA training output beside the PEFT adapter.
pub const NON_LORA_FILE: &str = "non_lora_trainables.bin";
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";

/// The forms of the folders that the release's `load_pretrained_model` (arcana/model/builder.py)
/// loads, told apart by their files as it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FolderForm {
    /// LoRA training output (a PEFT adapter and `non_lora_trainables.bin`): loaded over a base model.
    LoraTrainingOutput,
    /// `model.safetensors` or its shard index.
    Safetensors,
    /// `pytorch_model.bin` or its shard index.
    PytorchBin,
    /// `mm_projector.bin` alone (pretraining output): loaded over a base model.
    ProjectorOnly,
    /// None of these files.
    NoWeights,
}

impl FolderForm {
    pub fn of(dir: &Path) -> Self {
        let has = |name: &str| dir.join(name).is_file();
        if has(ADAPTER_CONFIG_FILE) || has(NON_LORA_FILE) {
            FolderForm::LoraTrainingOutput
        } else if Checkpoint::exists_in(dir) {
            FolderForm::Safetensors
        } else if has(TORCH_SHARD_INDEX) || has(TORCH_SINGLE_FILE) {
            FolderForm::PytorchBin
        } else if has(PROJECTOR_FILE) {
            FolderForm::ProjectorOnly
        } else {
            FolderForm::NoWeights
        }
    }

    /// Whether `dir` holds a whole checkpoint, in safetensors or PyTorch files, whatever else it holds.
    pub fn has_checkpoint(dir: &Path) -> bool {
        Checkpoint::exists_in(dir) || [TORCH_SHARD_INDEX, TORCH_SINGLE_FILE].iter().any(|name| dir.join(name).is_file())
    }

    /// What to do with a folder of this form, for the error that it holds no safetensors checkpoint.
    fn conversion_hint(self) -> Option<&'static str> {
        match self {
            FolderForm::Safetensors | FolderForm::NoWeights => None,
            FolderForm::PytorchBin => {
                Some("it holds a PyTorch checkpoint; convert it with `arcana-convert --input DIR --output NEW_DIR`")
            }
            FolderForm::LoraTrainingOutput | FolderForm::ProjectorOnly => Some(
                "it holds training output that loads over its base model; pass `--model-base BASE`, or convert it \
                 with `arcana-convert --input DIR --model-base BASE --output NEW_DIR`",
            ),
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    dtype: Dtype,
    shape: Vec<i64>,
    /// Byte range inside the mapped file.
    start: usize,
    end: usize,
}

/// Called with (tensors loaded, tensors to load).
type ProgressReport = Box<dyn Fn(usize, usize)>;

/// One memory-mapped, validated safetensors file.
pub struct TensorFile {
    path: PathBuf,
    /// Private (copy-on-write) so that a stray write into an in-place tensor never reaches the file.
    mmap: Arc<MmapMut>,
    entries: HashMap<String, Entry>,
    metadata: HashMap<String, String>,
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is private; a file truncated by another process while mapped is outside
        // what this loader can defend against (as for every mmap-based loader).
        let mmap = Arc::new(unsafe { MmapOptions::new().map_copy(&file) }.map_err(|e| Error::io(path, e))?);
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| safetensors_error(path, mmap.len(), e))?;
        let data_start = 8 + header_len;
        let file_metadata = metadata.metadata().clone().unwrap_or_default();
        let mut entries = HashMap::new();
        for (name, info) in metadata.tensors() {
            let shape = info.shape.iter().map(|&d| d as i64).collect();
            let (start, end) = info.data_offsets;
            entries.insert(name, Entry { dtype: info.dtype, shape, start: data_start + start, end: data_start + end });
        }
        Ok(Self { path: path.to_path_buf(), mmap, entries, metadata: file_metadata })
    }

    /// `name` as a view of the mapping when it is stored as `kind` and suitably aligned; none otherwise.
    /// With `prefetch` its pages are faulted in now, so the first forward does not pay for them.
    ///
    /// # Safety
    /// The tensor reads the mapping: `self.mapping()` must outlive it and every tensor sharing its data.
    unsafe fn load_in_place(&self, name: &str, kind: Kind, prefetch: bool) -> Option<Tensor> {
        let entry = self.entries.get(name)?;
        let stored = stored_kind(entry.dtype)?;
        let bytes = &self.mmap[entry.start..entry.end];
        // libtorch's allocator aligns every tensor to 64 bytes, and MKL's kernels can sum in another
        // order on data aligned otherwise (a one-row product gave other low bits on an 8-byte-aligned
        // view): only views as aligned as a copy would be compute what a copy computes.
        if stored != kind || bytes.as_ptr().align_offset(TENSOR_ALIGNMENT) != 0 || bytes.is_empty() {
            return None;
        }
        if prefetch {
            let _ = self.mmap.advise_range(Advice::PopulateRead, entry.start, entry.end - entry.start);
        }
        let strides = contiguous_strides(&entry.shape);
        Tensor::f_from_blob(bytes.as_ptr(), &entry.shape, &strides, kind, Device::Cpu).ok()
    }

    fn mapping(&self) -> Arc<MmapMut> {
        Arc::clone(&self.mmap)
    }

    /// The bytes of `name` in the mapping, as a range of it.
    fn mapped_range(&self, name: &str) -> Option<MappedRange> {
        let entry = self.entries.get(name)?;
        Some(MappedRange { mmap: self.mapping(), start: entry.start, len: entry.end - entry.start })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The header's `__metadata__` strings (empty when the file has none).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn shape(&self, name: &str) -> Option<&[i64]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// The stored dtype of a tensor.
    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        self.entries.get(name).map(|e| e.dtype)
    }

    /// Runs `f` on a tensor's raw little-endian bytes, read in place, then drops their pages from the
    /// mapping so that reading a whole file does not keep it resident.
    pub fn with_raw<R>(&self, name: &str, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let entry = self.entries.get(name)?;
        let result = f(&self.mmap[entry.start..entry.end]);
        self.release(entry);
        Some(result)
    }

    fn release(&self, entry: &Entry) {
        // SAFETY: no reference into this byte range outlives the caller's use of it, and a later read
        // of the range faults the pages in again from the file.
        unsafe {
            let _ = self.mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, entry.start, entry.end - entry.start);
        }
    }

    /// The stored dtype's name as safetensors spells it (F32, F16, BF16, ...).
    pub fn dtype_name(&self, name: &str) -> Option<String> {
        self.entries.get(name).map(|e| format!("{:?}", e.dtype))
    }

    /// Copies one tensor out of the mapping, converted to `kind` on `device`.
    pub fn load(&self, name: &str, kind: Kind, device: Device) -> Result<Tensor> {
        self.load_with(name, |_| kind, device)
    }

    /// Copies one tensor out of the mapping in the dtype it is stored in.
    pub fn load_as_stored(&self, name: &str, device: Device) -> Result<Tensor> {
        self.load_with(name, |stored| stored, device)
    }

    fn load_with(&self, name: &str, kind_for: impl Fn(Kind) -> Kind, device: Device) -> Result<Tensor> {
        let entry = self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            looked_in: self.path.display().to_string(),
        })?;
        let unsupported = || Error::UnsupportedDtype {
            path: self.path.clone(),
            name: name.to_string(),
            dtype: format!("{:?}", entry.dtype),
        };
        let stored = stored_kind(entry.dtype).ok_or_else(unsupported)?;
        let kind = kind_for(stored);
        if is_float(stored) != is_float(kind) {
            return Err(unsupported());
        }
        let bytes = &self.mmap[entry.start..entry.end];
        let tensor = Tensor::f_from_data_size(bytes, &entry.shape, stored)?;
        let tensor = if stored == kind { tensor } else { tensor.f_to_kind(kind)? };
        let tensor = tensor.f_to_device(device)?;
        self.release(entry);
        Ok(tensor)
    }
}

fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

fn is_float(kind: Kind) -> bool {
    matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double)
}

/// The libtorch kind of a stored dtype; dtypes without one are refused by name.
pub fn stored_kind(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::F16 => Some(Kind::Half),
        Dtype::BF16 => Some(Kind::BFloat16),
        Dtype::F64 => Some(Kind::Double),
        Dtype::I64 => Some(Kind::Int64),
        Dtype::I32 => Some(Kind::Int),
        Dtype::I16 => Some(Kind::Int16),
        Dtype::I8 => Some(Kind::Int8),
        Dtype::U8 => Some(Kind::Uint8),
        Dtype::BOOL => Some(Kind::Bool),
        _ => None,
    }
}

fn safetensors_error(path: &Path, file_len: usize, error: SafeTensorError) -> Error {
    let message = match error {
        SafeTensorError::HeaderTooSmall => format!("file is {file_len} bytes, too short for a header (truncated?)"),
        SafeTensorError::InvalidHeaderLength => {
            "header length points past the end of the file (truncated?)".to_string()
        }
        SafeTensorError::MetadataIncompleteBuffer => format!(
            "the header's tensor offsets do not end at the file's end ({file_len} bytes): truncated or trailing data"
        ),
        SafeTensorError::InvalidOffset(name) => {
            format!("tensor `{name}` has offsets that overlap, leave a gap or run out of order")
        }
        SafeTensorError::TensorInvalidInfo => "a tensor's byte range does not match its shape and dtype".to_string(),
        SafeTensorError::InvalidHeaderDeserialization => "header is not valid safetensors JSON".to_string(),
        other => format!("{other:?}"),
    };
    Error::Safetensors { path: path.to_path_buf(), message }
}

/// The tensors of one checkpoint: a single file or shards listed by an index.
pub struct Checkpoint {
    files: Vec<TensorFile>,
    /// Tensor name to index in `files`.
    owner: BTreeMap<String, usize>,
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Whether `dir` holds a safetensors checkpoint.
    pub fn exists_in(dir: &Path) -> bool {
        dir.join(SHARD_INDEX).is_file() || dir.join(SINGLE_FILE).is_file()
    }

    /// Opens `model.safetensors`, or the shards named by `model.safetensors.index.json`, in `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join(SHARD_INDEX);
        if index_path.is_file() {
            return Self::open_index(&index_path);
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::from_files(vec![TensorFile::open(&single)?]);
        }
        let hint = FolderForm::of(dir).conversion_hint().map(|h| format!(": {h}")).unwrap_or_default();
        Err(Error::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no {SINGLE_FILE} or {SHARD_INDEX} in this folder{hint}"),
            ),
        })
    }

    pub fn open_index(index_path: &Path) -> Result<Self> {
        let index: ShardIndex = crate::config::read_json(index_path)?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let shard_names: BTreeSet<&String> = index.weight_map.values().collect();
        let mut files = Vec::new();
        let mut file_of_shard = HashMap::new();
        for shard in shard_names {
            let path = dir.join(shard);
            if !path.is_file() {
                return Err(Error::ShardIndex {
                    path: index_path.to_path_buf(),
                    message: format!("names shard `{shard}`, which does not exist ({})", path.display()),
                });
            }
            file_of_shard.insert(shard.clone(), files.len());
            files.push(TensorFile::open(&path)?);
        }
        // The index and the shards must agree tensor for tensor.
        for (name, shard) in &index.weight_map {
            let file = &files[file_of_shard[shard]];
            if file.shape(name).is_none() {
                return Err(Error::ShardIndex {
                    path: index_path.to_path_buf(),
                    message: format!("maps tensor `{name}` to `{shard}`, which does not contain it"),
                });
            }
        }
        let checkpoint = Self::from_files(files)?;
        if let Some(name) = checkpoint.owner.keys().find(|n| !index.weight_map.contains_key(*n)) {
            return Err(Error::ShardIndex {
                path: index_path.to_path_buf(),
                message: format!(
                    "tensor `{name}` in {} is not listed in the index",
                    checkpoint.file_of(name).path.display()
                ),
            });
        }
        Ok(checkpoint)
    }

    pub fn from_files(files: Vec<TensorFile>) -> Result<Self> {
        let mut owner = BTreeMap::new();
        for (i, file) in files.iter().enumerate() {
            for name in file.names() {
                if let Some(previous) = owner.insert(name.to_string(), i) {
                    return Err(Error::Safetensors {
                        path: file.path.clone(),
                        message: format!(
                            "tensor `{name}` is also in {}: a tensor must live in one shard",
                            files[previous].path.display()
                        ),
                    });
                }
            }
        }
        Ok(Self { files, owner })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.owner.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.owner.contains_key(name)
    }

    pub fn shape(&self, name: &str) -> Option<&[i64]> {
        self.owner.get(name).and_then(|&i| self.files[i].shape(name))
    }

    pub fn file_of(&self, name: &str) -> &TensorFile {
        &self.files[self.owner[name]]
    }

    pub fn files(&self) -> &[TensorFile] {
        &self.files
    }

    /// Where to look, for error messages: the folder of the files.
    fn describe(&self) -> String {
        match self.files.as_slice() {
            [one] => one.path.display().to_string(),
            many => format!(
                "{} shards in {}",
                many.len(),
                many.first().and_then(|f| f.path.parent()).map(|p| p.display().to_string()).unwrap_or_default()
            ),
        }
    }
}

/// Buffers that PyTorch recomputes at construction and older checkpoints still carry.
pub fn is_derived_buffer(name: &str) -> bool {
    name.ends_with("embeddings.position_ids") || name.ends_with("rotary_emb.inv_freq")
}

/// A checkpoint whose tensor names get a prefix when the model asks for them (the vision tower
/// folder holds `vision_model.*`, which the model knows as `model.vision_tower.vision_tower.vision_model.*`).
struct Source {
    checkpoint: Checkpoint,
    prefix: String,
    /// Names under the prefix that the model need not use (e.g. a full CLIP model's text tower).
    ignorable: fn(&str) -> bool,
}

/// Hands tensors to a model being built, in the compute dtype and device, and checks that the
/// model's parameters and the checkpoints match exactly.
pub struct WeightLoader {
    sources: Vec<Source>,
    kind: Kind,
    device: Device,
    /// Model-side names already handed out.
    used: RefCell<BTreeSet<String>>,
    /// Bytes of the tensors handed out, in the compute dtype.
    loaded_bytes: std::cell::Cell<u64>,
    /// Told (tensors loaded, distinct usable tensors in the sources) after each tensor.
    progress: Option<(ProgressReport, usize)>,
    /// Hand out views of the mappings where the stored dtype is the compute dtype on the CPU.
    in_place: bool,
    /// The mappings that in-place tensors read.
    mapped: RefCell<Vec<Arc<MmapMut>>>,
    /// Each in-place tensor's model-side name and bytes.
    in_place_ranges: RefCell<Vec<(String, MappedRange)>>,
    /// Refuse to widen half-precision tensors (a pre-quantized folder stores each tensor as it is used).
    exact_forms: bool,
}

/// The file mappings that tensors loaded in place read from: to be dropped after every such tensor.
#[derive(Default)]
pub struct Mappings(Vec<Arc<MmapMut>>);

impl std::fmt::Debug for Mappings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mappings({} files)", self.0.len())
    }
}

/// Bytes of a private, read-only file mapping that in-place tensors read.
#[derive(Clone)]
struct MappedRange {
    mmap: Arc<MmapMut>,
    start: usize,
    len: usize,
}

/// The file pages of some in-place tensors, which can leave the process between uses: weights read
/// only now and then (the vision side, once per image) then hold no memory of their own between
/// reads; the kernel's page cache keeps the file, so reading them again costs no disk read unless
/// the system needed that memory meanwhile.
#[derive(Default)]
pub struct MappedPages(Vec<MappedRange>);

impl std::fmt::Debug for MappedPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedPages({} bytes)", self.bytes())
    }
}

impl MappedPages {
    pub fn bytes(&self) -> usize {
        self.0.iter().map(|r| r.len).sum()
    }

    /// Reads the pages in now, one request per tensor (instead of a fault per few pages at first use).
    pub fn populate(&self) {
        for r in &self.0 {
            let _ = r.mmap.advise_range(Advice::PopulateRead, r.start, r.len);
        }
    }

    /// Drops the pages from the process; the next read faults them in again from the file.
    pub fn release(&self) {
        for r in &self.0 {
            // SAFETY: the mapping is private and these tensors are weights, never written: dropped
            // pages read back the file's bytes, which are the tensors' values.
            unsafe {
                let _ = r.mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, r.start, r.len);
            }
        }
    }
}

impl WeightLoader {
    pub fn new(checkpoint: Checkpoint, kind: Kind, device: Device) -> Self {
        Self {
            sources: vec![Source { checkpoint, prefix: String::new(), ignorable: is_derived_buffer }],
            kind,
            device,
            used: RefCell::new(BTreeSet::new()),
            loaded_bytes: std::cell::Cell::new(0),
            progress: None,
            in_place: false,
            mapped: RefCell::new(Vec::new()),
            in_place_ranges: RefCell::new(Vec::new()),
            exact_forms: false,
        }
    }

    /// Refuses a half-precision tensor asked for in fp32: a pre-quantized folder writes every tensor in
    /// the form the model reads, so such a tensor means a folder and a model that disagree, which must
    /// not silently lose precision.
    pub fn exact_forms(mut self) -> Self {
        self.exact_forms = true;
        self
    }

    /// Loads CPU tensors stored in the compute dtype as views of the file mappings (no copy), except
    /// those asked for with [`Weights::get_transient`].
    ///
    /// # Safety
    /// Those tensors read the mappings: keep the [`Mappings`] that `finish` returns alive longer than
    /// every tensor from this loader (and every tensor sharing their data).
    pub unsafe fn in_place(mut self) -> Self {
        self.in_place = true;
        self
    }

    /// The pages of the tensors handed out in place so far whose names `select` picks (they read
    /// mappings that [`Self::finish`] hands on, so the pages stay valid as long as the tensors).
    pub fn pages_of(&self, select: impl Fn(&str) -> bool) -> MappedPages {
        let ranges = self
            .in_place_ranges
            .borrow()
            .iter()
            .filter(|(name, _)| select(name))
            .map(|(_, range)| range.clone())
            .collect();
        MappedPages(ranges)
    }

    /// Adds a fallback checkpoint consulted after the earlier ones, its names prefixed by `prefix`.
    /// Earlier sources win, as the release lets the main checkpoint override the vision tower folder.
    pub fn with_fallback(mut self, checkpoint: Checkpoint, prefix: &str, ignorable: fn(&str) -> bool) -> Self {
        self.sources.push(Source { checkpoint, prefix: prefix.to_string(), ignorable });
        self
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Calls `report(loaded, total)` after each tensor; `total` counts the distinct tensors the sources offer.
    pub fn with_progress(mut self, report: impl Fn(usize, usize) + 'static) -> Self {
        let names: BTreeSet<String> = self
            .sources
            .iter()
            .flat_map(|s| s.checkpoint.names().filter(|n| !(s.ignorable)(n)).map(move |n| format!("{}{}", s.prefix, n)))
            .collect();
        self.progress = Some((Box::new(report), names.len()));
        self
    }

    /// Bytes of the tensors loaded so far, in the compute dtype.
    pub fn loaded_bytes(&self) -> u64 {
        self.loaded_bytes.get()
    }

    pub fn root(&self) -> Weights<'_> {
        Weights { loader: self, prefix: String::new(), site: None }
    }

    /// Model-side names and element counts of every tensor the sources offer (an earlier source's tensor
    /// hides a later one of the same name), before any is loaded: what the placement planner sizes.
    pub fn numels(&self) -> BTreeMap<String, i64> {
        let mut numels = BTreeMap::new();
        for source in &self.sources {
            for local in source.checkpoint.names().filter(|n| !(source.ignorable)(n)) {
                let numel = source.checkpoint.shape(local).map_or(0, |s| s.iter().product());
                numels.entry(format!("{}{}", source.prefix, local)).or_insert(numel);
            }
        }
        numels
    }

    fn find<'n>(&self, name: &'n str) -> Option<(&Source, &'n str)> {
        self.sources.iter().find_map(|source| {
            let local = name.strip_prefix(source.prefix.as_str())?;
            source.checkpoint.contains(local).then_some((source, local))
        })
    }

    fn describe_sources(&self) -> String {
        self.sources.iter().map(|s| s.checkpoint.describe()).collect::<Vec<_>>().join(", then ")
    }

    fn missing(&self, name: &str) -> Error {
        Error::MissingTensor { name: name.to_string(), looked_in: self.describe_sources() }
    }

    fn shape_of(&self, name: &str) -> Result<Vec<i64>> {
        let (source, local) = self.find(name).ok_or_else(|| self.missing(name))?;
        Ok(source.checkpoint.shape(local).expect("found above").to_vec())
    }

    fn load(
        &self,
        name: &str,
        expected: Option<&[i64]>,
        kind: Kind,
        device: Device,
        residency: Residency,
    ) -> Result<Tensor> {
        let (source, local) = self.find(name).ok_or_else(|| self.missing(name))?;
        let file = source.checkpoint.file_of(local);
        let found = file.shape(local).expect("found above");
        if let Some(expected) = expected {
            if found != expected {
                return Err(Error::ShapeMismatch {
                    path: file.path.clone(),
                    name: local.to_string(),
                    expected: expected.to_vec(),
                    found: found.to_vec(),
                });
            }
        }
        let dtype = file.dtype(local).expect("found above");
        let half = matches!(stored_kind(dtype), Some(Kind::Half | Kind::BFloat16));
        if self.exact_forms && half && matches!(kind, Kind::Float | Kind::Double) {
            return Err(Error::UnsupportedDtype {
                path: file.path.clone(),
                name: local.to_string(),
                dtype: format!(
                    "{dtype:?}, where the model reads {kind:?}: this pre-quantized folder does not fit this version's \
                     model; convert the source again"
                ),
            });
        }
        // SAFETY: the mapping is recorded here and handed to the caller by `finish`, who keeps it alive
        // longer than the tensors (the contract of `in_place`).
        let in_place = self.in_place && residency != Residency::Transient && device == Device::Cpu;
        let prefetch = residency == Residency::Prefetched;
        let in_place = if in_place { unsafe { file.load_in_place(local, kind, prefetch) } } else { None };
        let tensor = match in_place {
            Some(tensor) => {
                let mut mapped = self.mapped.borrow_mut();
                if !mapped.iter().any(|m| Arc::ptr_eq(m, &file.mmap)) {
                    mapped.push(file.mapping());
                }
                if let Some(range) = file.mapped_range(local) {
                    self.in_place_ranges.borrow_mut().push((name.to_string(), range));
                }
                tensor
            }
            None => file.load(local, kind, device)?,
        };
        self.used.borrow_mut().insert(name.to_string());
        let bytes = tensor.numel() * kind.elt_size_in_bytes();
        self.loaded_bytes.set(self.loaded_bytes.get() + bytes as u64);
        if let Some((report, total)) = &self.progress {
            report(self.used.borrow().len(), *total);
        }
        Ok(tensor)
    }

    /// Checks that every tensor of every source was used (or overridden by an earlier source); returns
    /// the mappings that in-place tensors read (none unless loading in place).
    pub fn finish(self) -> Result<Mappings> {
        self.finish_under(&[""])
    }

    /// Like `finish`, for a model built in part: only names starting with one of `prefixes` must be used.
    pub fn finish_under(self, prefixes: &[&str]) -> Result<Mappings> {
        let used = self.used.into_inner();
        for (position, source) in self.sources.iter().enumerate() {
            for local in source.checkpoint.names() {
                let name = format!("{}{}", source.prefix, local);
                if used.contains(&name) || (source.ignorable)(local) || !prefixes.iter().any(|p| name.starts_with(p)) {
                    continue;
                }
                // Present in an earlier source as well: overridden there, as the release does.
                let shadowed = self.sources[..position]
                    .iter()
                    .any(|s| name.strip_prefix(s.prefix.as_str()).is_some_and(|l| s.checkpoint.contains(l)));
                if shadowed {
                    continue;
                }
                return Err(Error::UnexpectedTensor {
                    path: source.checkpoint.file_of(local).path.clone(),
                    name: local.to_string(),
                });
            }
        }
        Ok(Mappings(self.mapped.into_inner()))
    }
}

/// How a tensor loaded in place stays in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Residency {
    /// A view of the mapping, its pages read at load.
    Prefetched,
    /// A view of the mapping, its pages read on first use.
    Lazy,
    /// A copy, its file pages dropped at once.
    Transient,
}

/// A position in the model's parameter tree, named like the PyTorch module path.
#[derive(Clone)]
pub struct Weights<'a> {
    loader: &'a WeightLoader,
    prefix: String,
    /// Dtype and device for the tensors under this prefix, where they differ from the loader's.
    site: Option<(Kind, Device)>,
}

impl<'a> Weights<'a> {
    /// The sub-module `name` (a field name or a layer index).
    pub fn pp(&self, name: impl Display) -> Weights<'a> {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{}", self.prefix, name) };
        Weights { loader: self.loader, prefix, site: self.site }
    }

    /// The same position, its tensors loaded in `kind` on `device` (a decoder layer placed on another device).
    pub fn placed(&self, kind: Kind, device: Device) -> Weights<'a> {
        Weights { loader: self.loader, prefix: self.prefix.clone(), site: Some((kind, device)) }
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// The parameter `name`, which must have exactly `shape`.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        self.loader.load(&self.full_name(name), Some(shape), self.kind(), self.device(), Residency::Prefetched)
    }

    /// `get` for a table read a few rows at a time (token embeddings): loaded in place, its pages are
    /// read when a row is first used instead of all at load.
    pub fn get_sparse(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        self.loader.load(&self.full_name(name), Some(shape), self.kind(), self.device(), Residency::Lazy)
    }

    /// `get`, always as a copy whose file pages are dropped at once: for a tensor that is converted
    /// (quantized, merged) and then dropped, so that its pages do not stay mapped.
    pub fn get_transient(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        self.loader.load(&self.full_name(name), Some(shape), self.kind(), self.device(), Residency::Transient)
    }

    /// `get` in `kind` instead of the compute dtype (a weight kept in another form: fp16 values, int8
    /// codes); in place when the file stores it so.
    pub fn get_as(&self, name: &str, shape: &[i64], kind: Kind) -> Result<Tensor> {
        self.loader.load(&self.full_name(name), Some(shape), kind, self.device(), Residency::Prefetched)
    }

    /// `get_transient` in `kind` (a part that is repacked, then dropped).
    pub fn get_transient_as(&self, name: &str, shape: &[i64], kind: Kind) -> Result<Tensor> {
        self.loader.load(&self.full_name(name), Some(shape), kind, self.device(), Residency::Transient)
    }

    /// The parameter `name` with the shape the checkpoint gives (for sizes the model derives from it).
    pub fn get_any_shape(&self, name: &str) -> Result<Tensor> {
        self.loader.load(&self.full_name(name), None, self.kind(), self.device(), Residency::Prefetched)
    }

    pub fn shape(&self, name: &str) -> Result<Vec<i64>> {
        self.loader.shape_of(&self.full_name(name))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.loader.find(&self.full_name(name)).is_some()
    }

    pub fn kind(&self) -> Kind {
        self.site.map_or(self.loader.kind, |(kind, _)| kind)
    }

    pub fn device(&self) -> Device {
        self.site.map_or(self.loader.device, |(_, device)| device)
    }
}

/// Converting weights at load (quantizing, merging LoRA, packing) frees many temporaries; glibc keeps
/// freed heap memory for reuse unless asked, which counts against the process until it is returned.
/// Called after each decoder layer loads as well as at the end (otherwise a whole decoder's temporaries,
/// about 2 GB of int8 codes at 7B, pile up before the last layer's are packed), and after each layer of
/// a long prefill.
pub(crate) fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused heap pages to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}
