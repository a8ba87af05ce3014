//! The real `activescale` binary: start-up, config errors, SIGTERM.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
};

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_activescale"));
    cmd.args([
        "serve",
        "--sink-addr",
        "127.0.0.1:0",
        "--scaler-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ])
    .args(["--log-format", "json", "--warmup", "0s"])
    .args(extra)
    // Only this test's settings: an ACTIVESCALE_* variable of the caller's
    // environment would be read as one.
    .env_clear()
    .envs(
        std::env::vars().filter(|(k, _)| {
            !k.starts_with("ACTIVESCALE_") && k != "RUST_LOG" && k != "LOG_VERBOSITY"
        }),
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let mut child = Running(serve(&[]).spawn().expect("spawn"));
    let stdout = child.0.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    // The start-up line carries the bound addresses.
    let serving = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("activescale serving"))
        .expect("start-up line");
    let v: serde_json::Value = serde_json::from_str(&serving).unwrap();
    let http = v["http_addr"]
        .as_str()
        .expect("http_addr field")
        .to_string();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        reqwest::get(format!("http://{http}/healthz"))
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status.as_u16(), 200);

    let pid = child.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let code = child.0.wait().expect("wait");
    assert_eq!(
        code.code(),
        Some(0),
        "exit status after SIGTERM; log: {rest:?}"
    );
    assert!(rest.iter().any(|l| l.contains("shutting down")), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
}

#[test]
fn bad_config_fails_fast_with_one_line_naming_it() {
    for (flag, value, name) in [
        ("--pod-ttl", "soon", "pod_ttl"),
        ("--store", "etcd", "store"),
        ("--max-message-bytes", "12", "max_message_bytes"),
        ("--redis-timeout", "0s", "redis_timeout"),
    ] {
        let out = serve(&[flag, value]).output().expect("run");
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {stderr:?}");
        assert!(lines[0].contains(name), "{stderr:?} should name {name}");
        assert!(
            out.stdout.is_empty(),
            "nothing started: {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
