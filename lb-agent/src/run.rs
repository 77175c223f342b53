//! `lb-agent run`: load the fast path, fill its maps from the config, keep next hops
//! resolved, reload on SIGHUP, and detach cleanly on SIGINT/SIGTERM.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use aya::Ebpf;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::XdpModeArg,
    config::{Config, Mode, XdpMode},
    dataplane::{
        forwarding::InterfaceForwarding,
        loader::{self, Capacities, LB_PROGRAM, Role},
        maps::Maps,
        neigh::NextHopKeeper,
        stats,
        sync::{DesiredState, Reconciler},
    },
    decap::attach_mode,
};

/// How often next hops are re-checked (routes may change under us).
const NEXT_HOP_REFRESH: Duration = Duration::from_secs(10);

pub struct RunArgs {
    pub config: PathBuf,
    pub iface: Option<String>,
    pub xdp_mode: Option<XdpModeArg>,
    pub bpffs: Option<PathBuf>,
}

/// The attached fast path and everything that writes to it.
struct FastPath {
    /// Holds the program and its link: dropping it detaches.
    _ebpf: Ebpf,
    maps: Maps,
    reconciler: Reconciler,
    next_hops: NextHopKeeper,
    /// Restores the interface's forwarding setting when dropped.
    _forwarding: InterfaceForwarding,
    pin_dir: PathBuf,
    iface: String,
}

fn l4_backends(config: &Config) -> BTreeSet<IpAddr> {
    config
        .services
        .iter()
        .filter(|s| s.mode == Mode::L4)
        .flat_map(|s| s.backends.iter().map(|b| b.address))
        .collect()
}

impl FastPath {
    fn start(config: &Config, iface: &str, mode: XdpModeArg, bpffs: &Path) -> anyhow::Result<Self> {
        let dp = &config.dataplane;
        let caps = Capacities {
            max_services: dp.max_services,
            max_backends: dp.max_backends,
            ring_size: dp.ring_size,
            flow_table_size: dp.flow_table_size,
        };
        let pin_dir = loader::pin_dir(bpffs, iface, Role::Balancer)?;
        if loader::remove_pin_dir(&pin_dir)? {
            tracing::warn!(dir = %pin_dir.display(), "removed pins a previous agent left behind");
        }
        let mut ebpf = loader::load(&caps)?;
        loader::create_pin_dir(&pin_dir)?;
        let mut maps =
            Maps::take(&mut ebpf, Some(&pin_dir)).context("taking the balancer's maps")?;
        let mut reconciler = Reconciler::new(dp.ring_size, dp.max_services, dp.max_backends);
        let desired = DesiredState::from_config(config);
        let applied = reconciler.apply(&mut maps, &desired)?;
        for s in &applied {
            tracing::info!(service = %s.name, id = s.service_id, backends = ?s.backends, slots_changed = s.slots_changed, "service written");
        }
        let mut next_hops = NextHopKeeper::default();
        for (addr, e) in next_hops.ensure(&l4_backends(config)) {
            tracing::warn!(backend = %addr, error = %e, "cannot keep the next hop resolved; its packets go up to the kernel until it resolves");
        }
        let forwarding = InterfaceForwarding::enable(iface)?;
        // Attach last, so the program never runs on half-filled maps.
        let program = loader::load_program(&mut ebpf, LB_PROGRAM)?;
        let (_link, mode_used) = loader::attach(program, LB_PROGRAM, iface, attach_mode(mode)?)?;
        tracing::info!(iface, mode = mode_used, pins = %pin_dir.display(), "fast path attached");
        Ok(FastPath {
            _ebpf: ebpf,
            maps,
            reconciler,
            next_hops,
            _forwarding: forwarding,
            pin_dir,
            iface: iface.to_owned(),
        })
    }

    fn reload(&mut self, config: &Config) -> anyhow::Result<()> {
        let applied = self
            .reconciler
            .apply(&mut self.maps, &DesiredState::from_config(config))?;
        for s in &applied {
            tracing::info!(service = %s.name, id = s.service_id, backends = ?s.backends, slots_changed = s.slots_changed, "service written");
        }
        self.refresh_next_hops(config);
        Ok(())
    }

    fn refresh_next_hops(&mut self, config: &Config) {
        for (addr, e) in self.next_hops.ensure(&l4_backends(config)) {
            tracing::warn!(backend = %addr, error = %e, "cannot keep the next hop resolved");
        }
    }

    fn log_counters(&self) {
        match stats::counters(&self.maps) {
            Ok(c) => {
                let nonzero: Vec<String> = c
                    .counters
                    .iter()
                    .filter(|(_, v)| *v > 0)
                    .map(|(k, v)| format!("{}={v}", k.label()))
                    .chain(
                        c.drops
                            .iter()
                            .filter(|(_, v)| *v > 0)
                            .map(|(k, v)| format!("drop_{}={v}", k.label())),
                    )
                    .collect();
                tracing::info!(iface = %self.iface, counters = %nonzero.join(" "), "fast path counters");
            }
            Err(e) => tracing::warn!(error = %e, "reading counters"),
        }
    }

    fn stop(mut self) {
        self.log_counters();
        self.next_hops.clear();
        let FastPath {
            _ebpf,
            maps,
            pin_dir,
            iface,
            _forwarding,
            ..
        } = self;
        drop(maps);
        drop(_ebpf);
        drop(_forwarding);
        match loader::remove_pin_dir(&pin_dir) {
            Ok(_) => tracing::info!(%iface, "fast path detached, pins removed"),
            Err(e) => tracing::warn!(error = %e, "removing pins"),
        }
    }
}

fn effective_mode(config: &Config, arg: Option<XdpModeArg>) -> XdpModeArg {
    arg.unwrap_or(match config.dataplane.xdp_mode {
        XdpMode::Auto => XdpModeArg::Auto,
        XdpMode::Native => XdpModeArg::Native,
        XdpMode::Skb => XdpModeArg::Skb,
        XdpMode::Off => XdpModeArg::Off,
    })
}

/// `lb-agent run`.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let iface = args
        .iface
        .clone()
        .or_else(|| config.agent.interface.clone())
        .context("no interface: set agent.interface in the config or pass --iface")?;
    let bpffs = args
        .bpffs
        .clone()
        .unwrap_or_else(|| config.agent.bpffs.clone());
    let mode = effective_mode(&config, args.xdp_mode);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args, config, iface, bpffs, mode))
}

async fn serve(
    args: RunArgs,
    mut config: Config,
    iface: String,
    bpffs: PathBuf,
    mode: XdpModeArg,
) -> anyhow::Result<()> {
    let mut fast_path = if mode == XdpModeArg::Off {
        let l4: Vec<&str> = config
            .services
            .iter()
            .filter(|s| s.mode == Mode::L4)
            .map(|s| s.name.as_str())
            .collect();
        tracing::warn!(not_served = ?l4, "XDP is off: L4 services are not served");
        None
    } else {
        Some(FastPath::start(&config, &iface, mode, &bpffs)?)
    };
    tracing::info!(services = config.services.len(), "agent ready");

    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut refresh = tokio::time::interval(NEXT_HOP_REFRESH);
    refresh.tick().await;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = sighup.recv() => {
                match Config::load(&args.config) {
                    Ok(new) => {
                        if let Some(fp) = fast_path.as_mut() {
                            if let Err(e) = fp.reload(&new) {
                                tracing::error!(error = %format!("{e:#}"), "reload failed to apply; maps may be partly updated");
                                continue;
                            }
                        }
                        tracing::info!(services = new.services.len(), "config reloaded");
                        config = new;
                    }
                    Err(errors) => tracing::error!(%errors, "config reload rejected; keeping the running config"),
                }
            }
            _ = refresh.tick() => {
                if let Some(fp) = fast_path.as_mut() {
                    fp.refresh_next_hops(&config);
                }
            }
        }
    }
    if let Some(fp) = fast_path {
        fp.stop();
    }
    Ok(())
}

/// `lb-agent detach`: remove the balancer's pins for `iface` (a running agent detaches
/// itself when it stops).
pub fn detach(iface: &str, bpffs: &Path) -> anyhow::Result<()> {
    let dir = loader::pin_dir(bpffs, iface, Role::Balancer)?;
    if loader::remove_pin_dir(&dir)? {
        println!("removed the fast path pinned for {iface}");
    } else {
        println!("nothing pinned for {iface} under {}", bpffs.display());
    }
    Ok(())
}
