//! Gradients summed GPU to GPU with NCCL, when `REGIMEN_NCCL=1` asks for it and the model is
//! on a GPU: each rank scales its gradients by its share of the global batch and NCCL sums
//! them in place, on the GPU's stream, with no host copy. MPI still carries everything else
//! (the unique id that names the NCCL communicator, the broadcasts, the stop flags, the
//! evaluation counts).
//!
//! Off by default: it has not run on several GPUs yet. The MPI path through host memory
//! ([`super::Reducer`]'s buckets) is the default on GPUs too.

use super::Comm;
use crate::backend::cuda::nccl::{self, NcclComm, ID_BYTES};
use crate::error::{Error, Result};
use crate::layer::Layer;
use crate::tensor::Device;

/// Whether `REGIMEN_NCCL` asks for NCCL: exactly `1`.
pub fn requested() -> bool {
    asks(std::env::var("REGIMEN_NCCL").ok().as_deref())
}

fn asks(value: Option<&str>) -> bool {
    value == Some("1")
}

/// The NCCL member of this rank.
pub struct DeviceSum {
    nccl: NcclComm,
}

impl DeviceSum {
    /// Join the NCCL communicator of the run on `device` (every rank calls this at the same
    /// point): rank 0 makes the unique id and MPI gives it to the others. An error on rank 0
    /// reaches the others as "rank 0 could not start NCCL" instead of a hang.
    pub fn start(comm: &dyn Comm, device: Device) -> Result<DeviceSum> {
        let Device::Cuda(ordinal) = device else {
            return Err(Error::Distributed(format!(
                "NCCL sums gradients on GPUs; this model is on {device}"
            )));
        };
        // Every rank loads NCCL and has its GPU before any joins: a rank that cannot would
        // leave the others waiting in ncclCommInitRank, which has no timeout.
        let ready = nccl::version().and_then(|_| crate::backend::cuda::get(ordinal).map(drop));
        let all = comm.gather_u64(u64::from(ready.is_ok()))?;
        ready?;
        if let Some(r) = all.iter().position(|&ok| ok == 0) {
            return Err(Error::Distributed(format!(
                "rank {r} could not start NCCL (its own error says why): stopping"
            )));
        }
        let (mine, failed) = if comm.rank() == 0 {
            match nccl::unique_id() {
                Ok(id) => (id.to_vec(), None),
                Err(e) => (Vec::new(), Some(e)),
            }
        } else {
            (Vec::new(), None)
        };
        let id = comm.broadcast_bytes(mine, 0)?;
        if let Some(e) = failed {
            return Err(e);
        }
        let id: [u8; ID_BYTES] = id.try_into().map_err(|_| {
            Error::Distributed(
                "rank 0 could not start NCCL (its own error says why): stopping".into(),
            )
        })?;
        Ok(DeviceSum {
            nccl: NcclComm::new(ordinal, &id, comm.rank(), comm.size())?,
        })
    }

    /// Every gradient of `model` times `share`, summed over the ranks (queued on the GPU).
    pub fn sum_grads(&self, model: &mut dyn Layer, share: f32) -> Result<()> {
        // Scaled first, outside the NCCL group (the scaling kernels precede the sums on the
        // stream).
        if share != 1.0 {
            model.visit_params_unnamed(&mut |p| {
                let be = p.grad.backend();
                be.scale(&mut p.grad, share);
            });
        }
        self.nccl
            .sum_with(&mut |sum| model.visit_params_unnamed(&mut |p| sum(&mut p.grad)))
    }

    /// What carries the sums (`"NCCL 2.32.3"`).
    pub fn describe(&self) -> String {
        format!("NCCL {}", nccl::version().unwrap_or_else(|_| "?".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_asks_for_nccl() {
        assert!(asks(Some("1")));
        for v in [None, Some("0"), Some(""), Some("yes"), Some("true")] {
            assert!(!asks(v), "{v:?}");
        }
    }

    #[test]
    fn nccl_on_the_cpu_is_an_error_that_says_so() {
        let e = DeviceSum::start(&super::super::Single, Device::Cpu)
            .err()
            .expect("an error")
            .to_string();
        assert!(e.contains("GPUs") && e.contains("cpu"), "{e}");
    }
}
