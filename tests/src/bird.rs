//! BIRD 2 daemons for namespace test beds (DESIGN.md, "Several LB nodes"): each in the
//! foreground inside its namespace, with its own config, control socket, pid file and
//! log under a scratch directory (`bird -f -c FILE -s SOCK -P PIDFILE`), stopped when
//! its [`Bird`] drops; and `birdc` against a socket.
//!
//! Measured pitfalls: `router` is a reserved word in BIRD (name protocols otherwise);
//! `include` of a missing file is a config error (write it, empty, first); BGP and BFD
//! need `protocol device {}`.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;

use crate::netns::{self, ChildGuard};

/// How long a new BIRD may take to answer on its control socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Fails with a message naming the package when `bird` or `birdc` is missing.
pub fn require() -> anyhow::Result<()> {
    anyhow::ensure!(
        which::which("bird").is_ok() && which::which("birdc").is_ok(),
        "bird and birdc are needed (Debian package bird2; `cargo xtask setup` installs it)"
    );
    Ok(())
}

/// A running BIRD 2 daemon.
#[derive(Debug)]
pub struct Bird {
    /// Its name (file names under the directory: `<name>.conf`, `.ctl`, `.pid`, `.log`).
    pub name: String,
    /// Its namespace.
    pub ns: String,
    /// Its control socket.
    pub socket: PathBuf,
    /// Its config file.
    pub config: PathBuf,
    log: PathBuf,
    child: Option<ChildGuard>,
}

impl Bird {
    /// Writes `config` to `<dir>/<name>.conf`, starts BIRD in `ns` and waits until it
    /// answers on its control socket.
    pub fn start(ns: &str, dir: &Path, name: &str, config: &str) -> anyhow::Result<Self> {
        let conf = dir.join(format!("{name}.conf"));
        std::fs::write(&conf, config).with_context(|| format!("writing {}", conf.display()))?;
        let mut bird = Self {
            name: name.to_owned(),
            ns: ns.to_owned(),
            socket: dir.join(format!("{name}.ctl")),
            config: conf,
            log: dir.join(format!("{name}.log")),
            child: None,
        };
        bird.restart()?;
        Ok(bird)
    }

    /// Starts it again (after [`Bird::kill`]) with the same files.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "BIRD {} is running", self.name);
        let pid = self.socket.with_extension("pid");
        let _ = std::fs::remove_file(&self.socket);
        let child = netns::spawn(
            &self.ns,
            &[
                "bird".as_ref(),
                "-f".as_ref(),
                "-c".as_ref(),
                self.config.as_os_str(),
                "-s".as_ref(),
                self.socket.as_os_str(),
                "-P".as_ref(),
                pid.as_os_str(),
            ],
            Some(&self.log),
        )?;
        self.child = Some(child);
        let socket = self.socket.clone();
        crate::load::wait_for(
            &format!("BIRD {}'s control socket", self.name),
            START_TIMEOUT,
            Duration::from_millis(50),
            || Ok(birdc(&socket, &["show", "status"]).is_ok_and(|s| s.contains("Daemon is up"))),
        )
        .with_context(|| format!("BIRD {} (log: {})", self.name, self.log_text()))?;
        Ok(())
    }

    /// `birdc -s SOCKET ARGS...`.
    pub fn birdc(&self, args: &[&str]) -> anyhow::Result<String> {
        birdc(&self.socket, args)
    }

    /// Kills it with SIGKILL (a crash: no goodbye to its peers).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    /// Stops it (SIGTERM, then SIGKILL).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.stop(Duration::from_secs(3))?;
        }
        Ok(())
    }

    /// Whether it runs.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether protocol `proto` is `Established` (a BGP session).
    pub fn established(&self, proto: &str) -> anyhow::Result<bool> {
        Ok(self
            .birdc(&["show", "protocols", proto])?
            .contains("Established"))
    }
}

/// `birdc -s SOCKET ARGS...` (from the caller's namespace: the socket is a file).
pub fn birdc(socket: &Path, args: &[&str]) -> anyhow::Result<String> {
    let mut full = vec![
        "birdc".to_owned(),
        "-s".to_owned(),
        socket.display().to_string(),
    ];
    full.extend(args.iter().map(|a| (*a).to_owned()));
    netns::run(&full)
}

/// Whether BIRD behind `socket` has a route for `prefix` from protocol `proto` (`show
/// route PREFIX protocol PROTO`; birdc exits 1 with "Network not found" when there is
/// none).
pub fn has_route(socket: &Path, prefix: &str, proto: &str) -> anyhow::Result<bool> {
    let out = std::process::Command::new("birdc")
        .arg("-s")
        .arg(socket)
        .args(["show", "route", prefix, "protocol", proto])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("Network not found") {
        return Ok(false);
    }
    anyhow::ensure!(out.status.success(), "birdc show route: {text}");
    Ok(text.lines().any(|l| l.starts_with(prefix)))
}
