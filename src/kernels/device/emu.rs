//! The host emulator of the device kernels (`kernels/emu`, built by
//! build.rs): a [`KernelDevice`] over host memory, for the unit tests.

use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::Mutex;

use super::{Arg, DevBuf, Gemm, Geometry, Graph, KernelDevice, Launcher};
use crate::error::{Error, Result};

extern "C" {
    fn sollol_emu_launch(name: *const c_char, grid: *const u32, block: *const u32, args: *mut *mut c_void) -> c_int;
}

/// The emulator; while capturing, launches and copies are recorded, as a
/// CUDA stream capture does, and a graph replays them in order.
#[derive(Debug, Default)]
pub(super) struct Emu {
    recording: Mutex<Option<Vec<Recorded>>>,
}

#[derive(Debug, Clone)]
enum Recorded {
    Launch(String, Geometry, Vec<Arg>),
    Copy(u64, u64, usize),
    Gemm(Gemm),
}

impl Emu {
    /// Records `r` if capturing; false if it is to run now.
    fn record(&self, r: impl FnOnce() -> Recorded) -> bool {
        let mut rec = self.recording.lock().unwrap_or_else(|e| e.into_inner());
        match rec.as_mut() {
            Some(list) => {
                list.push(r());
                true
            }
            None => false,
        }
    }

    fn refuse_while_capturing(&self, what: &str) -> Result<()> {
        if self.recording.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
            return Err(Error::Kernel { kernel: what.into(), reason: "a copy to or from the host while capturing".into() });
        }
        Ok(())
    }

    fn run(&self, kernel: &str, g: Geometry, args: &[Arg]) -> Result<()> {
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

impl Launcher for Emu {
    fn launch(&self, kernel: &str, g: Geometry, args: &[Arg]) -> Result<()> {
        if self.record(|| Recorded::Launch(kernel.to_string(), g, args.to_vec())) {
            return Ok(());
        }
        self.run(kernel, g, args)
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
        self.refuse_while_capturing("write")?;
        // SAFETY: `dst` is inside a live buffer (bounds checked by `write`).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst as *mut u8, bytes.len()) };
        Ok(())
    }

    fn read_at(&self, src: u64, out: &mut [u8]) -> Result<()> {
        self.refuse_while_capturing("read")?;
        // SAFETY: as in `write_at`.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    fn copy_at(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if self.record(|| Recorded::Copy(dst, src, bytes)) {
            return Ok(());
        }
        // SAFETY: as in `write_at`; `copy` allows overlap.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }

    fn begin_capture(&self) -> Result<()> {
        let mut rec = self.recording.lock().unwrap_or_else(|e| e.into_inner());
        if rec.is_some() {
            return Err(Error::Kernel { kernel: "capture".into(), reason: "already capturing".into() });
        }
        *rec = Some(Vec::new());
        Ok(())
    }

    fn end_capture(&self) -> Result<Graph> {
        let list = self.recording.lock().unwrap_or_else(|e| e.into_inner()).take();
        let list = list.ok_or_else(|| Error::Kernel { kernel: "capture".into(), reason: "not capturing".into() })?;
        Ok(Graph(Box::new(list)))
    }

    fn replay(&self, graph: &Graph) -> Result<()> {
        let list = graph
            .0
            .downcast_ref::<Vec<Recorded>>()
            .ok_or_else(|| Error::Kernel { kernel: "replay".into(), reason: "a graph of another device".into() })?;
        for r in list {
            match r {
                Recorded::Launch(k, g, args) => self.run(k, *g, args)?,
                Recorded::Copy(dst, src, bytes) => self.copy_at(*dst, *src, *bytes)?,
                Recorded::Gemm(g) => self.gemm(*g)?,
            }
        }
        Ok(())
    }

    /// The product as cuBLAS defines it, in f32 over the f16 inputs.
    fn gemm(&self, g: Gemm) -> Result<()> {
        if self.record(|| Recorded::Gemm(g)) {
            return Ok(());
        }
        // SAFETY: the three buffers hold the shapes `g` names (the caller's
        // device buffers of those sizes).
        let (w, x, y) = unsafe {
            (
                std::slice::from_raw_parts(g.w as *const half::f16, g.rows * g.cols),
                std::slice::from_raw_parts(g.x as *const half::f16, g.nb * g.cols),
                std::slice::from_raw_parts_mut(g.y as *mut f32, g.nb * g.rows),
            )
        };
        for b in 0..g.nb {
            let xr = &x[b * g.cols..][..g.cols];
            for r in 0..g.rows {
                let wr = &w[r * g.cols..][..g.cols];
                y[b * g.rows + r] = xr.iter().zip(wr).map(|(a, c)| a.to_f32() * c.to_f32()).sum();
            }
        }
        Ok(())
    }
}
