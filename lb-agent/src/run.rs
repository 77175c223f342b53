//! `lb-agent run`: load the fast path, hand the maps to the one reconciler behind
//! [`Control`], start health checks, keep next hops resolved, reload on SIGHUP, and
//! detach cleanly on SIGINT/SIGTERM.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Mutex,
};

use crate::{
    api::{self, ApiState},
    cli::XdpModeArg,
    config::{Config, Mode, ServiceConfig, XdpMode},
    control::{Control, NoFastPath, ServiceTraffic, Sink, Snapshot, Traffic},
    dataplane::{
        forwarding,
        loader::{self, Capacities, LB_PROGRAM, Role},
        maps::Maps,
        neigh::NextHopKeeper,
        stats,
        sync::{DesiredState, Reconciler},
    },
    decap::attach_mode,
    health::HealthChecker,
    l7::manager::{L7Manager, L7Registry},
    metrics::Metrics,
};

/// How often L7 services that failed to start are tried again.
const L7_RETRY: Duration = Duration::from_secs(5);

/// How often slow-starting backends get their weights raised.
const SLOW_START_STEP: Duration = Duration::from_millis(500);

pub struct RunArgs {
    pub config: PathBuf,
    pub iface: Option<String>,
    pub xdp_mode: Option<XdpModeArg>,
    pub bpffs: Option<PathBuf>,
    pub api: Option<std::net::SocketAddr>,
    pub state_dir: Option<PathBuf>,
    /// Remove the fast path when the agent stops, instead of leaving it running.
    pub detach_on_exit: bool,
}

/// The config file with the command line's overrides, validated again.
fn load_config(args: &RunArgs) -> anyhow::Result<Config> {
    let mut config = Config::load(&args.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(api) = args.api {
        config.agent.api_listen = api;
    }
    if let Some(dir) = &args.state_dir {
        config.agent.state_dir.clone_from(dir);
    }
    if let Some(iface) = &args.iface {
        config.agent.interface = Some(iface.clone());
    }
    let errors = config.validate();
    if !errors.is_empty() {
        let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::bail!(
            "with the command-line overrides the config is invalid:\n{}",
            list.join("\n")
        );
    }
    Ok(config)
}

/// Name of the pinned XDP link in the balancer's pin directory.
const LINK_PIN: &str = "link";

/// The balancer's maps and their one writer.
struct MapsSink {
    maps: Maps,
    capacities: Capacities,
    /// None until the first apply when maps left by a previous agent are to be adopted
    /// (recognising its services needs the first desired state).
    reconciler: Option<Reconciler>,
}

impl Sink for MapsSink {
    fn apply(&mut self, desired: &DesiredState) -> anyhow::Result<()> {
        let caps = self.capacities;
        let reconciler = match &mut self.reconciler {
            Some(r) => r,
            None => {
                let r = Reconciler::adopt(
                    &self.maps,
                    caps.ring_size,
                    caps.max_services,
                    caps.max_backends,
                    desired,
                )
                .context("reading back the maps of the running fast path")?;
                self.reconciler.insert(r)
            }
        };
        for s in reconciler.apply(&mut self.maps, desired)? {
            if s.slots_changed > 0 {
                tracing::info!(service = %s.name, id = s.service_id, backends = ?s.backends, slots_changed = s.slots_changed, "ring written");
            }
        }
        Ok(())
    }

    fn snapshot(&self, services: &[ServiceConfig]) -> Option<Snapshot> {
        let c = stats::counters(&self.maps).ok()?;
        let mut snap = Snapshot {
            counters: c.counters.iter().map(|(k, v)| (k.label(), *v)).collect(),
            drops: c.drops.iter().map(|(k, v)| (k.label(), *v)).collect(),
            ..Default::default()
        };
        let reconciler = self.reconciler.as_ref()?;
        for svc in services.iter().filter(|s| s.mode == Mode::L4) {
            let Some(id) = reconciler.service_id(&svc.name) else {
                continue;
            };
            let t = stats::service_traffic(&self.maps, id).ok()?;
            let mut st = ServiceTraffic {
                packets: t.packets,
                bytes: t.bytes,
                backends: Default::default(),
            };
            for b in &svc.backends {
                if let Some(bid) = reconciler.backend_id(&svc.name, b.address, b.port) {
                    let t = stats::backend_traffic(&self.maps, bid).ok()?;
                    st.backends.insert(
                        std::net::SocketAddr::new(b.address, b.port).to_string(),
                        Traffic {
                            packets: t.packets,
                            bytes: t.bytes,
                        },
                    );
                }
            }
            snap.services.insert(svc.name.clone(), st);
        }
        Some(snap)
    }
}

/// The attached program. It is pinned (maps and link) under `pin_dir`, so it keeps
/// forwarding when the agent stops; the next agent adopts it.
struct FastPath {
    /// The program as loaded by this agent (the link is pinned, so dropping this does
    /// not detach).
    _ebpf: Ebpf,
    /// Keeps the L4 backends' next hops resolved (None until started, or when netlink
    /// failed).
    next_hops: Option<NextHopKeeper>,
    pin_dir: PathBuf,
    iface: String,
}

/// How [`FastPath::load`] found the pin directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Takeover {
    /// Nothing running: attach anew.
    Fresh,
    /// A fast path pinned by a previous agent, with the same capacities: reuse its maps
    /// and swap the new program into its link.
    Adopt,
}

impl FastPath {
    /// Load the object with its maps pinned (reusing those of a running fast path when
    /// there is one with the same capacities). The program is attached by
    /// [`FastPath::attach`] once the maps are filled, so it never runs on half-filled maps.
    fn load(
        config: &Config,
        iface: &str,
        bpffs: &Path,
    ) -> anyhow::Result<(Ebpf, MapsSink, PathBuf, Takeover)> {
        let dp = &config.dataplane;
        let caps = Capacities {
            max_services: dp.max_services,
            max_backends: dp.max_backends,
            ring_size: dp.ring_size,
            flow_table_size: dp.flow_table_size,
        };
        let pin_dir = loader::pin_dir(bpffs, iface, Role::Balancer)?;
        let running = pin_dir.join(LINK_PIN).exists();
        let takeover = match (running, loader::pinned_capacities(&pin_dir)) {
            (true, Some(pinned)) if pinned == caps => Takeover::Adopt,
            (true, pinned) => {
                tracing::warn!(?pinned, wanted = ?caps, "the running fast path's maps have other capacities or layouts: replacing it (established flows are re-hashed)");
                Takeover::Fresh
            }
            (false, _) => Takeover::Fresh,
        };
        if takeover == Takeover::Fresh && loader::remove_pin_dir(&pin_dir)? {
            tracing::warn!(dir = %pin_dir.display(), "removed pins a previous agent left behind");
        }
        loader::create_pin_dir(&pin_dir)?;
        let mut ebpf = loader::load_pinned(&caps, &pin_dir)?;
        let maps = Maps::take(&mut ebpf, None).context("taking the balancer's maps")?;
        let reconciler = (takeover == Takeover::Fresh)
            .then(|| Reconciler::new(dp.ring_size, dp.max_services, dp.max_backends));
        let sink = MapsSink {
            maps,
            capacities: caps,
            reconciler,
        };
        Ok((ebpf, sink, pin_dir, takeover))
    }

    fn attach(
        mut ebpf: Ebpf,
        iface: &str,
        mode: XdpModeArg,
        pin_dir: PathBuf,
        takeover: Takeover,
    ) -> anyhow::Result<Self> {
        forwarding::enable(iface)?;
        let program = loader::load_program(&mut ebpf, LB_PROGRAM)?;
        let link_pin = pin_dir.join(LINK_PIN);
        match takeover {
            Takeover::Adopt => {
                let pinned = PinnedLink::from_pin(&link_pin)
                    .with_context(|| format!("opening the pinned link {}", link_pin.display()))?;
                let link = XdpLink::try_from(FdLink::from(pinned))
                    .context("the pinned link is not an XDP link")?;
                program
                    .attach_to_link(link)
                    .context("swapping the new program into the running fast path's link")?;
                tracing::info!(iface, pins = %pin_dir.display(), "adopted the running fast path: maps kept, program swapped in place");
            }
            Takeover::Fresh => {
                let (id, mode_used) =
                    loader::attach(program, LB_PROGRAM, iface, attach_mode(mode)?)?;
                let link: FdLink = program.take_link(id)?.try_into().context(
                    "the kernel attached XDP through netlink, which cannot be pinned \
                     (needs bpf_link, Linux 5.9+)",
                )?;
                // The pin holds the link: it stays attached after this process ends.
                link.pin(&link_pin)
                    .with_context(|| format!("pinning the XDP link at {}", link_pin.display()))?;
                tracing::info!(iface, mode = mode_used, pins = %pin_dir.display(), "fast path attached");
            }
        }
        Ok(FastPath {
            _ebpf: ebpf,
            next_hops: None,
            pin_dir,
            iface: iface.to_owned(),
        })
    }

    /// Start keeping the next hops of the L4 backends `backends` publishes resolved
    /// ([`Control::watch_l4_backends`]); the keeper follows every later change by itself
    /// (netlink notifications, no polling).
    fn keep_next_hops(
        &mut self,
        backends: tokio::sync::watch::Receiver<std::collections::BTreeSet<std::net::IpAddr>>,
    ) {
        match NextHopKeeper::spawn(backends) {
            Ok(k) => self.next_hops = Some(k),
            Err(e) => {
                tracing::warn!(error = %e, "cannot keep next hops resolved; packets to unresolved next hops go up to the kernel");
            }
        }
    }

    /// The agent is stopping: log the counters and leave the fast path running (its
    /// next hops and the interface's forwarding setting with it), or remove it all
    /// when `detach`.
    async fn stop(mut self, snapshot: Option<Snapshot>, detach_too: bool) {
        if let Some(s) = snapshot {
            let nonzero: Vec<String> = s
                .counters
                .iter()
                .filter(|(_, v)| **v > 0)
                .map(|(k, v)| format!("{k}={v}"))
                .chain(
                    s.drops
                        .iter()
                        .filter(|(_, v)| **v > 0)
                        .map(|(k, v)| format!("drop_{k}={v}")),
                )
                .collect();
            tracing::info!(iface = %self.iface, counters = %nonzero.join(" "), "fast path counters");
        }
        if detach_too {
            if let Some(k) = self.next_hops.take() {
                k.clear().await;
            }
            drop(self._ebpf);
            if let Err(e) = remove_fast_path(&self.pin_dir, &self.iface) {
                tracing::warn!(error = %e, "removing the fast path");
            } else {
                tracing::info!(iface = %self.iface, "fast path detached, pins removed");
            }
        } else {
            if let Some(k) = self.next_hops.take() {
                k.stop().await;
            }
            tracing::info!(iface = %self.iface, pins = %self.pin_dir.display(), "fast path left running for the next agent; `lb-agent detach --iface {}` removes it", self.iface);
        }
    }
}

/// Unpin everything (the link goes with its last pin: detached) and put the
/// interface's forwarding setting back.
fn remove_fast_path(pin_dir: &Path, iface: &str) -> anyhow::Result<bool> {
    let removed = loader::remove_pin_dir(pin_dir)?;
    forwarding::restore(iface)?;
    Ok(removed)
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
    let config = load_config(&args)?;
    let mode = effective_mode(&config, args.xdp_mode);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args, config, mode))
}

async fn serve(args: RunArgs, config: Config, mode: XdpModeArg) -> anyhow::Result<()> {
    let token = read_token(&config)?;
    let metrics = Arc::new(Metrics::new());
    let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
    let health = || HealthChecker::new(events_tx.clone(), metrics.health_observer());
    let without_fast_path = |config: Config, why: &str| -> anyhow::Result<Control> {
        let l4: Vec<&str> = config
            .services
            .iter()
            .filter(|s| s.mode == Mode::L4)
            .map(|s| s.name.as_str())
            .collect();
        tracing::warn!(not_served = ?l4, "{why}: L4 services are not served; L7 services are");
        Ok(Control::new(config, health(), Box::new(NoFastPath))?)
    };

    let (control, fast_path) = if mode == XdpModeArg::Off {
        (without_fast_path(config, "XDP is off")?, None)
    } else {
        let iface = args
            .iface
            .clone()
            .or_else(|| config.agent.interface.clone())
            .context("no interface: set agent.interface in the config or pass --iface")?;
        let bpffs = args
            .bpffs
            .clone()
            .unwrap_or_else(|| config.agent.bpffs.clone());
        let (ebpf, sink, pin_dir, takeover) = match FastPath::load(&config, &iface, &bpffs) {
            Ok(loaded) => loaded,
            Err(e) if mode == XdpModeArg::Auto => {
                tracing::error!(error = %format!("{e:#}"), iface, "the XDP program cannot be loaded");
                let control = without_fast_path(config, "running without the fast path")?;
                return serve_with(args, control, None, metrics, events, token).await;
            }
            Err(e) => return Err(e),
        };
        let mut control = Control::new(config.clone(), health(), Box::new(sink))?;
        match FastPath::attach(ebpf, &iface, mode, pin_dir, takeover) {
            Ok(mut fp) => {
                fp.keep_next_hops(control.watch_l4_backends());
                (control, Some(fp))
            }
            // With --xdp-mode auto, a host where XDP cannot attach still serves L7.
            Err(e) if mode == XdpModeArg::Auto => {
                tracing::error!(error = %format!("{e:#}"), iface, "XDP cannot attach");
                control.shutdown();
                drop(control);
                (
                    without_fast_path(config, "running without the fast path")?,
                    None,
                )
            }
            Err(e) => return Err(e),
        }
    };
    serve_with(args, control, fast_path, metrics, events, token).await
}

/// The agent's main loop once the fast path is up (or known to be absent): API, L7
/// proxy, health events, reloads, signals.
async fn serve_with(
    args: RunArgs,
    control: Control,
    fast_path: Option<FastPath>,
    metrics: Arc<Metrics>,
    mut events: tokio::sync::mpsc::UnboundedReceiver<crate::health::Transition>,
    token: Option<String>,
) -> anyhow::Result<()> {
    let api_listen = control.config().agent.api_listen;
    let services = control.config().services.len();
    let state_dir = control.config().agent.state_dir.clone();
    let mut l7_desired = control.watch_l7();
    let control = Arc::new(Mutex::new(control));

    // The L7 proxy: one task applies every published change of the l7 services.
    let l7 = L7Registry::default();
    let (l7_stop, mut l7_stopped) = tokio::sync::watch::channel(false);
    let mut manager = L7Manager::new(state_dir, metrics.http.clone(), l7.clone());
    let first = l7_desired.borrow_and_update().clone();
    manager.sync(&first).await;
    let l7_task = tokio::spawn(async move {
        let mut retry = tokio::time::interval(L7_RETRY);
        retry.tick().await;
        loop {
            tokio::select! {
                changed = l7_desired.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                _ = retry.tick(), if manager.has_failures() => {}
                _ = l7_stopped.changed() => break,
            }
            let desired = l7_desired.borrow_and_update().clone();
            manager.sync(&desired).await;
        }
        manager.shutdown().await;
    });
    let listener = tokio::net::TcpListener::bind(api_listen)
        .await
        .with_context(|| format!("binding the REST API to {api_listen}"))?;
    let (api_stop, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let router = api::router(ApiState {
        control: control.clone(),
        token,
        metrics,
        config_path: args.config.clone(),
        l7,
    });
    let api_task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = api_stopped.await;
            })
            .await
    });
    tracing::info!(services, api = %api_listen, "agent ready");

    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut ramp = tokio::time::interval(SLOW_START_STEP);
    ramp.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = sighup.recv() => {
                let mut c = control.lock().await;
                match c.reload(&args.config) {
                    Ok(()) => {
                        tracing::info!(services = c.config().services.len(), "config reloaded");
                    }
                    Err(e) => tracing::error!(error = %e, "config reload rejected; keeping the running config"),
                }
            }
            Some(t) = events.recv() => {
                let mut c = control.lock().await;
                // Coalesce a burst of transitions into one recompute.
                let mut n = 1;
                while events.try_recv().is_ok() {
                    n += 1;
                }
                if let Err(e) = c.recompute() {
                    tracing::error!(error = %e, transitions = n, "applying health changes");
                } else {
                    tracing::info!(service = %t.key.service, backend = %t.key.address, up = t.up, transitions = n, "health change applied");
                }
            }
            _ = ramp.tick() => {
                let mut c = control.lock().await;
                if c.ramping() {
                    if let Err(e) = c.recompute() {
                        tracing::error!(error = %e, "raising slow-start weights");
                    }
                }
            }
        }
    }
    let _ = api_stop.send(());
    match tokio::time::timeout(Duration::from_secs(5), api_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "REST API server"),
        Ok(Err(e)) => tracing::warn!(error = %e, "REST API task"),
        Err(_) => tracing::warn!("REST API did not finish within 5 s"),
    }
    let _ = l7_stop.send(true);
    if let Err(e) = l7_task.await {
        tracing::warn!(error = %e, "L7 task");
    }
    let snapshot = {
        let mut c = control.lock().await;
        c.shutdown();
        c.snapshot()
    };
    if let Some(fp) = fast_path {
        fp.stop(snapshot, args.detach_on_exit).await;
    }
    Ok(())
}

/// The API's bearer token from `agent.api_token_file`, if one is configured.
fn read_token(config: &Config) -> anyhow::Result<Option<String>> {
    let Some(path) = &config.agent.api_token_file else {
        return Ok(None);
    };
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading agent.api_token_file {}", path.display()))?;
    let token = token.trim();
    anyhow::ensure!(
        !token.is_empty(),
        "agent.api_token_file {} is empty",
        path.display()
    );
    Ok(Some(token.to_owned()))
}

/// `lb-agent detach`: remove the balancer's pins for `iface` (a running agent detaches
/// itself when it stops).
pub fn detach(iface: &str, bpffs: &Path) -> anyhow::Result<()> {
    let dir = loader::pin_dir(bpffs, iface, Role::Balancer)?;
    if remove_fast_path(&dir, iface)? {
        println!("removed the fast path pinned for {iface}");
    } else {
        println!("nothing pinned for {iface} under {}", bpffs.display());
    }
    Ok(())
}
