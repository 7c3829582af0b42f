//! Convolutions through cuDNN (its legacy convolution API), an alternative to im2col + cuBLAS
//! for f32 convolutions: `REGIMEN_CUDNN=1` turns it on (off by default until it has been
//! measured on a GPU; `bench/gpu-check` runs the conformance tests and cnn-step both ways).
//!
//! One plan per convolution shape: the descriptors of `x`, `w` and `y`, and for each direction
//! (forward, input gradient, weight gradient) the algorithm cuDNN's heuristics rank first among
//! those that are deterministic (regimen's runs give the same bits every time), fit the
//! workspace, and use the math the backend allows (cuDNN's default math, TF32 tensor cores, or
//! FMA only when [`set_conv_tf32`](super::set_conv_tf32)`(false)`; never f32 converted down to
//! f16). A shape with no such algorithm, or that cuDNN fails to plan, keeps im2col. The workspace is allocated once, so a step recorded as a CUDA graph never allocates.
//! Plans are made at a shape's first use (the eager steps before a recording).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cudnn::{result as dnn, sys as dsys};
use cudarc::driver::{result as dr, sys};

use crate::backend::Window;
use crate::error::{Error, Result};

/// Bytes of the workspace every cuDNN call shares.
const WORKSPACE: usize = 64 << 20;

/// Whether `REGIMEN_CUDNN` asks for cuDNN convolutions.
pub(super) fn requested() -> bool {
    asks(std::env::var("REGIMEN_CUDNN").ok().as_deref())
}

/// The rule for the variable's value: exactly `1`.
fn asks(value: Option<&str>) -> bool {
    value == Some("1")
}

#[derive(Clone, Copy, Hash, PartialEq, Eq)]
struct Key {
    x: [usize; 4],
    w: [usize; 4],
    stride: usize,
    pad: usize,
    tf32: bool,
}

/// The descriptors of one convolution shape, destroyed when dropped (a plan keeps them for
/// the life of the process).
struct Descs {
    x: dsys::cudnnTensorDescriptor_t,
    w: dsys::cudnnFilterDescriptor_t,
    y: dsys::cudnnTensorDescriptor_t,
    /// One convolution descriptor per direction: each carries its algorithm's math type.
    conv: [dsys::cudnnConvolutionDescriptor_t; 3],
}

impl Drop for Descs {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created by cuDNN (or is null) and is destroyed once.
        unsafe {
            for t in [self.x, self.y] {
                if !t.is_null() {
                    let _ = dnn::destroy_tensor_descriptor(t);
                }
            }
            if !self.w.is_null() {
                let _ = dnn::destroy_filter_descriptor(self.w);
            }
            for c in self.conv {
                if !c.is_null() {
                    let _ = dnn::destroy_convolution_descriptor(c);
                }
            }
        }
    }
}

/// The descriptors and algorithms of one convolution shape.
pub(super) struct Plan {
    d: Descs,
    fwd: dsys::cudnnConvolutionFwdAlgo_t,
    data: dsys::cudnnConvolutionBwdDataAlgo_t,
    filter: dsys::cudnnConvolutionBwdFilterAlgo_t,
    /// The math type of each direction's algorithm (forward, input and weight gradient).
    math: [dsys::cudnnMathType_t; 3],
}

/// Why a direction has no algorithm: none deterministic within the workspace and the math.
fn no_algorithm(direction: &str, offered: i32) -> String {
    format!(
        "none of cuDNN's {offered} {direction} algorithms is deterministic, within the \
         workspace and of the allowed math"
    )
}

/// cuDNN on the backend's stream.
pub(super) struct Dnn {
    handle: dsys::cudnnHandle_t,
    workspace: u64,
    /// `None`: cuDNN offers no suitable algorithm for the shape (another engine runs it).
    /// Per shape: its plan, and a line saying what cuDNN chose (or why it has none).
    plans: Mutex<HashMap<Key, (Option<&'static Plan>, String)>>,
}

// SAFETY: the handle and the descriptors are used under the backend's lock, on its one stream.
unsafe impl Send for Dnn {}
unsafe impl Sync for Dnn {}
unsafe impl Send for Plan {}
unsafe impl Sync for Plan {}

fn derr(what: &str) -> impl FnOnce(dsys::cudnnStatus_t) -> Error + '_ {
    move |e| Error::Device {
        device: "cuda".into(),
        reason: format!("cuDNN {what}: {e:?}"),
    }
}

fn check(r: std::result::Result<(), dnn::CudnnError>, what: &str) -> Result<()> {
    r.map_err(|e| derr(what)(e.0))
}

impl Dnn {
    /// cuDNN on `stream`, or why not (the library is probed first: cudarc panics when a
    /// library is missing).
    pub(super) fn new(stream: sys::CUstream) -> Result<Dnn> {
        if !unsafe { dsys::is_culib_present() } {
            return Err(Error::Device {
                device: "cuda".into(),
                reason: "cuDNN (libcudnn.so.9) not found: install cuDNN 9 or put it on \
                         LD_LIBRARY_PATH"
                    .into(),
            });
        }
        let handle = dnn::create_handle().map_err(|e| derr("create")(e.0))?;
        check(
            unsafe { dnn::set_stream(handle, stream as dsys::cudaStream_t) },
            "set stream",
        )?;
        let workspace = unsafe { dr::malloc_sync(WORKSPACE) }.map_err(|e| Error::Device {
            device: "cuda".into(),
            reason: format!("allocating the cuDNN workspace: {e:?}"),
        })?;
        Ok(Dnn {
            handle,
            workspace,
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// The plan of a convolution of `x` by `w`, made at its first use; `None` when cuDNN has
    /// no deterministic algorithm within the workspace for one of the three directions.
    /// Called under the backend's lock.
    pub(super) fn plan(
        &self,
        x: &[usize],
        w: &[usize],
        win: Window,
        tf32: bool,
    ) -> Result<Option<&'static Plan>> {
        let key = Key {
            x: [x[0], x[1], x[2], x[3]],
            w: [w[0], w[1], w[2], w[3]],
            stride: win.stride,
            pad: win.pad,
            tf32,
        };
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((p, _)) = plans.get(&key) {
            return Ok(*p);
        }
        // A shape cuDNN refuses (an error while planning, or no suitable algorithm) keeps
        // im2col; `shapes` counts both kinds.
        let (p, note) = match self.make_plan(key) {
            Ok(Ok(p)) => {
                let note = format!(
                    "cudnn: forward {:?} ({:?}), input gradient {:?} ({:?}), weight gradient \
                     {:?} ({:?})",
                    p.fwd, p.math[0], p.data, p.math[1], p.filter, p.math[2]
                );
                // Plans live as long as the process (the backend is never dropped).
                (Some(&*Box::leak(Box::new(p))), note)
            }
            Ok(Err(why)) => (None, format!("no cuDNN plan: {why}")),
            Err(e) => (None, format!("no cuDNN plan: {e}")),
        };
        plans.insert(key, (p, note));
        Ok(p)
    }

    /// One line per convolution shape met so far: the shape and what runs it.
    pub(super) fn notes(&self) -> Vec<String> {
        let plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        let mut lines: Vec<String> = plans
            .iter()
            .map(|(k, (_, note))| {
                format!(
                    "x {:?} w {:?} stride {} pad {}{}: {note}",
                    k.x,
                    k.w,
                    k.stride,
                    k.pad,
                    if k.tf32 { " tf32" } else { "" }
                )
            })
            .collect();
        lines.sort();
        lines
    }

    /// The plan of shape `k`; `Ok(Err(why))` when cuDNN has no suitable algorithm.
    fn make_plan(&self, k: Key) -> Result<std::result::Result<Plan, String>> {
        use dsys::cudnnDataType_t::CUDNN_DATA_FLOAT;
        use dsys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let i = |v: usize| v as i32;
        let oh = (k.x[2] + 2 * k.pad - k.w[2]) / k.stride + 1;
        let ow = (k.x[3] + 2 * k.pad - k.w[3]) / k.stride + 1;
        let tensor = |d: [usize; 4]| -> Result<dsys::cudnnTensorDescriptor_t> {
            let t = dnn::create_tensor_descriptor().map_err(|e| derr("tensor descriptor")(e.0))?;
            check(
                unsafe {
                    dnn::set_tensor4d_descriptor(
                        t,
                        CUDNN_TENSOR_NCHW,
                        CUDNN_DATA_FLOAT,
                        [i(d[0]), i(d[1]), i(d[2]), i(d[3])],
                    )
                },
                "tensor descriptor",
            )?;
            Ok(t)
        };
        let mut descs = Descs {
            x: std::ptr::null_mut(),
            w: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
            conv: [std::ptr::null_mut(); 3],
        };
        descs.x = tensor(k.x)?;
        descs.y = tensor([k.x[0], k.w[0], oh, ow])?;
        descs.w = dnn::create_filter_descriptor().map_err(|e| derr("filter descriptor")(e.0))?;
        let (x, y, w) = (descs.x, descs.y, descs.w);
        check(
            unsafe {
                dnn::set_filter4d_descriptor(
                    w,
                    CUDNN_DATA_FLOAT,
                    CUDNN_TENSOR_NCHW,
                    [i(k.w[0]), i(k.w[1]), i(k.w[2]), i(k.w[3])],
                )
            },
            "filter descriptor",
        )?;
        // TF32 allowed: cuDNN's default math (TF32 tensor cores on Ampere and later, as
        // PyTorch asks); otherwise FMA only. Never a down-conversion of f32 to f16.
        use dsys::cudnnMathType_t::{
            CUDNN_DEFAULT_MATH, CUDNN_FMA_MATH, CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION,
        };
        let allowed = if k.tf32 {
            CUDNN_DEFAULT_MATH
        } else {
            CUDNN_FMA_MATH
        };
        for c in descs.conv.iter_mut() {
            *c = dnn::create_convolution_descriptor()
                .map_err(|e| derr("convolution descriptor")(e.0))?;
            check(
                unsafe {
                    dnn::set_convolution2d_descriptor(
                        *c,
                        i(k.pad),
                        i(k.pad),
                        i(k.stride),
                        i(k.stride),
                        1,
                        1,
                        dsys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                        CUDNN_DATA_FLOAT,
                    )
                },
                "convolution descriptor",
            )?;
            check(
                unsafe { dnn::set_convolution_math_type(*c, allowed) },
                "math type",
            )?;
        }
        let conv = descs.conv;
        let ok_math = |m: dsys::cudnnMathType_t| match k.tf32 {
            true => m != CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION,
            false => m == CUDNN_FMA_MATH,
        };
        let usable = |status, det, mem: usize, math| {
            status == dsys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
                && det == dsys::cudnnDeterminism_t::CUDNN_DETERMINISTIC
                && mem <= WORKSPACE
                && ok_math(math)
        };
        const N: usize = 16;
        let mut got = 0i32;
        // Forward.
        let mut fwd: [dsys::cudnnConvolutionFwdAlgoPerf_t; N] = unsafe { std::mem::zeroed() };
        check(
            unsafe {
                dnn::get_convolution_forward_algorithm(
                    self.handle,
                    x,
                    w,
                    conv[0],
                    y,
                    N as i32,
                    &mut got,
                    fwd.as_mut_ptr(),
                )
            },
            "forward algorithm",
        )?;
        let Some(f) = fwd[..got.max(0) as usize]
            .iter()
            .find(|p| usable(p.status, p.determinism, p.memory, p.mathType))
        else {
            return Ok(Err(no_algorithm("forward", got)));
        };
        // Input gradient.
        let mut bd: [dsys::cudnnConvolutionBwdDataAlgoPerf_t; N] = unsafe { std::mem::zeroed() };
        check(
            unsafe {
                dnn::get_convolution_backward_data_algorithm(
                    self.handle,
                    w,
                    y,
                    conv[1],
                    x,
                    N as i32,
                    &mut got,
                    bd.as_mut_ptr(),
                )
            },
            "input-gradient algorithm",
        )?;
        let Some(d) = bd[..got.max(0) as usize]
            .iter()
            .find(|p| usable(p.status, p.determinism, p.memory, p.mathType))
        else {
            return Ok(Err(no_algorithm("input gradient", got)));
        };
        // Weight gradient.
        let mut bf: [dsys::cudnnConvolutionBwdFilterAlgoPerf_t; N] = unsafe { std::mem::zeroed() };
        check(
            unsafe {
                dnn::get_convolution_backward_filter_algorithm(
                    self.handle,
                    x,
                    y,
                    conv[2],
                    w,
                    N as i32,
                    &mut got,
                    bf.as_mut_ptr(),
                )
            },
            "weight-gradient algorithm",
        )?;
        let Some(g) = bf[..got.max(0) as usize]
            .iter()
            .find(|p| usable(p.status, p.determinism, p.memory, p.mathType))
        else {
            return Ok(Err(no_algorithm("weight gradient", got)));
        };
        // Each direction runs with its algorithm's math type; the workspace sizes are checked
        // again with the final settings.
        for (c, m) in conv.iter().zip([f.mathType, d.mathType, g.mathType]) {
            check(
                unsafe { dnn::set_convolution_math_type(*c, m) },
                "math type",
            )?;
        }
        let sizes = unsafe {
            [
                dnn::get_convolution_forward_workspace_size(self.handle, x, w, conv[0], y, f.algo),
                dnn::get_convolution_backward_data_workspace_size(
                    self.handle,
                    w,
                    y,
                    conv[1],
                    x,
                    d.algo,
                ),
                dnn::get_convolution_backward_filter_workspace_size(
                    self.handle,
                    x,
                    y,
                    conv[2],
                    w,
                    g.algo,
                ),
            ]
        };
        for s in sizes {
            let bytes = s.map_err(|e| derr("workspace size")(e.0))?;
            if bytes > WORKSPACE {
                return Ok(Err(format!(
                    "a workspace of {bytes} bytes (more than {WORKSPACE})"
                )));
            }
        }
        Ok(Ok(Plan {
            d: descs,
            fwd: f.algo,
            data: d.algo,
            filter: g.algo,
            math: [f.mathType, d.mathType, g.mathType],
        }))
    }

    /// `y = conv(x, w)` (`y` overwritten).
    pub(super) fn forward(&self, p: &Plan, x: u64, w: u64, y: u64) -> Result<()> {
        let (one, zero) = (1.0f32, 0.0f32);
        check(
            unsafe {
                dnn::convolution_forward(
                    self.handle,
                    &one as *const f32 as *const c_void,
                    p.d.x,
                    x as *const c_void,
                    p.d.w,
                    w as *const c_void,
                    p.d.conv[0],
                    p.fwd,
                    self.workspace as *mut c_void,
                    WORKSPACE,
                    &zero as *const f32 as *const c_void,
                    p.d.y,
                    y as *mut c_void,
                )
            },
            "convolution forward",
        )
    }

    /// `dx = conv^T(dy, w)` (`dx` overwritten).
    pub(super) fn input_grad(&self, p: &Plan, w: u64, dy: u64, dx: u64) -> Result<()> {
        let (one, zero) = (1.0f32, 0.0f32);
        check(
            unsafe {
                dnn::convolution_backward_data(
                    self.handle,
                    &one as *const f32 as *const c_void,
                    p.d.w,
                    w as *const c_void,
                    p.d.y,
                    dy as *const c_void,
                    p.d.conv[1],
                    p.data,
                    self.workspace as *mut c_void,
                    WORKSPACE,
                    &zero as *const f32 as *const c_void,
                    p.d.x,
                    dx as *mut c_void,
                )
            },
            "convolution input gradient",
        )
    }

    /// `dw += dy (*) x` (accumulated, as the backend's weight gradients are).
    pub(super) fn weight_grad(&self, p: &Plan, x: u64, dy: u64, dw: u64) -> Result<()> {
        let one = 1.0f32;
        check(
            unsafe {
                dnn::convolution_backward_filter(
                    self.handle,
                    &one as *const f32 as *const c_void,
                    p.d.x,
                    x as *const c_void,
                    p.d.y,
                    dy as *const c_void,
                    p.d.conv[2],
                    p.filter,
                    self.workspace as *mut c_void,
                    WORKSPACE,
                    &one as *const f32 as *const c_void,
                    p.d.w,
                    dw as *mut c_void,
                )
            },
            "convolution weight gradient",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without cuDNN, asking for it is one error line (cudarc would panic on the first call).
    #[test]
    fn a_missing_cudnn_is_an_error_not_a_panic() {
        if unsafe { dsys::is_culib_present() } {
            eprintln!("cuDNN is present here: nothing to check");
            return;
        }
        match Dnn::new(std::ptr::null_mut()) {
            Err(e) => assert!(e.to_string().contains("libcudnn.so.9"), "{e}"),
            Ok(_) => panic!("cuDNN made a handle without its library"),
        }
    }

    #[test]
    fn only_regimen_cudnn_1_asks_for_cudnn() {
        for (v, want) in [
            (Some("1"), true),
            (Some("0"), false),
            (Some("yes"), false),
            (None, false),
        ] {
            assert_eq!(asks(v), want, "REGIMEN_CUDNN={v:?}");
        }
    }
}
