//! The `kiln` binary's memory allocator: mimalloc, told to keep the memory it frees.
//!
//! Training allocates and frees the same tensor sizes every step. glibc's allocator
//! returns large blocks to the system and faults them back in, zeroed by the kernel,
//! on the next step; mimalloc reuses them, but by default still returns ("purges")
//! memory idle for 10 ms, which a step's larger buffers always are. With purging off,
//! the page faults of 60 training steps fell from about 10,000 to under 600
//! (`docs/performance.md`). A process's memory then stays at its peak, which for a
//! training run it reaches every step anyway.
//!
//! The only `unsafe` code of `kiln-cli`: a call into mimalloc's C API that takes
//! two integers.
#![allow(unsafe_code)]

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in the mimalloc 3 that `libmimalloc-sys` 0.1.49 builds
/// (its Rust bindings do not name it; `MIMALLOC_PURGE_DELAY=-1 kiln ...` reads back
/// as -1 under this number, as mimalloc documents the variable).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// The environment variable through which a user sets the purge delay: when it is
/// set, it wins.
const PURGE_DELAY_VAR: &str = "MIMALLOC_PURGE_DELAY";

/// Turns mimalloc's purging off (a delay of -1), unless the user chose a delay.
pub fn keep_freed_memory() {
    if std::env::var_os(PURGE_DELAY_VAR).is_some() {
        return;
    }
    // SAFETY: mimalloc's option setter writes one global integer, at any time and
    // from any thread.
    unsafe {
        libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option number is mimalloc's purge delay: it holds the documented default
    /// (1000 ms in mimalloc 3) until kiln sets it, and -1 after.
    #[test]
    fn the_option_set_is_the_purge_delay() {
        if std::env::var_os(PURGE_DELAY_VAR).is_some() {
            eprintln!("skipped: {PURGE_DELAY_VAR} is set, so kiln leaves the option alone");
            return;
        }
        // SAFETY: a plain getter of one global integer.
        let get = || unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) };
        assert_eq!(get(), 1000, "option {PURGE_DELAY} is not the purge delay");
        keep_freed_memory();
        assert_eq!(get(), -1);
    }
}
