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
            ProgressStyle::with_template(
                "  {msg:<24} [{bar:30}] step {pos}/{len} {elapsed} ETA {eta}",
            )
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

/// Progress as log lines (pods have no terminal): `what: step k/N, elapsed
/// 12.3s, ETA 45.6s`, for every item of up to [`LOG_EVERY_ITEM_UP_TO`] (a
/// denoising step can take minutes on a big model), else for every
/// fiftieth, so `kubectl logs` shows it without flooding.
#[derive(Default)]
pub struct LogProgress {
    state: std::sync::Mutex<LogState>,
}

/// Units of work up to this many items log every item.
pub const LOG_EVERY_ITEM_UP_TO: u64 = 50;

#[derive(Default)]
struct LogState {
    what: String,
    len: u64,
    done: u64,
    started: Option<std::time::Instant>,
}

/// `what: step k/N, elapsed E, ETA R`: the remaining time at the pace so far.
pub fn progress_line(what: &str, done: u64, len: u64, elapsed: f64) -> String {
    let eta = if done == 0 {
        "unknown".to_owned()
    } else {
        format!(
            "{:.1}s",
            elapsed / done as f64 * len.saturating_sub(done) as f64
        )
    };
    format!("{what}: step {done}/{len}, elapsed {elapsed:.1}s, ETA {eta}")
}

impl Progress for LogProgress {
    fn start(&self, what: &str, len: u64) {
        if let Ok(mut s) = self.state.lock() {
            *s = LogState {
                what: what.to_owned(),
                len,
                done: 0,
                started: Some(std::time::Instant::now()),
            };
        }
        tracing::info!("{}", progress_line(what, 0, len, 0.0));
    }
    fn inc(&self, n: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.done += n;
            let every = if s.len <= LOG_EVERY_ITEM_UP_TO {
                1
            } else {
                s.len.div_ceil(LOG_EVERY_ITEM_UP_TO)
            };
            if s.done.is_multiple_of(every) || s.done >= s.len {
                let elapsed = s.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
                tracing::info!("{}", progress_line(&s.what, s.done, s.len, elapsed));
            }
        }
    }
    fn finish(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_progress_line_has_the_step_elapsed_time_and_eta() {
        assert_eq!(
            progress_line("segment 0 denoise", 3, 40, 12.0),
            "segment 0 denoise: step 3/40, elapsed 12.0s, ETA 148.0s"
        );
        assert_eq!(
            progress_line("segment 0 denoise", 0, 40, 0.0),
            "segment 0 denoise: step 0/40, elapsed 0.0s, ETA unknown"
        );
    }
}
