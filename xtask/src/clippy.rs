//! `cargo xtask clippy`: clippy with `-D warnings` for both targets (DESIGN.md, "Lints"): the
//! workspace for the host (without lb-ebpf, whose `no_std` bins only build for BPF), and
//! lb-ebpf for bpfel-unknown-none with the pinned nightly.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, PoisonError},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{cmd, toolchain};

/// Runs both clippy passes, the second even when the first fails, and fails if either does
/// (the prerequisites must be there: see `setup::ensure_ready`).
pub fn clippy() -> Result<()> {
    // `--release`: the build scripts (ring's C code, lb-agent's build of lb-ebpf) and the
    // proc macros clippy compiles and runs are then the ones of the release build, which
    // `cargo xtask demo` and `bench` reuse, instead of a second set for the dev profile
    // (issue 8). The lints are the same: both branches of `cfg!(debug_assertions)` are
    // type-checked, and no item here is `#[cfg(debug_assertions)]`.
    let [(mut host, host_what), (mut bpf, bpf_what)] = passes(cmd::cargo, None);
    let host = cmd::run(&mut host).context(host_what);
    let bpf = cmd::run(&mut bpf).context(bpf_what);
    match (host, bpf) {
        (Err(_), Err(_)) => {
            bail!("clippy failed both for the host and for bpfel-unknown-none (lb-ebpf)")
        }
        (Err(err), Ok(())) | (Ok(()), Err(err)) => Err(err),
        (Ok(()), Ok(())) => Ok(()),
    }
}

/// The two passes (host, then bpfel), each a command made by `cargo` (plain `cargo`, or
/// `nice -n 19 cargo` for [`Background`]) with `target_dir` when given, and what it is.
fn passes(cargo: fn() -> Command, target_dir: Option<&Path>) -> [(Command, &'static str); 2] {
    let with_target = |command: &mut Command| {
        if let Some(dir) = target_dir {
            command.arg("--target-dir").arg(dir);
        }
    };
    let mut host = cargo();
    host.args(["clippy", "--release"]);
    with_target(&mut host);
    host.args([
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    let mut bpf = cargo();
    bpf.arg(format!("+{}", toolchain::ebpf())).arg("clippy");
    with_target(&mut bpf);
    bpf.args([
        "-p",
        "lb-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]);
    [
        (host, "clippy for the host"),
        (bpf, "clippy for bpfel-unknown-none (lb-ebpf)"),
    ]
}

/// `nice -n 19 cargo`, run from the workspace root without stdin: [`Background`]'s passes.
fn nice_cargo() -> Command {
    let mut command = Command::new("nice");
    command
        .args(["-n", "19", "cargo"])
        .current_dir(cmd::workspace_root())
        .stdin(Stdio::null());
    command
}

/// Both clippy passes running in the background at the lowest CPU priority, in a target
/// directory of their own, while `cargo xtask test` builds and runs the tests (issue 8: on a
/// two-core machine the build leaves a core idle through its long serial phases, and
/// the integration tests mostly wait on daemons; clippy fills that time instead of taking
/// 200 s of its own). Its own target directory because cargo locks a build directory for
/// the whole of a build; the eBPF objects that lb-agent's build script makes are shared
/// anyway (`<target>/ebpf`, see lb-agent/build.rs). Output goes to a log that [`wait`]
/// prints on failure. Dropped without [`wait`] (a foreground step failed), it kills the
/// running pass.
///
/// [`wait`]: Background::wait
pub struct Background {
    thread: Option<JoinHandle<Result<()>>>,
    running: Arc<Mutex<Option<Child>>>,
    aborted: Arc<Mutex<bool>>,
    log: PathBuf,
    start: Instant,
}

impl Background {
    /// Starts both passes; `target_dir` is clippy's own target directory, `log` gets their
    /// output.
    pub fn spawn(target_dir: &Path, log: &Path) -> Result<Self> {
        let file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let running: Arc<Mutex<Option<Child>>> = Arc::default();
        let aborted: Arc<Mutex<bool>> = Arc::default();
        let passes = passes(nice_cargo, Some(target_dir));
        let (run, stop) = (Arc::clone(&running), Arc::clone(&aborted));
        let thread = std::thread::spawn(move || -> Result<()> {
            let mut failed = Vec::new();
            for (mut command, what) in passes {
                let shown = format!("{command:?}");
                {
                    let mut slot = run.lock().unwrap_or_else(PoisonError::into_inner);
                    if *stop.lock().unwrap_or_else(PoisonError::into_inner) {
                        bail!("clippy stopped: a foreground step failed");
                    }
                    let child = command
                        .stdout(file.try_clone()?)
                        .stderr(file.try_clone()?)
                        .spawn()
                        .with_context(|| format!("could not start `{shown}`"))?;
                    *slot = Some(child);
                }
                // Poll, so that `abort` can take the lock and kill the child meanwhile.
                let status = loop {
                    let mut slot = run.lock().unwrap_or_else(PoisonError::into_inner);
                    let Some(child) = slot.as_mut() else {
                        bail!("clippy stopped: a foreground step failed");
                    };
                    if let Some(status) = child.try_wait()? {
                        *slot = None;
                        break status;
                    }
                    drop(slot);
                    std::thread::sleep(Duration::from_millis(200));
                };
                if !status.success() {
                    failed.push(format!("{what} ({status})"));
                }
            }
            if failed.is_empty() {
                Ok(())
            } else {
                Err(anyhow!("{} failed", failed.join(" and ")))
            }
        });
        Ok(Self {
            thread: Some(thread),
            running,
            aborted,
            log: log.to_owned(),
            start: Instant::now(),
        })
    }

    /// Waits for both passes; on failure prints their log and fails.
    pub fn wait(mut self) -> Result<()> {
        let thread = self.thread.take().expect("waited once");
        let result = thread
            .join()
            .map_err(|_| anyhow!("the clippy thread panicked"))?;
        println!(
            "clippy (background, log {}) ended after {:.0}s",
            self.log.display(),
            self.start.elapsed().as_secs_f64()
        );
        if result.is_err() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            println!("{text}");
        }
        result
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.thread.is_none() {
            return;
        }
        *self.aborted.lock().unwrap_or_else(PoisonError::into_inner) = true;
        let mut slot = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(mut child) = slot.take() {
            let _killed = child.kill();
            let _reaped = child.wait();
        }
    }
}
