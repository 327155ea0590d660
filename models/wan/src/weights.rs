//! Reading safetensors weights into memory WITHOUT keeping them memory-mapped.
//!
//! candle's mmap-backed VarBuilder copies every tensor out of the mapping on the CPU, and the
//! mapped pages stay resident (counted in RSS as file pages) until the VarBuilder is dropped:
//! loading a model on the CPU peaks at about twice its size. This reader reads one tensor at a
//! time with positioned reads, converts it and moves it to the device, so the peak is the
//! weights plus one tensor (on a GPU: one tensor of host memory).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::{Error, Result};

fn st_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "I32" => DType::I32,
        "I16" => DType::I16,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return None,
    })
}

fn bad(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::msg(format!(
        "{}: not a readable safetensors file: {what}",
        path.display()
    ))
}

/// Reads every tensor of one safetensors file; float tensors are converted to `dtype`.
pub fn read_safetensors(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let file = File::open(path).map_err(|e| bad(path, e))?;
    let len = file.metadata().map_err(|e| bad(path, e))?.len();
    let mut n = [0u8; 8];
    file.read_exact_at(&mut n, 0).map_err(|e| bad(path, e))?;
    let n = u64::from_le_bytes(n);
    if n > len.saturating_sub(8) || n > 100 << 20 {
        return Err(bad(path, format!("header of {n} bytes in a file of {len}")));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact_at(&mut header, 8)
        .map_err(|e| bad(path, e))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(path, e))?;
    let base = 8 + n;
    let mut out = HashMap::with_capacity(header.len());
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let dt = info["dtype"]
            .as_str()
            .and_then(st_dtype)
            .ok_or_else(|| bad(path, format!("{name}: unsupported dtype {}", info["dtype"])))?;
        let shape: Vec<usize> = info["shape"]
            .as_array()
            .ok_or_else(|| bad(path, format!("{name}: no shape")))?
            .iter()
            .map(|v| v.as_u64().map(|x| x as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad(path, format!("{name}: bad shape")))?;
        let off = info["data_offsets"]
            .as_array()
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| bad(path, format!("{name}: bad data_offsets")))?;
        let bytes = off
            .1
            .checked_sub(off.0)
            .ok_or_else(|| bad(path, format!("{name}: bad data_offsets")))?;
        let expect = shape.iter().product::<usize>() * dt.size_in_bytes();
        if bytes as usize != expect || base + off.1 > len {
            return Err(bad(
                path,
                format!("{name}: {bytes} bytes for shape {shape:?} {dt:?}"),
            ));
        }
        let mut buf = vec![0u8; bytes as usize];
        file.read_exact_at(&mut buf, base + off.0)
            .map_err(|e| bad(path, e))?;
        let t = Tensor::from_raw_buffer(&buf, dt, &shape, &Device::Cpu)?;
        drop(buf);
        let t = if dt.is_float() && dt != dtype {
            t.to_dtype(dtype)?
        } else {
            t
        };
        out.insert(name, t.to_device(device)?);
    }
    Ok(out)
}

/// A VarBuilder over the weights of `dir` (`<stem>.safetensors` or its shards), read into memory.
pub fn var_builder(
    dir: &Path,
    stem: &str,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let files: Vec<PathBuf> = kubewan_model_common::safetensors_files(dir, stem)?;
    let mut all = HashMap::new();
    for f in &files {
        all.extend(read_safetensors(f, dtype, device)?);
    }
    Ok(VarBuilder::from_tensors(all, dtype, device))
}
