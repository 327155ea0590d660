//! Every size limit of a TravelJob and of the runner's inputs, in one place.
//!
//! The limits keep each step inside a memory budget that can be computed
//! before anything is allocated (frames × height × width × 3 for a segment),
//! and keep the task JSON of any valid job small enough to travel in one
//! environment variable (Linux caps one `NAME=value` string at 128 KiB,
//! `MAX_ARG_STRLEN`): [`MAX_TASK_BYTES`], proven by a test that plans the
//! largest job these limits allow.
//!
//! The CRD schema carries them where OpenAPI can (`maximum`, `maxLength`,
//! `maxItems`: see `spec.rs`); [`crate::validate`] enforces all of them, for
//! the operator and for local mode alike; the runner's developer commands use
//! the same checks ([`check_frames`], [`check_size`], [`check_text`]...).

/// Keyframes per job (so at most 31 segments).
pub const MAX_KEYFRAMES: usize = 32;
/// Frames per segment (Wan2.1 makes 81; 241 is 15 s at 16 fps).
pub const MAX_FRAMES: u32 = 241;
/// The longest side of the output video, in pixels.
pub const MAX_SIDE: u32 = 2048;
/// Pixels of one output frame (1920×1088, 1080p snapped to 16).
pub const MAX_FRAME_PIXELS: u64 = 1920 * 1088;
/// The smallest side of the output video (one 16-pixel VAE/patch cell).
pub const MIN_SIDE: u32 = 16;
/// Denoising steps per segment.
pub const MAX_STEPS: u32 = 1000;
/// Frames per second of the output video.
pub const MAX_FPS: u32 = 120;
/// Retries per pod.
pub const MAX_BACKOFF_LIMIT: u32 = 20;
/// Tokens the VLM may write per prompt.
pub const MAX_NEW_TOKENS: u32 = 4096;
/// Bytes of the overall prompt and of each segment's prompt (UMT5 reads at
/// most 512 tokens, about 2000 characters of English; 1 KiB keeps the task
/// of 31 segments under [`MAX_TASK_BYTES`]).
pub const MAX_PROMPT_BYTES: usize = 1024;
/// Bytes of the negative prompt (held once per task).
pub const MAX_NEGATIVE_PROMPT_BYTES: usize = 2048;
/// Bytes of the text a VLM request may carry (instruction + prompt); the
/// attention over it grows with its square.
pub const MAX_VLM_PROMPT_BYTES: usize = 8192;
/// Bytes of a path in the spec (keyframes, model folders, the output prefix).
pub const MAX_PATH_BYTES: usize = 256;
/// Pixels of a keyframe or image file, read from its header before decoding
/// (decoded as RGBA8 that is 160 MB).
pub const MAX_IMAGE_PIXELS: u64 = 40_000_000;
/// The longest side of a keyframe or image file.
pub const MAX_IMAGE_SIDE: u32 = 16384;
/// Pixels of one image the VLM sees (its vision tower attends over all of
/// its 14×14 patches: 16384 patches at most).
pub const MAX_VLM_IMAGE_PIXELS: u64 = 16384 * 14 * 14;
/// Bytes of a job file read by local mode.
pub const MAX_JOB_FILE_BYTES: u64 = 1 << 20;
/// Bytes of the task JSON: what fits in `KUBEWAN_TASK=<json>` under Linux's
/// 128 KiB limit on one environment string (terminating NUL included).
pub const MAX_TASK_BYTES: usize = 128 * 1024 - 1 - "KUBEWAN_TASK=".len();
/// Kubernetes object names (DNS subdomain) and namespaces (DNS label).
pub const MAX_NAME_BYTES: usize = 253;
pub const MAX_NAMESPACE_BYTES: usize = 63;

/// Frames of one segment: 5 to [`MAX_FRAMES`].
pub fn check_frames(frames: u32) -> Result<(), String> {
    if (5..=MAX_FRAMES).contains(&frames) {
        Ok(())
    } else {
        Err(format!("must be between 5 and {MAX_FRAMES}, got {frames}"))
    }
}

/// A video size: each side [`MIN_SIDE`] to [`MAX_SIDE`], at most [`MAX_FRAME_PIXELS`].
pub fn check_size(width: u32, height: u32) -> Result<(), String> {
    let sides = MIN_SIDE..=MAX_SIDE;
    if !sides.contains(&width) || !sides.contains(&height) {
        return Err(format!(
            "{width}x{height}: each side must be between {MIN_SIDE} and {MAX_SIDE} pixels"
        ));
    }
    if u64::from(width) * u64::from(height) > MAX_FRAME_PIXELS {
        return Err(format!(
            "{width}x{height} has more than {MAX_FRAME_PIXELS} pixels (1920x1088)"
        ));
    }
    Ok(())
}

/// An image file's size, from its header: at most [`MAX_IMAGE_SIDE`] a side
/// and [`MAX_IMAGE_PIXELS`] in all, and not empty.
pub fn check_image_size(width: u32, height: u32) -> Result<(), String> {
    if width == 0 || height == 0 {
        return Err(format!("is {width}x{height}: an empty image"));
    }
    if width > MAX_IMAGE_SIDE
        || height > MAX_IMAGE_SIDE
        || u64::from(width) * u64::from(height) > MAX_IMAGE_PIXELS
    {
        return Err(format!(
            "is {width}x{height}: images may have at most {MAX_IMAGE_SIDE} pixels a side and \
             {MAX_IMAGE_PIXELS} in all"
        ));
    }
    Ok(())
}

/// Text of at most `max_bytes` bytes with no control characters but newline
/// and tab (they would be escaped to up to 6 bytes in the task JSON).
pub fn check_text(text: &str, max_bytes: usize) -> Result<(), String> {
    if text.len() > max_bytes {
        return Err(format!(
            "is {} bytes long, at most {max_bytes} are allowed",
            text.len()
        ));
    }
    if let Some(c) = text
        .chars()
        .find(|c| c.is_control() && !matches!(c, '\n' | '\t'))
    {
        return Err(format!(
            "contains the control character {:?}; only newlines and tabs are allowed",
            c
        ));
    }
    Ok(())
}

/// A classifier-free guidance scale: a finite number, 0 or more.
pub fn check_guidance(scale: f64) -> Result<(), String> {
    if scale.is_finite() && scale >= 0.0 {
        Ok(())
    } else {
        Err(format!("must be a non-negative number, got {scale}"))
    }
}

/// Denoising steps: 1 to [`MAX_STEPS`].
pub fn check_steps(steps: u32) -> Result<(), String> {
    if (1..=MAX_STEPS).contains(&steps) {
        Ok(())
    } else {
        Err(format!("must be between 1 and {MAX_STEPS}, got {steps}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_frames_and_texts_are_bounded() {
        assert!(check_size(1920, 1088).is_ok());
        assert!(check_size(2048, 1088).unwrap_err().contains("pixels"));
        assert!(check_size(0, 480).unwrap_err().contains("between 16"));
        assert!(check_size(100000, 100000).is_err());
        assert!(check_frames(4_000_000_001u64 as u32).is_err());
        assert!(check_frames(241).is_ok() && check_frames(4).is_err());
        assert!(check_text("a\ttab\nand a line", 100).is_ok());
        assert!(
            check_text("bell\u{7}", 100)
                .unwrap_err()
                .contains("control")
        );
        assert!(
            check_text(&"x".repeat(101), 100)
                .unwrap_err()
                .contains("101 bytes")
        );
        assert!(check_guidance(f64::NAN).is_err() && check_guidance(-1.0).is_err());
        assert!(check_image_size(20000, 20000).is_err());
        assert!(check_image_size(0, 10).unwrap_err().contains("empty"));
        assert!(check_steps(0).is_err() && check_steps(1001).is_err());
    }
}
