// Emits an rpath to libtorch's library folder so that binaries start without LD_LIBRARY_PATH.
// torch-sys (`links = "tch"`) passes the folder it linked against to its direct dependents.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
