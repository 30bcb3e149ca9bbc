//! Reading a GGUF file with candle's reader: typed metadata look-ups whose errors name the key,
//! and tensors dequantized to f32.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use super::error::ImportError;

/// An open GGUF file: its parsed header plus a reader for the tensor data.
pub struct GgufFile {
    path: PathBuf,
    reader: BufReader<File>,
    content: Content,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, ImportError> {
        let file = File::open(path).map_err(|source| ImportError::ReadInput {
            path: path.to_path_buf(),
            source,
        })?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| ImportError::NotGguf {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            reader,
            content,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names with their shapes, in Hugging Face order (rows first), sorted by name.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut v: Vec<(String, Vec<usize>)> = self
            .content
            .tensor_infos
            .iter()
            .map(|(name, info)| (name.clone(), info.shape.dims().to_vec()))
            .collect();
        v.sort();
        v
    }

    pub fn tensor_shape(&self, name: &str) -> Option<Vec<usize>> {
        self.content
            .tensor_infos
            .get(name)
            .map(|info| info.shape.dims().to_vec())
    }

    /// Reads one tensor and dequantizes it to an f32 tensor on the CPU.
    pub fn dequantize(&mut self, name: &str) -> Result<Tensor, ImportError> {
        let err = |source| ImportError::Tensor {
            name: name.to_string(),
            source,
        };
        let q = self
            .content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(err)?;
        q.dequantize(&Device::Cpu)
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .map_err(err)
    }

    fn value(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn missing(key: &str) -> ImportError {
        ImportError::metadata(key, "missing")
    }

    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>, ImportError> {
        match self.value(key) {
            None => Ok(None),
            Some(v) => as_u64(v)
                .map(Some)
                .ok_or_else(|| wrong_type(key, "an unsigned integer", v)),
        }
    }

    pub fn u64(&self, key: &str) -> Result<u64, ImportError> {
        self.opt_u64(key)?.ok_or_else(|| Self::missing(key))
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>, ImportError> {
        Ok(self.opt_u64(key)?.map(|v| v as usize))
    }

    pub fn usize(&self, key: &str) -> Result<usize, ImportError> {
        Ok(self.u64(key)? as usize)
    }

    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>, ImportError> {
        match self.opt_u64(key)? {
            None => Ok(None),
            Some(v) => u32::try_from(v)
                .map(Some)
                .map_err(|_| ImportError::metadata(key, format!("out of range ({v})"))),
        }
    }

    /// A float, rounded through f32 when stored as f32 so that 1e-5 reads back as 1e-5 and not
    /// as 9.999999747378752e-06.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, ImportError> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(shortest_f64(*x))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => as_u64(v)
                .map(|x| Some(x as f64))
                .ok_or_else(|| wrong_type(key, "a number", v)),
        }
    }

    pub fn f64(&self, key: &str) -> Result<f64, ImportError> {
        self.opt_f64(key)?.ok_or_else(|| Self::missing(key))
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, ImportError> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(wrong_type(key, "a boolean", v)),
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>, ImportError> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(wrong_type(key, "a string", v)),
        }
    }

    pub fn str(&self, key: &str) -> Result<&str, ImportError> {
        self.opt_str(key)?.ok_or_else(|| Self::missing(key))
    }

    fn opt_array(&self, key: &str) -> Result<Option<&Vec<Value>>, ImportError> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(v) => Err(wrong_type(key, "an array", v)),
        }
    }

    pub fn opt_str_array(&self, key: &str) -> Result<Option<Vec<String>>, ImportError> {
        let Some(items) = self.opt_array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(wrong_type(key, "an array of strings", other)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    pub fn str_array(&self, key: &str) -> Result<Vec<String>, ImportError> {
        self.opt_str_array(key)?.ok_or_else(|| Self::missing(key))
    }

    pub fn opt_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>, ImportError> {
        let Some(items) = self.opt_array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| match v {
                Value::F32(x) => Ok(*x),
                Value::F64(x) => Ok(*x as f32),
                other => Err(wrong_type(key, "an array of floats", other)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    pub fn opt_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>, ImportError> {
        let Some(items) = self.opt_array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| as_i64(v).ok_or_else(|| wrong_type(key, "an array of integers", v)))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    pub fn opt_bool_array(&self, key: &str) -> Result<Option<Vec<bool>>, ImportError> {
        let Some(items) = self.opt_array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| match v {
                Value::Bool(b) => Ok(*b),
                other => Err(wrong_type(key, "an array of booleans", other)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// True when the key holds an array (rather than a scalar).
    pub fn is_array(&self, key: &str) -> bool {
        matches!(self.value(key), Some(Value::Array(_)))
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

fn as_u64(v: &Value) -> Option<u64> {
    u64::try_from(as_i64(v)?).ok()
}

fn wrong_type(key: &str, expected: &str, found: &Value) -> ImportError {
    ImportError::metadata(
        key,
        format!("not {expected} (it is {:?})", found.value_type()),
    )
}

/// The f64 whose decimal form is the shortest one that reads back as `x`.
pub fn shortest_f64(x: f32) -> f64 {
    x.to_string().parse::<f64>().unwrap_or(x as f64)
}

#[cfg(test)]
mod tests {
    use super::shortest_f64;

    #[test]
    fn f32_metadata_reads_back_as_written() {
        assert_eq!(shortest_f64(1e-5_f32), 1e-5);
        assert_eq!(shortest_f64(1e-6_f32), 1e-6);
        assert_eq!(shortest_f64(100000.0_f32), 100000.0);
        assert_eq!(shortest_f64(1_000_000.0_f32), 1_000_000.0);
    }
}
