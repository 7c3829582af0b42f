//! The MPI world (rsmpi), behind one communication thread.
//!
//! The thread initializes MPI (so it is MPI's "main thread", and `MPI_THREAD_FUNNELED` is all
//! the library must support), runs every operation in the order it receives them, and ends
//! with `MPI_Finalize` when [`Comm::finish`] closes its queue. Buffers travel by value; the
//! thread keeps one scratch buffer per element type, so a steady training loop allocates
//! nothing here.

use std::sync::mpsc::{channel, Sender};
use std::sync::Mutex;
use std::thread::JoinHandle;

use mpi::collective::SystemOperation;
use mpi::traits::*;

use super::{Comm, Op, Reply, Ticket};
use crate::error::{Error, Result};

type Answer = Sender<std::result::Result<Reply, String>>;

pub struct MpiComm {
    rank: usize,
    size: usize,
    version: String,
    queue: Mutex<Option<Sender<(Op, Answer)>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl MpiComm {
    pub fn start() -> Result<MpiComm> {
        let (tx, rx) = channel::<(Op, Answer)>();
        let (ready_tx, ready_rx) = channel::<std::result::Result<(usize, usize, String), String>>();
        let thread = std::thread::Builder::new()
            .name("regimen-mpi".into())
            .spawn(move || {
                let Some((universe, _level)) =
                    mpi::initialize_with_threading(mpi::Threading::Funneled)
                else {
                    let _ = ready_tx.send(Err("MPI was already initialized".into()));
                    return;
                };
                let world = universe.world();
                let version = mpi::environment::library_version()
                    .unwrap_or_else(|_| "unknown version".into());
                let version = version.split(',').next().unwrap_or("").trim().to_string();
                let _ = ready_tx.send(Ok((world.rank() as usize, world.size() as usize, version)));
                let (mut scratch32, mut scratch64) = (Vec::<f32>::new(), Vec::<f64>::new());
                while let Ok((op, answer)) = rx.recv() {
                    let reply = match op {
                        Op::SumF32(mut v) => {
                            scratch32.resize(v.len(), 0.0);
                            world.all_reduce_into(
                                &v[..],
                                &mut scratch32[..],
                                SystemOperation::sum(),
                            );
                            std::mem::swap(&mut v, &mut scratch32);
                            Reply::F32(v)
                        }
                        Op::SumF64(mut v) => {
                            scratch64.resize(v.len(), 0.0);
                            world.all_reduce_into(
                                &v[..],
                                &mut scratch64[..],
                                SystemOperation::sum(),
                            );
                            std::mem::swap(&mut v, &mut scratch64);
                            Reply::F64(v)
                        }
                        Op::BroadcastF32(mut v, root) => {
                            world
                                .process_at_rank(root as i32)
                                .broadcast_into(&mut v[..]);
                            Reply::F32(v)
                        }
                        Op::BroadcastBytes(mut v, root) => {
                            let mut len = v.len() as u64;
                            let r = world.process_at_rank(root as i32);
                            r.broadcast_into(&mut len);
                            v.resize(len as usize, 0);
                            // Nothing to send for an empty payload (a pure synchronization):
                            // MPI refuses an empty buffer's dangling pointer.
                            if len > 0 {
                                r.broadcast_into(&mut v[..]);
                            }
                            Reply::Bytes(v)
                        }
                        Op::GatherU64(x) => {
                            let mut all = vec![0u64; world.size() as usize];
                            world.all_gather_into(&x, &mut all[..]);
                            Reply::U64s(all)
                        }
                    };
                    let _ = answer.send(Ok(reply));
                }
                // The queue closed: MPI_Finalize as `universe` drops.
                drop(universe);
            })
            .map_err(|e| Error::Distributed(format!("cannot start the MPI thread: {e}")))?;
        let (rank, size, version) = ready_rx
            .recv()
            .map_err(|_| Error::Distributed("MPI failed to start".into()))?
            .map_err(Error::Distributed)?;
        Ok(MpiComm {
            rank,
            size,
            version,
            queue: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        })
    }
}

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn start(&self, op: Op) -> Ticket {
        let (tx, rx) = channel();
        let ticket = Ticket::waiting(&op, rx);
        let queue = self.queue.lock().expect("the MPI queue lock");
        match queue.as_ref() {
            Some(q) => {
                if q.send((op, tx)).is_err() {
                    // The thread is gone: the ticket's wait reports it (its sender dropped).
                }
            }
            None => {
                let _ = tx.send(Err("MPI was already finalized".into()));
            }
        }
        ticket
    }
    fn describe(&self) -> String {
        format!("MPI ({})", self.version)
    }
    fn finish(&self) {
        drop(self.queue.lock().expect("the MPI queue lock").take());
        if let Some(t) = self.thread.lock().expect("the MPI thread lock").take() {
            let _ = t.join();
        }
    }
}
