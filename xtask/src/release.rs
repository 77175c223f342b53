//! Release builds, and the tasks that run the tests crate's binaries (`demo`, `bench`) with
//! `XDPLB_AGENT_BIN` pointing at the agent they drive.

use std::{env, path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{apt, cmd, setup};

/// The variable through which the integration tests, the demo and the benchmarks find lb-agent.
pub const AGENT_BIN_ENV: &str = "XDPLB_AGENT_BIN";

/// The packages whose binaries `demo` and `bench` need.
const DEMO_PACKAGES: &[&str] = &["lb-agent", "xdplb-tests"];

/// Cargo's target directory: `$CARGO_TARGET_DIR` (relative to the workspace root), else `target`.
fn target_dir() -> PathBuf {
    let root = cmd::workspace_root();
    env::var_os("CARGO_TARGET_DIR")
        .filter(|dir| !dir.is_empty())
        .map_or_else(|| root.join("target"), |dir| root.join(dir))
}

/// The path of release binary `name` (absolute).
pub fn release_bin(name: &str) -> PathBuf {
    target_dir().join("release").join(name)
}

/// The release lb-agent binary: the value of [`AGENT_BIN_ENV`].
pub fn agent_bin() -> PathBuf {
    release_bin("lb-agent")
}

/// `cargo build --release -p P... --bins`.
pub fn build(packages: &[&str]) -> Result<()> {
    let mut build = cmd::cargo();
    build.args(["build", "--release"]);
    for package in packages {
        build.args(["-p", package]);
    }
    cmd::run(build.arg("--bins"))
}

/// `cargo xtask demo`: build, then run `xdplb-demo ARGS`.
pub fn demo(args: &[String]) -> Result<()> {
    setup::ensure_ready()?;
    build(DEMO_PACKAGES).context("building the agent and the demo")?;
    run_with_agent("xdplb-demo", args)
}

/// `cargo xtask bench WHAT`: build, then run `xdplb-bench WHAT ARGS`. For `l7`, first
/// installs haproxy, nginx and wrk from Debian when missing ([`apt::ensure_bench_l7`]); for
/// `xdp`, clang and llvm to build Katran ([`apt::ensure_bench_xdp`]).
pub fn bench(what: &str, args: &[String]) -> Result<()> {
    setup::ensure_ready()?;
    if what == "l7" {
        apt::ensure_bench_l7().context("installing what `bench l7` compares with")?;
    }
    if what == "xdp" {
        apt::ensure_bench_xdp().context("installing what `bench xdp` builds Katran with")?;
    }
    build(DEMO_PACKAGES).context("building the agent and the benchmarks")?;
    let args: Vec<String> = std::iter::once(what.to_owned())
        .chain(args.iter().cloned())
        .collect();
    run_with_agent("xdplb-bench", &args)
}

/// Runs release binary `name` of the tests crate from the workspace root, with [`AGENT_BIN_ENV`].
fn run_with_agent(name: &str, args: &[String]) -> Result<()> {
    let bin = release_bin(name);
    if !bin.is_file() {
        bail!(
            "{} was not built: the tests crate (xdplb-tests) has no `[[bin]] name = \"{name}\"`",
            bin.display()
        );
    }
    let agent = agent_bin();
    if !agent.is_file() {
        bail!("{} was not built", agent.display());
    }
    cmd::run(
        Command::new(&bin)
            .current_dir(cmd::workspace_root())
            .env(AGENT_BIN_ENV, &agent)
            .args(args),
    )
    .with_context(|| format!("running {name}"))
}
