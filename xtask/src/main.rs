//! `cargo xtask`: the project's tasks (DESIGN.md, "Workspace"): setup, test, clippy, demo, bench.

mod apt;
mod bpf_linker;
mod cache_tests;
mod clippy;
mod cmd;
mod kernel;
mod release;
mod setup;
mod test;
mod toolchain;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "xdplb's project tasks",
    version
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Check and install everything a fresh machine needs: the pinned nightly with rust-src,
    /// bpf-linker on that nightly's LLVM, Debian packages, and the kernel side (idempotent).
    Setup {
        /// Rebuild bpf-linker even when the installed one looks right.
        #[arg(long)]
        reinstall_bpf_linker: bool,
    },
    /// What CI runs: fmt check, clippy (host and bpfel), the build (profile `testing`), `cargo test`, `vagrant validate`.
    Test {
        /// Leave out a step (repeatable); CI runs them all.
        #[arg(long, value_enum)]
        skip: Vec<test::Step>,
        /// Extra arguments for `cargo test` (test name filters; a further `--` reaches the test binaries).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_test_args: Vec<String>,
    },
    /// Clippy with `-D warnings`: the workspace for the host, and lb-ebpf for bpfel-unknown-none.
    Clippy,
    /// Build in release mode and run `xdplb-demo` (needs root), e.g. `cargo xtask demo --xdp-mode native`;
    /// `cargo xtask demo --cluster` shows two LB nodes behind ECMP and one of them dying.
    Demo {
        /// Arguments for `xdplb-demo`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build in release mode and run `xdplb-bench <WHAT>`, e.g. `cargo xtask bench xdp`, or
    /// with no WHAT every benchmark in turn with its defaults; each prints its tables and
    /// writes `target/bench/<WHAT>.json`. `bench l7` first installs haproxy, nginx and wrk
    /// from Debian if they are missing.
    Bench {
        /// The benchmark to run (`xdp`, `wire`, `control`, `failover`, `cluster`, `l7`:
        /// `xdplb-bench --help` lists them); none: all of them.
        what: Option<String>,
        /// Further arguments for `xdplb-bench`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the public HTTP caching conformance suite (http-tests/cache-tests) against the
    /// agent's L7 cache on loopback and print its score beside the published ones; node
    /// and npm are installed from Debian when missing. Not part of `cargo xtask test`.
    CacheTests {
        /// The suite's source (a clone of https://github.com/http-tests/cache-tests);
        /// default `$CACHE_TESTS_DIR`, else ../shared/vendor/cache-tests next to the repository.
        #[arg(long)]
        suite: Option<std::path::PathBuf>,
        /// The service's `cache.stale_if_unreachable_s` (default one day, as a deployment
        /// that prefers a stale page to an error sets it; 0 turns it off).
        #[arg(long, default_value_t = 86_400)]
        stale_if_unreachable_s: u64,
    },
}

/// Runs the task; on failure prints the error and its causes (without the backtrace anyhow
/// would add under `RUST_BACKTRACE`), and exits with status 1.
fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("\nxtask: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Setup {
            reinstall_bpf_linker,
        } => setup::setup(reinstall_bpf_linker),
        Task::Test {
            skip,
            cargo_test_args,
        } => test::test(&skip, &cargo_test_args),
        Task::Clippy => {
            setup::ensure_ready()?;
            clippy::clippy()
        }
        Task::Demo { args } => release::demo(&args),
        Task::Bench { what, args } => release::bench(what.as_deref(), &args),
        Task::CacheTests {
            suite,
            stale_if_unreachable_s,
        } => cache_tests::cache_tests(suite.as_deref(), stale_if_unreachable_s),
    }
}
