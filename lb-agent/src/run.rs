//! `lb-agent run`: the wiring of the process. Config and command line, the async
//! runtime, the fast path ([`crate::dataplane::fast_path`]) handed to the one owner of
//! desired state ([`Control`]), and the tasks and signals: REST API, L7 proxy, health
//! events, slow-start ramps, retries of failed map writes, reload
//! on SIGHUP, stop on SIGINT/SIGTERM, and the hand-off of the listening sockets to a
//! new agent that takes over ([`crate::handoff`]).

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Mutex,
};

use crate::{
    api::{self, ApiState},
    cli::XdpModeArg,
    cluster::Cluster,
    config::{Config, Mode, XdpMode},
    control::Control,
    dataplane::{desired::NoFastPath, fast_path::FastPath, loader::Capacities},
    decap::attach_mode,
    handoff::{self, HandoffListener, Inherited},
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
    // A running agent for this state directory hands its listening sockets over (and
    // stops its control plane and fast path writes first); none: bind as usual.
    let inherited = handoff::take_over(&config.agent.state_dir, handoff::OFFER_TIMEOUT)
        .map_err(|e| anyhow::anyhow!("taking over from the running agent: {e}"))?;
    if let Some(i) = &inherited {
        tracing::info!(
            pid = i.from_pid,
            api = ?i.api.as_ref().map(|a| a.0),
            l7 = ?i.l7.keys().collect::<Vec<_>>(),
            "taking over from the running agent: its listening sockets are ours"
        );
    }
    let workers = config.agent.worker_threads();
    tracing::info!(
        workers,
        "L7 worker threads (agent.workers; default one per CPU)"
    );
    crate::l7::workers::init(workers).context("starting the L7 worker threads")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(CONTROL_THREADS.min(workers))
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args, config, mode, inherited))
}

/// Threads of the control plane's runtime (API, health checks, reconciler, the L7
/// accept loops); the L7 connections live on their own `workers` threads
/// ([`crate::l7::workers`]).
const CONTROL_THREADS: usize = 2;

async fn serve(
    args: RunArgs,
    config: Config,
    mode: XdpModeArg,
    inherited: Option<Inherited>,
) -> anyhow::Result<()> {
    let token = read_token(&config)?;
    let metrics = Arc::new(Metrics::new());
    let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
    let health = || HealthChecker::new(events_tx.clone(), metrics.health_observer());
    // [cluster]: the link to etcd (lazy: etcd may be down now; the store task retries),
    // and what the file seeds there.
    let cluster = match &config.cluster {
        Some(c) => Some(ClusterStart {
            cluster: Cluster::connect(c)
                .await
                .map_err(|e| anyhow::anyhow!("[cluster]: {e}"))?,
            seed: (config.services.clone(), config.security.clone()),
        }),
        None => None,
    };
    let link = cluster.as_ref().map(|c| c.cluster.clone());
    let without_fast_path = |config: Config, why: &str| -> anyhow::Result<Control> {
        let l4: Vec<&str> = config
            .services
            .iter()
            .filter(|s| s.mode == Mode::L4)
            .map(|s| s.name.as_str())
            .collect();
        tracing::warn!(not_served = ?l4, "{why}: L4 services are not served; L7 services are");
        Ok(Control::new_with(
            config,
            health(),
            Box::new(NoFastPath),
            link.clone(),
        )?)
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
        let caps = Capacities::from(&config.dataplane);
        let (loaded, sink) = match FastPath::load(caps, &iface, &bpffs) {
            Ok(loaded) => loaded,
            Err(e) if mode == XdpModeArg::Auto => {
                tracing::error!(error = %format!("{e:#}"), iface, "the XDP program cannot be loaded");
                let control = without_fast_path(config, "running without the fast path")?;
                return serve_with(
                    args, control, None, metrics, events, token, cluster, inherited,
                )
                .await;
            }
            Err(e) => return Err(e),
        };
        let mut control =
            Control::new_with(config.clone(), health(), Box::new(sink), link.clone())?;
        match attach_mode(mode).and_then(|mode| loaded.attach(mode)) {
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
    serve_with(
        args, control, fast_path, metrics, events, token, cluster, inherited,
    )
    .await
}

/// `[cluster]` at start: the link to etcd and what the config file seeds there.
struct ClusterStart {
    cluster: Arc<Cluster>,
    seed: (
        Vec<crate::config::ServiceConfig>,
        crate::config::SecurityConfig,
    ),
}

/// With `[cluster]`: make `<state_dir>/sticky.key` the cluster's key (created in etcd
/// by the first node, read by the others), before the L7 services load it, so a cookie
/// issued by one node is honoured by every node. Without etcd now, the local key stays
/// (and says so).
async fn share_sticky_key(cluster: &Cluster, state_dir: &std::path::Path) {
    use rand::TryRngCore as _;
    let mut fresh = [0u8; 32];
    if rand::rngs::OsRng.try_fill_bytes(&mut fresh).is_err() {
        tracing::error!("cannot generate a sticky key: keeping the local one");
        return;
    }
    match cluster.store.sticky_key(&fresh).await {
        Ok(key) => {
            let path = state_dir.join(crate::l7::sticky::KEY_FILE);
            if std::fs::read(&path).is_ok_and(|k| k == key) {
                return;
            }
            let write = || -> std::io::Result<()> {
                use std::{io::Write as _, os::unix::fs::PermissionsExt as _};
                std::fs::create_dir_all(state_dir)?;
                let mut tmp = tempfile::NamedTempFile::new_in(state_dir)?;
                tmp.as_file()
                    .set_permissions(std::fs::Permissions::from_mode(0o600))?;
                tmp.write_all(&key)?;
                tmp.as_file().sync_all()?;
                tmp.persist(&path).map_err(|e| e.error)?;
                Ok(())
            };
            match write() {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "sticky key: the cluster's (from etcd)")
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot write the cluster's sticky key")
                }
            }
        }
        Err(e) => tracing::warn!(
            error = %e,
            "sticky key: etcd unreachable at start, keeping the local key (cookies of other nodes are not honoured until a restart with etcd)"
        ),
    }
}

/// Commands to the L7 task besides the published changes.
enum L7Cmd {
    /// Stop every service and remove the VIPs added to `lo`.
    Stop,
    /// Give duplicates of the listening sockets (and the VIPs added to `lo`), then,
    /// once `release` fires, stop accepting and drain, leaving the VIPs.
    HandOff {
        fds: tokio::sync::oneshot::Sender<L7Sockets>,
        release: tokio::sync::oneshot::Receiver<()>,
    },
}

/// The L7 listening sockets by VIP, and the VIPs this agent added to `lo`.
type L7Sockets = (
    Vec<(std::net::SocketAddr, std::os::fd::OwnedFd)>,
    Vec<std::net::IpAddr>,
);

/// Why the main loop ended.
enum Stop {
    Signal,
    TakeOver(handoff::Request),
}

/// The next take-over request, or never without a hand-off socket.
async fn next_takeover(h: Option<&HandoffListener>) -> handoff::Request {
    match h {
        Some(h) => h.next().await,
        None => std::future::pending().await,
    }
}

/// How long a starting agent waits for its backends' next hops to resolve.
const NEXT_HOPS_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The agent's main loop once the fast path is up (or known to be absent): API, L7
/// proxy, health events, reloads, signals.
#[expect(
    clippy::too_many_arguments,
    reason = "the wiring of the process, called twice"
)]
async fn serve_with(
    args: RunArgs,
    control: Control,
    fast_path: Option<FastPath>,
    metrics: Arc<Metrics>,
    mut events: tokio::sync::mpsc::UnboundedReceiver<crate::health::Transition>,
    token: Option<String>,
    cluster: Option<ClusterStart>,
    inherited: Option<Inherited>,
) -> anyhow::Result<()> {
    let api_listen = control.config().agent.api_listen;
    let services = control.config().services.len();
    let state_dir = control.config().agent.state_dir.clone();
    // Before the API, the VIP announcements and "agent ready": packets to a backend whose
    // next hop is unresolved go up to the kernel, which cannot forward them (a client sees
    // "no route to host"). The kernel resolves them in milliseconds; bounded all the same.
    if let Some(fp) = &fast_path {
        fp.next_hops_resolved(NEXT_HOPS_WAIT).await;
    }
    if let Some(c) = &cluster {
        share_sticky_key(&c.cluster, &state_dir).await;
    }
    let own_view = control.watch_own_view();
    let mut l7_desired = control.watch_l7();
    let mut retry_at = control.watch_retry();
    let control = Arc::new(Mutex::new(control));
    // [cluster]: the store task feeds the control plane from etcd.
    let (store_stop, store_stopped) = tokio::sync::watch::channel(false);
    let store_task = cluster.zip(own_view).map(|(c, own_view)| {
        let _ = metrics.cluster.set(c.cluster.clone());
        crate::cluster::spawn(
            c.cluster,
            crate::cluster::Feed {
                control: control.clone(),
                own_view,
                seed: c.seed,
            },
            store_stopped,
        )
    });

    // The L7 proxy: one task applies every published change of the l7 services.
    let l7 = L7Registry::default();
    let (l7_cmd, mut l7_cmds) = tokio::sync::mpsc::channel::<L7Cmd>(1);
    let mut manager = L7Manager::new(state_dir.clone(), metrics.http.clone(), l7.clone());
    let (mut inherited_api, inherited) = match inherited {
        Some(mut i) => {
            manager.inherit(std::mem::take(&mut i.l7), i.vips_added.drain(..));
            (i.api.take(), Some(i))
        }
        None => (None, None),
    };
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
                cmd = l7_cmds.recv() => match cmd {
                    Some(L7Cmd::HandOff { fds, release }) => {
                        let _ = fds.send(manager.listeners());
                        let _ = release.await;
                        manager.release().await;
                        return;
                    }
                    Some(L7Cmd::Stop) | None => break,
                },
            }
            let desired = l7_desired.borrow_and_update().clone();
            manager.sync(&desired).await;
        }
        manager.shutdown().await;
    });
    let listener = match inherited_api.take() {
        Some((addr, l)) if addr == api_listen => l
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(l))
            .with_context(|| {
                format!("the REST API socket on {api_listen} from the previous agent")
            })?,
        _ => tokio::net::TcpListener::bind(api_listen)
            .await
            .with_context(|| format!("binding the REST API to {api_listen}"))?,
    };
    // A duplicate of the API socket, for the next agent.
    let api_fd = {
        use std::os::fd::AsFd as _;
        listener.as_fd().try_clone_to_owned().ok()
    };
    let (api_stop, api_stopped) = tokio::sync::oneshot::channel::<()>();
    // Announcing VIPs through BIRD ([bgp]): a task of its own, stopped with the agent
    // (routes stay as they are: hitless restart).
    let bgp_node = control
        .lock()
        .await
        .config()
        .bgp
        .clone()
        .map(|cfg| crate::bgp::BgpNode::new(crate::bgp::Announcer::new(cfg)));
    let (bgp_stop, bgp_stopped) = tokio::sync::watch::channel(false);
    let bgp_task = bgp_node.clone().map(|node| {
        let _ = metrics.bgp.set(node.clone());
        crate::bgp::spawn(
            node,
            control.clone(),
            l7.clone(),
            fast_path.is_some(),
            bgp_stopped,
        )
    });
    let router = api::router(ApiState {
        control: control.clone(),
        token,
        metrics,
        config_path: args.config.clone(),
        l7,
        bgp: bgp_node,
    });
    let api_task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = api_stopped.await;
            })
            .await
    });
    // The previous agent stops accepting and drains once this one serves; then this
    // one takes the hand-off socket over (it answers the next agent).
    if let Some(i) = inherited {
        let pid = i.from_pid;
        match i.ready() {
            Ok(()) => tracing::info!(pid, "the previous agent drains its connections and exits"),
            Err(e) => tracing::warn!(pid, error = %e, "telling the previous agent to drain"),
        }
    }
    let handoff = match HandoffListener::bind(&state_dir) {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(dir = %state_dir.display(), error = %e, "no hand-off socket: a new agent cannot take over hitlessly (the L7 listeners stop at a restart)");
            None
        }
    };
    tracing::info!(services, api = %api_listen, "agent ready");

    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut ramp = tokio::time::interval(SLOW_START_STEP);
    ramp.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = loop {
        let retry_due = *retry_at.borrow_and_update();
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break Stop::Signal; }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break Stop::Signal; }
            req = next_takeover(handoff.as_ref()) => {
                tracing::info!("a new agent takes over: stopping the control plane, handing over the listening sockets");
                break Stop::TakeOver(req);
            }
            _ = sighup.recv() => {
                let mut c = control.lock().await;
                // SIGHUP never removes every service (POST /api/v1/reload can, when asked).
                match c.reload(&args.config, false).await {
                    // Control logs what the reload changed.
                    Ok(_report) => {}
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
            // A failed map write is due for another try (Control logs the outcome).
            () = sleep_until(retry_due) => {
                let _ = control.lock().await.retry_writes_at(Instant::now());
            }
            // The retry deadline moved: sleep on the new one.
            Ok(()) = retry_at.changed() => {}
        }
    };
    // At a take-over, the L7 services keep accepting until the new agent serves.
    let l7_handoff = match &stop {
        Stop::TakeOver(_) => {
            let (fds_tx, fds_rx) = tokio::sync::oneshot::channel();
            let (release_tx, release) = tokio::sync::oneshot::channel();
            let _ = l7_cmd
                .send(L7Cmd::HandOff {
                    fds: fds_tx,
                    release,
                })
                .await;
            Some((fds_rx.await.unwrap_or_default(), release_tx))
        }
        Stop::Signal => None,
    };
    let _ = api_stop.send(());
    match tokio::time::timeout(Duration::from_secs(5), api_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "REST API server"),
        Ok(Err(e)) => tracing::warn!(error = %e, "REST API task"),
        Err(_) => tracing::warn!("REST API did not finish within 5 s"),
    }
    let _ = store_stop.send(true);
    if let Some(task) = store_task {
        if let Err(e) = task.await {
            tracing::warn!(error = %e, "cluster store task");
        }
    }
    let _ = bgp_stop.send(true);
    if let Some(task) = bgp_task {
        if let Err(e) = task.await {
            tracing::warn!(error = %e, "BGP task");
        }
    }
    let Stop::TakeOver(req) = stop else {
        let _ = l7_cmd.send(L7Cmd::Stop).await;
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
        if let Some(h) = handoff {
            h.remove();
        }
        return Ok(());
    };
    // Take-over: the fast path stays for the new agent to adopt (never detached here).
    let snapshot = {
        let mut c = control.lock().await;
        c.shutdown();
        c.snapshot()
    };
    if let Some(fp) = fast_path {
        fp.stop(snapshot, false).await;
    }
    let ((l7_fds, vips_added), release) = match l7_handoff {
        Some((sockets, release)) => (sockets, Some(release)),
        None => (L7Sockets::default(), None),
    };
    let mut offer = handoff::Offer {
        version: 1,
        pid: std::process::id(),
        api: None,
        l7: Vec::new(),
        vips_added,
    };
    let mut fds = Vec::new();
    if let Some(fd) = api_fd {
        offer.api = Some(api_listen);
        fds.push(fd);
    }
    for (addr, fd) in l7_fds {
        offer.l7.push(addr);
        fds.push(fd);
    }
    let outcome =
        tokio::task::spawn_blocking(move || req.offer(&offer, &fds, handoff::READY_TIMEOUT)).await;
    match outcome {
        Ok(handoff::Outcome::Ready) => {
            tracing::info!("the new agent serves: draining the L7 connections, then exiting");
        }
        Ok(handoff::Outcome::Gone(why)) => tracing::error!(
            why,
            "the new agent is not ready: draining the L7 connections and exiting all the same"
        ),
        Err(e) => tracing::error!(error = %e, "hand-off task"),
    }
    if let Some(release) = release {
        let _ = release.send(());
    }
    if let Err(e) = l7_task.await {
        tracing::warn!(error = %e, "L7 task");
    }
    if let Some(h) = handoff {
        h.remove();
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

/// Sleep until `deadline`, or forever when there is none.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
