//! What every benchmark prints and records: tables of medians with their spread over
//! several runs, and one JSON file per benchmark.
//!
//! A benchmark builds one [`Report`], adds [`Table`]s of rows of [`Cell`]s and free-text
//! notes, and calls [`Report::finish`], which
//! - prints each table as a Markdown table (columns padded; it pastes into the README as
//!   it is), then the notes;
//! - writes `<dir>/<benchmark>.json`, where `<dir>` is `$XDPLB_BENCH_DIR` (`cargo xtask
//!   bench` sets it to `target/bench` of the workspace) or else `target/bench` under the
//!   current directory.
//!
//! ```ignore
//! let mut report = report::Report::new("failover", "be2 of 3 backends dies under traffic");
//! let table = report.table(
//!     "time to reroute, median (min-max) of 3 runs",
//!     &[("health", false), ("detected after", true)], // (column, right-aligned)
//! );
//! table.row(vec![
//!     report::Cell::text("http 100/80 ms, fall 2"),
//!     report::Cell::samples("ms", 0, &[183.0, 190.0, 201.0]),        // "190 ms (183-201)"
//!     // or report::Cell::maybe_samples("ms", 0, &[Some(1.0), None], "none failed")
//! ]);
//! report.note("Method: ...");
//! report.finish()?; // prints, writes target/bench/failover.json
//! ```
//!
//! A [`Cell::samples`] cell shows `median unit (min-max)` (only the median for one
//! sample) and keeps every sample: the JSON has them all, with median, min, max, p25 and
//! p75 (linear interpolation between closest ranks). [`Cell::with_shown`] replaces what
//! the table shows and keeps the samples (e.g. a ratio column computed from medians).
//! [`Cell::text`] is a plain cell.
//!
//! The JSON (one object): `benchmark`, `summary`, `date` (RFC 7231 date, UTC),
//! `unix_time`, `git_commit` (`git rev-parse HEAD`, null outside a checkout) and
//! `git_dirty`, `command` (this process's argv), `machine` (`kernel`, `cpu_model`,
//! `cores` (online CPUs), `load_average_start` / `load_average_end` (1/5/15 min from
//! /proc/loadavg: a loaded machine shows here)), `duration_s`, `tables` (each: `title`,
//! `columns`, `rows`: each row a list of cells `{column, shown}` plus, for sample cells,
//! `{unit, samples, missing, median, min, max, p25, p75}`), and `notes`.

use std::{
    fs,
    path::PathBuf,
    process::Command,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use serde_json::{Value, json};

/// The variable naming the directory the JSON files go to.
pub const DIR_ENV: &str = "XDPLB_BENCH_DIR";

/// Summary statistics of a set of samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub p25: f64,
    pub p75: f64,
}

impl Stats {
    /// The statistics of `values` (NaNs left out); `None` when there is none.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable_by(f64::total_cmp);
        Some(Self {
            median: quantile(&v, 0.5),
            min: v[0],
            max: v[v.len() - 1],
            p25: quantile(&v, 0.25),
            p75: quantile(&v, 0.75),
        })
    }
}

/// Quantile `q` of sorted, non-empty `v`, interpolating linearly between closest ranks.
fn quantile(v: &[f64], q: f64) -> f64 {
    let pos = q * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// The median of `values` (NaN when empty): for benchmarks that compute with medians.
pub fn median(values: &[f64]) -> f64 {
    Stats::of(values).map_or(f64::NAN, |s| s.median)
}

/// Samples behind a cell.
#[derive(Clone, Debug)]
struct Samples {
    unit: String,
    values: Vec<f64>,
    /// Runs that produced no value (e.g. an event that was never logged).
    missing: usize,
}

/// One cell of a table: what is shown, and the samples it summarises, if any.
#[derive(Clone, Debug)]
pub struct Cell {
    shown: String,
    samples: Option<Samples>,
}

/// `v` with `decimals` decimals.
fn fixed(v: f64, decimals: usize) -> String {
    format!("{v:.decimals$}")
}

impl Cell {
    /// A plain cell.
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            shown: text.into(),
            samples: None,
        }
    }

    /// Samples in `unit`, shown as `median unit (min-max)` with `decimals` decimals.
    pub fn samples(unit: &str, decimals: usize, values: &[f64]) -> Self {
        let opts: Vec<Option<f64>> = values.iter().copied().map(Some).collect();
        Self::maybe_samples(unit, decimals, &opts, "-")
    }

    /// Samples where some runs produced none: the missing ones are counted (`, 1x none`
    /// after the spread); `none` is shown when no run produced a value.
    pub fn maybe_samples(unit: &str, decimals: usize, values: &[Option<f64>], none: &str) -> Self {
        let have: Vec<f64> = values.iter().flatten().copied().collect();
        let missing = values.len() - have.len();
        let unit_sp = if unit.is_empty() {
            String::new()
        } else {
            format!(" {unit}")
        };
        let mut shown = match Stats::of(&have) {
            None => none.to_owned(),
            Some(s) if have.len() == 1 => format!("{}{unit_sp}", fixed(s.median, decimals)),
            Some(s) => format!(
                "{}{unit_sp} ({}-{})",
                fixed(s.median, decimals),
                fixed(s.min, decimals),
                fixed(s.max, decimals)
            ),
        };
        if missing > 0 && !have.is_empty() {
            shown.push_str(&format!(", {missing}x {none}"));
        }
        Self {
            shown,
            samples: Some(Samples {
                unit: unit.to_owned(),
                values: have,
                missing,
            }),
        }
    }

    /// The same samples, shown as `shown`.
    pub fn with_shown(mut self, shown: impl Into<String>) -> Self {
        self.shown = shown.into();
        self
    }

    /// What the table shows.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// The median of the samples, if the cell has any.
    pub fn median(&self) -> Option<f64> {
        self.samples
            .as_ref()
            .and_then(|s| Stats::of(&s.values))
            .map(|s| s.median)
    }

    fn to_json(&self, column: &str) -> Value {
        let mut cell = json!({ "column": column, "shown": self.shown });
        if let Some(s) = &self.samples {
            cell["unit"] = json!(s.unit);
            cell["samples"] = json!(s.values);
            cell["missing"] = json!(s.missing);
            if let Some(st) = Stats::of(&s.values) {
                cell["median"] = json!(st.median);
                cell["min"] = json!(st.min);
                cell["max"] = json!(st.max);
                cell["p25"] = json!(st.p25);
                cell["p75"] = json!(st.p75);
            }
        }
        cell
    }
}

/// One table of a report.
#[derive(Clone, Debug)]
pub struct Table {
    title: String,
    columns: Vec<String>,
    right: Vec<bool>,
    rows: Vec<Vec<Cell>>,
}

impl Table {
    /// Adds a row; it must have one cell per column.
    pub fn row(&mut self, cells: Vec<Cell>) -> &mut Self {
        assert_eq!(
            cells.len(),
            self.columns.len(),
            "table {:?}: a row of {} cells for {} columns",
            self.title,
            cells.len(),
            self.columns.len()
        );
        self.rows.push(cells);
        self
    }

    /// The table as Markdown, each column as wide as its widest cell.
    pub fn render(&self) -> String {
        let n = self.columns.len();
        let widths: Vec<usize> = (0..n)
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| r[i].shown.chars().count())
                    .chain([self.columns[i].chars().count(), 3])
                    .max()
                    .unwrap_or(3)
            })
            .collect();
        let line = |cells: Vec<&str>| {
            let inner = cells
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let w = widths[i];
                    if self.right[i] {
                        format!("{c:>w$}")
                    } else {
                        format!("{c:<w$}")
                    }
                })
                .collect::<Vec<_>>()
                .join(" | ");
            format!("| {inner} |")
        };
        let mut out = String::new();
        if !self.title.is_empty() {
            out.push_str(&self.title);
            out.push_str("\n\n");
        }
        out.push_str(&line(self.columns.iter().map(String::as_str).collect()));
        out.push('\n');
        let rule = widths
            .iter()
            .zip(&self.right)
            .map(|(w, r)| {
                if *r {
                    format!("{}:", "-".repeat(w - 1))
                } else {
                    "-".repeat(*w)
                }
            })
            .collect::<Vec<_>>()
            .join(" | ");
        out.push_str(&format!("| {rule} |\n"));
        for r in &self.rows {
            out.push_str(&line(r.iter().map(|c| c.shown.as_str()).collect()));
            out.push('\n');
        }
        out
    }

    fn to_json(&self) -> Value {
        json!({
            "title": self.title,
            "columns": self.columns,
            "rows": self.rows.iter().map(|r| {
                r.iter().zip(&self.columns).map(|(c, col)| c.to_json(col)).collect::<Vec<_>>()
            }).collect::<Vec<_>>(),
        })
    }
}

/// The machine a benchmark ran on.
#[derive(Clone, Debug)]
pub struct Machine {
    pub kernel: String,
    pub cpu_model: String,
    /// Online CPUs.
    pub cores: usize,
}

impl Machine {
    pub fn read() -> Self {
        let cpu_model = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("model name")
                        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
                })
            })
            .unwrap_or_else(|| "unknown CPU".to_owned());
        Self {
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned()),
            cpu_model,
            cores: std::thread::available_parallelism().map_or(0, usize::from),
        }
    }

    /// `2 CPUs (model), kernel K`.
    pub fn describe(&self) -> String {
        format!(
            "{} CPUs ({}), kernel {}",
            self.cores, self.cpu_model, self.kernel
        )
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> Option<[f64; 3]> {
    let text = fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|w| w.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// `git rev-parse HEAD` and whether the work tree has changes, from the current directory.
fn git_commit() -> (Option<String>, Option<bool>) {
    let out = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = out(&["rev-parse", "HEAD"]);
    let dirty = commit
        .as_ref()
        .and_then(|_| out(&["status", "--porcelain", "--untracked-files=no"]))
        .map(|s| !s.is_empty());
    (commit, dirty)
}

/// A benchmark's tables, notes and context; see the module doc.
#[derive(Debug)]
pub struct Report {
    benchmark: String,
    summary: String,
    tables: Vec<Table>,
    notes: Vec<String>,
    started: Instant,
    started_wall: SystemTime,
    load_start: Option<[f64; 3]>,
    machine: Machine,
}

impl Report {
    /// A report of benchmark `benchmark` (the JSON file's name), with a one-line summary
    /// printed first.
    pub fn new(benchmark: &str, summary: impl Into<String>) -> Self {
        Self {
            benchmark: benchmark.to_owned(),
            summary: summary.into(),
            tables: Vec::new(),
            notes: Vec::new(),
            started: Instant::now(),
            started_wall: SystemTime::now(),
            load_start: load_average(),
            machine: Machine::read(),
        }
    }

    /// Adds a table with `columns` (name, right-aligned) and returns it to fill.
    pub fn table(&mut self, title: impl Into<String>, columns: &[(&str, bool)]) -> &mut Table {
        self.tables.push(Table {
            title: title.into(),
            columns: columns.iter().map(|(c, _)| (*c).to_owned()).collect(),
            right: columns.iter().map(|(_, r)| *r).collect(),
            rows: Vec::new(),
        });
        self.tables.last_mut().expect("just pushed")
    }

    /// Adds a paragraph printed after the tables.
    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    /// Everything printed, as one string.
    pub fn render(&self) -> String {
        let mut out = format!("xdplb-bench {}: {}\n\n", self.benchmark, self.summary);
        for t in &self.tables {
            out.push_str(&t.render());
            out.push('\n');
        }
        for n in &self.notes {
            out.push_str(n);
            out.push('\n');
        }
        out.push_str(&format!(
            "Machine: {}; load average {}.\n",
            self.machine.describe(),
            load_average().map_or("unknown".to_owned(), |l| format!(
                "{:.2} {:.2} {:.2}",
                l[0], l[1], l[2]
            ))
        ));
        out
    }

    /// The JSON record.
    pub fn to_json(&self) -> Value {
        let (commit, dirty) = git_commit();
        let unix = self
            .started_wall
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        json!({
            "benchmark": self.benchmark,
            "summary": self.summary,
            "date": httpdate::fmt_http_date(self.started_wall),
            "unix_time": unix,
            "git_commit": commit,
            "git_dirty": dirty,
            "command": std::env::args().collect::<Vec<_>>(),
            "machine": {
                "kernel": self.machine.kernel,
                "cpu_model": self.machine.cpu_model,
                "cores": self.machine.cores,
                "load_average_start": self.load_start,
                "load_average_end": load_average(),
            },
            "duration_s": self.started.elapsed().as_secs_f64(),
            "tables": self.tables.iter().map(Table::to_json).collect::<Vec<_>>(),
            "notes": self.notes,
        })
    }

    /// The directory JSON files go to: `$XDPLB_BENCH_DIR`, else `target/bench`.
    pub fn dir() -> PathBuf {
        std::env::var_os(DIR_ENV)
            .filter(|d| !d.is_empty())
            .map_or_else(|| PathBuf::from("target/bench"), PathBuf::from)
    }

    /// Prints the report and writes `<dir>/<benchmark>.json`; returns that path.
    pub fn finish(self) -> anyhow::Result<PathBuf> {
        print!("{}", self.render());
        let dir = Self::dir();
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{}.json", self.benchmark));
        let text = serde_json::to_string_pretty(&self.to_json()).context("encoding the report")?;
        fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("Written: {}", path.display());
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_cells() {
        let s = Stats::of(&[5.0, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!(
            (s.median, s.min, s.max, s.p25, s.p75),
            (3.0, 1.0, 5.0, 2.0, 4.0)
        );
        assert_eq!(Stats::of(&[1.0, 2.0]).unwrap().median, 1.5);
        assert_eq!(Stats::of(&[]), None);
        assert!(median(&[]).is_nan());
        assert_eq!(
            Cell::samples("ms", 1, &[2.0, 1.0, 4.0]).shown(),
            "2.0 ms (1.0-4.0)"
        );
        assert_eq!(Cell::samples("", 0, &[7.0]).shown(), "7");
        assert_eq!(
            Cell::maybe_samples("ms", 0, &[Some(30.0), Some(10.0), None], "none").shown(),
            "20 ms (10-30), 1x none"
        );
        assert_eq!(
            Cell::maybe_samples("ms", 0, &[None, None], "none failed").shown(),
            "none failed"
        );
        let c = Cell::samples("ns", 0, &[3.0, 1.0, 2.0]).with_shown("x");
        assert_eq!((c.shown(), c.median()), ("x", Some(2.0)));
        let j = c.to_json("col");
        assert_eq!(j["samples"], json!([3.0, 1.0, 2.0]));
        assert_eq!(j["median"], json!(2.0));
        assert_eq!(j["column"], json!("col"));
    }

    #[test]
    fn tables_render_as_markdown_and_json() {
        let mut r = Report::new("unit", "a test");
        r.table("T", &[("case", false), ("ns", true)])
            .row(vec![
                Cell::text("a"),
                Cell::samples("ns", 0, &[10.0, 12.0, 11.0]),
            ])
            .row(vec![Cell::text("long case"), Cell::text("-")]);
        r.note("N");
        assert_eq!(
            r.tables[0].render(),
            "T\n\n\
             | case      |            ns |\n\
             | --------- | ------------: |\n\
             | a         | 11 ns (10-12) |\n\
             | long case |             - |\n"
        );
        let j = r.to_json();
        assert_eq!(j["benchmark"], "unit");
        assert_eq!(
            j["tables"][0]["rows"][0][1]["samples"],
            json!([10.0, 12.0, 11.0])
        );
        assert_eq!(j["tables"][0]["columns"], json!(["case", "ns"]));
        assert!(j["machine"]["cores"].as_u64().unwrap() >= 1);
        assert!(j["command"].is_array());
        assert!(r.render().contains("N\nMachine: "));
    }
}
