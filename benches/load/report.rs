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
