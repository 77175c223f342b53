//! Rust toolchains: the pinned nightly that builds (and lints) the eBPF crate, and the
//! components the host toolchain needs for `cargo fmt` and `cargo clippy`.

use std::{path::PathBuf, process::Command, sync::LazyLock};

use anyhow::{Context as _, Result};
use serde::Deserialize;

use crate::cmd;

/// `lb-ebpf/rust-toolchain.toml`, the one place the eBPF toolchain is named (lb-agent's
/// build.rs reads the same file).
const EBPF_TOOLCHAIN_FILE: &str = include_str!("../../lb-ebpf/rust-toolchain.toml");

/// The `[toolchain]` table of a rust-toolchain.toml.
#[derive(Debug, Deserialize)]
struct ToolchainFile {
    toolchain: Pinned,
}

/// The pinned eBPF toolchain: its channel and the components it needs.
#[derive(Debug, Deserialize)]
pub struct Pinned {
    /// The nightly that builds lb-ebpf; bpf-linker is built against its LLVM.
    pub channel: String,
    /// rust-src for `-Z build-std=core`, clippy for the bpfel lint.
    pub components: Vec<String>,
}

static EBPF: LazyLock<Pinned> = LazyLock::new(|| {
    toml::from_str::<ToolchainFile>(EBPF_TOOLCHAIN_FILE)
        .expect("lb-ebpf/rust-toolchain.toml has a [toolchain] table with channel and components")
        .toolchain
});

/// The toolchain name lb-ebpf builds with (`nightly-YYYY-MM-DD`).
pub fn ebpf() -> &'static str {
    &EBPF.channel
}

/// The components [`ebpf`] needs.
pub fn ebpf_components() -> Vec<&'static str> {
    EBPF.components.iter().map(String::as_str).collect()
}

/// Components of the host toolchain (the one `cargo xtask` runs under).
pub const HOST_COMPONENTS: &[&str] = &["rustfmt", "clippy"];

/// `rustup`, with `+toolchain` when one is given (else the active toolchain).
fn rustup(toolchain: Option<&str>) -> Command {
    let mut cmd = Command::new("rustup");
    if let Some(toolchain) = toolchain {
        cmd.arg(format!("+{toolchain}"));
    }
    cmd
}

/// `rustc +toolchain`.
fn rustc(toolchain: &str) -> Command {
    let mut cmd = Command::new("rustc");
    cmd.arg(format!("+{toolchain}"));
    cmd
}

/// Whether rustup has `toolchain` installed (checked without letting rustup install it).
pub fn is_installed(toolchain: &str) -> Result<bool> {
    let list = cmd::output(Command::new("rustup").args(["toolchain", "list"]))
        .context("listing rustup toolchains (is rustup installed and on PATH?)")?;
    Ok(list.lines().any(|line| {
        let name = line.split_whitespace().next().unwrap_or_default();
        name == toolchain
            || name
                .strip_prefix(toolchain)
                .is_some_and(|rest| rest.starts_with('-'))
    }))
}

/// Which of `wanted` are not installed in `toolchain` (`None`: the active toolchain).
pub fn missing_components(toolchain: Option<&str>, wanted: &[&str]) -> Result<Vec<String>> {
    let installed = cmd::output(rustup(toolchain).args(["component", "list", "--installed"]))
        .context("listing installed rustup components")?;
    Ok(wanted
        .iter()
        .filter(|want| {
            !installed
                .lines()
                .any(|line| is_component(line.trim(), want))
        })
        .map(|want| (*want).to_owned())
        .collect())
}

/// Whether an entry of `rustup component list` (`clippy-x86_64-unknown-linux-gnu`, `rust-src`)
/// is the component `name`.
fn is_component(entry: &str, name: &str) -> bool {
    entry == name
        || entry
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|target| target.contains("-unknown-") || target.contains("-apple-"))
}

/// Installs the [`ebpf`] toolchain with its components, or adds the components it lacks.
pub fn install_ebpf_toolchain() -> Result<()> {
    let toolchain = ebpf();
    if is_installed(toolchain)? {
        let missing = missing_components(Some(toolchain), &ebpf_components())?;
        cmd::run(
            Command::new("rustup")
                .args(["component", "add", "--toolchain", toolchain])
                .args(&missing),
        )
    } else {
        let mut install = Command::new("rustup");
        install.args(["toolchain", "install", toolchain, "--profile", "minimal"]);
        for component in &EBPF.components {
            install.args(["--component", component]);
        }
        cmd::run(&mut install)
    }
    .with_context(|| format!("installing the {toolchain} toolchain"))
}

/// Adds `components` to the active (host) toolchain.
pub fn add_host_components(components: &[String]) -> Result<()> {
    cmd::run(
        Command::new("rustup")
            .args(["component", "add"])
            .args(components),
    )
    .context("adding components to the host toolchain")
}

/// The active toolchain's name, as rustup reports it.
pub fn active() -> Result<String> {
    let out = cmd::output(Command::new("rustup").args(["show", "active-toolchain"]))
        .context("asking rustup for the active toolchain")?;
    Ok(out.split_whitespace().next().unwrap_or("?").to_owned())
}

/// The LLVM major version `toolchain`'s rustc is built on (`LLVM version: 22.1.4` gives 22).
pub fn llvm_major(toolchain: &str) -> Result<u32> {
    let out = cmd::output(rustc(toolchain).arg("-vV"))?;
    parse_llvm_major(&out)
        .with_context(|| format!("no `LLVM version: N` line in `rustc +{toolchain} -vV`:\n{out}"))
}

fn parse_llvm_major(rustc_vv: &str) -> Option<u32> {
    let version = rustc_vv
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version:"))?;
    version.trim().split('.').next()?.parse().ok()
}

/// `rustc +toolchain --print sysroot`.
pub fn sysroot(toolchain: &str) -> Result<PathBuf> {
    let out = cmd::output(rustc(toolchain).args(["--print", "sysroot"]))?;
    Ok(PathBuf::from(out.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_toolchain_file_parses() {
        assert!(ebpf().starts_with("nightly-"), "{}", ebpf());
        assert!(ebpf_components().contains(&"rust-src"));
    }

    #[test]
    fn llvm_major_from_rustc_vv() {
        let out = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nrelease: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        assert_eq!(parse_llvm_major(out), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.0\n"), None);
    }

    #[test]
    fn component_names() {
        assert!(is_component("rust-src", "rust-src"));
        assert!(is_component("clippy-x86_64-unknown-linux-gnu", "clippy"));
        assert!(!is_component(
            "rust-std-x86_64-unknown-linux-gnu",
            "rust-src"
        ));
        assert!(!is_component("rustfmt-preview", "rustfmt"));
    }
}
