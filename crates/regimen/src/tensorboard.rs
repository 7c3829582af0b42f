//! TensorBoard event files, written without TensorFlow or protobuf libraries.
//!
//! An event file (`events.out.tfevents.TIME.HOST.regimen`) is a sequence of records:
//! `u64 length (little-endian) | u32 masked CRC32C of the length | data | u32 masked CRC32C of
//! the data`, where the CRC mask is `((crc >> 15) | (crc << 17)) + 0xa282ead8`. Each record's
//! data is a protobuf `tensorflow.Event`; regimen writes two kinds: the first, with
//! `file_version = "brain.Event:2"`, then scalars: `Event { wall_time (1, double), step (2,
//! int64), summary (5) { value (1) { tag (1, string), simple_value (2, float) } } }`. That is
//! a handful of protobuf fields, encoded here by hand (varints, fixed 32/64-bit, length-
//! delimited), which spares the build a protobuf code generator.
//! `tools/check_tensorboard.py` reads the files back with TensorBoard's own reader.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::train::StepEnd;
use crate::trainer::{Callback, Control, EpochEnd, Record};

/// CRC-32C (Castagnoli), reflected polynomial `0x82F63B78`.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(field: u32, wire: u8, out: &mut Vec<u8>) {
    varint(((field as u64) << 3) | wire as u64, out);
}

fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    key(field, 2, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// The protobuf bytes of an `Event` with `wall_time`, `step`, and either a file version or
/// one scalar summary value per `(tag, value)`.
pub fn encode_event(
    wall_time: f64,
    step: i64,
    file_version: Option<&str>,
    scalars: &[(&str, f32)],
) -> Vec<u8> {
    let mut e = Vec::new();
    key(1, 1, &mut e);
    e.extend_from_slice(&wall_time.to_le_bytes());
    key(2, 0, &mut e);
    varint(step as u64, &mut e);
    if let Some(v) = file_version {
        bytes_field(3, v.as_bytes(), &mut e);
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, v) in scalars {
            let mut value = Vec::new();
            bytes_field(1, tag.as_bytes(), &mut value);
            key(2, 5, &mut value);
            value.extend_from_slice(&v.to_le_bytes());
            bytes_field(1, &value, &mut summary);
        }
        bytes_field(5, &summary, &mut e);
    }
    e
}

/// One framed record.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend_from_slice(&len);
    r.extend_from_slice(&masked_crc(&len).to_le_bytes());
    r.extend_from_slice(data);
    r.extend_from_slice(&masked_crc(data).to_le_bytes());
    r
}

/// An event file being written.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl EventWriter {
    /// Create a new event file in `dir` (TensorBoard reads every event file of a folder).
    pub fn create(dir: &Path) -> Result<EventWriter> {
        let io = |what: String| {
            move |e| Error::Io {
                context: what,
                source: e,
            }
        };
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let host = if host.is_empty() {
            "localhost".to_string()
        } else {
            host
        };
        let t = now();
        // A unique name even for two writers in the same second.
        let mut n = 0;
        let (file, path) = loop {
            let path = dir.join(format!(
                "events.out.tfevents.{}.{host}.{}.{n}.regimen",
                t as u64,
                std::process::id()
            ));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(f) => break (f, path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => {
                    return Err(Error::Io {
                        context: format!("creating {}", path.display()),
                        source: e,
                    })
                }
            }
        };
        let mut w = EventWriter { file, path };
        w.write(&encode_event(t, 0, Some("brain.Event:2"), &[]))?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, event: &[u8]) -> Result<()> {
        self.file.write_all(&frame(event)).map_err(|e| Error::Io {
            context: format!("writing {}", self.path.display()),
            source: e,
        })
    }

    /// Scalars at `step` (one event).
    pub fn scalars(&mut self, step: i64, values: &[(&str, f32)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        self.write(&encode_event(now(), step, None, values))
    }

    pub fn flush(&mut self) -> Result<()> {
        self.file
            .flush()
            .and_then(|_| self.file.sync_data())
            .map_err(|e| Error::Io {
                context: format!("writing {}", self.path.display()),
                source: e,
            })
    }
}

/// Scalars for TensorBoard: per epoch (`epoch/train_loss`, `epoch/train_acc`, `epoch/val_loss`,
/// `epoch/val_acc`, `epoch/gap`, `epoch/lr`, `epoch/samples_per_sec`; step = the epoch) and
/// every `every` optimizer updates (`step/loss`, `step/grad_norm`, `step/lr`; step = the
/// update). The per-step loss and gradient norm are device reads, made only on those steps,
/// and only by the host loop (the on-device loop logs `step/lr`).
pub struct TensorBoard {
    dir: PathBuf,
    every: u64,
    writer: Option<EventWriter>,
}

impl TensorBoard {
    pub fn new(dir: impl Into<PathBuf>, every: u64) -> Self {
        TensorBoard {
            dir: dir.into(),
            every: every.max(1),
            writer: None,
        }
    }

    fn writer(&mut self) -> Result<&mut EventWriter> {
        if self.writer.is_none() {
            self.writer = Some(EventWriter::create(&self.dir)?);
        }
        Ok(self.writer.as_mut().expect("created above"))
    }
}

impl Callback for TensorBoard {
    fn on_train_begin(&mut self, history: &[Record], _control: &mut Control) -> Result<()> {
        // A new run finds out at once whether it can write its events; a resumed one opens its
        // file at its first event, so that resuming a finished run leaves no empty file.
        if history.is_empty() {
            self.writer()?;
        }
        Ok(())
    }
    fn wants_step_values(&self, step: u64) -> bool {
        step.is_multiple_of(self.every)
    }
    fn on_step_end(&mut self, step: &StepEnd, _control: &mut Control) -> Result<()> {
        if !step.step.is_multiple_of(self.every) {
            return Ok(());
        }
        let mut v = vec![("step/lr", step.lr as f32)];
        if let Some(l) = step.loss {
            v.push(("step/loss", l));
        }
        if let Some(g) = step.grad_norm {
            v.push(("step/grad_norm", g));
        }
        self.writer()?.scalars(step.step as i64, &v)
    }
    fn on_epoch_end(&mut self, end: &mut EpochEnd) -> Result<()> {
        let r = end.record;
        let mut v = vec![
            ("epoch/train_loss", r.train_loss),
            ("epoch/train_acc", r.train_acc),
            ("epoch/lr", r.lr as f32),
            ("epoch/samples_per_sec", r.samples_per_sec as f32),
        ];
        for (tag, x) in [
            ("epoch/val_loss", r.val_loss),
            ("epoch/val_acc", r.val_acc),
            ("epoch/gap", r.gap),
        ] {
            if let Some(x) = x {
                v.push((tag, x));
            }
        }
        let w = self.writer()?;
        w.scalars(r.epoch as i64, &v)?;
        w.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn event_encoding_matches_protobuf() {
        // Event { wall_time: 1.5, step: 300, summary { value { tag: "a", simple_value: 2.0 } } }
        // as protoc encodes it.
        let e = encode_event(1.5, 300, None, &[("a", 2.0)]);
        let mut want = vec![0x09];
        want.extend_from_slice(&1.5f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 0xac, 0x02]);
        want.extend_from_slice(&[0x2a, 0x0a, 0x0a, 0x08, 0x0a, 0x01, b'a', 0x15]);
        want.extend_from_slice(&2.0f32.to_le_bytes());
        assert_eq!(e, want);
    }
}
