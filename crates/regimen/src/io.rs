//! Files: safetensors reading and atomic writing.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use safetensors::tensor::Dtype;

use crate::error::{Error, Result};

/// The memory this machine can still give a process, in bytes (`MemAvailable` of
/// `/proc/meminfo`, capped by the process's address-space limit); `None` where it cannot tell.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let mut avail = kb.saturating_mul(1024);
    // `ulimit -v`: the soft limit of the address space, from /proc/self/limits.
    if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
        if let Some(limit) = limits
            .lines()
            .find(|l| l.starts_with("Max address space"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse::<u64>().ok())
        {
            avail = avail.min(limit);
        }
    }
    Some(avail)
}

/// `bytes` as "12.3 GB" (or MB, KB).
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.1} KB", b / 1e3)
    }
}

/// The metadata key of the CRC-32C (8 hex digits) of a file's tensor data, written by
/// [`write_safetensors`] and checked (then removed from the metadata) by [`read_safetensors`].
pub const CHECKSUM_KEY: &str = "regimen_data_crc32c";

/// `(name, shape, values)` of one f32 tensor.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

fn io_err(path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> Error {
    let context = format!("{what} {}", path.display());
    move |source| Error::Io { context, source }
}

/// Write f32 tensors and metadata to `path` atomically.
///
/// The bytes depend only on the arguments: tensors are laid out in name order and the header
/// (JSON with sorted keys) is written by regimen rather than by the `safetensors` crate, whose
/// metadata map is a `HashMap` (random order), so the same run writes the same file. The file
/// is written to a temporary file of its own in the same folder (a unique name, never another
/// file of the user's), flushed to disk, renamed over `path`, and the folder is flushed: a
/// crash leaves either the old file or the new one.
pub fn write_safetensors(
    path: &Path,
    tensors: &[NamedTensor],
    meta: BTreeMap<String, String>,
) -> Result<()> {
    let mut order: Vec<&NamedTensor> = tensors.iter().collect();
    order.sort_by(|a, b| a.0.cmp(&b.0));
    let mut body = Vec::with_capacity(order.iter().map(|t| 4 * t.2.len()).sum());
    for (_, _, values) in &order {
        for v in values {
            body.extend_from_slice(&v.to_le_bytes());
        }
    }
    let mut meta = meta;
    meta.insert(
        CHECKSUM_KEY.into(),
        format!("{:08x}", crate::tensorboard::crc32c(&body)),
    );
    let mut header = serde_json::Map::new();
    if !meta.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::Value::Object(
                meta.into_iter()
                    .map(|(k, v)| (k, serde_json::Value::String(v)))
                    .collect(),
            ),
        );
    }
    let mut offset = 0usize;
    for (name, shape, values) in &order {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        let end = offset + 4 * values.len();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    // serde_json's Map is ordered by key (no `preserve_order` feature): a sorted header.
    let mut head =
        serde_json::to_vec(&serde_json::Value::Object(header)).map_err(|e| Error::Data {
            file: path.display().to_string(),
            reason: e.to_string(),
        })?;
    // The data starts 8-byte aligned; the format pads the header with spaces.
    while (8 + head.len()) % 8 != 0 {
        head.push(b' ');
    }
    let mut data = Vec::with_capacity(8 + head.len() + offset);
    data.extend_from_slice(&(head.len() as u64).to_le_bytes());
    data.extend_from_slice(&head);
    data.extend_from_slice(&body);
    write_atomic(path, &data)
}

/// Write `bytes` to `path` atomically (see [`write_safetensors`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(
        ".{file_name}.{}.{}.regimen-tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    if !dir.is_dir() {
        // Say it of the file asked for, not of the temporary one beside it.
        return Err(Error::Data {
            file: path.display().to_string(),
            reason: if dir.exists() {
                format!("cannot write it: {} is not a folder", dir.display())
            } else {
                format!(
                    "cannot write it: the folder {} does not exist",
                    dir.display()
                )
            },
        });
    }
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err(&tmp, "creating"))?;
        f.write_all(bytes).map_err(io_err(&tmp, "writing"))?;
        f.sync_all().map_err(io_err(&tmp, "syncing"))?;
        std::fs::rename(&tmp, path).map_err(io_err(path, "renaming into"))?;
        // The rename itself is durable once the folder is flushed.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Read every f32 tensor and the metadata of a safetensors file.
pub fn read_safetensors(path: &Path) -> Result<(Vec<NamedTensor>, BTreeMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(io_err(path, "reading"))?;
    let file = path.display().to_string();
    let bad = |reason: String| Error::Data {
        file: file.clone(),
        reason,
    };
    let (header_len, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let mut meta: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    // Files regimen wrote carry a checksum of their tensor data; files from elsewhere may not.
    if let Some(want) = meta.remove(CHECKSUM_KEY) {
        let body = bytes.get(8 + header_len..).unwrap_or_default();
        let got = format!("{:08x}", crate::tensorboard::crc32c(body));
        if got != want {
            return Err(bad(format!(
                "the tensor data is damaged: its CRC-32C is {got}, the file says {want} (changed or corrupted after it was written)"
            )));
        }
    }
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(bad(format!(
                "tensor {name} is {:?}, expected F32",
                view.dtype()
            )));
        }
        let data = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        out.push((name.to_string(), view.shape().to_vec(), data));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((out, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_folder_is_named_not_the_temporary_file() {
        let p = std::env::temp_dir()
            .join(format!("regimen-no-such-{}", std::process::id()))
            .join("g.png");
        let e = write_atomic(&p, b"x").unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: ", p.display()))
                && e.contains("does not exist")
                && !e.contains("regimen-tmp"),
            "{e}"
        );
        // A file where the folder should be.
        let file = std::env::temp_dir().join(format!("regimen-a-file-{}", std::process::id()));
        std::fs::write(&file, b"x").unwrap();
        let e = write_atomic(&file.join("g.png"), b"x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a folder"), "{e}");
        let _ = std::fs::remove_file(&file);
    }
}
