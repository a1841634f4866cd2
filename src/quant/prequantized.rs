//! Pre-quantized folders (`arcana-convert --quantize int8|int4|fp16`): the decoder's projections and
//! lm_head stored in their compact parts ([`super::CompactParts`]), the vision side's linear weights in
//! fp16 when the mode keeps them so, every other tensor in fp32, so that the engine loads each one as
//! it is, memory-mapped, with nothing quantized or merged at start.
//!
//! `arcana-quantized.json` marks such a folder. It names the mode, the arcana version that wrote it
//! (a folder loads only in that version: the parts' layout is this version's), the source checkpoint's
//! files with their sha256, and each written safetensors file with its size and the sha256 of its
//! header, which the loader checks before reading any tensor: a truncated, replaced or rewritten file
//! is refused by name.
use super::{int8_max_code_for, LinearStorage, Quantization, WeightForms};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

pub const MANIFEST_FILE: &str = "arcana-quantized.json";
pub const FORMAT: &str = "arcana-quantized/2";
/// The version of the arcana that writes and reads folders.
pub const ARCANA_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The largest safetensors header read for its digest (safetensors' own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QuantizedManifest {
    pub format: String,
    pub arcana_version: String,
    pub mode: Quantization,
    /// The MM-LoRA language branch was folded into the base weights before quantizing.
    pub merge_lora: bool,
    /// How the vision side's linear weights are stored.
    pub vision_linears: LinearStorage,
    /// The largest int8 code (int8 projections, and int4's int8 lm_head): 63 for fbgemm without AVX-512
    /// VNNI, 127 with it.
    pub int8_max_code: u8,
    pub source: SourceDigests,
    pub files: Vec<WrittenFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SourceDigests {
    /// The folder converted, as given.
    pub path: PathBuf,
    pub files: Vec<FileDigest>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WrittenFile {
    /// File name inside the folder.
    pub name: String,
    pub bytes: u64,
    /// sha256 of the safetensors header (its 8-byte length and the JSON): every tensor's name, dtype,
    /// shape and offsets.
    pub header_sha256: String,
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a whole file, read in blocks.
pub fn file_sha256(path: &Path) -> Result<(u64, String)> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hex(&hasher.finalize())))
}

/// A safetensors file's size and the sha256 of its header.
pub fn written_file(path: &Path) -> Result<WrittenFile> {
    let bad = |message: String| Error::Safetensors { path: path.to_path_buf(), message };
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let bytes = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut length = [0u8; 8];
    file.read_exact(&mut length)
        .map_err(|_| bad(format!("file is {bytes} bytes, too short for a header (truncated?)")))?;
    let header_len = u64::from_le_bytes(length);
    if header_len > MAX_HEADER_BYTES || 8 + header_len > bytes {
        return Err(bad(format!("header length {header_len} does not fit the file's {bytes} bytes (truncated?)")));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    hasher.update(length);
    hasher.update(&header);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(WrittenFile { name, bytes, header_sha256: hex(&hasher.finalize()) })
}

impl QuantizedManifest {
    /// The manifest of `dir`, checked against this version and against the folder's files; `None` for a
    /// folder without one (an ordinary checkpoint).
    pub fn open(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(MANIFEST_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let value: serde_json::Value =
            serde_json::from_slice(&text).map_err(|source| Error::Json { path: path.clone(), source })?;
        let field = |field: &str, message: String| Error::Config { path: path.clone(), field: field.into(), message };
        // Format and version first, so that a folder from another version says so rather than failing
        // on a field it spells otherwise.
        match value.get("format").and_then(|f| f.as_str()) {
            Some(FORMAT) => {}
            Some(other) if other.starts_with("arcana-quantized/") => {
                return Err(field(
                    "format",
                    format!(
                        "{other:?}, expected {FORMAT:?}: the folder's parts are laid out as another arcana \
                         version wrote them; convert its source again with `arcana-convert --quantize`"
                    ),
                ))
            }
            other => {
                return Err(field("format", format!("{other:?}, expected {FORMAT:?}: not a folder this arcana writes")))
            }
        }
        let version = value.get("arcana_version").and_then(|v| v.as_str()).unwrap_or("(none)");
        if version != ARCANA_VERSION {
            return Err(field(
                "arcana_version",
                format!(
                    "the folder was written by arcana {version} and this is arcana {ARCANA_VERSION}; a pre-quantized \
                     folder loads only in the version that wrote it: convert its source again with \
                     `arcana-convert --quantize` (the source's files and digests are in this manifest)"
                ),
            ));
        }
        let manifest: Self =
            serde_path_to_error::deserialize(value).map_err(|e| field(&e.path().to_string(), e.inner().to_string()))?;
        manifest.check_files(dir)?;
        Ok(Some(manifest))
    }

    /// Every written file is there with its recorded size and header.
    fn check_files(&self, dir: &Path) -> Result<()> {
        if self.files.is_empty() {
            return Err(Error::Config {
                path: dir.join(MANIFEST_FILE),
                field: "files".into(),
                message: "lists no files".into(),
            });
        }
        for recorded in &self.files {
            let path = dir.join(&recorded.name);
            let mismatch = |message: String| Error::Safetensors { path: path.clone(), message };
            if Path::new(&recorded.name).components().count() != 1 {
                return Err(mismatch("the manifest names a file outside the folder".into()));
            }
            if !path.is_file() {
                return Err(mismatch(format!("missing: {MANIFEST_FILE} lists it")));
            }
            let found = written_file(&path)?;
            if found.bytes != recorded.bytes {
                return Err(mismatch(format!(
                    "{} bytes where {MANIFEST_FILE} records {} (truncated or replaced); convert the source again",
                    found.bytes, recorded.bytes
                )));
            }
            if found.header_sha256 != recorded.header_sha256 {
                return Err(mismatch(format!(
                    "its header (tensor names, dtypes, shapes, offsets) does not match {MANIFEST_FILE}: the file was \
                     rewritten or comes from another folder; convert the source again"
                )));
            }
        }
        Ok(())
    }

    /// Whether `name` (a safetensors file of the folder's checkpoint) is one this manifest checked.
    pub fn lists(&self, name: &str) -> bool {
        self.files.iter().any(|f| f.name == name)
    }

    /// The forms to load the folder with, given what was asked for: the folder's own mode when none was,
    /// an error naming both when another was (nothing can be converted from quantized weights). The
    /// language branch is merged or not as the folder was written, whatever was asked.
    pub fn forms(&self, requested: WeightForms, dir: &Path) -> Result<WeightForms> {
        let refuse = |message: String| Err(Error::InvalidInput(format!("{}: {message}", dir.display())));
        let mode = self.mode.name();
        match requested.storage {
            Some(asked) if asked != self.mode => {
                return refuse(format!(
                    "a pre-quantized {mode} folder cannot be loaded as {}: drop the weight flag (the folder's mode is \
                     used), or convert the source with `arcana-convert --quantize {}`",
                    asked.name(),
                    asked.name()
                ))
            }
            _ => {}
        }
        Ok(WeightForms {
            storage: Some(self.mode),
            merge_lora: self.merge_lora,
            vision: self.vision_linears,
            prequantized: true,
        })
    }

    /// Checks that the int8 kernel for weights computing in `kind` on `device` can take the folder's
    /// codes (int8 projections, or int4's int8 lm_head).
    pub fn check_int8_codes(&self, kind: Kind, device: Device, dir: &Path) -> Result<()> {
        let limit = int8_max_code_for(kind, device);
        if self.mode.for_lm_head() == Quantization::Int8 && f64::from(self.int8_max_code) > limit {
            return Err(Error::InvalidInput(format!(
                "{}: the folder's int8 codes reach {}, written on a CPU with AVX-512 VNNI; this CPU's int8 kernel \
                 takes codes up to {limit} (larger ones overflow it): convert the source again on this machine, or \
                 with `arcana-convert --int8-portable`",
                dir.display(),
                self.int8_max_code
            )));
        }
        Ok(())
    }
}
