//! Debian packages the tests and the demo use: checked with dpkg-query, installed with apt-get.

use std::{
    fs,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, kernel};

/// Each package, with a program it provides (checked on PATH where there is no dpkg).
pub const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("ethtool", "ethtool"),
    ("nftables", "nft"),
    ("tcpdump", "tcpdump"),
    ("curl", "curl"),
    ("vagrant", "vagrant"),
];

/// Packages whose absence only skips a step: `vagrant` serves `vagrant validate` alone.
const OPTIONAL: &[&str] = &["vagrant"];

/// Records the optional packages apt had no candidate for, so that later runs do not
/// `apt-get update` again for them; `cargo xtask setup` retries them all the same.
const UNAVAILABLE_FILE: &str = "apt-unavailable";

/// The package names.
pub fn names() -> impl Iterator<Item = &'static str> {
    PACKAGES.iter().map(|(package, _)| *package)
}

/// Whether this is a dpkg-based system.
pub fn has_dpkg() -> bool {
    cmd::find_in_path("dpkg-query").is_some()
}

/// The packages of [`PACKAGES`] that dpkg does not report installed (one dpkg-query call).
pub fn missing() -> Result<Vec<&'static str>> {
    // dpkg-query exits 1 when some package is unknown, but still lists the known ones.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\n"])
        .args(names())
        .stdin(Stdio::null())
        .output()
        .context("running dpkg-query")?;
    let listed = String::from_utf8_lossy(&out.stdout);
    Ok(names()
        .filter(|package| {
            !listed.lines().any(|line| {
                line.split_once(' ').is_some_and(|(name, status)| {
                    name.split(':').next() == Some(*package) && status == "install ok installed"
                })
            })
        })
        .collect())
}

/// Without dpkg: the programs of [`PACKAGES`] that are not on PATH.
pub fn missing_programs() -> Vec<&'static str> {
    PACKAGES
        .iter()
        .filter(|(_, program)| cmd::find_in_path(program).is_none())
        .map(|(_, program)| *program)
        .collect()
}

/// Installs `packages` with apt-get, non-interactively. Optional packages apt has no candidate
/// for are left out (and, unless `retry_unavailable`, not tried again when an earlier run found
/// none); returns the packages left out.
pub fn install(packages: &[&'static str], retry_unavailable: bool) -> Result<Vec<&'static str>> {
    let known_unavailable = if retry_unavailable {
        Vec::new()
    } else {
        read_unavailable()
    };
    let (to_try, mut left_out): (Vec<_>, Vec<_>) = packages.iter().partition(|package| {
        !OPTIONAL.contains(package) || !known_unavailable.iter().any(|known| known == *package)
    });
    for package in &left_out {
        println!(
            "note: an earlier run found no installable `{package}` package: not retrying \
             (`cargo xtask setup` does)"
        );
    }
    if to_try.is_empty() {
        return Ok(left_out);
    }
    if !kernel::is_root() {
        bail!(
            "Debian packages missing: {0}; installing them needs root: \
             `sudo apt-get install --no-install-recommends {0}`",
            to_try.join(" ")
        );
    }
    cmd::run(apt_get().arg("update")).context("apt-get update")?;
    let (installable, unavailable): (Vec<_>, Vec<_>) = to_try
        .into_iter()
        .partition(|package| !OPTIONAL.contains(package) || has_candidate(package));
    for package in &unavailable {
        println!("note: apt has no installable `{package}` package here: leaving it out");
    }
    write_unavailable(&unavailable);
    if !installable.is_empty() {
        cmd::run(
            apt_get()
                .args(["install", "-y", "--no-install-recommends"])
                .args(&installable),
        )
        .context("apt-get install")?;
    }
    left_out.extend(unavailable);
    Ok(left_out)
}

/// Whether apt has an installable version of `package` (`apt-cache policy` shows a candidate).
fn has_candidate(package: &str) -> bool {
    cmd::output(Command::new("apt-cache").args(["policy", package])).is_ok_and(|out| {
        out.lines()
            .filter_map(|line| line.trim().strip_prefix("Candidate:"))
            .any(|candidate| candidate.trim() != "(none)")
    })
}

fn read_unavailable() -> Vec<String> {
    cmd::cache_dir()
        .and_then(|dir| Ok(fs::read_to_string(dir.join(UNAVAILABLE_FILE))?))
        .map(|text| text.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Best effort: a failure only means a later run asks apt again.
fn write_unavailable(packages: &[&str]) {
    let Ok(dir) = cmd::cache_dir() else { return };
    let file = dir.join(UNAVAILABLE_FILE);
    let result = if packages.is_empty() {
        fs::remove_file(&file).or_else(|err| {
            if err.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(err)
            }
        })
    } else {
        fs::create_dir_all(&dir).and_then(|()| fs::write(&file, packages.join("\n") + "\n"))
    };
    if let Err(err) = result {
        println!("note: could not update {}: {err}", file.display());
    }
}

/// apt-get, with no terminal and no questions.
fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null());
    cmd
}
