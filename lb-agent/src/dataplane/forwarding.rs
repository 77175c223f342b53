//! Per-interface IP forwarding for the attached interface.
//!
//! `bpf_fib_lookup` refuses to route (`BPF_FIB_LKUP_RET_FWD_DISABLED`) unless
//! forwarding is enabled on the interface the packet came in on, whatever lookup flags
//! are used (measured on Linux 6.18). The agent therefore enables
//! `net.ipv4.conf.<iface>.forwarding` on the interface it attaches to, and only there
//! (the host's other interfaces and the global switch are left alone).
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

fn sysctl(iface: &str) -> PathBuf {
    PathBuf::from(format!("/proc/sys/net/ipv4/conf/{iface}/forwarding"))
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

/// Enable IPv4 forwarding on `iface`. The first call records the value it found; later
/// calls (a restarted agent) keep that record.
pub fn enable(iface: &str) -> Result<(), ForwardingError> {
    let p = sysctl(iface);
    let current = read(&p)?;
    let rec = record(iface)?;
    if !rec.exists() {
        std::fs::create_dir_all(RECORD_DIR).map_err(|source| ForwardingError {
            action: "creating",
            path: RECORD_DIR.into(),
            source,
        })?;
        write(&rec, &current, "recording the forwarding setting in")?;
    }
    if current != "1" {
        write(&p, "1", "enabling forwarding in")?;
        tracing::info!(
            iface,
            "enabled IPv4 forwarding on the interface (bpf_fib_lookup needs it)"
        );
    }
    Ok(())
}

/// Put back the value recorded by [`enable`] (if any) and forget it. Returns whether
/// there was a record.
pub fn restore(iface: &str) -> Result<bool, ForwardingError> {
    let rec = record(iface)?;
    let original = match std::fs::read_to_string(&rec) {
        Ok(v) => v.trim().to_owned(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(ForwardingError {
                action: "reading",
                path: rec,
                source,
            });
        }
    };
    let p = sysctl(iface);
    // The interface may be gone (and its setting with it).
    if p.exists() && read(&p)? != original {
        write(&p, &original, "restoring forwarding in")?;
    }
    std::fs::remove_file(&rec).map_err(|source| ForwardingError {
        action: "removing",
        path: rec,
        source,
    })?;
    Ok(true)
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
