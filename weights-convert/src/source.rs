//! The tensors of a source checkpoint, whatever its form, read one at a time.
use crate::torch_pickle::{read_state_dict, TensorRef};
use anyhow::{anyhow, bail, Context, Result};
use arcana::llm::mmlora::add_low_rank;
use arcana::weights::{stored_kind, TensorFile, SHARD_INDEX, SINGLE_FILE, TORCH_SHARD_INDEX, TORCH_SINGLE_FILE};
use memmap2::Mmap;
use safetensors::Dtype;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// A `torch.save` zip archive, memory-mapped; tensors are views into its stored records.
pub struct TorchArchive {
    path: PathBuf,
    mmap: Mmap,
    /// Record name (`<archive>/data/<key>`) to byte range.
    records: HashMap<String, (usize, usize)>,
    prefix: String,
}

/// The tensors of an archive by name, in file order.
pub type NamedTensorRefs = Vec<(String, TensorRef)>;

impl TorchArchive {
    pub fn open(path: &Path) -> Result<(Arc<Self>, NamedTensorRefs)> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: read-only private mapping of a file this process does not modify.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(&mmap[..])).map_err(|e| {
            anyhow!("{}: not a PyTorch zip archive ({e}); the legacy pre-1.6 format is not supported", path.display())
        })?;
        let mut records = HashMap::new();
        let mut pickle = None;
        for i in 0..zip.len() {
            let (name, compression, start, size) = {
                let entry = zip.by_index_raw(i).with_context(|| format!("{}: zip entry {i}", path.display()))?;
                (entry.name().to_string(), entry.compression(), entry.data_start() as usize, entry.size() as usize)
            };
            if name.ends_with("/data.pkl") {
                let mut bytes = Vec::new();
                zip.by_index(i)?
                    .read_to_end(&mut bytes)
                    .with_context(|| format!("{}: reading {name}", path.display()))?;
                pickle = Some((name.trim_end_matches("data.pkl").to_string(), bytes));
                continue;
            }
            if compression != zip::CompressionMethod::Stored {
                bail!("{}: record `{name}` is compressed; PyTorch archives store records uncompressed", path.display());
            }
            if start + size > mmap.len() {
                bail!("{}: record `{name}` runs past the end of the file (truncated?)", path.display());
            }
            records.insert(name, (start, start + size));
        }
        let (prefix, pickle) = pickle.ok_or_else(|| anyhow!("{}: no data.pkl in the archive", path.display()))?;
        let tensors = read_state_dict(&pickle).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        Ok((Arc::new(Self { path: path.to_path_buf(), mmap, records, prefix }), tensors))
    }

    fn load(&self, name: &str, t: &TensorRef) -> Result<Tensor> {
        let record = format!("{}data/{}", self.prefix, t.storage_key);
        let &(start, end) = self.records.get(&record).ok_or_else(|| {
            anyhow!("{}: tensor `{name}` names storage record `{record}`, which is missing", self.path.display())
        })?;
        let kind = stored_kind(t.dtype)
            .ok_or_else(|| anyhow!("{}: tensor `{name}`: unsupported dtype {:?}", self.path.display(), t.dtype))?;
        let element = kind.elt_size_in_bytes();
        let bytes = &self.mmap[start..end];
        if !bytes.len().is_multiple_of(element) {
            bail!("{}: storage `{record}` is not a whole number of {:?} elements", self.path.display(), t.dtype);
        }
        let storage = Tensor::f_from_data_size(bytes, &[(bytes.len() / element) as i64], kind)?;
        // The view must lie inside the storage before libtorch is asked for it.
        let last = t.offset + t.shape.iter().zip(&t.stride).map(|(n, s)| (n - 1).max(0) * s).sum::<i64>();
        if t.offset < 0 || (t.shape.iter().all(|&n| n > 0) && last >= storage.size()[0]) {
            bail!("{}: tensor `{name}` reaches outside its storage", self.path.display());
        }
        let tensor = storage.f_as_strided(&t.shape, &t.stride, Some(t.offset))?.f_contiguous()?;
        // SAFETY: `tensor` owns a copy; no reference into the range outlives this call, and a later
        // read faults the pages in again from the file.
        unsafe {
            let _ = self.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start);
        }
        Ok(tensor)
    }
}

/// Where one tensor's data comes from.
#[derive(Clone)]
enum Origin {
    Safetensors {
        file: Arc<TensorFile>,
        name: String,
    },
    Torch {
        archive: Arc<TorchArchive>,
        name: String,
        tensor: TensorRef,
    },
    /// Another origin's tensor rounded through a dtype first (the release casts `mm_projector.bin` to fp16).
    RoundedThrough {
        inner: Box<Origin>,
        kind: Kind,
    },
    /// `W + sum(scale * B @ A)` in fp32, rounded once when written.
    Merged {
        base: Box<Origin>,
        deltas: Vec<LowRank>,
    },
}

/// One low-rank update `scale * B @ A` (`A`: `[r, in]`, `B`: `[out, r]`).
#[derive(Clone)]
pub struct LowRank {
    a: Origin,
    b: Origin,
    scale: f64,
}

impl LowRank {
    pub fn new(a: &SourceTensor, b: &SourceTensor, scale: f64) -> Self {
        Self { a: a.origin.clone(), b: b.origin.clone(), scale }
    }
}

impl Origin {
    fn load(&self) -> Result<Tensor> {
        match self {
            Origin::Safetensors { file, name } => Ok(file.load_as_stored(name, Device::Cpu)?),
            Origin::Torch { archive, name, tensor } => archive.load(name, tensor),
            Origin::RoundedThrough { inner, kind } => Ok(inner.load()?.f_to_kind(*kind)?),
            Origin::Merged { base, deltas } => {
                let mut w = base.load()?.f_to_kind(Kind::Float)?;
                for d in deltas {
                    w = add_low_rank(&w, &d.a.load()?, &d.b.load()?, d.scale)?;
                }
                Ok(w)
            }
        }
    }
}

/// One tensor of the converted model.
#[derive(Clone)]
pub struct SourceTensor {
    pub dtype: Dtype,
    pub shape: Vec<i64>,
    /// The file it is read from, for messages.
    pub file: PathBuf,
    origin: Origin,
}

impl SourceTensor {
    pub fn load(&self) -> Result<Tensor> {
        self.origin.load().with_context(|| format!("reading from {}", self.file.display()))
    }

    pub fn rounded_through(mut self, kind: Kind, dtype: Dtype) -> Self {
        self.origin = Origin::RoundedThrough { inner: Box::new(self.origin), kind };
        self.dtype = dtype;
        self
    }

    /// This weight with a low-rank update added (in fp32; the caller has checked the shapes).
    pub fn plus(mut self, delta: LowRank) -> Self {
        match &mut self.origin {
            Origin::Merged { deltas, .. } => deltas.push(delta),
            _ => self.origin = Origin::Merged { base: Box::new(self.origin), deltas: vec![delta] },
        }
        self.dtype = Dtype::F32;
        self
    }
}

/// Tensors by output name; a later `insert` overrides an earlier one (the release's load order).
#[derive(Default)]
pub struct TensorSet {
    pub tensors: BTreeMap<String, SourceTensor>,
}

impl TensorSet {
    /// Adds every tensor of a checkpoint folder or file, names prefixed by `prefix`.
    pub fn add_checkpoint(&mut self, path: &Path, prefix: &str) -> Result<()> {
        for (name, tensor) in read_checkpoint(path)? {
            self.tensors.insert(format!("{prefix}{name}"), tensor);
        }
        Ok(())
    }
}

/// The shard files of a folder (safetensors or PyTorch `.bin`, single or indexed), or one file.
pub fn checkpoint_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    for (index, single) in [(SHARD_INDEX, SINGLE_FILE), (TORCH_SHARD_INDEX, TORCH_SINGLE_FILE)] {
        let index_path = path.join(index);
        if index_path.is_file() {
            let parsed: serde_json::Value = arcana::config::read_json(&index_path)?;
            let map = parsed["weight_map"]
                .as_object()
                .ok_or_else(|| anyhow!("{}: no `weight_map` object", index_path.display()))?;
            let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
            files.sort();
            files.dedup();
            let mut paths = Vec::new();
            for file in files {
                let shard = path.join(&file);
                if !shard.is_file() {
                    bail!("{}: names shard `{file}`, which does not exist", index_path.display());
                }
                paths.push(shard);
            }
            return Ok(paths);
        }
        if path.join(single).is_file() {
            return Ok(vec![path.join(single)]);
        }
    }
    bail!("{}: no {SINGLE_FILE}, {TORCH_SINGLE_FILE} or their shard index", path.display())
}

/// Every tensor of a checkpoint; a tensor present in two shards is an error naming both.
pub fn read_checkpoint(path: &Path) -> Result<Vec<(String, SourceTensor)>> {
    let mut seen: HashMap<String, PathBuf> = HashMap::new();
    let mut out = Vec::new();
    for file in checkpoint_files(path)? {
        let tensors = read_file(&file)?;
        for (name, tensor) in tensors {
            if let Some(previous) = seen.insert(name.clone(), file.clone()) {
                bail!("tensor `{name}` is in both {} and {}", previous.display(), file.display());
            }
            out.push((name, tensor));
        }
    }
    Ok(out)
}

fn read_file(path: &Path) -> Result<Vec<(String, SourceTensor)>> {
    let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
    if is_safetensors {
        let file = Arc::new(TensorFile::open(path)?);
        let mut names: Vec<String> = file.names().map(str::to_string).collect();
        names.sort();
        return names
            .into_iter()
            .map(|name| {
                let dtype = file.dtype(&name).expect("listed");
                if stored_kind(dtype).is_none() {
                    bail!("{}: tensor `{name}` has unsupported dtype {dtype:?}", path.display());
                }
                let tensor = SourceTensor {
                    dtype,
                    shape: file.shape(&name).expect("listed").to_vec(),
                    file: path.to_path_buf(),
                    origin: Origin::Safetensors { file: file.clone(), name: name.clone() },
                };
                Ok((name, tensor))
            })
            .collect();
    }
    let (archive, tensors) = TorchArchive::open(path)?;
    Ok(tensors
        .into_iter()
        .map(|(name, tensor)| {
            let source = SourceTensor {
                dtype: tensor.dtype,
                shape: tensor.shape.clone(),
                file: path.to_path_buf(),
                origin: Origin::Torch { archive: archive.clone(), name: name.clone(), tensor },
            };
            (name, source)
        })
        .collect())
}
