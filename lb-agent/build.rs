//! Builds the eBPF programs of `lb-ebpf` (with the pinned nightly and bpf-linker) and
//! leaves the objects in OUT_DIR, where `dataplane::loader` embeds them.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// The nightly the eBPF objects are built with; `cargo xtask setup` installs it with
/// rust-src, and bpf-linker against its LLVM (DESIGN.md, Toolchain).
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|cargo_metadata::Package { name, .. }| name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("lb-ebpf package not found"))?;
    let root_dir = ebpf_package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("lb-ebpf manifest has no parent"))?;
    println!("cargo:rerun-if-changed=../lb-common/src");
    // aya-build turns every stderr line of the nested cargo into a cargo:warning;
    // keep that to real diagnostics.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [Package {
            name: ebpf_package.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(EBPF_TOOLCHAIN),
    )
    .context("building the eBPF programs (run `cargo xtask setup` if the toolchain or bpf-linker is missing)")
}
