//! `Tensor`: a contiguous, row-major block of elements of one [`DType`] on one [`Device`],
//! with a shape.
//!
//! A tensor is its layout (shape and element type) plus a reference-counted storage that a
//! backend owns: cloning is cheap; a backend writing into a tensor copies the storage first if
//! another clone shares it (copy on write), so a layer may keep a clone of its input for
//! backward without fear that the caller changes it. Storage comes from the backend's buffer
//! pool and returns to it when the last clone is dropped ([`crate::backend::pool`]).
//!
//! Layers never touch memory: they call [`Backend`] operations through [`Tensor::backend`], so
//! the same layer code runs on every device. Reading values back to the host
//! ([`Tensor::to_vec`], [`Tensor::item`]) is for tests, metrics read once per epoch, and I/O;
//! every such read is counted ([`crate::backend::strict`]).

mod dtype;

use std::sync::Arc;

pub use dtype::DType;

use crate::backend::{self, Backend, HostBuf};
use crate::error::{Error, Result};

/// Where a tensor's storage lives. `Cuda(n)` is the GPU of ordinal `n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// The backend that runs operations on this device. A `Cuda` device must have been checked
    /// with [`Device::cuda`] (or [`Device::parse`]) first; otherwise this panics when the GPU
    /// cannot be used.
    pub fn backend(self) -> &'static dyn Backend {
        match self {
            Device::Cpu => &backend::cpu::CPU,
            Device::Cuda(n) => backend::cuda_backend(n),
        }
    }

    /// The GPU of ordinal `n`, initialized; an error (never a panic) says why it cannot be used:
    /// no CUDA driver, no such GPU, or a build without the `cuda` feature.
    pub fn cuda(n: usize) -> Result<Device> {
        backend::init_cuda(n)?;
        Ok(Device::Cuda(n))
    }

    /// How many GPUs this process can use; an error says why none can (no CUDA driver, a
    /// build without the `cuda` feature).
    pub fn cuda_count() -> Result<usize> {
        backend::cuda_count()
    }

    /// `cpu`, `cuda` (GPU 0) or `cuda:N`, checked as [`Device::cuda`] does.
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Device::cuda(0),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Device::cuda(n),
                _ => Err(Error::config("device", s, "expected cpu, cuda or cuda:N")),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The memory behind a tensor, one variant per device; each backend reads only its own.
#[derive(Clone, Debug)]
pub(crate) enum Storage {
    Cpu(backend::cpu::CpuBuffer),
    #[cfg(feature = "cuda")]
    Cuda(backend::cuda::CudaBuffer),
}

/// Up to this many dimensions.
pub const MAX_RANK: usize = 8;

/// A shape kept inline (no heap allocation per tensor).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Shape {
    dims: [usize; MAX_RANK],
    rank: u8,
}

impl Shape {
    fn new(s: &[usize]) -> Shape {
        assert!(
            s.len() <= MAX_RANK,
            "tensors have at most {MAX_RANK} dimensions, got {s:?}"
        );
        let mut dims = [0; MAX_RANK];
        dims[..s.len()].copy_from_slice(s);
        Shape {
            dims,
            rank: s.len() as u8,
        }
    }
    fn as_slice(&self) -> &[usize] {
        &self.dims[..self.rank as usize]
    }
}

impl std::fmt::Debug for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_slice())
    }
}

#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Shape,
    dtype: DType,
    storage: Arc<Storage>,
}

impl Tensor {
    /// An `f32` tensor of zeros.
    pub fn zeros(shape: &[usize], device: Device) -> Tensor {
        device.backend().zeros(shape, DType::F32)
    }

    /// A tensor of zeros of any element type.
    pub fn zeros_of(shape: &[usize], dtype: DType, device: Device) -> Tensor {
        device.backend().zeros(shape, dtype)
    }

    /// An `f32` tensor filled with `value`.
    pub fn full(shape: &[usize], value: f32, device: Device) -> Tensor {
        let mut t = Tensor::zeros(shape, device);
        t.backend().fill(&mut t, value);
        t
    }

    /// A CPU `f32` tensor from row-major host data; errors if `data.len()` is not the product
    /// of `shape`.
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
        Tensor::from_host(shape, data, Device::Cpu)
    }

    /// An `f32` tensor on `device` from host data.
    pub fn from_host(shape: &[usize], data: Vec<f32>, device: Device) -> Result<Tensor> {
        check_len("Tensor::from_host", shape, data.len())?;
        Ok(device
            .backend()
            .upload(shape, DType::F32, HostBuf::F32(data)))
    }

    /// A `bf16` or `f16` tensor from the raw 16-bit patterns of its elements.
    pub fn from_half_bits(
        shape: &[usize],
        dtype: DType,
        bits: Vec<u16>,
        device: Device,
    ) -> Result<Tensor> {
        check_len("Tensor::from_half_bits", shape, bits.len())?;
        if !matches!(dtype, DType::BF16 | DType::F16) {
            return Err(Error::config(
                "dtype",
                dtype,
                "16-bit patterns need bf16 or f16",
            ));
        }
        Ok(device.backend().upload(shape, dtype, HostBuf::U16(bits)))
    }

    /// The backend's part: wrap a storage it made.
    pub(crate) fn from_parts(shape: &[usize], dtype: DType, storage: Storage) -> Tensor {
        Tensor {
            shape: Shape::new(shape),
            dtype,
            storage: Arc::new(storage),
        }
    }

    /// A copy on another device (a clone when it is already there). Crosses the host.
    pub fn to_device(&self, device: Device) -> Tensor {
        if device == self.device() {
            return self.clone();
        }
        let host = self.backend().download(self);
        device.backend().upload(self.shape(), self.dtype, host)
    }

    /// This tensor converted to another element type (rounding to nearest even); a clone
    /// when it already has that type.
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        if dtype == self.dtype {
            return self.clone();
        }
        self.backend().cast(self, dtype)
    }

    pub fn shape(&self) -> &[usize] {
        self.shape.as_slice()
    }

    pub fn numel(&self) -> usize {
        self.shape().iter().product()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> Device {
        match &*self.storage {
            Storage::Cpu(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => Device::Cuda(b.ordinal()),
        }
    }

    pub fn backend(&self) -> &'static dyn Backend {
        self.device().backend()
    }

    /// The same data with another shape of the same size (no copy).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if shape.iter().product::<usize>() != self.numel() || shape.len() > MAX_RANK {
            return Err(Error::shape(
                "reshape",
                format!("a shape with {} elements, like {:?}", self.numel(), shape),
                self.shape(),
            ));
        }
        Ok(Tensor {
            shape: Shape::new(shape),
            dtype: self.dtype,
            storage: self.storage.clone(),
        })
    }

    /// Copy the values to the host (row-major), converted to `f32`. A host read.
    pub fn to_vec(&self) -> Vec<f32> {
        self.backend().download(self).into_f32(self.dtype)
    }

    /// The single value of a one-element tensor, read back to the host.
    pub fn item(&self) -> f32 {
        debug_assert_eq!(self.numel(), 1);
        self.to_vec()[0]
    }

    /// The storage, for the backend that owns it.
    pub(crate) fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The storage for writing (copied first if another tensor shares it), for its backend.
    pub(crate) fn storage_mut(&mut self) -> &mut Storage {
        Arc::make_mut(&mut self.storage)
    }

    /// Whether two tensors share one storage.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }
}

fn check_len(what: &str, shape: &[usize], len: usize) -> Result<()> {
    let n: usize = shape.iter().product();
    if n != len || shape.len() > MAX_RANK {
        return Err(Error::shape(
            what,
            format!("{n} values for shape {shape:?}"),
            &[len],
        ));
    }
    Ok(())
}

/// A list of `u32` on one device: class labels, arg-max positions of pooling layers, the
/// step counter. It knows an upper bound of its values (`bound`: every value is below it),
/// set when it was made, so a loss can validate labels without reading the device.
#[derive(Clone, Debug)]
pub struct Indices {
    t: Tensor,
    bound: u64,
}

impl Indices {
    /// CPU indices from host values.
    pub fn from_vec(v: Vec<u32>) -> Indices {
        Indices::from_host(v, Device::Cpu)
    }

    /// Indices on `device` from host values.
    pub fn from_host(v: Vec<u32>, device: Device) -> Indices {
        let bound = v.iter().map(|&x| x as u64 + 1).max().unwrap_or(0);
        let n = v.len();
        Indices {
            t: device.backend().upload(&[n], DType::U32, HostBuf::U32(v)),
            bound,
        }
    }

    /// `n` zeros on `device`.
    pub fn zeros(n: usize, device: Device) -> Indices {
        Indices {
            t: device.backend().zeros(&[n], DType::U32),
            bound: u64::from(n > 0),
        }
    }

    /// Wrap a `u32` tensor a backend made, whose values are all below `bound`.
    pub(crate) fn from_tensor(t: Tensor, bound: u64) -> Indices {
        debug_assert_eq!(t.dtype(), DType::U32);
        Indices { t, bound }
    }

    pub fn len(&self) -> usize {
        self.t.numel()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every value is below this.
    pub fn bound(&self) -> u64 {
        self.bound
    }

    pub fn device(&self) -> Device {
        self.t.device()
    }

    /// The values, read back to the host. A host read.
    pub fn to_vec(&self) -> Vec<u32> {
        match self.t.backend().download(&self.t) {
            HostBuf::U32(v) => v,
            other => unreachable!("indices downloaded as {other:?}"),
        }
    }

    pub fn to_device(&self, device: Device) -> Indices {
        Indices {
            t: self.t.to_device(device),
            bound: self.bound,
        }
    }

    /// The `u32` tensor, for backends.
    pub(crate) fn tensor(&self) -> &Tensor {
        &self.t
    }

    pub(crate) fn tensor_mut(&mut self) -> &mut Tensor {
        &mut self.t
    }
}
