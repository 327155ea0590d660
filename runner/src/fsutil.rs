//! Files on volumes that others write to, read and written so that they are
//! what they claim to be and nothing lands outside its folder:
//!
//! - inputs are resolved through their symlinks and must stay inside their
//!   root ([`resolve_inside`]); they are opened without blocking and must be
//!   regular files (a FIFO or a device is refused, not waited on:
//!   [`open_regular`]), and are read with a size cap ([`read_bounded`]);
//! - images are decoded by their content, after their header's size is
//!   checked against the limits ([`read_image`]);
//! - the job folder is created below the output root one component at a time,
//!   refusing symlinks ([`job_dir`]), and the output root may not overlap the
//!   checkpoint root ([`check_disjoint`]);
//! - outputs are written under a temporary name created exclusively, never
//!   through an existing file or symlink, and renamed into place when
//!   complete; the temporary is removed on every error path, a full disk
//!   included ([`PartialFile`], [`write_atomic`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};
use kubewan_crds::limits::{MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, check_image_size};
use kubewan_crds::validate::check_relative_path;

/// The temporary name a file is written under before it is renamed into place.
pub fn partial_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.partial"))
}

/// `rel` inside `root` (called `root_name` in errors, e.g. "the inputs
/// folder") with every symlink resolved: refuses `..`, absolute paths and
/// symlinks that lead out of the root.
pub fn resolve_inside(root: &Path, root_name: &str, rel: &str) -> Result<PathBuf> {
    if let Err(why) = check_relative_path(rel) {
        bail!("{rel:?} {why}; it must be relative to {root_name}");
    }
    let root = fs::canonicalize(root)
        .with_context(|| format!("{root_name} {} does not exist", root.display()))?;
    let path = root.join(rel);
    let canonical =
        fs::canonicalize(&path).with_context(|| format!("{} does not exist", path.display()))?;
    if !canonical.starts_with(&root) {
        bail!(
            "{rel:?} resolves to {}, outside {root_name} {}",
            canonical.display(),
            root.display()
        );
    }
    Ok(canonical)
}

/// Opens `path` for reading without blocking (a FIFO would wait for a
/// writer forever) and checks that it is a regular file.
pub fn open_regular(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let kind = file
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?
        .file_type();
    if !kind.is_file() {
        bail!(
            "{} is not a regular file (a {}); only regular files are read",
            path.display(),
            describe(kind)
        );
    }
    Ok(file)
}

fn describe(kind: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_dir() {
        "folder"
    } else if kind.is_fifo() {
        "FIFO"
    } else if kind.is_char_device() || kind.is_block_device() {
        "device"
    } else if kind.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// The regular file `path` opened, refused when larger than `max` bytes;
/// returns it with its length.
pub fn open_bounded(path: &Path, max: u64) -> Result<(File, u64)> {
    let file = open_regular(path)?;
    let len = file.metadata()?.len();
    if len > max {
        bail!(
            "{} is {len} bytes, more than the {max} allowed",
            path.display()
        );
    }
    Ok((file, len))
}

/// The bytes of the regular file `path`, refused when larger than `max`.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    let (file, len) = open_bounded(path, max)?;
    let mut bytes = Vec::with_capacity(len as usize);
    // The size was checked, but the file may grow while it is read.
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > max {
        bail!("{} grew past the {max} bytes allowed", path.display());
    }
    Ok(bytes)
}

/// [`read_bounded`] as UTF-8 text.
pub fn read_text_bounded(path: &Path, max: u64) -> Result<String> {
    String::from_utf8(read_bounded(path, max)?)
        .map_err(|e| anyhow::anyhow!("{} is not UTF-8 text: {e}", path.display()))
}

/// Decodes a PNG or JPEG image, the format detected from its content (not
/// its name), after checking the size its header gives against the limits.
pub fn read_image(path: &Path) -> Result<image::DynamicImage> {
    let decoder = image_decoder(path)?;
    image::DynamicImage::from_decoder(decoder)
        .with_context(|| format!("image {} is corrupt or not a PNG/JPEG", path.display()))
}

/// The width and height of a PNG or JPEG image, read from its header as
/// [`read_image`] reads it (content, not name, decides the format).
pub fn image_dimensions(path: &Path) -> Result<(u32, u32)> {
    Ok(image::ImageDecoder::dimensions(&image_decoder(path)?))
}

/// The decoder of the image `path` (a regular file, PNG or JPEG by its
/// content), its header read and its size checked against the limits.
fn image_decoder(path: &Path) -> Result<impl image::ImageDecoder> {
    let file = open_regular(path)?;
    let mut reader = image::ImageReader::new(BufReader::new(file))
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?;
    match reader.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg) => {}
        Some(other) => bail!(
            "image {} is {other:?} (by its content); only PNG and JPEG are read",
            path.display()
        ),
        None => bail!(
            "image {} is not a PNG or JPEG (its content is neither)",
            path.display()
        ),
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_PIXELS * 4);
    reader.limits(limits);
    let decoder = reader
        .into_decoder()
        .with_context(|| format!("image {} is corrupt or not a PNG/JPEG", path.display()))?;
    let (width, height) = image::ImageDecoder::dimensions(&decoder);
    if let Err(why) = check_image_size(width, height) {
        bail!("image {} {why}", path.display());
    }
    Ok(decoder)
}

/// A file being written under its temporary name ([`partial_path`]): created
/// exclusively (an existing file or symlink of that name is removed, never
/// followed), renamed into place by [`PartialFile::commit`], removed when
/// dropped uncommitted, so an error anywhere, a full disk included, leaves
/// no temporary behind.
pub struct PartialFile {
    path: PathBuf,
    tmp: PathBuf,
    file: File,
    committed: bool,
}

impl PartialFile {
    pub fn create(path: &Path) -> Result<PartialFile> {
        let tmp = partial_path(path);
        // A temporary left by a killed run, or planted: unlink the name (a
        // symlink goes, its target is untouched), then create it anew.
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", tmp.display())),
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o644)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        crate::stop::track(&tmp);
        Ok(PartialFile {
            path: path.to_owned(),
            tmp,
            file,
            committed: false,
        })
    }

    /// The final name.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Syncs the data and renames the temporary into place.
    pub fn commit(mut self) -> Result<()> {
        self.file
            .sync_all()
            .with_context(|| format!("cannot write {}", self.tmp.display()))?;
        fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("cannot move {} into place", self.path.display()))?;
        self.committed = true;
        crate::stop::untrack(&self.tmp);
        Ok(())
    }
}

impl Write for PartialFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Seek for PartialFile {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.file.seek(pos)
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
            crate::stop::untrack(&self.tmp);
        }
    }
}

/// Writes `bytes` to `path` atomically ([`PartialFile`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = PartialFile::create(path)?;
    file.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.commit()
}

/// The job folder `<output>/<rel>`: the output root is resolved, then every
/// folder below it is created or entered without following a symlink, so
/// the job folder is inside the output root; then a file is created and
/// removed in it, so an unwritable folder fails before any work is done.
pub fn job_dir(output: &Path, rel: &str) -> Result<PathBuf> {
    if !rel.is_empty()
        && let Err(why) = check_relative_path(rel)
    {
        bail!("the job folder {rel:?} {why}; it is relative to the output volume");
    }
    fs::create_dir_all(output)
        .with_context(|| format!("output folder {} cannot be created", output.display()))?;
    let mut dir = fs::canonicalize(output)
        .with_context(|| format!("output folder {} cannot be read", output.display()))?;
    for part in Path::new(rel).components() {
        let Component::Normal(name) = part else {
            continue;
        };
        dir.push(name);
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) if meta.file_type().is_symlink() => bail!(
                "{} is a symlink; the job folder is not followed out of the output folder",
                dir.display()
            ),
            Ok(_) => bail!(
                "output folder {} cannot be created: a file of that name is in the way",
                dir.display()
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match fs::create_dir(&dir) {
                Ok(()) => {}
                // Another pod of the job created it meanwhile: look again.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if !fs::symlink_metadata(&dir)?.is_dir() {
                        bail!(
                            "{} appeared as something other than a folder",
                            dir.display()
                        );
                    }
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("output folder {} cannot be created", dir.display())
                    });
                }
            },
            Err(e) => {
                return Err(e).with_context(|| format!("cannot look at {}", dir.display()));
            }
        }
    }
    let probe = dir.join(format!(".kubewan-write-test-{}", std::process::id()));
    write_atomic(&probe, b"ok")
        .with_context(|| format!("output folder {} is not writable", dir.display()))?;
    fs::remove_file(&probe).with_context(|| format!("cannot remove {}", probe.display()))?;
    Ok(dir)
}

/// The output root and the checkpoint root must not overlap (neither inside
/// the other): outputs never land among the read-only weights. A checkpoint
/// root that does not exist overlaps nothing.
pub fn check_disjoint(output: &Path, ckpts: &Path) -> Result<()> {
    let Ok(ckpts) = fs::canonicalize(ckpts) else {
        return Ok(());
    };
    let output = resolve_existing_part(output)?;
    if output.starts_with(&ckpts) || ckpts.starts_with(&output) {
        bail!(
            "the output folder {} and the checkpoint folder {} overlap; outputs must go elsewhere",
            output.display(),
            ckpts.display()
        );
    }
    Ok(())
}

/// `path` with the symlinks of its longest existing ancestor resolved and
/// the rest (not created yet) appended: where it will be, without creating it.
fn resolve_existing_part(path: &Path) -> Result<PathBuf> {
    let absolute =
        std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))?;
    let mut rest = Vec::new();
    let mut existing = absolute.as_path();
    loop {
        if let Ok(real) = fs::canonicalize(existing) {
            return Ok(rest.iter().rev().fold(real, |p, name| p.join(name)));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => bail!("cannot resolve {}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_planted_partial_symlink_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep me").unwrap();
        let out = dir.path().join("out.json");
        symlink(&victim, partial_path(&out)).unwrap();
        write_atomic(&out, b"new").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep me");
        assert_eq!(fs::read(&out).unwrap(), b"new");
        assert!(!partial_path(&out).exists());
    }

    #[test]
    fn an_uncommitted_file_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("video.mp4");
        let mut file = PartialFile::create(&out).unwrap();
        file.write_all(b"half").unwrap();
        drop(file);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn fifos_and_devices_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.png");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let err = open_regular(&fifo).unwrap_err().to_string();
        assert!(err.contains("not a regular file (a FIFO)"), "{err}");
        let err = read_bounded(Path::new("/dev/zero"), 10)
            .unwrap_err()
            .to_string();
        assert!(err.contains("(a device)"), "{err}");
    }

    #[test]
    fn a_symlinked_job_folder_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let output = base.path().join("output");
        let elsewhere = base.path().join("elsewhere");
        fs::create_dir_all(output.join("ns")).unwrap();
        fs::create_dir_all(&elsewhere).unwrap();
        symlink(&elsewhere, output.join("ns/job")).unwrap();
        let err = job_dir(&output, "ns/job").unwrap_err().to_string();
        assert!(err.contains("is a symlink"), "{err}");
        let dir = job_dir(&output, "ns/other").unwrap();
        assert!(dir.starts_with(fs::canonicalize(&output).unwrap()));
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            0,
            "the probe is removed"
        );
    }

    #[test]
    fn overlapping_output_and_checkpoint_roots_are_refused() {
        let base = tempfile::tempdir().unwrap();
        let ckpts = base.path().join("ckpts");
        fs::create_dir_all(&ckpts).unwrap();
        let err = check_disjoint(&ckpts.join("out"), &ckpts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("overlap"), "{err}");
        assert!(check_disjoint(base.path(), &ckpts).is_err());
        check_disjoint(&base.path().join("out"), &ckpts).unwrap();
        check_disjoint(&base.path().join("out"), &base.path().join("missing")).unwrap();
    }

    #[test]
    fn images_are_read_by_content_and_their_header_size_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let jpeg_named_png = dir.path().join("photo.png");
        image::RgbImage::from_pixel(8, 8, image::Rgb([200, 10, 10]))
            .save_with_format(&jpeg_named_png, image::ImageFormat::Jpeg)
            .unwrap();
        assert_eq!(read_image(&jpeg_named_png).unwrap().width(), 8);
        let text = dir.path().join("notes.png");
        fs::write(&text, b"just text").unwrap();
        let err = read_image(&text).unwrap_err().to_string();
        assert!(err.contains("not a PNG or JPEG"), "{err}");
    }
}
