//! Paths, fixtures and the Python environment for integration tests: the root crate's tests reach
//! it through `common`, weights-convert's include this file itself.
#![allow(dead_code)]
use std::path::{Path, PathBuf};

/// The repository root, whichever of its crates' tests include this file.
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.ancestors().find(|dir| dir.join("parity/export.py").is_file());
    root.unwrap_or(manifest).to_path_buf()
}

/// A committed parity fixture: `tests/fixtures/parity/<preset>/` (made by `python parity/export.py fixtures`).
pub fn fixture_dir(preset: &str) -> PathBuf {
    repo_root().join("tests/fixtures/parity").join(preset)
}

/// The project's Python environment (`scripts/setup-python.sh`) when it can import `modules` (a
/// comma-separated list); says why not on stderr otherwise, for the tests that skip without it.
pub fn python_with(modules: &str) -> Option<PathBuf> {
    let venv = std::env::var_os("ARCANA_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/arcana/venv-torch-2.0.1")))?;
    let python = venv.join("bin/python");
    let ok = std::process::Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("skipping: no Python environment with {modules} at {} (run scripts/setup-python.sh)", venv.display());
    }
    ok.then_some(python)
}

/// [`python_with`] torch.
pub fn python_with_torch() -> Option<PathBuf> {
    python_with("torch")
}

/// The CLI fixtures (`python parity/cli_fixtures.py --out DIR`: the cli-tiny checkpoints, images,
/// cases and the Python reference's answers), made once per test binary; `None` without Python.
pub fn cli_fixtures() -> Option<&'static Path> {
    static DIR: std::sync::OnceLock<Option<tempfile::TempDir>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let python = python_with_torch()?;
        let dir = tempfile::tempdir().unwrap();
        let script = repo_root().join("parity/cli_fixtures.py");
        let out = std::process::Command::new(python).arg(script).arg("--out").arg(dir.path()).output().unwrap();
        assert!(out.status.success(), "cli_fixtures.py failed: {}", String::from_utf8_lossy(&out.stderr));
        Some(dir)
    })
    .as_ref()
    .map(|d| d.path())
}

/// `parity/export.py`.
pub fn export_py() -> PathBuf {
    repo_root().join("parity/export.py")
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Copies the model folder `from` to `to` with its context cut to `positions`
/// (`max_position_embeddings`), for the tests of prompts past the context.
pub fn copy_with_context(from: &Path, to: &Path, positions: i64) {
    copy_dir(from, to);
    let config_path = to.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["max_position_embeddings"] = positions.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
}

/// The per-stage bounds that committed fixtures (made on another machine) are compared with.
pub fn fixture_tolerance() -> arcana::parity::Tolerance {
    let path = repo_root().join("tests/fixtures/parity/tolerances.json");
    arcana::parity::Tolerance::Stages(arcana::parity::StageBounds::load(&path).unwrap())
}

/// Checks `reference` (a committed fixture file) within the fixture tolerances: every tensor within its
/// stage's bounds, ids exact. Prints each tensor and where the fixture was made.
pub fn assert_matches_fixture(checkpoint: &Path, reference: &Path, label: &str) -> Vec<arcana::parity::TensorReport> {
    use arcana::parity::{check, describe_machine, Reference, Status};
    let made_on = Reference::open(reference).unwrap().machine();
    println!("{label}: fixture made on {}", describe_machine(&made_on));
    println!("{label}: this run on {}", describe_machine(&arcana::parity::this_machine()));
    let reports = check(checkpoint, reference, &fixture_tolerance()).unwrap();
    assert!(!reports.is_empty(), "{label}: the reference holds no tensor to compare");
    for r in &reports {
        println!(
            "{label} {:<26} max|diff| {:.3e} rel {:.3e} cos {:.15} bitexact {}",
            r.name, r.max_abs_diff, r.max_rel_diff, r.cosine, r.bit_identical
        );
    }
    for r in &reports {
        assert_eq!(r.status, Status::Ok, "{label}: `{}` is outside the fixture tolerance: {r:?}", r.name);
    }
    reports
}
