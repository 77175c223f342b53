//! `cargo xtask test`, what CI runs: formatting, clippy for both targets, the build of the agent
//! and the test harnesses, `cargo test` with the agent's path for the integration tests, and
//! `vagrant validate`. The build and the tests use the `testing` profile
//! ([`release::TEST_PROFILE`]): release settings, the workspace's own crates at opt-level 0.

use std::{process::Command, time::Instant};

use anyhow::{Context as _, Result};
use clap::ValueEnum;

use crate::{clippy, cmd, release, setup};

/// The steps, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Step {
    /// `cargo fmt --all -- --check`.
    Fmt,
    /// Clippy for the host and for bpfel-unknown-none (`cargo xtask clippy`), here started in
    /// the background at the lowest CPU priority with its own target directory
    /// (`target/clippy`) while the build and the tests run, and waited for at the end
    /// ([`clippy::Background`]).
    Clippy,
    /// `cargo build --profile testing --workspace --exclude lb-ebpf --bins --tests`: the agent and
    /// every test harness in one cargo run, so that the two largest units (lb-agent's library and
    /// its unit-test harness) overlap on a small machine instead of running one after the other
    /// in two steps; `cargo test` then only runs. The `testing` profile (Cargo.toml) is the
    /// release profile with the workspace's own crates at opt-level 0: dependencies are built as
    /// shipped, and the code generation of the agent's library and harness, most of the build at
    /// opt-level 3, shrinks. Its outputs go to target/testing, so the release binaries in
    /// target/release (`cargo xtask demo`, `bench`) are never replaced by these.
    Build,
    /// `cargo test --profile testing --workspace --exclude lb-ebpf`, with `XDPLB_AGENT_BIN` set to
    /// the agent of that build. lb-ebpf's
    /// `#![no_main]` programs cannot link as host test binaries; the tests crate runs them
    /// through `test_run` instead (DESIGN.md, "Tests in three tiers").
    CargoTest,
    /// `vagrant validate` in vagrant/.
    Vagrant,
}

impl Step {
    fn title(self) -> &'static str {
        match self {
            Self::Fmt => "cargo fmt --check",
            Self::Clippy => "clippy",
            Self::Build => "build (profile `testing`: agent and test harnesses)",
            Self::CargoTest => "cargo test",
            Self::Vagrant => "vagrant validate",
        }
    }

    fn run(self, cargo_test_args: &[String]) -> Result<()> {
        match self {
            Self::Fmt => cmd::run(cmd::cargo().args(["fmt", "--all", "--", "--check"])),
            Self::Clippy => clippy::clippy(),
            Self::Build => cmd::run(cmd::cargo().args([
                "build",
                "--profile",
                release::TEST_PROFILE,
                "--workspace",
                "--exclude",
                "lb-ebpf",
                "--bins",
                "--tests",
            ])),
            Self::CargoTest => cmd::run(
                cmd::cargo()
                    .args(["test", "--profile", release::TEST_PROFILE])
                    .args(["--workspace", "--exclude", "lb-ebpf"])
                    .args(cargo_test_args)
                    .env(release::AGENT_BIN_ENV, release::test_agent_bin()),
            ),
            Self::Vagrant => vagrant_validate(),
        }
    }
}

/// Runs every step not in `skip`, in order, stopping at the first failure, which the error
/// names. `cargo_test_args` go to `cargo test` after its own arguments.
pub fn test(skip: &[Step], cargo_test_args: &[String]) -> Result<()> {
    setup::ensure_ready()?;
    let start = Instant::now();
    let mut background_clippy = None;
    for &step in Step::value_variants() {
        if skip.contains(&step) {
            println!("\n==> xtask test: {}: skipped (--skip)", step.title());
            continue;
        }
        if step == Step::Clippy {
            let dir = release::target_dir();
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let log = dir.join("clippy.log");
            println!(
                "\n==> xtask test: clippy: started in the background (nice 19, target/clippy, \
                 output in {}), waited for at the end",
                log.display()
            );
            background_clippy = Some(clippy::Background::spawn(&dir.join("clippy"), &log)?);
            continue;
        }
        println!("\n==> xtask test: {}", step.title());
        let step_start = Instant::now();
        step.run(cargo_test_args)
            .with_context(|| format!("xtask test: step `{}` failed", step.title()))?;
        println!(
            "==> xtask test: {}: passed in {:.0}s",
            step.title(),
            step_start.elapsed().as_secs_f64()
        );
    }
    if let Some(background) = background_clippy {
        println!("\n==> xtask test: clippy (waiting for the background passes)");
        background
            .wait()
            .context("xtask test: step `clippy` failed")?;
        println!("==> xtask test: clippy: passed");
    }
    println!(
        "\nxtask test: every step{} passed in {:.0}s",
        if skip.is_empty() { "" } else { " not skipped" },
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `vagrant validate` in vagrant/ (the provider blocks included: setup installs vagrant-libvirt);
/// skipped, with a note, where vagrant or a provider plugin could not be installed.
fn vagrant_validate() -> Result<()> {
    if cmd::find_in_path("vagrant").is_none() {
        println!(
            "note: skipping `vagrant validate`: vagrant is not installed, and `cargo xtask setup` \
             found no installable package for it here"
        );
        return Ok(());
    }
    let vagrant = || {
        let mut command = Command::new("vagrant");
        command
            .current_dir(cmd::workspace_root().join("vagrant"))
            .env("VAGRANT_CHECKPOINT_DISABLE", "1");
        command
    };
    let plugins =
        cmd::output(vagrant().args(["plugin", "list"])).context("listing vagrant's plugins")?;
    if !plugins
        .lines()
        .any(|line| line.starts_with("vagrant-libvirt "))
    {
        println!(
            "note: skipping `vagrant validate`: no provider plugin (vagrant-libvirt) is installed, \
             and `cargo xtask setup` found no installable package for it here"
        );
        return Ok(());
    }
    cmd::run(vagrant().arg("validate"))
}
