//! A temporary folder beside the target that becomes the target only when everything is written.
use anyhow::{anyhow, Context, Result};
use std::path::{Path, PathBuf};

pub struct Staging {
    path: PathBuf,
    committed: bool,
}

impl Staging {
    pub fn beside(target: &Path) -> Result<Self> {
        let name = target.file_name().ok_or_else(|| anyhow!("{}: not a folder name", target.display()))?;
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
        let path = parent.join(format!(".{}.partial-{}", name.to_string_lossy(), std::process::id()));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path, committed: false })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the staged folder to `target`, replacing an existing one only with `force`.
    pub fn commit(mut self, target: &Path, force: bool) -> Result<()> {
        let old = self.path.with_file_name(format!(
            ".{}.old-{}",
            target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            std::process::id()
        ));
        let replacing = target.exists();
        if replacing {
            if !force {
                return Err(anyhow!("{} appeared while converting; pass --force to replace it", target.display()));
            }
            std::fs::rename(target, &old).with_context(|| format!("moving {} aside", target.display()))?;
        }
        std::fs::rename(&self.path, target).with_context(|| format!("renaming into {}", target.display()))?;
        self.committed = true;
        if replacing {
            std::fs::remove_dir_all(&old).with_context(|| format!("removing the replaced {}", old.display()))?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
