//! Writes a `.safetensors` file one tensor at a time, so that a model never has to sit in
//! memory whole. The header (names, dtypes, shapes, byte ranges) is known from the GGUF before
//! any data is read, so it is written first and the data follows in the same order.
//!
//! Format: 8-byte little-endian header length, a JSON header padded with spaces to a multiple
//! of 8 bytes, then the raw little-endian data of every tensor back to back.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

/// Element types the import writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StDtype {
    BF16,
    F32,
}

impl StDtype {
    pub fn name(self) -> &'static str {
        match self {
            StDtype::BF16 => "BF16",
            StDtype::F32 => "F32",
        }
    }

    pub fn size(self) -> usize {
        match self {
            StDtype::BF16 => 2,
            StDtype::F32 => 4,
        }
    }
}

struct Entry {
    name: String,
    bytes: usize,
}

/// A safetensors file being written; tensors must be written in the order they were declared.
pub struct SafetensorsWriter {
    path: PathBuf,
    out: BufWriter<File>,
    entries: Vec<Entry>,
    next: usize,
}

impl SafetensorsWriter {
    /// Creates the file and writes the header for `tensors` (name, dtype, shape), in that order.
    pub fn create(
        path: &Path,
        tensors: &[(String, StDtype, Vec<usize>)],
    ) -> std::io::Result<Self> {
        let mut header = Map::new();
        header.insert("__metadata__".into(), json!({ "format": "pt" }));
        let mut offset = 0usize;
        let mut entries = Vec::with_capacity(tensors.len());
        for (name, dtype, shape) in tensors {
            if header.contains_key(name) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("tensor `{name}` declared twice"),
                ));
            }
            let bytes = shape.iter().product::<usize>() * dtype.size();
            header.insert(
                name.clone(),
                json!({
                    "dtype": dtype.name(),
                    "shape": shape,
                    "data_offsets": [offset, offset + bytes],
                }),
            );
            entries.push(Entry {
                name: name.clone(),
                bytes,
            });
            offset += bytes;
        }
        let mut header_bytes = serde_json::to_vec(&Value::Object(header))?;
        while header_bytes.len() % 8 != 0 {
            header_bytes.push(b' ');
        }
        let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
        out.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
        out.write_all(&header_bytes)?;
        Ok(SafetensorsWriter {
            path: path.to_path_buf(),
            out,
            entries,
            next: 0,
        })
    }

    /// Writes the data of the next declared tensor.
    pub fn write_next(&mut self, name: &str, data: &[u8]) -> std::io::Result<()> {
        let Some(entry) = self.entries.get(self.next) else {
            return Err(invalid(format!("tensor `{name}` was not declared")));
        };
        if entry.name != name {
            return Err(invalid(format!(
                "tensor `{name}` written where `{}` was expected",
                entry.name
            )));
        }
        if entry.bytes != data.len() {
            return Err(invalid(format!(
                "tensor `{name}` has {} bytes, {} declared",
                data.len(),
                entry.bytes
            )));
        }
        self.out.write_all(data)?;
        self.next += 1;
        Ok(())
    }

    /// Flushes and syncs the file; fails if a declared tensor was not written.
    pub fn finish(self) -> std::io::Result<()> {
        if self.next != self.entries.len() {
            return Err(invalid(format!(
                "{} of {} tensors written to {}",
                self.next,
                self.entries.len(),
                self.path.display()
            )));
        }
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    }
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_file_reads_back_with_the_safetensors_crate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b: Vec<half::bf16> = [0.5f32, -1.0, 7.0].iter().map(|x| half::bf16::from_f32(*x)).collect();
        let mut w = SafetensorsWriter::create(
            &path,
            &[
                ("a".into(), StDtype::F32, vec![2, 3]),
                ("b".into(), StDtype::BF16, vec![3]),
            ],
        )
        .unwrap();
        let a_bytes: Vec<u8> = a.iter().flat_map(|x| x.to_le_bytes()).collect();
        let b_bytes: Vec<u8> = b.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert!(w.write_next("b", &b_bytes).is_err(), "out of order");
        w.write_next("a", &a_bytes).unwrap();
        w.write_next("b", &b_bytes).unwrap();
        w.finish().unwrap();

        let buf = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&buf).unwrap();
        let ta = st.tensor("a").unwrap();
        assert_eq!(ta.shape(), &[2, 3]);
        assert_eq!(ta.dtype(), safetensors::Dtype::F32);
        assert_eq!(ta.data(), a_bytes.as_slice());
        let tb = st.tensor("b").unwrap();
        assert_eq!(tb.dtype(), safetensors::Dtype::BF16);
        assert_eq!(tb.data(), b_bytes.as_slice());
    }

    #[test]
    fn unfinished_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let w = SafetensorsWriter::create(
            &dir.path().join("t.safetensors"),
            &[("a".into(), StDtype::F32, vec![1])],
        )
        .unwrap();
        assert!(w.finish().is_err());
    }
}
