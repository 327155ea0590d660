//! Progress reporting: indicatif bars in local mode, log lines in pods.

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// Where a stage reports its progress (frames, denoising steps).
pub trait Progress: Send + Sync {
    /// Starts a unit of work of `len` items (e.g. "denoise" with 40 steps).
    fn start(&self, what: &str, len: u64);
    fn inc(&self, n: u64);
    fn finish(&self);
}

/// No progress output.
pub struct Silent;

impl Progress for Silent {
    fn start(&self, _: &str, _: u64) {}
    fn inc(&self, _: u64) {}
    fn finish(&self) {}
}

/// One indicatif bar under a [`MultiProgress`], reused for each unit of work.
pub struct Bar {
    bar: ProgressBar,
}

impl Bar {
    pub fn new(multi: &MultiProgress) -> Bar {
        let bar = multi.add(ProgressBar::new(0));
        bar.set_style(
            ProgressStyle::with_template("  {msg:<24} [{bar:30}] {pos}/{len} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        Bar { bar }
    }
}

impl Progress for Bar {
    fn start(&self, what: &str, len: u64) {
        self.bar.reset();
        self.bar.set_length(len);
        self.bar.set_position(0);
        self.bar.set_message(what.to_owned());
    }
    fn inc(&self, n: u64) {
        self.bar.inc(n);
    }
    fn finish(&self) {
        self.bar.finish();
    }
}
