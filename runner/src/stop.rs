//! Stopping on SIGTERM and SIGINT. In a container the runner is PID 1, and
//! the kernel delivers no signal to PID 1 that it has no handler for: without
//! this, deleting a pod (a suspended job, a deleted job, a drained node) waits
//! the whole grace period while the runner computes on, holding its GPU, until
//! the kubelet's SIGKILL.
//!
//! The signals are blocked in every thread and taken by one thread with
//! `sigwait`, so what it does on the way out need not be async-signal-safe:
//! it removes the temporary files being written ([`track`]), says which signal
//! stopped the run, and exits with 128 + the signal's number, as a shell does.
//! `run-task`'s provisional failure report stays as the pod's termination
//! message.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

static BEING_WRITTEN: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// Records a temporary file to remove if a signal stops the run.
pub fn track(tmp: &Path) {
    if let Ok(mut files) = BEING_WRITTEN.lock() {
        files.insert(tmp.to_owned());
    }
}

/// Forgets a temporary file: renamed into place or removed.
pub fn untrack(tmp: &Path) {
    if let Ok(mut files) = BEING_WRITTEN.lock() {
        files.remove(tmp);
    }
}

/// Starts the thread that stops the process on SIGTERM or SIGINT. Call it
/// first in `main`, before any other thread exists: threads inherit the
/// blocked set, so the signals reach only that thread.
pub fn on_termination_signals() {
    // SAFETY: sigset_t is plain data that sigemptyset initialises; the calls
    // only read and write that set and this thread's signal mask.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::Builder::new()
        .name("stop-on-signal".into())
        .spawn(move || {
            let mut signal = 0;
            // SAFETY: `set` is initialised above; sigwait writes one c_int.
            while unsafe { libc::sigwait(&set, &mut signal) } != 0 {}
            stop(signal)
        })
        .expect("cannot start the signal thread");
}

fn stop(signal: libc::c_int) -> ! {
    // Held until exit, so no file is tracked or renamed in between.
    let files = BEING_WRITTEN.lock().unwrap_or_else(|e| e.into_inner());
    for tmp in files.iter() {
        let _ = std::fs::remove_file(tmp);
    }
    let name = if signal == libc::SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    };
    eprintln!("kubewan-runner: stopped by {name} before finishing");
    std::process::exit(128 + signal)
}
