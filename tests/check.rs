//! `activescale check`, run as the real binary on real files and stdin.

use std::{
    collections::HashMap,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use activescale::{config::Config, trigger};

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Output {
    fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }
}

/// Runs `activescale check ARGS...`, feeding `stdin` when given.
fn check(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_activescale"))
        .arg("check")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run activescale");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    Output {
        code: out.status.code().expect("exited"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

struct Files(tempfile::TempDir);

impl Files {
    fn new() -> Self {
        Self(tempfile::tempdir().unwrap())
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    }
}

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels:
        app: web
        version: "2"
    spec:
      containers: [{name: web, image: web:2}]
"#;

/// A ScaledObject for Deployment shop/web with one activescale trigger.
fn scaled_object(trigger_type: &str, metadata: &str) -> String {
    format!(
        r#"
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: web
  namespace: shop
spec:
  scaleTargetRef:
    name: web
  minReplicaCount: 0
  triggers:
    - type: {trigger_type}
      metadata:
        scalerAddress: activescale.keda.svc.cluster.local:9090
{metadata}"#
    )
}

const GOOD: &str =
    "        labelSelector: app=web\n        targetValue: \"10\"\n        window: 30s\n";

#[test]
fn valid_file_passes_with_one_ok_line_per_trigger() {
    let files = Files::new();
    let text = format!(
        "{DEPLOYMENT}---\n{}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: x}}\ndata: {{a: b}}\n---\n{}",
        scaled_object("external-push", GOOD),
        scaled_object(
            "external",
            "        workload: web\n        targetValue: \"2.5\"\n"
        )
        .replace("name: web\n  namespace", "name: web-pull\n  namespace"),
    );
    let path = files.write("app.yaml", &text);
    let out = check(&[&path], None);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(
        out.lines(),
        [
            format!("{path} doc 2 ScaledObject shop/web triggers[0] (external-push): ok"),
            format!("{path} doc 4 ScaledObject shop/web-pull triggers[0] (external): ok"),
        ]
    );
    assert!(out.stderr.contains("2 ok, 0 errors"), "{}", out.stderr);
}

#[test]
fn invalid_metadata_fails_with_file_document_and_parser_error() {
    let files = Files::new();
    let good = files.write("good.yaml", &scaled_object("external-push", GOOD));
    let bad_meta = "        labelSelector: app=web\n        targetValue: \"ten\"\n";
    let bad = files.write(
        "bad.yaml",
        &format!("{DEPLOYMENT}---\n{}", scaled_object("external", bad_meta)),
    );
    let out = check(&[&good, &bad], None);
    assert_eq!(out.code, 1, "{}", out.stdout);
    // The exact text the server would send KEDA as INVALID_ARGUMENT.
    let metadata: HashMap<String, String> = [
        ("scalerAddress", "activescale.keda.svc.cluster.local:9090"),
        ("labelSelector", "app=web"),
        ("targetValue", "ten"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let settings = trigger::TriggerSettings {
        max_window: Config::default().engine.max_window,
        allow_cross_namespace: false,
        prometheus: Default::default(),
    };
    let expected = trigger::parse("shop", &metadata, &settings)
        .unwrap_err()
        .to_string();
    assert!(expected.contains("targetValue") && expected.contains("\"ten\""));
    assert_eq!(
        out.lines(),
        [
            format!("{good} doc 1 ScaledObject shop/web triggers[0] (external-push): ok"),
            format!("{bad} doc 2 ScaledObject shop/web triggers[0] (external): error: {expected}"),
        ]
    );
}

#[test]
fn unquoted_numbers_are_errors_as_kubernetes_would_refuse_them() {
    let files = Files::new();
    let path = files.write(
        "n.yaml",
        &scaled_object(
            "external",
            "        labelSelector: app=web\n        targetValue: 10\n",
        ),
    );
    let out = check(&[&path], None);
    assert_eq!(out.code, 1);
    assert!(
        out.stdout
            .contains("error: metadata `targetValue` is the bare YAML value 10")
            && out.stdout.contains("(\"10\")"),
        "{}",
        out.stdout
    );
}

#[test]
fn stdin_is_read_with_a_dash() {
    let out = check(&["-"], Some(&scaled_object("external-push", GOOD)));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.lines(),
        ["<stdin> doc 1 ScaledObject shop/web triggers[0] (external-push): ok"]
    );
    let out = check(
        &["-"],
        Some(&scaled_object(
            "external-push",
            "        targetValue: \"1\"\n",
        )),
    );
    assert_eq!(out.code, 1);
    assert!(
        out.stdout
            .starts_with("<stdin> doc 1 ScaledObject shop/web triggers[0] (external-push): error: trigger metadata `labelSelector` is required"),
        "{}",
        out.stdout
    );
}

#[test]
fn selector_missing_the_targets_pods_is_a_warning_across_files() {
    let files = Files::new();
    let deploy = files.write("deploy.yaml", DEPLOYMENT);
    let wrong = "        labelSelector: app=webapp\n        targetValue: \"10\"\n";
    let so = files.write("so.yaml", &scaled_object("external-push", wrong));
    let out = check(&[&deploy, &so], None);
    assert_eq!(out.code, 0, "a warning is not a failure: {}", out.stdout);
    let prefix = format!("{so} doc 1 ScaledObject shop/web triggers[0] (external-push)");
    assert_eq!(
        out.lines(),
        [
            format!("{prefix}: ok"),
            format!(
                "{prefix}: warning: labelSelector `app=webapp` does not match the pod labels of \
                 Deployment shop/web (app=web,version=2): the trigger would count none of its pods"
            ),
        ]
    );
    // Without the Deployment in the set there is nothing to compare with.
    let out = check(&[&so], None);
    assert_eq!(out.lines(), [format!("{prefix}: ok")]);
}

#[test]
fn non_scaledobject_documents_and_other_scalers_are_not_checked() {
    let files = Files::new();
    let cpu_only = r#"
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {name: cpu}
spec:
  scaleTargetRef: {name: web}
  triggers:
    - type: cpu
      metricType: Utilization
      metadata: {value: "60"}
"#;
    let not_keda = "apiVersion: v1\nkind: Service\nmetadata: {name: activescale}\nspec:\n  ports: [{port: 9090}]\n";
    let path = files.write(
        "misc.yaml",
        &format!("{DEPLOYMENT}---\n{not_keda}---\n{cpu_only}---\n"),
    );
    let out = check(&[&path], None);
    assert_eq!(out.code, 0);
    assert_eq!(out.stdout, "");
    assert!(
        out.stderr.contains("no activescale trigger found"),
        "{}",
        out.stderr
    );

    // An external trigger aimed at another scaler is listed, not validated.
    let other = scaled_object("external", "        anything: goes\n")
        .replace("activescale.keda.svc.cluster.local", "my-scaler.keda");
    let path = files.write("other.yaml", &other);
    let out = check(&[&path], None);
    assert_eq!(out.code, 0);
    assert_eq!(
        out.lines(),
        [format!(
            "{path} doc 1 ScaledObject shop/web triggers[0] (external): skipped: scalerAddress \
             \"my-scaler.keda:9090\" does not match *activescale* (see --scaler-address)"
        )]
    );
    // ... unless the operator says it is activescale under another name.
    let out = check(&["--scaler-address", "my-scaler.*", &path], None);
    assert_eq!(out.code, 1);
    assert!(
        out.stdout
            .contains("error: trigger metadata `anything` is not a known key"),
        "{}",
        out.stdout
    );
}

#[test]
fn unreadable_and_malformed_files_are_clear_errors() {
    let files = Files::new();
    let good = files.write("good.yaml", &scaled_object("external-push", GOOD));
    let missing = files.0.path().join("missing.yaml");
    let missing = missing.to_str().unwrap();
    let broken = files.write(
        "broken.yaml",
        &format!("{DEPLOYMENT}---\nkind: [unclosed\n"),
    );
    let out = check(&[missing, &good, &broken], None);
    assert_eq!(out.code, 1);
    let lines = out.lines();
    assert!(
        lines[0].starts_with(&format!("{missing}: error: cannot read: ")),
        "{lines:?}"
    );
    assert!(lines[0].contains("No such file"), "{lines:?}");
    assert!(
        lines[1].starts_with(&format!("{broken} doc 2: error: not valid YAML: ")),
        "{lines:?}"
    );
    assert_eq!(
        lines[2],
        format!("{good} doc 1 ScaledObject shop/web triggers[0] (external-push): ok"),
        "the readable file is still checked"
    );
}

#[test]
fn the_servers_config_sets_the_limits() {
    let files = Files::new();
    let long = "        labelSelector: app=web\n        targetValue: \"1\"\n        window: 15m\n";
    let so = files.write("so.yaml", &scaled_object("external", long));
    let out = check(&[&so], None);
    assert_eq!(
        out.code, 1,
        "15m is over the default max_window: {}",
        out.stdout
    );
    assert!(out.stdout.contains("max_window"), "{}", out.stdout);
    let config = files.write("config.yaml", "max_window: 20m\n");
    let out = check(&["--config", &config, &so], None);
    assert_eq!(out.code, 0, "{}", out.stdout);
}

/// A prometheus-source trigger goes through the same parser: ok, plus the
/// ratio-preset warning until `metricType: Value` is set.
#[test]
fn prometheus_trigger_is_reported_and_ratio_preset_warned() {
    let meta = "        source: prometheus\n        serverAddress: http://prometheus.monitoring:9090\n        preset: membrane-capacity\n";
    let text = scaled_object("external", meta);
    let out = check(&["-"], Some(&text));
    let prefix = "<stdin> doc 1 ScaledObject shop/web triggers[0] (external)";
    let lines = out.lines();
    assert_eq!(lines[0], format!("{prefix}: ok"), "{lines:?}");
    assert_eq!(out.code, 0);
    assert!(
        lines.contains(&format!(
            "{prefix}: warning: preset `membrane-capacity` is a utilisation ratio: set `metricType: Value` \
             on this trigger (unset, so AverageValue), or the HPA divides the ratio by the replica count \
             and mis-scales"
        ).as_str()),
        "{lines:?}"
    );
    // With `metricType: Value` there is no warning.
    let text = text.replace(
        "    - type: external\n",
        "    - type: external\n      metricType: Value\n",
    );
    let out = check(&["-"], Some(&text));
    assert!(!out.stdout.contains("warning"), "{}", out.stdout);
    assert_eq!(out.lines().len(), 1, "{}", out.stdout);
}

fn yaml_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            found.push(path);
        }
    }
}

#[test]
fn every_example_in_scaledobjects_passes_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scaledobjects");
    let mut found = Vec::new();
    yaml_files(&dir, &mut found);
    found.sort();
    if found.is_empty() {
        println!("no *.yaml under {} yet: nothing to check", dir.display());
        return;
    }
    // All at once, so a ScaledObject's target in another file is compared.
    let args: Vec<&str> = found.iter().map(|p| p.to_str().unwrap()).collect();
    let out = check(&args, None);
    println!("{}{}", out.stdout, out.stderr);
    assert_eq!(
        out.code, 0,
        "every example must pass:\n{}{}",
        out.stdout, out.stderr
    );
    assert!(
        out.lines().iter().any(|l| l.ends_with(": ok")),
        "the examples must contain at least one activescale trigger"
    );
}
