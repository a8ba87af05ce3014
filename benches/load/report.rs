//! What every mode reports: one JSON object a figure (stdout and `--out`),
//! latency histograms, and the server's CPU and memory from `/proc/<pid>`
//! and its own `/metrics`.

use std::{net::SocketAddr, time::Duration};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::Cli;

pub fn emit(cli: &Cli, mut figure: Value) {
    figure["store"] = json!(cli.store);
    println!("{figure}");
    if let Some(path) = &cli.out {
        use std::io::Write;
        let line = format!("{figure}\n");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            eprintln!("load: writing {}: {e}", path.display());
        }
    }
}

pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("histogram bounds")
}

pub fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

pub fn nanos(d: Duration) -> u64 {
    (d.as_nanos() as u64).max(1)
}

/// Server CPU and memory from /proc.
#[derive(Clone, Copy)]
pub struct ProcSnap {
    cpu_s: f64,
}

pub fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces); utime and stime
    // are fields 14 and 15 of the whole line.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clk_tck())
}

pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub fn snap(pid: Option<u32>) -> Option<ProcSnap> {
    Some(ProcSnap {
        cpu_s: cpu_seconds(pid?)?,
    })
}

pub fn cpu_between(a: Option<ProcSnap>, b: Option<ProcSnap>) -> Option<f64> {
    Some(b?.cpu_s - a?.cpu_s)
}

/// CPU-seconds of `pid` and of its direct children (nginx's master and its
/// worker processes, which do the proxying).
pub fn tree_cpu_seconds(pid: u32) -> Option<f64> {
    let mut total = cpu_seconds(pid)?;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if parent_pid(child) == Some(pid) {
            total += cpu_seconds(child).unwrap_or(0.0);
        }
    }
    Some(total)
}

fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After "pid (comm) state": ppid is the second field.
    stat[stat.rfind(')')? + 2..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub fn tree_snap(pid: Option<u32>) -> Option<ProcSnap> {
    Some(ProcSnap {
        cpu_s: tree_cpu_seconds(pid?)?,
    })
}

/// A counter or gauge from the server's /metrics.
pub async fn server_metric(http: Option<SocketAddr>, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{}/metrics", http?))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// One client of a closed loop: each call resolves to whether the answer
/// was the expected one.
pub type Call = Box<dyn FnMut() -> std::pin::Pin<Box<dyn Future<Output = bool> + Send>> + Send>;

/// What a closed loop measured.
pub struct LoopResult {
    pub hist: Histogram<u64>,
    pub calls: u64,
    pub failures: u64,
    pub elapsed_s: f64,
}

impl LoopResult {
    pub fn per_s(&self) -> f64 {
        self.calls as f64 / self.elapsed_s
    }

    /// An empty result, to add slices to.
    pub fn empty() -> Self {
        Self {
            hist: new_hist(),
            calls: 0,
            failures: 0,
            elapsed_s: 0.0,
        }
    }

    /// Adds another slice measured with the same clients.
    pub fn add(&mut self, other: &LoopResult) {
        let _ = self.hist.add(&other.hist);
        self.calls += other.calls;
        self.failures += other.failures;
        self.elapsed_s += other.elapsed_s;
    }
}

/// Every client calls again as soon as it has its answer, until `duration`
/// is over: the saturation figures of whatever the calls go through.
pub async fn closed_loop(clients: Vec<Call>, duration: Duration) -> LoopResult {
    closed_loop_keeping(clients, duration).await.0
}

/// [`closed_loop`], handing the clients (and their open connections) back,
/// so that one set of connections can be measured in several slices.
pub async fn closed_loop_keeping(
    clients: Vec<Call>,
    duration: Duration,
) -> (LoopResult, Vec<Call>) {
    use std::time::Instant;
    let t0 = Instant::now();
    let stop = t0 + duration;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut call| {
            tokio::spawn(async move {
                let (mut h, mut calls, mut failures) = (new_hist(), 0u64, 0u64);
                while Instant::now() < stop {
                    let started = Instant::now();
                    let ok = call().await;
                    let _ = h.record(nanos(started.elapsed()));
                    calls += 1;
                    failures += u64::from(!ok);
                }
                (h, calls, failures, call)
            })
        })
        .collect();
    let mut out = LoopResult::empty();
    let mut back = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Ok((h, calls, failures, call)) = t.await {
            let _ = out.hist.add(&h);
            out.calls += calls;
            out.failures += failures;
            back.push(call);
        }
    }
    out.elapsed_s = t0.elapsed().as_secs_f64();
    (out, back)
}

/// A labelled sample from the server's /metrics: the first line of family
/// `name` whose labels contain `label` (e.g. `host="web.example.com"`).
pub async fn server_metric_labelled(
    http: Option<SocketAddr>,
    name: &str,
    label: &str,
) -> Option<f64> {
    let text = reqwest::get(format!("http://{}/metrics", http?))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') && rest.contains(label))
        })?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}
