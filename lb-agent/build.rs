//! Builds the eBPF programs of `lb-ebpf` (with the pinned nightly and bpf-linker) and
//! leaves the objects in OUT_DIR, where `dataplane::loader` embeds them.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// The `[toolchain]` table of lb-ebpf/rust-toolchain.toml: the nightly the eBPF objects are
/// built with, named there and nowhere else (`cargo xtask setup` installs it with its
/// components, and bpf-linker against its LLVM; DESIGN.md, Toolchain).
#[derive(serde::Deserialize)]
struct ToolchainFile {
    toolchain: Pinned,
}

#[derive(serde::Deserialize)]
struct Pinned {
    channel: String,
}

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
    let toolchain_file = root_dir.join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={toolchain_file}");
    let text = std::fs::read_to_string(&toolchain_file)
        .with_context(|| format!("reading {toolchain_file}"))?;
    let pinned: ToolchainFile =
        toml::from_str(&text).with_context(|| format!("parsing {toolchain_file}"))?;
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
        Toolchain::Custom(&pinned.toolchain.channel),
    )
    .context("building the eBPF programs (run `cargo xtask setup` if the toolchain or bpf-linker is missing)")
}
