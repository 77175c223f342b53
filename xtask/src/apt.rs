//! Debian packages the tests and the demo use: checked with dpkg-query, installed with apt-get.
//! Also the packages only `cargo xtask bench l7` needs ([`ensure_bench_l7`]), which
//! `cargo xtask setup` and CI do not install.

use std::{
    fs,
    path::Path,
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
    // BIRD 2 (`bird`, `birdc`): the BGP daemon the agent's `[bgp]` drives; the BGP tests
    // (tests/tests/integration/bgp.rs) run one per namespace. Installed without starting
    // Debian's system instance (see `NoServiceStarts`): the tests start their own.
    ("bird2", "bird"),
    // etcd 3.4 (`etcd`): the store of `[cluster]`; the cluster tests (tests/tests/integration/cluster.rs)
    // run a three-member etcd per test in namespaces. Installed without starting Debian's
    // system instance (see `NoServiceStarts`). `etcdctl` (etcd-client) for tests and debugging.
    ("etcd-server", "etcd"),
    ("etcd-client", "etcdctl"),
    // `protoc`: the `etcd-client` crate compiles etcd's protobuf definitions at build time.
    ("protobuf-compiler", "protoc"),
    // protoc's well-known types (google/protobuf/descriptor.proto, struct.proto), which
    // etcd's protos import; not pulled in by protobuf-compiler with --no-install-recommends.
    // No program of its own: without dpkg, `protoc` stands for it.
    ("libprotobuf-dev", "protoc"),
    ("vagrant", "vagrant"),
    // A provider: without one `vagrant validate` stops at "No usable default provider could
    // be found". With `--no-install-recommends` it brings libvirt's client library and ruby
    // gems, not libvirtd or a hypervisor; the provider blocks of the Vagrantfile are then
    // checked too. A plugin has no program of its own: without dpkg, `vagrant` stands for it.
    ("vagrant-libvirt", "vagrant"),
];

/// Packages whose absence only skips a step: these serve `vagrant validate` alone.
const OPTIONAL: &[&str] = &["vagrant", "vagrant-libvirt"];

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
    missing_of(&names().collect::<Vec<_>>())
}

/// The packages of `packages` that dpkg does not report installed (one dpkg-query call).
fn missing_of(packages: &[&'static str]) -> Result<Vec<&'static str>> {
    // dpkg-query exits 1 when some package is unknown, but still lists the known ones.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\n"])
        .args(packages)
        .stdin(Stdio::null())
        .output()
        .context("running dpkg-query")?;
    let listed = String::from_utf8_lossy(&out.stdout);
    Ok(packages
        .iter()
        .copied()
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

/// The packages `cargo xtask bench l7` runs, with the program each provides: not in
/// [`PACKAGES`], so neither `cargo xtask setup` nor CI installs them.
pub const BENCH_L7_PACKAGES: &[(&str, &str)] =
    &[("haproxy", "haproxy"), ("nginx", "nginx"), ("wrk", "wrk")];

/// Daemons of [`BENCH_L7_PACKAGES`] that Debian's maintainer scripts may start as system
/// services on install, with the pid file their default configuration writes.
const BENCH_L7_SERVICES: &[(&str, &str)] =
    &[("nginx", "/run/nginx.pid"), ("haproxy", "/run/haproxy.pid")];

/// Debian's hook that tells maintainer scripts whether they may start services.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// Installs haproxy, nginx and wrk with apt-get when missing (idempotent), for
/// `cargo xtask bench l7` only. No service is left running: while apt-get runs, a
/// `policy-rc.d` that forbids starting services is put in place unless one exists, and
/// a daemon of a package installed here that runs anyway (from its pid file under
/// `/run`) is stopped. The benchmark starts its own instances with its own configs.
pub fn ensure_bench_l7() -> Result<()> {
    let packages: Vec<&'static str> = BENCH_L7_PACKAGES.iter().map(|(p, _)| *p).collect();
    if !has_dpkg() {
        let missing: Vec<_> = BENCH_L7_PACKAGES
            .iter()
            .filter(|(_, program)| find_program(program).is_none())
            .map(|(_, program)| *program)
            .collect();
        if !missing.is_empty() {
            bail!(
                "bench l7 needs {}: no dpkg here, so xtask cannot install them; install them by hand",
                missing.join(" ")
            );
        }
        println!("bench l7: no dpkg here, but haproxy, nginx and wrk are on PATH");
        return Ok(());
    }
    let missing = missing_of(&packages)?;
    if missing.is_empty() {
        println!("bench l7: already installed: {}", versions(&packages));
        return Ok(());
    }
    println!(
        "bench l7: installing with apt-get (not needed by `cargo xtask setup` or CI): {}",
        missing.join(" ")
    );
    {
        let _no_services = NoServiceStarts::new()?;
        install(&missing, true)?;
    }
    for (package, pid_file) in BENCH_L7_SERVICES {
        if missing.contains(package) {
            stop_service(package, Path::new(pid_file));
        }
    }
    let still = missing_of(&packages)?;
    if !still.is_empty() {
        bail!(
            "apt-get install succeeded, yet dpkg does not list {} as installed",
            still.join(" ")
        );
    }
    println!("bench l7: installed: {}", versions(&missing));
    Ok(())
}

/// The packages `cargo xtask bench xdp` needs to build Katran's balancer from its
/// vendored source (tests/vendor/katran), with the program each provides: clang, and
/// llc from the `llvm` package (Katran's Makefile pipes clang's bitcode through llc). Not
/// in [`PACKAGES`]: neither `cargo xtask setup` nor CI installs them.
pub const BENCH_XDP_PACKAGES: &[(&str, &str)] = &[("clang", "clang"), ("llvm", "llc")];

/// Installs clang and llvm with apt-get when missing (idempotent), for `cargo xtask
/// bench xdp` only. Without dpkg, says what is missing: the bench then measures
/// `xdp_lb` alone and prints why Katran is not beside it.
pub fn ensure_bench_xdp() -> Result<()> {
    let packages: Vec<&'static str> = BENCH_XDP_PACKAGES.iter().map(|(p, _)| *p).collect();
    if !has_dpkg() {
        let missing: Vec<_> = BENCH_XDP_PACKAGES
            .iter()
            .filter(|(_, program)| find_program(program).is_none())
            .map(|(_, program)| *program)
            .collect();
        if !missing.is_empty() {
            println!(
                "bench xdp: no dpkg here and {} missing: Katran's column will be empty",
                missing.join(" ")
            );
        }
        return Ok(());
    }
    let missing = missing_of(&packages)?;
    if missing.is_empty() {
        println!("bench xdp: already installed: {}", versions(&packages));
        return Ok(());
    }
    println!(
        "bench xdp: installing with apt-get, to build Katran's balancer (not needed by `cargo xtask setup` or CI): {}",
        missing.join(" ")
    );
    install(&missing, true)?;
    println!("bench xdp: installed: {}", versions(&missing));
    Ok(())
}

/// The packages `cargo xtask cache-tests` needs to run the http-tests/cache-tests suite
/// (its origin server and client are node programs; npm installs its `undici`), with the
/// program each provides. Not in [`PACKAGES`]: neither `cargo xtask setup` nor CI installs them.
pub const CACHE_TESTS_PACKAGES: &[(&str, &str)] = &[("nodejs", "node"), ("npm", "npm")];

/// Installs node and npm with apt-get when missing (idempotent), for `cargo xtask
/// cache-tests` only. Without dpkg, fails naming what is missing.
pub fn ensure_cache_tests() -> Result<()> {
    let missing_programs: Vec<_> = CACHE_TESTS_PACKAGES
        .iter()
        .filter(|(_, program)| find_program(program).is_none())
        .map(|(_, program)| *program)
        .collect();
    if missing_programs.is_empty() {
        return Ok(());
    }
    if !has_dpkg() {
        bail!(
            "cache-tests needs {} (node >= 18): no dpkg here, so xtask cannot install them; install them by hand",
            missing_programs.join(" ")
        );
    }
    let packages: Vec<&'static str> = CACHE_TESTS_PACKAGES.iter().map(|(p, _)| *p).collect();
    let missing = missing_of(&packages)?;
    println!(
        "cache-tests: installing with apt-get (not needed by `cargo xtask setup` or CI): {}",
        missing.join(" ")
    );
    install(&missing, true)?;
    println!("cache-tests: installed: {}", versions(&missing));
    Ok(())
}

/// `name version, ...` of installed `packages`, from dpkg-query.
fn versions(packages: &[&str]) -> String {
    cmd::output(
        Command::new("dpkg-query")
            .args(["-W", "-f=${Package} ${Version}, "])
            .args(packages),
    )
    .map_or_else(
        |_| packages.join(" "),
        |out| out.trim_end_matches([',', ' ']).to_owned(),
    )
}

/// `program` on PATH, or in /usr/sbin (where nginx and haproxy live, not on every PATH).
fn find_program(program: &str) -> Option<std::path::PathBuf> {
    cmd::find_in_path(program).or_else(|| {
        let path = Path::new("/usr/sbin").join(program);
        cmd::is_executable(&path).then_some(path)
    })
}

/// Stops the system instance of `daemon` that its package's install started, if one runs:
/// the pid from `pid_file` gets SIGTERM (`nginx -s stop` does the same). Best effort.
fn stop_service(daemon: &str, pid_file: &Path) {
    let Some(pid) = fs::read_to_string(pid_file)
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
    else {
        return;
    };
    // The pid file may be stale: only a live process running `daemon` is stopped.
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != daemon {
        return;
    }
    println!("bench l7: the install started the system {daemon} (pid {pid}): stopping it");
    if let Err(err) = cmd::run(Command::new("kill").args(["-TERM", &pid.to_string()])) {
        println!("note: could not stop {daemon} (pid {pid}): {err:#}");
    }
}

/// While alive, a `policy-rc.d` that denies every service start (exit 101), so that
/// installing nginx and haproxy starts no system service; only created when there is
/// none (Docker images ship one), and removed again on drop. `cargo xtask setup` uses
/// it too, so that bird2 leaves no system BIRD running in the root namespace.
pub struct NoServiceStarts {
    created: bool,
}

impl NoServiceStarts {
    pub fn new() -> Result<Self> {
        let path = Path::new(POLICY_RC_D);
        if path.exists() {
            return Ok(Self { created: false });
        }
        use std::os::unix::fs::PermissionsExt as _;
        fs::write(
            path,
            "#!/bin/sh\n# Put here by `cargo xtask bench l7` while apt-get runs: start no services.\nexit 101\n",
        )
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {POLICY_RC_D} executable"))?;
        Ok(Self { created: true })
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if !self.created {
            return;
        }
        if let Err(err) = fs::remove_file(POLICY_RC_D) {
            println!("note: could not remove {POLICY_RC_D}: {err}");
        }
    }
}

/// apt-get, with no terminal and no questions.
fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null());
    cmd
}
