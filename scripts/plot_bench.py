#!/usr/bin/env python3
"""Turns target/bench-results/results.jsonl into summary.md (tables) and
growth.png (growth curves). Usage: plot_bench.py RESULTS.jsonl OUTDIR"""
import json
import os
import sys

results_path, out_dir = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(results_path) if l.strip()]


def pick(figure, **kw):
    return [r for r in rows if r.get("figure") == figure and all(r.get(k) == v for k, v in kw.items())]


def fmt(v, digits=1):
    if v is None:
        return "–"
    if isinstance(v, float):
        if abs(v) >= 1e6:
            return f"{v / 1e6:.2f} M"
        if abs(v) >= 1e4:
            return f"{v / 1e3:.1f} k"
        return f"{v:.{digits}f}"
    return str(v)


lines = []
for store in sorted({r["store"] for r in rows}):
    lines.append(f"### Store: {store}\n")
    sink = pick("sink", store=store)
    if sink:
        lines.append("| sidecar streams | interval | messages/s | families/s | server cores | families per CPU-s | CPU-s per 1,000 pods per flush | RSS KiB per stream | with its connection |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in sorted(sink, key=lambda r: (r["interval_ms"] == 0, r["streams"])):
            lines.append(
                f"| {r['streams']} | {'max' if r['interval_ms'] == 0 else str(r['interval_ms']) + ' ms'} | {fmt(r['messages_per_s'])} | {fmt(r['families_per_s'])} "
                f"| {fmt(r['server_cores_used'], 2)} | {fmt(r['families_per_cpu_s'])} | {fmt(r['cpu_s_per_1000_pods_per_flush'], 4)} | {fmt(r['rss_kib_per_stream'], 1)} | {fmt(r.get('rss_kib_per_stream_with_connections'), 1)} |"
            )
        lines.append("")
    sc = pick("scaler", store=store)
    if sc:
        lines.append("| pods | clients | offered calls/s | GetMetrics calls/s | p50 µs | p99 µs | server CPU µs/call | wrong/failed |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in sorted(sc, key=lambda r: (r["pods"], r["clients"], r.get("offered_calls_per_s") or 0)):
            offered = r.get("offered_calls_per_s")
            lines.append(
                f"| {r['pods']} | {r['clients']} | {fmt(offered) if offered else 'closed loop'} | {fmt(r['calls_per_s'])} | {fmt(r['p50_us'])} | {fmt(r['p99_us'])} | {fmt(r['server_cpu_us_per_call'])} | {r['wrong_or_failed']} |"
            )
        lines.append("")
    act = pick("activation", store=store)
    if act:
        lines.append("| open StreamIsActive streams | flips | 0→1 push p50 µs | p99 µs | 1→0 push p50 µs | p99 µs | wrong |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in sorted(act, key=lambda r: r["watchers"]):
            lines.append(
                f"| {r['watchers']} | {r['rounds']} | {fmt(r['up_p50_us'])} | {fmt(r['up_p99_us'])} | {fmt(r['down_p50_us'])} | {fmt(r['down_p99_us'])} | {r['wrong_reports']} |"
            )
        lines.append("")
    mem = pick("memory", store=store)
    if mem:
        lines.append("| tracked pods | RSS before KiB | RSS after KiB | bytes per pod |")
        lines.append("|---|---|---|---|")
        for r in sorted(mem, key=lambda r: r["pods"]):
            lines.append(f"| {r['pods']} | {r['rss_before_kib']} | {r['rss_after_kib']} | {fmt(r['bytes_per_pod'], 0)} |")
        lines.append("")

q = pick("query")
if q:
    lines.append("### Prometheus path beside GetMetrics (same pods, same run)\n")
    lines.append("| pods | clients | Prometheus p50 µs | p99 µs | CPU µs/query | activescale p50 µs | p99 µs | CPU µs/call | ratio p50 | ratio p99 | ratio CPU |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["pods"], r["clients"]) for r in q})
    for pods, clients in keys:
        p = next((r for r in q if r["side"] == "prometheus" and r["pods"] == pods and r["clients"] == clients), None)
        a = next((r for r in q if r["side"] == "activescale" and r["pods"] == pods and r["clients"] == clients), None)
        if not p or not a:
            continue
        ratio = lambda k: fmt(p[k] / a[k]) + "×" if p.get(k) and a.get(k) else "–"
        lines.append(
            f"| {pods} | {clients} | {fmt(p['p50_us'])} | {fmt(p['p99_us'])} | {fmt(p['cpu_us_per_call'])} | {fmt(a['p50_us'])} | {fmt(a['p99_us'])} | {fmt(a['cpu_us_per_call'])} "
            f"| {ratio('p50_us')} | {ratio('p99_us')} | {ratio('cpu_us_per_call')} |"
        )
    lines.append("")
for v in pick("visibility"):
    lines.append(
        f"Change → visible: Prometheus (scrape every {v['scrape_interval_s']} s + query) p50 {fmt(v['prometheus_p50_us'] / 1000)} ms, "
        f"max {fmt(v['prometheus_max_us'] / 1000)} ms; activescale (push + ingest + GetMetrics) p50 {fmt(v['activescale_p50_us'] / 1000, 2)} ms, "
        f"max {fmt(v['activescale_max_us'] / 1000, 2)} ms; ratio p50 {fmt(v['ratio_p50'])}× over {v['rounds']} flips.\n"
    )

with open(os.path.join(out_dir, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit("matplotlib missing: pip install matplotlib (summary.md written)")

fig, ax = plt.subplots(2, 2, figsize=(12, 9))
styles = {"memory": "-o", "redis": "--s"}

a = ax[0][0]
for store in sorted({r["store"] for r in rows}):
    s = sorted([r for r in pick("sink", store=store) if r["interval_ms"] == 5000], key=lambda r: r["streams"])
    if s:
        a.plot([r["streams"] for r in s], [r["cpu_s_per_1000_pods_per_flush"] or 0 for r in s], styles.get(store, "-x"), label=f"{store}: 5 s flush")
    s = sorted([r for r in pick("sink", store=store) if r["interval_ms"] == 0], key=lambda r: r["streams"])
    if s:
        a.plot([r["streams"] for r in s], [r["cpu_s_per_1000_pods_per_flush"] or 0 for r in s], styles.get(store, "-x"), alpha=0.5, label=f"{store}: saturated")
a.set(xscale="log", yscale="log", xlabel="sidecar streams (pods)", ylabel="server CPU-s per 1,000 pods per flush", title="Ingest cost")
a.legend()

a = ax[0][1]
for store in sorted({r["store"] for r in rows}):
    for clients in (1, 64):
        s = sorted(pick("scaler", store=store, clients=clients, offered_calls_per_s=None), key=lambda r: r["pods"])
        if s:
            a.plot([r["pods"] for r in s], [r["p99_us"] / 1000 for r in s], styles.get(store, "-x"), label=f"{store} GetMetrics p99, {clients} clients")
for clients in (1, 64):
    s = sorted(pick("query", side="prometheus", clients=clients), key=lambda r: r["pods"])
    if s:
        a.plot([r["pods"] for r in s], [r["p99_us"] / 1000 for r in s], ":^", label=f"Prometheus sum() p99, {clients} clients")
a.set(xscale="log", yscale="log", xlabel="pods in the workload", ylabel="latency ms", title="Answer latency (p99)")
a.legend(fontsize=7)

a = ax[1][0]
for store in sorted({r["store"] for r in rows}):
    s = sorted(pick("activation", store=store), key=lambda r: r["watchers"])
    if s:
        a.plot([r["watchers"] for r in s], [r["up_p50_us"] / 1000 for r in s], styles.get(store, "-x"), label=f"{store} p50")
        a.plot([r["watchers"] for r in s], [r["up_p99_us"] / 1000 for r in s], styles.get(store, "-x"), alpha=0.5, label=f"{store} p99")
a.set(xscale="log", yscale="log", xlabel="open StreamIsActive streams", ylabel="ingest → push ms", title="Activation latency")
a.legend()

a = ax[1][1]
for store in sorted({r["store"] for r in rows}):
    s = sorted(pick("memory", store=store), key=lambda r: r["pods"])
    if s:
        a.plot([r["pods"] for r in s], [r["bytes_per_pod"] for r in s], styles.get(store, "-x"), label=store)
a.axhline(1024, color="grey", linestyle=":", label="target 1 KiB")
a.set(xscale="log", xlabel="tracked pods", ylabel="server RSS bytes per pod", title="Memory")
a.legend()

fig.suptitle("activescale growth curves (scripts/bench)")
fig.tight_layout()
fig.savefig(os.path.join(out_dir, "growth.png"), dpi=90)
print("wrote", os.path.join(out_dir, "growth.png"))
