//! Replays the kept fuzz corpus (`fuzz/corpus/<target>/`) through the same
//! entry points the fuzz targets call (`kubewan_runner::fuzzing`), on
//! stable, so CI checks every kept input: each must return (an error is
//! fine) without a panic, within a time limit.

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kubewan_runner::fuzzing::TARGETS;

/// A kept input taking longer has hung (each takes milliseconds).
const TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn every_kept_fuzz_input_returns_without_a_panic_or_a_hang() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (target, entry) in TARGETS {
        let dir = corpus.join(target);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .flatten()
            .map(|e| e.path())
            .collect();
        inputs.sort();
        assert!(
            !inputs.is_empty(),
            "no corpus for {target} in {}",
            dir.display()
        );
        for input in inputs {
            let data = std::fs::read(&input).unwrap();
            let entry = *entry;
            let (done, finished) = mpsc::channel();
            let start = Instant::now();
            std::thread::spawn(move || {
                let outcome = std::panic::catch_unwind(|| entry(&data));
                let _ = done.send(outcome.is_ok());
            });
            let name = format!("{target}/{}", input.file_name().unwrap().to_string_lossy());
            match finished.recv_timeout(TIMEOUT) {
                Ok(true) => {}
                Ok(false) => failures.push(format!("{name}: panicked")),
                Err(_) => failures.push(format!("{name}: still running after {TIMEOUT:?}")),
            }
            eprintln!("{name}: {:.3}s", start.elapsed().as_secs_f64());
            replayed += 1;
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("{replayed} kept inputs replayed");
}
