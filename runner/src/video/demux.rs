//! A small, defensive MP4 demuxer: the index of the first H.264 video track
//! (its size, timing, parameter sets and where each sample lies), read from a
//! file that may be corrupt or hostile (segments come from a shared volume).
//!
//! Every box size is checked against its parent before it is used, every
//! offset with checked arithmetic, every count against the bytes that must
//! hold it; the `moov` box is read into memory only up to [`MAX_MOOV_BYTES`],
//! the sample count is capped at [`MAX_SAMPLES`], and every loop advances by
//! at least one box header, so any input ends in an index or in an error
//! naming what is wrong, never in a panic, a hang or an unbounded allocation.
//! It reads the layout our writer produces and the usual variants of other
//! muxers (`stco` or `co64`, several chunks, 32- or 64-bit box sizes,
//! version 0 or 1 `mdhd`).

use std::io::{Read, Seek, SeekFrom};

/// The largest `moov` box read (an hour of 60 fps video indexes in ~3 MB).
pub const MAX_MOOV_BYTES: u64 = 64 << 20;
/// The most samples (frames) a track may have.
pub const MAX_SAMPLES: u64 = 1 << 20;
/// The most top-level boxes looked at (real files have a handful).
const MAX_TOP_LEVEL_BOXES: usize = 1024;

/// What the reader needs to decode the first H.264 video track.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackIndex {
    pub width: u32,
    pub height: u32,
    pub timescale: u32,
    pub duration: u64,
    /// Bytes of each NAL unit's length prefix (1, 2 or 4).
    pub length_size: usize,
    /// Sequence and picture parameter sets, without start codes.
    pub parameter_sets: Vec<Vec<u8>>,
    /// Each sample's offset in the file and size, checked to lie inside it.
    pub samples: Vec<(u64, u32)>,
}

/// Why a file is not a usable MP4.
pub type DemuxError = String;

/// A box: its four-character type and payload.
struct Mp4Box<'a> {
    kind: [u8; 4],
    payload: &'a [u8],
}

/// The boxes inside `data`, each checked to fit.
fn boxes(data: &[u8]) -> impl Iterator<Item = Result<Mp4Box<'_>, DemuxError>> {
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let parsed = split_box(rest);
        match parsed {
            Ok((b, tail)) => {
                rest = tail;
                Some(Ok(b))
            }
            Err(e) => {
                rest = &[];
                Some(Err(e))
            }
        }
    })
}

fn split_box(data: &[u8]) -> Result<(Mp4Box<'_>, &[u8]), DemuxError> {
    if data.len() < 8 {
        return Err(format!(
            "{} stray bytes where a box should start",
            data.len()
        ));
    }
    let size32 = be_u32(data, 0)?;
    let kind: [u8; 4] = data[4..8].try_into().map_err(|_| "short box type")?;
    let (size, header) = match size32 {
        0 => (data.len() as u64, 8),
        1 => (be_u64(data, 8)?, 16),
        n => (u64::from(n), 8),
    };
    if size < header as u64 || size > data.len() as u64 {
        return Err(format!(
            "box {} claims {size} bytes, {} are left",
            fourcc(&kind),
            data.len()
        ));
    }
    let size = size as usize;
    Ok((
        Mp4Box {
            kind,
            payload: &data[header..size],
        },
        &data[size..],
    ))
}

fn fourcc(kind: &[u8; 4]) -> String {
    kind.iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '?'
            }
        })
        .collect()
}

fn be_u16(data: &[u8], at: usize) -> Result<u16, DemuxError> {
    data.get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or_else(|| "a box is shorter than its fields".into())
}

fn be_u32(data: &[u8], at: usize) -> Result<u32, DemuxError> {
    data.get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| "a box is shorter than its fields".into())
}

fn be_u64(data: &[u8], at: usize) -> Result<u64, DemuxError> {
    data.get(at..at + 8)
        .map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
        .ok_or_else(|| "a box is shorter than its fields".into())
}

/// The first child of `data` of type `kind`.
fn child<'a>(data: &'a [u8], kind: &[u8; 4]) -> Result<&'a [u8], DemuxError> {
    for b in boxes(data) {
        let b = b?;
        if &b.kind == kind {
            return Ok(b.payload);
        }
    }
    Err(format!("no {} box", fourcc(kind)))
}

/// Reads the index of the first H.264 video track of a file of `file_len` bytes.
pub fn read_index<R: Read + Seek>(reader: &mut R, file_len: u64) -> Result<TrackIndex, DemuxError> {
    let moov = read_moov(reader, file_len)?;
    let mut last_err = "no video track".to_string();
    for b in boxes(&moov) {
        let b = b?;
        if &b.kind != b"trak" {
            continue;
        }
        match video_track(b.payload, file_len) {
            Ok(Some(track)) => return Ok(track),
            Ok(None) => {}
            Err(e) => last_err = e,
        }
    }
    Err(last_err)
}

/// Finds the top-level `moov` box and reads its payload.
fn read_moov<R: Read + Seek>(reader: &mut R, file_len: u64) -> Result<Vec<u8>, DemuxError> {
    let io = |e: std::io::Error| format!("cannot read: {e}");
    let mut pos = 0u64;
    for _ in 0..MAX_TOP_LEVEL_BOXES {
        if pos >= file_len {
            break;
        }
        let left = file_len - pos;
        if left < 8 {
            return Err(format!("{left} stray bytes at the end"));
        }
        reader.seek(SeekFrom::Start(pos)).map_err(io)?;
        let mut header = [0u8; 16];
        let want = if left >= 16 { 16 } else { 8 };
        reader.read_exact(&mut header[..want]).map_err(io)?;
        let kind: [u8; 4] = header[4..8].try_into().map_err(|_| "short box type")?;
        let (size, header_len) = match be_u32(&header, 0)? {
            0 => (left, 8),
            1 if want == 16 => (be_u64(&header, 8)?, 16),
            1 => return Err("a 64-bit box size is cut off".into()),
            n => (u64::from(n), 8),
        };
        if size < header_len || size > left {
            return Err(format!(
                "box {} at byte {pos} claims {size} bytes, {left} are left",
                fourcc(&kind)
            ));
        }
        if &kind == b"moov" {
            let len = size - header_len;
            if len > MAX_MOOV_BYTES {
                return Err(format!(
                    "its index (moov) is {len} bytes, more than {MAX_MOOV_BYTES}"
                ));
            }
            reader.seek(SeekFrom::Start(pos + header_len)).map_err(io)?;
            let mut moov = vec![0u8; len as usize];
            reader.read_exact(&mut moov).map_err(io)?;
            return Ok(moov);
        }
        pos += size;
    }
    Err("no index (moov box): not an MP4, or an unfinished one".into())
}

/// The index of `trak` when it is an H.264 video track (None for other tracks).
fn video_track(trak: &[u8], file_len: u64) -> Result<Option<TrackIndex>, DemuxError> {
    let mdia = child(trak, b"mdia")?;
    let hdlr = child(mdia, b"hdlr")?;
    if hdlr.get(8..12) != Some(b"vide") {
        return Ok(None);
    }
    let mdhd = child(mdia, b"mdhd")?;
    let (timescale, duration) = match mdhd.first() {
        Some(1) => (be_u32(mdhd, 20)?, be_u64(mdhd, 24)?),
        Some(0) => (be_u32(mdhd, 12)?, u64::from(be_u32(mdhd, 16)?)),
        _ => return Err("unknown mdhd version".into()),
    };
    let stbl = child(child(mdia, b"minf")?, b"stbl")?;
    let avc = avc_entry(child(stbl, b"stsd")?)?;
    let samples = sample_table(stbl, file_len)?;
    Ok(Some(TrackIndex {
        width: avc.width,
        height: avc.height,
        timescale,
        duration,
        length_size: avc.length_size,
        parameter_sets: avc.parameter_sets,
        samples,
    }))
}

/// What the `avc1` sample entry gives: width, height, NAL length size, parameter sets.
struct AvcEntry {
    width: u32,
    height: u32,
    length_size: usize,
    parameter_sets: Vec<Vec<u8>>,
}

/// The first sample entry of `stsd`, which must be `avc1`/`avc3` with an `avcC`.
fn avc_entry(stsd: &[u8]) -> Result<AvcEntry, DemuxError> {
    let entries = stsd.get(8..).ok_or("stsd is too short")?;
    let entry = boxes(entries).next().ok_or("stsd has no sample entry")??;
    if !matches!(&entry.kind, b"avc1" | b"avc3") {
        return Err(format!(
            "the video track is {}, not H.264 (avc1)",
            fourcc(&entry.kind)
        ));
    }
    // A visual sample entry: 78 bytes of fields, then boxes (avcC among them).
    const VISUAL_ENTRY: usize = 78;
    let width = u32::from(be_u16(entry.payload, 24)?);
    let height = u32::from(be_u16(entry.payload, 26)?);
    let avcc = child(
        entry
            .payload
            .get(VISUAL_ENTRY..)
            .ok_or("avc1 is too short")?,
        b"avcC",
    )?;
    let length_size = usize::from(*avcc.get(4).ok_or("avcC is too short")? & 3) + 1;
    if length_size == 3 {
        return Err("avcC gives 3-byte NAL lengths, which H.264 does not allow".into());
    }
    let mut sets = Vec::new();
    let mut at = 5;
    for mask in [0x1f, 0xff] {
        let count = *avcc.get(at).ok_or("avcC is cut off")? & mask;
        at += 1;
        for _ in 0..count {
            let len = usize::from(be_u16(avcc, at)?);
            let set = avcc.get(at + 2..at + 2 + len).ok_or("avcC is cut off")?;
            sets.push(set.to_vec());
            at += 2 + len;
        }
    }
    if sets.is_empty() {
        return Err("avcC has no parameter sets".into());
    }
    Ok(AvcEntry {
        width,
        height,
        length_size,
        parameter_sets: sets,
    })
}

/// Every sample's (offset, size): `stsz` sizes laid out in the chunks of
/// `stco`/`co64` as `stsc` distributes them.
fn sample_table(stbl: &[u8], file_len: u64) -> Result<Vec<(u64, u32)>, DemuxError> {
    let stsz = child(stbl, b"stsz")?;
    let constant = be_u32(stsz, 4)?;
    let count = u64::from(be_u32(stsz, 8)?);
    if count > MAX_SAMPLES || count > file_len {
        return Err(format!("{count} samples is more than the file can hold"));
    }
    let size_of = |i: usize| -> Result<u32, DemuxError> {
        if constant != 0 {
            Ok(constant)
        } else {
            be_u32(stsz, 12 + 4 * i)
        }
    };
    let chunk_offsets: Vec<u64> = match child(stbl, b"co64") {
        Ok(co64) => table(co64, 8, be_u64)?,
        Err(_) => table(child(stbl, b"stco")?, 4, |d, at| {
            be_u32(d, at).map(u64::from)
        })?,
    };
    // stsc: runs of chunks with the same number of samples.
    let runs: Vec<(u64, u64)> = table(child(stbl, b"stsc")?, 12, |d, at| {
        Ok((u64::from(be_u32(d, at)?), u64::from(be_u32(d, at + 4)?)))
    })?;
    let mut samples = Vec::with_capacity(count as usize);
    for (k, &(first_chunk, per_chunk)) in runs.iter().enumerate() {
        let end_chunk = runs
            .get(k + 1)
            .map_or(chunk_offsets.len() as u64 + 1, |r| r.0);
        if first_chunk == 0 || end_chunk < first_chunk {
            return Err("stsc's chunk runs are out of order".into());
        }
        for chunk in first_chunk..end_chunk {
            let mut offset = *chunk_offsets
                .get((chunk - 1) as usize)
                .ok_or("stsc names a chunk that stco does not have")?;
            for _ in 0..per_chunk {
                if samples.len() as u64 == count {
                    break;
                }
                let size = size_of(samples.len())?;
                let end = offset
                    .checked_add(u64::from(size))
                    .filter(|&end| end <= file_len)
                    .ok_or_else(|| {
                        format!(
                            "truncated: frame {} lies beyond its end ({file_len} bytes)",
                            samples.len()
                        )
                    })?;
                samples.push((offset, size));
                offset = end;
            }
        }
    }
    if samples.len() as u64 != count {
        return Err(format!(
            "the chunk tables place {} of its {count} frames",
            samples.len()
        ));
    }
    Ok(samples)
}

/// A full box holding a 32-bit entry count and entries of `width` bytes.
fn table<T>(
    data: &[u8],
    width: usize,
    entry: impl Fn(&[u8], usize) -> Result<T, DemuxError>,
) -> Result<Vec<T>, DemuxError> {
    let count = be_u32(data, 4)? as usize;
    if count > (data.len().saturating_sub(8)) / width {
        return Err(format!(
            "a table claims {count} entries, more than its box holds"
        ));
    }
    (0..count).map(|i| entry(data, 8 + i * width)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_that_do_not_fit_are_errors_not_panics() {
        // claims 100 bytes in a 12-byte buffer
        let data = [0, 0, 0, 100, b'm', b'o', b'o', b'v', 0, 0, 0, 0];
        assert!(boxes(&data).next().unwrap().is_err());
        // a size smaller than its header would loop forever if trusted
        let data = [0, 0, 0, 4, b'f', b'r', b'e', b'e'];
        assert!(boxes(&data).next().unwrap().is_err());
        let mut cursor = std::io::Cursor::new(data.to_vec());
        assert!(read_index(&mut cursor, 8).is_err());
        assert!(read_index(&mut std::io::Cursor::new(Vec::new()), 0).is_err());
    }

    #[test]
    fn a_table_cannot_claim_more_entries_than_it_holds() {
        let data = [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1];
        let err = table(&data, 4, be_u32).unwrap_err();
        assert!(err.contains("more than its box holds"), "{err}");
    }
}
