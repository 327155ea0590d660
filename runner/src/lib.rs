//! kubewan's pod runner: checkpoints, memory probe, reports, MP4 I/O, the
//! pipeline stages and local mode. The binary `kubewan-runner` is a thin CLI
//! over these modules.

pub mod admission;
pub mod bench;
pub mod ckpts;
pub mod fsutil;
pub mod fuzzing;
pub mod local;
pub mod logging;
pub mod memplot;
pub mod panics;
pub mod preview;
pub mod probe;
pub mod progress;
pub mod report;
pub mod stages;
pub mod stop;
pub mod task;
pub mod tiny;
pub mod video;
pub mod video_cli;
pub mod vlm_cli;
pub mod vram;

/// Exit code of a run that failed (bad input, failed stage).
pub const EXIT_FAILURE: i32 = 1;
