// Build script of the arcana crate: libtorch's link settings (libtorch.rs) and the fbgemm shim
// (fbgemm.cpp), compiled against the headers of the libtorch that torch-sys links.
mod libtorch;

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build/fbgemm.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    // None with tch's `doc-only` feature: a check needs no shim.
    let Some(lib) = libtorch::link() else { return };
    let root = lib.parent().expect("libtorch's lib folder has a parent");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi(root).as_str())
        .file("build/fbgemm.cpp")
        .compile("arcana_fbgemm");
}

/// The C++ ABI libtorch was built with (the 2.0.1 wheel: old, 0; the 2.11 wheel: new, 1): the shim must
/// match it. As torch-sys: LIBTORCH_CXX11_ABI wins, then libtorch's CMake config says, else 1.
fn cxx11_abi(root: &Path) -> String {
    if let Ok(abi) = std::env::var("LIBTORCH_CXX11_ABI") {
        return abi;
    }
    let config = root.join("share/cmake/Torch/TorchConfig.cmake");
    println!("cargo:rerun-if-changed={}", config.display());
    let text = std::fs::read_to_string(config).unwrap_or_default();
    match text.split("_GLIBCXX_USE_CXX11_ABI=").nth(1).and_then(|rest| rest.chars().next()) {
        Some(abi @ ('0' | '1')) => abi.to_string(),
        _ => "1".to_string(),
    }
}
