//! Per-interface IP forwarding for the attached interface.
//!
//! `bpf_fib_lookup` refuses to route (`BPF_FIB_LKUP_RET_FWD_DISABLED`) unless
//! forwarding is enabled on the interface the packet came in on, whatever lookup flags
//! are used (measured on Linux 6.18), for IPv4 and IPv6 alike (IPv6 tunnels to
//! backends, `next_hop_v6`). The agent therefore enables
//! `net.ipv4.conf.<iface>.forwarding` and `net.ipv6.conf.<iface>.forwarding` on the
//! interface it attaches to, and only there (the host's other interfaces and the
//! global switches are left alone). IPv6 forwarding makes Linux ignore router
//! advertisements on the interface when `accept_ra` is 1 (the default), which would let
//! a default route learnt from them expire: the agent sets `accept_ra` 1 to 2 (accept
//! them even when forwarding) on that interface first. An interface without IPv6
//! (`disable_ipv6`, no `conf/<iface>` for ipv6) is left as it is.
//!
//! The fast path outlives the agent (hitless restart), so the setting must too: the
//! value found before the first agent touched it is recorded in
//! `/run/xdplb/forwarding/<netns inode>-<iface>` (tmpfs: gone at reboot, like the
//! pins), kept by restarted agents, and put back only when the fast path is removed
//! (`lb-agent detach`, or an agent run that detaches).

use std::{
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// Where the original values are recorded.
const RECORD_DIR: &str = "/run/xdplb/forwarding";

#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct ForwardingError {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

/// One per-interface setting the agent changes: the sysctl under
/// `/proc/sys/net/<family>/conf/<iface>/`, the value it writes when the current value
/// is `from` (any value when `from` is None), and the suffix of its record file.
struct Setting {
    family: &'static str,
    name: &'static str,
    from: Option<&'static str>,
    to: &'static str,
    suffix: &'static str,
    /// Missing on hosts or interfaces without this family: skipped, not an error.
    optional: bool,
}

/// In the order they are changed (IPv6's `accept_ra` before its forwarding).
const SETTINGS: [Setting; 3] = [
    Setting {
        family: "ipv4",
        name: "forwarding",
        from: None,
        to: "1",
        suffix: "",
        optional: false,
    },
    Setting {
        family: "ipv6",
        name: "accept_ra",
        from: Some("1"),
        to: "2",
        suffix: ".ipv6-accept_ra",
        optional: true,
    },
    Setting {
        family: "ipv6",
        name: "forwarding",
        from: None,
        to: "1",
        suffix: ".ipv6",
        optional: true,
    },
];

fn sysctl_of(setting: &Setting, iface: &str) -> PathBuf {
    PathBuf::from(format!(
        "/proc/sys/net/{}/conf/{iface}/{}",
        setting.family, setting.name
    ))
}

fn record_of(setting: &Setting, iface: &str) -> Result<PathBuf, ForwardingError> {
    let base = record(iface)?;
    let mut name = base.into_os_string();
    name.push(setting.suffix);
    Ok(PathBuf::from(name))
}

fn record(iface: &str) -> Result<PathBuf, ForwardingError> {
    let ns = Path::new("/proc/self/ns/net");
    let ino = std::fs::metadata(ns)
        .map_err(|source| ForwardingError {
            action: "reading",
            path: ns.to_owned(),
            source,
        })?
        .ino();
    Ok(Path::new(RECORD_DIR).join(format!("{ino}-{iface}")))
}

fn read(path: &Path) -> Result<String, ForwardingError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| ForwardingError {
            action: "reading",
            path: path.to_owned(),
            source,
        })
}

fn write(path: &Path, value: &str, action: &'static str) -> Result<(), ForwardingError> {
    std::fs::write(path, value).map_err(|source| ForwardingError {
        action,
        path: path.to_owned(),
        source,
    })
}

/// Enable IPv4 and IPv6 forwarding on `iface` (see the module docs). The first call
/// records the values it found; later calls (a restarted agent) keep those records.
pub fn enable(iface: &str) -> Result<(), ForwardingError> {
    for setting in &SETTINGS {
        let p = sysctl_of(setting, iface);
        if setting.optional && !p.exists() {
            continue;
        }
        let current = read(&p)?;
        let rec = record_of(setting, iface)?;
        if !rec.exists() {
            std::fs::create_dir_all(RECORD_DIR).map_err(|source| ForwardingError {
                action: "creating",
                path: RECORD_DIR.into(),
                source,
            })?;
            write(&rec, &current, "recording the forwarding setting in")?;
        }
        if current != setting.to && setting.from.is_none_or(|from| current == from) {
            write(&p, setting.to, "enabling forwarding in")?;
            tracing::info!(
                iface,
                setting = %p.display(),
                value = setting.to,
                "changed for the fast path (bpf_fib_lookup needs forwarding on the interface)"
            );
        }
    }
    Ok(())
}

/// Put back the values recorded by [`enable`] (if any) and forget them. Returns whether
/// there was a record.
pub fn restore(iface: &str) -> Result<bool, ForwardingError> {
    let mut any = false;
    // In the reverse order of `enable`: IPv6 forwarding off before accept_ra goes back.
    for setting in SETTINGS.iter().rev() {
        let rec = record_of(setting, iface)?;
        let original = match std::fs::read_to_string(&rec) {
            Ok(v) => v.trim().to_owned(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(ForwardingError {
                    action: "reading",
                    path: rec,
                    source,
                });
            }
        };
        any = true;
        let p = sysctl_of(setting, iface);
        // The interface may be gone (and its setting with it).
        if p.exists() && read(&p)? != original {
            write(&p, &original, "restoring forwarding in")?;
        }
        std::fs::remove_file(&rec).map_err(|source| ForwardingError {
            action: "removing",
            path: rec,
            source,
        })?;
    }
    Ok(any)
}

/// Forwarding enabled for the life of a value (benchmarks and tests that attach
/// without an agent): dropping it puts the recorded setting back.
#[derive(Debug)]
pub struct InterfaceForwarding {
    iface: String,
}

impl InterfaceForwarding {
    /// [`enable`] now, [`restore`] on drop.
    pub fn enable(iface: &str) -> Result<Self, ForwardingError> {
        enable(iface)?;
        Ok(Self {
            iface: iface.to_owned(),
        })
    }
}

impl Drop for InterfaceForwarding {
    fn drop(&mut self) {
        if let Err(e) = restore(&self.iface) {
            tracing::warn!(iface = %self.iface, error = %e, "restoring the interface's forwarding setting");
        }
    }
}
