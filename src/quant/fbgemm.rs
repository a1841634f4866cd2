//! fbgemm's linear kernels through the C++ shim `build/fbgemm.cpp`: tch >= 0.22 no longer wraps them,
//! so the libtorch 2.0.1 and 2.11 builds both call libtorch's operators here, the same way.

use std::ffi::{c_char, CStr};
use tch::{TchError, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn arcana_fbgemm_linear_int8(
        out: *mut *mut C_tensor,
        input: *const C_tensor,
        weight: *const C_tensor,
        packed: *const C_tensor,
        col_offsets: *const C_tensor,
        weight_scale: f64,
        weight_zero_point: i64,
        bias: *const C_tensor,
    ) -> *mut c_char;
    fn arcana_fbgemm_linear_fp16(
        out: *mut *mut C_tensor,
        input: *const C_tensor,
        packed: *const C_tensor,
        bias: *const C_tensor,
    ) -> *mut c_char;
    fn arcana_fbgemm_pack_fp16(out: *mut *mut C_tensor, weight: *const C_tensor) -> *mut c_char;
    fn arcana_fbgemm_pack_int8(out: *mut *mut C_tensor, weight: *const C_tensor) -> *mut c_char;
}

/// Runs one shim call: a tensor it made, or the message of the C++ exception it caught.
fn call(f: impl FnOnce(*mut *mut C_tensor) -> *mut c_char) -> Result<Tensor, TchError> {
    let mut out = std::ptr::null_mut();
    let err = f(&mut out);
    if err.is_null() {
        // SAFETY: on success the shim stored a new heap tensor that nothing else owns.
        Ok(unsafe { Tensor::from_ptr(out) })
    } else {
        // SAFETY: the shim returns a NUL-terminated message from strdup, ours to free.
        let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
        unsafe { libc::free(err.cast()) };
        Err(TchError::Torch(msg))
    }
}

/// `torch.fbgemm_linear_int8_weight_fp32_activation`: `weight` gives the sizes, `packed` the codes.
pub fn linear_int8(
    input: &Tensor,
    weight: &Tensor,
    packed: &Tensor,
    col_offsets: &Tensor,
    weight_scale: f64,
    weight_zero_point: i64,
    bias: &Tensor,
) -> Result<Tensor, TchError> {
    let (i, w, p, c, b) = (input.as_ptr(), weight.as_ptr(), packed.as_ptr(), col_offsets.as_ptr(), bias.as_ptr());
    // SAFETY: every handle is a live tensor borrowed for the call.
    call(|out| unsafe { arcana_fbgemm_linear_int8(out, i, w, p, c, weight_scale, weight_zero_point, b) })
}

/// `torch.fbgemm_linear_fp16_weight_fp32_activation`.
pub fn linear_fp16(input: &Tensor, packed: &Tensor, bias: &Tensor) -> Result<Tensor, TchError> {
    let (i, p, b) = (input.as_ptr(), packed.as_ptr(), bias.as_ptr());
    // SAFETY: every handle is a live tensor borrowed for the call.
    call(|out| unsafe { arcana_fbgemm_linear_fp16(out, i, p, b) })
}

/// `torch.fbgemm_pack_gemm_matrix_fp16`: an fp32 `[out, in]` weight packed as fp16.
pub fn pack_fp16(weight: &Tensor) -> Result<Tensor, TchError> {
    let w = weight.as_ptr();
    // SAFETY: the handle is a live tensor borrowed for the call.
    call(|out| unsafe { arcana_fbgemm_pack_fp16(out, w) })
}

/// `torch.fbgemm_pack_quantized_matrix`: an int8 `[out, in]` weight packed for the int8 GEMM.
pub fn pack_int8(weight: &Tensor) -> Result<Tensor, TchError> {
    let w = weight.as_ptr();
    // SAFETY: the handle is a live tensor borrowed for the call.
    call(|out| unsafe { arcana_fbgemm_pack_int8(out, w) })
}
