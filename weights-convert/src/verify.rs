//! Reloads a written folder and checks every tensor against what the conversion computes from its
//! source, bit for bit, and its sha256.
use crate::output::{hex, ManifestEntry, Outputs, MANIFEST};
use anyhow::{anyhow, bail, Context, Result};
use arcana::weights::Checkpoint;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use tch::Device;

pub fn verify(dir: &Path, outputs: &dyn Outputs, stop: &AtomicBool) -> Result<usize> {
    let written = Checkpoint::open_dir(dir)?;
    let manifest_path = dir.join(MANIFEST);
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest_path)?)?;
    let entries: Vec<ManifestEntry> = serde_json::from_value(manifest["tensors"].clone())
        .with_context(|| format!("{}: malformed manifest", manifest_path.display()))?;
    let by_name: BTreeMap<&str, &ManifestEntry> = entries.iter().map(|e| (e.name.as_str(), e)).collect();
    let planned = outputs.planned();
    if let Some(extra) = written.names().find(|n| !planned.contains_key(*n)) {
        bail!("verify: output holds `{extra}`, which the conversion does not write");
    }
    for (name, plan) in planned {
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        if !written.contains(name) {
            bail!("verify: `{name}` is missing from the output");
        }
        let file = written.file_of(name);
        let ours = file.load_as_stored(name, Device::Cpu)?;
        let expected = outputs.produce(name)?;
        if ours.size() != expected.size() || ours.kind() != expected.kind() || !ours.f_equal(&expected)? {
            bail!("verify: `{name}` in {} differs from its source {}", file.path().display(), plan.from.display());
        }
        let digest = file.with_raw(name, |raw| hex(&Sha256::digest(raw))).expect("present");
        let entry = by_name.get(name.as_str()).ok_or_else(|| anyhow!("verify: `{name}` is not in the manifest"))?;
        if digest != entry.sha256 {
            bail!("verify: `{name}` does not match its sha256 in the manifest");
        }
    }
    Ok(planned.len())
}
