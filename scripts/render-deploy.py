#!/usr/bin/env python3
"""Renders the GitOps files under deploy/ from the Helm chart, and checks them.

No helm, kustomize, kubectl or Argo CD binary is available here, so:

- The chart is rendered with Helm's own code through helm-sdkpy, the way
  scripts/helm-lint.py does (its lint-mode render, which names the release
  `test-release`; the names are rewritten to those of
  `helm install activescale helm/activescale -n keda`, and every object gets
  `namespace: keda`).
- Kustomize is not run. The overlays keep to what a few lines of Python can
  apply faithfully: `resources` (files and directories), `patches` with a
  `path` (strategic merge patches merging maps, merging `containers`, `env`,
  `volumes`, `volumeMounts` and `ports` lists by `name`, honouring
  `$patch: delete` on an object or a list item and `null` to drop a key; and
  JSON 6902 patches with a `target`, ops add / replace / remove), and
  `images` (newName, newTag, digest).

Without arguments, writes the rendered files. With `--check` (what
tests/deploy.rs runs), writes nothing and fails when:

1. a committed rendered file differs from a fresh render;
2. an overlay, built as above, differs from the chart rendered with that
   environment's values (ENVIRONMENTS below): the same objects, field for
   field (lists of named items compared by name, as kustomize merges them);
3. any manifest (base, each built overlay, the chart's own renders) fails
   Kubernetes' OpenAPI schemas (kubernetes-validate, strict: unknown fields
   are errors) for each version in KUBE_VERSIONS;
4. deploy/argocd/applicationset.yaml does not give one Application per
   overlay, pointing at that overlay's path.

Exit status: 0 when everything holds, 1 on a failed check, 3 when a Python
package (helm-sdkpy, jsonschema, PyYAML, kubernetes-validate) is missing.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kustomize"
NAMESPACE = "keda"
RELEASE = "activescale"
# The oldest Kubernetes the chart's APIs are checked against, and the newest
# schemas kubernetes-validate ships.
KUBE_VERSIONS = ["1.29.0", "1.37.0"]

try:
    import kubernetes_validate
    import yaml
except ImportError as e:  # pragma: no cover - environment problem
    print(f"render-deploy: missing Python package: {e.name}. Install with:\n"
          "  pip install --ignore-requires-python helm-sdkpy jsonschema pyyaml kubernetes-validate",
          file=sys.stderr)
    sys.exit(3)


def helm_lint_module():
    spec = importlib.util.spec_from_file_location("helm_lint", ROOT / "scripts" / "helm-lint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # exits 3 itself when helm-sdkpy is missing
    return module


hl = helm_lint_module()
check, CheckFailed, deep_merge = hl.check, hl.CheckFailed, hl.deep_merge

# What each overlay must amount to, as chart values over values.yaml. The
# Redis URL and Secret names are placeholders an operator edits in the
# overlay (and here).
ENVIRONMENTS = {
    "dev": {
        "replicaCount": 1,
        "config": {"store": "memory"},
        "redis": {"bundled": {"enabled": False}},
    },
    "prod": {
        "replicaCount": 3,
        "image": {"tag": "0.1.0"},
        "redis": {
            "url": "rediss://redis.redis.svc.cluster.local:6380",
            "existingSecret": "activescale-redis",
            "bundled": {"enabled": False},
        },
        "tls": {"enabled": True, "existingSecret": "activescale-tls"},
        # On by default; said here because prod depends on it.
        "networkPolicy": {"enabled": True},
    },
}

# Files under deploy/ rendered from the chart: path -> (values over
# values.yaml, kinds kept; None keeps every object).
RENDERED = {
    KUSTOMIZE / "base" / "activescale.yaml": ({}, None),
}

HEADER = ("# Rendered from helm/activescale by scripts/render-deploy.py; do not edit.\n"
          "# tests/deploy.rs fails when this file differs from a fresh render.\n")


# --- rendering ----------------------------------------------------------------

def rename_release(node):
    """Lint mode's release `test-release` becomes `activescale`: the chart
    names objects after the release, and `activescale-activescale` collapses
    to `activescale` as the chart's fullname helper does."""
    if isinstance(node, dict):
        return {k: rename_release(v) for k, v in node.items()}
    if isinstance(node, list):
        return [rename_release(v) for v in node]
    if isinstance(node, str):
        return node.replace("test-release-activescale", RELEASE).replace("test-release", RELEASE)
    return node


CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "APIService"}


def chart_docs(lint, over: dict) -> list[dict]:
    values = deep_merge(hl.load_yaml(hl.CHART / "values.yaml"), over)
    docs = [rename_release(d) for d in hl.render(lint, "deploy", values)]
    for d in docs:
        if d["kind"] not in CLUSTER_SCOPED:
            d["metadata"]["namespace"] = NAMESPACE
    return sorted(docs, key=lambda d: (d["kind"], d["metadata"]["name"]))


def dump(docs: list[dict]) -> str:
    return HEADER + "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)


def render_all(lint) -> dict[Path, str]:
    out = {}
    for path, (over, kinds) in RENDERED.items():
        docs = [d for d in chart_docs(lint, over) if kinds is None or d["kind"] in kinds]
        out[path] = dump(docs)
    return out


# --- a small kustomize ----------------------------------------------------------

MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name"}


def strategic_merge(base, patch, key: str | None = None):
    if isinstance(patch, dict) and isinstance(base, dict):
        out = copy.deepcopy(base)
        for k, v in patch.items():
            if k == "$patch":
                continue
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(patch, list) and isinstance(base, list) and key in MERGE_KEYS:
        mk = MERGE_KEYS[key]
        out = copy.deepcopy(base)
        for item in patch:
            check(isinstance(item, dict) and mk in item, f"list item without {mk}: {item}")
            at = [i for i, b in enumerate(out) if b.get(mk) == item[mk]]
            if item.get("$patch") == "delete":
                check(at, f"$patch: delete of {key} {item[mk]}, which is not there")
                del out[at[0]]
            elif at:
                out[at[0]] = strategic_merge(out[at[0]], item)
            else:
                out.append({k: v for k, v in item.items() if k != "$patch"})
        return out
    return copy.deepcopy(patch)


def pointer(doc, path: str):
    """The parent container and last key of a JSON pointer."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    node = doc
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    last = parts[-1]
    if isinstance(node, list):
        last = len(node) if last == "-" else int(last)
    return node, last


def json6902(doc: dict, ops: list[dict]) -> dict:
    out = copy.deepcopy(doc)
    for op in ops:
        parent, last = pointer(out, op["path"])
        if op["op"] == "add":
            if isinstance(parent, list):
                parent.insert(last, copy.deepcopy(op["value"]))
            else:
                parent[last] = copy.deepcopy(op["value"])
        elif op["op"] == "replace":
            check(last in parent if isinstance(parent, dict) else last < len(parent),
                  f"replace of {op['path']}, which is not there")
            parent[last] = copy.deepcopy(op["value"])
        elif op["op"] == "remove":
            del parent[last]
        else:
            raise CheckFailed(f"JSON 6902 op {op['op']} is not supported here")
    return out


def same_object(doc: dict, kind: str, name: str, namespace: str | None) -> bool:
    meta = doc["metadata"]
    return (doc["kind"] == kind and meta["name"] == name
            and (namespace is None or meta.get("namespace") == namespace))


def build(directory: Path) -> list[dict]:
    kust = hl.load_yaml(directory / "kustomization.yaml")
    allowed = {"apiVersion", "kind", "resources", "patches", "images"}
    check(set(kust) <= allowed, f"{directory}: kustomization fields {sorted(set(kust) - allowed)} are not applied here")
    docs: list[dict] = []
    for res in kust.get("resources", []):
        path = (directory / res).resolve()
        if path.is_dir():
            docs.extend(build(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d)
    for patch in kust.get("patches", []):
        check(set(patch) <= {"path", "target"}, f"{directory}: patch fields {sorted(patch)}")
        body = hl.load_yaml(directory / patch["path"])
        if "target" in patch:
            t = patch["target"]
            hits = [i for i, d in enumerate(docs) if same_object(d, t["kind"], t["name"], t.get("namespace"))]
            check(len(hits) == 1, f"{directory}: JSON 6902 target {t} matches {len(hits)} objects")
            docs[hits[0]] = json6902(docs[hits[0]], body)
            continue
        meta = body["metadata"]
        hits = [i for i, d in enumerate(docs) if same_object(d, body["kind"], meta["name"], meta.get("namespace"))]
        check(len(hits) == 1, f"{directory}: patch {patch['path']} matches {len(hits)} objects")
        if body.get("$patch") == "delete":
            del docs[hits[0]]
        else:
            docs[hits[0]] = strategic_merge(docs[hits[0]], body)
    for image in kust.get("images", []):
        for d in docs:
            pod = d.get("spec", {}).get("template", {}).get("spec", {})
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                repo, _, tag = c["image"].partition("@")[0].rpartition(":")
                if repo != image["name"]:
                    continue
                repo = image.get("newName", repo)
                if "digest" in image:
                    c["image"] = f"{repo}@{image['digest']}"
                else:
                    c["image"] = f"{repo}:{image.get('newTag', tag)}"
    return docs


# --- checks --------------------------------------------------------------------

def validate(where: str, docs: list[dict]) -> None:
    for d in docs:
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                raise CheckFailed(f"{where}: {d['kind']}/{d['metadata']['name']} fails the Kubernetes {version} "
                                  f"schema at {'/'.join(map(str, e.path))}: {e.message}") from None


def normalize(node):
    """Lists whose items all have a `name` become maps by name: kustomize
    merges such lists by key, so their order is not what is compared."""
    if isinstance(node, dict):
        return {k: normalize(v) for k, v in node.items()}
    if isinstance(node, list):
        if node and all(isinstance(i, dict) and "name" in i for i in node):
            return {i["name"]: normalize(i) for i in node}
        return [normalize(i) for i in node]
    return node


def differences(a, b, at: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a:
                out.append(f"{at}/{k}: only in the chart")
            elif k not in b:
                out.append(f"{at}/{k}: only in the overlay")
            else:
                out.extend(differences(a[k], b[k], f"{at}/{k}"))
        return out
    return [] if a == b else [f"{at}: overlay {a!r}, chart {b!r}"]


def by_object(docs: list[dict]) -> dict:
    return {f"{d['kind']}/{d['metadata'].get('namespace')}/{d['metadata']['name']}": normalize(d) for d in docs}


def check_overlay(lint, env: str) -> list[dict]:
    built = build(KUSTOMIZE / "overlays" / env)
    validate(f"overlay {env}", built)
    want = chart_docs(lint, ENVIRONMENTS[env])
    validate(f"chart with the {env} values", want)
    diffs = differences(by_object(built), by_object(want))
    check(not diffs, f"overlay {env} differs from the chart with its values:\n      " + "\n      ".join(diffs))
    return built


def check_applicationset() -> None:
    path = DEPLOY / "argocd" / "applicationset.yaml"
    (appset,) = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    check(appset["apiVersion"] == "argoproj.io/v1alpha1" and appset["kind"] == "ApplicationSet",
          f"{path}: not an ApplicationSet")
    (gen,) = appset["spec"]["generators"]
    elements = gen["list"]["elements"]
    overlays = sorted(p.name for p in (KUSTOMIZE / "overlays").iterdir() if p.is_dir())
    check(sorted(e["env"] for e in elements) == overlays, f"{path}: elements {elements} vs overlays {overlays}")
    template = appset["spec"]["template"]
    source = template["spec"]["source"]
    for e in elements:
        def fill(s: str) -> str:
            for k, v in e.items():
                s = s.replace("{{" + k + "}}", str(v))
            return s
        app_path = fill(source["path"])
        check((ROOT / app_path / "kustomization.yaml").is_file(),
              f"{path}: Application for {e['env']} points at {app_path}, which has no kustomization.yaml")
        check(fill(template["spec"]["destination"]["namespace"]) == NAMESPACE,
              f"{path}: Applications must install into {NAMESPACE}")
        check("{{" not in fill(template["metadata"]["name"]), f"{path}: unfilled name")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; fail when deploy/ is stale or invalid")
    args = parser.parse_args()
    lint = hl.Lint()
    rendered = render_all(lint)
    if not args.check:
        for path, text in rendered.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
        return 0

    failures = []

    def step(what, fn, *a):
        try:
            fn(*a)
            print(f"ok    {what}")
        except CheckFailed as e:
            print(f"FAIL  {what}\n      {e}")
            failures.append(what)

    def fresh(path, text):
        committed = path.read_text(encoding="utf-8") if path.exists() else ""
        check(committed == text, f"{path.relative_to(ROOT)} is stale: run scripts/render-deploy.py")

    for path, text in rendered.items():
        step(f"{path.relative_to(ROOT)} matches a fresh render", fresh, path, text)
    step("base validates", lambda: validate("base", build(KUSTOMIZE / "base")))
    for env in ENVIRONMENTS:
        step(f"overlay {env} builds, validates, and equals the chart with its values", check_overlay, lint, env)
    step("the ApplicationSet has one Application per overlay", check_applicationset)
    if failures:
        print(f"\n{len(failures)} check(s) failed", file=sys.stderr)
        return 1
    print("\nall deploy checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
