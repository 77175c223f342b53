//! Rust toolchains: the pinned nightly that builds (and lints) the eBPF crate, and the
//! components the host toolchain needs for `cargo fmt` and `cargo clippy`.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result};

use crate::cmd;

/// The nightly that builds lb-ebpf; bpf-linker is built against its LLVM (DESIGN.md, "Toolchain").
/// lb-agent's build.rs names the same toolchain.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

/// Components of [`EBPF_TOOLCHAIN`]: rust-src for `-Z build-std=core`, clippy for the bpfel lint.
pub const EBPF_COMPONENTS: &[&str] = &["rust-src", "clippy"];

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

/// Installs [`EBPF_TOOLCHAIN`] with [`EBPF_COMPONENTS`], or adds the components it lacks.
pub fn install_ebpf_toolchain() -> Result<()> {
    if is_installed(EBPF_TOOLCHAIN)? {
        let missing = missing_components(Some(EBPF_TOOLCHAIN), EBPF_COMPONENTS)?;
        cmd::run(
            Command::new("rustup")
                .args(["component", "add", "--toolchain", EBPF_TOOLCHAIN])
                .args(&missing),
        )
    } else {
        let mut install = Command::new("rustup");
        install.args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
        ]);
        for component in EBPF_COMPONENTS {
            install.args(["--component", component]);
        }
        cmd::run(&mut install)
    }
    .with_context(|| format!("installing the {EBPF_TOOLCHAIN} toolchain"))
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
