//! The command line of `lb-agent` (DESIGN.md, "CLI").

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "lb-agent", version, about = "xdplb: XDP load balancer agent")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum XdpModeArg {
    /// Native (driver) mode, else generic (skb) mode.
    Auto,
    Native,
    Skb,
    /// No fast path: only L7 services are served.
    Off,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load and attach the fast path (or adopt the one a previous agent left running),
    /// fill its maps from the config, and keep them in sync until SIGINT/SIGTERM
    /// (SIGHUP reloads the config). At exit the fast path keeps forwarding, pinned
    /// for the next agent, unless --detach-on-exit.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Interface to attach to (overrides agent.interface).
        #[arg(long)]
        iface: Option<String>,
        /// Overrides dataplane.xdp_mode.
        #[arg(long, value_enum)]
        xdp_mode: Option<XdpModeArg>,
        /// bpffs to pin maps under (overrides agent.bpffs).
        #[arg(long)]
        bpffs: Option<PathBuf>,
        /// Address of the REST API (overrides agent.api_listen).
        #[arg(long)]
        api: Option<SocketAddr>,
        /// Where API changes are persisted (overrides agent.state_dir).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Remove the fast path at exit instead of leaving it running for the next agent.
        #[arg(long)]
        detach_on_exit: bool,
    },
    /// Validate a config file: exit 0, or exit 1 listing every error (file:line:column: key: why).
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Backend side: decapsulate tunnelled packets addressed to this host.
    Decap {
        #[command(subcommand)]
        action: DecapAction,
    },
    /// Talk to a running agent's REST API.
    Ctl {
        #[arg(long, default_value = "http://127.0.0.1:9090")]
        api: String,
        #[arg(long, env = "XDPLB_TOKEN")]
        token: Option<String>,
        #[command(subcommand)]
        cmd: crate::ctl::CtlCommand,
    },
    /// Remove the balancer's fast path and everything pinned for it on an interface.
    /// With `--config` naming a config that has a `[bgp]` table, the VIPs are withdrawn
    /// first (the include file without routes, `birdc configure`) and `drain_s` waited;
    /// when BIRD does not take the withdrawal, nothing is detached. Stop the agent first.
    Detach {
        #[arg(long)]
        iface: String,
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        /// The agent's config: its `[bgp]` table says where to withdraw the VIPs.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DecapAction {
    /// Attach the decapsulator (pinned: it stays after this command exits).
    Attach {
        #[arg(long)]
        iface: String,
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        /// Outer destination addresses to accept; default: every non-loopback address
        /// of this host (in this network namespace).
        #[arg(long = "address")]
        addresses: Vec<IpAddr>,
        #[arg(long, value_enum, default_value = "auto")]
        xdp_mode: XdpModeArg,
        /// UDP port of GUE tunnels (the balancer's `dataplane.gue_port`): UDP to this
        /// port at an accepted address, with an IPv4 or IPv6 packet right after the UDP
        /// header, is decapsulated too. IPIP is always accepted.
        #[arg(long, default_value_t = crate::config::DEFAULT_GUE_PORT,
              value_parser = clap::value_parser!(u16).range(1..))]
        gue_port: u16,
    },
    /// Detach the decapsulator and remove its pins.
    Detach {
        #[arg(long)]
        iface: String,
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
}
