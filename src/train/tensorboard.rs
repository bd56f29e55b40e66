//! TensorBoard event files (`simile-train --tensorboard DIR`): the format TensorBoard, and the
//! trackers that import it, read. A file is a sequence of TFRecords, each
//! `u64 length | u32 masked CRC-32C of the length | data | u32 masked CRC-32C of the data`
//! (little-endian), whose data is one `tensorflow.Event` protocol buffer. The writer encodes
//! the few Event fields it needs by hand (wall_time, step, file_version, summary with
//! simple_value scalars, session_log): a protobuf library would be a large dependency for
//! five fields whose numbers are fixed by tensorflow/core/util/event.proto.
//!
//! Every event is flushed as written, so curves appear while training runs. A run writes
//! `SessionLog START` at the first step it will log (a resumed one: the checkpoint's step + 1):
//! TensorBoard then drops the events of earlier files in the folder at steps >= that, i.e.
//! what a killed run logged after its last checkpoint, so a resumed run's curves have each
//! step once.
use crate::error::{Error, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// An open event file.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir` if needed and a new event file in it, named as TensorFlow names them
    /// (`events.out.tfevents.<seconds>.<host>.<pid>.simile`), which TensorBoard lists in time
    /// order; writes the file-version event and `SessionLog START` at `first_step`.
    pub fn create(dir: &Path, first_step: i64) -> Result<Self> {
        crate::io::create_folder(dir, "--tensorboard")?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let host = if host.is_empty() {
            "localhost".into()
        } else {
            host
        };
        let secs = now().floor() as u64;
        let name = format!(
            "events.out.tfevents.{secs}.{host}.{}.simile",
            std::process::id()
        );
        let path = dir.join(name);
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let mut w = EventWriter {
            path,
            out: BufWriter::new(file),
        };
        let mut ev = event_head(now(), 0);
        bytes_field(&mut ev, 3, b"brain.Event:2");
        w.record(&ev)?;
        let mut ev = event_head(now(), first_step);
        let mut log = Vec::new();
        varint_field(&mut log, 1, 1); // SessionLog.status = START
        bytes_field(&mut ev, 7, &log); // Event.session_log
        w.record(&ev)?;
        Ok(w)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event at `step` with a scalar per `(tag, value)`; non-finite values are written
    /// as they are (TensorBoard shows NaN and inf).
    pub fn scalars(&mut self, step: i64, values: &[(String, f64)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let mut summary = Vec::new();
        for (tag, v) in values {
            let mut value = Vec::new();
            bytes_field(&mut value, 1, tag.as_bytes());
            // simple_value: field 2, a 32-bit float.
            value.push((2 << 3) | 5);
            value.extend_from_slice(&(*v as f32).to_le_bytes());
            bytes_field(&mut summary, 1, &value);
        }
        let mut ev = event_head(now(), step);
        bytes_field(&mut ev, 5, &summary);
        self.record(&ev)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let framed = frame(data);
        self.out
            .write_all(&framed)
            .and_then(|_| self.out.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Event.wall_time (field 1, double) and Event.step (field 2, int64).
fn event_head(wall_time: f64, step: i64) -> Vec<u8> {
    let mut ev = Vec::with_capacity(64);
    ev.push((1 << 3) | 1);
    ev.extend_from_slice(&wall_time.to_le_bytes());
    varint_field(&mut ev, 2, step as u64);
    ev
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    varint(out, (field as u64) << 3);
    varint(out, v);
}

/// A length-delimited field (strings, bytes, embedded messages).
fn bytes_field(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    varint(out, ((field as u64) << 3) | 2);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// TFRecord's CRC mask (tensorflow/core/lib/hash/crc32c.h): rotated and offset so that a
/// CRC of data that itself holds CRCs stays well distributed.
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_castagnolis() {
        // The standard check value of CRC-32C.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        // TFRecord's mask of it, worked by hand: ((c >> 15) | (c << 17)) + 0xa282ead8.
        assert_eq!(masked_crc(b"123456789"), 0xc78ab0e5);
    }

    #[test]
    fn varints_and_frames() {
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        let f = frame(b"abc");
        assert_eq!(f.len(), 8 + 4 + 3 + 4);
        assert_eq!(&f[..8], &3u64.to_le_bytes());
        assert_eq!(&f[12..15], b"abc");
    }
}
