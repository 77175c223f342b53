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
pub fn target_dir() -> PathBuf {
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

/// The Cargo profile `cargo xtask test` builds and runs the tests with (defined in the
/// workspace's Cargo.toml: the release profile with the workspace's own crates at opt-level 0),
/// which is also the name of its output directory under [`target_dir`].
pub const TEST_PROFILE: &str = "testing";

/// The lb-agent binary of the [`TEST_PROFILE`] build: the value of [`AGENT_BIN_ENV`] for the
/// tests `cargo xtask test` runs.
pub fn test_agent_bin() -> PathBuf {
    target_dir().join(TEST_PROFILE).join("lb-agent")
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
    run_with_agent("xdplb-demo", args, &[])
}

/// The benchmarks `cargo xtask bench` runs when given no name, in this order.
pub const BENCHMARKS: &[&str] = &["xdp", "wire", "control", "failover", "cluster", "l7"];

/// The variable that tells `xdplb-bench` where to write its JSON records.
const BENCH_DIR_ENV: &str = "XDPLB_BENCH_DIR";

/// `cargo xtask bench WHAT`: build, then run `xdplb-bench WHAT ARGS`. For `l7`, first
/// installs haproxy, nginx and wrk from Debian when missing ([`apt::ensure_bench_l7`]);
/// for `xdp`, clang and llvm to build Katran ([`apt::ensure_bench_xdp`]). With no WHAT: every benchmark of
/// [`BENCHMARKS`] with its defaults, on to the next when one fails (the failures are
/// listed and make the task fail at the end). JSON records go to `target/bench/`.
pub fn bench(what: Option<&str>, args: &[String]) -> Result<()> {
    setup::ensure_ready()?;
    let what: Vec<&str> = match what {
        Some(name) => vec![name],
        None => {
            if !args.is_empty() {
                bail!(
                    "`cargo xtask bench` without a benchmark name takes no arguments (got {args:?}): name one, e.g. `cargo xtask bench xdp {}`",
                    args.join(" ")
                );
            }
            BENCHMARKS.to_vec()
        }
    };
    if what.contains(&"l7") {
        apt::ensure_bench_l7().context("installing what `bench l7` compares with")?;
    }
    if what.contains(&"xdp") {
        apt::ensure_bench_xdp().context("installing what `bench xdp` builds Katran with")?;
    }
    build(DEMO_PACKAGES).context("building the agent and the benchmarks")?;
    let dir = target_dir().join("bench");
    let env = [(BENCH_DIR_ENV, dir.as_os_str())];
    if let [name] = what[..] {
        let args: Vec<String> = std::iter::once(name.to_owned())
            .chain(args.iter().cloned())
            .collect();
        return run_with_agent("xdplb-bench", &args, &env);
    }
    let mut failed = Vec::new();
    for name in &what {
        println!("\n=== cargo xtask bench {name} ===\n");
        if let Err(err) = run_with_agent("xdplb-bench", &[(*name).to_owned()], &env) {
            println!("bench {name} failed: {err:#}");
            failed.push(*name);
        }
    }
    println!(
        "\nbenchmarks run: {}; JSON records in {}",
        what.join(", "),
        dir.display()
    );
    if !failed.is_empty() {
        bail!("these benchmarks failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Runs release binary `name` of the tests crate from the workspace root, with [`AGENT_BIN_ENV`].
fn run_with_agent(name: &str, args: &[String], env: &[(&str, &std::ffi::OsStr)]) -> Result<()> {
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
            .envs(env.iter().copied())
            .args(args),
    )
    .with_context(|| format!("running {name}"))
}
