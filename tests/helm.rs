//! The Helm chart, checked with Helm's own lint (through `scripts/helm-lint.py`
//! and the helm-sdkpy package), its rendered environment fed to the
//! service's real config loader, and its rendered NetworkPolicy read as the
//! trust model says: KEDA's namespace alone reaches the scaler port.
//! Rendered in the release namespace `activescale-system` (helm-sdkpy's lint
//! leaves it empty; the script sets it), not KEDA's.
//!
//! Needs `python3` with `helm-sdkpy`, `jsonschema` and `pyyaml`
//! (`pip install --ignore-requires-python helm-sdkpy jsonschema pyyaml`). When
//! they are missing the test is skipped with a loud message, unless
//! `REQUIRE_HELM_LINT=1` is set (CI), where it fails.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use activescale::config::Config;
use serde_json::{Value, json};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether the Python side can run; `Err` says what is missing.
fn python_ready() -> Result<(), String> {
    let out = Command::new("python3")
        .args(["-c", "import helm_sdkpy, jsonschema, yaml"])
        .output()
        .map_err(|e| format!("python3 cannot be started: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Fails under `REQUIRE_HELM_LINT=1`; otherwise says loudly that the
/// chart goes unchecked.
fn skip_or_fail(why: &str) {
    let required = std::env::var("REQUIRE_HELM_LINT").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "REQUIRE_HELM_LINT=1 but the chart cannot be linted: {why}"
    );
    eprintln!(
        "\n*** SKIPPED: the Helm chart was NOT linted: {why}\n\
         *** install with: pip install --ignore-requires-python helm-sdkpy jsonschema pyyaml\n"
    );
}

/// One rendered case: `[name, value]` pairs of the activescale container.
fn read_env(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let pairs: Vec<(String, String)> = serde_json::from_str(&text).unwrap();
    pairs
}

/// Points the chart's mount paths at real files, since the loader checks
/// that certificate files are readable.
fn with_real_files(env: Vec<(String, String)>, dir: &Path) -> Vec<(String, String)> {
    // The service parses them: one certificate and its key serve for every
    // certificate, CA and key setting.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap()
        .pem();
    let key = key.serialize_pem();
    env.into_iter()
        .map(|(k, v)| match v.strip_prefix("/etc/activescale/") {
            Some(rest) => {
                let file = dir.join(rest);
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                let pem = if k.ends_with("KEY_FILE") || k.ends_with("TLS_KEY") {
                    &key
                } else {
                    &cert
                };
                std::fs::write(&file, pem).unwrap();
                (k, file.to_string_lossy().into_owned())
            }
            None => (k, v),
        })
        .collect()
}

/// Fields whose value in `cfg` equals the default.
fn fields_at_default(cfg: &Config) -> BTreeSet<String> {
    let got = serde_json::to_value(cfg).unwrap();
    let default = serde_json::to_value(Config::default()).unwrap();
    let (got, default) = (got.as_object().unwrap(), default.as_object().unwrap());
    default
        .iter()
        .filter(|(k, v)| got.get(*k) == Some(v))
        .map(|(k, _)| k.clone())
        .collect()
}

#[test]
fn chart_lints_renders_and_its_environment_loads() {
    if let Err(why) = python_ready() {
        skip_or_fail(&why);
        return;
    }
    let out_dir = tempfile::tempdir().unwrap();
    let manifests_dir = tempfile::tempdir().unwrap();
    let out = Command::new("python3")
        .arg(repo().join("scripts/helm-lint.py"))
        .arg("--env-out")
        .arg(out_dir.path())
        .arg("--manifests-out")
        .arg(manifests_dir.path())
        .current_dir(repo())
        .output()
        .expect("run scripts/helm-lint.py");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.code() == Some(3) {
        skip_or_fail(&report);
        return;
    }
    assert!(out.status.success(), "chart checks failed:\n{report}");
    assert!(
        report.contains("refused: memory store with 2 replicas"),
        "{report}"
    );

    let files = tempfile::tempdir().unwrap();
    let mut cases = 0;
    for entry in std::fs::read_dir(out_dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let env = with_real_files(read_env(&path), files.path());
        // With the activator or Custom Metrics rules on, the container reads
        // them with --config from the rendered ConfigMap.
        let case = name.trim_end_matches(".env.json");
        let config_file = config_file(manifests_dir.path(), case, files.path());
        let cfg = Config::load_from(config_file.as_deref(), env, &[])
            .unwrap_or_else(|e| panic!("{name}: the service refuses the chart's environment: {e}"));
        if name == "all-settings-values.env.json" {
            // Every setting reaches the service; the first two are set to
            // their default values (false) in ci/all-settings-values.yaml,
            // and the self-signed certificate's names are not used with a
            // serving certificate Secret (custom-metrics-values sets them).
            let at_default = fields_at_default(&cfg);
            let expected: BTreeSet<String> = [
                "redis_tls_insecure",
                "redis_cluster",
                "custom_metrics_tls_names",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            assert_eq!(
                at_default, expected,
                "{name}: settings that did not reach the service"
            );
            assert_eq!(cfg.servers.scaler_addr.port(), 19090);
            assert_eq!(
                cfg.tls.as_ref().unwrap().client_names,
                [
                    "spiffe://cluster.local/ns/keda/sa/keda-operator",
                    "keda-operator.keda.svc"
                ]
            );
            assert_eq!(cfg.sink.max_message_bytes, 32 << 20);
            assert_eq!(cfg.servers.activator_addr.map(|a| a.port()), Some(18081));
            assert_eq!(cfg.activator.routes.len(), 1);
            assert_eq!(cfg.activator.routes[0].host, "web.example.com");
            assert_eq!(cfg.activator.routes[0].namespace, "shop");
            assert_eq!(
                cfg.servers.custom_metrics_addr.map(|a| a.port()),
                Some(16443)
            );
            assert_eq!(
                cfg.custom_metrics.allowed_names,
                ["front-proxy-client", "aggregator"]
            );
            assert_eq!(cfg.custom_metrics.windows, ["max_30s", "avg_2m"]);
            assert_eq!(cfg.custom_metrics.rules.len(), 1);
            assert_eq!(
                cfg.custom_metrics.rules[0].name,
                "flask_http_request_per_second"
            );
        }
        if name == "custom-metrics-values.env.json" {
            // Self-signed: the certificate names the Service the APIServices
            // point at; the front-proxy CA is required off loopback.
            let svc = format!("test-release-activescale.{RELEASE_NAMESPACE}.svc");
            assert!(
                cfg.custom_metrics.tls_names.contains(&svc),
                "{name}: {:?}",
                cfg.custom_metrics.tls_names
            );
            assert!(cfg.custom_metrics.tls_cert.is_none());
            assert!(cfg.custom_metrics.client_ca.is_some());
            assert_eq!(
                cfg.servers.custom_metrics_addr.map(|a| a.port()),
                Some(6443)
            );
        }
        if name == "defaults.env.json" {
            assert_eq!(cfg.store.kind(), activescale::config::StoreKind::Redis);
            assert!(
                cfg.store.redis().unwrap().url.starts_with("redis://"),
                "{}",
                cfg.store.redis().unwrap().url
            );
        }
        cases += 1;
    }
    assert!(
        cases >= 7,
        "expected the default values and six ci/*.yaml cases, got {cases}"
    );
    custom_metrics_cases(manifests_dir.path());
    default_network_policy(&manifests(manifests_dir.path(), "defaults"));
    let tls = manifests(manifests_dir.path(), "tls-values");
    assert_eq!(
        scaler_peers(&tls),
        [json!({
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda-system"}},
            "podSelector": {},
        })],
        "networkPolicy.kedaNamespace names KEDA's namespace"
    );
    assert!(
        manifests(manifests_dir.path(), "memory-values")
            .iter()
            .all(|d| d["kind"] != "NetworkPolicy"),
        "networkPolicy.enabled=false renders none"
    );
}

/// The config file of one case, written under `dir`, when the container
/// reads one (`--config FILE` from the `-config` ConfigMap: activator routes,
/// Custom Metrics rules).
fn config_file(manifests_dir: &Path, case: &str, dir: &Path) -> Option<PathBuf> {
    let docs = manifests(manifests_dir, case);
    let deploy = docs.iter().find(|d| {
        d["kind"] == "Deployment"
            && d["metadata"]["labels"]["app.kubernetes.io/component"] == "scaler"
    })?;
    let container = deploy["spec"]["template"]["spec"]["containers"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == "activescale")?;
    let args = container["args"].as_array()?;
    assert_eq!(args[0], "--config", "{case}: container args {args:?}");
    let file = args[1].as_str().unwrap();
    let map = docs
        .iter()
        .find(|d| {
            d["kind"] == "ConfigMap"
                && d["metadata"]["name"]
                    .as_str()
                    .unwrap_or("")
                    .ends_with("-config")
        })
        .unwrap_or_else(|| panic!("{case}: --config {file} but no config-file ConfigMap"));
    let key = file.rsplit('/').next().unwrap();
    let path = dir.join(format!("{case}-{key}"));
    std::fs::write(&path, map["data"][key].as_str().unwrap()).unwrap();
    Some(path)
}

/// The rendered objects of one kind.
fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The Custom Metrics API objects: none by default; with it on, both
/// APIServices (v1beta2 preferred) verifying the serving certificate with the
/// given CA or, self-signed, skipping verification; the front-proxy CA from
/// the value (a rendered ConfigMap) or the operator's ConfigMap. (Every case
/// also passed kubernetes-validate in scripts/helm-lint.py.)
fn custom_metrics_cases(dir: &Path) {
    let defaults = manifests(dir, "defaults");
    for kind in [
        "APIService",
        "ClusterRole",
        "ClusterRoleBinding",
        "RoleBinding",
    ] {
        assert!(
            of_kind(&defaults, kind).is_empty(),
            "customMetrics is off by default, yet a {kind} is rendered"
        );
    }

    let insecure = manifests(dir, "custom-metrics-values");
    let services = of_kind(&insecure, "APIService");
    let priority = |docs: &[&Value], version: &str| {
        docs.iter()
            .find(|d| d["spec"]["version"] == version)
            .unwrap_or_else(|| panic!("no APIService for {version}"))["spec"]["versionPriority"]
            .clone()
    };
    assert_eq!(services.len(), 2);
    assert_eq!(priority(&services, "v1beta1"), json!(100));
    assert_eq!(priority(&services, "v1beta2"), json!(200));
    for s in &services {
        assert_eq!(s["spec"]["insecureSkipTLSVerify"], json!(true), "{s}");
        assert!(s["spec"].get("caBundle").is_none(), "{s}");
        assert_eq!(
            s["spec"]["service"],
            json!({"name": "test-release-activescale", "namespace": RELEASE_NAMESPACE, "port": 6443})
        );
    }
    let volume = |docs: &[Value]| {
        of_kind(docs, "Deployment")
            .into_iter()
            .flat_map(|d| d["spec"]["template"]["spec"]["volumes"].as_array().cloned())
            .flatten()
            .find(|v| v["name"] == "custom-metrics-client-ca")
            .expect("a front-proxy CA volume")
    };
    assert_eq!(
        volume(&insecure)["configMap"]["name"],
        "front-proxy-ca",
        "the operator's copy of the front-proxy CA is mounted"
    );
    let reader = of_kind(&insecure, "RoleBinding");
    assert_eq!(reader.len(), 1);
    assert_eq!(reader[0]["metadata"]["namespace"], "kube-system");
    assert_eq!(
        reader[0]["roleRef"]["name"],
        "extension-apiserver-authentication-reader"
    );
    let hpa = of_kind(&insecure, "ClusterRoleBinding")
        .into_iter()
        .find(|b| b["subjects"][0]["name"] == "horizontal-pod-autoscaler")
        .expect("the HPA controller is bound to read custom.metrics.k8s.io");
    assert_eq!(hpa["subjects"][0]["namespace"], "kube-system");

    let verified = manifests(dir, "all-settings-values");
    let ca = std::fs::read_to_string(repo().join("helm/activescale/ci/all-settings-values.yaml"))
        .unwrap();
    let pem_start = ca.find("-----BEGIN CERTIFICATE-----").unwrap();
    let pem_end = ca.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----".len();
    let pem: String = ca[pem_start..pem_end]
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n");
    for s in of_kind(&verified, "APIService") {
        assert!(s["spec"].get("insecureSkipTLSVerify").is_none(), "{s}");
        let bundle = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            s["spec"]["caBundle"].as_str().unwrap(),
        )
        .unwrap();
        assert_eq!(String::from_utf8(bundle).unwrap().trim(), pem);
    }
    let own = of_kind(&verified, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == "test-release-activescale-front-proxy-ca")
        .expect("clientCA.pem is rendered into a ConfigMap");
    assert_eq!(
        volume(&verified)["configMap"]["name"],
        own["metadata"]["name"]
    );
    assert!(
        own["data"]["front-proxy-ca.crt"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
}

/// The rendered manifests of one case.
fn manifests(dir: &Path, case: &str) -> Vec<Value> {
    let path = dir.join(format!("{case}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

const RELEASE_NAMESPACE: &str = "activescale-system";

/// The activescale pods' NetworkPolicy.
fn scaler_policy(docs: &[Value]) -> &Value {
    let policies: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "NetworkPolicy")
        .filter(|d| {
            d["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "scaler"
        })
        .collect();
    assert_eq!(
        policies.len(),
        1,
        "one NetworkPolicy for activescale's pods"
    );
    policies[0]
}

/// The ingress rule of a named port.
fn rule<'a>(policy: &'a Value, port: &str) -> &'a Value {
    let rules: Vec<&Value> = policy["spec"]["ingress"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["ports"][0]["port"] == port)
        .collect();
    assert_eq!(rules.len(), 1, "one rule for {port}: {policy}");
    rules[0]
}

/// Who the scaler port admits.
fn scaler_peers(docs: &[Value]) -> Vec<Value> {
    rule(scaler_policy(docs), "grpc-scaler")["from"]
        .as_array()
        .unwrap()
        .clone()
}

/// With the chart's default values: a NetworkPolicy exists, in the release
/// namespace, and the scaler port admits only pods of namespace `keda`.
fn default_network_policy(docs: &[Value]) {
    for d in docs {
        assert_eq!(
            d["metadata"]["namespace"], RELEASE_NAMESPACE,
            "{} {} has no release namespace",
            d["kind"], d["metadata"]["name"]
        );
    }
    let policy = scaler_policy(docs);
    assert_eq!(
        policy["spec"]["policyTypes"],
        json!(["Ingress"]),
        "egress stays open (DNS, Redis, Prometheus)"
    );
    assert_eq!(
        scaler_peers(docs),
        [json!({
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}},
            "podSelector": {},
        })],
        "only KEDA's namespace reaches the scaler port"
    );
    assert_eq!(
        rule(policy, "grpc-sink")["from"],
        json!([{
            "namespaceSelector": {},
            "podSelector": {"matchLabels": {"security.istio.io/tlsMode": "istio"}},
        }]),
        "meshed pods of any namespace reach the sink"
    );
    assert!(
        rule(policy, "http").get("from").is_none(),
        "the HTTP port is open to all unless narrowed"
    );
    // The bundled Valkey (on by default) admits activescale's pods only.
    let valkey: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "NetworkPolicy" && d != &policy)
        .collect();
    assert_eq!(valkey.len(), 1);
    assert_eq!(
        valkey[0]["spec"]["ingress"][0]["from"],
        json!([{"podSelector": policy["spec"]["podSelector"]}])
    );
}
