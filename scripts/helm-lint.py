#!/usr/bin/env python3
"""Checks the Helm chart in helm/activescale with Helm's own code.

No `helm` binary is available here; the PyPI package helm-sdkpy embeds Helm's
Go SDK (install: `pip install --ignore-requires-python helm-sdkpy jsonschema
pyyaml kubernetes-validate`). Its Lint runs without a cluster. What this script checks:

1. values.yaml and every ci/*.yaml (merged over it) against values.schema.json.
2. Every `.Values.a.b` path the templates use exists in values.yaml.
3. `config:` in values.yaml has exactly the fields of `struct FileConfig` in
   src/config.rs, minus the ones the chart sets from elsewhere (addresses,
   Redis URL and password, TLS files).
   Also: the Dockerfile's ports, user and entry point match the chart, and
   every address in scaledobjects/ is the chart's (release `activescale` in
   namespace `keda`).
4. Helm lint, with no warnings or errors, on the chart with its default values
   and with each ci/*.yaml merged in (lint takes no values, so each case lints
   a copy of the chart whose values.yaml is replaced).
5. The rendered manifests of each case, validated against Kubernetes'
   schemas (kubernetes-validate, strict, KUBE_VERSIONS), and assertions on them. helm-sdkpy
   has no `template` action, but lint renders every template; a probe
   template added to the copy renders the chart's files with `include` and
   hands the result back through `fail`, whose message Helm logs on stderr.
6. Combinations the chart must refuse (memory store with two replicas, ...)
   make lint fail with the chart's own message.

Helm's lint leaves `.Release.Namespace` empty, so the probe renders with a
copy of the context whose release namespace is RELEASE_NAMESPACE: namespace
fields and namespace selectors are then checked as an install has them. It
is not `keda`, so a rule that confuses the release's namespace with KEDA's
shows.

`--env-out DIR` writes each case's rendered container environment as JSON
for tests/helm.rs, which feeds it to the service's real config loader;
`--manifests-out DIR` each case's rendered manifests.

Exit status: 0 when everything holds, 1 on a failed check, 3 when
helm-sdkpy (or jsonschema / PyYAML) is not installed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

try:
    import helm_sdkpy
    import jsonschema
    import kubernetes_validate
    import yaml
except ImportError as e:  # pragma: no cover - environment problem
    print(f"helm-lint: missing Python package: {e.name}. Install with:\n"
          "  pip install --ignore-requires-python helm-sdkpy jsonschema pyyaml kubernetes-validate",
          file=sys.stderr)
    sys.exit(3)

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "activescale"
CONFIG_RS = ROOT / "src" / "config.rs"
# The namespace renders use (see the docstring); KEDA's stays `keda`.
RELEASE_NAMESPACE = "activescale-system"
# The oldest Kubernetes the chart's APIs are checked against, and the newest
# schemas kubernetes-validate ships (as scripts/render-deploy.py).
KUBE_VERSIONS = ["1.29.0", "1.37.0"]
# Kinds without a namespace. The one object the chart puts elsewhere, the
# RoleBinding to the aggregation layer's reader Role, lives in kube-system.
# API groups of custom resources the chart renders (no Kubernetes schema).
CRD_GROUPS = {"monitoring.coreos.com"}
CLUSTER_SCOPED = {"APIService", "ClusterRole", "ClusterRoleBinding"}

# Config fields the chart sets from `ports`, `redis` and `tls` instead of
# `config:`, each with the variable that carries it.
SET_ELSEWHERE = {
    "sink_addr": "ACTIVESCALE_SINK_ADDR",
    "scaler_addr": "ACTIVESCALE_SCALER_ADDR",
    "http_addr": "ACTIVESCALE_HTTP_ADDR",
    "redis_url": "ACTIVESCALE_REDIS_URL",
    "redis_password": "ACTIVESCALE_REDIS_PASSWORD",
    "redis_ca_file": "ACTIVESCALE_REDIS_CA_FILE",
    "redis_cert_file": "ACTIVESCALE_REDIS_CERT_FILE",
    "redis_key_file": "ACTIVESCALE_REDIS_KEY_FILE",
    "tls_cert": "ACTIVESCALE_TLS_CERT",
    "tls_key": "ACTIVESCALE_TLS_KEY",
    "tls_client_ca": "ACTIVESCALE_TLS_CLIENT_CA",
    "tls_client_names": "ACTIVESCALE_TLS_CLIENT_NAMES",
    "activator_addr": "ACTIVESCALE_ACTIVATOR_ADDR",
    "activator_routes": "--config /etc/activescale/config/config.yaml",
    # From `customMetrics` (custom_metrics_assertions checks each).
    "custom_metrics_addr": "ACTIVESCALE_CUSTOM_METRICS_ADDR (customMetrics.port)",
    "custom_metrics_tls_cert": "ACTIVESCALE_CUSTOM_METRICS_TLS_CERT (customMetrics.tls)",
    "custom_metrics_tls_key": "ACTIVESCALE_CUSTOM_METRICS_TLS_KEY (customMetrics.tls)",
    "custom_metrics_tls_names": "ACTIVESCALE_CUSTOM_METRICS_TLS_NAMES (the Service's DNS names)",
    "custom_metrics_client_ca": "ACTIVESCALE_CUSTOM_METRICS_CLIENT_CA (customMetrics.clientCA)",
    "custom_metrics_allowed_names": "ACTIVESCALE_CUSTOM_METRICS_ALLOWED_NAMES (customMetrics.allowedNames)",
    "custom_metrics_username_headers": "ACTIVESCALE_CUSTOM_METRICS_USERNAME_HEADERS (customMetrics.usernameHeaders)",
    "custom_metrics_group_headers": "ACTIVESCALE_CUSTOM_METRICS_GROUP_HEADERS (customMetrics.groupHeaders)",
    "custom_metrics_extra_headers_prefix": "ACTIVESCALE_CUSTOM_METRICS_EXTRA_HEADERS_PREFIX (customMetrics.extraHeadersPrefix)",
    "custom_metrics_windows": "ACTIVESCALE_CUSTOM_METRICS_WINDOWS (customMetrics.windows)",
    "custom_metrics_rules": "--config /etc/activescale/config/config.yaml (customMetrics.rules)",
}

# Config fields set from `activator.settings` (without the `activator_`
# prefix), each as ACTIVESCALE_ACTIVATOR_<NAME>.
ACTIVATOR_PREFIX = "activator_"

# Helm's lint severities (pkg/lint/support).
SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}

DUMP_BEGIN, DUMP_END = "RENDER-DUMP-BEGIN", "RENDER-DUMP-END"


class CheckFailed(Exception):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)


def deep_merge(base: dict, over: dict) -> dict:
    """Helm's coalescing for plain data: maps merge, anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml(path: Path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


# --- static checks -----------------------------------------------------------

def check_schema(defaults: dict, cases: dict[str, dict]) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    for name, values in {"values.yaml": defaults, **cases}.items():
        errors = sorted(validator.iter_errors(values), key=lambda e: list(e.path))
        check(not errors, f"{name} does not match values.schema.json: "
              + "; ".join(f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors))


VALUES_PATH = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def check_values_paths(defaults: dict) -> None:
    missing = []
    for tpl in sorted((CHART / "templates").iterdir()):
        text = tpl.read_text(encoding="utf-8")
        for m in VALUES_PATH.finditer(text):
            node, walked = defaults, []
            for key in m.group(1).lstrip(".").split("."):
                walked.append(key)
                if not isinstance(node, dict) or key not in node:
                    line = text.count("\n", 0, m.start()) + 1
                    missing.append(f"{tpl.name}:{line}: .Values.{'.'.join(walked)}")
                    break
                node = node[key]
    check(not missing, "templates use values that values.yaml does not define: " + ", ".join(missing))


def config_fields() -> list[str]:
    src = CONFIG_RS.read_text(encoding="utf-8")
    body = re.search(r"\nstruct FileConfig \{(.*?)\n\}", src, re.S)
    check(body is not None, f"no `struct FileConfig` (the flat form of the settings) in {CONFIG_RS}")
    return re.findall(r"^\s*pub (\w+):", body.group(1), re.M)


def check_config_coverage(defaults: dict) -> list[str]:
    fields = config_fields()
    check(len(fields) > 10, f"found only {fields} in struct FileConfig; did its layout change?")
    in_values = set(defaults["config"])
    activator = {f for f in fields if f.startswith(ACTIVATOR_PREFIX)} - set(SET_ELSEWHERE)
    in_activator = {ACTIVATOR_PREFIX + k for k in defaults["activator"]["settings"]}
    check(in_activator == activator,
          "values.yaml `activator.settings:` and struct FileConfig differ: "
          f"missing {sorted(activator - in_activator)}, unknown {sorted(in_activator - activator)}")
    check(all(v is None for v in defaults["activator"]["settings"].values()),
          "activator.settings default to null (the built-in default)")
    expected = set(fields) - set(SET_ELSEWHERE) - activator
    check(in_values == expected,
          "values.yaml `config:` and struct FileConfig differ: "
          f"missing from values {sorted(expected - in_values)}, unknown to the service {sorted(in_values - expected)}")
    stale = set(SET_ELSEWHERE) - set(fields)
    check(not stale, f"SET_ELSEWHERE names fields struct FileConfig no longer has: {sorted(stale)}")
    return fields


def check_dockerfile(defaults: dict) -> None:
    """The image and the chart agree on ports, user and entry point."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    exposed = set(re.findall(r"^EXPOSE\s+(.+)$", text, re.M)[-1].split())
    ports = {str(p) for p in defaults["ports"].values()}
    ports |= {str(defaults["activator"]["port"]), str(defaults["customMetrics"]["port"])}
    check(exposed == ports, f"Dockerfile EXPOSE {sorted(exposed)} but the chart uses ports {sorted(ports)}")
    user = re.findall(r"^USER\s+(\d+)", text, re.M)
    check(user and int(user[-1]) == defaults["podSecurityContext"]["runAsUser"],
          f"Dockerfile USER {user} differs from podSecurityContext.runAsUser")
    check('ENTRYPOINT ["/activescale", "serve"]' in text, "Dockerfile ENTRYPOINT must be /activescale serve")


def check_example_addresses(defaults: dict) -> None:
    """Every example dials the addresses the chart gives a release named
    `activescale` in namespace `keda`: the headless scaler Service and the sink."""
    scaler = f"activescale-scaler.keda.svc.cluster.local:{defaults['ports']['scaler']}"
    sink = f"activescale.keda.svc.cluster.local:{defaults['ports']['sink']}"
    wrong, seen = [], 0
    for path in sorted((ROOT / "scaledobjects").rglob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"(scalerAddress|address):\s*(\S+)", text):
            seen += 1
            want = scaler if m.group(1) == "scalerAddress" else sink
            if m.group(2) != want:
                wrong.append(f"{path.relative_to(ROOT)}: {m.group(1)} {m.group(2)} (want {want})")
    check(seen > 0, "no addresses found in scaledobjects/")
    check(not wrong, "; ".join(wrong))


# --- Helm lint ---------------------------------------------------------------

class Lint:
    """Runs Helm's lint on copies of the chart with other values."""

    def __init__(self) -> None:
        self.config = helm_sdkpy.Configuration(namespace=RELEASE_NAMESPACE)
        self.templates = sorted(p.name for p in (CHART / "templates").iterdir()
                                if p.suffix == ".yaml")

    def run(self, values: dict, dump: bool, templates: list[str] | None = None) -> tuple[list[dict], str]:
        """Lints a copy of the chart with `values`; returns the lint messages
        and what Helm logged on stderr. With `dump`, the rendered
        `templates` (default: every manifest) are in a `fail` message."""
        with tempfile.TemporaryDirectory(prefix="helm-lint-") as tmp:
            chart = Path(tmp) / "activescale"
            shutil.copytree(CHART, chart, ignore=shutil.ignore_patterns("ci"))
            (chart / "values.yaml").write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
            if dump:
                (chart / "templates" / "zz-render-dump.yaml").write_text(
                    self._dump_template(templates or self.templates), encoding="utf-8")
            result, stderr = self._lint_capturing_stderr(str(chart))
        return result.get("Messages") or [], stderr

    @staticmethod
    def _dump_template(templates: list[str]) -> str:
        # `merge` keeps what its first map has: the namespace set here, the
        # rest of .Release and of the context copied in.
        context = (f'{{{{- $release := merge (dict "Namespace" "{RELEASE_NAMESPACE}") .Release }}}}\n'
                   '{{- $ctx := merge (dict "Release" $release) . }}\n')
        parts = " ".join(f'(include (print $.Template.BasePath "/{t}") $ctx)' for t in templates)
        return (context + "{{- $docs := list " + parts + " }}\n"
                f'{{{{- fail (printf "{DUMP_BEGIN}%s{DUMP_END}" (join "\\n---\\n" $docs)) }}}}\n')

    def _lint_capturing_stderr(self, chart: str) -> tuple[dict, str]:
        # Helm logs a template's `fail` message through Go's log package on
        # file descriptor 2, and the lint result carries errors as empty
        # objects: the fd is the only place the text appears.
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as log:
            os.dup2(log.fileno(), 2)
            try:
                result = asyncio.run(helm_sdkpy.Lint(self.config).run(chart))
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            log.seek(0)
            return result, log.read().decode("utf-8", "replace")


def go_unquote(s: str) -> str:
    """Decodes a Go strconv.Quote body (without the quotes)."""
    out, i = [], 0
    simple = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "a": "\a", "b": "\b", "f": "\f", "v": "\v", "'": "'"}
    while i < len(s):
        c = s[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = s[i + 1]
        if e in simple:
            out.append(simple[e])
            i += 2
        elif e == "x":
            out.append(chr(int(s[i + 2:i + 4], 16)))
            i += 4
        elif e == "u":
            out.append(chr(int(s[i + 2:i + 6], 16)))
            i += 6
        elif e == "U":
            out.append(chr(int(s[i + 2:i + 10], 16)))
            i += 10
        else:
            raise CheckFailed(f"cannot decode Go escape \\{e} in Helm's log")
    return "".join(out)


FAIL_LINE = re.compile(r'funcMap fail message="((?:[^"\\]|\\.)*)"')


def fail_messages(stderr: str) -> list[str]:
    return [go_unquote(m.group(1)) for m in FAIL_LINE.finditer(stderr)]


def problems(messages: list[dict]) -> list[str]:
    return [f"{SEVERITY.get(m.get('Severity'), m.get('Severity'))} {m.get('Path')}"
            for m in messages if m.get("Severity", 0) >= 2]


def render(lint: Lint, name: str, values: dict) -> list[dict]:
    """Lints `values` (no warnings or errors allowed), then renders them."""
    messages, stderr = lint.run(values, dump=False)
    check(not problems(messages),
          f"{name}: helm lint reports {problems(messages)}; Helm said: {stderr.strip() or '(nothing)'}")
    messages, stderr = lint.run(values, dump=True)
    fails = fail_messages(stderr)
    # Helm lints in "lint mode", where `fail` and `required` only log: a
    # refusal shows up here, not among the lint messages.
    refusals = [m for m in fails if not m.startswith(DUMP_BEGIN)]
    check(not refusals, f"{name}: the chart refuses these values: {refusals}")
    check("Missing required value" not in stderr, f"{name}: {stderr.strip()}")
    dumps = [m for m in fails if m.startswith(DUMP_BEGIN)]
    check(len(dumps) == 1, f"{name}: rendering produced no manifests; Helm said: {stderr.strip()}")
    text = dumps[0][len(DUMP_BEGIN):-len(DUMP_END)]
    docs = [d for d in yaml.safe_load_all(text) if d]
    check(all("kind" in d and "apiVersion" in d for d in docs), f"{name}: a rendered document lacks kind/apiVersion")
    return docs


def expect_refusal(lint: Lint, name: str, values: dict, message: str) -> None:
    """`message`: the chart's own `fail` text (logged, since lint mode turns
    `fail` into a log line; `helm install` would stop on it). Empty: the
    schema must refuse the values, which lint reports as an error."""
    messages, stderr = lint.run(values, dump=False)
    if message:
        got = fail_messages(stderr)
        check(any(message in m for m in got), f"{name}: expected the chart to fail with {message!r}, Helm said {got or stderr!r}")
    else:
        errors = [m for m in messages if m.get("Severity") == 3]
        check(errors, f"{name}: helm lint accepted values the schema must refuse")


# --- assertions on rendered manifests -----------------------------------------

def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    check(len(found) == 1, f"expected one {kind} {name}, found {len(found)} (have: "
          + ", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in docs) + ")")
    return found[0]


def container_env(deploy: dict) -> dict[str, dict]:
    (container,) = [c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "activescale"]
    env = container.get("env") or []
    names = [e["name"] for e in env]
    check(len(names) == len(set(names)), f"duplicate environment variables: {names}")
    return {e["name"]: e for e in env}


def validate_kubernetes(name: str, docs: list[dict]) -> None:
    """Every rendered object against Kubernetes' own schemas, strictly
    (an unknown field is an error). CRD objects (the ServiceMonitor) have no
    schema there and are skipped."""
    for d in docs:
        if d["apiVersion"].split("/")[0] in CRD_GROUPS:
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                raise CheckFailed(f"{name}: {d['kind']}/{d['metadata']['name']} fails the Kubernetes {version} "
                                  f"schema at {'/'.join(map(str, e.path))}: {e.message}") from None


def common_assertions(name: str, docs: list[dict], values: dict) -> dict:
    # The dashboard ConfigMap may go where Grafana's sidecar looks
    # (dashboards.namespace); everything else lives in the release namespace.
    dashboard_ns = (values.get("dashboards") or {}).get("namespace") or RELEASE_NAMESPACE
    def expected_ns(d: dict) -> str:
        is_dashboard = d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")
        if d["kind"] in CLUSTER_SCOPED:
            return None
        if d["kind"] == "RoleBinding":
            return "kube-system"
        return dashboard_ns if is_dashboard else RELEASE_NAMESPACE
    wrong_ns = [f"{d['kind']}/{d['metadata']['name']}: {d['metadata'].get('namespace')!r}"
                for d in docs if d["metadata"].get("namespace") != expected_ns(d)]
    check(not wrong_ns, f"{name}: manifests not in the release namespace {RELEASE_NAMESPACE}: {wrong_ns}")
    deploy = one(docs, "Deployment", fullname(docs))
    spec = deploy["spec"]["template"]["spec"]
    check(deploy["spec"]["replicas"] == values["replicaCount"], f"{name}: replicas")
    check(spec["enableServiceLinks"] is False, f"{name}: enableServiceLinks must be false")
    check(spec["automountServiceAccountToken"] is False, f"{name}: the service needs no API token")
    pod_sc = spec["securityContext"]
    check(pod_sc.get("runAsNonRoot") is True and pod_sc["seccompProfile"]["type"] == "RuntimeDefault",
          f"{name}: pod securityContext")
    (c,) = [c for c in spec["containers"] if c["name"] == "activescale"]
    sc = c["securityContext"]
    check(sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
          and sc["capabilities"]["drop"] == ["ALL"] and sc["runAsNonRoot"] is True,
          f"{name}: container securityContext {sc}")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    want_ports = {"grpc-sink": values["ports"]["sink"], "grpc-scaler": values["ports"]["scaler"],
                  "http": values["ports"]["http"]}
    if values["activator"]["enabled"]:
        want_ports["activator"] = values["activator"]["port"]
    if values["customMetrics"]["enabled"]:
        want_ports["custom-metrics"] = values["customMetrics"]["port"]
    check(ports == want_ports, f"{name}: container ports {ports}")
    check(c["livenessProbe"].get("httpGet", {}).get("path") == "/healthz",
          f"{name}: liveness must be HTTP /healthz (the gRPC health follows the store)")
    readiness = c["readinessProbe"]
    if values["tls"]["enabled"] or not values["probes"]["grpcReadiness"]:
        check(readiness.get("httpGet", {}).get("path") == "/readyz", f"{name}: readiness must be /readyz with TLS")
    else:
        check(readiness.get("grpc", {}).get("port") == values["ports"]["scaler"], f"{name}: readiness must be native gRPC")
    annotations = deploy["spec"]["template"]["metadata"].get("annotations") or {}
    if values["istio"]["excludeSinkPortFromSidecar"]:
        check(annotations.get("traffic.sidecar.istio.io/excludeInboundPorts") == str(values["ports"]["sink"]),
              f"{name}: the sink port must be excluded from the pod's own sidecar: {annotations}")
    env = container_env(deploy)
    for var in ["ACTIVESCALE_SINK_ADDR", "ACTIVESCALE_SCALER_ADDR", "ACTIVESCALE_HTTP_ADDR", "ACTIVESCALE_STORE"]:
        check(var in env, f"{name}: {var} not set")
    check(env["ACTIVESCALE_SCALER_ADDR"]["value"].endswith(f":{values['ports']['scaler']}"), f"{name}: scaler address")
    for key, value in values["config"].items():
        var = f"ACTIVESCALE_{key.upper()}"
        check((var in env) == (value is not None), f"{name}: {var} set={var in env} but config.{key}={value!r}")

    # Services: named ports with appProtocol grpc, and a headless scaler Service.
    svc = one(docs, "Service", fullname(docs))
    by_name = {p["name"]: p for p in svc["spec"]["ports"]}
    # The activator has a Service of its own (activator_assertions).
    want_svc = {"grpc-sink", "grpc-scaler", "http"} | ({"custom-metrics"} if values["customMetrics"]["enabled"] else set())
    check(set(by_name) == want_svc, f"{name}: Service ports {list(by_name)}")
    if values["customMetrics"]["enabled"]:
        check(by_name["custom-metrics"]["port"] == values["customMetrics"]["port"]
              and by_name["custom-metrics"]["targetPort"] == "custom-metrics",
              f"{name}: custom-metrics Service port {by_name['custom-metrics']}")
    activator_assertions(name, docs, values, deploy, env)
    custom_metrics_assertions(name, docs, values, deploy, env)
    check(by_name["grpc-sink"]["appProtocol"] == "grpc" and by_name["grpc-scaler"]["appProtocol"] == "grpc",
          f"{name}: gRPC ports need appProtocol grpc")
    if values["headlessService"]["enabled"]:
        headless = one(docs, "Service", fullname(docs) + "-scaler")
        check(headless["spec"]["clusterIP"] == "None", f"{name}: the scaler Service must be headless")
        check([p["port"] for p in headless["spec"]["ports"]] == [values["ports"]["scaler"]], f"{name}: headless ports")
    selector = deploy["spec"]["selector"]["matchLabels"]
    for s in find(docs, "Service"):
        if s["metadata"]["name"].startswith(fullname(docs) + "-redis"):
            continue
        check(s["spec"]["selector"] == selector, f"{name}: Service {s['metadata']['name']} selects other pods")
    for tsc in spec.get("topologySpreadConstraints", []):
        check(tsc["labelSelector"]["matchLabels"] == selector, f"{name}: topology spread selector")
    if values["podDisruptionBudget"]["enabled"]:
        pdb = one(docs, "PodDisruptionBudget", fullname(docs))
        check(pdb["spec"]["selector"]["matchLabels"] == selector, f"{name}: PDB selector")
    bundled = values["config"]["store"] == "redis" and values["redis"]["bundled"]["enabled"]
    check(bool(find(docs, "Deployment", fullname(docs) + "-redis")) == bundled, f"{name}: bundled Valkey rendered={not bundled}")
    if values["config"]["store"] == "redis":
        want = values["redis"]["url"] or f"redis://{fullname(docs)}-redis:6379"
        check(env.get("ACTIVESCALE_REDIS_URL", {}).get("value") == want, f"{name}: ACTIVESCALE_REDIS_URL")
    return env


def activator_assertions(name: str, docs: list[dict], values: dict, deploy: dict, env: dict) -> None:
    """The activator: address, tuning and routes reach the service only when
    enabled; the routes through the ConfigMap the container reads with --config."""
    av = values["activator"]
    (c,) = [c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "activescale"]
    maps = find(docs, "ConfigMap", fullname(docs) + "-config")
    services = find(docs, "Service", fullname(docs) + "-activator")
    activator_env = {k for k in env if k.startswith("ACTIVESCALE_ACTIVATOR_")}
    file = yaml.safe_load(maps[0]["data"]["config.yaml"]) if maps else {}
    check(bool(maps) == ("args" in c), f"{name}: {len(maps)} config-file ConfigMap(s) but args {c.get('args')}")
    if not av["enabled"]:
        check(not activator_env and not services and "activator_routes" not in file,
              f"{name}: activator disabled but rendered: {sorted(activator_env)}, {len(services)} Service(s), file {file}")
        return
    check(len(services) == 1, f"{name}: no Service {fullname(docs)}-activator")
    (port,) = services[0]["spec"]["ports"]
    check(port["name"] == "activator" and port["port"] == av["port"] and port["targetPort"] == "activator",
          f"{name}: activator Service port {port}")
    check(env["ACTIVESCALE_ACTIVATOR_ADDR"]["value"] == f"{values['listenHost']}:{av['port']}", f"{name}: activator address")
    for key, value in av["settings"].items():
        var = f"ACTIVESCALE_ACTIVATOR_{key.upper()}"
        check((var in env) == (value is not None), f"{name}: {var} set={var in env} but activator.settings.{key}={value!r}")
        if value is not None:
            check(env[var]["value"] == str(value), f"{name}: {var}={env[var]['value']!r}, want {value!r}")
    check(len(maps) == 1, f"{name}: no config-file ConfigMap")
    check(file.get("activator_routes") == av["routes"], f"{name}: the config file {file} differs from activator.routes")
    config_file_assertions(name, deploy, maps[0])


def config_file_assertions(name: str, deploy: dict, cm: dict) -> None:
    """The container reads the config-file ConfigMap with --config."""
    (c,) = [c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "activescale"]
    check(c.get("args") == ["--config", "/etc/activescale/config/config.yaml"], f"{name}: args {c.get('args')}")
    mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"].get("volumes", [])}
    check(mounts.get("config-file", {}).get("mountPath") == "/etc/activescale/config"
          and "subPath" not in mounts["config-file"], f"{name}: config file mount")
    check(volumes["config-file"]["configMap"]["name"] == cm["metadata"]["name"], f"{name}: config file volume")
    annotations = deploy["spec"]["template"]["metadata"].get("annotations") or {}
    check("checksum/config-file" in annotations, f"{name}: a config file change must roll the pods: {annotations}")


def custom_metrics_assertions(name: str, docs: list[dict], values: dict, deploy: dict, env: dict) -> None:
    """The Custom Metrics API: port, settings, the two APIServices (v1beta2
    preferred; caBundle or insecureSkipTLSVerify), the aggregation RBAC, the
    front-proxy CA mounted from where the values say."""
    cm = values["customMetrics"]
    rbac = [d for d in docs if d["kind"] in {"APIService", "ClusterRole", "ClusterRoleBinding", "RoleBinding"}]
    cm_env = {k for k in env if k.startswith("ACTIVESCALE_CUSTOM_METRICS_")}
    if not cm["enabled"]:
        check(not rbac and not cm_env and not find(docs, "ConfigMap", fullname(docs) + "-front-proxy-ca"),
              f"{name}: customMetrics disabled but rendered: {sorted(cm_env)}, "
              + ", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in rbac))
        return
    full, spec = fullname(docs), deploy["spec"]["template"]["spec"]
    check(env["ACTIVESCALE_CUSTOM_METRICS_ADDR"]["value"] == f"{values['listenHost']}:{cm['port']}", f"{name}: custom metrics address")
    for key, var in [("allowedNames", "ALLOWED_NAMES"), ("usernameHeaders", "USERNAME_HEADERS"),
                     ("groupHeaders", "GROUP_HEADERS"), ("extraHeadersPrefix", "EXTRA_HEADERS_PREFIX"), ("windows", "WINDOWS")]:
        got = env.get(f"ACTIVESCALE_CUSTOM_METRICS_{var}", {}).get("value")
        check(got == (",".join(cm[key]) if cm[key] else None),
              f"{name}: ACTIVESCALE_CUSTOM_METRICS_{var}={got!r} for customMetrics.{key}={cm[key]!r}")
    maps = find(docs, "ConfigMap", full + "-config")
    file = yaml.safe_load(maps[0]["data"]["config.yaml"]) if maps else {}
    check(file.get("custom_metrics_rules", []) == cm["rules"], f"{name}: the config file's rules {file} differ from customMetrics.rules")
    if cm["rules"]:
        config_file_assertions(name, deploy, maps[0])
    (c,) = [c for c in spec["containers"] if c["name"] == "activescale"]
    mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}

    # Serving certificate: the Secret's files, or self-signed for the Service's names.
    if cm["tls"]["existingSecret"]:
        check(volumes["custom-metrics-tls"]["secret"]["secretName"] == cm["tls"]["existingSecret"], f"{name}: serving cert volume")
        check("subPath" not in mounts["custom-metrics-tls"], f"{name}: a subPath mount would never see rotated certificates")
        base = mounts["custom-metrics-tls"]["mountPath"]
        check(env["ACTIVESCALE_CUSTOM_METRICS_TLS_CERT"]["value"] == f"{base}/{cm['tls']['certKey']}"
              and env["ACTIVESCALE_CUSTOM_METRICS_TLS_KEY"]["value"] == f"{base}/{cm['tls']['keyKey']}", f"{name}: serving cert paths")
        check("ACTIVESCALE_CUSTOM_METRICS_TLS_NAMES" not in env, f"{name}: self-signed names with a serving Secret")
    else:
        check("ACTIVESCALE_CUSTOM_METRICS_TLS_CERT" not in env and "custom-metrics-tls" not in volumes,
              f"{name}: serving cert without a Secret")
        names = env["ACTIVESCALE_CUSTOM_METRICS_TLS_NAMES"]["value"].split(",")
        check(f"{full}.{RELEASE_NAMESPACE}.svc" in names, f"{name}: the self-signed certificate must name the Service: {names}")

    # Front-proxy CA: exactly the source the values name, mounted as a directory.
    ca = cm["clientCA"]
    check(env["ACTIVESCALE_CUSTOM_METRICS_CLIENT_CA"]["value"] == f"{mounts['custom-metrics-client-ca']['mountPath']}/{ca['key']}"
          and "subPath" not in mounts["custom-metrics-client-ca"], f"{name}: front-proxy CA path")
    vol = volumes["custom-metrics-client-ca"]
    own = find(docs, "ConfigMap", full + "-front-proxy-ca")
    if ca["existingSecret"]:
        check(vol.get("secret", {}).get("secretName") == ca["existingSecret"] and not own, f"{name}: front-proxy CA Secret volume {vol}")
    elif ca["existingConfigMap"]:
        check(vol.get("configMap", {}).get("name") == ca["existingConfigMap"] and not own,
              f"{name}: front-proxy CA ConfigMap volume {vol}")
    else:
        check(len(own) == 1 and own[0]["data"][ca["key"]].strip() == ca["pem"].strip()
              and vol.get("configMap", {}).get("name") == own[0]["metadata"]["name"], f"{name}: front-proxy CA from clientCA.pem")

    # APIServices: both versions, to this release's Service port.
    svcs = {d["metadata"]["name"]: d for d in find(docs, "APIService")}
    check(set(svcs) == {"v1beta1.custom.metrics.k8s.io", "v1beta2.custom.metrics.k8s.io"}, f"{name}: APIServices {list(svcs)}")
    prio = cm["apiService"]
    for version, want in [("v1beta1", prio["v1beta1VersionPriority"]), ("v1beta2", prio["v1beta2VersionPriority"])]:
        s = svcs[f"{version}.custom.metrics.k8s.io"]["spec"]
        check(s["group"] == "custom.metrics.k8s.io" and s["version"] == version and s["versionPriority"] == want
              and s["groupPriorityMinimum"] == prio["groupPriorityMinimum"], f"{name}: APIService {version} {s}")
        check(s["service"] == {"name": full, "namespace": RELEASE_NAMESPACE, "port": cm["port"]},
              f"{name}: APIService {version} service {s['service']}")
        if cm["caBundle"]:
            check(base64.b64decode(s["caBundle"]).decode().strip() == cm["caBundle"].strip() and "insecureSkipTLSVerify" not in s,
                  f"{name}: APIService {version} caBundle")
        else:
            check(s.get("insecureSkipTLSVerify") is True and "caBundle" not in s,
                  f"{name}: APIService {version} must skip verification without a caBundle")

    # The RBAC the aggregation layer expects.
    sa = {"kind": "ServiceAccount", "name": spec["serviceAccountName"], "namespace": RELEASE_NAMESPACE}
    def bound(kind: str, role_kind: str, role: str, subject: dict) -> dict:
        got = [d for d in find(docs, kind) if d["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role}]
        check(len(got) == 1 and got[0]["subjects"] == [subject], f"{name}: {kind} to {role_kind} {role} for {subject}: {got}")
        return got[0]
    bound("ClusterRoleBinding", "ClusterRole", "system:auth-delegator", sa)
    reader = bound("RoleBinding", "Role", "extension-apiserver-authentication-reader", sa)
    check(reader["metadata"]["namespace"] == "kube-system", f"{name}: the auth reader RoleBinding belongs in kube-system")
    role = one(docs, "ClusterRole", full + "-custom-metrics-reader")
    check(role["rules"] == [{"apiGroups": ["custom.metrics.k8s.io"], "resources": ["*"], "verbs": ["get", "list", "watch"]}],
          f"{name}: custom metrics reader rules {role['rules']}")
    hpa = cm["hpaServiceAccount"]
    bound("ClusterRoleBinding", "ClusterRole", role["metadata"]["name"],
          {"kind": "ServiceAccount", "name": hpa["name"], "namespace": hpa["namespace"]})


def fullname(docs: list[dict]) -> str:
    (sa,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["labels"].get("app.kubernetes.io/component") == "scaler"]
    return sa["metadata"]["name"]


def case_assertions(name: str, docs: list[dict], values: dict, env: dict) -> None:
    """What each ci/*.yaml switches on."""
    deploy = one(docs, "Deployment", fullname(docs))
    spec = deploy["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    (c,) = [c for c in spec["containers"] if c["name"] == "activescale"]
    mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
    if values["tls"]["enabled"]:
        check(volumes["tls"]["secret"]["secretName"] == values["tls"]["existingSecret"], f"{name}: TLS secret volume")
        check("subPath" not in mounts["tls"], f"{name}: a subPath mount would never see rotated certificates")
        check(env["ACTIVESCALE_TLS_CERT"]["value"].startswith(mounts["tls"]["mountPath"] + "/"), f"{name}: TLS cert path")
        check(env["ACTIVESCALE_TLS_KEY"]["value"].startswith(mounts["tls"]["mountPath"] + "/"), f"{name}: TLS key path")
        if values["tls"]["clientAuth"]["enabled"]:
            check("ACTIVESCALE_TLS_CLIENT_CA" in env, f"{name}: client CA")
            ca_dir = env["ACTIVESCALE_TLS_CLIENT_CA"]["value"].rsplit("/", 1)[0]
            check(ca_dir in {m["mountPath"] for m in mounts.values()}, f"{name}: the client CA file is not in a mounted volume")
    else:
        check("ACTIVESCALE_TLS_CERT" not in env and "tls" not in volumes, f"{name}: TLS off but configured")
    if values["config"]["store"] == "redis" and values["redis"]["existingSecret"]:
        ref = env["ACTIVESCALE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        check(ref == {"name": values["redis"]["existingSecret"], "key": values["redis"]["passwordKey"]},
              f"{name}: Redis password secret reference {ref}")
    if values["config"]["store"] == "redis" and values["redis"]["tls"]["existingSecret"]:
        check(volumes["redis-tls"]["secret"]["secretName"] == values["redis"]["tls"]["existingSecret"], f"{name}: Redis TLS volume")
        for key, var in [("caKey", "ACTIVESCALE_REDIS_CA_FILE"), ("certKey", "ACTIVESCALE_REDIS_CERT_FILE"),
                         ("keyKey", "ACTIVESCALE_REDIS_KEY_FILE")]:
            if values["redis"]["tls"][key]:
                check(env[var]["value"] == f"{mounts['redis-tls']['mountPath']}/{values['redis']['tls'][key]}", f"{name}: {var}")
    names = values["tls"]["clientAuth"]["names"]
    if values["tls"]["enabled"] and values["tls"]["clientAuth"]["enabled"] and names:
        check(env.get("ACTIVESCALE_TLS_CLIENT_NAMES", {}).get("value") == ",".join(names),
              f"{name}: tls.clientAuth.names must reach tls_client_names: {env.get('ACTIVESCALE_TLS_CLIENT_NAMES')}")
    else:
        check("ACTIVESCALE_TLS_CLIENT_NAMES" not in env, f"{name}: client names set without names or mTLS")
    network_policy_assertions(name, docs, values, deploy)
    check(bool(find(docs, "ServiceMonitor")) == values["serviceMonitor"]["enabled"], f"{name}: ServiceMonitor")
    check_dashboard(name, docs, values)


def check_dashboard(name: str, docs: list[dict], values: dict) -> None:
    """The dashboard ConfigMap carries dashboards/activescale.json unchanged,
    with the label Grafana's sidecar selects on."""
    maps = [d for d in find(docs, "ConfigMap") if "grafana_dashboard" in d["metadata"].get("labels", {})]
    if not values["dashboards"]["enabled"]:
        check(not maps, f"{name}: dashboard ConfigMap rendered while disabled")
        return
    check(len(maps) == 1, f"{name}: {len(maps)} dashboard ConfigMaps")
    (cm,) = maps
    meta = cm["metadata"]
    check(meta["labels"]["grafana_dashboard"] == "1", f"{name}: grafana_dashboard label {meta['labels']}")
    for k, v in values["dashboards"]["labels"].items():
        check(meta["labels"].get(k) == v, f"{name}: dashboard label {k}")
    check((meta.get("annotations") or {}) == values["dashboards"]["annotations"], f"{name}: dashboard annotations")
    if values["dashboards"]["namespace"]:
        check(meta.get("namespace") == values["dashboards"]["namespace"], f"{name}: dashboard namespace")
    shipped = json.loads((CHART / "dashboards" / "activescale.json").read_text(encoding="utf-8"))
    check(json.loads(cm["data"]["activescale.json"]) == shipped, f"{name}: the ConfigMap's dashboard differs from dashboards/activescale.json")
    check(shipped.get("uid") and shipped.get("panels"), f"{name}: the dashboard has no uid or panels")


def network_policy_assertions(name: str, docs: list[dict], values: dict, deploy: dict) -> None:
    """Who may reach which port: KEDA the scaler, meshed pods the sink, the
    configured peers (anyone by default) the HTTP port, activescale Valkey."""
    policies = find(docs, "NetworkPolicy")
    npv = values["networkPolicy"]
    if not npv["enabled"]:
        check(not policies, f"{name}: NetworkPolicy rendered while disabled")
        return
    np = one(docs, "NetworkPolicy", fullname(docs))
    check(np["spec"]["podSelector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"], f"{name}: policy selector")
    # Ingress only: DNS, Redis and Prometheus egress must keep working.
    check(np["spec"]["policyTypes"] == ["Ingress"] and "egress" not in np["spec"],
          f"{name}: the policy must not restrict egress: {np['spec'].get('policyTypes')}")
    rules = {r["ports"][0]["port"]: r for r in np["spec"]["ingress"]}
    want_rules = ({"grpc-scaler", "grpc-sink", "http"} | ({"activator"} if values["activator"]["enabled"] else set())
                  | ({"custom-metrics"} if values["customMetrics"]["enabled"] else set()))
    check(len(rules) == len(np["spec"]["ingress"]) == len(want_rules) and set(rules) == want_rules,
          f"{name}: policy ports {list(rules)}")
    check(all(len(r["ports"]) == 1 and r["ports"][0]["protocol"] == "TCP" for r in rules.values()),
          f"{name}: one TCP port per rule")

    # The scaler: a single peer, KEDA's namespace (never "any namespace",
    # and never the release's own namespace by accident).
    scaler = rules["grpc-scaler"]["from"]
    check(len(scaler) == 1, f"{name}: the scaler port admits one peer rule: {scaler}")
    want_ns = npv["scaler"]["namespaceSelector"]
    if not isinstance(want_ns, dict):
        want_ns = {"matchLabels": {"kubernetes.io/metadata.name": npv["kedaNamespace"]}}
    check(scaler[0].get("namespaceSelector") == want_ns and scaler[0].get("podSelector") == npv["scaler"]["podSelector"],
          f"{name}: only KEDA may reach the scaler port: {scaler[0]}, want namespaceSelector {want_ns}")
    check(scaler[0]["namespaceSelector"] != {}, f"{name}: the scaler port must not admit every namespace")
    if npv["scaler"]["namespaceSelector"] is None:
        labels = scaler[0]["namespaceSelector"]["matchLabels"]
        check(labels == {"kubernetes.io/metadata.name": npv["kedaNamespace"]} and labels["kubernetes.io/metadata.name"],
              f"{name}: KEDA's namespace must come from networkPolicy.kedaNamespace: {labels}")

    # The sink: meshed pods, by their pod label, in the configured namespaces.
    sink = rules["grpc-sink"]["from"]
    check(len(sink) == 1 and sink[0].get("podSelector") == npv["sink"]["podSelector"]
          and sink[0].get("namespaceSelector") == npv["sink"]["namespaceSelector"],
          f"{name}: only meshed pods may reach the sink port: {sink}")
    check(sink[0]["podSelector"] != {}, f"{name}: the sink's pod selector must name meshed pods")

    # HTTP: anyone unless narrowed.
    http = rules["http"]
    if npv["http"]["from"]:
        check(http.get("from") == npv["http"]["from"], f"{name}: HTTP peers {http.get('from')}")
    else:
        check("from" not in http, f"{name}: the HTTP port is open to all by default: {http}")

    # Activator: anyone unless narrowed.
    if values["activator"]["enabled"]:
        act = rules["activator"]
        if npv["activator"]["from"]:
            check(act.get("from") == npv["activator"]["from"], f"{name}: activator peers {act.get('from')}")
        else:
            check("from" not in act, f"{name}: the activator port is open to all by default: {act}")

    # Custom Metrics API: the kube-apiserver (no pod IP), anyone unless narrowed.
    if values["customMetrics"]["enabled"]:
        cmr = rules["custom-metrics"]
        if npv["customMetrics"]["from"]:
            check(cmr.get("from") == npv["customMetrics"]["from"], f"{name}: custom metrics peers {cmr.get('from')}")
        else:
            check("from" not in cmr, f"{name}: the custom metrics port is open to all by default: {cmr}")

    bundled = values["config"]["store"] == "redis" and values["redis"]["bundled"]["enabled"]
    check(len(policies) == (2 if bundled else 1), f"{name}: {len(policies)} NetworkPolicies")
    if bundled:
        redis = one(docs, "NetworkPolicy", fullname(docs) + "-redis")
        valkey = one(docs, "Deployment", fullname(docs) + "-redis")
        check(redis["spec"]["podSelector"]["matchLabels"] == valkey["spec"]["selector"]["matchLabels"],
              f"{name}: the Valkey policy selects other pods")
        check(redis["spec"]["policyTypes"] == ["Ingress"], f"{name}: the Valkey policy must not restrict egress")
        (rule,) = redis["spec"]["ingress"]
        # A podSelector without namespaceSelector: the release namespace only.
        check(rule["from"] == [{"podSelector": {"matchLabels": deploy["spec"]["selector"]["matchLabels"]}}],
              f"{name}: only activescale's pods may reach Valkey: {rule['from']}")
        ports = valkey["spec"]["template"]["spec"]["containers"][0]["ports"]
        check(rule["ports"] == [{"port": "redis", "protocol": "TCP"}] and any(p.get("name") == "redis" for p in ports),
              f"{name}: the Valkey rule must name its container port: {rule['ports']}, {ports}")


# --- main --------------------------------------------------------------------

REFUSALS = [
    ("memory store with 2 replicas", {"replicaCount": 2, "config": {"store": "memory"}},
     "replicaCount=2 with config.store=memory"),
    ("redis.url and the bundled Valkey", {"redis": {"url": "redis://r:6379"}},
     "redis.url is set and redis.bundled.enabled is true"),
    ("redis store without any Redis", {"redis": {"bundled": {"enabled": False}}},
     "config.store=redis needs redis.url"),
    ("TLS without a Secret", {"tls": {"enabled": True}}, "tls.enabled=true needs tls.existingSecret"),
    ("client auth without TLS", {"tls": {"clientAuth": {"enabled": True}}}, "tls.clientAuth.enabled=true needs tls.enabled"),
    ("client names without client auth",
     {"tls": {"enabled": True, "existingSecret": "s", "clientAuth": {"names": ["keda-operator.keda.svc"]}}},
     "tls.clientAuth.names needs tls.clientAuth.enabled=true"),
    ("a KEDA namespace that is no namespace name (schema)", {"networkPolicy": {"kedaNamespace": "KEDA"}}, ""),
    ("a blank client name (schema)",
     {"tls": {"enabled": True, "existingSecret": "s", "clientAuth": {"enabled": True, "names": [" "]}}}, ""),
    # Refused by values.schema.json inside Helm, before any template runs.
    ("the activator without routes", {"activator": {"enabled": True}},
     "activator.enabled=true needs at least one activator.routes entry"),
    ("an activator route without namespace (schema)",
     {"activator": {"enabled": True, "routes": [{"host": "web.example.com", "upstream": "web:80"}]}}, ""),
    ("the Custom Metrics API without a front-proxy CA", {"customMetrics": {"enabled": True}},
     "customMetrics.enabled=true needs exactly one of customMetrics.clientCA.pem"),
    ("two front-proxy CA sources",
     {"customMetrics": {"enabled": True, "clientCA": {"existingConfigMap": "a", "existingSecret": "b"}}},
     "customMetrics.enabled=true needs exactly one of customMetrics.clientCA.pem"),
    ("a caBundle for a self-signed certificate",
     {"customMetrics": {"enabled": True, "clientCA": {"existingSecret": "b"},
                        "caBundle": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"}},
     "customMetrics.caBundle needs customMetrics.tls.existingSecret"),
    ("a caBundle that is not PEM (schema)",
     {"customMetrics": {"enabled": True, "clientCA": {"existingSecret": "b"}, "tls": {"existingSecret": "t"},
                        "caBundle": "TUlJQg=="}}, ""),
    ("an unknown store (schema)", {"config": {"store": "etcd"}}, ""),
    ("an unknown setting (schema)", {"config": {"pod_tll": "15s"}}, ""),
    ("a non-Redis URL (schema)", {"redis": {"url": "http://r:6379", "bundled": {"enabled": False}}}, ""),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env-out", type=Path, help="write each case's rendered environment here as JSON")
    parser.add_argument("--manifests-out", type=Path, help="write each case's rendered manifests here as JSON")
    args = parser.parse_args()

    defaults = load_yaml(CHART / "values.yaml")
    cases = {p.name: deep_merge(defaults, load_yaml(p) or {}) for p in sorted((CHART / "ci").glob("*.yaml"))}
    failures = []

    def step(what, fn, *a):
        try:
            fn(*a)
            print(f"ok    {what}")
        except CheckFailed as e:
            print(f"FAIL  {what}\n      {e}")
            failures.append(what)

    step("values match values.schema.json", check_schema, defaults, cases)
    step("every .Values path in templates exists", check_values_paths, defaults)
    step("config: covers struct FileConfig", check_config_coverage, defaults)
    step("Dockerfile matches the chart", check_dockerfile, defaults)
    step("scaledobjects/ use the chart's addresses", check_example_addresses, defaults)

    def defaults_are_locked_down():
        npv = defaults["networkPolicy"]
        check(npv["enabled"] is True, "networkPolicy.enabled must default to true: KEDA must be the scaler's only caller")
        check(npv["kedaNamespace"] == "keda" and npv["scaler"]["namespaceSelector"] is None,
              f"the default scaler peer is namespace keda via kedaNamespace: {npv}")
    step("NetworkPolicy is on by default", defaults_are_locked_down)

    lint = Lint()
    envs, manifests = {}, {}
    for name, values in {"defaults": defaults, **cases}.items():
        def lint_case(name=name, values=values):
            docs = render(lint, name, values)
            validate_kubernetes(name, docs)
            env = common_assertions(name, docs, values)
            case_assertions(name, docs, values, env)
            envs[name] = [[k, e.get("value", "<from secret>")] for k, e in env.items()]
            manifests[name] = docs
        step(f"helm lint + render: {name}", lint_case)
    def notes():
        _, stderr = lint.run(defaults, dump=True, templates=["NOTES.txt"])
        (text,) = [m for m in fail_messages(stderr) if m.startswith(DUMP_BEGIN)]
        check("-scaler." in text and f":{defaults['ports']['scaler']}" in text and f":{defaults['ports']['sink']}" in text,
              f"NOTES.txt should give the headless scaler and the sink addresses:\n{text}")
        check(f"{RELEASE_NAMESPACE}.svc.cluster.local" in text and f"namespace {RELEASE_NAMESPACE}." in text,
              f"NOTES.txt should use the release namespace:\n{text}")
        check("pods in namespace keda may call the scaler port" in text,
              f"NOTES.txt should say who may call the scaler port:\n{text}")
    step("NOTES.txt renders the addresses", notes)
    for what, over, message in REFUSALS:
        step(f"refused: {what}", expect_refusal, lint, what, deep_merge(defaults, over), message)

    if args.env_out:
        args.env_out.mkdir(parents=True, exist_ok=True)
        for name, env in envs.items():
            (args.env_out / f"{Path(name).stem}.env.json").write_text(json.dumps(env, indent=1), encoding="utf-8")

    if args.manifests_out:
        args.manifests_out.mkdir(parents=True, exist_ok=True)
        for name, docs in manifests.items():
            (args.manifests_out / f"{Path(name).stem}.json").write_text(json.dumps(docs, indent=1), encoding="utf-8")

    if failures:
        print(f"\n{len(failures)} check(s) failed", file=sys.stderr)
        return 1
    print(f"\nall chart checks passed ({helm_sdkpy.get_version()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
