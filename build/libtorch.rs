// What every crate that links libtorch needs from its build script.

/// Emits an rpath to libtorch's library folder, so that binaries start without LD_LIBRARY_PATH, and
/// links libtorch_cuda where there is one; returns the folder. torch-sys (`links = "tch"`) passes the
/// folder it linked against to its direct dependents; none with tch's `doc-only` feature.
pub fn link() -> Option<std::path::PathBuf> {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = std::path::PathBuf::from(std::env::var_os("DEP_TCH_LIBTORCH_LIB")?);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // tch >= 0.14 no longer references a libtorch_cuda symbol, so `--as-needed` drops the library and
    // CUDA is invisible to the binary (tch-rs issue 980); tch 0.13 already forced it in.
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    Some(lib)
}
