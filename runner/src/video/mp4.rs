//! H.264 MP4 without ffmpeg.
//!
//! Writing: openh264 encodes each RGB frame; our own muxer streams the samples
//! straight into the `mdat` box of the output file and keeps only their sizes
//! (4 bytes a frame), writing the `moov` index at the end. Memory is one frame
//! plus the encoder, whatever the video's length. The file is written under a
//! temporary name ([`PartialFile`]) and renamed by [`Mp4Writer::finish`], so
//! an interrupted or failed write never leaves a finished-looking MP4 or a
//! temporary behind.
//!
//! Reading: our defensive demuxer ([`super::demux`]) reads the index (any
//! input gives an index or an error, never a panic or a hang), each sample is
//! read from the file on demand and decoded by openh264; a decoded picture of
//! another size than the index says is refused before it is converted.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use openh264::OpenH264API;
use openh264::decoder::Decoder;
use openh264::encoder::{BitRate, Encoder, EncoderConfig, FrameRate, QpRange, RateControlMode};
use openh264::formats::{RgbSliceU8, YUVBuffer, YUVSource};

use super::demux::read_index;
use super::frames::Frame;
use crate::fsutil::{PartialFile, open_regular};
use kubewan_crds::limits::MAX_FRAME_PIXELS;

/// The largest compressed frame read (a 1080p intra frame is about 1 MB).
const MAX_SAMPLE_BYTES: u32 = 64 << 20;

/// Quantiser range: visually clean, files a few KiB a frame at preview sizes.
const QP_MIN: u8 = 18;
const QP_MAX: u8 = 26;
const NAL_IDR: u8 = 5;
const NAL_SPS: u8 = 7;
const NAL_PPS: u8 = 8;

/// Streams RGB frames into an H.264 MP4 file.
pub struct Mp4Writer {
    path: PathBuf,
    out: BufWriter<PartialFile>,
    encoder: Encoder,
    width: u32,
    height: u32,
    fps: u32,
    mdat_header_at: u64,
    mdat_bytes: u64,
    sizes: Vec<u32>,
    sync: Vec<u32>,
    sps: Option<Vec<u8>>,
    pps: Option<Vec<u8>>,
    sample: Vec<u8>,
}

fn be32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_be_bytes());
}
fn be16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_be_bytes());
}
fn be64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_be_bytes());
}

/// A box: 32-bit size, four-character type, payload.
fn mp4_box(kind: &[u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 8);
    be32(&mut v, (payload.len() + 8) as u32);
    v.extend_from_slice(kind);
    v.extend_from_slice(payload);
    v
}

/// A full box: version and flags before the payload.
fn full_box(kind: &[u8; 4], version: u8, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(payload.len() + 4);
    be32(&mut p, (u32::from(version) << 24) | (flags & 0x00ff_ffff));
    p.extend_from_slice(payload);
    mp4_box(kind, &p)
}

const UNITY_MATRIX: [u32; 9] = [0x0001_0000, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000];

/// Splits an Annex B byte stream (or one NAL with its start code) into NAL payloads.
fn annexb_nals(data: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= data.len() {
        if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
            starts.push((i, i + 3));
            i += 3;
        } else {
            i += 1;
        }
    }
    if starts.is_empty() {
        return if data.is_empty() { vec![] } else { vec![data] };
    }
    let mut nals = Vec::new();
    for (k, &(_, begin)) in starts.iter().enumerate() {
        let mut end = starts.get(k + 1).map(|&(s, _)| s).unwrap_or(data.len());
        // A 4-byte start code leaves a zero before the next 3-byte one.
        while end > begin && data[end - 1] == 0 && k + 1 < starts.len() {
            end -= 1;
        }
        if end > begin {
            nals.push(&data[begin..end]);
        }
    }
    nals
}

impl Mp4Writer {
    /// Starts `path` (written as a temporary file until [`Mp4Writer::finish`]).
    pub fn create(path: &Path, width: u32, height: u32, fps: u32) -> Result<Mp4Writer> {
        if width == 0 || height == 0 || !width.is_multiple_of(2) || !height.is_multiple_of(2) {
            bail!("cannot encode {width}x{height} video: H.264 needs even, non-zero sides");
        }
        if fps == 0 {
            bail!("cannot encode video at 0 fps");
        }
        // Every frame must be kept (no frame skipping), so rate control is off
        // and quality is held by the quantiser range instead.
        let bps = ((width as u64 * height as u64 * fps as u64) / 4).clamp(200_000, 40_000_000);
        let config = EncoderConfig::new()
            .skip_frames(false)
            .bitrate(BitRate::from_bps(bps as u32))
            .max_frame_rate(FrameRate::from_hz(fps as f32))
            .rate_control_mode(RateControlMode::Off)
            .qp(QpRange::new(QP_MIN, QP_MAX));
        let encoder = Encoder::with_api_config(OpenH264API::from_source(), config)
            .map_err(|e| anyhow::anyhow!("cannot start the H.264 encoder: {e}"))?;
        let file = PartialFile::create(path)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let mut ftyp = Vec::new();
        ftyp.extend_from_slice(b"isom");
        be32(&mut ftyp, 0x200);
        for brand in [b"isom", b"iso2", b"avc1", b"mp41"] {
            ftyp.extend_from_slice(brand);
        }
        let ftyp = mp4_box(b"ftyp", &ftyp);
        out.write_all(&ftyp)
            .with_context(|| format!("cannot write {}", path.display()))?;
        // mdat with a 64-bit size, patched by finish().
        let mdat_header_at = ftyp.len() as u64;
        let mut mdat = Vec::new();
        be32(&mut mdat, 1);
        mdat.extend_from_slice(b"mdat");
        be64(&mut mdat, 0);
        out.write_all(&mdat)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Mp4Writer {
            path: path.to_owned(),
            out,
            encoder,
            width,
            height,
            fps,
            mdat_header_at,
            mdat_bytes: 16,
            sizes: Vec::new(),
            sync: Vec::new(),
            sps: None,
            pps: None,
            sample: Vec::new(),
        })
    }

    pub fn frames_written(&self) -> u32 {
        self.sizes.len() as u32
    }

    /// Encodes one frame.
    pub fn write(&mut self, frame: &Frame) -> Result<()> {
        if (frame.width, frame.height) != (self.width, self.height) {
            bail!(
                "frame {} is {}x{}, the video is {}x{}",
                self.sizes.len(),
                frame.width,
                frame.height,
                self.width,
                self.height
            );
        }
        self.write_rgb(&frame.rgb)
    }

    /// Encodes one RGB8 `[H,W,3]` frame.
    pub fn write_rgb(&mut self, rgb: &[u8]) -> Result<()> {
        let (w, h) = (self.width as usize, self.height as usize);
        if rgb.len() != w * h * 3 {
            bail!("frame has {} bytes, expected {}", rgb.len(), w * h * 3);
        }
        let yuv = YUVBuffer::from_rgb_source(RgbSliceU8::new(rgb, (w, h)));
        let index = self.sizes.len();
        let bitstream = self
            .encoder
            .encode(&yuv)
            .map_err(|e| anyhow::anyhow!("H.264 encoding of frame {index} failed: {e}"))?;
        self.sample.clear();
        let mut is_sync = false;
        for l in 0..bitstream.num_layers() {
            let Some(layer) = bitstream.layer(l) else {
                continue;
            };
            for n in 0..layer.nal_count() {
                let Some(unit) = layer.nal_unit(n) else {
                    continue;
                };
                for nal in annexb_nals(unit) {
                    match nal[0] & 0x1f {
                        NAL_SPS => {
                            self.sps.get_or_insert_with(|| nal.to_vec());
                        }
                        NAL_PPS => {
                            self.pps.get_or_insert_with(|| nal.to_vec());
                        }
                        kind => {
                            is_sync |= kind == NAL_IDR;
                            be32(&mut self.sample, nal.len() as u32);
                            self.sample.extend_from_slice(nal);
                        }
                    }
                }
            }
        }
        if self.sample.is_empty() {
            bail!("the H.264 encoder produced no picture for frame {index}");
        }
        self.out
            .write_all(&self.sample)
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        self.mdat_bytes += self.sample.len() as u64;
        self.sizes.push(self.sample.len() as u32);
        if is_sync {
            self.sync.push(self.sizes.len() as u32);
        }
        Ok(())
    }

    fn moov(&self) -> Result<Vec<u8>> {
        let (Some(sps), Some(pps)) = (&self.sps, &self.pps) else {
            bail!("the H.264 encoder produced no SPS/PPS");
        };
        if sps.len() < 4 {
            bail!("the H.264 encoder produced a malformed SPS");
        }
        let n = self.sizes.len() as u64;
        let media_timescale = self.fps * 1000;
        let delta = 1000u32;
        let media_duration = n * delta as u64;
        let movie_timescale = 1000u32;
        let movie_duration = n * 1000 / self.fps as u64;

        let mut mvhd = Vec::new();
        be32(&mut mvhd, 0);
        be32(&mut mvhd, 0);
        be32(&mut mvhd, movie_timescale);
        be32(&mut mvhd, movie_duration as u32);
        be32(&mut mvhd, 0x0001_0000);
        be16(&mut mvhd, 0x0100);
        mvhd.extend_from_slice(&[0; 10]);
        for m in UNITY_MATRIX {
            be32(&mut mvhd, m);
        }
        mvhd.extend_from_slice(&[0; 24]);
        be32(&mut mvhd, 2);
        let mvhd = full_box(b"mvhd", 0, 0, &mvhd);

        let mut tkhd = Vec::new();
        be32(&mut tkhd, 0);
        be32(&mut tkhd, 0);
        be32(&mut tkhd, 1);
        be32(&mut tkhd, 0);
        be32(&mut tkhd, movie_duration as u32);
        tkhd.extend_from_slice(&[0; 8]);
        be16(&mut tkhd, 0);
        be16(&mut tkhd, 0);
        be16(&mut tkhd, 0);
        be16(&mut tkhd, 0);
        for m in UNITY_MATRIX {
            be32(&mut tkhd, m);
        }
        be32(&mut tkhd, self.width << 16);
        be32(&mut tkhd, self.height << 16);
        let tkhd = full_box(b"tkhd", 0, 3, &tkhd);

        let mut mdhd = Vec::new();
        be32(&mut mdhd, 0);
        be32(&mut mdhd, 0);
        be32(&mut mdhd, media_timescale);
        be32(&mut mdhd, media_duration as u32);
        be16(&mut mdhd, 0x55c4); // "und"
        be16(&mut mdhd, 0);
        let mdhd = full_box(b"mdhd", 0, 0, &mdhd);

        let mut hdlr = Vec::new();
        be32(&mut hdlr, 0);
        hdlr.extend_from_slice(b"vide");
        hdlr.extend_from_slice(&[0; 12]);
        hdlr.extend_from_slice(b"kubewan video\0");
        let hdlr = full_box(b"hdlr", 0, 0, &hdlr);

        let vmhd = full_box(b"vmhd", 0, 1, &[0; 8]);
        let url = full_box(b"url ", 0, 1, &[]);
        let mut dref = Vec::new();
        be32(&mut dref, 1);
        dref.extend_from_slice(&url);
        let dinf = mp4_box(b"dinf", &full_box(b"dref", 0, 0, &dref));

        let mut avcc = vec![1, sps[1], sps[2], sps[3], 0xff, 0xe1];
        be16(&mut avcc, sps.len() as u16);
        avcc.extend_from_slice(sps);
        avcc.push(1);
        be16(&mut avcc, pps.len() as u16);
        avcc.extend_from_slice(pps);
        let avcc = mp4_box(b"avcC", &avcc);
        let mut avc1 = vec![0; 6];
        be16(&mut avc1, 1);
        avc1.extend_from_slice(&[0; 16]);
        be16(&mut avc1, self.width as u16);
        be16(&mut avc1, self.height as u16);
        be32(&mut avc1, 0x0048_0000);
        be32(&mut avc1, 0x0048_0000);
        be32(&mut avc1, 0);
        be16(&mut avc1, 1);
        let mut name = [0u8; 32];
        let label = b"kubewan H.264";
        name[0] = label.len() as u8;
        name[1..=label.len()].copy_from_slice(label);
        avc1.extend_from_slice(&name);
        be16(&mut avc1, 0x18);
        be16(&mut avc1, 0xffff);
        avc1.extend_from_slice(&avcc);
        let avc1 = mp4_box(b"avc1", &avc1);
        let mut stsd = Vec::new();
        be32(&mut stsd, 1);
        stsd.extend_from_slice(&avc1);
        let stsd = full_box(b"stsd", 0, 0, &stsd);

        let mut stts = Vec::new();
        be32(&mut stts, 1);
        be32(&mut stts, n as u32);
        be32(&mut stts, delta);
        let stts = full_box(b"stts", 0, 0, &stts);

        let mut stss = Vec::new();
        be32(&mut stss, self.sync.len() as u32);
        for s in &self.sync {
            be32(&mut stss, *s);
        }
        let stss = full_box(b"stss", 0, 0, &stss);

        let mut stsc = Vec::new();
        be32(&mut stsc, 1);
        be32(&mut stsc, 1);
        be32(&mut stsc, n as u32);
        be32(&mut stsc, 1);
        let stsc = full_box(b"stsc", 0, 0, &stsc);

        let mut stsz = Vec::new();
        be32(&mut stsz, 0);
        be32(&mut stsz, n as u32);
        for s in &self.sizes {
            be32(&mut stsz, *s);
        }
        let stsz = full_box(b"stsz", 0, 0, &stsz);

        let mut co64 = Vec::new();
        be32(&mut co64, 1);
        be64(&mut co64, self.mdat_header_at + 16);
        let co64 = full_box(b"co64", 0, 0, &co64);

        let stbl = mp4_box(b"stbl", &[stsd, stts, stss, stsc, stsz, co64].concat());
        let minf = mp4_box(b"minf", &[vmhd, dinf, stbl].concat());
        let mdia = mp4_box(b"mdia", &[mdhd, hdlr, minf].concat());
        let trak = mp4_box(b"trak", &[tkhd, mdia].concat());
        Ok(mp4_box(b"moov", &[mvhd, trak].concat()))
    }

    /// Writes the index, syncs, and renames the file into place. Returns the
    /// frame count. On any error the temporary file is removed.
    pub fn finish(self) -> Result<u32> {
        if self.sizes.is_empty() {
            bail!("no frames were written to {}", self.path.display());
        }
        let moov = self.moov()?;
        let cannot_write = || format!("cannot write {}", self.path.display());
        let mut out = self.out;
        out.write_all(&moov).with_context(cannot_write)?;
        let mut file = out
            .into_inner()
            .map_err(|e| anyhow::anyhow!("cannot write {}: {}", self.path.display(), e.error()))?;
        file.seek(SeekFrom::Start(self.mdat_header_at + 8))
            .and_then(|_| file.write_all(&self.mdat_bytes.to_be_bytes()))
            .with_context(cannot_write)?;
        file.commit()?;
        Ok(self.sizes.len() as u32)
    }
}

/// Decodes the frames of an H.264 MP4 one at a time.
pub struct Mp4Reader<R = BufReader<File>> {
    name: String,
    file: R,
    samples: Vec<(u64, u32)>,
    next: usize,
    decoder: Decoder,
    pub width: u32,
    pub height: u32,
    pub fps: f64,
    prefix: Vec<u8>,
    length_size: usize,
    pending: VecDeque<Frame>,
    flushed: bool,
    packet: Vec<u8>,
}

impl Mp4Reader {
    /// Opens the regular file `path` (a FIFO or device is refused).
    pub fn open(path: &Path) -> Result<Mp4Reader> {
        let file = open_regular(path).context("cannot open the video")?;
        let size = file.metadata()?.len();
        Mp4Reader::from_reader(BufReader::new(file), size, &path.display().to_string())
    }
}

impl<R: Read + Seek> Mp4Reader<R> {
    /// Reads the index of an MP4 of `size` bytes from `file` (`name` names it in errors).
    pub fn from_reader(mut file: R, size: u64, name: &str) -> Result<Mp4Reader<R>> {
        let index = read_index(&mut file, size)
            .map_err(|e| anyhow::anyhow!("{name} is not a readable MP4: {e}"))?;
        if index.width == 0
            || index.height == 0
            || u64::from(index.width) * u64::from(index.height) > MAX_FRAME_PIXELS
        {
            bail!(
                "{name}: the video is {}x{}; at most {MAX_FRAME_PIXELS} pixels a frame are read",
                index.width,
                index.height
            );
        }
        if let Some(&(_, len)) = index.samples.iter().find(|s| s.1 > MAX_SAMPLE_BYTES) {
            bail!("{name}: a frame of {len} bytes is more than the {MAX_SAMPLE_BYTES} read");
        }
        let mut prefix = Vec::new();
        for nal in &index.parameter_sets {
            prefix.extend_from_slice(&[0, 0, 0, 1]);
            prefix.extend_from_slice(nal);
        }
        let fps = if index.duration > 0 && !index.samples.is_empty() {
            index.samples.len() as f64 * f64::from(index.timescale.max(1)) / index.duration as f64
        } else {
            0.0
        };
        let decoder =
            Decoder::new().map_err(|e| anyhow::anyhow!("cannot start the H.264 decoder: {e}"))?;
        Ok(Mp4Reader {
            name: name.to_owned(),
            file,
            samples: index.samples,
            next: 0,
            decoder,
            width: index.width,
            height: index.height,
            fps,
            prefix,
            length_size: index.length_size,
            pending: VecDeque::new(),
            flushed: false,
            packet: Vec::new(),
        })
    }

    /// Frames (samples) in the file.
    pub fn frame_count(&self) -> usize {
        self.samples.len()
    }

    /// The decoded picture as RGB, refused when it is not the size the index gives.
    fn to_frame(
        name: &str,
        (width, height): (u32, u32),
        yuv: &openh264::decoder::DecodedYUV<'_>,
    ) -> Result<Frame> {
        let (w, h) = yuv.dimensions();
        if (w as u64, h as u64) != (u64::from(width), u64::from(height)) {
            bail!("{name}: a frame decodes to {w}x{h}, the video says {width}x{height}");
        }
        let mut rgb = vec![0; w * h * 3];
        yuv.write_rgb8(&mut rgb);
        Ok(Frame {
            width: w as u32,
            height: h as u32,
            rgb,
        })
    }

    /// The next decoded frame, or None after the last.
    pub fn next_frame(&mut self) -> Result<Option<Frame>> {
        loop {
            if let Some(f) = self.pending.pop_front() {
                return Ok(Some(f));
            }
            if self.next >= self.samples.len() {
                if !self.flushed {
                    self.flushed = true;
                    let rest = self
                        .decoder
                        .flush_remaining()
                        .map_err(|e| anyhow::anyhow!("{}: decoding failed: {e}", self.name))?;
                    let mut frames = Vec::with_capacity(rest.len());
                    for yuv in &rest {
                        frames.push(Self::to_frame(&self.name, (self.width, self.height), yuv)?);
                    }
                    self.pending.extend(frames);
                    continue;
                }
                return Ok(None);
            }
            let (offset, len) = self.samples[self.next];
            let index = self.next;
            self.next += 1;
            let mut data = vec![0; len as usize];
            self.file.seek(SeekFrom::Start(offset))?;
            self.file
                .read_exact(&mut data)
                .with_context(|| format!("{}: cannot read frame {index}", self.name))?;
            self.packet.clear();
            if index == 0 {
                self.packet.extend_from_slice(&self.prefix);
            }
            let mut pos = 0;
            while pos + self.length_size <= data.len() {
                let mut n = 0usize;
                for b in &data[pos..pos + self.length_size] {
                    n = (n << 8) | *b as usize;
                }
                pos += self.length_size;
                if pos + n > data.len() {
                    bail!("{}: frame {index} is corrupt", self.name);
                }
                self.packet.extend_from_slice(&[0, 0, 0, 1]);
                self.packet.extend_from_slice(&data[pos..pos + n]);
                pos += n;
            }
            let decoded = self.decoder.decode(&self.packet).map_err(|e| {
                anyhow::anyhow!("{}: frame {index} does not decode: {e}", self.name)
            })?;
            if let Some(yuv) = decoded {
                let frame = Self::to_frame(&self.name, (self.width, self.height), &yuv)?;
                self.pending.push_back(frame);
            }
        }
    }
}

/// Frame count and size of an MP4, decoding every frame (so a broken stream fails).
pub fn probe_video(path: &Path) -> Result<(usize, u32, u32)> {
    let mut reader = Mp4Reader::open(path)?;
    let mut count = 0;
    let (mut w, mut h) = (reader.width, reader.height);
    while let Some(f) = reader.next_frame()? {
        count += 1;
        (w, h) = (f.width, f.height);
    }
    Ok((count, w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32, t: u32) -> Frame {
        let mut f = Frame::new(w, h);
        for y in 0..h {
            for x in 0..w {
                let i = ((y * w + x) * 3) as usize;
                f.rgb[i] = ((x * 255) / w) as u8;
                f.rgb[i + 1] = ((y * 255) / h) as u8;
                f.rgb[i + 2] = ((t * 20) % 256) as u8;
            }
        }
        f
    }

    #[test]
    fn annexb_split_handles_3_and_4_byte_start_codes() {
        let data = [
            0, 0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x68, 3, 0, 0, 0, 1, 0x65, 4,
        ];
        let nals = annexb_nals(&data);
        assert_eq!(
            nals,
            vec![&[0x67, 1, 2][..], &[0x68, 3][..], &[0x65, 4][..]]
        );
    }

    #[test]
    fn round_trip_keeps_count_size_and_picture() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.mp4");
        let mut w = Mp4Writer::create(&path, 64, 48, 16).unwrap();
        let frames: Vec<Frame> = (0..20).map(|t| gradient(64, 48, t)).collect();
        for f in &frames {
            w.write(f).unwrap();
        }
        assert!(!path.exists(), "the MP4 must not appear before finish()");
        assert_eq!(w.finish().unwrap(), 20);
        let mut r = Mp4Reader::open(&path).unwrap();
        assert_eq!((r.width, r.height, r.frame_count()), (64, 48, 20));
        assert!((r.fps - 16.0).abs() < 1e-6, "{}", r.fps);
        let mut n = 0;
        while let Some(f) = r.next_frame().unwrap() {
            let diff: f64 = f
                .rgb
                .iter()
                .zip(&frames[n].rgb)
                .map(|(a, b)| (*a as f64 - *b as f64).abs())
                .sum::<f64>()
                / f.rgb.len() as f64;
            assert!(diff < 4.0, "frame {n} differs by {diff}");
            eprintln!("frame {n}: mean abs difference {diff:.2}");
            n += 1;
        }
        assert_eq!(n, 20);
    }

    #[test]
    fn an_unfinished_writer_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.mp4");
        let mut w = Mp4Writer::create(&path, 32, 32, 8).unwrap();
        w.write(&gradient(32, 32, 0)).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_truncated_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.mp4");
        let mut w = Mp4Writer::create(&path, 32, 32, 8).unwrap();
        for t in 0..5 {
            w.write(&gradient(32, 32, t)).unwrap();
        }
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = match Mp4Reader::open(&path) {
            Err(e) => e,
            Ok(mut r) => loop {
                match r.next_frame() {
                    Err(e) => break e,
                    Ok(None) => panic!("a truncated file decoded completely"),
                    Ok(Some(_)) => {}
                }
            },
        };
        assert!(err.to_string().contains("c.mp4"), "{err:#}");
    }
}
