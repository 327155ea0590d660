//! Small file helpers: outputs are written under a temporary name and renamed
//! when complete, so a partial file is never presented as finished.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The temporary name a file is written under before it is renamed into place.
pub fn partial_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.partial"))
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = partial_path(path);
    let result = (|| -> std::io::Result<()> {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// Creates `dir` (and parents) and checks that files can be created in it, so
/// an unwritable output folder fails before any work is done.
pub fn ensure_writable_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)
        .with_context(|| format!("output folder {} cannot be created", dir.display()))?;
    let probe = dir.join(format!(".kubewan-write-test-{}", std::process::id()));
    fs::File::create(&probe)
        .and_then(|mut f| f.write_all(b"ok"))
        .with_context(|| format!("output folder {} is not writable", dir.display()))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

/// Total size of the regular files under `dir` (following no symlinks out of it).
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let Ok(meta) = fs::metadata(entry.path()) else {
                continue;
            };
            if meta.is_dir() {
                total += dir_size(&entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}
