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
    let cargo_metadata::Metadata {
        packages,
        target_directory,
        ..
    } = cargo_metadata::MetadataCommand::new()
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
    // The nested build is `--release` of this workspace, whose release profile has fat LTO
    // and one codegen unit per crate for the agent (Cargo.toml). The eBPF programs keep
    // Cargo's defaults there (lb-ebpf's own `[profile.release.package.lb-ebpf]` still
    // applies): the object is the one the tests check (no memory builtins, map names,
    // stack), and bpf-linker links the programs' bitcode whole in any case.
    // SAFETY: as above.
    unsafe {
        std::env::set_var("CARGO_PROFILE_RELEASE_LTO", "false");
        std::env::set_var("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16");
    }
    share_ebpf_target_dir(target_directory.as_std_path())?;
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

/// aya-build gives the nested eBPF build a target directory inside this run's OUT_DIR, so
/// every build of lb-agent that runs this script anew (clippy's, the release build's, the
/// test build's: each has its own OUT_DIR) compiled `core` and the programs from nothing again,
/// about a minute of CPU each. Point that directory at one shared `<target>/ebpf` instead: the
/// nested cargo's own fingerprints then make a repeated build a no-op, and its lock on that
/// directory serialises two builds that run at once.
fn share_ebpf_target_dir(workspace_target: &std::path::Path) -> anyhow::Result<()> {
    let out_dir = std::env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?;
    // The directory aya-build 0.2 passes as `--target-dir` (aya_build::build_ebpf).
    let private = std::path::Path::new(&out_dir).join("aya-build/target/lb-ebpf");
    let shared = workspace_target.join("ebpf");
    std::fs::create_dir_all(&shared).with_context(|| format!("creating {}", shared.display()))?;
    if std::fs::read_link(&private).is_ok_and(|to| to == shared) {
        return Ok(());
    }
    match std::fs::symlink_metadata(&private) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&private),
        Ok(_) => std::fs::remove_file(&private),
        Err(_) => Ok(()),
    }
    .with_context(|| format!("removing {}", private.display()))?;
    let parent = private
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", private.display()))?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    std::os::unix::fs::symlink(&shared, &private)
        .with_context(|| format!("linking {} to {}", private.display(), shared.display()))
}
