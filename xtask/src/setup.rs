//! `cargo xtask setup` and [`ensure_ready`]: check every prerequisite, cheap checks first, and
//! install only what is missing, so that a second run is a fast no-op.

use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use crate::{
    apt, bpf_linker,
    kernel::{self, Finding},
    toolchain::{self, HOST_COMPONENTS},
};

/// Which kind of run this is.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// `cargo xtask setup`: print every check, probe the kernel (mount a bpffs, create a
    /// namespace), and ask apt again for optional packages an earlier run found unavailable.
    Setup { reinstall_bpf_linker: bool },
    /// [`ensure_ready`]: print only problems and installs, and only look at the kernel.
    Ensure,
}

impl Mode {
    fn is_setup(self) -> bool {
        matches!(self, Self::Setup { .. })
    }

    fn reinstall_bpf_linker(self) -> bool {
        matches!(
            self,
            Self::Setup {
                reinstall_bpf_linker: true
            }
        )
    }
}

/// Prints one line per check and counts the warnings.
#[derive(Debug)]
struct Report {
    verbose: bool,
    warnings: usize,
    installed: usize,
}

impl Report {
    fn ok(&self, what: &str, detail: &str) {
        if self.verbose {
            println!("setup: ok       {what}: {detail}");
        }
    }

    fn installing(&mut self, what: &str, why: &str) {
        self.installed += 1;
        println!("setup: missing  {what}: {why}; installing");
    }

    fn warn(&mut self, what: &str, detail: &str) {
        self.warnings += 1;
        println!("setup: WARNING  {what}: {detail}");
    }

    fn finding(&mut self, what: &str, finding: Finding) {
        match finding {
            Finding::Ok(detail) => self.ok(what, &detail),
            Finding::Problem(detail) => self.warn(what, &detail),
        }
    }
}

/// `cargo xtask setup`: every check printed, the kernel probed.
pub fn setup(reinstall_bpf_linker: bool) -> Result<()> {
    let start = Instant::now();
    let report = check_and_install(Mode::Setup {
        reinstall_bpf_linker,
    })?;
    println!(
        "setup: done in {:.1}s: {} installed, {} warning(s)",
        start.elapsed().as_secs_f64(),
        report.installed,
        report.warnings
    );
    Ok(())
}

/// Makes sure the prerequisites are present before a task: quiet unless something is missing
/// (then it is installed) or wrong (then it is reported).
pub fn ensure_ready() -> Result<()> {
    let start = Instant::now();
    let report = check_and_install(Mode::Ensure)
        .context("preparing the machine (`cargo xtask setup` shows every check)")?;
    println!(
        "xtask: prerequisites checked in {:.1}s ({} installed, {} warning(s); `cargo xtask setup` lists them)",
        start.elapsed().as_secs_f64(),
        report.installed,
        report.warnings
    );
    Ok(())
}

fn check_and_install(mode: Mode) -> Result<Report> {
    let mut report = Report {
        verbose: mode.is_setup(),
        warnings: 0,
        installed: 0,
    };
    debian_packages(&mut report, mode)?;
    host_components(&mut report)?;
    ebpf_toolchain(&mut report)?;
    bpf_linker(&mut report, mode)?;
    report.finding("privileges", kernel::privileges());
    report.finding("bpffs", kernel::bpffs(mode.is_setup()));
    report.finding("ip netns", kernel::netns(mode.is_setup()));
    Ok(report)
}

fn debian_packages(report: &mut Report, mode: Mode) -> Result<()> {
    const WHAT: &str = "Debian packages";
    if !apt::has_dpkg() {
        let missing = apt::missing_programs();
        if missing.is_empty() {
            report.ok(WHAT, "no dpkg here, but every program needed is on PATH");
        } else {
            report.warn(
                WHAT,
                &format!(
                    "no dpkg here, so nothing is installed; missing programs: {} (Debian packages: {})",
                    missing.join(" "),
                    apt::names().collect::<Vec<_>>().join(" ")
                ),
            );
        }
        return Ok(());
    }
    let missing = apt::missing()?;
    if missing.is_empty() {
        report.ok(WHAT, &apt::names().collect::<Vec<_>>().join(" "));
        return Ok(());
    }
    report.installing(WHAT, &missing.join(" "));
    let left_out = {
        // No system service from these packages (bird2 would start Debian's BIRD).
        let _no_services = apt::NoServiceStarts::new()?;
        apt::install(&missing, mode.is_setup())?
    };
    let still: Vec<_> = apt::missing()?
        .into_iter()
        .filter(|package| !left_out.contains(package))
        .collect();
    if !still.is_empty() {
        bail!(
            "apt-get install succeeded, yet dpkg does not list {} as installed",
            still.join(" ")
        );
    }
    if !left_out.is_empty() {
        report.warn(
            WHAT,
            &format!(
                "not installable here: {} (`vagrant validate` will be skipped)",
                left_out.join(" ")
            ),
        );
    }
    Ok(())
}

fn host_components(report: &mut Report) -> Result<()> {
    let active = toolchain::active()?;
    let what = format!("host toolchain {active}");
    let missing = toolchain::missing_components(None, HOST_COMPONENTS)?;
    if missing.is_empty() {
        report.ok(&what, &HOST_COMPONENTS.join(", "));
        return Ok(());
    }
    report.installing(&what, &missing.join(", "));
    toolchain::add_host_components(&missing)
}

fn ebpf_toolchain(report: &mut Report) -> Result<()> {
    let (pinned, components) = (toolchain::ebpf(), toolchain::ebpf_components());
    let what = format!("toolchain {pinned}");
    let why = if toolchain::is_installed(pinned)? {
        let missing = toolchain::missing_components(Some(pinned), &components)?;
        if missing.is_empty() {
            report.ok(&what, &format!("installed, with {}", components.join(", ")));
            return Ok(());
        }
        format!("components {}", missing.join(", "))
    } else {
        "not installed".to_owned()
    };
    report.installing(&what, &why);
    toolchain::install_ebpf_toolchain()?;
    let missing = toolchain::missing_components(Some(pinned), &components)?;
    if !missing.is_empty() {
        bail!(
            "{pinned} still lacks {} after installing",
            missing.join(", ")
        );
    }
    Ok(())
}

fn bpf_linker(report: &mut Report, mode: Mode) -> Result<()> {
    const WHAT: &str = "bpf-linker";
    let pinned = toolchain::ebpf();
    let want = toolchain::llvm_major(pinned)?;
    let why = match bpf_linker::check()? {
        bpf_linker::State::Runs(linker)
            if linker.llvm.as_ref().is_some_and(|llvm| llvm.major == want) =>
        {
            if !mode.reinstall_bpf_linker() {
                report.ok(WHAT, &format!("{linker}, as {pinned}"));
                warn_if_not_on_path(report, &linker);
                return Ok(());
            }
            format!("{linker}; reinstall asked for")
        }
        bpf_linker::State::Runs(linker) if linker.llvm.is_some() => {
            format!("{linker}, but {pinned} uses LLVM {want}")
        }
        bpf_linker::State::Runs(linker) => {
            format!("{linker}: cannot tell whether it uses LLVM {want} like {pinned}")
        }
        bpf_linker::State::Broken(path, err) => format!("{} does not run: {err}", path.display()),
        bpf_linker::State::Missing => "not installed".to_owned(),
    };
    report.installing(
        WHAT,
        &format!(
            "{why}; building bpf-linker {} on LLVM {want}",
            bpf_linker::VERSION
        ),
    );
    let linker = bpf_linker::install(want)?;
    println!("setup: installed {linker}");
    warn_if_not_on_path(report, &linker);
    Ok(())
}

fn warn_if_not_on_path(report: &mut Report, linker: &bpf_linker::Linker) {
    if !linker.on_path {
        report.warn(
            "bpf-linker",
            &format!(
                "`bpf-linker` on PATH is not {} (cargo runs the one on PATH): put {} first on PATH",
                linker.path.display(),
                linker
                    .path
                    .parent()
                    .map_or_else(String::new, |dir| dir.display().to_string())
            ),
        );
    }
}
