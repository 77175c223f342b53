//! bpf-linker, built against the LLVM of the pinned eBPF toolchain ([`toolchain::ebpf`]) (DESIGN.md, "Toolchain"): finding it,
//! telling which LLVM it uses, and installing it with `LLVM_PREFIX` pointing at rustc's libLLVM.

use std::{
    fmt, fs,
    os::unix::fs as unix_fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, toolchain};

/// The bpf-linker release installed; DESIGN.md records that it builds this way.
pub const VERSION: &str = "0.13.0";

/// A bpf-linker binary that runs.
#[derive(Debug)]
pub struct Linker {
    pub path: PathBuf,
    /// Its `--version` line, e.g. `bpf-linker 0.13.0`.
    pub version: String,
    /// The LLVM major it uses, and how that was found; `None` when it could not be told.
    pub llvm: Option<Llvm>,
    /// Whether `bpf-linker` on PATH is this binary (cargo runs it from PATH).
    pub on_path: bool,
}

/// The LLVM a bpf-linker uses.
#[derive(Debug)]
pub struct Llvm {
    pub major: u32,
    /// Where the major came from: the `--version` output or the libLLVM `ldd` resolves.
    pub source: String,
}

/// What is installed.
#[derive(Debug)]
pub enum State {
    Missing,
    /// Found at the path, but `--version` fails (e.g. its libLLVM is gone).
    Broken(PathBuf, String),
    Runs(Linker),
}

impl fmt::Display for Linker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}", self.version, self.path.display())?;
        match &self.llvm {
            Some(llvm) => write!(f, ", LLVM {} ({})", llvm.major, llvm.source),
            None => write!(f, ", LLVM version unknown"),
        }
    }
}

/// Finds bpf-linker (on PATH, else in cargo's bin directory) and inspects it.
pub fn check() -> Result<State> {
    let on_path = cmd::find_in_path("bpf-linker");
    let path = if let Some(path) = on_path.clone() {
        path
    } else {
        let path = cmd::cargo_bin_dir()?.join("bpf-linker");
        if !cmd::is_executable(&path) {
            return Ok(State::Missing);
        }
        path
    };
    Ok(inspect(&path, on_path.is_some()))
}

/// Runs `path --version` and works out its LLVM major.
fn inspect(path: &Path, on_path: bool) -> State {
    let version = match cmd::output(Command::new(path).arg("--version")) {
        Ok(out) => out.trim().to_owned(),
        Err(err) => return State::Broken(path.to_owned(), format!("{err:#}")),
    };
    let llvm = llvm_in_version(&version)
        .map(|major| Llvm {
            major,
            source: "from --version".to_owned(),
        })
        .or_else(|| {
            let ldd = cmd::output(Command::new("ldd").arg(path)).ok()?;
            let (major, soname) = llvm_in_ldd(&ldd)?;
            Some(Llvm {
                major,
                source: format!("ldd resolves {soname}"),
            })
        });
    State::Runs(Linker {
        path: path.to_owned(),
        version,
        llvm,
        on_path,
    })
}

/// An LLVM major in `bpf-linker --version` output, if it names one (`... LLVM 22.1.4`).
fn llvm_in_version(version: &str) -> Option<u32> {
    let (_, after) = version.split_once("LLVM")?;
    let after = after
        .trim_start_matches(|c: char| c.is_ascii_alphabetic() || c == ':' || c.is_whitespace());
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The LLVM major of the libLLVM in `ldd` output, with the library it resolves to, from
/// sonames like `libLLVM.so.22.1-rust-1.97.0-nightly`, `libLLVM-22.so` or `libLLVM.so.22`.
fn llvm_in_ldd(ldd: &str) -> Option<(u32, String)> {
    ldd.lines().find_map(|line| {
        let line = line.trim();
        let soname = line.split_whitespace().next()?;
        let rest = soname.strip_prefix("libLLVM")?;
        if line.contains("not found") {
            return None;
        }
        let rest = rest
            .strip_prefix(".so.")
            .or_else(|| rest.strip_prefix('-'))?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        // `SONAME => /resolved/path (0xADDRESS)`: keep the resolved path.
        let resolved = line
            .split_once("=>")
            .and_then(|(_, after)| after.split_whitespace().next())
            .unwrap_or(soname);
        Some((digits.parse().ok()?, resolved.to_owned()))
    })
}

/// The LLVM prefix bpf-linker is built against: `~/.cache/xdplb/llvm-prefix-<toolchain>`. It must
/// outlive the build (the binary's RUNPATH points into it), so it is not under `target/`.
fn llvm_prefix() -> Result<PathBuf> {
    Ok(cmd::cache_dir()?.join(format!("llvm-prefix-{}", toolchain::ebpf())))
}

/// The `libLLVM.so.<ver>-rust-<rustc ver>` file in `dir` (the toolchain's `lib`).
fn find_libllvm(dir: &Path) -> Result<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("libLLVM.so.") && name.contains("-rust-"))
        .collect();
    names.sort();
    match names.as_slice() {
        [name] => Ok(name.clone()),
        [] => bail!("no libLLVM.so.*-rust-* in {}", dir.display()),
        _ => bail!(
            "several libLLVM.so.*-rust-* in {}: {names:?}",
            dir.display()
        ),
    }
}

/// (Re)creates `link` as a symlink to `target`.
fn symlink(target: &Path, link: &Path) -> Result<()> {
    if link.symlink_metadata().is_ok() {
        fs::remove_file(link).with_context(|| format!("removing {}", link.display()))?;
    }
    unix_fs::symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))
}

/// Builds bpf-linker against the nightly's own libLLVM (LLVM major `llvm_major`), installs it in
/// cargo's bin directory and returns the installed binary, checked.
pub fn install(llvm_major: u32) -> Result<Linker> {
    let sysroot_lib = toolchain::sysroot(toolchain::ebpf())?.join("lib");
    let libllvm = find_libllvm(&sysroot_lib)?;
    let prefix = llvm_prefix()?;
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for link in ["libLLVM.so", libllvm.as_str()] {
        symlink(&sysroot_lib.join(&libllvm), &prefix_lib.join(link))?;
    }
    println!(
        "{}: {{libLLVM.so, {libllvm}}} -> {}",
        prefix_lib.display(),
        sysroot_lib.join(&libllvm).display()
    );
    // Run from the prefix, away from the workspace's .cargo/config.toml.
    cmd::run(
        Command::new("cargo")
            .current_dir(&prefix)
            .env("LLVM_PREFIX", &prefix)
            .args(["install", "bpf-linker", "--version", VERSION, "--force"])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{llvm_major}")),
    )
    .context("building bpf-linker")?;

    let path = cmd::cargo_bin_dir()?.join("bpf-linker");
    let on_path = cmd::find_in_path("bpf-linker").is_some_and(|found| same_file(&found, &path));
    match inspect(&path, on_path) {
        State::Runs(linker)
            if linker
                .llvm
                .as_ref()
                .is_some_and(|llvm| llvm.major == llvm_major) =>
        {
            Ok(linker)
        }
        State::Runs(linker) => {
            bail!("the bpf-linker just built does not use LLVM {llvm_major}: {linker}")
        }
        State::Broken(path, why) => bail!(
            "the bpf-linker just built at {} does not run: {why}",
            path.display()
        ),
        State::Missing => bail!("cargo install left no bpf-linker at {}", path.display()),
    }
}

/// Whether two paths name the same file.
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_from_ldd() {
        let ldd = "\tlinux-vdso.so.1 (0x00007f4a12e53000)\n\
            \tlibLLVM.so.22.1-rust-1.97.0-nightly => /tmp/llvmp/lib/libLLVM.so.22.1-rust-1.97.0-nightly (0x00007f4a08400000)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f4a0821e000)\n";
        let (major, resolved) = llvm_in_ldd(ldd).unwrap();
        assert_eq!(major, 22);
        assert_eq!(
            resolved,
            "/tmp/llvmp/lib/libLLVM.so.22.1-rust-1.97.0-nightly"
        );
        assert_eq!(
            llvm_in_ldd("\tlibLLVM-19.so => /usr/lib/libLLVM-19.so (0x1)\n")
                .unwrap()
                .0,
            19
        );
        assert_eq!(llvm_in_ldd("\tlibLLVM.so.22.1-rust-x => not found\n"), None);
        assert_eq!(llvm_in_ldd("\tlibc.so.6 => /lib/libc.so.6 (0x1)\n"), None);
    }

    #[test]
    fn llvm_from_version() {
        assert_eq!(llvm_in_version("bpf-linker 0.13.0"), None);
        assert_eq!(llvm_in_version("bpf-linker 0.14.0 (LLVM 22.1.4)"), Some(22));
        assert_eq!(
            llvm_in_version("bpf-linker 1.0\nLLVM version: 23.0.0"),
            Some(23)
        );
    }
}
