//! Where a computation ran: the facts that decide which CPU kernels libtorch picks.
//!
//! Bit-identity with PyTorch holds for one libtorch on one machine and one kernel path; reference files
//! record these facts under `machine.*` metadata keys (`parity/provenance.py`), and the comparer prints
//! them for the machine it runs on, so a report says where identity was shown.
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr};

/// Environment settings that change the kernel path (recorded when set), as in `parity/provenance.py`.
const KERNEL_ENV: [&str; 5] =
    ["ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "OMP_NUM_THREADS", "MKL_NUM_THREADS"];

/// The vector extensions that ATen's and MKL's dispatch look at, in `provenance.cpu_features()` order.
const CPU_FEATURES: [&str; 7] = ["avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "avx"];

/// This machine's facts, keyed like the reference metadata (`machine.cpu`, `machine.threads`, ...).
pub fn this_machine() -> BTreeMap<String, String> {
    let config = torch_build_config().unwrap_or_default();
    let field = |prefix: &str, end: &str| {
        config
            .split_once(prefix)
            .and_then(|(_, rest)| rest.split_once(end).map(|(value, _)| value.trim().to_string()))
            .unwrap_or_else(|| "unknown".into())
    };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpuinfo_field = |key: &str| {
        cpuinfo.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string())
    };
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.split_whitespace().collect())
        .unwrap_or_default();
    let features = if cpuinfo.is_empty() {
        "unknown".to_string()
    } else {
        CPU_FEATURES.iter().filter(|f| flags.contains(f)).copied().collect::<Vec<_>>().join(" ")
    };
    let mut facts = BTreeMap::new();
    facts.insert("cpu".into(), cpuinfo_field("model name").unwrap_or_else(|| "unknown".into()));
    facts.insert("cpu_features".into(), features);
    facts.insert("aten_cpu_capability".into(), field("CPU capability usage: ", "\n"));
    facts.insert("torch".into(), field("TORCH_VERSION=", ","));
    facts.insert("mkl".into(), field("Math Kernel Library Version ", " for"));
    facts.insert("onednn".into(), field("MKL-DNN v", " "));
    facts.insert("threads".into(), tch::get_num_threads().to_string());
    for var in KERNEL_ENV {
        if let Ok(value) = std::env::var(var) {
            if !value.is_empty() {
                facts.insert(format!("env.{var}"), value);
            }
        }
    }
    facts.into_iter().map(|(k, v)| (format!("machine.{k}"), v)).collect()
}

/// The `machine.*` entries of a reference file's metadata.
pub fn recorded(metadata: &std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    metadata.iter().filter(|(k, _)| k.starts_with("machine.")).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// One line, `cpu=... aten_cpu_capability=... threads=...`, for reports.
pub fn describe(facts: &BTreeMap<String, String>) -> String {
    if facts.is_empty() {
        return "unrecorded".into();
    }
    facts.iter().map(|(k, v)| format!("{}={v}", k.trim_start_matches("machine."))).collect::<Vec<_>>().join(", ")
}

/// The kernel-path facts of `a` and `b` that differ (environment settings included, CPU model not:
/// two machines of one kind may report different model strings and still run the same kernels).
pub fn kernel_path_differences(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<String> {
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| k.as_str() != "machine.cpu")
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |m: &BTreeMap<String, String>| m.get(k).cloned().unwrap_or_else(|| "unset".into());
            format!("{}: {} vs {}", k.trim_start_matches("machine."), show(a), show(b))
        })
        .collect()
}

/// `at::show_config()` of the linked libtorch: its version, BLAS and oneDNN builds and the CPU
/// capability ATen dispatches to. Looked up at run time; `None` where the symbol is absent.
fn torch_build_config() -> Option<String> {
    // `std::string at::show_config()` under both libstdc++ ABIs (a wheel's libtorch uses the old one).
    const SYMBOLS: [&CStr; 2] = [c"_ZN2at11show_configB5cxx11Ev", c"_ZN2at11show_configEv"];
    // SAFETY: dlsym with RTLD_DEFAULT only searches the loaded objects. The Itanium C++ ABI returns a
    // non-trivial class through a caller-provided slot passed as the first argument; both std::string
    // layouts (8 bytes old, 32 bytes new) start with the pointer to the NUL-terminated characters.
    // The string is left to leak: it is read once, and freeing it would need the right ABI's destructor.
    unsafe {
        let symbol = SYMBOLS.iter().map(|s| libc::dlsym(libc::RTLD_DEFAULT, s.as_ptr())).find(|p| !p.is_null())?;
        let show_config: extern "C" fn(*mut c_void) -> *mut c_void = std::mem::transmute(symbol);
        let mut slot = [0usize; 8];
        show_config(slot.as_mut_ptr().cast());
        let chars = slot[0] as *const c_char;
        (!chars.is_null()).then(|| CStr::from_ptr(chars).to_string_lossy().into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_linked_libtorch_reports_its_build() {
        let facts = this_machine();
        println!("{}", describe(&facts));
        assert!(facts["machine.torch"].starts_with("2."), "{facts:?}");
        assert!(["NO AVX", "AVX2", "AVX512"].contains(&facts["machine.aten_cpu_capability"].as_str()), "{facts:?}");
    }
}
