//! The gradient all-reduce of a data-parallel step, in buckets, overlapped with backward.
//!
//! As backward finishes each top-level layer ([`Layer::backward_in_parts`]), the layer's
//! gradients, multiplied by this rank's share of the global batch, are appended to the current
//! bucket; a full bucket (`bucket_bytes`, 1 MiB by default) is handed to the communication
//! thread at once, which sums it over the ranks while backward goes on with the layers below.
//! [`Reducer::finish`] sends the last bucket, waits for every sum and writes the sums back into
//! the gradients. The sums of the shares are one, so every rank then holds the gradient of
//! the mean loss over the whole global batch, and takes the same optimizer step.
//!
//! Parameters are recognized by their address, which does not change during a step; the order
//! in which gradients enter the buckets is backward's, the same on every rank.
//!
//! With `REGIMEN_NCCL=1` and the model on a GPU, the gradients are summed by NCCL on the GPUs
//! instead ([`super::device_sum`]), after backward, with no host copy; the `extra` values still
//! go through MPI.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{host_f32, write_f32, Comm, Op, Reply, Ticket};
use crate::error::Result;
use crate::layer::{Layer, Param};
use crate::tensor::{Device, Tensor};

pub struct Reducer {
    comm: Arc<dyn Comm>,
    /// Elements per bucket.
    cap: usize,
    /// Parameter address -> index in visiting order.
    index: HashMap<usize, usize>,
    /// Per parameter (visiting order): its bucket and offset, once reported.
    slots: Vec<Option<(usize, usize)>>,
    cur: Vec<f32>,
    inflight: Vec<Ticket>,
    sums: Vec<Vec<f32>>,
    spare: Vec<Vec<f32>>,
    share: f32,
    /// Time spent waiting for sums after backward ended, and buckets sent, since creation.
    pub waited: Duration,
    pub buckets: u64,
    /// Whether NCCL was considered yet (at the first backward), and its member if it is used.
    #[cfg(feature = "cuda")]
    device_checked: bool,
    #[cfg(feature = "cuda")]
    device: Option<super::device_sum::DeviceSum>,
}

impl Reducer {
    /// Buckets of about `bucket_bytes` (at least one gradient each).
    pub fn new(comm: Arc<dyn Comm>, bucket_bytes: usize) -> Reducer {
        Reducer {
            comm,
            cap: (bucket_bytes / 4).max(1),
            index: HashMap::new(),
            slots: Vec::new(),
            cur: Vec::new(),
            inflight: Vec::new(),
            sums: Vec::new(),
            spare: Vec::new(),
            share: 1.0,
            waited: Duration::ZERO,
            buckets: 0,
            #[cfg(feature = "cuda")]
            device_checked: false,
            #[cfg(feature = "cuda")]
            device: None,
        }
    }

    /// What carries the gradient sums: `"NCCL 2.32.3"` once NCCL sums them, else the world's
    /// transport (`"MPI (Open MPI v4.1.4)"`).
    pub fn describe(&self) -> String {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.device {
            return d.describe();
        }
        self.comm.describe()
    }

    /// At the first backward: whether NCCL sums the gradients (`REGIMEN_NCCL=1` and the model
    /// on a GPU, on every rank alike), and its communicator if so.
    #[cfg(feature = "cuda")]
    fn check_device(&mut self, model: &mut dyn Layer) -> Result<()> {
        if std::mem::replace(&mut self.device_checked, true) {
            return Ok(());
        }
        let device = grad_device(model);
        let asked = super::device_sum::requested();
        let wanted = asked && device != Device::Cpu;
        let all = self.comm.gather_u64(u64::from(wanted))?;
        if let Some(r) = all.iter().position(|&w| w != all[0]) {
            return Err(crate::error::Error::Distributed(format!(
                "rank {r} {} NCCL and rank 0 {}: set REGIMEN_NCCL alike on every rank, and put \
                 every rank on a GPU",
                if all[r] == 1 { "uses" } else { "does not use" },
                if all[0] == 1 { "does" } else { "does not" },
            )));
        }
        if asked && !wanted && self.comm.rank() == 0 {
            // A closed standard error must not stop the run (eprintln! would panic).
            let _ = writeln!(
                std::io::stderr(),
                "REGIMEN_NCCL=1: the model is on the CPU; its gradients are summed through MPI"
            );
        }
        if wanted {
            self.device = Some(super::device_sum::DeviceSum::start(&*self.comm, device)?);
        }
        Ok(())
    }

    /// Before backward: `share` is this rank's part of the global batch (its samples over
    /// all ranks' samples).
    pub fn begin(&mut self, model: &mut dyn Layer, share: f32) {
        self.index.clear();
        let mut n = 0;
        let index = &mut self.index;
        model.visit_params_unnamed(&mut |p| {
            index.insert(p as *const Param as usize, n);
            n += 1;
        });
        self.slots.clear();
        self.slots.resize(n, None);
        self.share = share;
        self.cur = self.spare.pop().unwrap_or_default();
        self.cur.clear();
        self.inflight.clear();
    }

    /// `part`'s gradients are final: into the bucket (the bucket goes when full).
    pub fn ready(&mut self, part: &mut dyn Layer) {
        let Reducer {
            index,
            slots,
            cur,
            inflight,
            share,
            ..
        } = self;
        part.visit_params_unnamed(&mut |p| {
            let Some(&i) = index.get(&(p as *const Param as usize)) else {
                return;
            };
            if slots[i].is_some() {
                return;
            }
            slots[i] = Some((inflight.len(), cur.len()));
            append_scaled(cur, &p.grad, *share);
        });
        if self.cur.len() >= self.cap {
            self.send();
        }
    }

    fn send(&mut self) {
        let next = self.spare.pop().unwrap_or_default();
        let full = std::mem::replace(&mut self.cur, next);
        self.cur.clear();
        self.inflight.push(self.comm.start(Op::SumF32(full)));
        self.buckets += 1;
    }

    /// The whole data-parallel backward: `begin`, backward in parts with each part reported
    /// as it is done, `finish`. Returns the sums of `extra` over the ranks.
    pub fn backward(
        &mut self,
        model: &mut dyn Layer,
        dy: &Tensor,
        share: f32,
        extra: &[f32],
    ) -> Result<Vec<f32>> {
        #[cfg(feature = "cuda")]
        {
            self.check_device(model)?;
            if let Some(d) = &self.device {
                drop(model.backward(dy)?);
                d.sum_grads(model, share)?;
                self.buckets += 1;
                return if extra.is_empty() {
                    Ok(Vec::new())
                } else {
                    self.comm.sum_f32(extra.to_vec())
                };
            }
        }
        self.begin(model, share);
        match model.backward_in_parts(dy, &mut |part| self.ready(part)) {
            Some(done) => drop(done?),
            None => drop(model.backward(dy)?),
        }
        self.finish(model, extra)
    }

    /// Sum the gradients `model` holds over the ranks, as a step would after its backward
    /// (no scaling), and wait for the sums: what one all-reduce of the whole gradient costs
    /// (`regimen bench` times it).
    pub fn sum_now(&mut self, model: &mut dyn Layer) -> Result<()> {
        #[cfg(feature = "cuda")]
        {
            self.check_device(model)?;
            if let Some(d) = &self.device {
                d.sum_grads(model, 1.0)?;
                grad_device(model).backend().synchronize();
                return Ok(());
            }
        }
        self.begin(model, 1.0);
        self.finish(model, &[]).map(drop)
    }

    /// After backward: send what is left with `extra` values appended (summed over the ranks
    /// too), wait for all sums, write them into the gradients. Returns the sums of `extra`.
    pub fn finish(&mut self, model: &mut dyn Layer, extra: &[f32]) -> Result<Vec<f32>> {
        // Gradients no part reported (a model without parts) go in the last bucket.
        self.ready(model);
        let at = self.cur.len();
        self.cur.extend_from_slice(extra);
        self.send();
        let t = Instant::now();
        self.sums.clear();
        for ticket in self.inflight.drain(..) {
            match ticket.wait()? {
                Reply::F32(v) => self.sums.push(v),
                _ => unreachable!("a sum of f32 answers f32"),
            }
        }
        self.waited += t.elapsed();
        let (slots, sums) = (&self.slots, &self.sums);
        let mut i = 0;
        model.visit_params_unnamed(&mut |p| {
            if let Some((b, off)) = slots[i] {
                let n = p.grad.numel();
                write_f32(&mut p.grad, &sums[b][off..off + n]);
            }
            i += 1;
        });
        let last = self.sums.last().expect("at least one bucket");
        let extra = last[at..].to_vec();
        self.spare.append(&mut self.sums);
        Ok(extra)
    }
}

/// Where `model`'s gradients live (the CPU for a model without parameters).
#[cfg(feature = "cuda")]
fn grad_device(model: &mut dyn Layer) -> Device {
    let mut device = Device::Cpu;
    model.visit_params_unnamed(&mut |p| device = p.grad.device());
    device
}

fn append_scaled(out: &mut Vec<f32>, grad: &Tensor, share: f32) {
    if grad.device() == Device::Cpu {
        out.extend(crate::backend::cpu::f32s(grad).iter().map(|g| g * share));
    } else {
        out.extend(host_f32(grad).into_iter().map(|g| g * share));
    }
}
