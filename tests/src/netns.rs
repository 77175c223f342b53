//! Network namespaces for tests: a guard that owns everything a test run creates, and
//! helpers to run commands and Rust code inside a namespace.
//!
//! - [`NetnsGuard`] picks a per-run prefix (`xl` + 5 characters), creates namespaces
//!   named `<prefix>-<role>`, optionally mounts a bpffs at `/run/<prefix>-bpf`, and owns
//!   a scratch directory. Dropping it (also while a panic unwinds) deletes all of that.
//!   Creating one first removes what earlier runs left behind: every prefix whose owner
//!   process (recorded in `/run/xdplb-tests/<prefix>.owner`) is gone.
//! - [`exec`] / [`spawn`] run a program inside a namespace (`ip netns exec`); [`run`]
//!   runs one in the caller's namespace. Errors name the command and carry its stderr.
//! - [`in_netns`] / [`spawn_in_netns`] run a closure on a thread that has entered the
//!   namespace with `setns(CLONE_NEWNET)`: sockets made there belong to that namespace,
//!   so servers, clients and packet captures need no external tools.
//! - [`require_privileges!`](crate::require_privileges) (over [`require_privileges`]) is
//!   the entry line of every privileged test.
//!
//! Nothing here touches the root network namespace: namespaces are created empty and
//! every interface is made inside them.

use std::{
    collections::BTreeSet,
    ffi::{CString, OsStr, OsString},
    fs::{self, File},
    io::{Read as _, Write as _},
    os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, anyhow, bail, ensure};

/// Every prefix starts with this; stale clean-up only ever looks at names of this family.
pub const PREFIX_FAMILY: &str = "xl";
/// Length of a per-run prefix (`xl` + 5 characters).
pub const PREFIX_LEN: usize = 7;
/// Longest namespace or interface name we create (`IFNAMSIZ - 1`).
pub const MAX_NAME_LEN: usize = 15;
/// Where owners of prefixes are recorded, one file `<prefix>.owner` each.
const OWNER_DIR: &str = "/run/xdplb-tests";
/// Default bound on one command run by [`run`] / [`exec`].
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// `statfs` magic number of a bpffs.
const BPF_FS_MAGIC: u32 = 0xcafe_4a11;

/// Environment variable that makes privileged tests skip instead of fail.
pub const SKIP_ENV: &str = "XDPLB_SKIP_PRIVILEGED";

/// The entry line of every privileged test: evaluates to the test's name (for messages
/// and logs) when the test may run; returns from the test, as passed, when
/// `XDPLB_SKIP_PRIVILEGED=1` (printing a note that names it); panics naming what is
/// missing otherwise. See [`netns::require_privileges`](crate::netns::require_privileges).
///
/// ```no_run
/// #[test]
/// fn builds_a_namespace() -> anyhow::Result<()> {
///     let test = xdplb_tests::require_privileges!();
///     eprintln!("{test} runs");
///     Ok(())
/// }
/// ```
#[macro_export]
macro_rules! require_privileges {
    () => {{
        fn here() {}
        let name = $crate::netns::test_name(::core::any::type_name_of_val(&here));
        if !$crate::netns::require_privileges(name) {
            return $crate::netns::Skipped::skipped();
        }
        name
    }};
}

/// The test function's name in the path of an item declared inside it
/// (`crate::module::the_test::here` gives `the_test`).
pub fn test_name(item_path: &'static str) -> &'static str {
    let fn_path = item_path.rsplit_once("::").map_or(item_path, |(f, _)| f);
    fn_path.rsplit("::").next().unwrap_or(fn_path)
}

/// What a skipped test returns: `()` or `Ok(())`.
pub trait Skipped {
    /// The passing value of a test that did not run.
    fn skipped() -> Self;
}

impl Skipped for () {
    fn skipped() -> Self {}
}

impl<E> Skipped for Result<(), E> {
    fn skipped() -> Self {
        Ok(())
    }
}

/// Checks that this process may build namespace test beds.
///
/// Returns `true` when the test should run. With `XDPLB_SKIP_PRIVILEGED=1` it prints a
/// note naming `test` and returns `false`. Otherwise, when a capability or a tool is
/// missing, it panics with a message naming what is missing.
pub fn require_privileges(test: &str) -> bool {
    if std::env::var_os(SKIP_ENV).is_some_and(|v| v == "1") {
        eprintln!("note: skipping privileged test `{test}` because {SKIP_ENV}=1");
        return false;
    }
    let missing = missing_privileges();
    assert!(
        missing.is_empty(),
        "privileged test `{test}` cannot run: missing {}. Run as root (these tests create \
         network namespaces, veths, bpffs mounts and XDP programs), or set {SKIP_ENV}=1 to skip.",
        missing.join(", ")
    );
    true
}

/// What this process lacks for namespace test beds: capabilities and tools, by name.
pub fn missing_privileges() -> Vec<String> {
    const CAPS: [(u32, &str); 3] = [
        (12, "CAP_NET_ADMIN"),
        (21, "CAP_SYS_ADMIN"),
        (39, "CAP_BPF"),
    ];
    let mut missing = Vec::new();
    let effective = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    // CAP_SYS_ADMIN implies what CAP_BPF grants on kernels that predate CAP_BPF.
    for (bit, name) in CAPS {
        let has = effective & (1 << bit) != 0 || (bit == 39 && effective & (1 << 21) != 0);
        if !has {
            missing.push(name.to_owned());
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (effective uid 0)".to_owned());
    }
    for tool in ["ip", "ethtool"] {
        if which::which(tool).is_err() {
            missing.push(format!("the `{tool}` tool in PATH"));
        }
    }
    missing
}

/// Owns the namespaces, the bpffs mount and the scratch directory of one test run.
///
/// Dropping it stops nothing else: drop processes running inside first (the topology
/// does this in the right order), then the guard removes the namespaces.
#[derive(Debug)]
pub struct NetnsGuard {
    prefix: String,
    namespaces: Vec<String>,
    bpffs: Option<PathBuf>,
    run_dir: PathBuf,
    owner_file: PathBuf,
}

impl NetnsGuard {
    /// Picks a fresh prefix, removes what dead earlier runs left, and records this
    /// process as the owner of the new prefix.
    pub fn new() -> anyhow::Result<Self> {
        fs::create_dir_all(OWNER_DIR).with_context(|| format!("creating {OWNER_DIR}"))?;
        remove_stale().context("removing namespaces that earlier runs left behind")?;
        let existing = list_namespaces()?;
        for attempt in 0..32 {
            let prefix = new_prefix(attempt);
            if existing.iter().any(|ns| ns.starts_with(&prefix)) {
                continue;
            }
            let owner_file = owner_file(&prefix);
            let tmp = owner_file.with_extension("tmp");
            {
                let mut f =
                    File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
                writeln!(f, "{}", Owner::current()?.encode())?;
            }
            // hard_link fails if the owner file exists: the prefix is ours only if it succeeds.
            let claimed = fs::hard_link(&tmp, &owner_file).is_ok();
            let _ = fs::remove_file(&tmp);
            if !claimed {
                continue;
            }
            let run_dir = std::env::temp_dir().join(format!("xdplb-{prefix}"));
            let _ = fs::remove_dir_all(&run_dir);
            fs::create_dir_all(&run_dir)
                .with_context(|| format!("creating {}", run_dir.display()))?;
            return Ok(Self {
                prefix,
                namespaces: Vec::new(),
                bpffs: None,
                run_dir,
                owner_file,
            });
        }
        bail!("could not find a free namespace prefix in {OWNER_DIR}")
    }

    /// This run's prefix, e.g. `xl3k9za`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>-<role>`: the name of this run's namespace or interface for `role`.
    ///
    /// # Panics
    /// If the name would be longer than [`MAX_NAME_LEN`].
    pub fn name(&self, role: &str) -> String {
        let name = format!("{}-{role}", self.prefix);
        assert!(
            name.len() <= MAX_NAME_LEN,
            "name {name:?} longer than {MAX_NAME_LEN} characters"
        );
        name
    }

    /// Creates namespace `<prefix>-<role>` with `lo` up and returns its name.
    pub fn create(&mut self, role: &str) -> anyhow::Result<String> {
        let name = self.name(role);
        run(&["ip", "netns", "add", &name])?;
        self.namespaces.push(name.clone());
        run(&["ip", "-n", &name, "link", "set", "lo", "up"])?;
        Ok(name)
    }

    /// The namespaces created so far.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// A scratch directory of this run (config files, logs), removed on drop.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Mounts a bpffs at `/run/<prefix>-bpf` in the caller's mount namespace (unless one
    /// is mounted there already) and returns the path. Unmounted and removed on drop.
    ///
    /// Pins under it outlive the processes that made them and are visible inside
    /// `ip netns exec` (DESIGN.md, bpffs pitfall).
    pub fn mount_bpffs(&mut self) -> anyhow::Result<PathBuf> {
        let dir = bpffs_dir(&self.prefix);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        self.bpffs = Some(dir.clone());
        if !is_bpffs(&dir) {
            let target = CString::new(dir.as_os_str().as_bytes())?;
            // SAFETY: all pointers are valid NUL-terminated strings; data may be null.
            let rc = unsafe {
                libc::mount(
                    c"bpf".as_ptr(),
                    target.as_ptr(),
                    c"bpf".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            ensure!(
                rc == 0,
                "mount -t bpf bpf {}: {}",
                dir.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(dir)
    }

    /// The bpffs mounted by [`Self::mount_bpffs`], if any.
    pub fn bpffs(&self) -> Option<&Path> {
        self.bpffs.as_deref()
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        for ns in self.namespaces.drain(..).rev() {
            if let Err(e) = delete_namespace(&ns) {
                eprintln!("warning: {e:#}");
            }
        }
        if let Some(dir) = self.bpffs.take() {
            unmount_and_remove(&dir);
        }
        let _ = fs::remove_dir_all(&self.run_dir);
        let _ = fs::remove_file(&self.owner_file);
    }
}

/// `/run/<prefix>-bpf`.
fn bpffs_dir(prefix: &str) -> PathBuf {
    PathBuf::from(format!("/run/{prefix}-bpf"))
}

fn owner_file(prefix: &str) -> PathBuf {
    Path::new(OWNER_DIR).join(format!("{prefix}.owner"))
}

/// Whether `path` is the root of a mounted bpffs.
fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain data; zeroed is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st a valid out pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    // f_type is i32 or i64 depending on the target; the magic is its low 32 bits.
    rc == 0 && st.f_type as u32 == BPF_FS_MAGIC
}

/// Unmounts whatever is mounted at `dir` (lazily, repeatedly for stacked mounts) and
/// removes the directory and anything pinned in it.
fn unmount_and_remove(dir: &Path) {
    if let Ok(c) = CString::new(dir.as_os_str().as_bytes()) {
        for _ in 0..8 {
            if !is_bpffs(dir) {
                break;
            }
            // SAFETY: c is a valid C string.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                eprintln!(
                    "warning: umount {}: {}",
                    dir.display(),
                    std::io::Error::last_os_error()
                );
                break;
            }
        }
    }
    if !is_bpffs(dir) && fs::remove_dir(dir).is_err() && dir.exists() {
        // Something was created in the plain directory (a pin into a non-bpffs dir).
        let _ = fs::remove_dir_all(dir);
    }
}

/// A prefix unique to this process, this moment and `attempt`.
fn new_prefix(attempt: u32) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = u64::from(std::process::id())
        ^ nanos.rotate_left(17)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ u64::from(attempt) << 40;
    // splitmix64 finaliser, then base 36.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut s = String::from(PREFIX_FAMILY);
    for _ in 0..PREFIX_LEN - PREFIX_FAMILY.len() {
        s.push(DIGITS[(x % 36) as usize] as char);
        x /= 36;
    }
    s
}

/// Whether `name` has the shape `xl?????-...` of this crate's namespaces.
fn prefix_of(name: &str) -> Option<&str> {
    let prefix = name.get(..PREFIX_LEN)?;
    let ok = prefix.starts_with(PREFIX_FAMILY)
        && prefix[PREFIX_FAMILY.len()..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.as_bytes().get(PREFIX_LEN) == Some(&b'-');
    ok.then_some(prefix)
}

/// The owner of a prefix: a process, identified by pid and start time (pids get reused).
#[derive(Debug, PartialEq, Eq)]
struct Owner {
    pid: u32,
    start_time: u64,
}

impl Owner {
    fn current() -> anyhow::Result<Self> {
        let pid = std::process::id();
        let start_time = process_start_time(pid).context("reading this process's start time")?;
        Ok(Self { pid, start_time })
    }

    fn encode(&self) -> String {
        format!("{} {}", self.pid, self.start_time)
    }

    fn decode(s: &str) -> Option<Self> {
        let mut it = s.split_whitespace();
        let pid = it.next()?.parse().ok()?;
        let start_time = it.next()?.parse().ok()?;
        Some(Self { pid, start_time })
    }

    fn alive(&self) -> bool {
        process_start_time(self.pid) == Some(self.start_time)
    }
}

/// Field 22 of `/proc/<pid>/stat`: start time in clock ticks since boot.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; it ends at the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Removes namespaces, bpffs mounts, scratch dirs and owner files of prefixes whose
/// owner process is gone.
fn remove_stale() -> anyhow::Result<()> {
    let mut prefixes: BTreeSet<String> = BTreeSet::new();
    let namespaces = list_namespaces()?;
    prefixes.extend(
        namespaces
            .iter()
            .filter_map(|n| prefix_of(n))
            .map(str::to_owned),
    );
    if let Ok(entries) = fs::read_dir(OWNER_DIR) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if let Some(p) = name
                .strip_suffix(".owner")
                .filter(|p| prefix_of(&format!("{p}-")).is_some())
            {
                prefixes.insert(p.to_owned());
            }
        }
    }
    for prefix in prefixes {
        let owner_path = owner_file(&prefix);
        let owner = fs::read_to_string(&owner_path)
            .ok()
            .and_then(|s| Owner::decode(&s));
        if owner.is_some_and(|o| o.alive()) {
            continue;
        }
        // An owner file is written before any namespace is made, so no file means stale.
        for ns in namespaces
            .iter()
            .filter(|n| n.starts_with(&format!("{prefix}-")))
        {
            kill_namespace_processes(ns);
            if let Err(e) = delete_namespace(ns) {
                eprintln!("warning: removing stale namespace: {e:#}");
            }
        }
        unmount_and_remove(&bpffs_dir(&prefix));
        let _ = fs::remove_dir_all(std::env::temp_dir().join(format!("xdplb-{prefix}")));
        let _ = fs::remove_file(&owner_path);
    }
    Ok(())
}

/// Kills (by pid) the processes a dead run left running inside its namespace.
fn kill_namespace_processes(ns: &str) {
    let Ok(out) = run(&["ip", "netns", "pids", ns]) else {
        return;
    };
    for pid in out
        .split_whitespace()
        .filter_map(|p| p.parse::<libc::pid_t>().ok())
    {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn delete_namespace(ns: &str) -> anyhow::Result<()> {
    run(&["ip", "netns", "del", ns]).map(drop)
}

/// The names in `ip netns list` (without the `(id: N)` suffix).
pub fn list_namespaces() -> anyhow::Result<Vec<String>> {
    let out = run(&["ip", "netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Runs a command in the caller's namespace, bounded by [`COMMAND_TIMEOUT`], and returns
/// its stdout. A failure names the command and carries its stderr.
pub fn run<S: AsRef<OsStr>>(args: &[S]) -> anyhow::Result<String> {
    run_with_timeout(args, COMMAND_TIMEOUT)
}

/// [`run`] with an explicit time bound.
pub fn run_with_timeout<S: AsRef<OsStr>>(args: &[S], timeout: Duration) -> anyhow::Result<String> {
    let (program, rest) = args.split_first().ok_or_else(|| anyhow!("empty command"))?;
    let shown = show(args);
    let mut child = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{shown}`"))?;
    let readers = [
        read_in_thread(
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ),
        read_in_thread(
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ),
    ];
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{shown}` did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(2));
    };
    let [stdout, stderr] = readers.map(|r| r.join().unwrap_or_default());
    if !status.success() {
        bail!("`{shown}` failed ({status}): {}", stderr.trim());
    }
    Ok(stdout)
}

fn read_in_thread(src: Option<Box<dyn std::io::Read + Send>>) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut s) = src {
            let _ = s.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

fn show<S: AsRef<OsStr>>(args: &[S]) -> String {
    args.iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn netns_exec_args<S: AsRef<OsStr>>(ns: &str, args: &[S]) -> Vec<OsString> {
    ["ip", "netns", "exec", ns]
        .into_iter()
        .map(OsString::from)
        .chain(args.iter().map(|a| a.as_ref().to_owned()))
        .collect()
}

/// Runs a command inside namespace `ns` (`ip netns exec`), bounded by
/// [`COMMAND_TIMEOUT`], and returns its stdout.
pub fn exec<S: AsRef<OsStr>>(ns: &str, args: &[S]) -> anyhow::Result<String> {
    run(&netns_exec_args(ns, args))
}

/// A child process that is stopped (SIGTERM, then SIGKILL after 3 s) when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    shown: String,
}

impl ChildGuard {
    /// The child's pid.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The command line, for messages.
    pub fn command(&self) -> &str {
        &self.shown
    }

    /// `Some(status)` once the child has exited.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("waiting for `{}`", self.shown))
    }

    /// Kills the child with SIGKILL at once (a crash, not a shutdown) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the child: SIGTERM, up to `grace` to exit, then SIGKILL. Returns its status.
    pub fn stop(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: kill has no memory-safety preconditions; pid is our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        Ok(self.child.wait()?)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.stop(Duration::from_secs(3));
    }
}

/// Starts a long-running command inside namespace `ns`, stdout and stderr appended to
/// `log` (or discarded). The child is stopped when the guard drops, and killed by the
/// kernel if the spawning thread dies first (`PR_SET_PDEATHSIG`): spawn from the thread
/// that owns the guard.
pub fn spawn<S: AsRef<OsStr>>(
    ns: &str,
    args: &[S],
    log: Option<&Path>,
) -> anyhow::Result<ChildGuard> {
    let full = netns_exec_args(ns, args);
    let shown = show(&full);
    let mut cmd = Command::new(&full[0]);
    cmd.args(&full[1..]).stdin(Stdio::null());
    match log {
        Some(path) => {
            let f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening log {}", path.display()))?;
            cmd.stdout(f.try_clone()?).stderr(f);
        }
        None => {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }
    // SAFETY: the closure only calls prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("starting `{shown}`"))?;
    Ok(ChildGuard { child, shown })
}

/// Moves the calling thread into network namespace `ns`.
fn enter(ns: &str) -> anyhow::Result<()> {
    let path = Path::new("/run/netns").join(ns);
    let f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: f is an open namespace file descriptor for the duration of the call.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    ensure!(
        rc == 0,
        "setns({}) failed: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Runs `f` on a new thread inside namespace `ns` and returns its result. Sockets and
/// interface lookups made by `f` belong to `ns`. A panic in `f` is resumed here.
pub fn in_netns<T, F>(ns: &str, f: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> anyhow::Result<T> + Send + 'static,
{
    let ns = ns.to_owned();
    let handle = thread::Builder::new()
        .name(format!("in-{ns}"))
        .spawn(move || {
            enter(&ns)?;
            f()
        })
        .context("spawning a namespace thread")?;
    match handle.join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Starts `f` on a new thread inside namespace `ns` and returns once the thread is in
/// it (an error if it could not enter). Join the handle for `f`'s result.
pub fn spawn_in_netns<T, F>(
    ns: &str,
    name: &str,
    f: F,
) -> anyhow::Result<JoinHandle<anyhow::Result<T>>>
where
    T: Send + 'static,
    F: FnOnce() -> anyhow::Result<T> + Send + 'static,
{
    let ns = ns.to_owned();
    let (tx, rx) = mpsc::channel();
    let handle = thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let entered = enter(&ns);
            let ok = entered.is_ok();
            let _ = tx.send(entered);
            if !ok {
                return Err(anyhow!("thread did not enter its namespace"));
            }
            f()
        })
        .context("spawning a namespace thread")?;
    rx.recv()
        .context("namespace thread died before entering")??;
    Ok(handle)
}

/// The MAC address of `iface` in the calling thread's network namespace (sysfs would
/// show the namespace of its mount, not the thread's).
pub fn mac_of(iface: &str) -> anyhow::Result<[u8; 6]> {
    // SAFETY: plain socket/ioctl/close on a zeroed ifreq with a NUL-terminated name.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(iface.bytes()) {
            *dst = src as libc::c_char;
        }
        let rc = libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        ensure!(rc == 0, "SIOCGIFHWADDR {iface}: {err}");
        let d = req.ifr_ifru.ifru_hwaddr.sa_data;
        Ok([
            d[0] as u8, d[1] as u8, d[2] as u8, d[3] as u8, d[4] as u8, d[5] as u8,
        ])
    }
}

/// Adds a permanent neighbour entry `addr -> mac` on `dev` inside namespace `ns`, so
/// `bpf_fib_lookup` answers with that MAC without any ARP traffic.
pub fn static_neighbour(
    ns: &str,
    addr: std::net::IpAddr,
    mac: [u8; 6],
    dev: &str,
) -> anyhow::Result<()> {
    let mac = mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    exec(
        ns,
        &[
            "ip",
            "neigh",
            "replace",
            &addr.to_string(),
            "lladdr",
            &mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_name_is_the_enclosing_function() {
        fn here() {}
        assert_eq!(
            test_name(std::any::type_name_of_val(&here)),
            "test_name_is_the_enclosing_function"
        );
        assert_eq!(test_name("a::b::c"), "b");
        assert_eq!(test_name("plain"), "plain");
    }

    #[test]
    fn prefixes_have_the_family_shape() {
        for attempt in 0..100 {
            let p = new_prefix(attempt);
            assert_eq!(p.len(), PREFIX_LEN);
            assert_eq!(prefix_of(&format!("{p}-router")), Some(p.as_str()));
        }
        assert_eq!(prefix_of("xlABCDE-router"), None);
        assert_eq!(prefix_of("xl12345router"), None);
        assert_eq!(prefix_of("other-ns"), None);
        assert_eq!(prefix_of("xl12"), None);
    }

    #[test]
    fn stale_runs_are_removed_and_live_ones_kept() {
        crate::require_privileges!();
        let mut live = NetnsGuard::new().unwrap();
        let live_ns = live.create("keep").unwrap();

        // A run whose owner is dead: its namespace (with a process inside), bpffs and
        // scratch directory must go.
        fs::create_dir_all(OWNER_DIR).unwrap();
        let stale = (0..)
            .map(|a| new_prefix(1000 + a))
            .find(|p| !owner_file(p).exists())
            .unwrap();
        let mut dead = Command::new("true").spawn().unwrap();
        let dead_pid = dead.id();
        dead.wait().unwrap();
        let owner = Owner {
            pid: dead_pid,
            start_time: 1,
        };
        fs::write(owner_file(&stale), owner.encode()).unwrap();
        let stale_ns = format!("{stale}-x");
        run(&["ip", "netns", "add", &stale_ns]).unwrap();
        let mut sleeper = Command::new("ip")
            .args(["netns", "exec", &stale_ns, "sleep", "30"])
            .spawn()
            .unwrap();
        let stale_dir = std::env::temp_dir().join(format!("xdplb-{stale}"));
        fs::create_dir_all(&stale_dir).unwrap();
        // Its bpffs, mounted the way a guard does it.
        let mut fake = NetnsGuard {
            prefix: stale.clone(),
            namespaces: Vec::new(),
            bpffs: None,
            run_dir: stale_dir.clone(),
            owner_file: owner_file(&stale),
        };
        let stale_bpffs = fake.mount_bpffs().unwrap();
        assert!(is_bpffs(&stale_bpffs));
        fake.bpffs = None;
        std::mem::forget(fake); // the "dead run" never drops its guard

        thread::sleep(Duration::from_millis(100));
        let fresh = NetnsGuard::new().unwrap();
        let listed = list_namespaces().unwrap();
        assert!(
            !listed.contains(&stale_ns),
            "stale namespace kept: {listed:?}"
        );
        assert!(
            listed.contains(&live_ns),
            "live namespace removed: {listed:?}"
        );
        assert!(!stale_bpffs.exists(), "stale bpffs kept");
        assert!(!stale_dir.exists(), "stale scratch dir kept");
        assert!(!owner_file(&stale).exists(), "stale owner file kept");
        let deadline = Instant::now() + Duration::from_secs(5);
        while sleeper.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "process in the stale namespace not killed"
            );
            thread::sleep(Duration::from_millis(20));
        }
        drop(fresh);
        drop(live);
        assert!(!list_namespaces().unwrap().contains(&live_ns));
    }

    #[test]
    fn owner_round_trips_and_this_process_is_alive() {
        let me = Owner::current().unwrap();
        assert_eq!(
            Owner::decode(&me.encode()),
            Some(Owner {
                pid: me.pid,
                start_time: me.start_time
            })
        );
        assert!(me.alive());
        assert!(
            !Owner {
                pid: me.pid,
                start_time: me.start_time + 1
            }
            .alive()
        );
        assert_eq!(Owner::decode("garbage"), None);
    }
}
