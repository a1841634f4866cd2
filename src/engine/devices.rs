//! Memory budgets for `Placement::Auto`: each visible GPU's free memory and the CPU's available memory,
//! unless `--max-gpu-memory` gives them.
use crate::error::{Error, Result};
use crate::llm::placement::{Budgets, MemoryLimits};
use std::ffi::{c_void, CStr};
use tch::{Device, Kind, Tensor};

/// The budgets, and notes for the user about any that could not be read.
pub fn budgets(limits: &MemoryLimits) -> Result<(Budgets, Vec<String>)> {
    let count = tch::Cuda::device_count().max(0) as usize;
    if let Some(&index) = limits.per_gpu.keys().find(|&&i| i >= count) {
        return Err(Error::Placement(format!(
            "--max-gpu-memory names cuda:{index}, but {count} CUDA device(s) are visible"
        )));
    }
    let mut notes = Vec::new();
    let mut gpus = Vec::with_capacity(count);
    for index in 0..count {
        let bytes = match limits.gpu(index) {
            Some(bytes) => bytes,
            None => match cuda_free_memory(index) {
                Ok(bytes) => bytes,
                Err(reason) => {
                    notes.push(format!(
                        "cannot read the free memory of cuda:{index} ({reason}); placing as if the model fits there \
                         (give --max-gpu-memory or --device-map to choose)"
                    ));
                    u64::MAX / 4
                }
            },
        };
        gpus.push((index, bytes));
    }
    let cpu = limits.cpu.or_else(cpu_available_memory).unwrap_or(u64::MAX / 4);
    Ok((Budgets { gpus, cpu }, notes))
}

/// `MemAvailable` of /proc/meminfo, in bytes.
pub fn cpu_available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

type CuInit = unsafe extern "C" fn(u32) -> i32;
type CuDeviceGet = unsafe extern "C" fn(*mut i32, i32) -> i32;
type CuPrimaryCtxRetain = unsafe extern "C" fn(*mut *mut c_void, i32) -> i32;
type CuPrimaryCtxRelease = unsafe extern "C" fn(i32) -> i32;
type CuCtxPushCurrent = unsafe extern "C" fn(*mut c_void) -> i32;
type CuCtxPopCurrent = unsafe extern "C" fn(*mut *mut c_void) -> i32;
type CuMemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;

/// Free bytes on CUDA device `index` (as `torch.cuda.mem_get_info`), read through the driver's
/// `cuMemGetInfo` in the device's primary context, which libtorch shares. libtorch 2.0's C API, which
/// tch wraps, has no call for it.
pub fn cuda_free_memory(index: usize) -> std::result::Result<u64, String> {
    // Allocating first makes libtorch create its context, so the free memory counts what it takes.
    let _context = Tensor::f_zeros([1], (Kind::Float, Device::Cuda(index))).map_err(|e| e.to_string())?;
    // SAFETY: the symbols are the CUDA driver API's, called with the signatures it documents; the
    // library handle stays open for the process (the driver is loaded by libtorch anyway).
    unsafe {
        let library = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if library.is_null() {
            return Err("the CUDA driver library libcuda.so.1 cannot be opened".into());
        }
        let symbol = |name: &CStr| {
            let f = libc::dlsym(library, name.as_ptr());
            if f.is_null() {
                Err(format!("libcuda.so.1 has no {}", name.to_string_lossy()))
            } else {
                Ok(f)
            }
        };
        let init: CuInit = std::mem::transmute(symbol(c"cuInit")?);
        let device_get: CuDeviceGet = std::mem::transmute(symbol(c"cuDeviceGet")?);
        let retain: CuPrimaryCtxRetain = std::mem::transmute(symbol(c"cuDevicePrimaryCtxRetain")?);
        let release: CuPrimaryCtxRelease = std::mem::transmute(symbol(c"cuDevicePrimaryCtxRelease_v2")?);
        let push: CuCtxPushCurrent = std::mem::transmute(symbol(c"cuCtxPushCurrent_v2")?);
        let pop: CuCtxPopCurrent = std::mem::transmute(symbol(c"cuCtxPopCurrent_v2")?);
        let mem_get_info: CuMemGetInfo = std::mem::transmute(symbol(c"cuMemGetInfo_v2")?);
        let check = |what: &str, code: i32| {
            if code == 0 {
                Ok(())
            } else {
                Err(format!("{what} failed with CUDA error {code}"))
            }
        };
        check("cuInit", init(0))?;
        let mut device = 0i32;
        check("cuDeviceGet", device_get(&mut device, index as i32))?;
        let mut context: *mut c_void = std::ptr::null_mut();
        check("cuDevicePrimaryCtxRetain", retain(&mut context, device))?;
        let result = check("cuCtxPushCurrent", push(context)).and_then(|()| {
            let (mut free, mut total) = (0usize, 0usize);
            let read = check("cuMemGetInfo", mem_get_info(&mut free, &mut total));
            let mut popped: *mut c_void = std::ptr::null_mut();
            pop(&mut popped);
            read.map(|()| free as u64)
        });
        release(device);
        result
    }
}
