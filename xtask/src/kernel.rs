//! The kernel side: privileges, a bpf filesystem for pins, and network namespaces. xtask cannot
//! install these; it says what is missing.

use std::{fs, path::Path, process, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// What a check found.
#[derive(Debug)]
pub enum Finding {
    Ok(String),
    Problem(String),
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// A field of /proc/self/status, e.g. `Uid` or `CapEff`.
fn status_field(name: &str) -> Option<String> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key == name).then(|| value.trim().to_owned())
    })
}

/// The effective user id.
fn euid() -> Option<u32> {
    status_field("Uid")?.split_whitespace().nth(1)?.parse().ok()
}

/// Whether this process runs with effective uid 0.
pub fn is_root() -> bool {
    euid() == Some(0)
}

/// The capabilities the tests and the demo use that this process lacks. `CAP_BPF` is not required
/// where `CAP_SYS_ADMIN` is there (kernels before 5.8 have no `CAP_BPF`).
fn missing_capabilities() -> Vec<&'static str> {
    let Some(effective) = status_field("CapEff").and_then(|hex| u64::from_str_radix(&hex, 16).ok())
    else {
        return vec!["(unknown: no CapEff in /proc/self/status)"];
    };
    let has = |cap: u32| effective & (1 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(CAP_SYS_ADMIN) {
        missing.push("CAP_SYS_ADMIN");
        if !has(CAP_BPF) {
            missing.push("CAP_BPF");
        }
    }
    missing
}

/// Root with the capabilities for namespaces, mounts and BPF.
pub fn privileges() -> Finding {
    let skip_hint = "run as root, or set XDPLB_SKIP_PRIVILEGED=1 to skip the privileged tests";
    match euid() {
        Some(0) => {
            let missing = missing_capabilities();
            if missing.is_empty() {
                Finding::Ok("root, with CAP_NET_ADMIN and CAP_SYS_ADMIN".to_owned())
            } else {
                Finding::Problem(format!(
                    "root, but without {} (a restricted container?): namespaces, bpffs mounts \
                     and XDP need them; {skip_hint}",
                    missing.join(", ")
                ))
            }
        }
        uid => Finding::Problem(format!(
            "not root (uid {}): the privileged tests and the demo create namespaces and attach \
             XDP programs; {skip_hint}",
            uid.map_or_else(|| "unknown".to_owned(), |uid| uid.to_string())
        )),
    }
}

/// A bpf filesystem: mounted at /sys/fs/bpf, or mountable (with `probe`, by mounting one).
pub fn bpffs(probe: bool) -> Finding {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mounted_at_sys = mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        matches!(fields.as_slice(), [_, "/sys/fs/bpf", "bpf", ..])
    });
    if mounted_at_sys {
        return Finding::Ok("bpffs mounted at /sys/fs/bpf".to_owned());
    }
    let supported = fs::read_to_string("/proc/filesystems").is_ok_and(|list| {
        list.lines()
            .any(|line| line.split_whitespace().last() == Some("bpf"))
    });
    if !supported {
        return Finding::Problem(
            "the kernel lists no `bpf` filesystem in /proc/filesystems: pinning (--bpffs) cannot work"
                .to_owned(),
        );
    }
    let note = "/sys/fs/bpf is not mounted (the tests mount their own bpffs; for the agent's \
                default --bpffs: `mount -t bpf bpf /sys/fs/bpf`)";
    if !probe || !is_root() {
        return Finding::Ok(format!("the kernel supports bpffs; {note}"));
    }
    match probe_bpffs_mount() {
        Ok(()) => Finding::Ok(format!("a bpffs mounts (test mount under /run); {note}")),
        Err(err) => Finding::Problem(format!("mounting a bpffs failed: {err:#}")),
    }
}

/// Mounts a bpffs on a fresh directory under /run and takes it down again.
fn probe_bpffs_mount() -> Result<()> {
    let dir = Path::new("/run").join(format!("xdplb-setup-bpffs-{}", process::id()));
    fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mounted = cmd::output(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&dir));
    let unmounted = match mounted {
        Ok(_) => cmd::output(Command::new("umount").arg(&dir)).map(drop),
        Err(_) => Ok(()),
    };
    let removed = fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()));
    mounted?;
    unmounted?;
    removed
}

/// `ip netns` usable: with `probe`, by adding a namespace, bringing up its loopback and deleting it.
pub fn netns(probe: bool) -> Finding {
    if cmd::find_in_path("ip").is_none() {
        return Finding::Problem("`ip` (iproute2) is not on PATH".to_owned());
    }
    if !probe || !is_root() {
        return match cmd::output(Command::new("ip").args(["netns", "list"])) {
            Ok(_) => Finding::Ok("`ip netns list` works".to_owned()),
            Err(err) => Finding::Problem(format!("{err:#}")),
        };
    }
    match probe_netns() {
        Ok(name) => Finding::Ok(format!(
            "`ip netns add/exec/delete` work (probed with {name})"
        )),
        Err(err) => Finding::Problem(format!("network namespaces do not work: {err:#}")),
    }
}

/// Adds a namespace, runs `ip link set lo up` in it, and deletes it; returns its name.
fn probe_netns() -> Result<String> {
    let name = format!("xdplb-setup-{}", process::id());
    cmd::output(Command::new("ip").args(["netns", "add", &name]))?;
    let used = cmd::output(
        Command::new("ip").args(["netns", "exec", &name, "ip", "link", "set", "lo", "up"]),
    );
    let deleted = cmd::output(Command::new("ip").args(["netns", "delete", &name]));
    used?;
    deleted?;
    if Path::new("/run/netns").join(&name).exists() {
        bail!("namespace {name} is still there after `ip netns delete`");
    }
    Ok(name)
}
