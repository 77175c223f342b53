//! `cargo xtask cache-tests`: run the public HTTP caching conformance suite
//! (<https://github.com/http-tests/cache-tests>, BSD-3) against the agent's L7 cache and
//! print its score beside the published ones.
//!
//! Everything runs on loopback: the suite's origin server (node) on one port, the release
//! agent with `--xdp-mode off` and one l7 service whose backend is that origin on another,
//! the suite's client against the agent. The suite's source is not vendored in this
//! repository; it is looked for in `--suite DIR`, else `$CACHE_TESTS_DIR`, else
//! `../shared/vendor/cache-tests` (and `../../shared/vendor/cache-tests`) next to the
//! repository. It is copied to `target/cache-tests/suite` so that `npm` never writes into
//! it. node and npm come from Debian when missing ([`apt::ensure_cache_tests`]); neither
//! `cargo xtask setup` nor CI installs them, and `cargo xtask test` does not run this.

use std::{
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{apt, cmd, release, setup};

/// Environment variable naming the suite's source directory.
pub const SUITE_ENV: &str = "CACHE_TESTS_DIR";

/// Where the suite lives upstream.
const SUITE_GIT: &str = "https://github.com/http-tests/cache-tests";

/// Published results (required, optimal) of the suite for other caches, from
/// <https://cache-tests.fyi/> (as listed by the project's runner script).
const PUBLISHED: &[(&str, u32, u32)] = &[
    ("Apache Traffic Server 9.2", 132, 70),
    ("Apache httpd 2.4", 131, 68),
    ("Squid 6.13", 122, 59),
    ("Caddy cache-handler", 121, 44),
    ("Varnish 7.7", 119, 45),
    ("nginx 1.28", 99, 59),
    ("Fastly", 96, 49),
    ("HAProxy 3.0", 89, 40),
];

/// The client run is stopped after this long.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(900);

/// The score script: counts results per kind (required, optimal, check) with the suite's
/// own `determineTestResult` (dependencies honoured), and lists the tests not passed.
const SCORE_MJS: &str = r"import fs from 'fs'
import tests from './tests/index.mjs'
import { determineTestResult, resultTypes } from './test-engine/lib/results.mjs'
const results = JSON.parse(fs.readFileSync(process.argv[2]))
const c = { required: [0, 0], optimal: [0, 0], check: [0, 0] }; const fails = []
for (const s of tests) for (const t of s.tests) {
  if (t.browser_only) continue
  const k = t.kind || 'required'; c[k][1]++
  const r = determineTestResult(tests, t.id, results)
  if (r === resultTypes.pass || r === resultTypes.yes) c[k][0]++
  else if (k !== 'check') fails.push(k + ' ' + t.id + ': ' + r[2] + ' ' + JSON.stringify(results[t.id]))
}
fs.writeFileSync(process.argv[3], fails.join('\n') + '\n')
console.log(`cache-tests: required ${c.required[0]}/${c.required[1]} optimal ${c.optimal[0]}/${c.optimal[1]} check ${c.check[0]}/${c.check[1]}`)
";

/// `cargo xtask cache-tests [--suite DIR]`.
pub fn cache_tests(suite: Option<&Path>, stale_if_unreachable_s: u64) -> Result<()> {
    let source = find_suite(suite)?;
    println!("cache-tests: suite at {}", source.display());
    apt::ensure_cache_tests().context("installing node and npm")?;
    setup::ensure_ready()?;
    release::build(&["lb-agent"]).context("building the agent")?;

    let work = cmd::workspace_root().join("target").join("cache-tests");
    let scratch = work.join("suite");
    copy_suite(&source, &scratch)?;
    if !scratch.join("node_modules").join("undici").is_dir() {
        // Only the four interim-response (1xx) tests use undici; without it they fail.
        let installed = cmd::run(Command::new("npm").current_dir(&scratch).args([
            "install",
            "--no-save",
            "--no-audit",
            "--no-fund",
            "undici@7",
        ]));
        if let Err(err) = installed {
            println!(
                "note: undici not installed ({err:#}); the 4 interim-response tests will fail"
            );
        }
    }

    let origin_port = free_port()?;
    let vip_port = free_port()?;
    let api_port = free_port()?;
    let _origin = Guard::spawn(
        "the suite's origin",
        Command::new("node")
            .current_dir(&scratch)
            .args(["test-engine/server/server.mjs"])
            .env("npm_config_protocol", "http")
            .env("npm_config_port", origin_port.to_string())
            .env("npm_config_pidfile", work.join("origin.pid"))
            .stdout(log_file(&work.join("origin.log"))?)
            .stderr(log_file(&work.join("origin.err"))?),
    )?;
    wait_for_port(origin_port, "the suite's origin")?;

    let config = agent_config(
        &work,
        [vip_port, api_port, origin_port],
        stale_if_unreachable_s,
    );
    let config_path = work.join("agent.toml");
    fs::write(&config_path, &config)
        .with_context(|| format!("writing {}", config_path.display()))?;
    println!(
        "cache-tests: agent config ({}):\n{config}",
        config_path.display()
    );
    let _agent = Guard::spawn(
        "lb-agent",
        Command::new(release::agent_bin())
            .args(["run", "--config"])
            .arg(&config_path)
            .args(["--xdp-mode", "off"])
            .env("XDPLB_LOG", "warn")
            .stdout(log_file(&work.join("agent.log"))?)
            .stderr(log_file(&work.join("agent.err"))?),
    )?;
    wait_for_port(vip_port, "the agent's l7 service")?;

    let results = work.join("results.json");
    let base = format!("http://127.0.0.1:{vip_port}");
    println!("cache-tests: running the suite's client against {base} (about 90 s)");
    let mut client = Guard::spawn(
        "the suite's client",
        Command::new("node")
            .current_dir(&scratch)
            .args(["--no-warnings", "test-engine/cli.mjs"])
            .env("npm_config_base", &base)
            .env("npm_config_id", "")
            .env("npm_package_config_id", "")
            .stdout(log_file(&results)?)
            .stderr(log_file(&work.join("client.err"))?),
    )?;
    let status = client.wait_timeout(CLIENT_TIMEOUT)?;
    if !status.is_some_and(|s| s.success()) {
        bail!(
            "the suite's client did not finish ({status:?}); see {}",
            work.join("client.err").display()
        );
    }

    fs::write(scratch.join("score.mjs"), SCORE_MJS).context("writing score.mjs")?;
    let fails = work.join("not-passed.txt");
    let line = cmd::output(
        Command::new("node")
            .current_dir(&scratch)
            .arg("score.mjs")
            .arg(&results)
            .arg(&fails),
    )?;
    let line = line.trim();
    println!("\n{line}");
    let (required, optimal) = parse_score(line)
        .with_context(|| format!("unexpected output of the score script: {line:?}"))?;
    println!("\n{}", score_table(required, optimal));
    println!(
        "results: {}; required and optimal tests not passed: {}",
        results.display(),
        fails.display()
    );
    Ok(())
}

/// The suite's directory: `--suite`, `$CACHE_TESTS_DIR`, or the shared vendor directory
/// next to the repository; an error saying how to get it when none holds the suite.
fn find_suite(suite: Option<&Path>) -> Result<PathBuf> {
    let root = cmd::workspace_root();
    let candidates: Vec<PathBuf> = match (suite, std::env::var_os(SUITE_ENV)) {
        (Some(dir), _) => vec![dir.to_owned()],
        (None, Some(dir)) if !dir.is_empty() => vec![PathBuf::from(dir)],
        _ => vec![
            root.join("../shared/vendor/cache-tests"),
            root.join("../../shared/vendor/cache-tests"),
        ],
    };
    for dir in &candidates {
        if is_suite(dir) {
            return dir
                .canonicalize()
                .with_context(|| format!("resolving {}", dir.display()));
        }
    }
    let looked: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
    bail!(
        "the http-tests/cache-tests suite was not found (looked in {}). Get it with\n  \
         git clone {SUITE_GIT} DIR\nand run `cargo xtask cache-tests --suite DIR` (or set {SUITE_ENV}=DIR)",
        looked.join(", ")
    )
}

/// Does `dir` hold the suite (its client, origin server and test index)?
fn is_suite(dir: &Path) -> bool {
    [
        "test-engine/cli.mjs",
        "test-engine/server/server.mjs",
        "tests/index.mjs",
        "package.json",
    ]
    .iter()
    .all(|f| dir.join(f).is_file())
}

/// Copy the suite to `to` afresh, keeping `to/node_modules` (npm's install) if present.
fn copy_suite(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in fs::read_dir(to)? {
        let entry = entry?;
        if entry.file_name() == "node_modules" {
            continue;
        }
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        }
        .with_context(|| format!("removing {}", path.display()))?;
    }
    copy_dir(from, to)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        if name == "node_modules" || name == ".git" {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        if entry.file_type()?.is_dir() {
            fs::create_dir_all(&dst)?;
            copy_dir(&src, &dst)?;
        } else {
            fs::copy(&src, &dst)
                .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        }
    }
    Ok(())
}

/// The agent's config: one l7 service on loopback with a cache, backed by the origin.
fn agent_config(work: &Path, ports: [u16; 3], stale_if_unreachable_s: u64) -> String {
    let [vip_port, api_port, origin_port] = ports;
    format!(
        r#"[agent]
state_dir = "{state}"
api_listen = "127.0.0.1:{api_port}"

[[service]]
name = "cache-tests"
vip = "127.0.0.1:{vip_port}"
mode = "l7"
scheduler = "round-robin"
cache = {{ max_bytes = 67108864, max_object_bytes = 8388608, targets = ["CDN-Cache-Control"], stale_if_unreachable_s = {stale_if_unreachable_s} }}
backend = [ {{ address = "127.0.0.1", port = {origin_port} }} ]
"#,
        state = work.join("state").display()
    )
}

/// A loopback port free right now.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Wait (at most 30 s) until something accepts connections on loopback `port`.
fn wait_for_port(port: u16, what: &str) -> Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(100));
    }
    bail!("{what} did not listen on {addr} within 30 s")
}

fn log_file(path: &Path) -> Result<fs::File> {
    fs::File::create(path).with_context(|| format!("creating {}", path.display()))
}

/// A child process that is stopped (SIGTERM, then SIGKILL after 5 s) when dropped.
struct Guard {
    name: &'static str,
    child: Child,
}

impl Guard {
    fn spawn(name: &'static str, cmd: &mut Command) -> Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self { name, child })
    }

    /// Wait for the process to exit, at most `limit`; `None` when it did not.
    fn wait_timeout(&mut self, limit: Duration) -> Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            thread::sleep(Duration::from_millis(200));
        }
        Ok(None)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        if !matches!(self.wait_timeout(Duration::from_secs(5)), Ok(Some(_))) {
            println!(
                "note: {} (pid {pid}) did not stop on SIGTERM: killing it",
                self.name
            );
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// (required, optimal) passed, from the score line
/// `cache-tests: required R/160 optimal O/105 check C/100`.
fn parse_score(line: &str) -> Option<(u32, u32)> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let value = |key: &str| -> Option<u32> {
        let i = words.iter().position(|w| *w == key)?;
        words.get(i + 1)?.split('/').next()?.parse().ok()
    };
    Some((value("required")?, value("optimal")?))
}

/// The Markdown table of this run beside the published results.
fn score_table(required: u32, optimal: u32) -> String {
    let mut rows = vec![("xdplb (this run)".to_owned(), required, optimal)];
    rows.extend(
        PUBLISHED
            .iter()
            .map(|(name, r, o)| ((*name).to_owned(), *r, *o)),
    );
    let mut out =
        String::from("| cache | required (of 160) | optimal (of 105) |\n|---|---:|---:|\n");
    for (name, r, o) in rows {
        let _ = writeln!(out, "| {name} | {r} | {o} |");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_line_is_parsed() {
        assert_eq!(
            parse_score("cache-tests: required 150/160 optimal 85/105 check 57/100"),
            Some((150, 85))
        );
        assert_eq!(parse_score("nonsense"), None);
    }

    #[test]
    fn table_lists_this_run_first() {
        let t = score_table(150, 85);
        assert!(
            t.lines()
                .nth(2)
                .unwrap()
                .contains("| xdplb (this run) | 150 | 85 |")
        );
        assert!(t.contains("| HAProxy 3.0 | 89 | 40 |"));
    }
}
