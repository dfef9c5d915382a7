//! The host emulator of the device kernels (`kernels/emu`, built by
//! build.rs): a [`KernelDevice`] over host memory, for the unit tests.

use std::ffi::{c_char, c_int, c_void, CString};

use super::{Arg, DevBuf, Geometry, KernelDevice, Launcher};
use crate::error::{Error, Result};

extern "C" {
    fn sollol_emu_launch(name: *const c_char, grid: *const u32, block: *const u32, args: *mut *mut c_void) -> c_int;
}

#[derive(Debug)]
pub(super) struct Emu;

impl Launcher for Emu {
    fn launch(&self, kernel: &str, g: Geometry, args: &[Arg]) -> Result<()> {
        // cuLaunchKernel's convention: one pointer per parameter, to its
        // value. A u64 slot holds each (i32 and f32 in its low bytes).
        let mut values: Vec<u64> = args
            .iter()
            .map(|a| match *a {
                Arg::Ptr(p) => p,
                Arg::I32(v) => u64::from(v as u32),
                Arg::F32(v) => u64::from(v.to_bits()),
            })
            .collect();
        let mut params: Vec<*mut c_void> = values.iter_mut().map(|v| (v as *mut u64).cast()).collect();
        let name = CString::new(kernel).map_err(|_| Error::Kernel { kernel: kernel.into(), reason: "a NUL in the name".into() })?;
        // SAFETY: the arguments are what the kernel's parameters are (the
        // launch functions of `device` build both); pointers are addresses
        // of live buffers of this emulator.
        let rc = unsafe { sollol_emu_launch(name.as_ptr(), g.grid.as_ptr(), g.block.as_ptr(), params.as_mut_ptr()) };
        let reason = match rc {
            0 => return Ok(()),
            1 => "no such kernel",
            2 => "a block deadlocked at a barrier",
            _ => "a block size the emulator does not take",
        };
        Err(Error::Kernel { kernel: kernel.to_string(), reason: reason.to_string() })
    }
}

/// Host memory stands for device memory, 16-byte aligned as device
/// allocations are; kernels and copies reach it only through its address.
impl KernelDevice for Emu {
    fn alloc(&self, bytes: usize) -> Result<DevBuf> {
        let mut data = vec![0u128; bytes.div_ceil(16).max(1)].into_boxed_slice();
        let addr = data.as_mut_ptr() as u64;
        Ok(DevBuf { addr, len: bytes, _keep: Box::new(data) })
    }

    fn write_at(&self, dst: u64, bytes: &[u8]) -> Result<()> {
        // SAFETY: `dst` is inside a live buffer (bounds checked by `write`).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst as *mut u8, bytes.len()) };
        Ok(())
    }

    fn read_at(&self, src: u64, out: &mut [u8]) -> Result<()> {
        // SAFETY: as in `write_at`.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    fn copy_at(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        // SAFETY: as in `write_at`; `copy` allows overlap.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }
}
