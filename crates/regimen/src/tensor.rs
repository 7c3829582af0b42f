//! `Tensor`: a contiguous, row-major block of `f32` on one device, with a shape.
//!
//! Cloning is cheap (the storage is reference-counted); writing through [`Tensor::cpu_mut`]
//! copies the storage first if another clone shares it (copy on write), so a layer may keep a
//! clone of its input for backward without fear that the caller changes it.
//!
//! Layers never touch host memory: they call [`Backend`] operations through
//! [`Tensor::backend`], so the same layer code runs on every device. Reading values back to the
//! host ([`Tensor::to_vec`]) is for tests, metrics read once per epoch, and I/O.

use std::sync::Arc;

use crate::backend::{self, Backend};
use crate::error::{Error, Result};

/// Where a tensor's storage lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
}

impl Device {
    /// The backend that runs operations on this device.
    pub fn backend(self) -> &'static dyn Backend {
        match self {
            Device::Cpu => &backend::cpu::CPU,
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Storage {
    Cpu(Vec<f32>),
}

#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Arc<Storage>,
}

impl Tensor {
    /// A tensor of zeros.
    pub fn zeros(shape: &[usize], device: Device) -> Tensor {
        device.backend().zeros(shape)
    }

    /// A tensor filled with `value`.
    pub fn full(shape: &[usize], value: f32, device: Device) -> Tensor {
        let mut t = Tensor::zeros(shape, device);
        t.backend().fill(&mut t, value);
        t
    }

    /// A CPU tensor from row-major host data; errors if `data.len()` is not the product of `shape`.
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::shape(
                "Tensor::from_vec",
                format!("{n} values for shape {shape:?}"),
                &[data.len()],
            ));
        }
        Ok(Tensor::from_cpu(shape.to_vec(), data))
    }

    /// A tensor on `device` from host data.
    pub fn from_host(shape: &[usize], data: Vec<f32>, device: Device) -> Result<Tensor> {
        let t = Tensor::from_vec(shape, data)?;
        Ok(t.to_device(device))
    }

    pub(crate) fn from_cpu(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor {
            shape,
            storage: Arc::new(Storage::Cpu(data)),
        }
    }

    /// A copy on another device (a clone when it is already there).
    pub fn to_device(&self, device: Device) -> Tensor {
        match device {
            Device::Cpu => self.clone(),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn device(&self) -> Device {
        match *self.storage {
            Storage::Cpu(_) => Device::Cpu,
        }
    }

    pub fn backend(&self) -> &'static dyn Backend {
        self.device().backend()
    }

    /// The same data with another shape of the same size (no copy).
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if shape.iter().product::<usize>() != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!("a shape with {} elements, like {:?}", self.numel(), shape),
                &self.shape,
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: self.storage.clone(),
        })
    }

    /// Copy the values to the host (row-major).
    pub fn to_vec(&self) -> Vec<f32> {
        self.backend().to_host(self)
    }

    /// The single value of a one-element tensor, read back to the host.
    pub fn item(&self) -> f32 {
        debug_assert_eq!(self.numel(), 1);
        self.to_vec()[0]
    }

    /// Host view of a CPU tensor. Backend code only.
    pub(crate) fn cpu(&self) -> &[f32] {
        match &*self.storage {
            Storage::Cpu(v) => v,
        }
    }

    /// Mutable host view of a CPU tensor (copies first if the storage is shared). Backend code only.
    pub(crate) fn cpu_mut(&mut self) -> &mut [f32] {
        match Arc::make_mut(&mut self.storage) {
            Storage::Cpu(v) => v,
        }
    }
}

/// A list of `u32` on one device: class labels, arg-max positions of pooling layers.
#[derive(Clone, Debug)]
pub struct Indices {
    storage: Arc<IndexStorage>,
}

#[derive(Clone, Debug)]
pub(crate) enum IndexStorage {
    Cpu(Vec<u32>),
}

impl Indices {
    pub fn from_vec(v: Vec<u32>) -> Indices {
        Indices {
            storage: Arc::new(IndexStorage::Cpu(v)),
        }
    }

    pub fn len(&self) -> usize {
        self.cpu().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn to_vec(&self) -> Vec<u32> {
        self.cpu().to_vec()
    }

    pub fn to_device(&self, device: Device) -> Indices {
        match device {
            Device::Cpu => self.clone(),
        }
    }

    pub(crate) fn cpu(&self) -> &[u32] {
        match &*self.storage {
            IndexStorage::Cpu(v) => v,
        }
    }
}
