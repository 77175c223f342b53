//! Running external programs: print each command, stream its output, and turn failures into
//! errors that name the command; plus the paths every task needs.

use std::{
    env,
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// The workspace root: the parent of xtask's own manifest directory.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest directory has a parent")
}

/// `cargo` (the rustup proxy, so that `+toolchain` works), run from the workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    cmd
}

/// Prints `cmd`, runs it with inherited stdio, and fails unless it exits successfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    println!("$ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly (no stdin) and returns its stdout; fails, with its stderr, unless it
/// exits successfully. For checks, so the command is not printed.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{shown}` printed non-UTF-8 output"))
}

/// The first executable file called `name` in `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    which::which(name).ok()
}

/// Whether `path` is a file with an execute bit set.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// The user's home directory, from `HOME`.
pub fn home_dir() -> Result<PathBuf> {
    env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .map(PathBuf::from)
        .context("HOME is not set")
}

/// xtask's cache directory: `$XDG_CACHE_HOME/xdplb`, else `~/.cache/xdplb`.
pub fn cache_dir() -> Result<PathBuf> {
    let cache = match env::var_os("XDG_CACHE_HOME").filter(|dir| !dir.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => home_dir()?.join(".cache"),
    };
    Ok(cache.join("xdplb"))
}

/// Where `cargo install` puts binaries: `$CARGO_INSTALL_ROOT/bin`, else `$CARGO_HOME/bin`,
/// else `~/.cargo/bin`.
pub fn cargo_bin_dir() -> Result<PathBuf> {
    for var in ["CARGO_INSTALL_ROOT", "CARGO_HOME"] {
        if let Some(dir) = env::var_os(var).filter(|dir| !dir.is_empty()) {
            return Ok(PathBuf::from(dir).join("bin"));
        }
    }
    Ok(home_dir()?.join(".cargo").join("bin"))
}

/// A shell-like rendering of `cmd`: working directory, environment set for it, program, arguments.
fn display(cmd: &Command) -> String {
    let mut parts = Vec::new();
    if let Some(dir) = cmd.get_current_dir() {
        parts.push(format!("(cd {} &&", quote(dir.as_os_str())));
    }
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            parts.push(format!("{}={}", key.to_string_lossy(), quote(value)));
        }
    }
    parts.push(quote(cmd.get_program()));
    parts.extend(cmd.get_args().map(quote));
    let mut shown = parts.join(" ");
    if cmd.get_current_dir().is_some() {
        shown.push(')');
    }
    shown
}

/// `arg` as a shell word: single-quoted when it holds anything but plain characters.
fn quote(arg: &OsStr) -> String {
    let arg = arg.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:+,@%".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.into_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_shows_dir_env_and_quotes() {
        let mut cmd = Command::new("cargo");
        cmd.current_dir("/w")
            .env("LLVM_PREFIX", "/p q")
            .args(["install", "it's"]);
        assert_eq!(
            display(&cmd),
            r"(cd /w && LLVM_PREFIX='/p q' cargo install 'it'\''s')"
        );
    }

    #[test]
    fn display_plain_command() {
        let mut cmd = Command::new("rustup");
        cmd.args(["+nightly-2026-05-20", "component", "list"]);
        assert_eq!(display(&cmd), "rustup +nightly-2026-05-20 component list");
    }
}
