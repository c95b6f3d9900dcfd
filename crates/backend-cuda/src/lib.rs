//! The CUDA backend for kiln: type aliases and a device probe that never panics.
//!
//! This crate compiles on a machine without the CUDA toolkit (cudarc loads the
//! driver at run time) and [`cuda_device_count`] returns 0 on a machine without a
//! GPU or driver, where Burn's own `device_count` would panic.

use burn::backend::Autodiff;

/// Burn's CUDA backend with f32 floats.
pub type Cuda = burn::backend::Cuda<f32, i32>;
/// CUDA with automatic differentiation, for training.
pub type CudaAutodiff = Autodiff<Cuda>;
/// A CUDA device.
pub type CudaDevice = burn::backend::cuda::CudaDevice;

/// Number of CUDA devices usable here; 0 when there is no driver, no GPU or any
/// error on the way. Never panics.
pub fn cuda_device_count() -> usize {
    if !driver_present() {
        return 0;
    }
    std::panic::catch_unwind(|| cudarc::driver::CudaContext::device_count().unwrap_or(0))
        .map(|n| n.max(0) as usize)
        .unwrap_or(0)
}

/// The usable CUDA devices, in index order (empty without a GPU).
pub fn cuda_devices() -> Vec<CudaDevice> {
    (0..cuda_device_count()).map(CudaDevice::new).collect()
}

/// Device memory in use on CUDA device `index`, in bytes, as the driver sees it
/// (every process's allocations, Burn's memory pool included); `None` without a
/// driver or device, or on any error. Never panics.
pub fn cuda_memory_used(index: usize) -> Option<u64> {
    if index >= cuda_device_count() {
        return None;
    }
    std::panic::catch_unwind(|| {
        let ctx = cudarc::driver::CudaContext::new(index).ok()?;
        let (free, total) = ctx.mem_get_info().ok()?;
        Some(total.saturating_sub(free) as u64)
    })
    .ok()
    .flatten()
}

/// Whether the CUDA driver library can be loaded.
#[allow(unsafe_code)]
fn driver_present() -> bool {
    // SAFETY: `is_culib_present` only tries to dlopen the driver library and reports
    // whether it succeeded; it calls no CUDA function.
    std::panic::catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_never_panics_and_agrees_with_the_device_list() {
        let n = cuda_device_count();
        assert_eq!(cuda_devices().len(), n);
        assert_eq!(cuda_memory_used(n), None, "no device at index {n}");
        if n == 0 {
            eprintln!("no CUDA device here: the probe reported 0 without panicking");
        }
    }

    /// Set in the child process of the test below, whose loader sees the fake driver.
    const FAKE_DRIVER_CHILD: &str = "KILN_FAKE_DRIVER_CHILD";

    /// A driver library that loads but has none of CUDA's functions (a broken
    /// install, a stub): the probe finds it, cudarc fails on its first symbol, and
    /// the probe answers "no device" instead of crashing. The test runs itself again
    /// in a child process whose `LD_LIBRARY_PATH` (read by the loader at start)
    /// holds a fake `libcuda.so`; the child checks the probe there.
    #[test]
    fn the_probe_survives_a_driver_library_without_its_functions() {
        if std::env::var_os(FAKE_DRIVER_CHILD).is_some() {
            assert!(
                driver_present(),
                "the fake libcuda.so was not the one loaded"
            );
            assert_eq!(cuda_device_count(), 0);
            assert!(cuda_devices().is_empty());
            assert_eq!(cuda_memory_used(0), None);
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("fake.c");
        std::fs::write(&source, "int kiln_fake_driver(void) { return 0; }\n").unwrap();
        let built = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(dir.path().join("libcuda.so"))
            .arg(&source)
            .status();
        if !built.is_ok_and(|s| s.success()) {
            eprintln!("skipped: no C compiler (cc) to build a fake driver library");
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::the_probe_survives_a_driver_library_without_its_functions",
            ])
            .env(FAKE_DRIVER_CHILD, "1")
            .env("LD_LIBRARY_PATH", dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "{text}");
    }
}
