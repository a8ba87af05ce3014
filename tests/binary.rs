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
    serve_on("127.0.0.1:0", extra)
}

/// [`serve`] with the HTTP port at `http`.
fn serve_on(http: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_activescale"));
    cmd.args([
        "serve",
        "--sink-addr",
        "127.0.0.1:0",
        "--scaler-addr",
        "127.0.0.1:0",
        "--http-addr",
        http,
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

/// Settings that only reading files or parsing the URL can refute stop
/// start-up the same way, before any port is bound: the HTTP port given is
/// held by the test, so a process that got as far as binding would fail on
/// it instead (exit 1, "binding ports").
#[test]
fn unusable_files_and_urls_fail_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    };
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let cert = write("cert.pem", &cert.pem());
    let key = write("key.pem", &key.serialize_pem());
    let other_key = write(
        "other.pem",
        &rcgen::KeyPair::generate().unwrap().serialize_pem(),
    );
    let not_pem = write("not.pem", "not a certificate\n");
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let held = held.local_addr().unwrap().to_string();
    for (args, name) in [
        (
            vec!["--store", "redis", "--redis-url", "cache:6379"],
            "redis_url",
        ),
        (vec!["--tls-cert", &not_pem, "--tls-key", &key], "tls_cert"),
        (
            vec!["--tls-cert", &cert, "--tls-key", &other_key],
            "tls_key",
        ),
        (vec!["--tls-cert", &cert, "--tls-key", &not_pem], "tls_key"),
        (
            vec![
                "--custom-metrics-tls-cert",
                &cert,
                "--custom-metrics-tls-key",
                &other_key,
            ],
            "custom_metrics_tls_key",
        ),
        (
            vec![
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--tls-client-ca",
                &key,
            ],
            "tls_client_ca",
        ),
        (
            // Checked by `preflight`, outside the config leaf, still before binding.
            vec![
                "--custom-metrics-addr",
                "127.0.0.1:0",
                "--custom-metrics-windows",
                "median_30s",
            ],
            "custom_metrics_windows",
        ),
    ] {
        let out = serve_on(&held, &args).output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {stderr:?}");
        assert!(
            lines[0].starts_with(&format!("activescale: invalid configuration: {name}")),
            "{stderr:?} should name {name}"
        );
        assert!(out.stdout.is_empty(), "nothing started: {args:?}");
    }
    // The same files, usable, get past the checks: the held port is the
    // next thing in the way.
    let out = serve_on(&held, &["--tls-cert", &cert, "--tls-key", &key])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("binding ports"), "{stderr}");
}

/// `serve --help`, split into one (flag name, text) per flag: clap wraps long
/// help onto further lines, which are joined back with single spaces.
fn serve_help_flags() -> Vec<(String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_activescale"))
        .args(["serve", "--help"])
        .env_remove("ACTIVESCALE_CONFIG")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let help = String::from_utf8(out.stdout).unwrap();
    let options = help.split_once("Options:").expect("an Options: section").1;
    let mut flags: Vec<(String, String)> = Vec::new();
    for line in options.lines() {
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        if !line.starts_with(' ') {
            // The after-help paragraph.
            break;
        }
        let spec = text.strip_prefix("-h, ").unwrap_or(text);
        if let Some(rest) = spec.strip_prefix("--") {
            let (name, rest) = rest.split_once(' ').unwrap_or((rest, ""));
            // The value placeholder: `<POD_TTL>` or `[<VIEW_ENABLED>]`.
            let rest = rest.trim_start();
            let rest = match rest.split_once('>') {
                Some((value, after)) if value.starts_with(['<', '[']) => {
                    after.trim_start_matches(']')
                }
                _ => rest,
            };
            flags.push((name.to_string(), rest.trim().to_string()));
        } else {
            let (_, last) = flags.last_mut().expect("help text before the first flag");
            if !last.is_empty() {
                last.push(' ');
            }
            last.push_str(text);
        }
    }
    flags
}

#[test]
fn serve_help_describes_every_flag_and_shows_its_default() {
    let flags = serve_help_flags();
    assert!(flags.len() >= 40, "parsed too few flags: {flags:?}");
    let mut defaults = std::collections::HashMap::new();
    for (name, text) in &flags {
        if name == "help" {
            continue;
        }
        let (description, default) = text
            .split_once("[default: ")
            .unwrap_or_else(|| panic!("--{name} shows no [default: ...]: {text:?}"));
        let default = default.split_once(']').expect("closing ]").0;
        let description = description
            .split_once("[env: ")
            .map_or(description, |(d, _)| d)
            .trim();
        assert!(
            description.split_whitespace().count() >= 2,
            "--{name} has no description: {text:?}"
        );
        defaults.insert(name.clone(), default.to_string());
    }

    let d = activescale::config::Config::default();
    let redis = activescale::config::RedisConfig::default();
    let duration = |v: std::time::Duration| humantime::format_duration(v).to_string();
    for (flag, expected) in [
        ("config", "unset".to_string()),
        ("sink-addr", d.servers.sink_addr.to_string()),
        ("scaler-addr", d.servers.scaler_addr.to_string()),
        ("http-addr", d.servers.http_addr.to_string()),
        ("pod-ttl", duration(d.engine.pod_ttl)),
        ("max-window", duration(d.engine.max_window)),
        ("redis-timeout", duration(redis.timeout)),
        ("http-header-timeout", duration(d.http.header_timeout)),
        ("activator-hold-timeout", duration(d.activator.hold_timeout)),
        ("max-message-bytes", d.sink.max_message_bytes.to_string()),
        (
            "max-families-per-pod",
            d.sink.max_families_per_pod.to_string(),
        ),
        ("redis-pool-size", redis.pool_size.to_string()),
        (
            "prometheus-max-response-bytes",
            d.prometheus.max_response_bytes.to_string(),
        ),
        ("view-enabled", d.http.view_enabled.to_string()),
        ("redis-cluster", redis.cluster.to_string()),
        ("redis-url", redis.url.clone()),
        ("metric-include", d.sink.metric_include.join(",")),
        (
            "prometheus-credentials-dir",
            d.prometheus.credentials_dir.display().to_string(),
        ),
        ("store", "memory".into()),
        ("log-format", "text".into()),
        ("warmup", "unset".into()),
        ("custom-metrics-addr", "unset".into()),
    ] {
        assert_eq!(
            defaults.get(flag).map(String::as_str),
            Some(expected.as_str()),
            "--{flag}'s shown default"
        );
    }
}

/// `redis_cluster_mode` was never a setting (`redis_cluster` is): a file
/// naming it fails like any unknown key, naming it, before anything binds.
#[test]
fn unknown_config_key_fails_fast_naming_it() {
    let mut file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    std::io::Write::write_all(&mut file, b"redis_cluster_mode: true\n").unwrap();
    let path = file.path().to_str().unwrap();
    let out = serve(&["--config", path]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.contains("redis_cluster_mode"), "{stderr:?}");
    assert!(out.stdout.is_empty());
}
