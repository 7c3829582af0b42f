//! Batches for training: shuffled per epoch with a seed, augmented in background threads,
//! delivered in order through bounded queues.
//!
//! Each batch is built from `(seed, epoch, batch index)` alone — its sample order and every
//! random draw of its augmentations — so the batches are the same whatever the number of
//! worker threads and however the threads are scheduled. Worker `w` builds batches
//! `w, w + W, w + 2W, ...` into its own queue of `depth` batches; the consumer takes them
//! round-robin, which restores the order. With zero workers batches are built on demand in
//! the consumer's thread.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::{Dataset, Pipeline};
use crate::rng::{mix64, purpose, Rng};

/// One batch on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `[B, C, H, W]` row-major.
    pub images: Vec<f32>,
    pub shape: [usize; 4],
    pub labels: Vec<u32>,
    /// `[B, classes]` when the pipeline mixes samples (Mixup, CutMix).
    pub soft: Option<Vec<f32>>,
}

/// The sample order of `epoch` (0-based) for `n` samples under `seed`: the loader's shuffle,
/// also used by the on-device training loop so that both see the same batches.
pub fn shuffled_order(seed: u64, n: usize, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(mix64(seed ^ mix64(epoch as u64 + 1))).shuffle(&mut order);
    order
}

/// Global batches of `batch` samples in an epoch of `n`, over `ranks` ranks: a last partial
/// batch counts when every rank gets at least one of its samples.
pub fn batches_per_epoch(n: usize, batch: usize, ranks: usize) -> usize {
    let batch = batch.max(1);
    n / batch + usize::from(n % batch >= ranks.max(1))
}

#[derive(Clone)]
pub struct Loader {
    pub data: Arc<Dataset>,
    pub batch_size: usize,
    pub shuffle: bool,
    pub seed: u64,
    pub pipeline: Arc<Pipeline>,
    /// Background threads (0: build batches in the caller's thread).
    pub workers: usize,
    /// Batches each worker may have ready ahead of the consumer.
    pub depth: usize,
    /// `(rank, ranks)` of data-parallel training: `batch_size` is then the global batch, and
    /// this loader delivers rank `rank`'s part of each ([`crate::dist::shard`]); an epoch's
    /// last batch is skipped when it has fewer samples than there are ranks. `(0, 1)` alone.
    pub shard: (usize, usize),
}

impl Loader {
    pub fn new(data: Arc<Dataset>, batch_size: usize, seed: u64) -> Loader {
        Loader {
            data,
            batch_size: batch_size.max(1),
            shuffle: true,
            seed,
            pipeline: Arc::new(Pipeline::default()),
            workers: 1,
            depth: 2,
            shard: (0, 1),
        }
    }

    pub fn batches_per_epoch(&self) -> usize {
        batches_per_epoch(self.data.len(), self.batch_size, self.shard.1)
    }

    /// The samples of global batch `b` over all ranks.
    pub fn global_len(&self, b: usize) -> usize {
        self.batch_size.min(self.data.len() - b * self.batch_size)
    }

    fn order(&self, epoch: usize) -> Vec<usize> {
        if self.shuffle {
            shuffled_order(self.seed, self.data.len(), epoch)
        } else {
            (0..self.data.len()).collect()
        }
    }

    /// Build batch `b` of an epoch whose sample order is `order`.
    pub fn build(&self, epoch: usize, b: usize, order: &[usize]) -> Batch {
        let data = &self.data;
        let idx = &order[b * self.batch_size..((b + 1) * self.batch_size).min(order.len())];
        let (rank, ranks) = self.shard;
        let idx = &idx[crate::dist::shard(idx.len(), rank, ranks)];
        let d = data.image_len();
        // From the CPU pool: a CPU batch tensor adopts it, and the pool gets it back (a GPU
        // upload copies it and frees it).
        let mut images = crate::backend::cpu::host_vec(idx.len() * d);
        for (dst, &i) in images.chunks_mut(d.max(1)).zip(idx) {
            dst.copy_from_slice(&data.images[i * d..(i + 1) * d]);
        }
        let labels: Vec<u32> = idx.iter().map(|&i| data.labels[i]).collect();
        // Augmentation draws: the Philox stream (seed, global batch index, AUGMENT).
        let global = (epoch * self.batches_per_epoch() + b) as u32;
        // Each data-parallel rank draws from a stream of its own (rank 0 from the one above).
        let mut stream = mix64(self.seed ^ 0xA06);
        if rank > 0 {
            stream = mix64(stream ^ mix64(0xD15_7000 + rank as u64));
        }
        let mut rng = Rng::philox(stream, global, purpose::AUGMENT);
        let soft = self.pipeline.apply(
            &mut images,
            data.image_shape,
            &labels,
            data.num_classes(),
            &mut rng,
        );
        let [c, h, w] = data.image_shape;
        Batch {
            images,
            shape: [idx.len(), c, h, w],
            labels,
            soft,
        }
    }

    /// The batches of epoch `epoch` (0-based), in order.
    pub fn epoch(&self, epoch: usize) -> Epoch {
        self.epoch_from(epoch, 0)
    }

    /// The batches of epoch `epoch` from batch `start` on: a run resumed in the middle of an
    /// epoch sees the batches the uninterrupted run would have seen.
    pub fn epoch_from(&self, epoch: usize, start: usize) -> Epoch {
        let order = Arc::new(self.order(epoch));
        let n = self.batches_per_epoch();
        if self.workers == 0 {
            return Epoch {
                inner: Inner::Inline {
                    loader: self.clone(),
                    order,
                    epoch,
                },
                start,
                next: start,
                n,
            };
        }
        let mut queues = Vec::new();
        let mut threads = Vec::new();
        for w in 0..self.workers {
            let (tx, rx) = sync_channel(self.depth.max(1));
            let (loader, order) = (self.clone(), order.clone());
            threads.push(std::thread::spawn(move || {
                for b in (start + w..n).step_by(loader.workers) {
                    if tx.send(loader.build(epoch, b, &order)).is_err() {
                        return; // the consumer stopped early
                    }
                }
            }));
            queues.push(rx);
        }
        Epoch {
            inner: Inner::Threads { queues, threads },
            start,
            next: start,
            n,
        }
    }
}

enum Inner {
    Inline {
        loader: Loader,
        order: Arc<Vec<usize>>,
        epoch: usize,
    },
    Threads {
        queues: Vec<Receiver<Batch>>,
        threads: Vec<JoinHandle<()>>,
    },
}

/// An epoch's batches; dropping it early stops its workers.
pub struct Epoch {
    inner: Inner,
    start: usize,
    next: usize,
    n: usize,
}

impl Iterator for Epoch {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.n {
            return None;
        }
        let b = self.next;
        self.next += 1;
        match &mut self.inner {
            Inner::Inline {
                loader,
                order,
                epoch,
            } => Some(loader.build(*epoch, b, order)),
            Inner::Threads { queues, threads } => {
                match queues[(b - self.start) % queues.len()].recv() {
                    Ok(batch) => Some(batch),
                    // The worker stopped before its last batch: it panicked. Re-raise its panic
                    // here rather than ending the epoch early as if the data had run out.
                    Err(_) => {
                        let w = (b - self.start) % threads.len();
                        let handle = threads.remove(w);
                        match handle.join() {
                            Err(payload) => std::panic::resume_unwind(payload),
                            Ok(()) => {
                                panic!("loader worker {w} stopped before batch {b} of {}", self.n)
                            }
                        }
                    }
                }
            }
        }
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        if let Inner::Threads { queues, threads } = &mut self.inner {
            queues.clear(); // senders now fail, workers return
            for t in threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}
