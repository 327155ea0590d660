//! A panic is a bug, but it must still end in a report: the hook records
//! the panic's message and place (and lets the default hook print it), and
//! [`catch`] turns an unwinding panic into an error carrying that message, so
//! `run-task` writes its failure report (termination message) and exits 1,
//! and every other command prints one error line. Unwinding runs the
//! destructors on the way, so temporary files are removed as on any error.
//!
//! What this cannot cover: an allocation failure aborts the process without
//! unwinding (Rust's default; the hook to change it is unstable), and so do a
//! kill by the kernel's OOM killer or a signal. Those are kept from happening
//! by the limits and memory checks done before allocating, and `run-task`
//! writes a provisional failure report before it starts, which stays in
//! place if the process dies without replacing it.

use std::panic::{AssertUnwindSafe, PanicHookInfo};
use std::sync::Mutex;

static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Installs the hook that records each panic's message and place.
pub fn install_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(mut last) = LAST_PANIC.lock() {
            *last = Some(describe(info));
        }
        default(info);
    }));
}

fn describe(info: &PanicHookInfo<'_>) -> String {
    let payload = info
        .payload()
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| info.payload().downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    match info.location() {
        Some(at) => format!("{payload} (at {}:{})", at.file(), at.line()),
        None => payload,
    }
}

/// Runs `f`; a panic inside becomes `Err` with the recorded message.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|_| {
        let message = LAST_PANIC
            .lock()
            .ok()
            .and_then(|mut last| last.take())
            .unwrap_or_else(|| "no message".into());
        format!("the runner panicked (a bug in kubewan-runner): {message}")
    })
}
