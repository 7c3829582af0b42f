//! The CUDA backend: NVIDIA GPUs through the driver API, NVRTC, cuBLAS and (optionally) cuDNN, all loaded at run
//! time by `cudarc` (no CUDA toolkit is needed to build, and the same binary runs on machines
//! with and without a GPU).
//!
//! - **Kernels**: `kernels.cu`, CUDA C compiled once per process by NVRTC for the GPU's
//!   architecture and loaded as one module. They mirror the CPU backend operation by
//!   operation (same formulas, same rules for ties and NaN, the same Philox draws), which the
//!   conformance tests check (`tests/conformance.rs`).
//! - **Matrix products**: cuBLAS (`cublasGemmEx`), f32 or bf16/f16 inputs with f32 results.
//!   Linear layers multiply in full f32 (as PyTorch's default); convolutions are im2col +
//!   one GEMM over the whole batch and use TF32 tensor cores unless
//!   [`set_conv_tf32`]`(false)` (as PyTorch's default for cuDNN convolutions); with
//!   `REGIMEN_CUDNN=1`, f32 convolutions go through cuDNN instead (`dnn.rs`), with
//!   `REGIMEN_CONV=implicit` through regimen's implicit-GEMM kernels (`conv.cu`), and with
//!   `REGIMEN_CONV=auto` through whichever of them was fastest for the shape and direction
//!   when first timed (`tune.rs`).
//! - **Memory**: one stream per GPU; buffers come from a pool ([`crate::backend::pool`]) and
//!   return to it when dropped; a steady-state step allocates nothing.
//! - **Graphs**: [`Backend::begin_capture`] / [`Backend::end_capture`] record the operations
//!   of a step as one CUDA graph. Buffers allocated while recording belong to the graph (an
//!   arena kept alive by it), so no other tensor can reuse them between replays.
//! - **Errors**: a missing driver, library or GPU is an [`Error::Device`] from
//!   [`crate::Device::cuda`], never a panic. A CUDA error inside an operation (which returns a
//!   tensor, not a `Result`) is a broken invariant and panics with the driver's message.

mod dnn;
pub mod nccl;
mod tune;

use std::collections::HashMap;
use std::ffi::c_void;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::{result as blas, sys as bsys};
use cudarc::driver::{result as dr, sys, CudaContext, CudaFunction, CudaStream};

use crate::backend::pool::Pool;
use crate::backend::{
    strict, Backend, Graph, HostBuf, KernelTrace, ParamUpdate, PoolStats, RandomKey, Target, Unary,
    UpdateRule, UpdateScalars, Window,
};
use crate::error::{Error, Result};
use crate::tensor::{DType, Device, Indices, Storage, Tensor};

/// The kernel source (compiled at run time): `kernels.cu`, then the implicit-GEMM
/// convolutions of `conv.cu` (plain C++, so that a test also runs them on the CPU).
pub const KERNELS: &str = concat!(include_str!("kernels.cu"), include_str!("conv.cu"));

/// `conv.cu` alone (the tests compile it for the CPU).
pub const CONV_KERNELS: &str = include_str!("conv.cu");

/// Threads per block of the element-wise and reduction kernels (`RBLOCK` in kernels.cu).
const BLOCK: u32 = 256;

static CONV_TF32: AtomicBool = AtomicBool::new(true);

/// Whether convolutions may use TF32 tensor cores (default true, as PyTorch's
/// `torch.backends.cudnn.allow_tf32`). Linear layers always multiply in full f32.
pub fn set_conv_tf32(on: bool) {
    CONV_TF32.store(on, Ordering::Relaxed);
}

fn derr(what: &str) -> impl FnOnce(dr::DriverError) -> Error + '_ {
    move |e| Error::Device {
        device: "cuda".into(),
        reason: format!("{what}: {e:?}"),
    }
}

/// NVRTC options for a compute capability like `(9, 0)`.
fn nvrtc_options(arch: (i32, i32)) -> Vec<String> {
    vec![
        format!("--gpu-architecture=compute_{}{}", arch.0, arch.1),
        "-default-device".into(),
        "--std=c++17".into(),
    ]
}

/// Compile `kernels.cu` to PTX for `arch` with NVRTC: needs only `libnvrtc.so.13`, no GPU.
/// The ordinary test run calls this to prove the kernels compile; an error carries NVRTC's
/// log.
pub fn compile_kernels(arch: (i32, i32)) -> Result<String> {
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::Device {
            device: "cuda".into(),
            reason: "NVRTC (libnvrtc.so.13) not found: install the CUDA 13 runtime compiler \
                     (e.g. pip install nvidia-cuda-nvrtc) and put it on LD_LIBRARY_PATH"
                .into(),
        });
    }
    let opts = cudarc::nvrtc::CompileOptions {
        options: nvrtc_options(arch),
        name: Some("kernels.cu".into()),
        ..Default::default()
    };
    match cudarc::nvrtc::compile_ptx_with_opts(KERNELS, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(cudarc::nvrtc::CompileError::CompileError { log, .. }) => Err(Error::Device {
            device: "cuda".into(),
            reason: format!("kernels.cu does not compile:\n{}", log.to_string_lossy()),
        }),
        Err(e) => Err(Error::Device {
            device: "cuda".into(),
            reason: format!("NVRTC: {e:?}"),
        }),
    }
}

/// Compile `kernels.cu` all the way to machine code for `arch` (`sm_XY`, as the driver does
/// with the PTX when it loads the module), with NVRTC alone: the assembler's limits (shared
/// memory a kernel may declare, registers) are checked only there, so a kernel past them
/// passes [`compile_kernels`] and fails to load on the GPU. Returns the machine code's size in
/// bytes; an error carries the assembler's log. Needs `libnvrtc.so.13`, no GPU.
pub fn assemble_kernels(arch: (i32, i32)) -> Result<usize> {
    use cudarc::nvrtc::{result as nv, sys as nsys};
    if !unsafe { nsys::is_culib_present() } {
        return Err(Error::Device {
            device: "cuda".into(),
            reason: "NVRTC (libnvrtc.so.13) not found".into(),
        });
    }
    let fail = |what: &str, e: nv::NvrtcError| Error::Device {
        device: "cuda".into(),
        reason: format!("NVRTC {what}: {e:?}"),
    };
    let src = std::ffi::CString::new(KERNELS).expect("no NUL in the kernels");
    let prog = nv::create_program(&src, Some(c"kernels.cu")).map_err(|e| fail("create", e))?;
    let mut opts = nvrtc_options(arch);
    opts[0] = format!("--gpu-architecture=sm_{}{}", arch.0, arch.1);
    // SAFETY: `prog` was created above and is destroyed once, at the end.
    let out = unsafe {
        match nv::compile_program(prog, &opts) {
            Ok(()) => {
                let mut n = 0usize;
                nsys::nvrtcGetCUBINSize(prog, &mut n)
                    .result()
                    .map(|()| n)
                    .map_err(|e| fail("machine code size", e))
            }
            Err(_) => {
                let log = nv::get_program_log(prog).unwrap_or_default();
                let log: Vec<u8> = log.iter().map(|&c| c as u8).collect();
                Err(Error::Device {
                    device: "cuda".into(),
                    reason: format!(
                        "kernels.cu does not assemble for sm_{}{}:\n{}",
                        arch.0,
                        arch.1,
                        String::from_utf8_lossy(&log).trim_end_matches('\0')
                    ),
                })
            }
        }
    };
    unsafe {
        let _ = nv::destroy_program(prog);
    }
    out
}

/// Every kernel of `kernels.cu` that the backend launches.
pub const KERNEL_NAMES: &[&str] = &[
    "cast_f32_bf16",
    "cast_f32_f16",
    "cast_bf16_f32",
    "cast_f16_f32",
    "uniform_fill",
    "bernoulli_keep",
    "dropout_fwd",
    "axpy",
    "scale",
    "add",
    "mul",
    "scale_rows",
    "clamp",
    "add_sign",
    "add_channel_bias",
    "add_row_bias",
    "row_sum_acc",
    "add_row_bias_relu",
    "relu_row_sum_acc",
    "add_row_bias_relu_dropout",
    "reduce_partial",
    "finish_sum",
    "finish_clip",
    "channel_sum_acc",
    "unary_fwd",
    "unary_bwd",
    "swish_fwd",
    "swish_bwd",
    "finish_acc",
    "prelu_fwd",
    "prelu_bwd",
    "softmax_fwd",
    "softmax_bwd",
    "im2col_f32",
    "im2col_u16",
    "conv_ig_fwd_f32",
    "conv_ig_fwd_tf32",
    "conv_ig_fwd_f32_m32",
    "conv_ig_fwd_tf32_m32",
    "conv_ig_fwd_f32_k32",
    "conv_ig_fwd_tf32_k32",
    "conv_ig_fwd_f32_m32_k32",
    "conv_ig_fwd_tf32_m32_k32",
    "conv_ig_dx_f32",
    "conv_ig_dx_tf32",
    "conv_ig_dx_f32_m32",
    "conv_ig_dx_tf32_m32",
    "conv_ig_dx_f32_k32",
    "conv_ig_dx_tf32_k32",
    "conv_ig_dx_f32_m32_k32",
    "conv_ig_dx_tf32_m32_k32",
    "conv_ig_dw_f32",
    "conv_ig_dw_tf32",
    "conv_ig_dw_f32_m32",
    "conv_ig_dw_tf32_m32",
    "conv_ig_dw_f32_k32",
    "conv_ig_dw_tf32_k32",
    "conv_ig_dw_f32_m32_k32",
    "conv_ig_dw_tf32_m32_k32",
    "conv_ig_dw_sum",
    "conv_ig_ktab",
    "col2im",
    "conv_dy_t",
    "max_pool_fwd",
    "max_bwd",
    "avg_pool_fwd",
    "avg_pool_bwd",
    "plane_mean",
    "plane_broadcast",
    "fractional_fwd",
    "max_groups_fwd",
    "bn_stats_partial",
    "bn_stats_finish",
    "bn_apply",
    "bn_eval",
    "invstd_kernel",
    "bn_bwd_finish",
    "bn_bwd_dx",
    "bn_relu_apply",
    "bn_relu_pool_apply",
    "bn_after_bwd_partial",
    "bn_after_bwd_dx",
    "bn_row_stats_partial",
    "bn_row_apply",
    "bn_row_eval",
    "bn_row_bwd_partial",
    "bn_row_bwd_dx",
    "bn_stats_partial_h",
    "bn_apply_h",
    "bn_eval_h",
    "bn_bwd_dx_h",
    "bn_relu_apply_h",
    "bn_relu_pool_apply_h",
    "bn_after_bwd_partial_h",
    "bn_after_bwd_dx_h",
    "bn_row_stats_partial_h",
    "bn_row_apply_h",
    "bn_row_eval_h",
    "bn_row_bwd_partial_h",
    "bn_row_bwd_dx_h",
    "dropout_fwd_h",
    "softmax_ce",
    "correct_rows",
    "mse_grad",
    "mse_partial",
    "note_nonfinite",
    "increment",
    "spin_wait",
    "optim_update",
    "gather_augment",
    "one_hot",
    "augment_samples",
    "mix_params",
    "mix_batch",
];

/// Buffers allocated while a graph was recorded: they belong to the graph, and return here
/// (not to the pool) when their tensors are dropped, until the graph is gone.
pub(crate) struct Arena {
    free: Mutex<HashMap<usize, Vec<u64>>>,
    ordinal: usize,
}

impl Drop for Arena {
    fn drop(&mut self) {
        let free = std::mem::take(&mut *self.free.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(be) = SLOTS.get(self.ordinal).and_then(OnceLock::get) {
            for (words, ptrs) in free {
                for p in ptrs {
                    be.give_back(words, p);
                }
            }
        }
    }
}

/// Device memory of one tensor: `words` 4-byte words at `ptr`.
pub struct CudaBuffer {
    ptr: u64,
    words: usize,
    ordinal: usize,
    arena: Option<Arc<Arena>>,
}

impl std::fmt::Debug for CudaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBuffer(cuda:{}, {} words)", self.ordinal, self.words)
    }
}

impl CudaBuffer {
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Clone for CudaBuffer {
    fn clone(&self) -> CudaBuffer {
        let be = backend_of(self.ordinal);
        let b = be.alloc_words(self.words);
        be.copy_words(self.ptr, b.ptr, self.words);
        b
    }
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        if self.words == 0 || self.ptr == 0 {
            return;
        }
        match &self.arena {
            Some(a) => a
                .free
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(self.words)
                .or_default()
                .push(self.ptr),
            None => {
                if let Some(be) = SLOTS.get(self.ordinal).and_then(OnceLock::get) {
                    be.give_back(self.words, self.ptr);
                }
            }
        }
    }
}

struct Raw {
    stream: sys::CUstream,
    blas: bsys::cublasHandle_t,
}
// SAFETY: the handles are used under `CudaBackend::lock` or on the backend's own stream, whose
// operations the driver serializes.
unsafe impl Send for Raw {}
unsafe impl Sync for Raw {}

/// The CUDA backend of one GPU.
pub struct CudaBackend {
    ordinal: usize,
    name: String,
    ctx: Arc<CudaContext>,
    _stream: Arc<CudaStream>,
    raw: Raw,
    funcs: HashMap<&'static str, CudaFunction>,
    pool: Pool<u64>,
    /// Serializes cuBLAS calls and capture state changes.
    lock: Mutex<()>,
    /// The arena of the graph being recorded, if any.
    capturing: Mutex<Option<Arc<Arena>>>,
    /// Set when a buffer was needed while recording and none was free (the recording is
    /// then discarded by `end_capture`).
    capture_miss: AtomicBool,
    /// Uploaded optimizer tables (parameter pointers), by content.
    tables: Mutex<HashMap<Vec<u8>, CudaBuffer>>,
    _workspace: u64,
    /// cuDNN, when `REGIMEN_CUDNN=1` asked for its convolutions (or `REGIMEN_CONV=auto`
    /// may time them) and it loaded.
    dnn: Option<dnn::Dnn>,
    /// `REGIMEN_CUDNN=1`: every f32 convolution cuDNN has a plan for runs on it.
    cudnn_first: bool,
    /// Who computes the other f32 convolutions (`REGIMEN_CONV`).
    conv_mode: ConvMode,
    /// The implicit-GEMM window tables made so far, by shape (batch aside) and direction.
    ig_tables: Mutex<HashMap<([i32; 10], bool), Tensor>>,
    /// `REGIMEN_CONV=auto`: the engine chosen for each shape and direction.
    tuned: Mutex<HashMap<(tune::Key, tune::Dir), tune::Engine>>,
    /// `REGIMEN_CONV=auto`: a line per tuned shape and direction (and why cuDNN was not
    /// timed, if it was not).
    tune_notes: Mutex<Vec<String>>,
    /// Convolution directions run so far: f32 by the implicit-GEMM kernels, f32 by im2col,
    /// 16-bit (always im2col), f32 by cuDNN.
    conv_runs: [AtomicUsize; 4],
    /// The kernel trace in progress ([`CudaBackend::trace`]), and whether there is one (read
    /// at every launch without taking the lock).
    trace: Mutex<Option<Trace>>,
    tracing: AtomicBool,
    /// Page-locked host buffers that small writes go through (`Backend::write`).
    staging: Mutex<Staging>,
}

/// Writes of up to `STAGE_MAX` bytes are copied into one of `STAGE_SLOTS` page-locked host
/// buffers and sent from there asynchronously: the host goes on (prepares the next batch)
/// while the copy waits its turn in the stream. A slot is reused only after its last copy has
/// left (its event). A write from ordinary (pageable) memory had to wait for the whole stream
/// before the host could free its data: three or four waits per step where batches come from
/// the host.
const STAGE_SLOTS: usize = 8;
const STAGE_MAX: usize = 16 << 20;

struct Staging {
    /// (page-locked buffer, its bytes, the event after its last copy; null before any).
    slots: Vec<(*mut u8, usize, sys::CUevent)>,
    next: usize,
}
// SAFETY: the buffers and events are used only under `CudaBackend::staging`'s lock.
unsafe impl Send for Staging {}

/// The events of a kernel trace: one after the hold, then one after each operation.
struct Trace {
    start: sys::CUevent,
    marks: Vec<(String, sys::CUevent)>,
    synced: bool,
}
// SAFETY: events are plain driver handles, used under `CudaBackend::trace`'s lock.
unsafe impl Send for Trace {}

impl Drop for Trace {
    fn drop(&mut self) {
        // (An event still pending is released by the driver once it completes.)
        for ev in std::iter::once(self.start).chain(self.marks.iter().map(|m| m.1)) {
            let _ = unsafe { dr::event::destroy(ev) };
        }
    }
}

/// Ends a trace however [`CudaBackend::trace`]'s closure leaves (a panic included): marking
/// stops and the events are released.
struct TraceOff<'a>(&'a CudaBackend);

impl Drop for TraceOff<'_> {
    fn drop(&mut self) {
        self.0.tracing.store(false, Ordering::Relaxed);
        drop(
            self.0
                .trace
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
    }
}

const MAX_GPUS: usize = 16;
static SLOTS: [OnceLock<CudaBackend>; MAX_GPUS] = [const { OnceLock::new() }; MAX_GPUS];
static INIT: Mutex<()> = Mutex::new(());

fn backend_of(ordinal: usize) -> &'static CudaBackend {
    SLOTS[ordinal]
        .get()
        .expect("a CUDA buffer outlived nothing: its backend exists")
}

/// The backend of GPU `n`, initialized on first use.
pub fn get(n: usize) -> Result<&'static CudaBackend> {
    if n >= MAX_GPUS {
        return Err(Error::Device {
            device: format!("cuda:{n}"),
            reason: format!("regimen supports GPU ordinals below {MAX_GPUS}"),
        });
    }
    if let Some(b) = SLOTS[n].get() {
        return Ok(b);
    }
    let _g = INIT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(b) = SLOTS[n].get() {
        return Ok(b);
    }
    let b = CudaBackend::new(n).map_err(|e| match e {
        Error::Device { reason, .. } => Error::Device {
            device: format!("cuda:{n}"),
            reason,
        },
        other => other,
    })?;
    let _ = SLOTS[n].set(b);
    Ok(SLOTS[n].get().expect("set above"))
}

/// Why no CUDA device can be used here, checked without panicking (cudarc panics when a
/// library is missing, so the libraries are probed first).
pub fn probe() -> Result<usize> {
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::Device {
            device: "cuda".into(),
            reason: "no CUDA driver found (libcuda.so.1)".into(),
        });
    }
    let mut v = 0i32;
    unsafe { sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(derr("cuDriverGetVersion"))?;
    if v < 13000 {
        return Err(Error::Device {
            device: "cuda".into(),
            reason: format!(
                "the CUDA driver supports CUDA {}.{}; regimen needs 13.0 or later",
                v / 1000,
                (v % 1000) / 10
            ),
        });
    }
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(Error::Device {
            device: "cuda".into(),
            reason: "cuBLAS (libcublas.so.13) not found: install the CUDA 13 toolkit libraries \
                     or put them on LD_LIBRARY_PATH"
                .into(),
        });
    }
    let count = CudaContext::device_count().map_err(derr("counting GPUs"))?;
    Ok(count.max(0) as usize)
}

macro_rules! args {
    ($($a:expr),* $(,)?) => {
        [$( $a as *const _ as *mut c_void ),*]
    };
}

/// Threads per block along a plane of `inner` elements: the plane rounded up to whole warps,
/// at most [`BLOCK`], so that short planes (a pool's 7 x 7 output, a feature vector's one
/// value per channel) do not leave most of each block idle (the kernels stride by
/// `blockDim.x`, whatever it is).
fn plane_block(inner: usize) -> u32 {
    inner.next_multiple_of(32).clamp(32, BLOCK as usize) as u32
}

fn blocks_for(n: usize) -> u32 {
    n.div_ceil(BLOCK as usize).clamp(1, 1 << 20) as u32
}

/// Blocks and elements per block of a deterministic reduction over `n` elements.
fn reduce_split(n: usize) -> (u32, i64) {
    let blocks = n.div_ceil(BLOCK as usize * 16).clamp(1, 1024);
    let per = n.div_ceil(blocks).max(1);
    (blocks as u32, per as i64)
}

impl CudaBackend {
    fn new(n: usize) -> Result<CudaBackend> {
        let conv_mode = conv_choice(std::env::var("REGIMEN_CONV").ok().as_deref())?;
        let cudnn_first = dnn::requested();
        let count = probe()?;
        if n >= count {
            return Err(Error::Device {
                device: format!("cuda:{n}"),
                reason: format!("no such GPU ({count} found)"),
            });
        }
        let ctx = CudaContext::new(n).map_err(derr("creating a context"))?;
        // No event tracking: it would record events that break graph capture (regimen keeps
        // every operation on one stream, so it needs none).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(derr("creating a stream"))?;
        let arch = ctx
            .compute_capability()
            .map_err(derr("reading the compute capability"))?;
        let name = ctx.name().unwrap_or_else(|_| "NVIDIA GPU".into());
        check_arch(arch, &name, n)?;
        let ptx = ptx_for(arch)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(derr("loading the kernels"))?;
        let mut funcs = HashMap::new();
        for &k in KERNEL_NAMES {
            funcs.insert(k, module.load_function(k).map_err(derr(k))?);
        }
        let blas_h = blas::create_handle().map_err(|e| Error::Device {
            device: "cuda".into(),
            reason: format!("cuBLAS: {e:?}"),
        })?;
        let cs = stream.cu_stream();
        // cuBLAS gets a workspace of its own (32 MiB, NVIDIA's advice for Hopper), so that it
        // never allocates during graph capture.
        let ws_bytes = 32usize << 20;
        let workspace = unsafe { dr::malloc_sync(ws_bytes) }.map_err(derr("allocating"))?;
        unsafe {
            blas::set_stream(blas_h, cs as bsys::cudaStream_t).map_err(|e| Error::Device {
                device: "cuda".into(),
                reason: format!("cuBLAS: {e:?}"),
            })?;
            bsys::cublasSetWorkspace_v2(blas_h, workspace as *mut c_void, ws_bytes)
                .result()
                .map_err(|e| Error::Device {
                    device: "cuda".into(),
                    reason: format!("cuBLAS workspace: {e:?}"),
                })?;
        }
        let mut tune_notes = Vec::new();
        Ok(CudaBackend {
            ordinal: n,
            name,
            ctx,
            _stream: stream,
            raw: Raw {
                stream: cs,
                blas: blas_h,
            },
            funcs,
            pool: Pool::new(16 << 30),
            lock: Mutex::new(()),
            capturing: Mutex::new(None),
            capture_miss: AtomicBool::new(false),
            tables: Mutex::new(HashMap::new()),
            _workspace: workspace,
            dnn: if cudnn_first || conv_mode == ConvMode::Auto {
                match dnn::Dnn::new(cs) {
                    Ok(d) => Some(d),
                    Err(e) if cudnn_first => {
                        let _ = writeln!(
                            std::io::stderr(),
                            "REGIMEN_CUDNN=1: {e}; convolutions run without cuDNN"
                        );
                        None
                    }
                    Err(e) => {
                        tune_notes.push(format!("auto: cuDNN is not timed: {e}"));
                        None
                    }
                }
            } else {
                None
            },
            cudnn_first,
            conv_mode,
            ig_tables: Mutex::new(HashMap::new()),
            tuned: Mutex::new(HashMap::new()),
            tune_notes: Mutex::new(tune_notes),
            conv_runs: Default::default(),
            trace: Mutex::new(None),
            tracing: AtomicBool::new(false),
            staging: Mutex::new(Staging {
                slots: Vec::new(),
                next: 0,
            }),
        })
    }

    /// The GPU's name, as the driver reports it.
    pub fn gpu_name(&self) -> &str {
        &self.name
    }

    /// Make this GPU's context current on the calling thread. cudarc skips the switch when it
    /// is current already; a cache of our own (a thread-local ordinal) went stale when anything
    /// else switched the thread (`CudaContext::new` of another GPU, NCCL's teardown).
    fn bind(&self) {
        self.ctx
            .bind_to_thread()
            .unwrap_or_else(|e| panic!("cuda:{}: binding the context: {e:?}", self.ordinal));
    }

    fn check(&self, r: std::result::Result<(), dr::DriverError>, what: &str) {
        if let Err(e) = r {
            panic!("cuda:{}: {what}: {e:?}", self.ordinal);
        }
    }

    fn alloc_words(&self, words: usize) -> CudaBuffer {
        if words == 0 {
            return CudaBuffer {
                ptr: 0,
                words: 0,
                ordinal: self.ordinal,
                arena: None,
            };
        }
        let arena = self
            .capturing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(a) = &arena {
            let from_arena = a
                .free
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(&words)
                .and_then(Vec::pop);
            let ptr = from_arena.or_else(|| self.pool.take(words));
            return match ptr {
                Some(ptr) => CudaBuffer {
                    ptr,
                    words,
                    ordinal: self.ordinal,
                    arena,
                },
                None => {
                    // Allocating is not allowed while recording: the recording fails, and
                    // nothing runs on this placeholder.
                    self.capture_miss.store(true, Ordering::Relaxed);
                    CudaBuffer {
                        ptr: 0,
                        words,
                        ordinal: self.ordinal,
                        arena: None,
                    }
                }
            };
        }
        let ptr = match self.pool.take(words) {
            Some(p) => p,
            None => {
                self.bind();
                unsafe { dr::malloc_sync(words * 4) }.unwrap_or_else(|e| {
                    panic!(
                        "cuda:{}: out of GPU memory allocating {} MiB: {e:?}",
                        self.ordinal,
                        (words * 4) >> 20
                    )
                })
            }
        };
        CudaBuffer {
            ptr,
            words,
            ordinal: self.ordinal,
            arena: None,
        }
    }

    fn give_back(&self, words: usize, ptr: u64) {
        if let Some(p) = self.pool.put(words, ptr) {
            self.bind();
            // The stream may still use it: wait, then free (rare: only when the pool is full).
            let _ = unsafe { dr::stream::synchronize(self.raw.stream) };
            let _ = unsafe { dr::free_sync(p) };
        }
    }

    fn copy_words(&self, src: u64, dst: u64, words: usize) {
        // A placeholder of a failed recording (address 0) is never copied: the recording is
        // discarded anyway.
        if words == 0 || src == 0 || dst == 0 {
            return;
        }
        self.bind();
        self.check(
            unsafe { dr::memcpy_dtod_async(dst, src, words * 4, self.raw.stream) },
            "device copy",
        );
        self.mark(|| format!("copy {} KiB", (words * 4).div_ceil(1024)));
    }

    fn launch(&self, name: &str, grid: u32, block: u32, args: &mut [*mut c_void]) {
        self.launch3(name, (grid, 1, 1), block, args)
    }

    /// A kernel over `planes` planes of `inner` elements (`PLANE_LOOP` in kernels.cu): planes
    /// on the grid's y axis, positions on its x axis, in blocks of [`plane_block`] threads.
    fn launch_planes(&self, name: &str, planes: usize, inner: usize, args: &mut [*mut c_void]) {
        let block = plane_block(inner);
        let x = inner.div_ceil(block as usize).clamp(1, 4096) as u32;
        let y = planes.clamp(1, 65535) as u32;
        self.launch3(name, (x, y, 1), block, args)
    }

    fn launch3(&self, name: &str, grid: (u32, u32, u32), block: u32, args: &mut [*mut c_void]) {
        // A grid sized by an empty dimension (a batch of 0, 0 channels) has nothing to do; the
        // driver would refuse it (CUDA_ERROR_INVALID_VALUE).
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return;
        }
        self.bind();
        let f = &self.funcs[name];
        self.check(
            unsafe {
                dr::launch_kernel(
                    f.cu_function(),
                    grid,
                    (block, 1, 1),
                    0,
                    self.raw.stream,
                    args,
                )
            },
            name,
        );
        self.mark(|| format!("{name} [{}x{}x{}]x{block}", grid.0, grid.1, grid.2));
    }

    /// Under [`CudaBackend::trace`]: an event after the operation just queued, named by
    /// `label` (made only then).
    fn mark(&self, label: impl FnOnce() -> String) {
        if !self.tracing.load(Ordering::Relaxed) {
            return;
        }
        let mut t = self.trace.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tr) = t.as_mut() else { return };
        let ev = match dr::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT) {
            Ok(ev) => ev,
            Err(_) => return,
        };
        if unsafe { dr::event::record(ev, self.raw.stream) }.is_ok() {
            tr.marks.push((label(), ev));
        } else {
            let _ = unsafe { dr::event::destroy(ev) };
        }
    }

    /// Runs `f` with an event after every operation it queues on this GPU, and returns what
    /// each took on the GPU, in order. The stream is first held by a spinning kernel for
    /// `hold_ms`, so that `f` queues its work behind it and the GPU then runs that work back to
    /// back: each time is the operation's own, not a wait for the host. The report says when
    /// the hold was too short (`queued_ms` > `hold_ms`: the later times include such waits)
    /// and when `f` waited for the device (a host read: the times after it do too). Not while
    /// a graph is recorded.
    pub fn trace<R>(&self, hold_ms: f64, f: impl FnOnce() -> R) -> Result<(R, KernelTrace)> {
        let err = |what: &'static str| {
            move |e: dr::DriverError| Error::Device {
                device: "cuda".into(),
                reason: format!("kernel trace: {what}: {e:?}"),
            }
        };
        if self
            .capturing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            return Err(Error::Device {
                device: format!("cuda:{}", self.ordinal),
                reason: "kernel trace: a graph is being recorded".into(),
            });
        }
        self.synchronize();
        let start = dr::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
            .map_err(err("creating an event"))?;
        let tr = Trace {
            start,
            marks: Vec::new(),
            synced: false,
        };
        let ns = (hold_ms.max(0.0) * 1e6) as u64;
        self.launch("spin_wait", 1, 1, &mut args![&ns]);
        unsafe { dr::event::record(start, self.raw.stream) }.map_err(err("recording"))?;
        *self.trace.lock().unwrap_or_else(|e| e.into_inner()) = Some(tr);
        self.tracing.store(true, Ordering::Relaxed);
        let off = TraceOff(self);
        let t0 = std::time::Instant::now();
        let r = f();
        let queued_ms = t0.elapsed().as_secs_f64() * 1e3;
        self.tracing.store(false, Ordering::Relaxed);
        let tr = self
            .trace
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .expect("the trace begun above");
        drop(off);
        self.synchronize();
        let mut ops = Vec::with_capacity(tr.marks.len());
        let mut prev = tr.start;
        let mut failed = None;
        for (label, ev) in &tr.marks {
            match unsafe { dr::event::elapsed(prev, *ev) } {
                Ok(ms) => ops.push((label.clone(), ms as f64 * 1e3)),
                Err(e) => failed = failed.or(Some(e)),
            }
            prev = *ev;
        }
        let synced = tr.synced;
        drop(tr);
        if let Some(e) = failed {
            return Err(err("reading the events")(e));
        }
        Ok((
            r,
            KernelTrace {
                ops,
                queued_ms,
                hold_ms,
                synced,
            },
        ))
    }

    /// `src` to device address `dst` through a page-locked slot (see [`Staging`]).
    fn write_staged(&self, dst: u64, src: &[u8]) {
        let cs = self.raw.stream;
        let mut st = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        if st.slots.len() < STAGE_SLOTS {
            st.slots
                .push((std::ptr::null_mut(), 0, std::ptr::null_mut()));
        }
        let i = st.next % st.slots.len();
        st.next = st.next.wrapping_add(1);
        let (buf, cap, event) = &mut st.slots[i];
        if !event.is_null() {
            // The slot's previous copy must have left before its bytes are overwritten (a
            // host wait, which a kernel trace notes, when it has not).
            if unsafe { dr::event::query(*event) }.is_err() {
                self.note_sync();
            }
            self.check(
                unsafe { dr::event::synchronize(*event) },
                "waiting for a staged copy",
            );
        } else {
            *event = dr::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                .unwrap_or_else(|e| panic!("cuda:{}: creating an event: {e:?}", self.ordinal));
        }
        if *cap < src.len() {
            if !buf.is_null() {
                let _ = unsafe { dr::free_host(*buf as *mut c_void) };
                // Forgotten at once, so that a failed allocation below leaves no dangling slot.
                *buf = std::ptr::null_mut();
                *cap = 0;
            }
            let want = src.len().next_power_of_two().max(4096);
            *buf = unsafe { dr::malloc_host(want, 0) }.unwrap_or_else(|e| {
                panic!(
                    "cuda:{}: allocating {want} bytes of page-locked memory: {e:?}",
                    self.ordinal
                )
            }) as *mut u8;
            *cap = want;
        }
        // SAFETY: `buf` holds `cap >= src.len()` bytes and no copy reads it any more.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), *buf, src.len()) };
        self.check(
            unsafe { sys::cuMemcpyHtoDAsync_v2(dst, *buf as *const c_void, src.len(), cs) }
                .result(),
            "copy to the GPU",
        );
        self.check(unsafe { dr::event::record(*event, cs) }, "copy to the GPU");
        drop(st);
        self.mark(|| format!("upload {} KiB", src.len().div_ceil(1024)));
    }

    /// Notes, under a trace, that the host waited for the device.
    fn note_sync(&self) {
        if self.tracing.load(Ordering::Relaxed) {
            if let Some(t) = self
                .trace
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
            {
                t.synced = true;
            }
        }
    }

    fn new_tensor(&self, shape: &[usize], dtype: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let words = (n * dtype.size()).div_ceil(4);
        Tensor::from_parts(shape, dtype, Storage::Cuda(self.alloc_words(words)))
    }

    /// Scratch of `n` doubles.
    fn scratch_f64(&self, n: usize) -> CudaBuffer {
        self.alloc_words(2 * n.max(1))
    }

    /// cuDNN and its plan for an f32 convolution of `x` by `w`, when cuDNN is loaded and has
    /// suitable algorithms for the shape.
    fn dnn_plan(&self, x: &Tensor, w: &Tensor, win: Window) -> Option<(&dnn::Dnn, &dnn::Plan)> {
        let dnn = self.dnn.as_ref()?;
        if x.dtype() != DType::F32 || w.dtype() != DType::F32 || x.numel() == 0 {
            return None;
        }
        let tf32 = CONV_TF32.load(Ordering::Relaxed);
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.bind();
        let plan = dnn
            .plan(x.shape(), w.shape(), win, tf32)
            .unwrap_or_else(|e| panic!("cuda:{}: {e}", self.ordinal))?;
        Some((dnn, plan))
    }

    /// One line per f32 convolution shape run so far: under `REGIMEN_CONV=auto`, each
    /// direction's timings and choice; with cuDNN loaded, the algorithms it chose for the
    /// shape (and their math), or why it has none. Empty otherwise.
    pub fn conv_plans(&self) -> Vec<String> {
        let mut v = self
            .tune_notes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        v.extend(self.dnn.as_ref().map(|d| d.notes()).unwrap_or_default());
        v
    }

    /// The engines that ran the f32 convolutions so far: "cudnn" (`REGIMEN_CUDNN=1`),
    /// "implicit" (`REGIMEN_CONV=implicit`), "im2col", or several joined by "+" (cuDNN without
    /// an algorithm for some shapes, a size the implicit kernels do not take), after "auto:"
    /// under `REGIMEN_CONV=auto`. With no f32 convolution: "im2col" when 16-bit ones ran (they
    /// always take it), "none" when none ran.
    pub fn conv_engine(&self) -> String {
        let ran = |i: usize| self.conv_runs[i].load(Ordering::Relaxed) > 0;
        let (implicit, im2col, half, cudnn) = (ran(0), ran(1), ran(2), ran(3));
        let mut names: Vec<&str> = Vec::new();
        if cudnn {
            names.push("cudnn");
        }
        if implicit {
            names.push("implicit");
        }
        if im2col || (half && names.is_empty()) {
            names.push("im2col");
        }
        let joined = if names.is_empty() {
            "none".to_string()
        } else {
            names.join("+")
        };
        match self.conv_mode {
            ConvMode::Auto => format!("auto:{joined}"),
            _ => joined,
        }
    }

    /// The geometry for `conv.cu`, when its kernels take this convolution: per-sample sizes
    /// that fit their 32-bit indices.
    fn ig_shape(g: &ConvGeom) -> Option<IgShape> {
        let small = |n: usize| n < i32::MAX as usize;
        if !(small(g.c * g.h * g.w) && small(g.oc * g.p) && small(g.oc * g.k)) {
            return None;
        }
        let i = g.ints();
        Some(IgShape {
            nb: i[0],
            c: i[1],
            h: i[2],
            w: i[3],
            oc: g.oc as i32,
            kh: i[4],
            kw: i[5],
            stride: i[6],
            pad: i[7],
            oh: i[8],
            ow: i[9],
        })
    }

    /// Who computes direction `dir` of the convolution of `x` by `w`: 16-bit operands always
    /// take im2col; f32 ones take cuDNN under `REGIMEN_CUDNN=1` (when it has a plan), else
    /// `REGIMEN_CONV`'s engine, or under `auto` the fastest of `trial`'s timings on the
    /// shape's first use (`tune`).
    fn conv_engine_for(
        &self,
        dir: tune::Dir,
        x: &Tensor,
        w: &Tensor,
        g: &ConvGeom,
        trial: impl FnMut(tune::Engine) -> std::result::Result<(), String>,
    ) -> tune::Engine {
        use tune::Engine;
        if x.dtype() != DType::F32 || w.dtype() != DType::F32 {
            return Engine::Im2col;
        }
        let rows = if dir == tune::Dir::InputGrad {
            g.c
        } else {
            g.oc
        };
        match self.conv_mode {
            _ if self.cudnn_first && self.dnn_plan(x, w, g.win).is_some() => Engine::Cudnn,
            ConvMode::Auto if x.numel() > 0 && w.numel() > 0 => self.tune(dir, x, w, g, trial),
            ConvMode::Implicit if Self::ig_shape(g).is_some() => Engine::implicit_for(rows),
            _ => Engine::Im2col,
        }
    }

    /// The engine of `dir` for this shape: the one chosen before, or the fastest of every
    /// engine that takes it, each run once by `trial` (first launches and cuDNN's planning
    /// untimed, and the GPU's clocks up), then twice `TUNE_RUNS` times between two events in
    /// two rounds, its better round kept. An engine whose trial fails (im2col's column matrix
    /// past half the free memory, no cuDNN plan) is left out; the buffers the trials leave in
    /// the pool are freed. A shape first met while a graph is being recorded (nothing can be
    /// timed then) takes im2col in that recording, and is timed when next met outside one.
    fn tune(
        &self,
        dir: tune::Dir,
        x: &Tensor,
        w: &Tensor,
        g: &ConvGeom,
        mut trial: impl FnMut(tune::Engine) -> std::result::Result<(), String>,
    ) -> tune::Engine {
        const TUNE_RUNS: usize = 5;
        let key = tune::Key {
            x: x.shape().try_into().expect("a 4-d input"),
            w: w.shape().try_into().expect("a 4-d filter"),
            stride: g.win.stride,
            pad: g.win.pad,
            tf32: CONV_TF32.load(Ordering::Relaxed),
        };
        let known = self
            .tuned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(key, dir))
            .copied();
        if let Some(e) = known {
            return e;
        }
        let recording = self
            .capturing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if recording {
            return tune::Engine::Im2col;
        }
        let cudnn = self.dnn_plan(x, w, g.win).is_some();
        let candidates = tune::Engine::candidates(Self::ig_shape(g).is_some(), cudnn);
        self.bind();
        let err = |e: dr::DriverError| format!("{e:?}");
        let event = || dr::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(err);
        let (e0, e1) = (event(), event());
        let mut times: Vec<(tune::Engine, tune::Timing)> = Vec::new();
        for &e in &candidates {
            let first = (|| {
                if e == tune::Engine::Im2col {
                    self.im2col_fits(g)?;
                }
                trial(e)
            })();
            times.push((e, first.map(|()| f64::INFINITY)));
        }
        let stream = self.raw.stream;
        // Milliseconds per run of engine `e`.
        let mut time = |e: tune::Engine| -> tune::Timing {
            let (e0, e1) = (e0.clone()?, e1.clone()?);
            unsafe { dr::event::record(e0, stream) }.map_err(err)?;
            for _ in 0..TUNE_RUNS {
                trial(e)?;
            }
            unsafe { dr::event::record(e1, stream) }.map_err(err)?;
            unsafe { dr::event::synchronize(e1) }.map_err(err)?;
            let ms = unsafe { dr::event::elapsed(e0, e1) }.map_err(err)?;
            Ok(ms as f64 / TUNE_RUNS as f64)
        };
        for _round in 0..2 {
            for (e, t) in times.iter_mut() {
                if let Ok(best) = *t {
                    *t = time(*e).map(|ms| ms.min(best));
                }
            }
        }
        for ev in [e0, e1].into_iter().flatten() {
            unsafe {
                let _ = dr::event::destroy(ev);
            }
        }
        self.release_idle();
        let chosen = tune::fastest(&times).unwrap_or(tune::Engine::Im2col);
        self.tuned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((key, dir), chosen);
        self.tune_notes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tune::line(&key, dir, &times, chosen));
        chosen
    }

    /// Whether im2col's column matrix (and its gradient, as large) fits in half the GPU's
    /// free memory, the pool's idle buffers counted free: a trial past it would end the run
    /// for want of memory, where the other engines need no such matrix.
    fn im2col_fits(&self, g: &ConvGeom) -> std::result::Result<(), String> {
        let need = 2 * g.k * g.nb * g.p * 4;
        let (mut free, mut total) = (0usize, 0usize);
        self.bind();
        unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) }
            .result()
            .map_err(|e| format!("{e:?}"))?;
        let free = free + self.pool.stats().pooled_bytes;
        if need > free / 2 {
            return Err(format!(
                "its column matrices need {} MiB, {} MiB free",
                need >> 20,
                free >> 20
            ));
        }
        Ok(())
    }

    /// Frees the pool's idle buffers (after tuning, whose losing engines' buffers would
    /// otherwise stay allocated for the process), once the stream is done with them.
    fn release_idle(&self) {
        self.bind();
        let _ = unsafe { dr::stream::synchronize(self.raw.stream) };
        for p in self.pool.drain() {
            let _ = unsafe { dr::free_sync(p) };
        }
    }

    /// Counts a direction run by `e` (for `conv_engine`).
    fn count_conv(&self, e: tune::Engine, dtype: DType) {
        let i = match e {
            _ if dtype != DType::F32 => 2,
            tune::Engine::Implicit { .. } => 0,
            tune::Engine::Im2col => 1,
            tune::Engine::Cudnn => 3,
        };
        self.conv_runs[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The implicit-GEMM kernel of `kind` (0 forward, 1 input gradient, 2 weight gradient)
    /// with tile and staging `e` (an `Engine::Implicit`), and its tile `(BM, BN)`: TF32 when
    /// convolutions may use tensor cores (`set_conv_tf32`).
    fn ig_kernel(kind: usize, e: tune::Engine) -> (&'static str, usize, usize) {
        let tune::Engine::Implicit { m32, k32 } = e else {
            unreachable!("an implicit-GEMM engine")
        };
        let tf32 = CONV_TF32.load(Ordering::Relaxed) as usize;
        let (bm, bn) = if m32 { (32, 256) } else { (64, 128) };
        (
            IG_KERNELS[kind][tf32 + 2 * m32 as usize + 4 * k32 as usize],
            bm,
            bn,
        )
    }

    /// y = conv(x, w) (+ b) by engine `e`.
    fn conv_forward_by(
        &self,
        e: tune::Engine,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        g: &ConvGeom,
    ) -> std::result::Result<Tensor, String> {
        match e {
            tune::Engine::Cudnn => {
                let (dnn, plan) = self.dnn_plan(x, w, g.win).ok_or("no cuDNN plan")?;
                let mut y = self.new_tensor(&[g.nb, g.oc, g.oh, g.ow], DType::F32);
                {
                    let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                    self.bind();
                    dnn.forward(plan, ptr(x), ptr(w), ptr(&y))
                        .map_err(|e| e.to_string())?;
                }
                self.mark(|| format!("cuDNN forward {}", g.describe()));
                if let Some(b) = b {
                    self.add_channel_bias(&mut y, b, g.oc);
                }
                Ok(y)
            }
            tune::Engine::Implicit { .. } => {
                let s = Self::ig_shape(g).ok_or("sizes beyond 32-bit indices")?;
                Ok(self.conv_implicit_forward(x, w, b, g, s, e))
            }
            tune::Engine::Im2col => Ok(self.conv_im2col_forward(x, w, b, g)),
        }
    }

    /// dW += the weight gradient by engine `e`; `dyt` is im2col's transposed `dy`, made on
    /// first need and shared with the input gradient.
    fn conv_weight_grad_by(
        &self,
        e: tune::Engine,
        (x, w, dy): (&Tensor, &Tensor, &Tensor),
        g: &ConvGeom,
        dw: &mut Tensor,
        dyt: &mut Option<Tensor>,
    ) -> std::result::Result<(), String> {
        match e {
            tune::Engine::Cudnn => {
                let (dnn, plan) = self.dnn_plan(x, w, g.win).ok_or("no cuDNN plan")?;
                let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                self.bind();
                dnn.weight_grad(plan, ptr(x), ptr(dy), ptr_mut(dw))
                    .map_err(|e| e.to_string())?;
                self.mark(|| format!("cuDNN weight gradient {}", g.describe()));
                Ok(())
            }
            tune::Engine::Implicit { .. } => {
                let s = Self::ig_shape(g).ok_or("sizes beyond 32-bit indices")?;
                self.conv_implicit_weight_grad(x, dy, g, s, dw, e);
                Ok(())
            }
            tune::Engine::Im2col => {
                let dyt = dyt.get_or_insert_with(|| self.conv_dy_t(dy, x.dtype(), g));
                let col = self.im2col(x, g);
                self.im2col_weight_grad(dyt, &col, g, dw);
                Ok(())
            }
        }
    }

    /// The input gradient by engine `e` (`dyt` as for the weight gradient).
    fn conv_input_grad_by(
        &self,
        e: tune::Engine,
        (x, w, dy): (&Tensor, &Tensor, &Tensor),
        g: &ConvGeom,
        dyt: &mut Option<Tensor>,
    ) -> std::result::Result<Tensor, String> {
        match e {
            tune::Engine::Cudnn => {
                let (dnn, plan) = self.dnn_plan(x, w, g.win).ok_or("no cuDNN plan")?;
                let dx = self.new_tensor(x.shape(), DType::F32);
                let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                self.bind();
                dnn.input_grad(plan, ptr(w), ptr(dy), ptr(&dx))
                    .map_err(|e| e.to_string())?;
                self.mark(|| format!("cuDNN input gradient {}", g.describe()));
                Ok(dx)
            }
            tune::Engine::Implicit { .. } => {
                let s = Self::ig_shape(g).ok_or("sizes beyond 32-bit indices")?;
                Ok(self.conv_implicit_input_grad(x, w, dy, g, s, e))
            }
            tune::Engine::Im2col => {
                let dtype = x.dtype();
                let dyt = dyt.get_or_insert_with(|| self.conv_dy_t(dy, dtype, g));
                let tf32 = dtype == DType::F32 && CONV_TF32.load(Ordering::Relaxed);
                // dcol [K, N P] = W^T [K, OC] dy' [OC, N P]
                let dcol = self.new_tensor(&[g.k, g.nb * g.p], DType::F32);
                self.gemm(
                    (true, false),
                    (g.k, g.nb * g.p, g.oc),
                    (ptr(w), g.k),
                    (ptr(dyt), g.nb * g.p),
                    (ptr(&dcol), g.nb * g.p),
                    dtype,
                    0.0,
                    tf32,
                );
                let dx = self.new_tensor(x.shape(), DType::F32);
                let (dcp, dxp) = (ptr(&dcol), ptr(&dx));
                let gi = g.ints();
                self.launch_planes(
                    "col2im",
                    g.nb * g.c,
                    g.h * g.w,
                    &mut args![
                        &dcp, &dxp, &gi[0], &gi[1], &gi[2], &gi[3], &gi[4], &gi[5], &gi[6], &gi[7],
                        &gi[8], &gi[9]
                    ],
                );
                Ok(dx)
            }
        }
    }

    /// dy' [OC, N P] in the product type `dtype` (im2col's layout of `dy`).
    fn conv_dy_t(&self, dy: &Tensor, dtype: DType, g: &ConvGeom) -> Tensor {
        let dyt = self.new_tensor(&[g.oc, g.nb * g.p], dtype);
        let mode: i32 = match dtype {
            DType::F32 => 0,
            DType::BF16 => 1,
            _ => 2,
        };
        let (dyp, dytp, nb, oc, p) = (ptr(dy), ptr(&dyt), g.nb as i32, g.oc as i32, g.p as i64);
        self.launch_planes(
            "conv_dy_t",
            g.nb * g.oc,
            g.p,
            &mut args![&dyp, &dytp, &nb, &oc, &p, &mode],
        );
        dyt
    }

    /// y = conv(x, w) (+ b) by im2col and one product (f32 or 16-bit operands).
    fn conv_im2col_forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        g: &ConvGeom,
    ) -> Tensor {
        let col = self.im2col(x, g);
        // Image n: y_n [OC, P] = W [OC, K] col_n, col_n the P columns of image n in
        // col [K, N P]; one strided-batched product writes y in NCHW (no permute).
        let mut y = self.new_tensor(&[g.nb, g.oc, g.oh, g.ow], DType::F32);
        self.gemm_batched(
            (false, false),
            (g.oc, g.p, g.k),
            (ptr(w), g.k, 0),
            (ptr(&col), g.nb * g.p, g.p),
            (ptr(&y), g.p, g.oc * g.p),
            g.nb,
            x.dtype(),
            x.dtype() == DType::F32 && CONV_TF32.load(Ordering::Relaxed),
        );
        drop(col);
        if let Some(b) = b {
            self.add_channel_bias(&mut y, b, g.oc);
        }
        y
    }

    /// y = conv(x, w) (+ b) by `conv_ig_fwd_*` with tile and staging `e`.
    fn conv_implicit_forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        g: &ConvGeom,
        s: IgShape,
        e: tune::Engine,
    ) -> Tensor {
        let y = self.new_tensor(&[g.nb, g.oc, g.oh, g.ow], DType::F32);
        if y.numel() == 0 {
            return y;
        }
        let (xp, wp, bp, yp) = (ptr(x), ptr(w), b.map_or(0, ptr), ptr(&y));
        let (tp, _tab) = self.ig_table(s, g.c * g.win.kh * g.win.kw, false);
        let (kernel, bm, bn) = Self::ig_kernel(0, e);
        let grid = (
            (g.nb * g.p).div_ceil(bn) as u32,
            g.oc.div_ceil(bm) as u32,
            1,
        );
        self.launch3(
            kernel,
            grid,
            IG_THREADS,
            &mut args![&xp, &wp, &bp, &yp, &tp, &s],
        );
        y
    }

    /// The window table of `conv_ig_ktab` for a reduction of `k` indices (the forward's
    /// C kh kw, or the input gradient's OC kh kw with `dx`), padded to a multiple of 32 (the
    /// largest staging): one `int4` (4 words) per entry, made on the device by a kernel. It
    /// depends on the shape but not the batch, so it is made once and kept for the process
    /// (two launches per convolution and step fewer); one first needed while a graph is being
    /// recorded is made in the recording and returned with the pointer, to live as long as
    /// the caller's launch needs it.
    fn ig_table(&self, s: IgShape, k: usize, dx: bool) -> (u64, Option<Tensor>) {
        let key = (
            [s.c, s.h, s.w, s.oc, s.kh, s.kw, s.stride, s.pad, s.oh, s.ow],
            dx,
        );
        let mut tables = self.ig_tables.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = tables.get(&key) {
            return (ptr(t), None);
        }
        let n = k.next_multiple_of(32).max(32);
        let tab = self.new_tensor(&[4 * n], DType::F32);
        let (tp, dxi, ni) = (ptr(&tab), dx as i32, n as i32);
        self.launch(
            "conv_ig_ktab",
            blocks_for(n),
            BLOCK,
            &mut args![&s, &tp, &dxi, &ni],
        );
        let recording = self
            .capturing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if recording {
            return (tp, Some(tab));
        }
        tables.insert(key, tab);
        (tp, None)
    }

    /// dW += the weight gradient by `conv_ig_dw_*` with tile and staging `e` (chunks of the
    /// reduction over N P, then `conv_ig_dw_sum`).
    fn conv_implicit_weight_grad(
        &self,
        x: &Tensor,
        dy: &Tensor,
        g: &ConvGeom,
        s: IgShape,
        dw: &mut Tensor,
        e: tune::Engine,
    ) {
        let (xp, dyp, dwp) = (ptr(x), ptr(dy), ptr_mut(dw));
        let np = g.nb * g.p;
        let mk = g.oc * g.k;
        if np == 0 || mk == 0 {
            return;
        }
        let (kernel, bm, bn) = Self::ig_kernel(2, e);
        let (chunks, chunk) = dw_chunks(np, g.k.div_ceil(bn) * g.oc.div_ceil(bm));
        let part = self.new_tensor(&[chunks * mk], DType::F32);
        let pp = ptr(&part);
        let grid = (
            g.k.div_ceil(bn) as u32,
            g.oc.div_ceil(bm) as u32,
            chunks as u32,
        );
        let chunk = chunk as i32;
        self.launch3(
            kernel,
            grid,
            IG_THREADS,
            &mut args![&xp, &dyp, &pp, &s, &chunk],
        );
        let (chunks, mk) = (chunks as i32, mk as i64);
        self.launch(
            "conv_ig_dw_sum",
            (mk as usize).div_ceil(32) as u32,
            BLOCK,
            &mut args![&pp, &dwp, &chunks, &mk],
        );
    }

    /// The input gradient by `conv_ig_dx_*` with tile and staging `e`.
    fn conv_implicit_input_grad(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        g: &ConvGeom,
        s: IgShape,
        e: tune::Engine,
    ) -> Tensor {
        let mut dx = self.new_tensor(x.shape(), DType::F32);
        if dx.numel() == 0 {
            return dx;
        }
        if g.nb * g.p == 0 || g.oc == 0 {
            // No output position or no filter: nothing reaches the input.
            self.fill(&mut dx, 0.0);
            return dx;
        }
        let (wp, dyp, dxp) = (ptr(w), ptr(dy), ptr(&dx));
        let (tp, _tab) = self.ig_table(s, g.oc * g.win.kh * g.win.kw, true);
        let (kernel, bm, bn) = Self::ig_kernel(1, e);
        let grid = (
            (g.nb * g.h * g.w).div_ceil(bn) as u32,
            g.c.div_ceil(bm) as u32,
            1,
        );
        self.launch3(
            kernel,
            grid,
            IG_THREADS,
            &mut args![&dyp, &wp, &dxp, &tp, &s],
        );
        dx
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        (ta, tb): (bool, bool),
        (m, n, k): (usize, usize, usize),
        (a, lda): (u64, usize),
        (b, ldb): (u64, usize),
        (c, ldc): (u64, usize),
        dtype: DType,
        beta: f32,
        tf32: bool,
    ) {
        use bsys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        if m == 0 || n == 0 {
            return;
        }
        let (ab_type, compute) = gemm_types(dtype, tf32);
        let alpha = 1.0f32;
        let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
        self.bind();
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        // Row-major C[m, n] = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
        let r = unsafe {
            blas::gemm_ex(
                self.raw.blas,
                op(tb),
                op(ta),
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                b as *const c_void,
                ab_type,
                ldb as i32,
                a as *const c_void,
                ab_type,
                lda as i32,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                bsys::cudaDataType_t::CUDA_R_32F,
                ldc as i32,
                compute,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        if let Err(e) = r {
            panic!("cuda:{}: cublasGemmEx {m}x{n}x{k}: {e:?}", self.ordinal);
        }
        self.mark(|| gemm_label((ta, tb), (m, n, k), 1, dtype, tf32));
    }

    /// `batch` products as [`CudaBackend::gemm`] (beta 0), the `i`-th on A, B and C advanced by
    /// `i` times their stride (in elements).
    #[allow(clippy::too_many_arguments)]
    fn gemm_batched(
        &self,
        (ta, tb): (bool, bool),
        (m, n, k): (usize, usize, usize),
        (a, lda, sa): (u64, usize, usize),
        (b, ldb, sb): (u64, usize, usize),
        (c, ldc, sc): (u64, usize, usize),
        batch: usize,
        dtype: DType,
        tf32: bool,
    ) {
        use bsys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        if m == 0 || n == 0 || batch == 0 {
            return;
        }
        let (ab_type, compute) = gemm_types(dtype, tf32);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
        self.bind();
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let r = unsafe {
            blas::gemm_strided_batched_ex(
                self.raw.blas,
                op(tb),
                op(ta),
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                b as *const c_void,
                ab_type,
                ldb as i32,
                sb as i64,
                a as *const c_void,
                ab_type,
                lda as i32,
                sa as i64,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                bsys::cudaDataType_t::CUDA_R_32F,
                ldc as i32,
                sc as i64,
                batch as i32,
                compute,
                bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        if let Err(e) = r {
            panic!(
                "cuda:{}: cublasGemmStridedBatchedEx {batch} x {m}x{n}x{k}: {e:?}",
                self.ordinal
            );
        }
        self.mark(|| gemm_label((ta, tb), (m, n, k), batch, dtype, tf32));
    }

    /// dW [OC, K] += dy' [OC, N P] col^T over a reduction of N P terms (100,352 for cnn-step's
    /// second layer at batch 128, 401,408 at 512) into an output of OC K values (9,216): one
    /// product would leave most of the GPU idle, each of its few tiles walking the whole
    /// reduction. Split into `splits` products of equal length (one batched call, each into its
    /// own partial [OC, K]; the remainder added onto the first), then the partials summed in
    /// order into dW (`conv_ig_dw_sum`, as the implicit weight gradient's): deterministic.
    fn im2col_weight_grad(&self, dyt: &Tensor, col: &Tensor, g: &ConvGeom, dw: &mut Tensor) {
        let dtype = col.dtype();
        let tf32 = dtype == DType::F32 && CONV_TF32.load(Ordering::Relaxed);
        let np = g.nb * g.p;
        let mk = g.oc * g.k;
        let (splits, len) = gemm_splits(np, g.oc, g.k);
        if splits == 1 {
            self.gemm(
                (false, true),
                (g.oc, g.k, np),
                (ptr(dyt), np),
                (ptr(col), np),
                (ptr_mut(dw), g.k),
                dtype,
                1.0,
                tf32,
            );
            return;
        }
        let part = self.new_tensor(&[splits, g.oc, g.k], DType::F32);
        self.gemm_batched(
            (false, true),
            (g.oc, g.k, len),
            (ptr(dyt), np, len),
            (ptr(col), np, len),
            (ptr(&part), g.k, mk),
            splits,
            dtype,
            tf32,
        );
        let done = splits * len;
        if done < np {
            let skip = (done * dtype.size()) as u64;
            self.gemm(
                (false, true),
                (g.oc, g.k, np - done),
                (ptr(dyt) + skip, np),
                (ptr(col) + skip, np),
                (ptr(&part), g.k),
                dtype,
                1.0,
                tf32,
            );
        }
        let (pp, dwp, chunks, n) = (ptr(&part), ptr_mut(dw), splits as i32, mk as i64);
        self.launch(
            "conv_ig_dw_sum",
            mk.div_ceil(32) as u32,
            BLOCK,
            &mut args![&pp, &dwp, &chunks, &n],
        );
    }

    /// Sum (op 0), sum |x| (1), sum x^2 (2) or "all finite" (3) of a tensor, as a new `[1]`.
    fn reduce(&self, x: &Tensor, op: i32) -> Tensor {
        let n = x.numel();
        let (blocks, per) = reduce_split(n);
        let part = self.scratch_f64(blocks as usize);
        let (xp, pp, n64) = (ptr(x), part.ptr, n as i64);
        if n > 0 {
            self.launch(
                "reduce_partial",
                blocks,
                BLOCK,
                &mut args![&xp, &n64, &per, &op, &pp],
            );
        }
        let out = self.new_tensor(&[1], DType::F32);
        let (op_, count, mode, div) = (
            ptr(&out),
            if n > 0 { blocks as i32 } else { 0 },
            if op == 3 { 1i32 } else { 0 },
            1.0f64,
        );
        self.launch(
            "finish_sum",
            1,
            BLOCK,
            &mut args![&pp, &count, &mode, &div, &op_],
        );
        out
    }
}

static PTX: Mutex<Vec<((i32, i32), String)>> = Mutex::new(Vec::new());

/// The PTX for `arch`: compiled once per process, and kept on disk for the next processes
/// ([`kernel_cache_dir`]; NVRTC takes seconds over these kernels, every process on a GPU
/// paid them).
fn ptx_for(arch: (i32, i32)) -> Result<String> {
    let mut cache = PTX.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = cache.iter().find(|(a, _)| *a == arch) {
        return Ok(p.clone());
    }
    let key = kernel_key(arch);
    let p = cached_ptx(kernel_cache_dir().as_deref(), &key, || {
        compile_kernels(arch)
    })?;
    cache.push((arch, p.clone()));
    Ok(p)
}

/// The folder of compiled kernels kept between processes: `REGIMEN_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/regimen`, else `$HOME/.cache/regimen`.
fn kernel_cache_dir() -> Option<std::path::PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    var("REGIMEN_CACHE_DIR")
        .map(Into::into)
        .or_else(|| var("XDG_CACHE_HOME").map(|d| std::path::Path::new(&d).join("regimen")))
        .or_else(|| var("HOME").map(|d| std::path::Path::new(&d).join(".cache/regimen")))
}

/// What the PTX depends on, hashed: the kernels' source, NVRTC's options for `arch` and
/// NVRTC's version.
fn kernel_key(arch: (i32, i32)) -> String {
    let (mut major, mut minor) = (0, 0);
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        // SAFETY: two out-parameters; the library is present.
        let _ = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    }
    let mut text = KERNELS.as_bytes().to_vec();
    text.extend(format!("\0{:?}\0nvrtc {major}.{minor}", nvrtc_options(arch)).bytes());
    crate::data::download::sha256_hex(&text)
}

/// The PTX kept in `dir` under `key`, when a whole file is there (it ends with a line naming
/// the key); else `compile()`'s, written there atomically for the next process (a folder that
/// cannot be written is passed over: the PTX is still returned).
fn cached_ptx(
    dir: Option<&std::path::Path>,
    key: &str,
    compile: impl FnOnce() -> Result<String>,
) -> Result<String> {
    let end = format!("\n// regimen kernels {key}\n");
    let path = dir.map(|d| d.join(format!("kernels-{}.ptx", &key[..32])));
    if let Some(text) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        if let Some(ptx) = text.strip_suffix(&end) {
            return Ok(ptx.to_string());
        }
    }
    let ptx = compile()?;
    if let (Some(dir), Some(path)) = (dir, &path) {
        if std::fs::create_dir_all(dir).is_ok() {
            let _ = crate::io::write_atomic(path, format!("{ptx}{end}").as_bytes());
        }
    }
    Ok(ptx)
}

/// The bytes of a slice of plain numbers.
fn bytemuck_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: f32, u16 and u32 have no padding and every byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn buf(t: &Tensor) -> &CudaBuffer {
    match t.storage() {
        Storage::Cuda(b) => b,
        _ => panic!("a {} tensor reached the CUDA backend", t.device()),
    }
}

/// The device address of a tensor's data.
fn ptr(t: &Tensor) -> u64 {
    buf(t).ptr
}

/// The device address of a tensor's data, for writing (copied first if shared).
fn ptr_mut(t: &mut Tensor) -> u64 {
    let device = t.device();
    match t.storage_mut() {
        Storage::Cuda(b) => b.ptr,
        _ => panic!("a {device} tensor reached the CUDA backend"),
    }
}

fn n_inner(shape: &[usize], channels: usize) -> (usize, usize) {
    let n = shape[0];
    let total: usize = shape.iter().product();
    (n, total / (n * channels).max(1))
}

fn unary_code(op: Unary) -> (i32, f32, f32) {
    match op {
        Unary::Sigmoid => (0, 0.0, 0.0),
        Unary::Tanh => (1, 0.0, 0.0),
        Unary::Relu => (2, 0.0, 0.0),
        Unary::LeakyRelu(a) => (3, a, 0.0),
        Unary::Elu(a) => (4, a, 0.0),
        Unary::Selu => (5, 0.0, 0.0),
        Unary::Softplus { beta, threshold } => (6, beta, threshold),
        Unary::Gelu => (7, 0.0, 0.0),
        Unary::Mish => (8, 0.0, 0.0),
        Unary::Swish(b) => (9, b, 0.0),
    }
}

/// The kernels that come in twins for activations in f32 and in bf16 (kernels.cu's
/// `ACT_TWINS`): the f32 kernel and its bf16 twin.
const ACT_TWIN_KERNELS: [(&str, &str); 14] = [
    ("bn_stats_partial", "bn_stats_partial_h"),
    ("bn_apply", "bn_apply_h"),
    ("bn_eval", "bn_eval_h"),
    ("bn_bwd_dx", "bn_bwd_dx_h"),
    ("bn_relu_apply", "bn_relu_apply_h"),
    ("bn_relu_pool_apply", "bn_relu_pool_apply_h"),
    ("bn_after_bwd_partial", "bn_after_bwd_partial_h"),
    ("bn_after_bwd_dx", "bn_after_bwd_dx_h"),
    ("bn_row_stats_partial", "bn_row_stats_partial_h"),
    ("bn_row_apply", "bn_row_apply_h"),
    ("bn_row_eval", "bn_row_eval_h"),
    ("bn_row_bwd_partial", "bn_row_bwd_partial_h"),
    ("bn_row_bwd_dx", "bn_row_bwd_dx_h"),
    ("dropout_fwd", "dropout_fwd_h"),
];

/// The kernel `name` (one of [`ACT_TWIN_KERNELS`]) for activations `x`: `name` in f32, its
/// twin in bf16 (bf16 activations). Any other type is refused.
fn act_kernel(name: &'static str, x: &Tensor) -> &'static str {
    let twin = || {
        let pair = ACT_TWIN_KERNELS.iter().find(|(f, _)| *f == name);
        pair.unwrap_or_else(|| panic!("no bf16 twin of {name}")).1
    };
    match x.dtype() {
        DType::F32 => name,
        DType::BF16 => twin(),
        t => panic!("{name}: activations in f32 or bf16, got {t:?}"),
    }
}

/// Splits of the batch axis for per-channel statistics (`inner` values per sample and
/// channel): about 2048 blocks in all, several per multiprocessor (264, two per
/// multiprocessor, left each block walking 14 to 102 samples one after another), but at
/// least about 2048 values per block; a function of the shape alone (so results do not
/// depend on timing).
fn bn_splits(nb: usize, c: usize, inner: usize) -> usize {
    let by_blocks = 2048usize.div_ceil(c.max(1));
    let by_values = (nb * inner).div_ceil(2048);
    by_blocks.min(by_values).clamp(1, nb.max(1))
}

/// One parameter tensor in the update kernel's table (the `ParamSlot` of kernels.cu).
#[repr(C)]
#[derive(Clone, Copy)]
struct ParamSlot {
    p: u64,
    g: u64,
    s0: u64,
    s1: u64,
    s2: u64,
    n: i64,
    first_block: i64,
    lr_scale: f32,
    wd: f32,
}

const UPDATE_PER_BLOCK: i64 = 4096;

struct CudaGraph {
    exec: sys::CUgraphExec,
    graph: sys::CUgraph,
    backend: &'static CudaBackend,
    _arena: Arc<Arena>,
}
// SAFETY: the handles are only used through the backend's stream.
unsafe impl Send for CudaGraph {}

impl Graph for CudaGraph {
    fn replay(&self) -> Result<()> {
        self.backend.bind();
        let r = unsafe { dr::graph::launch(self.exec, self.backend.raw.stream) }
            .map_err(derr("replaying a graph"));
        self.backend.mark(|| "CUDA graph replay".into());
        r
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        self.backend.bind();
        unsafe {
            let _ = dr::stream::synchronize(self.backend.raw.stream);
            let _ = dr::graph::exec_destroy(self.exec);
            let _ = dr::graph::destroy(self.graph);
        }
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }

    fn alloc(&self, shape: &[usize], dtype: DType) -> Tensor {
        self.new_tensor(shape, dtype)
    }

    fn zeros(&self, shape: &[usize], dtype: DType) -> Tensor {
        let mut t = self.new_tensor(shape, dtype);
        self.fill(&mut t, 0.0);
        t
    }

    fn upload(&self, shape: &[usize], dtype: DType, data: HostBuf) -> Tensor {
        let mut t = self.new_tensor(shape, dtype);
        self.write(&mut t, data);
        t
    }

    fn write(&self, t: &mut Tensor, data: HostBuf) {
        assert_eq!(data.len(), t.numel(), "write: length of the host data");
        if t.numel() == 0 {
            return;
        }
        let data = match (t.dtype(), data) {
            (DType::BF16, HostBuf::F32(v)) => HostBuf::U16(
                v.into_iter()
                    .map(|x| half::bf16::from_f32(x).to_bits())
                    .collect(),
            ),
            (DType::F16, HostBuf::F32(v)) => HostBuf::U16(
                v.into_iter()
                    .map(|x| half::f16::from_f32(x).to_bits())
                    .collect(),
            ),
            (_, d) => d,
        };
        let dst = ptr_mut(t);
        self.bind();
        let bytes = match &data {
            HostBuf::F32(v) => v.len() * 4,
            HostBuf::U16(v) => v.len() * 2,
            HostBuf::U32(v) => v.len() * 4,
        };
        let recording = self
            .capturing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if bytes <= STAGE_MAX && !recording {
            let src: &[u8] = match &data {
                HostBuf::F32(v) => bytemuck_bytes(v),
                HostBuf::U16(v) => bytemuck_bytes(v),
                HostBuf::U32(v) => bytemuck_bytes(v),
            };
            self.write_staged(dst, src);
            return;
        }
        let cs = self.raw.stream;
        let r = unsafe {
            match &data {
                HostBuf::F32(v) => dr::memcpy_htod_async(dst, v, cs),
                HostBuf::U16(v) => dr::memcpy_htod_async(dst, v, cs),
                HostBuf::U32(v) => dr::memcpy_htod_async(dst, v, cs),
            }
        };
        self.check(r, "copy to the GPU");
        self.mark(|| format!("upload {} KiB", bytes.div_ceil(1024)));
        // A pageable source may be read after the call returns: wait before it is dropped.
        self.note_sync();
        self.check(unsafe { dr::stream::synchronize(cs) }, "copy to the GPU");
    }

    fn download(&self, t: &Tensor) -> HostBuf {
        // (Staged writes are in the stream ahead of this copy: the stream orders them.)
        strict::note_host_read("a GPU tensor");
        self.bind();
        let n = t.numel();
        let src = if n == 0 { 0 } else { ptr(t) };
        let cs = self.raw.stream;
        let out = match t.dtype() {
            DType::F32 => {
                let mut v = vec![0f32; n];
                if n > 0 {
                    self.check(
                        unsafe { dr::memcpy_dtoh_async(&mut v, src, cs) },
                        "copy from the GPU",
                    );
                }
                HostBuf::F32(v)
            }
            DType::U32 => {
                let mut v = vec![0u32; n];
                if n > 0 {
                    self.check(
                        unsafe { dr::memcpy_dtoh_async(&mut v, src, cs) },
                        "copy from the GPU",
                    );
                }
                HostBuf::U32(v)
            }
            _ => {
                let mut v = vec![0u16; n];
                if n > 0 {
                    self.check(
                        unsafe { dr::memcpy_dtoh_async(&mut v, src, cs) },
                        "copy from the GPU",
                    );
                }
                HostBuf::U16(v)
            }
        };
        self.note_sync();
        self.check(unsafe { dr::stream::synchronize(cs) }, "copy from the GPU");
        out
    }

    fn fill(&self, t: &mut Tensor, value: f32) {
        let n = t.numel();
        let dtype = t.dtype();
        let p = ptr_mut(t);
        // A placeholder at address 0 (handed out while a failing recording ran out of pooled
        // buffers; `end_capture` reports it) is left alone, as `copy_words` does.
        if n == 0 || p == 0 {
            return;
        }
        self.bind();
        let cs = self.raw.stream;
        let r = unsafe {
            match dtype {
                DType::F32 => sys::cuMemsetD32Async(p, value.to_bits(), n, cs).result(),
                DType::U32 => sys::cuMemsetD32Async(p, value as u32, n, cs).result(),
                DType::BF16 => {
                    sys::cuMemsetD16Async(p, half::bf16::from_f32(value).to_bits(), n, cs).result()
                }
                DType::F16 => {
                    sys::cuMemsetD16Async(p, half::f16::from_f32(value).to_bits(), n, cs).result()
                }
            }
        };
        self.check(r, "fill");
        self.mark(|| format!("fill {n} x {dtype}"));
    }

    fn copy(&self, src: &Tensor, dst: &mut Tensor) {
        assert_eq!(
            (src.numel(), src.dtype()),
            (dst.numel(), dst.dtype()),
            "copy"
        );
        let words = (src.numel() * src.dtype().size()).div_ceil(4);
        let d = ptr_mut(dst);
        self.copy_words(ptr(src), d, words);
    }

    fn cast(&self, x: &Tensor, dtype: DType) -> Tensor {
        let y = self.new_tensor(x.shape(), dtype);
        let n = x.numel() as i64;
        let k = match (x.dtype(), dtype) {
            (a, b) if a == b => {
                self.copy_words(ptr(x), ptr(&y), (x.numel() * a.size()).div_ceil(4));
                return y;
            }
            (DType::F32, DType::BF16) => "cast_f32_bf16",
            (DType::F32, DType::F16) => "cast_f32_f16",
            (DType::BF16, DType::F32) => "cast_bf16_f32",
            (DType::F16, DType::F32) => "cast_f16_f32",
            (DType::BF16, DType::F16) | (DType::F16, DType::BF16) => {
                return self.cast(&self.cast(x, DType::F32), dtype);
            }
            (a, b) => panic!("cast from {a} to {b}"),
        };
        if n > 0 {
            let (xp, yp) = (ptr(x), ptr(&y));
            self.launch(k, blocks_for(n as usize), BLOCK, &mut args![&xp, &yp, &n]);
        }
        y
    }

    fn synchronize(&self) {
        self.note_sync();
        self.bind();
        self.check(
            unsafe { dr::stream::synchronize(self.raw.stream) },
            "synchronize",
        );
    }

    fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    fn begin_capture(&self) -> Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut cap = self.capturing.lock().unwrap_or_else(|e| e.into_inner());
        if cap.is_some() {
            return Err(Error::Device {
                device: self.device().to_string(),
                reason: "already recording a graph".into(),
            });
        }
        self.bind();
        unsafe {
            dr::stream::begin_capture(
                self.raw.stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .map_err(derr("starting a graph capture"))?;
        self.capture_miss.store(false, Ordering::Relaxed);
        *cap = Some(Arc::new(Arena {
            free: Mutex::new(HashMap::new()),
            ordinal: self.ordinal,
        }));
        Ok(())
    }

    fn end_capture(&self) -> Result<Box<dyn Graph>> {
        let arena = {
            let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.capturing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
        };
        let Some(arena) = arena else {
            return Err(Error::Device {
                device: self.device().to_string(),
                reason: "end_capture without begin_capture".into(),
            });
        };
        self.bind();
        let graph = unsafe { dr::stream::end_capture(self.raw.stream) }
            .map_err(derr("ending a graph capture"))?;
        if self.capture_miss.load(Ordering::Relaxed) {
            unsafe {
                let _ = dr::graph::destroy(graph);
            }
            return Err(Error::Device {
                device: self.device().to_string(),
                reason: "a buffer was needed while recording and the pool had none free: run \
                         the step once before recording it"
                    .into(),
            });
        }
        let exec = unsafe { dr::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) }
            .map_err(derr("instantiating a graph"))?;
        Ok(Box::new(CudaGraph {
            exec,
            graph,
            backend: backend_of(self.ordinal),
            _arena: arena,
        }))
    }

    fn matmul(
        &self,
        a: &Tensor,
        trans_a: bool,
        b: &Tensor,
        trans_b: bool,
        c: &mut Tensor,
        accumulate: bool,
    ) {
        let (ar, ac) = (a.shape()[0], a.shape()[1]);
        let (br, bc) = (b.shape()[0], b.shape()[1]);
        let (m, k) = if trans_a { (ac, ar) } else { (ar, ac) };
        let n = if trans_b { br } else { bc };
        assert_eq!(a.dtype(), b.dtype(), "matmul operands of one type");
        let cp = ptr_mut(c);
        if k == 0 {
            if !accumulate {
                self.fill(c, 0.0);
            }
            return;
        }
        self.gemm(
            (trans_a, trans_b),
            (m, n, k),
            (ptr(a), ac),
            (ptr(b), bc),
            (cp, n),
            a.dtype(),
            if accumulate { 1.0 } else { 0.0 },
            false,
        );
    }

    fn add_channel_bias(&self, y: &mut Tensor, bias: &Tensor, channels: usize) {
        let (rows, inner) = n_inner(y.shape(), channels);
        if inner == 1 {
            // [rows, C]: channels along the grid's x axis (a block per value otherwise).
            let (yp, bp, c, r) = (ptr_mut(y), ptr(bias), channels as i32, rows as i64);
            if rows > 0 && channels > 0 {
                self.launch_planes("add_row_bias", rows, channels, &mut args![&yp, &bp, &r, &c]);
            }
            return;
        }
        let n = y.numel() as i64;
        let (yp, bp, c, inner) = (ptr_mut(y), ptr(bias), channels as i32, inner as i64);
        let planes = n / inner.max(1);
        if n > 0 {
            self.launch_planes(
                "add_channel_bias",
                (n / inner) as usize,
                inner as usize,
                &mut args![&yp, &bp, &planes, &c, &inner],
            );
        }
    }

    fn bias_relu(&self, y: &mut Tensor, bias: Option<&Tensor>, channels: usize) {
        let (rows, inner) = n_inner(y.shape(), channels);
        if inner != 1 {
            return crate::backend::unfused::bias_relu(self, y, bias, channels);
        }
        // [rows, C]: one pass, in place.
        let (yp, c, r) = (ptr_mut(y), channels as i32, rows as i64);
        let bp = bias.map_or(0u64, ptr);
        if rows > 0 && channels > 0 {
            self.launch_planes(
                "add_row_bias_relu",
                rows,
                channels,
                &mut args![&yp, &bp, &r, &c],
            );
        }
    }

    fn bias_relu_dropout(
        &self,
        y: &mut Tensor,
        bias: Option<&Tensor>,
        channels: usize,
        p: f32,
        key: RandomKey<'_>,
    ) {
        let (_, inner) = n_inner(y.shape(), channels);
        if inner != 1 {
            return crate::backend::unfused::bias_relu_dropout(self, y, bias, channels, p, key);
        }
        // [rows, C]: one pass in dropout_fwd's blocks of four draws, in place.
        let n = y.numel() as i64;
        let (yp, c, sp) = (ptr_mut(y), channels as i32, ptr(key.step.tensor()));
        let bp = bias.map_or(0u64, ptr);
        if n > 0 && c > 0 {
            self.launch(
                "add_row_bias_relu_dropout",
                blocks_for((n as usize).div_ceil(4)),
                BLOCK,
                &mut args![&yp, &bp, &n, &c, &p, &key.stream, &sp, &key.purpose],
            );
        }
    }

    fn bias_relu_backward(
        &self,
        y: &Tensor,
        dy: &Tensor,
        dbias: Option<&mut Tensor>,
        channels: usize,
        keep: f32,
    ) -> Tensor {
        let (nb, inner) = n_inner(dy.shape(), channels);
        if inner != 1 {
            return crate::backend::unfused::bias_relu_backward(self, y, dy, dbias, channels, keep);
        }
        // [N, C]: the mask, the dropout's scale and the bias's sums (none without a bias) in
        // one pass (row_sum_acc's blocks).
        // (`y` in f32, or in bf16 as a linear layer keeps it under bf16 activations.)
        let y = match y.dtype() {
            DType::F32 | DType::BF16 => y.clone(),
            _ => y.to_dtype(DType::F32),
        };
        let y_bf16 = i32::from(y.dtype() == DType::BF16);
        let dz = self.new_tensor(dy.shape(), DType::F32);
        let (yp, dyp, dzp) = (ptr(&y), ptr(dy), ptr(&dz));
        let bp = dbias.map_or(0u64, ptr_mut);
        let (nb, c) = (nb as i32, channels as i32);
        if nb > 0 && c > 0 {
            self.launch(
                "relu_row_sum_acc",
                channels.div_ceil(32) as u32,
                1024,
                &mut args![&yp, &y_bf16, &dyp, &dzp, &bp, &nb, &c, &keep],
            );
        }
        dz
    }

    fn channel_bias_backward(&self, dy: &Tensor, dbias: &mut Tensor, channels: usize) {
        let (nb, inner) = n_inner(dy.shape(), channels);
        if inner == 1 {
            // [N, C]: 32 channels per block of 32 warps, coalesced (a thread per column
            // otherwise; `ROW_SUM_WARPS` in kernels.cu).
            let (dp, bp, nb, c) = (ptr(dy), ptr_mut(dbias), nb as i32, channels as i32);
            self.launch(
                "row_sum_acc",
                channels.div_ceil(32) as u32,
                1024,
                &mut args![&dp, &bp, &nb, &c],
            );
            return;
        }
        let (dp, bp, nb, c, inner) = (
            ptr(dy),
            ptr_mut(dbias),
            nb as i32,
            channels as i32,
            inner as i64,
        );
        self.launch(
            "channel_sum_acc",
            channels as u32,
            BLOCK,
            &mut args![&dp, &bp, &nb, &c, &inner],
        );
    }

    fn axpy(&self, alpha: f32, x: &Tensor, y: &mut Tensor) {
        let n = x.numel() as i64;
        let (xp, yp) = (ptr(x), ptr_mut(y));
        if n > 0 {
            self.launch(
                "axpy",
                blocks_for(n as usize),
                BLOCK,
                &mut args![&alpha, &xp, &yp, &n],
            );
        }
    }

    fn scale(&self, x: &mut Tensor, alpha: f32) {
        let n = x.numel() as i64;
        let xp = ptr_mut(x);
        if n > 0 {
            self.launch(
                "scale",
                blocks_for(n as usize),
                BLOCK,
                &mut args![&xp, &alpha, &n],
            );
        }
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Tensor {
        self.binary("add", a, b)
    }

    fn mul(&self, a: &Tensor, b: &Tensor) -> Tensor {
        self.binary("mul", a, b)
    }

    fn scale_rows(&self, x: &Tensor, s: &Tensor) -> Tensor {
        let y = self.new_tensor(x.shape(), DType::F32);
        let n = x.numel() as i64;
        let row = (x.numel() / x.shape()[0].max(1)).max(1) as i64;
        let rows = x.shape()[0] as i64;
        let (xp, sp, yp) = (ptr(x), ptr(s), ptr(&y));
        if n > 0 {
            self.launch_planes(
                "scale_rows",
                x.shape()[0],
                row as usize,
                &mut args![&xp, &sp, &yp, &rows, &row],
            );
        }
        y
    }

    fn clamp(&self, x: &mut Tensor, lo: f32, hi: f32) {
        let n = x.numel() as i64;
        let xp = ptr_mut(x);
        if n > 0 {
            self.launch(
                "clamp",
                blocks_for(n as usize),
                BLOCK,
                &mut args![&xp, &lo, &hi, &n],
            );
        }
    }

    fn sum_abs(&self, x: &Tensor) -> Tensor {
        self.reduce(x, 1)
    }

    fn sum_sq(&self, x: &Tensor) -> Tensor {
        self.reduce(x, 2)
    }

    fn add_sign(&self, alpha: f32, w: &Tensor, g: &mut Tensor) {
        let n = w.numel() as i64;
        let (wp, gp) = (ptr(w), ptr_mut(g));
        if n > 0 {
            self.launch(
                "add_sign",
                blocks_for(n as usize),
                BLOCK,
                &mut args![&alpha, &wp, &gp, &n],
            );
        }
    }

    fn unary_forward(&self, op: Unary, x: &Tensor) -> Tensor {
        let (code, a, b) = unary_code(op);
        let y = self.new_tensor(x.shape(), DType::F32);
        let n = x.numel() as i64;
        let (xp, yp) = (ptr(x), ptr(&y));
        if n > 0 {
            self.launch(
                "unary_fwd",
                blocks_for(n as usize),
                BLOCK,
                &mut args![&code, &a, &b, &xp, &yp, &n],
            );
        }
        y
    }

    fn unary_backward(&self, op: Unary, x: &Tensor, y: &Tensor, dy: &Tensor) -> Tensor {
        let (code, a, b) = unary_code(op);
        let dx = self.new_tensor(x.shape(), DType::F32);
        let n = x.numel() as i64;
        let (xp, yp, dyp, dxp) = (ptr(x), ptr(y), ptr(dy), ptr(&dx));
        if n > 0 {
            self.launch(
                "unary_bwd",
                blocks_for(n as usize),
                BLOCK,
                &mut args![&code, &a, &b, &xp, &yp, &dyp, &dxp, &n],
            );
        }
        dx
    }

    fn prelu_forward(&self, x: &Tensor, a: &Tensor, channels: usize) -> Tensor {
        let (_, inner) = n_inner(x.shape(), channels);
        let y = self.new_tensor(x.shape(), DType::F32);
        let n = x.numel() as i64;
        let (xp, ap, yp, c, inner, na) = (
            ptr(x),
            ptr(a),
            ptr(&y),
            channels as i32,
            inner as i64,
            a.numel() as i32,
        );
        let planes = n / inner.max(1);
        if n > 0 {
            self.launch_planes(
                "prelu_fwd",
                (n / inner.max(1)) as usize,
                inner as usize,
                &mut args![&xp, &ap, &yp, &planes, &c, &inner, &na],
            );
        }
        y
    }

    fn prelu_backward(
        &self,
        x: &Tensor,
        a: &Tensor,
        dy: &Tensor,
        da: &mut Tensor,
        channels: usize,
    ) -> Tensor {
        let (nb, inner) = n_inner(x.shape(), channels);
        let dx = self.new_tensor(x.shape(), DType::F32);
        let na = a.numel();
        let (xp, ap, dyp, dxp, dap) = (ptr(x), ptr(a), ptr(dy), ptr(&dx), ptr_mut(da));
        let (nb, c, inner, na32) = (nb as i32, channels as i32, inner as i64, na as i32);
        self.launch(
            "prelu_bwd",
            na as u32,
            BLOCK,
            &mut args![&xp, &ap, &dyp, &dxp, &dap, &nb, &c, &inner, &na32],
        );
        dx
    }

    fn swish_forward(&self, x: &Tensor, beta: &Tensor) -> Tensor {
        let y = self.new_tensor(x.shape(), DType::F32);
        let n = x.numel() as i64;
        let (xp, bp, yp) = (ptr(x), ptr(beta), ptr(&y));
        if n > 0 {
            self.launch(
                "swish_fwd",
                blocks_for(n as usize),
                BLOCK,
                &mut args![&xp, &bp, &yp, &n],
            );
        }
        y
    }

    fn swish_backward(&self, x: &Tensor, beta: &Tensor, dy: &Tensor, dbeta: &mut Tensor) -> Tensor {
        let dx = self.new_tensor(x.shape(), DType::F32);
        let n = x.numel();
        let (blocks, per) = reduce_split(n);
        let part = self.scratch_f64(blocks as usize);
        let (xp, bp, dyp, dxp, pp, n64) =
            (ptr(x), ptr(beta), ptr(dy), ptr(&dx), part.ptr, n as i64);
        let dbp = ptr_mut(dbeta);
        if n > 0 {
            self.launch(
                "swish_bwd",
                blocks,
                BLOCK,
                &mut args![&xp, &bp, &dyp, &dxp, &n64, &per, &pp],
            );
            let count = blocks as i32;
            self.launch("finish_acc", 1, BLOCK, &mut args![&pp, &count, &dbp]);
        }
        dx
    }

    fn softmax_forward(&self, x: &Tensor, channels: usize) -> Tensor {
        let (nb, inner) = n_inner(x.shape(), channels);
        let y = self.new_tensor(x.shape(), DType::F32);
        let cols = (nb * inner) as i64;
        let (xp, yp, c, inner) = (ptr(x), ptr(&y), channels as i32, inner as i64);
        if cols > 0 {
            self.launch(
                "softmax_fwd",
                blocks_for(cols as usize),
                BLOCK,
                &mut args![&xp, &yp, &cols, &c, &inner],
            );
        }
        y
    }

    fn softmax_backward(&self, y: &Tensor, dy: &Tensor, channels: usize) -> Tensor {
        let (nb, inner) = n_inner(y.shape(), channels);
        let dx = self.new_tensor(y.shape(), DType::F32);
        let cols = (nb * inner) as i64;
        let (yp, dyp, dxp, c, inner) = (ptr(y), ptr(dy), ptr(&dx), channels as i32, inner as i64);
        if cols > 0 {
            self.launch(
                "softmax_bwd",
                blocks_for(cols as usize),
                BLOCK,
                &mut args![&yp, &dyp, &dxp, &cols, &c, &inner],
            );
        }
        dx
    }

    fn conv2d_forward(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, win: Window) -> Tensor {
        let g = ConvGeom::new(x.shape(), w.shape(), win);
        let e = self.conv_engine_for(tune::Dir::Forward, x, w, &g, |e| {
            self.conv_forward_by(e, x, w, b, &g).map(drop)
        });
        self.count_conv(e, x.dtype());
        self.conv_forward_by(e, x, w, b, &g).unwrap_or_else(|err| {
            panic!("cuda:{}: convolution by {}: {err}", self.ordinal, e.name())
        })
    }

    fn conv2d_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        win: Window,
        dw: &mut Tensor,
        db: Option<&mut Tensor>,
        input_grad: bool,
    ) -> Tensor {
        let g = ConvGeom::new(x.shape(), w.shape(), win);
        if let Some(db) = db {
            self.channel_bias_backward(dy, db, g.oc);
        }
        // im2col's transposed dy, made once for its trials and its runs (both directions).
        let mut dyt = None;
        // The trials of the weight gradient add into a scratch gradient of their own.
        let mut scratch: Option<Tensor> = None;
        let ew = self.conv_engine_for(tune::Dir::WeightGrad, x, w, &g, |e| {
            let t = scratch.get_or_insert_with(|| self.zeros(w.shape(), DType::F32));
            self.conv_weight_grad_by(e, (x, w, dy), &g, t, &mut dyt)
        });
        drop(scratch);
        let fail = |e: tune::Engine, err: String| -> ! {
            panic!(
                "cuda:{}: convolution gradient by {}: {err}",
                self.ordinal,
                e.name()
            )
        };
        self.count_conv(ew, x.dtype());
        self.conv_weight_grad_by(ew, (x, w, dy), &g, dw, &mut dyt)
            .unwrap_or_else(|err| fail(ew, err));
        if !input_grad {
            return self.new_tensor(&[0], DType::F32);
        }
        let ex = self.conv_engine_for(tune::Dir::InputGrad, x, w, &g, |e| {
            self.conv_input_grad_by(e, (x, w, dy), &g, &mut dyt)
                .map(drop)
        });
        self.count_conv(ex, x.dtype());
        self.conv_input_grad_by(ex, (x, w, dy), &g, &mut dyt)
            .unwrap_or_else(|err| fail(ex, err))
    }

    fn max_pool2d_forward(&self, x: &Tensor, win: Window) -> (Tensor, Indices) {
        let s = x.shape();
        let (oh, ow) = (
            win.out_len(s[2], win.kh).unwrap(),
            win.out_len(s[3], win.kw).unwrap(),
        );
        let y = self.new_tensor(&[s[0], s[1], oh, ow], DType::F32);
        let idx = self.new_tensor(&[y.numel()], DType::U32);
        let planes = (s[0] * s[1]) as i64;
        let (xp, yp, ip) = (ptr(x), ptr(&y), ptr(&idx));
        let d = [
            s[2] as i32,
            s[3] as i32,
            oh as i32,
            ow as i32,
            win.kh as i32,
            win.kw as i32,
            win.stride as i32,
            win.pad as i32,
        ];
        if y.numel() > 0 {
            self.launch_planes(
                "max_pool_fwd",
                s[0] * s[1],
                oh * ow,
                &mut args![
                    &xp, &yp, &ip, &planes, &d[0], &d[1], &d[2], &d[3], &d[4], &d[5], &d[6], &d[7]
                ],
            );
        }
        (y, Indices::from_tensor(idx, (s[2] * s[3]) as u64))
    }

    fn max_backward(
        &self,
        dy: &Tensor,
        idx: &Indices,
        x_shape: &[usize],
        dy_plane: usize,
        x_plane: usize,
    ) -> Tensor {
        let mut dx = self.new_tensor(x_shape, DType::F32);
        self.fill(&mut dx, 0.0);
        let n = dy.numel() as i64;
        let (dyp, ip, dxp, dpl, xpl) = (
            ptr(dy),
            ptr(idx.tensor()),
            ptr(&dx),
            dy_plane as i64,
            x_plane as i64,
        );
        if n > 0 {
            self.launch(
                "max_bwd",
                blocks_for(n as usize),
                BLOCK,
                &mut args![&dyp, &ip, &dxp, &n, &dpl, &xpl],
            );
        }
        dx
    }

    fn avg_pool2d_forward(&self, x: &Tensor, win: Window) -> Tensor {
        let s = x.shape();
        let (oh, ow) = (
            win.out_len(s[2], win.kh).unwrap(),
            win.out_len(s[3], win.kw).unwrap(),
        );
        let y = self.new_tensor(&[s[0], s[1], oh, ow], DType::F32);
        let planes = (s[0] * s[1]) as i64;
        let (xp, yp) = (ptr(x), ptr(&y));
        let d = [
            s[2] as i32,
            s[3] as i32,
            oh as i32,
            ow as i32,
            win.kh as i32,
            win.kw as i32,
            win.stride as i32,
            win.pad as i32,
        ];
        if y.numel() > 0 {
            self.launch_planes(
                "avg_pool_fwd",
                s[0] * s[1],
                oh * ow,
                &mut args![
                    &xp, &yp, &planes, &d[0], &d[1], &d[2], &d[3], &d[4], &d[5], &d[6], &d[7]
                ],
            );
        }
        y
    }

    fn avg_pool2d_backward(&self, dy: &Tensor, x_shape: &[usize], win: Window) -> Tensor {
        let dx = self.new_tensor(x_shape, DType::F32);
        let planes = (x_shape[0] * x_shape[1]) as i64;
        let (dyp, dxp) = (ptr(dy), ptr(&dx));
        let d = [
            x_shape[2] as i32,
            x_shape[3] as i32,
            dy.shape()[2] as i32,
            dy.shape()[3] as i32,
            win.kh as i32,
            win.kw as i32,
            win.stride as i32,
            win.pad as i32,
        ];
        if dx.numel() > 0 {
            self.launch_planes(
                "avg_pool_bwd",
                x_shape[0] * x_shape[1],
                x_shape[2] * x_shape[3],
                &mut args![
                    &dyp, &dxp, &planes, &d[0], &d[1], &d[2], &d[3], &d[4], &d[5], &d[6], &d[7]
                ],
            );
        }
        dx
    }

    fn global_avg_pool_forward(&self, x: &Tensor, channels: usize) -> Tensor {
        let (nb, inner) = n_inner(x.shape(), channels);
        let y = self.new_tensor(&[nb, channels], DType::F32);
        let (xp, yp, inner) = (ptr(x), ptr(&y), inner as i64);
        if y.numel() > 0 {
            self.launch(
                "plane_mean",
                y.numel() as u32,
                BLOCK,
                &mut args![&xp, &yp, &inner],
            );
        }
        y
    }

    fn global_avg_pool_backward(&self, dy: &Tensor, x_shape: &[usize]) -> Tensor {
        let dx = self.new_tensor(x_shape, DType::F32);
        let n = dx.numel() as i64;
        let inner = (dx.numel() / dy.numel().max(1)) as i64;
        let planes = dy.numel() as i64;
        let (dyp, dxp) = (ptr(dy), ptr(&dx));
        if n > 0 {
            self.launch_planes(
                "plane_broadcast",
                dy.numel(),
                inner as usize,
                &mut args![&dyp, &dxp, &planes, &inner],
            );
        }
        dx
    }

    fn fractional_max_pool2d_forward(
        &self,
        x: &Tensor,
        kernel: (usize, usize),
        out: (usize, usize),
        samples: &Tensor,
    ) -> (Tensor, Indices) {
        let s = x.shape();
        let y = self.new_tensor(&[s[0], s[1], out.0, out.1], DType::F32);
        let idx = self.new_tensor(&[y.numel()], DType::U32);
        let planes = (s[0] * s[1]) as i64;
        let (xp, sp, yp, ip) = (ptr(x), ptr(samples), ptr(&y), ptr(&idx));
        let d = [
            s[2] as i32,
            s[3] as i32,
            out.0 as i32,
            out.1 as i32,
            kernel.0 as i32,
            kernel.1 as i32,
        ];
        if y.numel() > 0 {
            self.launch_planes(
                "fractional_fwd",
                s[0] * s[1],
                out.0 * out.1,
                &mut args![&xp, &sp, &yp, &ip, &planes, &d[0], &d[1], &d[2], &d[3], &d[4], &d[5]],
            );
        }
        (y, Indices::from_tensor(idx, (s[2] * s[3]) as u64))
    }

    fn max_groups_forward(&self, x: &Tensor, k: usize) -> (Tensor, Indices) {
        let (rows, fk) = (x.shape()[0], x.shape()[1]);
        let f = fk / k;
        let y = self.new_tensor(&[rows, f], DType::F32);
        let idx = self.new_tensor(&[rows * f], DType::U32);
        let n = (rows * f) as i64;
        let (xp, yp, ip, f32_, k32) = (ptr(x), ptr(&y), ptr(&idx), f as i32, k as i32);
        if n > 0 {
            self.launch(
                "max_groups_fwd",
                blocks_for(n as usize),
                BLOCK,
                &mut args![&xp, &yp, &ip, &n, &f32_, &k32],
            );
        }
        (y, Indices::from_tensor(idx, fk as u64))
    }

    fn batch_norm_forward_train(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        running_mean: &mut Tensor,
        running_var: &mut Tensor,
        momentum: f32,
        eps: f32,
    ) -> (Tensor, Tensor, Tensor) {
        let stats = (running_mean, running_var, momentum, eps);
        self.bn_forward(x, gamma, beta, stats, BnAfter::Nothing)
    }

    fn batch_norm_relu_forward_train(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        running_mean: &mut Tensor,
        running_var: &mut Tensor,
        momentum: f32,
        eps: f32,
    ) -> (Tensor, Tensor, Tensor) {
        let stats = (running_mean, running_var, momentum, eps);
        self.bn_forward(x, gamma, beta, stats, BnAfter::Relu)
    }

    fn batch_norm_relu_pool_forward_train(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        running_mean: &mut Tensor,
        running_var: &mut Tensor,
        momentum: f32,
        eps: f32,
    ) -> Option<(Tensor, Tensor, Tensor)> {
        let after = BnAfter::relu_pool(x.shape())?;
        let stats = (running_mean, running_var, momentum, eps);
        Some(self.bn_forward(x, gamma, beta, stats, after))
    }

    fn batch_norm_forward_eval(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        mean: &Tensor,
        var: &Tensor,
        eps: f32,
    ) -> Tensor {
        let c = gamma.numel();
        let (_, inner) = n_inner(x.shape(), c);
        let invstd = self.invstd(var, eps);
        let y = self.new_tensor(x.shape(), x.dtype());
        let (xp, gp, bp, mp, ip, yp) = (
            ptr(x),
            ptr(gamma),
            ptr(beta),
            ptr(mean),
            ptr(&invstd),
            ptr(&y),
        );
        let (n, c32, inner64) = (x.numel() as i64, c as i32, inner as i64);
        let planes = n / inner64.max(1);
        if n > 0 && inner == 1 {
            // Features ([N, C]): rows on the grid's y axis, channels along x.
            let rows = n / c.max(1) as i64;
            self.launch_planes(
                act_kernel("bn_row_eval", x),
                rows as usize,
                c,
                &mut args![&xp, &gp, &bp, &mp, &ip, &yp, &rows, &c32],
            );
        } else if n > 0 {
            self.launch_planes(
                act_kernel("bn_eval", x),
                (n as usize) / inner.max(1),
                inner,
                &mut args![&xp, &gp, &bp, &mp, &ip, &yp, &planes, &c32, &inner64],
            );
        }
        y
    }

    fn invstd(&self, var: &Tensor, eps: f32) -> Tensor {
        let out = self.new_tensor(var.shape(), DType::F32);
        let (vp, op, n) = (ptr(var), ptr(&out), var.numel() as i32);
        if n > 0 {
            self.launch(
                "invstd_kernel",
                blocks_for(n as usize),
                BLOCK,
                &mut args![&vp, &op, &eps, &n],
            );
        }
        out
    }

    fn batch_norm_backward(
        &self,
        x: &Tensor,
        dy: &Tensor,
        gamma: &Tensor,
        mean: &Tensor,
        invstd: &Tensor,
        batch_stats: bool,
        dgamma: &mut Tensor,
        dbeta: &mut Tensor,
    ) -> Tensor {
        let c = gamma.numel();
        let (nb, inner) = n_inner(x.shape(), c);
        if inner == 1 {
            let stats = (gamma, None, mean, invstd);
            return self.bn_row_backward(x, dy, stats, batch_stats, dgamma, dbeta);
        }
        // The sums with nothing after batch norm (`beta` unread), over planes of `inner` values
        // as one row.
        let h = i32::try_from(inner).unwrap_or_else(|_| {
            panic!("batch norm: planes of {inner} values, past the kernels' 32-bit sizes")
        });
        let (mean_dy, mean_dyx) =
            self.bn_grad_sums(x, dy, (gamma, 0, mean, invstd), (h, 1, 0), dgamma, dbeta);
        let (xp, dyp, gp, mp, ip) = (ptr(x), ptr(dy), ptr(gamma), ptr(mean), ptr(invstd));
        let (mdp, mdxp, c32, inner64) = (ptr(&mean_dy), ptr(&mean_dyx), c as i32, inner as i64);
        let dx = self.new_tensor(x.shape(), DType::F32);
        let (dxp, bs, n) = (ptr(&dx), i32::from(batch_stats), x.numel() as i64);
        let planes = (nb * c) as i64;
        if n > 0 {
            self.launch_planes(
                act_kernel("bn_bwd_dx", x),
                nb * c,
                inner,
                &mut args![
                    &xp, &dyp, &gp, &mp, &ip, &mdp, &mdxp, &bs, &dxp, &planes, &c32, &inner64
                ],
            );
        }
        dx
    }

    fn batch_norm_relu_backward(
        &self,
        x: &Tensor,
        y: &Tensor,
        dy: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        mean: &Tensor,
        invstd: &Tensor,
        dgamma: &mut Tensor,
        dbeta: &mut Tensor,
    ) -> Tensor {
        // The mask is found again from x: y is not read.
        let _ = y;
        let stats = (gamma, beta, mean, invstd);
        self.bn_after_backward(x, dy, stats, dgamma, dbeta, BnAfter::Relu)
    }

    fn batch_norm_relu_pool_backward(
        &self,
        x: &Tensor,
        dy: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        mean: &Tensor,
        invstd: &Tensor,
        dgamma: &mut Tensor,
        dbeta: &mut Tensor,
    ) -> Tensor {
        let after = BnAfter::relu_pool(x.shape()).unwrap_or_else(|| {
            panic!(
                "batch norm + ReLU + max pool: a 4-d input within 32-bit planes, got {:?}",
                x.shape()
            )
        });
        let stats = (gamma, beta, mean, invstd);
        self.bn_after_backward(x, dy, stats, dgamma, dbeta, after)
    }

    fn dropout_forward(&self, x: &Tensor, p: f32, key: RandomKey<'_>) -> (Tensor, Tensor) {
        // (x and y in bf16 under bf16 activations: dropout_fwd_h; any other type in f32.)
        let x = match x.dtype() {
            DType::BF16 => x.clone(),
            _ => x.to_dtype(DType::F32),
        };
        let kernel = act_kernel("dropout_fwd", &x);
        let y = self.new_tensor(x.shape(), x.dtype());
        let mask = self.new_tensor(x.shape(), DType::F32);
        let n = x.numel() as i64;
        let (xp, yp, mp, sp) = (ptr(&x), ptr(&y), ptr(&mask), ptr(key.step.tensor()));
        if n > 0 {
            self.launch(
                kernel,
                blocks_for((n as usize).div_ceil(4)),
                BLOCK,
                &mut args![&xp, &yp, &mp, &n, &p, &key.stream, &sp, &key.purpose],
            );
        }
        (y, mask)
    }

    fn uniform(&self, shape: &[usize], key: RandomKey<'_>) -> Tensor {
        let y = self.new_tensor(shape, DType::F32);
        let n = y.numel() as i64;
        let (yp, sp) = (ptr(&y), ptr(key.step.tensor()));
        if n > 0 {
            self.launch(
                "uniform_fill",
                blocks_for((n as usize).div_ceil(4)),
                BLOCK,
                &mut args![&yp, &n, &key.stream, &sp, &key.purpose],
            );
        }
        y
    }

    fn bernoulli_keep(&self, shape: &[usize], p: f32, key: RandomKey<'_>) -> Tensor {
        let y = self.new_tensor(shape, DType::F32);
        let n = y.numel() as i64;
        let (yp, sp) = (ptr(&y), ptr(key.step.tensor()));
        if n > 0 {
            self.launch(
                "bernoulli_keep",
                blocks_for((n as usize).div_ceil(4)),
                BLOCK,
                &mut args![&yp, &n, &p, &key.stream, &sp, &key.purpose],
            );
        }
        y
    }

    fn gather_augment(
        &self,
        images: &Tensor,
        labels: &Indices,
        order: &Indices,
        cursor: &Indices,
        out: &mut Tensor,
        labels_out: &mut Indices,
        pad: usize,
        flip_p: f32,
        key: RandomKey<'_>,
    ) {
        let s = out.shape().to_vec();
        let (ip, lp, op, cp, sp) = (
            ptr(images),
            ptr(labels.tensor()),
            ptr(order.tensor()),
            ptr(cursor.tensor()),
            ptr(key.step.tensor()),
        );
        let (outp, lop) = (ptr_mut(out), ptr_mut(labels_out.tensor_mut()));
        let (b, c, h, w, pad) = (
            s[0] as i32,
            s[1] as i32,
            s[2] as i32,
            s[3] as i32,
            pad as i32,
        );
        let n: usize = s.iter().product();
        if n > 0 {
            self.launch_planes(
                "gather_augment",
                s[0],
                n / s[0].max(1),
                &mut args![
                    &ip,
                    &lp,
                    &op,
                    &cp,
                    &outp,
                    &lop,
                    &b,
                    &c,
                    &h,
                    &w,
                    &pad,
                    &flip_p,
                    &key.stream,
                    &sp,
                    &key.purpose
                ],
            );
        }
    }

    fn one_hot(&self, labels: &Indices, out: &mut Tensor) {
        let (b, k) = (out.shape()[0] as i64, out.shape()[1] as i32);
        let (lp, op) = (ptr(labels.tensor()), ptr_mut(out));
        if b > 0 {
            self.launch(
                "one_hot",
                blocks_for(b as usize * k as usize),
                BLOCK,
                &mut args![&lp, &op, &b, &k],
            );
        }
    }

    fn augment_samples(&self, x: &mut Tensor, a: crate::data::Augment, key: RandomKey<'_>) {
        use crate::data::Augment;
        let (kind, p): (i32, f32) = match a {
            Augment::Crop { pad } => (0, pad as f32),
            Augment::Translate { pixels } => (0, pixels as f32),
            Augment::Flip { p } => (1, p),
            Augment::Scale { min_area } => (2, min_area),
            Augment::Rotate { degrees } => (3, degrees),
            Augment::Noise { std } => (4, std),
            Augment::Cutout { size } => (5, size as f32),
            Augment::Mixup { .. } | Augment::CutMix { .. } => {
                panic!("augment_samples: {a:?} mixes samples (mix_batch)")
            }
        };
        let s = x.shape().to_vec();
        let per: usize = s[1..].iter().product();
        if s[0] == 0 || per == 0 {
            return;
        }
        // Noise and Cutout read only the element they write: in place. The others read other
        // pixels of their sample: from a copy.
        let src = match a {
            Augment::Noise { .. } | Augment::Cutout { .. } => None,
            _ => {
                let mut src = self.new_tensor(&s, DType::F32);
                self.copy(x, &mut src);
                Some(src)
            }
        };
        let (b, c, h, w) = (s[0] as i32, s[1] as i32, s[2] as i32, s[3] as i32);
        let (dp, kp) = (ptr_mut(x), ptr(key.step.tensor()));
        let sp = src.as_ref().map_or(dp, ptr);
        self.launch_planes(
            "augment_samples",
            s[0],
            per,
            &mut args![
                &sp,
                &dp,
                &kind,
                &p,
                &b,
                &c,
                &h,
                &w,
                &key.stream,
                &kp,
                &key.purpose
            ],
        );
    }

    fn mix_batch(
        &self,
        x: &mut Tensor,
        soft: &mut Tensor,
        alpha: f32,
        cutmix: bool,
        key: RandomKey<'_>,
    ) {
        let s = x.shape().to_vec();
        let per: usize = s[1..].iter().product();
        let k = soft.shape()[1];
        let (b, h, w, k32, per32, cm) = (
            s[0] as i32,
            s[2] as i32,
            s[3] as i32,
            k as i32,
            per as u32,
            cutmix as i32,
        );
        let params = self.new_tensor(&[5], DType::F32);
        let (pp, sp) = (ptr(&params), ptr(key.step.tensor()));
        self.launch(
            "mix_params",
            1,
            1,
            &mut args![&pp, &alpha, &cm, &h, &w, &key.stream, &sp, &key.purpose],
        );
        let (xp, yp) = (ptr_mut(x), ptr_mut(soft));
        if s[0] > 0 {
            self.launch_planes(
                "mix_batch",
                s[0].div_ceil(2),
                per.max(k),
                &mut args![&xp, &yp, &pp, &b, &k32, &h, &w, &per32, &cm],
            );
        }
    }

    fn note_nonfinite(&self, loss: &Tensor, step: &Indices, first: &mut Indices) {
        let (lp, sp, fp) = (ptr(loss), ptr(step.tensor()), ptr_mut(first.tensor_mut()));
        self.launch("note_nonfinite", 1, 1, &mut args![&lp, &sp, &fp]);
    }

    fn increment(&self, counter: &mut Indices, by: u32) {
        let p = ptr_mut(counter.tensor_mut());
        self.launch("increment", 1, 1, &mut args![&p, &by]);
    }

    fn clip_coefficient(&self, grads: &[&Tensor], max_norm: f32) -> (Tensor, Tensor) {
        let splits: Vec<(u32, i64)> = grads.iter().map(|g| reduce_split(g.numel())).collect();
        let total: usize = splits.iter().map(|s| s.0 as usize).sum();
        let part = self.scratch_f64(total);
        let mut offset = 0usize;
        let op = 2i32;
        for (g, &(blocks, per)) in grads.iter().zip(&splits) {
            let (gp, n) = (ptr(g), g.numel() as i64);
            let pp = part.ptr + 8 * offset as u64;
            if n > 0 {
                self.launch(
                    "reduce_partial",
                    blocks,
                    BLOCK,
                    &mut args![&gp, &n, &per, &op, &pp],
                );
            } else if part.ptr != 0 {
                // An empty tensor's partial is zero (not into a failing recording's
                // placeholder at address 0).
                self.bind();
                self.check(
                    unsafe { dr::memset_d8_async(pp, 0, 8, self.raw.stream) },
                    "memset",
                );
                self.mark(|| "fill 8 bytes".into());
            }
            offset += blocks as usize;
        }
        let norm = self.new_tensor(&[1], DType::F32);
        let coef = self.new_tensor(&[1], DType::F32);
        let (pp, count, np, cp) = (part.ptr, total as i32, ptr(&norm), ptr(&coef));
        self.launch(
            "finish_clip",
            1,
            BLOCK,
            &mut args![&pp, &count, &max_norm, &np, &cp],
        );
        (norm, coef)
    }

    fn optim_update(
        &self,
        rule: &UpdateRule,
        s: &UpdateScalars<'_>,
        params: &mut [ParamUpdate<'_>],
    ) {
        let (code, h): (i32, [f64; 5]) = match *rule {
            UpdateRule::Sgd {
                momentum,
                dampening,
                nesterov,
            } => (
                0,
                [momentum, dampening, f64::from(u8::from(nesterov)), 0.0, 0.0],
            ),
            UpdateRule::Adagrad { lr_decay, eps, .. } => (1, [lr_decay, eps, 0.0, 0.0, 0.0]),
            UpdateRule::RmsProp {
                alpha,
                eps,
                momentum,
                centered,
            } => (
                2,
                [alpha, eps, momentum, f64::from(u8::from(centered)), 0.0],
            ),
            UpdateRule::Adam {
                beta1,
                beta2,
                eps,
                amsgrad,
                decoupled,
            } => (
                3,
                [
                    beta1,
                    beta2,
                    eps,
                    f64::from(u8::from(amsgrad)),
                    f64::from(u8::from(decoupled)),
                ],
            ),
        };
        let mut slots = Vec::with_capacity(params.len());
        let mut blocks = 0i64;
        for p in params.iter_mut() {
            let n = p.value.numel() as i64;
            if n == 0 {
                continue;
            }
            let mut st = [0u64; 3];
            for (k, t) in p.state.iter_mut().enumerate() {
                st[k] = ptr_mut(t);
            }
            slots.push(ParamSlot {
                p: ptr_mut(p.value),
                g: ptr_mut(p.grad),
                s0: st[0],
                s1: st[1],
                s2: st[2],
                n,
                first_block: blocks,
                lr_scale: p.lr_scale,
                wd: p.weight_decay,
            });
            blocks += (n + UPDATE_PER_BLOCK - 1) / UPDATE_PER_BLOCK;
        }
        if slots.is_empty() {
            return;
        }
        let table = self.table(&slots);
        let (tp, ns, lp, ll, sp) = (
            table,
            slots.len() as i32,
            ptr(s.lr),
            s.lr.numel() as i32,
            ptr(s.step.tensor()),
        );
        let gs = s.grad_scale.map_or(0, ptr);
        let per = UPDATE_PER_BLOCK;
        self.launch(
            "optim_update",
            blocks as u32,
            BLOCK,
            &mut args![
                &tp, &ns, &code, &h[0], &h[1], &h[2], &h[3], &h[4], &lp, &ll, &sp, &gs, &per
            ],
        );
    }

    fn softmax_cross_entropy(
        &self,
        logits: &Tensor,
        target: Target<'_>,
        smoothing: f32,
        grad_scale: f32,
    ) -> (Tensor, Tensor) {
        let (n, c) = (logits.shape()[0], logits.shape()[1]);
        let grad = self.new_tensor(logits.shape(), DType::F32);
        let rows = self.scratch_f64(n);
        let (labels, soft) = match target {
            Target::Hard(l) => (ptr(l.tensor()), 0u64),
            Target::Soft(t) => (0u64, ptr(t)),
        };
        let g = grad_scale / n as f32;
        let (lp, gp, rp, n32, c32) = (ptr(logits), ptr(&grad), rows.ptr, n as i32, c as i32);
        let warps_per_block = BLOCK / 32;
        self.launch(
            "softmax_ce",
            (n as u32).div_ceil(warps_per_block),
            BLOCK,
            &mut args![&lp, &labels, &soft, &n32, &c32, &smoothing, &g, &rp, &gp],
        );
        let loss = self.new_tensor(&[1], DType::F32);
        let (outp, mode, div) = (ptr(&loss), 2i32, n as f64);
        self.launch(
            "finish_sum",
            1,
            BLOCK,
            &mut args![&rp, &n32, &mode, &div, &outp],
        );
        (loss, grad)
    }

    fn mse(&self, pred: &Tensor, target: &Tensor, grad_scale: f32) -> (Tensor, Tensor) {
        let n = pred.numel();
        let grad = self.new_tensor(pred.shape(), DType::F32);
        let g = (2.0 / n as f64) as f32 * grad_scale;
        let (pp, qp, gp, n64) = (ptr(pred), ptr(target), ptr(&grad), n as i64);
        let (blocks, per) = reduce_split(n);
        let part = self.scratch_f64(blocks as usize);
        let partp = part.ptr;
        if n > 0 {
            self.launch(
                "mse_grad",
                blocks_for(n),
                BLOCK,
                &mut args![&pp, &qp, &gp, &g, &n64],
            );
            self.launch(
                "mse_partial",
                blocks,
                BLOCK,
                &mut args![&pp, &qp, &n64, &per, &partp],
            );
        }
        let loss = self.new_tensor(&[1], DType::F32);
        let (lp, count, mode, div) = (
            ptr(&loss),
            if n > 0 { blocks as i32 } else { 0 },
            2i32,
            n.max(1) as f64,
        );
        self.launch(
            "finish_sum",
            1,
            BLOCK,
            &mut args![&partp, &count, &mode, &div, &lp],
        );
        (loss, grad)
    }

    fn count_correct(&self, logits: &Tensor, labels: &Indices) -> Tensor {
        let (n, c) = (logits.shape()[0], logits.shape()[1]);
        let rows = self.scratch_f64(n);
        let (lp, ip, n32, c32, rp) = (
            ptr(logits),
            ptr(labels.tensor()),
            n as i32,
            c as i32,
            rows.ptr,
        );
        if n > 0 {
            self.launch(
                "correct_rows",
                blocks_for(n),
                BLOCK,
                &mut args![&lp, &ip, &n32, &c32, &rp],
            );
        }
        let out = self.new_tensor(&[1], DType::F32);
        let (op, mode, div) = (ptr(&out), 0i32, 1.0f64);
        self.launch(
            "finish_sum",
            1,
            BLOCK,
            &mut args![&rp, &n32, &mode, &div, &op],
        );
        out
    }

    fn all_finite(&self, x: &Tensor) -> Tensor {
        self.reduce(x, 3)
    }
}

/// The geometry of a convolution, in the forms the kernels take.
/// Threads per block of `conv.cu`'s kernels.
const IG_THREADS: u32 = 256;

/// `conv.cu`'s kernels by kind (forward, input gradient, weight gradient), each indexed by
/// `tf32 + 2 m32 + 4 k32` (see `ig_kernel`).
const IG_KERNELS: [[&str; 8]; 3] = [
    [
        "conv_ig_fwd_f32",
        "conv_ig_fwd_tf32",
        "conv_ig_fwd_f32_m32",
        "conv_ig_fwd_tf32_m32",
        "conv_ig_fwd_f32_k32",
        "conv_ig_fwd_tf32_k32",
        "conv_ig_fwd_f32_m32_k32",
        "conv_ig_fwd_tf32_m32_k32",
    ],
    [
        "conv_ig_dx_f32",
        "conv_ig_dx_tf32",
        "conv_ig_dx_f32_m32",
        "conv_ig_dx_tf32_m32",
        "conv_ig_dx_f32_k32",
        "conv_ig_dx_tf32_k32",
        "conv_ig_dx_f32_m32_k32",
        "conv_ig_dx_tf32_m32_k32",
    ],
    [
        "conv_ig_dw_f32",
        "conv_ig_dw_tf32",
        "conv_ig_dw_f32_m32",
        "conv_ig_dw_tf32_m32",
        "conv_ig_dw_f32_k32",
        "conv_ig_dw_tf32_k32",
        "conv_ig_dw_f32_m32_k32",
        "conv_ig_dw_tf32_m32_k32",
    ],
];

/// `IgShape` of conv.cu (passed by value to its kernels).
#[repr(C)]
#[derive(Clone, Copy)]
struct IgShape {
    nb: i32,
    c: i32,
    h: i32,
    w: i32,
    oc: i32,
    kh: i32,
    kw: i32,
    stride: i32,
    pad: i32,
    oh: i32,
    ow: i32,
}

/// cuBLAS's operand type and compute type for products of `dtype` (TF32 tensor cores for f32
/// when `tf32`).
fn gemm_types(dtype: DType, tf32: bool) -> (bsys::cudaDataType_t, bsys::cublasComputeType_t) {
    match dtype {
        DType::F32 => (
            bsys::cudaDataType_t::CUDA_R_32F,
            if tf32 {
                bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
            } else {
                bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F
            },
        ),
        DType::BF16 => (
            bsys::cudaDataType_t::CUDA_R_16BF,
            bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        ),
        DType::F16 => (
            bsys::cudaDataType_t::CUDA_R_16F,
            bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        ),
        DType::U32 => unreachable!("integer matrix product"),
    }
}

/// A trace's name for a product: `cuBLAS NT m32 n288 k4096 x24 f32 tf32`.
fn gemm_label(
    (ta, tb): (bool, bool),
    (m, n, k): (usize, usize, usize),
    batch: usize,
    dtype: DType,
    tf32: bool,
) -> String {
    format!(
        "cuBLAS {}{} m{m} n{n} k{k}{} {dtype}{}",
        if ta { "T" } else { "N" },
        if tb { "T" } else { "N" },
        if batch > 1 {
            format!(" x{batch}")
        } else {
            String::new()
        },
        if tf32 && dtype == DType::F32 {
            " tf32"
        } else {
            ""
        }
    )
}

/// How im2col's weight gradient splits its reduction of `np` terms into an output of
/// `oc` x `k`: `(splits, terms per split)`. Enough splits that the products' tiles (taken as
/// 128 x 128) fill a large GPU about twice (264 blocks), none shorter than 4096 terms; one
/// split (a single product) when the reduction is short or the output large.
fn gemm_splits(np: usize, oc: usize, k: usize) -> (usize, usize) {
    let tiles = oc.div_ceil(128) * k.div_ceil(128);
    let splits = (np / 4096).min(264 / tiles.max(1)).clamp(1, 256);
    if splits == 1 {
        return (1, np);
    }
    // A multiple of 8 elements, so that each part's operands start 16-byte aligned in 16-bit
    // types too (cuBLAS picks slower kernels for unaligned strides); the remainder product
    // takes the rest.
    (splits, np / splits / 8 * 8)
}

/// How `conv_ig_dw` splits its reduction over `np` positions for a product of `tiles` output
/// tiles: `(chunks, chunk)`, with `chunk` a multiple of 32 (so that every staged step of either
/// depth, 8 or 32, is full but the last chunk's last) and chunks of at least 256 positions,
/// about 1024 blocks in all (several per multiprocessor of a large GPU).
fn dw_chunks(np: usize, tiles: usize) -> (usize, usize) {
    let want = 1024usize
        .div_ceil(tiles.max(1))
        .min(np.div_ceil(256))
        .clamp(1, 65535);
    let chunk = np.div_ceil(want).next_multiple_of(32);
    (np.div_ceil(chunk), chunk)
}

/// The kernels need compute capability 8.0 (Ampere) or newer: bf16 conversions and TF32
/// tensor-core instructions. An older GPU is one clear error, not NVRTC's log.
fn check_arch(arch: (i32, i32), name: &str, n: usize) -> Result<()> {
    if arch.0 < 8 {
        return Err(Error::Device {
            device: format!("cuda:{n}"),
            reason: format!(
                "{name} has compute capability {}.{}; regimen's kernels need 8.0 or newer (Ampere, Ada, Hopper, Blackwell)",
                arch.0, arch.1
            ),
        });
    }
    Ok(())
}

/// Who computes the f32 convolutions that cuDNN does not (`REGIMEN_CONV`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ConvMode {
    /// im2col + cuBLAS (the default).
    Im2col,
    /// conv.cu's implicit-GEMM kernels.
    Implicit,
    /// The fastest engine per shape and direction, timed on first use (`tune.rs`).
    Auto,
}

/// The `REGIMEN_CONV` rule: unset or `im2col` for im2col + cuBLAS, `implicit` for conv.cu's
/// implicit-GEMM kernels, `auto` for the fastest per shape; anything else is an error naming
/// the variable.
fn conv_choice(value: Option<&str>) -> Result<ConvMode> {
    match value {
        None | Some("im2col") => Ok(ConvMode::Im2col),
        Some("implicit") => Ok(ConvMode::Implicit),
        Some("auto") => Ok(ConvMode::Auto),
        Some(v) => Err(Error::Device {
            device: "cuda".into(),
            reason: format!("REGIMEN_CONV={v}: expected im2col, implicit or auto"),
        }),
    }
}

struct ConvGeom {
    nb: usize,
    c: usize,
    h: usize,
    w: usize,
    oc: usize,
    oh: usize,
    ow: usize,
    k: usize,
    p: usize,
    win: Window,
}

impl ConvGeom {
    fn new(x: &[usize], w: &[usize], win: Window) -> ConvGeom {
        let oh = win.out_len(x[2], win.kh).expect("checked by the layer");
        let ow = win.out_len(x[3], win.kw).expect("checked by the layer");
        ConvGeom {
            nb: x[0],
            c: x[1],
            h: x[2],
            w: x[3],
            oc: w[0],
            oh,
            ow,
            k: x[1] * win.kh * win.kw,
            p: oh * ow,
            win,
        }
    }
    /// `x [N, C, H, W] * w [OC, C, KH, KW] /stride pad`, for traces.
    fn describe(&self) -> String {
        format!(
            "x [{}, {}, {}, {}] * w [{}, {}, {}, {}] stride {} pad {}",
            self.nb,
            self.c,
            self.h,
            self.w,
            self.oc,
            self.c,
            self.win.kh,
            self.win.kw,
            self.win.stride,
            self.win.pad
        )
    }

    /// `nb, c, h, w, kh, kw, stride, pad, oh, ow` as i32.
    fn ints(&self) -> [i32; 10] {
        [
            self.nb as i32,
            self.c as i32,
            self.h as i32,
            self.w as i32,
            self.win.kh as i32,
            self.win.kw as i32,
            self.win.stride as i32,
            self.win.pad as i32,
            self.oh as i32,
            self.ow as i32,
        ]
    }
}

/// What follows batch norm in its own passes (the CPU backend's `norm::After`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum BnAfter {
    Nothing,
    Relu,
    /// A ReLU, then a 2x2 max pool of stride 2 over planes of `h x w`.
    ReluPool {
        h: usize,
        w: usize,
    },
}

impl BnAfter {
    /// The pool's case for a `[N, C, H, W]` input whose planes fit the kernels' 32-bit
    /// indices; `None` otherwise (the layers then run one by one).
    fn relu_pool(shape: &[usize]) -> Option<BnAfter> {
        let &[_, _, h, w] = shape else { return None };
        (h * w < i32::MAX as usize).then_some(BnAfter::ReluPool { h, w })
    }
}

impl CudaBackend {
    /// Batch norm with batch statistics over `x` (`[N, C, ...]`), then `after`:
    /// `(output, mean, invstd)`, the running averages updated (`stats`: running mean and
    /// variance, momentum, eps). The statistics pass is the same for every `after`; the
    /// normalization pass applies the ReLU (and pools) as it writes.
    fn bn_forward(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        (running_mean, running_var, momentum, eps): (&mut Tensor, &mut Tensor, f32, f32),
        after: BnAfter,
    ) -> (Tensor, Tensor, Tensor) {
        let c = gamma.numel();
        let (nb, inner) = n_inner(x.shape(), c);
        // Features ([N, C]): 32 channels per block, in 8 splits (bn_row_stats_partial).
        let rows = inner == 1 && !matches!(after, BnAfter::ReluPool { .. });
        let splits = if rows { 8 } else { bn_splits(nb, c, inner) };
        let part = self.scratch_f64(3 * c * splits);
        let (xp, pp, nb32, c32, inner64, sp32) = (
            ptr(x),
            part.ptr,
            nb as i32,
            c as i32,
            inner as i64,
            splits as i32,
        );
        if rows {
            self.launch(
                act_kernel("bn_row_stats_partial", x),
                c.div_ceil(32) as u32,
                BLOCK,
                &mut args![&xp, &nb32, &c32, &pp],
            );
        } else {
            self.launch3(
                act_kernel("bn_stats_partial", x),
                (c as u32, splits as u32, 1),
                BLOCK,
                &mut args![&xp, &nb32, &c32, &inner64, &sp32, &pp],
            );
        }
        let mean = self.new_tensor(&[c], DType::F32);
        let invstd = self.new_tensor(&[c], DType::F32);
        let scale = self.new_tensor(&[c], DType::F32);
        let shift = self.new_tensor(&[c], DType::F32);
        let (gp, bp, mp, ip, scp, shp) = (
            ptr(gamma),
            ptr(beta),
            ptr(&mean),
            ptr(&invstd),
            ptr(&scale),
            ptr(&shift),
        );
        let (rmp, rvp) = (ptr_mut(running_mean), ptr_mut(running_var));
        self.launch(
            "bn_stats_finish",
            (c as u32).div_ceil(BLOCK),
            BLOCK,
            &mut args![
                &pp, &c32, &sp32, &eps, &momentum, &gp, &bp, &mp, &ip, &scp, &shp, &rmp, &rvp
            ],
        );
        let planes = (nb * c) as i64;
        let y = match after {
            _ if rows => {
                let y = self.new_tensor(x.shape(), x.dtype());
                let (yp, r64, relu) = (ptr(&y), nb as i64, i32::from(after == BnAfter::Relu));
                if nb > 0 {
                    self.launch_planes(
                        act_kernel("bn_row_apply", x),
                        nb,
                        c,
                        &mut args![&xp, &scp, &shp, &yp, &r64, &c32, &relu],
                    );
                }
                y
            }
            BnAfter::Nothing | BnAfter::Relu => {
                let y = self.new_tensor(x.shape(), x.dtype());
                let yp = ptr(&y);
                let k = if after == BnAfter::Relu {
                    "bn_relu_apply"
                } else {
                    "bn_apply"
                };
                self.launch_planes(
                    act_kernel(k, x),
                    nb * c,
                    inner,
                    &mut args![&xp, &scp, &shp, &yp, &planes, &c32, &inner64],
                );
                y
            }
            BnAfter::ReluPool { h, w } => {
                let y = self.new_tensor(&[nb, c, h / 2, w / 2], x.dtype());
                let (yp, h32, w32) = (ptr(&y), h as i32, w as i32);
                self.launch_planes(
                    act_kernel("bn_relu_pool_apply", x),
                    nb * c,
                    (h / 2) * (w / 2),
                    &mut args![&xp, &scp, &shp, &yp, &planes, &c32, &h32, &w32],
                );
                y
            }
        };
        (y, mean, invstd)
    }

    /// Batch norm's backward over features (`x` `[N, C]`), through the ReLU when `beta` is
    /// given (the forward's, to find its mask again): the row kernels, 32 channels per block.
    fn bn_row_backward(
        &self,
        x: &Tensor,
        dy: &Tensor,
        (gamma, beta, mean, invstd): (&Tensor, Option<&Tensor>, &Tensor, &Tensor),
        batch_stats: bool,
        dgamma: &mut Tensor,
        dbeta: &mut Tensor,
    ) -> Tensor {
        let (nb, c) = (x.shape()[0], gamma.numel());
        let part = self.scratch_f64(2 * c * 8);
        let relu = i32::from(beta.is_some());
        let (xp, dyp, gp, bp, mp, ip, pp) = (
            ptr(x),
            ptr(dy),
            ptr(gamma),
            beta.map_or(0, ptr),
            ptr(mean),
            ptr(invstd),
            part.ptr,
        );
        let (nb32, c32, sp32) = (nb as i32, c as i32, 8i32);
        self.launch(
            act_kernel("bn_row_bwd_partial", x),
            c.div_ceil(32) as u32,
            BLOCK,
            &mut args![&xp, &dyp, &gp, &bp, &mp, &ip, &nb32, &c32, &relu, &pp],
        );
        let mean_dy = self.new_tensor(&[c], DType::F32);
        let mean_dyx = self.new_tensor(&[c], DType::F32);
        let (dgp, dbp) = (ptr_mut(dgamma), ptr_mut(dbeta));
        let (mdp, mdxp, m) = (ptr(&mean_dy), ptr(&mean_dyx), nb as f64);
        self.launch(
            "bn_bwd_finish",
            (c as u32).div_ceil(BLOCK),
            BLOCK,
            &mut args![&pp, &c32, &sp32, &m, &dgp, &dbp, &mdp, &mdxp],
        );
        let dx = self.new_tensor(x.shape(), DType::F32);
        let (dxp, bs, r64) = (ptr(&dx), i32::from(batch_stats), nb as i64);
        if nb > 0 {
            self.launch_planes(
                act_kernel("bn_row_bwd_dx", x),
                nb,
                c,
                &mut args![
                    &xp, &dyp, &gp, &bp, &mp, &ip, &mdp, &mdxp, &bs, &relu, &dxp, &r64, &c32
                ],
            );
        }
        dx
    }

    /// Batch norm's backward sums over planes of `h w` values, through what followed (`code`:
    /// 0 nothing, 1 a ReLU, 2 a ReLU and the pool; `beta`, a device pointer, is read only
    /// after a ReLU): dbeta += sum g and dgamma += sum g xhat per channel, and the means
    /// `(mean_dy, mean_dyx)` the input gradient takes.
    fn bn_grad_sums(
        &self,
        x: &Tensor,
        dy: &Tensor,
        (gamma, beta, mean, invstd): (&Tensor, u64, &Tensor, &Tensor),
        (h, w, code): (i32, i32, i32),
        dgamma: &mut Tensor,
        dbeta: &mut Tensor,
    ) -> (Tensor, Tensor) {
        let c = gamma.numel();
        let (nb, inner) = n_inner(x.shape(), c);
        let splits = bn_splits(nb, c, inner);
        let part = self.scratch_f64(2 * c * splits);
        // With nothing after, gamma's pointer stands in for the unread beta.
        let bp = if beta == 0 { ptr(gamma) } else { beta };
        let (xp, dyp, gp, mp, ip, pp) = (
            ptr(x),
            ptr(dy),
            ptr(gamma),
            ptr(mean),
            ptr(invstd),
            part.ptr,
        );
        let (nb32, c32, sp32) = (nb as i32, c as i32, splits as i32);
        self.launch3(
            act_kernel("bn_after_bwd_partial", x),
            (c as u32, splits as u32, 1),
            BLOCK,
            &mut args![&xp, &dyp, &gp, &bp, &mp, &ip, &nb32, &c32, &h, &w, &code, &sp32, &pp],
        );
        let mean_dy = self.new_tensor(&[c], DType::F32);
        let mean_dyx = self.new_tensor(&[c], DType::F32);
        let (dgp, dbp) = (ptr_mut(dgamma), ptr_mut(dbeta));
        let (mdp, mdxp, m) = (ptr(&mean_dy), ptr(&mean_dyx), (nb * inner) as f64);
        self.launch(
            "bn_bwd_finish",
            (c as u32).div_ceil(BLOCK),
            BLOCK,
            &mut args![&pp, &c32, &sp32, &m, &dgp, &dbp, &mdp, &mdxp],
        );
        (mean_dy, mean_dyx)
    }

    /// Backward of [`CudaBackend::bn_forward`] with batch statistics, after a ReLU (`dy` the
    /// gradient of its output) or a ReLU and the pool (`dy` the pool's output gradient): the
    /// ReLU's mask and the pool's arg-max are found again from `x` inside the two passes.
    fn bn_after_backward(
        &self,
        x: &Tensor,
        dy: &Tensor,
        (gamma, beta, mean, invstd): (&Tensor, &Tensor, &Tensor, &Tensor),
        dgamma: &mut Tensor,
        dbeta: &mut Tensor,
        after: BnAfter,
    ) -> Tensor {
        let c = gamma.numel();
        let (nb, inner) = n_inner(x.shape(), c);
        if inner == 1 && after == BnAfter::Relu {
            let stats = (gamma, Some(beta), mean, invstd);
            return self.bn_row_backward(x, dy, stats, true, dgamma, dbeta);
        }
        let (h, w, code) = match after {
            BnAfter::Relu => (inner, 1, 1i32),
            BnAfter::ReluPool { h, w } => (h, w, 2),
            BnAfter::Nothing => unreachable!("batch_norm_backward runs that case"),
        };
        let size = |v: usize| {
            i32::try_from(v).unwrap_or_else(|_| {
                panic!("batch norm: planes of {inner} values, past the kernels' 32-bit sizes")
            })
        };
        let (h32, w32) = (size(h), size(w));
        let (mean_dy, mean_dyx) = self.bn_grad_sums(
            x,
            dy,
            (gamma, ptr(beta), mean, invstd),
            (h32, w32, code),
            dgamma,
            dbeta,
        );
        let (xp, dyp, gp, bp, mp, ip) = (
            ptr(x),
            ptr(dy),
            ptr(gamma),
            ptr(beta),
            ptr(mean),
            ptr(invstd),
        );
        let (mdp, mdxp, c32) = (ptr(&mean_dy), ptr(&mean_dyx), c as i32);
        let dx = self.new_tensor(x.shape(), DType::F32);
        let (dxp, planes) = (ptr(&dx), (nb * c) as i64);
        if x.numel() > 0 {
            self.launch_planes(
                act_kernel("bn_after_bwd_dx", x),
                nb * c,
                inner,
                &mut args![
                    &xp, &dyp, &gp, &bp, &mp, &ip, &mdp, &mdxp, &dxp, &planes, &c32, &h32, &w32,
                    &code
                ],
            );
        }
        dx
    }

    fn binary(&self, k: &str, a: &Tensor, b: &Tensor) -> Tensor {
        let y = self.new_tensor(a.shape(), DType::F32);
        let n = a.numel() as i64;
        let (ap, bp, yp) = (ptr(a), ptr(b), ptr(&y));
        if n > 0 {
            self.launch(
                k,
                blocks_for(n as usize),
                BLOCK,
                &mut args![&ap, &bp, &yp, &n],
            );
        }
        y
    }

    /// The column matrix `[K, N P]` of `x` (in `x`'s element type).
    fn im2col(&self, x: &Tensor, g: &ConvGeom) -> Tensor {
        let col = self.new_tensor(&[g.k, g.nb * g.p], x.dtype());
        let k = if x.dtype() == DType::F32 {
            "im2col_f32"
        } else {
            "im2col_u16"
        };
        let (xp, cp) = (ptr(x), ptr(&col));
        let gi = g.ints();
        if col.numel() > 0 {
            self.launch_planes(
                k,
                g.k,
                g.nb * g.p,
                &mut args![
                    &xp, &cp, &gi[0], &gi[1], &gi[2], &gi[3], &gi[4], &gi[5], &gi[6], &gi[7],
                    &gi[8], &gi[9]
                ],
            );
        }
        col
    }

    /// The device copy of an update table, uploaded once per distinct table (parameters are
    /// updated in place, so a model's table stays the same from step to step and a recorded
    /// graph never uploads).
    fn table(&self, slots: &[ParamSlot]) -> u64 {
        // SAFETY: ParamSlot is plain old data (repr(C), no padding: 5 x 8 + 2 x 8 + 2 x 4).
        let bytes = unsafe {
            std::slice::from_raw_parts(slots.as_ptr() as *const u8, std::mem::size_of_val(slots))
        }
        .to_vec();
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = tables.get(&bytes) {
            return b.ptr;
        }
        let words = bytes.len().div_ceil(4);
        // Not from a graph's arena: the table outlives any recording.
        let b = {
            let cap = self
                .capturing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            let b = self.alloc_words(words);
            *self.capturing.lock().unwrap_or_else(|e| e.into_inner()) = cap;
            b
        };
        self.bind();
        self.check(
            unsafe { dr::memcpy_htod_async(b.ptr, &bytes, self.raw.stream) },
            "uploading an update table",
        );
        self.check(
            unsafe { dr::stream::synchronize(self.raw.stream) },
            "uploading an update table",
        );
        let p = b.ptr;
        // Kept for the process: a recorded graph may read any table it was recorded with, so
        // none is freed (one small buffer per distinct model and parameter groups).
        tables.insert(bytes, b);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel name the backend launches is loaded (`KERNEL_NAMES`, which the NVRTC test
    /// finds in the PTX): a launch of any other name would panic on a GPU only. Reads this
    /// file's launches (the literal first argument of each `self.launch*(`) and takes every
    /// name of `IG_KERNELS`.
    #[test]
    fn every_launched_kernel_is_loaded() {
        let all = include_str!("mod.rs");
        let src = &all[..all.find("#[cfg(test)]").expect("this test module")];
        let literal = |rest: &str| -> Option<String> {
            let rest = rest.trim_start();
            let body = rest.strip_prefix('"')?;
            Some(body[..body.find('"')?].to_string())
        };
        let mut launched = Vec::new();
        for (i, _) in src.match_indices("self.launch") {
            let after = &src[i..];
            let open = after.find('(').expect("a call");
            if let Some(name) = literal(&after[open + 1..]) {
                launched.push(name);
            }
        }
        launched.extend(IG_KERNELS.iter().flatten().map(|k| k.to_string()));
        // Kernels launched through act_kernel: each name given is an f32 kernel with a twin,
        // and both of every pair are loaded.
        let mut twins = 0;
        for (i, _) in src.match_indices("act_kernel(") {
            if let Some(name) = literal(&src[i + "act_kernel(".len()..]) {
                assert!(
                    ACT_TWIN_KERNELS.iter().any(|(f, _)| *f == name),
                    "act_kernel({name:?}): not in ACT_TWIN_KERNELS"
                );
                twins += 1;
            }
        }
        assert!(twins >= 12, "found only {twins} act_kernel launches");
        launched.extend(
            ACT_TWIN_KERNELS
                .iter()
                .flat_map(|(f, h)| [f.to_string(), h.to_string()]),
        );
        assert!(
            launched.len() > 40,
            "found only {} launches",
            launched.len()
        );
        for name in &launched {
            assert!(
                KERNEL_NAMES.contains(&name.as_str()),
                "mod.rs launches {name:?}, which KERNEL_NAMES does not load"
            );
        }
    }

    #[test]
    fn compiled_kernels_are_kept_on_disk_whole_or_compiled_again() {
        let dir = std::env::temp_dir().join(format!("regimen-ptx-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let key = "ab".repeat(32);
        let calls = std::cell::Cell::new(0);
        let compile = || {
            calls.set(calls.get() + 1);
            Ok(format!("// PTX {}", calls.get()))
        };
        // Compiled, then read back without compiling.
        assert_eq!(cached_ptx(Some(&dir), &key, compile).unwrap(), "// PTX 1");
        assert_eq!(cached_ptx(Some(&dir), &key, compile).unwrap(), "// PTX 1");
        assert_eq!(calls.get(), 1);
        // Another key (other source, options or NVRTC) compiles.
        let other = "cd".repeat(32);
        assert_eq!(cached_ptx(Some(&dir), &other, compile).unwrap(), "// PTX 2");
        // A cut file (no end line) is compiled again and replaced.
        let file = dir.join(format!("kernels-{}.ptx", &key[..32]));
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, &text[..text.len() - 5]).unwrap();
        assert_eq!(cached_ptx(Some(&dir), &key, compile).unwrap(), "// PTX 3");
        assert_eq!(cached_ptx(Some(&dir), &key, compile).unwrap(), "// PTX 3");
        // No folder, or one that cannot be made: compiled each time, still returned.
        assert_eq!(cached_ptx(None, &key, compile).unwrap(), "// PTX 4");
        let blocked = dir.join("file");
        std::fs::write(&blocked, b"x").unwrap();
        assert_eq!(
            cached_ptx(Some(&blocked.join("sub")), &key, compile).unwrap(),
            "// PTX 5"
        );
        // A compile error is returned, nothing written.
        let e = cached_ptx(Some(&dir), &"ef".repeat(32), || {
            Err(Error::config("kernels", "x", "bad"))
        });
        assert!(e.is_err());
        assert!(!dir
            .join(format!("kernels-{}.ptx", &"ef".repeat(16)))
            .exists());
        let _ = std::fs::remove_dir_all(&dir);
        // The key follows the options: each architecture its own.
        assert_ne!(kernel_key((8, 0)), kernel_key((9, 0)));
        assert_eq!(kernel_key((9, 0)), kernel_key((9, 0)));
    }

    #[test]
    fn batch_norm_splits_fill_the_gpu_with_blocks_of_work() {
        // cnn-step's layers at batch 128 and 512: hundreds to two thousand blocks.
        assert_eq!(bn_splits(128, 32, 784), 49);
        assert_eq!(bn_splits(128, 64, 196), 13);
        assert_eq!(bn_splits(512, 32, 784), 64);
        assert_eq!(bn_splits(512, 64, 196), 32);
        // Never more splits than samples, never none.
        assert_eq!(bn_splits(3, 1, 100_000), 3);
        assert_eq!(bn_splits(0, 4, 10), 1);
        assert_eq!(bn_splits(1000, 3, 1), 1);
    }

    #[test]
    fn plane_blocks_are_whole_warps_up_to_256_threads() {
        for (inner, block) in [
            (0, 32),
            (1, 32),
            (32, 32),
            (33, 64),
            (49, 64),
            (196, 224),
            (256, 256),
            (784, 256),
        ] {
            assert_eq!(plane_block(inner), block, "{inner}");
        }
    }

    #[test]
    fn gpus_before_ampere_are_refused_in_words() {
        let e = check_arch((7, 5), "Tesla T4", 1).unwrap_err().to_string();
        assert!(
            e.starts_with("cuda:1: Tesla T4 has compute capability 7.5")
                && e.contains("8.0 or newer"),
            "{e}"
        );
        for arch in [(8, 0), (8, 9), (9, 0), (10, 0)] {
            check_arch(arch, "GPU", 0).unwrap();
        }
    }

    #[test]
    fn regimen_conv_takes_im2col_implicit_or_auto_only() {
        assert_eq!(conv_choice(None).unwrap(), ConvMode::Im2col);
        assert_eq!(conv_choice(Some("im2col")).unwrap(), ConvMode::Im2col);
        assert_eq!(conv_choice(Some("implicit")).unwrap(), ConvMode::Implicit);
        assert_eq!(conv_choice(Some("auto")).unwrap(), ConvMode::Auto);
        for bad in ["", "1", "Implicit", "cudnn", "implicit ", "AUTO"] {
            let e = conv_choice(Some(bad)).unwrap_err().to_string();
            assert!(
                e.contains(&format!("REGIMEN_CONV={bad}:"))
                    && e.contains("im2col, implicit or auto"),
                "{bad:?}: {e}"
            );
        }
    }

    /// im2col's weight gradient: cnn-step's layers split into products of at least 4096 terms
    /// whose tiles fill the GPU about twice, covering the reduction with less than one
    /// term per split left over (added onto the first); short reductions stay one product.
    #[test]
    fn im2col_weight_gradient_splits_cover_the_reduction() {
        assert_eq!(gemm_splits(512, 512, 784), (1, 512), "a linear layer's");
        assert_eq!(gemm_splits(8191, 32, 288), (1, 8191));
        assert_eq!(gemm_splits(10_933, 4, 27), (2, 5464));
        for (np, oc, k) in [
            (128 * 784, 32, 288),
            (512 * 784, 32, 288),
            (128 * 196, 64, 576),
            (512 * 196, 64, 576),
            (512 * 784, 32, 9),
            (1 << 24, 1024, 1024),
        ] {
            let (splits, len) = gemm_splits(np, oc, k);
            assert!(splits >= 2, "{np} {oc} {k}: {splits}");
            assert!(len >= 4096 && splits * len <= np, "{np}: {splits} x {len}");
            assert!(np - splits * len < 8 * splits, "{np}: {splits} x {len}");
            assert_eq!(len % 8, 0, "{np}: {splits} x {len}");
            let tiles = oc.div_ceil(128) * k.div_ceil(128);
            assert!(
                splits * tiles <= 264 || splits == 1,
                "{np} {oc} {k}: {splits}"
            );
        }
        assert_eq!(gemm_splits(512 * 784, 32, 288).0, 88);
    }

    #[test]
    fn weight_gradient_chunks_cover_the_reduction() {
        for (np, tiles) in [
            (1, 1),
            (7, 3),
            (100_352, 3),
            (401_408, 5),
            (2_000_000_000, 1),
        ] {
            let (chunks, chunk) = dw_chunks(np, tiles);
            assert_eq!(chunk % 32, 0, "{np} {tiles}: the kernel steps by 8 or 32");
            assert!(
                (1..=65535).contains(&chunks),
                "{np} {tiles}: grid z {chunks}"
            );
            assert!(
                chunks * chunk >= np && (chunks - 1) * chunk < np,
                "{np}: {chunks} x {chunk}"
            );
            assert!(
                chunk >= 256.min(np.next_multiple_of(32)),
                "{np}: chunks of {chunk}"
            );
        }
        // cnn-step's second layer at batch 128 (3 tiles): about 1024 blocks.
        let (chunks, _) = dw_chunks(100_352, 3);
        assert!((300..=400).contains(&chunks), "{chunks}");
    }
}
