//! Data-parallel training: several processes (ranks), each with a whole copy of the model and
//! its own disjoint slice of every global batch, sum their scaled gradients with an
//! all-reduce before every optimizer step, so that every rank takes the same step.
//!
//! The transport is the one clusters already run: MPI (the `distributed` feature; rsmpi on the
//! system's OpenMPI or MPICH), started by `mpirun` or Slurm's `srun`. Rank and world size come
//! from MPI. Without the feature, or started without a launcher, the world is one process
//! ([`Single`]) and every collective is the identity.
//!
//! All MPI calls happen on one communication thread (the thread that initializes MPI, so
//! `MPI_THREAD_FUNNELED` is enough); the training thread hands it operations and waits for
//! the answers ([`Ticket`]), at most [`timeout`] (`REGIMEN_DIST_TIMEOUT` seconds, default
//! 300): a rank that stops answering ends the others with an error instead of a hang. A rank
//! that dies is seen by the launcher, which ends the job.
//!
//! What the training loop does with it ([`crate::train::fit_with`]): parameters and buffers are
//! broadcast from rank 0 at the start; each rank takes [`shard`] of every global batch (the
//! per-rank batch times the world size) of the same seeded order; gradients are summed in
//! buckets by a [`Reducer`], started while backward still runs; buffers (batch-norm running
//! statistics) are broadcast from rank 0 before each evaluation; evaluation is sharded and its
//! sums added up.
//!
//! On GPUs each rank takes one ([`rank_device`]: local rank modulo the machine's GPUs) and the
//! same collectives run on host copies of the device tensors (the gradients are read back, summed
//! over MPI and written to the device), unless `REGIMEN_NCCL=1`: then NCCL sums the gradients
//! GPU to GPU ([`device_sum`]; not yet measured on several GPUs).

use std::ops::Range;
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::layer::Layer;
use crate::tensor::{DType, Device, Tensor};

#[cfg(feature = "cuda")]
pub mod device_sum;
#[cfg(feature = "distributed")]
mod mpi_comm;
mod reducer;

pub use reducer::Reducer;

/// One collective operation, as the training thread hands it over.
pub enum Op {
    /// Element-wise sum over the ranks; every rank gets the sums.
    SumF32(Vec<f32>),
    SumF64(Vec<f64>),
    /// Rank `root`'s vector to every rank (all give vectors of the same length).
    BroadcastF32(Vec<f32>, usize),
    /// Rank `root`'s bytes to every rank (the others may give any length).
    BroadcastBytes(Vec<u8>, usize),
    /// Every rank's value, in rank order.
    GatherU64(u64),
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::SumF32(_) | Op::SumF64(_) => "an all-reduce",
            Op::BroadcastF32(..) | Op::BroadcastBytes(..) => "a broadcast",
            Op::GatherU64(_) => "an all-gather",
        }
    }
}

/// The answer to an [`Op`].
pub enum Reply {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bytes(Vec<u8>),
    U64s(Vec<u64>),
}

/// The ranks of a run and the collectives between them.
pub trait Comm: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Start `op`; the answer comes with [`Ticket::wait`]. Operations run in the order they
    /// were started, on every rank the same order.
    fn start(&self, op: Op) -> Ticket;
    /// What carries the collectives (`"MPI (Open MPI v4.1.4)"`, `"one process"`).
    fn describe(&self) -> String;
    /// End the communication (MPI_Finalize); nothing may be started after.
    fn finish(&self) {}
}

/// A started operation.
pub struct Ticket {
    what: &'static str,
    inner: TicketInner,
}

enum TicketInner {
    Ready(Reply),
    Waiting(mpsc::Receiver<std::result::Result<Reply, String>>),
}

impl Ticket {
    pub fn ready(reply: Reply) -> Ticket {
        Ticket {
            what: "",
            inner: TicketInner::Ready(reply),
        }
    }

    pub fn waiting(op: &Op, answer: mpsc::Receiver<std::result::Result<Reply, String>>) -> Ticket {
        Ticket {
            what: op.name(),
            inner: TicketInner::Waiting(answer),
        }
    }

    /// The answer, or an error after [`timeout`] without one.
    pub fn wait(self) -> Result<Reply> {
        match self.inner {
            TicketInner::Ready(r) => Ok(r),
            TicketInner::Waiting(rx) => {
                let limit = timeout();
                match rx.recv_timeout(limit) {
                    Ok(Ok(r)) => Ok(r),
                    Ok(Err(e)) => Err(Error::Distributed(e)),
                    Err(mpsc::RecvTimeoutError::Timeout) => Err(Error::Distributed(format!(
                        "no answer from the other ranks for {} s in {} (a rank is stuck or gone; \
                         REGIMEN_DIST_TIMEOUT sets the limit): stopping",
                        limit.as_secs(),
                        self.what
                    ))),
                    Err(mpsc::RecvTimeoutError::Disconnected) => Err(Error::Distributed(
                        "the communication thread stopped".into(),
                    )),
                }
            }
        }
    }
}

impl dyn Comm + '_ {
    pub fn sum_f32(&self, v: Vec<f32>) -> Result<Vec<f32>> {
        match self.start(Op::SumF32(v)).wait()? {
            Reply::F32(v) => Ok(v),
            _ => unreachable!("a sum of f32 answers f32"),
        }
    }
    pub fn sum_f64(&self, v: Vec<f64>) -> Result<Vec<f64>> {
        match self.start(Op::SumF64(v)).wait()? {
            Reply::F64(v) => Ok(v),
            _ => unreachable!("a sum of f64 answers f64"),
        }
    }
    pub fn broadcast_f32(&self, v: Vec<f32>, root: usize) -> Result<Vec<f32>> {
        match self.start(Op::BroadcastF32(v, root)).wait()? {
            Reply::F32(v) => Ok(v),
            _ => unreachable!("a broadcast of f32 answers f32"),
        }
    }
    pub fn broadcast_bytes(&self, v: Vec<u8>, root: usize) -> Result<Vec<u8>> {
        match self.start(Op::BroadcastBytes(v, root)).wait()? {
            Reply::Bytes(v) => Ok(v),
            _ => unreachable!("a broadcast of bytes answers bytes"),
        }
    }
    pub fn gather_u64(&self, v: u64) -> Result<Vec<u64>> {
        match self.start(Op::GatherU64(v)).wait()? {
            Reply::U64s(v) => Ok(v),
            _ => unreachable!("a gather answers u64s"),
        }
    }
}

/// The world of one process: every collective is the identity.
pub struct Single;

impl Comm for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn start(&self, op: Op) -> Ticket {
        Ticket::ready(match op {
            Op::SumF32(v) | Op::BroadcastF32(v, _) => Reply::F32(v),
            Op::SumF64(v) => Reply::F64(v),
            Op::BroadcastBytes(v, _) => Reply::Bytes(v),
            Op::GatherU64(v) => Reply::U64s(vec![v]),
        })
    }
    fn describe(&self) -> String {
        "one process".into()
    }
}

/// How long a rank waits for the others in one collective: `REGIMEN_DIST_TIMEOUT` seconds,
/// 300 by default.
pub fn timeout() -> Duration {
    let secs = std::env::var("REGIMEN_DIST_TIMEOUT")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0 && s.is_finite())
        .unwrap_or(300.0);
    Duration::from_secs_f64(secs)
}

/// The number of ranks a launcher started, from its environment: Open MPI's `mpirun`
/// (`OMPI_COMM_WORLD_SIZE`), MPICH-style PMI (`PMI_SIZE`, also Slurm's `srun --mpi=pmi2`),
/// or a Slurm job step (`SLURM_STEP_NUM_TASKS`). `None` outside a launcher.
pub fn launched_ranks() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse::<usize>().ok())
}

/// This process's index among the ranks on its machine, from the launcher: Open MPI
/// (`OMPI_COMM_WORLD_LOCAL_RANK`), MPICH's and Intel MPI's Hydra (`MPI_LOCALRANKID`), MVAPICH
/// (`MV2_COMM_WORLD_LOCAL_RANK`), PMI (`PMI_LOCAL_RANK`), then Slurm (`SLURM_LOCALID`) last: an
/// MPI started inside a Slurm allocation runs one Slurm task per node, whose `SLURM_LOCALID`
/// every rank on the node inherits. `None` outside a launcher.
pub fn local_rank() -> Option<usize> {
    local_rank_from(|v| std::env::var(v).ok())
}

fn local_rank_from(get: impl Fn(&str) -> Option<String>) -> Option<usize> {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "MV2_COMM_WORLD_LOCAL_RANK",
        "PMI_LOCAL_RANK",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|v| get(v)?.trim().parse::<usize>().ok())
}

/// The device of this rank for `--device spec`: with several ranks, a bare `cuda` means one GPU
/// per rank, GPU `local rank mod GPUs` of the machine (the usual one rank per GPU); `cuda:N` is
/// taken as given, and so is everything in a one-process run. Errors say why a GPU cannot be
/// used.
pub fn rank_device(spec: &str, rank: usize, ranks: usize) -> Result<Device> {
    if spec != "cuda" || ranks == 1 {
        return Device::parse(spec);
    }
    let gpus = Device::cuda_count()?;
    if gpus == 0 {
        return Err(Error::Device {
            device: "cuda".into(),
            reason: "no GPU found".into(),
        });
    }
    Device::cuda(local_rank().unwrap_or(rank) % gpus)
}

/// Whether `REGIMEN_NCCL=1` asks for NCCL to sum the gradients of GPU ranks (always false in a
/// build without CUDA).
pub fn nccl_requested() -> bool {
    #[cfg(feature = "cuda")]
    {
        device_sum::requested()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

static WORLD: OnceLock<Arc<dyn Comm>> = OnceLock::new();

/// Join the ranks of this run: MPI when a launcher started more than one, else one process.
/// Call it once, early (it starts MPI's thread); [`world`] returns the result from then on.
/// Started with several ranks by a binary built without the `distributed` feature, it is an
/// error rather than N separate copies of the same run.
pub fn init() -> Result<Arc<dyn Comm>> {
    if let Some(w) = WORLD.get() {
        return Ok(w.clone());
    }
    let comm: Arc<dyn Comm> = match launched_ranks() {
        Some(n) if n > 1 => start_mpi(n)?,
        _ => Arc::new(Single),
    };
    Ok(WORLD.get_or_init(|| comm).clone())
}

#[cfg(feature = "distributed")]
fn start_mpi(_n: usize) -> Result<Arc<dyn Comm>> {
    Ok(Arc::new(mpi_comm::MpiComm::start()?))
}

#[cfg(not(feature = "distributed"))]
fn start_mpi(n: usize) -> Result<Arc<dyn Comm>> {
    Err(Error::Distributed(format!(
        "started by an MPI launcher with {n} ranks, but this regimen was built without the \
         `distributed` feature, so every rank would train its own copy: rebuild with \
         `cargo build --release --features distributed` (see \"Training on several machines\" \
         in the README)"
    )))
}

/// The world [`init`] joined, or one process before (or without) it.
pub fn world() -> Arc<dyn Comm> {
    WORLD.get().cloned().unwrap_or_else(|| Arc::new(Single))
}

/// End the communication at the end of the program (MPI_Finalize), if it was started.
pub fn finish() {
    if let Some(w) = WORLD.get() {
        w.finish();
    }
}

/// The items of `0..len` that rank `rank` of `size` takes: contiguous, in rank order, sizes
/// differing by at most one (the first `len % size` ranks take one more).
pub fn shard(len: usize, rank: usize, size: usize) -> Range<usize> {
    let (q, r) = (len / size, len % size);
    let start = rank * q + rank.min(r);
    start..start + q + usize::from(rank < r)
}

/// That every rank has the same `bytes` (the resolved config, the data): an error naming the
/// first rank that differs from rank 0.
pub fn check_same(comm: &dyn Comm, what: &str, bytes: &[u8]) -> Result<()> {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    let h = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
    let all = comm.gather_u64(h)?;
    if let Some(r) = all.iter().position(|&x| x != all[0]) {
        return Err(Error::Distributed(format!(
            "the {what} of rank {r} differs from rank 0's: every rank must run the same command \
             on the same files"
        )));
    }
    Ok(())
}

/// The f32 contents of a tensor, on the host.
pub(crate) fn host_f32(t: &Tensor) -> Vec<f32> {
    if t.device() == Device::Cpu {
        crate::backend::cpu::f32s(t).to_vec()
    } else {
        t.to_vec()
    }
}

/// Overwrite a tensor's f32 contents from the host.
pub(crate) fn write_f32(t: &mut Tensor, v: &[f32]) {
    if t.device() == Device::Cpu {
        crate::backend::cpu::f32s_mut(t).copy_from_slice(v);
    } else {
        t.backend()
            .write(t, crate::backend::HostBuf::F32(v.to_vec()));
    }
}

/// Give every rank rank 0's parameters (`params`) and f32 buffers (running statistics).
pub fn broadcast_model(comm: &dyn Comm, model: &mut dyn Layer, params: bool) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let mut flat = Vec::new();
    if params {
        model.visit_params_unnamed(&mut |p| flat.extend(host_f32(&p.value)));
    }
    model.visit_buffers("", &mut |_, b| {
        if b.dtype() == DType::F32 {
            flat.extend(host_f32(b))
        }
    });
    if flat.is_empty() {
        return Ok(());
    }
    let flat = comm.broadcast_f32(flat, 0)?;
    let mut at = 0;
    let mut take = |t: &mut Tensor| {
        let n = t.numel();
        write_f32(t, &flat[at..at + n]);
        at += n;
    };
    if params {
        model.visit_params_unnamed(&mut |p| take(&mut p.value));
    }
    model.visit_buffers("", &mut |_, b| {
        if b.dtype() == DType::F32 {
            take(b)
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_rank_comes_from_the_launcher() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(local_rank_from(env(&[])), None);
        assert_eq!(
            local_rank_from(env(&[("OMPI_COMM_WORLD_LOCAL_RANK", "3")])),
            Some(3)
        );
        assert_eq!(local_rank_from(env(&[("SLURM_LOCALID", " 1 ")])), Some(1));
        assert_eq!(local_rank_from(env(&[("MPI_LOCALRANKID", "2")])), Some(2));
        // Hydra under Slurm: every rank of a node inherits the launcher's SLURM_LOCALID = 0.
        assert_eq!(
            local_rank_from(env(&[("SLURM_LOCALID", "0"), ("MPI_LOCALRANKID", "2")])),
            Some(2)
        );
        // Open MPI's own variable first; a value that is not a number is skipped.
        assert_eq!(
            local_rank_from(env(&[
                ("SLURM_LOCALID", "5"),
                ("OMPI_COMM_WORLD_LOCAL_RANK", "0")
            ])),
            Some(0)
        );
        assert_eq!(
            local_rank_from(env(&[
                ("OMPI_COMM_WORLD_LOCAL_RANK", "x"),
                ("SLURM_LOCALID", "4")
            ])),
            Some(4)
        );
    }

    #[test]
    fn a_rank_device_is_the_spec_or_one_gpu_per_rank() {
        assert_eq!(rank_device("cpu", 1, 4).unwrap(), Device::Cpu);
        assert!(rank_device("tpu", 0, 2).is_err());
        // Without a usable GPU (this test's machines, or a build without CUDA): an error that
        // says why, for a bare `cuda` on several ranks as for `cuda:N`.
        if Device::cuda_count().is_err() {
            let e = rank_device("cuda", 1, 2).unwrap_err().to_string();
            assert!(e.contains("cuda"), "{e}");
            assert!(rank_device("cuda:1", 1, 2).is_err());
        }
    }

    #[test]
    fn shards_cover_in_order_and_balance() {
        for len in 0..40 {
            for size in 1..7 {
                let parts: Vec<_> = (0..size).map(|r| shard(len, r, size)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[size - 1].end, len);
                for w in parts.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() >= w[1].len() && w[0].len() - w[1].len() <= 1);
                }
            }
        }
    }

    #[test]
    fn single_process_collectives_are_the_identity() {
        let c: &dyn Comm = &Single;
        assert_eq!(c.sum_f32(vec![1.5, -2.0]).unwrap(), vec![1.5, -2.0]);
        assert_eq!(c.gather_u64(7).unwrap(), vec![7]);
        assert_eq!(c.broadcast_bytes(b"ab".to_vec(), 0).unwrap(), b"ab");
        check_same(c, "config", b"x").unwrap();
    }
}
