//! `cargo xtask clippy`: clippy with `-D warnings` for both targets (DESIGN.md, "Lints"): the
//! workspace for the host (without lb-ebpf, whose `no_std` bins only build for BPF), and
//! lb-ebpf for bpfel-unknown-none with the pinned nightly.

use anyhow::{Context as _, Result, bail};

use crate::{cmd, toolchain};

/// Runs both clippy passes, the second even when the first fails, and fails if either does
/// (the prerequisites must be there: see `setup::ensure_ready`).
pub fn clippy() -> Result<()> {
    // `--release`: the build scripts (ring's C code, lb-agent's build of lb-ebpf) and the
    // proc macros clippy compiles and runs are then the ones of the release build, which
    // reuses them (`cargo xtask test` runs clippy first), instead of a second set for the
    // dev profile (issue 8). The lints are the same: both branches of `cfg!(debug_assertions)`
    // are type-checked, and no item here is `#[cfg(debug_assertions)]`.
    let host = cmd::run(cmd::cargo().args([
        "clippy",
        "--release",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy for the host");
    let bpf = cmd::run(cmd::cargo().arg(format!("+{}", toolchain::ebpf())).args([
        "clippy",
        "-p",
        "lb-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy for bpfel-unknown-none (lb-ebpf)");
    match (host, bpf) {
        (Err(_), Err(_)) => {
            bail!("clippy failed both for the host and for bpfel-unknown-none (lb-ebpf)")
        }
        (Err(err), Ok(())) | (Ok(()), Err(err)) => Err(err),
        (Ok(()), Ok(())) => Ok(()),
    }
}
