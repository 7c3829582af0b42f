//! NCCL: sums of device tensors over the ranks of a data-parallel run, GPU to GPU, without
//! host copies. `REGIMEN_NCCL=1` asks for it (off by default until it has been measured on
//! several GPUs; [`crate::dist::Reducer`] uses it for the gradients).
//!
//! The library (`libnccl.so.2`, from the `libnccl2` package or pip's `nvidia-nccl-cu13`) is
//! loaded at run time, like the rest of CUDA, so the crate builds without it and a missing
//! library is an error that says so. regimen calls a handful of its functions through its own
//! declarations (`nccl.h`'s, for NCCL 2.x): cudarc's NCCL module looks for `libnccl.so` and
//! panics when it is absent, and pip's NCCL ships only `libnccl.so.2`.
//!
//! Collectives run on the backend's stream, so they follow the kernels that wrote their inputs
//! and precede those that read the sums: the host never waits for them.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

use super::{ptr_mut, CudaBackend};
use crate::error::{Error, Result};
use crate::tensor::{DType, Device, Tensor};

/// Bytes of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const ID_BYTES: usize = 128;

#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; ID_BYTES],
}

type Comm = *mut c_void;
type Res = c_int;
/// `ncclFloat32` and `ncclSum` (nccl.h).
const FLOAT32: c_int = 7;
const SUM: c_int = 0;

/// The functions regimen calls, resolved once.
struct Lib {
    _lib: libloading::Library,
    version: c_int,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> Res,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> Res,
    comm_destroy: unsafe extern "C" fn(Comm) -> Res,
    comm_abort: unsafe extern "C" fn(Comm) -> Res,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        *mut c_void,
    ) -> Res,
    group_start: unsafe extern "C" fn() -> Res,
    group_end: unsafe extern "C" fn() -> Res,
    error_string: unsafe extern "C" fn(Res) -> *const c_char,
}

// SAFETY: the functions are plain C entry points; NCCL documents them as callable from any
// thread (a communicator is used by one thread at a time here, the training thread).
unsafe impl Send for Lib {}
unsafe impl Sync for Lib {}

/// The names tried, in order: the runtime library's soname, then the development link.
const NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

fn lib() -> Result<&'static Lib> {
    static LIB: OnceLock<std::result::Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(|| load(&NAMES))
        .as_ref()
        .map_err(|e| Error::Distributed(e.clone()))
}

fn load(names: &[&str]) -> std::result::Result<Lib, String> {
    let mut why = Vec::new();
    let lib = names
        .iter()
        .find_map(|n| {
            // SAFETY: loading NCCL runs its initializers, which have no preconditions.
            unsafe { libloading::Library::new(*n) }
                .map_err(|e| why.push(format!("{n}: {e}")))
                .ok()
        })
        .ok_or_else(|| {
            format!(
                "NCCL not found ({}): install NCCL 2 (the libnccl2 package, or pip's \
                 nvidia-nccl-cu13) and put its lib folder on LD_LIBRARY_PATH",
                why.join("; ")
            )
        })?;
    // SAFETY: each symbol is declared with nccl.h's signature for NCCL 2.x.
    unsafe {
        macro_rules! sym {
            ($name:literal) => {
                *lib.get(concat!($name, "\0").as_bytes())
                    .map_err(|e| format!("NCCL lacks {}: {e}", $name))?
            };
        }
        let get_version: unsafe extern "C" fn(*mut c_int) -> Res = sym!("ncclGetVersion");
        let mut version = 0;
        // NCCL_VERSION_CODE is X*1000 + Y*100 + Z before 2.9 (2.8.4: 2804), X*10000 + ... after.
        if get_version(&mut version) != 0 || version < 2000 {
            return Err(format!(
                "NCCL version code {version} is too old: regimen needs NCCL 2 (2.0 or later)"
            ));
        }
        Ok(Lib {
            version,
            get_unique_id: sym!("ncclGetUniqueId"),
            comm_init_rank: sym!("ncclCommInitRank"),
            comm_destroy: sym!("ncclCommDestroy"),
            comm_abort: sym!("ncclCommAbort"),
            all_reduce: sym!("ncclAllReduce"),
            group_start: sym!("ncclGroupStart"),
            group_end: sym!("ncclGroupEnd"),
            error_string: sym!("ncclGetErrorString"),
            _lib: lib,
        })
    }
}

fn check(lib: &Lib, r: Res, what: &str) -> Result<()> {
    if r == 0 {
        return Ok(());
    }
    // SAFETY: NCCL returns a static string for any result code.
    let text = unsafe { CStr::from_ptr((lib.error_string)(r)) }.to_string_lossy();
    Err(Error::Distributed(format!(
        "NCCL: {what} failed: {text} (code {r}; NCCL_DEBUG=WARN says more)"
    )))
}

/// The NCCL version, as `2.32.3`, or why the library cannot be used.
pub fn version() -> Result<String> {
    let v = lib()?.version;
    // NCCL_VERSION(X,Y,Z): X*10000 + Y*100 + Z since 2.9, X*1000 + Y*100 + Z before.
    let (x, y, z) = if v >= 20900 {
        (v / 10000, (v % 10000) / 100, v % 100)
    } else {
        (v / 1000, (v % 1000) / 100, v % 100)
    };
    Ok(format!("{x}.{y}.{z}"))
}

/// A new unique id: rank 0 makes it and gives it to every rank (it names the communicator and
/// carries rank 0's bootstrap address). Needs no GPU.
pub fn unique_id() -> Result<[u8; ID_BYTES]> {
    let lib = lib()?;
    let mut id = UniqueId {
        internal: [0; ID_BYTES],
    };
    // SAFETY: `id` is a valid ncclUniqueId to fill.
    check(
        lib,
        unsafe { (lib.get_unique_id)(&mut id) },
        "ncclGetUniqueId",
    )?;
    Ok(id.internal.map(|c| c as u8))
}

/// A visitor that hands tensors, one by one, to the function it is given.
pub type Visit<'a> = dyn FnMut(&mut dyn FnMut(&mut Tensor)) + 'a;

/// One rank's member of an NCCL communicator, on one GPU.
pub struct NcclComm {
    comm: Comm,
    ordinal: usize,
    rank: usize,
    size: usize,
}

// SAFETY: a communicator may move between threads; regimen calls it from one at a time (the
// methods take `&mut self` or are only called by the training loop).
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Join the communicator named by `id` as rank `rank` of `size`, on GPU `ordinal`. Every
    /// rank must call this at about the same time: it returns when all have joined.
    pub fn new(ordinal: usize, id: &[u8; ID_BYTES], rank: usize, size: usize) -> Result<NcclComm> {
        let lib = lib()?;
        let be = super::get(ordinal)?;
        if rank >= size {
            return Err(Error::Distributed(format!(
                "NCCL: rank {rank} is not below the world size {size}"
            )));
        }
        be.bind();
        let id = UniqueId {
            internal: id.map(|b| b as c_char),
        };
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: `comm` receives the communicator; the id is passed by value, as declared.
        check(
            lib,
            unsafe { (lib.comm_init_rank)(&mut comm, size as c_int, id, rank as c_int) },
            "ncclCommInitRank",
        )?;
        Ok(NcclComm {
            comm,
            ordinal,
            rank,
            size,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    fn backend(&self) -> &'static CudaBackend {
        super::backend_of(self.ordinal)
    }

    /// Replace each f32 tensor by its sum over the ranks, in place, on the GPU's stream. Every
    /// rank passes tensors of the same sizes in the same order. The sums are queued, not
    /// waited for: what reads the tensors next on this GPU sees them.
    pub fn sum_in_place(&self, tensors: &mut [&mut Tensor]) -> Result<()> {
        self.sum_with(&mut |sum| {
            for t in tensors.iter_mut() {
                sum(t);
            }
        })
    }

    /// [`NcclComm::sum_in_place`] of the tensors that `visit` hands to the function it is
    /// given (for tensors reached through a visitor, such as a model's gradients).
    pub fn sum_with(&self, visit: &mut Visit<'_>) -> Result<()> {
        let lib = lib()?;
        let be = self.backend();
        be.bind();
        let stream = be.raw.stream as *mut c_void;
        let ordinal = self.ordinal;
        // One group: NCCL fuses the sums into few launches. The group is always closed, even
        // after an error; the first error is returned.
        // SAFETY: group calls have no preconditions.
        check(lib, unsafe { (lib.group_start)() }, "ncclGroupStart")?;
        let mut first_error = Ok(());
        visit(&mut |t: &mut Tensor| {
            if first_error.is_err() {
                return;
            }
            if t.device() != Device::Cuda(ordinal) || t.dtype() != DType::F32 {
                first_error = Err(Error::Distributed(format!(
                    "NCCL sums f32 tensors on cuda:{ordinal}, not a {:?} tensor on {}",
                    t.dtype(),
                    t.device()
                )));
                return;
            }
            let n = t.numel();
            if n == 0 {
                return;
            }
            let p = ptr_mut(t) as *mut c_void;
            // SAFETY: `p` is a live f32 device buffer of `n` elements on this communicator's
            // GPU; the stream is the backend's.
            let r = unsafe { (lib.all_reduce)(p, p, n, FLOAT32, SUM, self.comm, stream) };
            first_error = check(lib, r, "ncclAllReduce");
        });
        // SAFETY: as above.
        let ended = check(lib, unsafe { (lib.group_end)() }, "ncclGroupEnd");
        be.mark(|| format!("NCCL all-reduce over {} ranks", self.size));
        first_error.and(ended)
    }
}

impl Drop for NcclComm {
    /// Destroyed once the work queued on the stream is done; aborted (its pending sums
    /// cancelled) when that work is still not done after `REGIMEN_DIST_TIMEOUT`: a peer that
    /// stopped leaves a sum that never ends, and a rank ending on an error must not wait for
    /// it forever.
    fn drop(&mut self) {
        let Ok(lib) = lib() else { return };
        let be = self.backend();
        let limit = crate::dist::timeout();
        let start = std::time::Instant::now();
        let mut idle = false;
        // SAFETY: the context is this communicator's GPU's; querying a stream has no other
        // precondition.
        if be.ctx.bind_to_thread().is_ok() {
            while start.elapsed() < limit {
                match unsafe { super::sys::cuStreamQuery(be.raw.stream) } {
                    super::sys::CUresult::CUDA_ERROR_NOT_READY => {
                        std::thread::sleep(std::time::Duration::from_millis(1))
                    }
                    r => {
                        idle = r == super::sys::CUresult::CUDA_SUCCESS;
                        break;
                    }
                }
            }
        }
        // SAFETY: the communicator was created by ncclCommInitRank and is released once.
        unsafe {
            if idle {
                let _ = (lib.comm_destroy)(self.comm);
            } else {
                let _ = (lib.comm_abort)(self.comm);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_an_error_naming_what_to_install() {
        let e = load(&["libnccl-does-not-exist.so.2"])
            .err()
            .expect("an error");
        assert!(e.contains("NCCL not found"), "{e}");
        assert!(e.contains("libnccl-does-not-exist.so.2"), "{e}");
        assert!(e.contains("LD_LIBRARY_PATH"), "{e}");
    }

    /// With NCCL on the library path (the GPU check puts pip's there; on other machines this
    /// says it skipped): its version, and two unique ids that differ.
    #[test]
    fn nccl_loads_and_makes_unique_ids_when_present() {
        let Ok(v) = version() else {
            eprintln!("skipped: {}", version().unwrap_err());
            return;
        };
        assert!(v.starts_with("2."), "{v}");
        let (a, b) = (unique_id().unwrap(), unique_id().unwrap());
        assert_ne!(a, b, "two unique ids are the same");
        assert!(a.iter().any(|&x| x != 0));
    }
}
