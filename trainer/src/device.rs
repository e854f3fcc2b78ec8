//! Choosing where tensors live: `--device cpu|cuda|auto`.
//!
//! One binary serves CPU and GPU machines. Our binaries link only libtorch's CPU part
//! (the linker drops the unused CUDA libraries), so on a GPU machine `libtorch_cuda.so`
//! is loaded with `dlopen` before libtorch is asked about CUDA; it then registers its
//! kernels. Where it or the driver is missing, CUDA is simply unavailable.

use std::ffi::CString;
use std::sync::OnceLock;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// CUDA device 0 when available, else CPU.
    Auto,
    Cpu,
    /// CUDA device 0; an error when unavailable.
    Cuda,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("--device cuda was requested but CUDA is not available ({0})")]
    CudaUnavailable(String),
}

/// Loads libtorch's CUDA part once; `Err` says why it could not be loaded.
fn load_torch_cuda() -> &'static Result<(), String> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED.get_or_init(|| {
        let name = CString::new("libtorch_cuda.so").expect("no interior NUL");
        // SAFETY: dlopen with a valid C string; the handle is intentionally never
        // closed, since libtorch keeps using what the library registered.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if handle.is_null() {
            // SAFETY: dlerror returns a thread-local C string or null.
            let err = unsafe { libc::dlerror() };
            let msg = if err.is_null() {
                "unknown dlopen error".to_owned()
            } else {
                // SAFETY: non-null dlerror results are valid NUL-terminated strings.
                unsafe { std::ffi::CStr::from_ptr(err) }.to_string_lossy().into_owned()
            };
            return Err(format!("cannot load libtorch_cuda.so: {msg}"));
        }
        Ok(())
    })
}

/// Whether a CUDA device can be used, and if not, why.
pub fn cuda_status() -> Result<(), String> {
    load_torch_cuda().clone()?;
    if tch::Cuda::is_available() { Ok(()) } else { Err("no CUDA device or driver".to_owned()) }
}

/// Resolves a choice to a `tch::Device`.
pub fn resolve(choice: DeviceChoice) -> Result<tch::Device, DeviceError> {
    match choice {
        DeviceChoice::Cpu => Ok(tch::Device::Cpu),
        DeviceChoice::Cuda => {
            cuda_status().map(|()| tch::Device::Cuda(0)).map_err(DeviceError::CudaUnavailable)
        }
        DeviceChoice::Auto => Ok(if cuda_status().is_ok() { tch::Device::Cuda(0) } else { tch::Device::Cpu }),
    }
}
