//! Memory quantities as Kubernetes writes them ("256Mi", "1.5G", "512e6",
//! "1073741824"), read as bytes: the runner holds a step to the pod's
//! declared `spec.runner.memoryLimit` with them, and validation refuses a
//! limit that is not one.

/// The binary and decimal suffixes Kubernetes accepts for quantities.
const SUFFIXES: [(&str, f64); 12] = [
    ("Ki", 1024.0),
    ("Mi", 1_048_576.0),
    ("Gi", 1_073_741_824.0),
    ("Ti", 1_099_511_627_776.0),
    ("Pi", 1_125_899_906_842_624.0),
    ("Ei", 1_152_921_504_606_846_976.0),
    ("k", 1e3),
    ("M", 1e6),
    ("G", 1e9),
    ("T", 1e12),
    ("P", 1e15),
    ("E", 1e18),
];

/// Bytes of a memory quantity (rounded up, as Kubernetes rounds a memory
/// quantity to whole bytes), or None when `text` is not a non-negative
/// quantity.
pub fn memory_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let (number, scale) = SUFFIXES
        .iter()
        .find_map(|(suffix, scale)| text.strip_suffix(suffix).map(|n| (n, *scale)))
        .unwrap_or((text, 1.0));
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
            && s.bytes().filter(|b| *b == b'.').count() <= 1
            && s != "."
    };
    // A decimal exponent ("5e3") is a form of its own, without a suffix.
    let (mantissa, exponent) = match number.split_once(['e', 'E']) {
        Some((m, e)) if scale == 1.0 => (m, e.parse::<i32>().ok()?),
        Some(_) => return None,
        None => (number, 0),
    };
    let mantissa = mantissa.strip_prefix('+').unwrap_or(mantissa);
    if !plain(mantissa) {
        return None;
    }
    let value = mantissa.parse::<f64>().ok()? * scale * 10f64.powi(exponent);
    (value.is_finite() && value < u64::MAX as f64).then(|| value.ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_memory_quantities_read_as_bytes() {
        assert_eq!(memory_bytes("256Mi"), Some(256 << 20));
        assert_eq!(memory_bytes("48Gi"), Some(48 << 30));
        assert_eq!(memory_bytes("1.5Gi"), Some(3 << 29));
        assert_eq!(memory_bytes("512M"), Some(512_000_000));
        assert_eq!(memory_bytes("1k"), Some(1000));
        assert_eq!(memory_bytes("129e6"), Some(129_000_000));
        assert_eq!(memory_bytes("1073741824"), Some(1 << 30));
        assert_eq!(memory_bytes(" 64Mi "), Some(64 << 20));
        for bad in [
            "", "Mi", "-1Gi", "1GB", "one", "1.2.3", "5e3Mi", "1 Gi", ".",
        ] {
            assert_eq!(memory_bytes(bad), None, "{bad:?}");
        }
    }
}
