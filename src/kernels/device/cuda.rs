//! The device kernels on a CUDA device: the PTX build.rs compiles from
//! `kernels/cuda/decode.cu`, loaded once into candle's CUDA context and
//! launched on its stream, where every copy of [`KernelDevice`] runs too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::sys::{CUgraphInstantiate_flags_enum, CUstreamCaptureMode};
use candle_core::cuda_backend::cudarc::driver::{result, CudaGraph, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, DeviceId};

use super::{Arg, DevBuf, Gemm, Geometry, Graph, KernelDevice, Launcher};
use crate::error::{Error, Result};

static PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode.ptx"));
const MODULE: &str = "sollol_decode";

/// [`KernelDevice`] on one CUDA device.
#[derive(Debug)]
pub struct CudaKernels {
    dev: CudaDevice,
}

impl CudaKernels {
    /// One per device, shared by every slice on it.
    pub fn shared(dev: &CudaDevice) -> Arc<dyn KernelDevice> {
        static ALL: OnceLock<Mutex<HashMap<DeviceId, Arc<CudaKernels>>>> = OnceLock::new();
        let mut all = ALL.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
        all.entry(dev.id()).or_insert_with(|| Arc::new(CudaKernels { dev: dev.clone() })).clone()
    }

    fn failed(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::Kernel { kernel: what.to_string(), reason: e.to_string() }
    }
}

impl Launcher for CudaKernels {
    fn launch(&self, kernel: &str, g: Geometry, args: &[Arg]) -> Result<()> {
        let f = self.dev.get_or_load_custom_func(kernel, MODULE, PTX).map_err(|e| self.failed(kernel, e))?;
        let mut b = f.builder();
        for a in args {
            match a {
                Arg::Ptr(p) => b.arg(p),
                Arg::I32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (g.grid[0], g.grid[1], g.grid[2]),
            block_dim: (g.block[0], g.block[1], g.block[2]),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches the kernel's parameters (the
        // launch functions of `device` build both, and the emulator tests
        // run the same lists); buffers are live allocations of this device.
        unsafe { b.launch(cfg) }.map_err(|e| self.failed(kernel, e))?;
        Ok(())
    }
}

impl KernelDevice for CudaKernels {
    fn alloc(&self, bytes: usize) -> Result<DevBuf> {
        let slice: CudaSlice<u8> = self.dev.alloc_zeros::<u8>(bytes.max(1)).map_err(|e| self.failed("alloc", e))?;
        let stream = self.dev.cuda_stream();
        let addr = slice.device_ptr(&stream).0;
        Ok(DevBuf { addr, len: bytes, _keep: Box::new(slice) })
    }

    fn write_at(&self, dst: u64, bytes: &[u8]) -> Result<()> {
        let stream = self.dev.cuda_stream();
        // SAFETY: `dst` is inside a live buffer (bounds checked by `write`);
        // the stream is synchronized before `bytes` can go away.
        unsafe { result::memcpy_htod_async(dst, bytes, stream.cu_stream()) }.map_err(|e| self.failed("write", e))?;
        stream.synchronize().map_err(|e| self.failed("write", e))
    }

    fn read_at(&self, src: u64, out: &mut [u8]) -> Result<()> {
        let stream = self.dev.cuda_stream();
        // SAFETY: as in `write_at`.
        unsafe { result::memcpy_dtoh_async(out, src, stream.cu_stream()) }.map_err(|e| self.failed("read", e))?;
        stream.synchronize().map_err(|e| self.failed("read", e))
    }

    fn copy_at(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        let stream = self.dev.cuda_stream();
        // SAFETY: both ranges are inside live buffers (checked by `copy`).
        unsafe { result::memcpy_dtod_async(dst, src, bytes, stream.cu_stream()) }.map_err(|e| self.failed("copy", e))
    }

    fn begin_capture(&self) -> Result<()> {
        // Thread-local: only this thread's calls are captured (candle's own
        // launches on other threads are not).
        self.dev
            .cuda_stream()
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| self.failed("capture", e))
    }

    fn end_capture(&self) -> Result<Graph> {
        let graph = self.dev.cuda_stream().end_capture(CUgraphInstantiate_flags_enum(0)).map_err(|e| self.failed("capture", e))?;
        let graph = graph.ok_or_else(|| self.failed("capture", "nothing was captured"))?;
        Ok(Graph(Box::new(Captured(graph))))
    }

    fn replay(&self, graph: &Graph) -> Result<()> {
        let g = graph.0.downcast_ref::<Captured>().ok_or_else(|| self.failed("replay", "a graph of another device"))?;
        g.0.launch().map_err(|e| self.failed("replay", e))
    }

    /// cuBLAS is column-major: `y` row-major `[nb, rows]` is column-major
    /// `[rows, nb]` = `wᵀ` (`w` row-major `[rows, cols]`, read transposed)
    /// times `x` (column-major `[cols, nb]`), as llama.cpp calls it.
    fn gemm(&self, g: Gemm) -> Result<()> {
        use candle_core::cuda_backend::cudarc::cublas::{result as blas, sys as blas_sys};
        let int = |v: usize| i32::try_from(v).map_err(|_| self.failed("gemm", format!("{v} does not fit cuBLAS's int")));
        let (m, n, k) = (int(g.rows)?, int(g.nb)?, int(g.cols)?);
        let (alpha, beta) = (1f32, 0f32);
        let handle = self.dev.cublas_handle();
        // SAFETY: the buffers hold the shapes `g` names; alpha and beta are
        // host f32 values (the handle's default pointer mode), as the compute
        // type asks; the handle runs on this device's stream.
        unsafe {
            blas::gemm_ex(
                *handle.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                (&alpha as *const f32).cast(),
                g.w as *const std::ffi::c_void,
                blas_sys::cudaDataType::CUDA_R_16F,
                k,
                g.x as *const std::ffi::c_void,
                blas_sys::cudaDataType::CUDA_R_16F,
                k,
                (&beta as *const f32).cast(),
                g.y as *mut std::ffi::c_void,
                blas_sys::cudaDataType::CUDA_R_32F,
                m,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            )
        }
        .map_err(|e| self.failed("gemm", e))
    }
}

/// A CUDA graph, used only under its slice's lock.
struct Captured(CudaGraph);

// SAFETY: the graph's handles are used by one thread at a time (the slice's
// device state is behind a mutex), which the driver allows from any thread.
unsafe impl Send for Captured {}
unsafe impl Sync for Captured {}
