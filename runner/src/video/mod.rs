//! Video I/O without ffmpeg: H.264 (openh264) in MP4 (written by our own
//! streaming muxer, read by our defensive demuxer), frames as RGB8 `[H,W,3]`, and the
//! `[F,H,W,3]` f32 safetensors frame files (chain hand-off, `--out-frames`).

pub mod demux;
pub mod frames;
pub mod mp4;
pub mod stitch;

pub use frames::Frame;
pub use mp4::{Mp4Reader, Mp4Writer};
