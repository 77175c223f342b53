//! Per-interface IP forwarding for the attached interface.
//!
//! `bpf_fib_lookup` refuses to route (`BPF_FIB_LKUP_RET_FWD_DISABLED`) unless
//! forwarding is enabled on the interface the packet came in on, whatever lookup flags
//! are used (measured on Linux 6.18). The agent therefore enables
//! `net.ipv4.conf.<iface>.forwarding` on the interface it attaches to, and only there
//! (the host's other interfaces and the global switch are left alone), and puts the
//! previous value back when it stops.

use std::{io, path::PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct ForwardingError {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

fn path(iface: &str) -> PathBuf {
    PathBuf::from(format!("/proc/sys/net/ipv4/conf/{iface}/forwarding"))
}

/// Forwarding switched on for one interface; dropping it puts the previous value back.
#[derive(Debug)]
pub struct InterfaceForwarding {
    iface: String,
    previous: String,
}

impl InterfaceForwarding {
    /// Enable IPv4 forwarding on `iface`, remembering the previous setting.
    pub fn enable(iface: &str) -> Result<Self, ForwardingError> {
        let p = path(iface);
        let previous = std::fs::read_to_string(&p).map_err(|source| ForwardingError {
            action: "reading",
            path: p.clone(),
            source,
        })?;
        let previous = previous.trim().to_owned();
        if previous != "1" {
            std::fs::write(&p, "1").map_err(|source| ForwardingError {
                action: "enabling forwarding in",
                path: p.clone(),
                source,
            })?;
            tracing::info!(
                iface,
                "enabled IPv4 forwarding on the interface (bpf_fib_lookup needs it)"
            );
        }
        Ok(InterfaceForwarding {
            iface: iface.to_owned(),
            previous,
        })
    }
}

impl Drop for InterfaceForwarding {
    fn drop(&mut self) {
        if self.previous != "1" {
            let p = path(&self.iface);
            if let Err(e) = std::fs::write(&p, &self.previous) {
                tracing::warn!(iface = %self.iface, error = %e, "restoring the interface's forwarding setting");
            }
        }
    }
}
