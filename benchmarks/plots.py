"""PNG plots of the benchmark results in ``benchmarks/results/*.json``.

    .venv/bin/python benchmarks/plots.py

Writes, next to the JSON it reads (each plot only when its JSON exists):

* ``daemon_latency.png``: window latency (median, p99) vs machines per daemon, hop 10 s and 5 s
  (``daemon_busy.json``, a run while other jobs held about one core, dashed when present);
* ``daemon_cpu_memory.png``: CPU seconds per second of audio per stream, and peak RSS, vs machines;
* ``onnx_batch.png``: aisfx windows/s vs windows per onnxruntime call;
* ``knn_latency.png``: single-query latency vs bank size per index (random and clustered data);
* ``knn_recall.png``: recall@1 of the approximate indexes vs bank size;
* ``supplementary.png``: per idle margin, downtime windows called idle / still flagged, and faulty
  windows hidden as idle;
* ``false_alarms.png``: per alert setting, the share of normal and anomalous windows flagged, the
  share of anomalous windows under an open alert, and the false alerts counted.
"""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import RESULTS  # noqa: E402


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def subtitle(data: dict) -> str:
    load_ = data.get("load", {})
    return (f"{data.get('environment', {}).get('cpus', '?')} CPUs, load (1 min) mean {load_.get('mean_1m', '?')}, "
            f"max {load_.get('max_1m', '?')}; {data.get('environment', {}).get('date', '')[:16]}")


def save(fig, name: str) -> None:
    path = RESULTS / name
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def _runs(datasets: list[tuple[str, dict]], hop: float) -> list[tuple[str, list[dict], str]]:
    out = []
    for (label, data), marker in zip(datasets, ("o", "^", "s")):
        rs = sorted((r for r in data["runs"] if r["hop_s"] == hop), key=lambda r: r["n"])
        if rs:
            out.append((label, rs, marker))
    return out


def plot_daemon(data: dict, others: list[tuple[str, dict]] = ()) -> None:
    """``data``: results/daemon.json; ``others``: more runs of the same benchmark (e.g. on a busier
    machine), drawn dashed with their load in the legend."""
    datasets = [(f"load {data['load']['mean_1m']}", data)] + [(f"{lbl}, load {d['load']['mean_1m']}", d) for lbl, d in others]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, stat, title in ((a1, "latency_median_s", "median"), (a2, "latency_p99_s", "p99")):
        for hop, colour in ((10.0, "tab:blue"), (5.0, "tab:orange")):
            for i, (label, rs, marker) in enumerate(_runs(datasets, hop)):
                ax.plot([r["n"] for r in rs], [r[stat] for r in rs], marker=marker, ls="-" if i == 0 else "--",
                        color=colour, label=f"hop {hop:g} s ({label})")
                for r in rs:
                    if not r["keeps_up"]:
                        ax.plot(r["n"], r[stat], "x", color="red", ms=10)
            ax.axhline(hop, color=colour, lw=0.8, ls=":")
        ax.set_xlabel("machines (channels) per daemon")
        ax.set_title(f"{title}; red x: falls behind (drops or backlog)", fontsize=9)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    a1.set_ylabel("window end -> processed and published (s)")
    fig.suptitle("Daemon latency vs streams (aisfx, real time; dotted: the hop) — " + subtitle(data), fontsize=8)
    save(fig, "daemon_latency.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for hop, colour in ((10.0, "tab:blue"), (5.0, "tab:orange")):
        for i, (label, rs, marker) in enumerate(_runs(datasets, hop)):
            n = [r["n"] for r in rs]
            ls = "-" if i == 0 else "--"
            a1.plot(n, [r["cpu_s_per_audio_s_per_stream"] for r in rs], marker=marker, ls=ls, color=colour,
                    label=f"hop {hop:g} s ({label})")
            a2.plot(n, [r["peak_rss_mb"] for r in rs], marker=marker, ls=ls, color=colour, label=f"hop {hop:g} s ({label})")
    a1.set_xlabel("machines per daemon")
    a1.set_ylabel("CPU s per audio s per stream")
    a1.set_title("CPU per stream", fontsize=9)
    a2.set_xlabel("machines per daemon")
    a2.set_ylabel("peak RSS (MB)")
    a2.set_title("Peak resident memory (VmHWM)", fontsize=9)
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(subtitle(data), fontsize=8)
    save(fig, "daemon_cpu_memory.png")

    onnx = data.get("onnxruntime")
    if onnx:
        fig, ax = plt.subplots(figsize=(6, 4))
        for setting in sorted({c["setting"] for c in onnx["batch"]}):
            cs = [c for c in onnx["batch"] if c["setting"] == setting]
            ax.plot([c["batch"] for c in cs], [c["windows_per_s"] for c in cs], "o-", label=setting)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("windows per onnxruntime call (batch)")
        ax.set_ylabel("windows per second")
        ax.set_ylim(0, None)
        ax.set_title("aisfx throughput vs batch\n" + subtitle(data), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "onnx_batch.png")


def plot_knn(data: dict) -> None:
    search = data["search"]
    kinds = sorted({r["kind"] for r in search})
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rs = sorted((r for r in search if r["kind"] == kind), key=lambda r: r["n"])
        n = [r["n"] for r in rs]
        ax.plot(n, [r["flat"]["single_t1"]["median_ms"] for r in rs], "o-", label="faiss flat, 1 thread")
        ax.plot(n, [r["flat"][f"single_t{data['threads']}"]["median_ms"] for r in rs], "o:",
                label=f"faiss flat, {data['threads']} threads")
        ax.plot(n, [r["numpy"]["single_t1"]["median_ms"] for r in rs], "^-", label="numpy matmul, 1 thread")
        for ef in ("256",):  # the ef_search monitor.scoring.knn uses
            pts = [(r["n"], r["hnsw"]["ef_search"][ef]["single_t1"]["median_ms"]) for r in rs
                   if "ef_search" in r["hnsw"]]
            if pts:
                ax.plot(*zip(*pts), "s-", label=f"HNSW32 ef={ef}")
        pts = [(r["n"], r["ivf"]["nprobe"]["32"]["single_t1"]["median_ms"]) for r in rs if "ivf" in r]
        if pts:
            ax.plot(*zip(*pts), "d-", label="IVF nprobe=32")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("bank size (d = 512)")
        ax.set_ylabel("one query (ms, median)")
        ax.set_title(f"{kind} data", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("KNN single-query latency vs bank size — " + subtitle(data), fontsize=8)
    save(fig, "knn_latency.png")

    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rs = sorted((r for r in search if r["kind"] == kind), key=lambda r: r["n"])
        for ef in ("16", "64", "128", "256"):
            pts = [(r["n"], r["hnsw"]["ef_search"][ef]["recall_at_1"]) for r in rs if "ef_search" in r["hnsw"]]
            if pts:
                ax.plot(*zip(*pts), "s-", label=f"HNSW ef={ef}")
        for nprobe in ("8", "32"):
            pts = [(r["n"], r["ivf"]["nprobe"][nprobe]["recall_at_1"]) for r in rs if "ivf" in r]
            if pts:
                ax.plot(*zip(*pts), "d--", label=f"IVF nprobe={nprobe}")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("bank size")
        ax.set_ylabel("recall@1")
        ax.set_title(f"{kind} data", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Approximate search recall@1 — " + subtitle(data), fontsize=8)
    save(fig, "knn_recall.png")


def _share_axes(ax, labels: list[str], title: str, legend_below: float, legend_columns: int) -> None:
    """One labelled bar group per row, top to bottom, on a 0..1 share-of-windows axis."""
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of windows")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -legend_below), ncol=legend_columns)


def plot_false_alarms(data: dict) -> None:
    sets = data.get("sets", {})
    if not sets:
        return
    fig, axes = plt.subplots(1, len(sets), figsize=(7 * len(sets), 5.2), squeeze=False)
    bars = (("normal windows flagged", "normal", "flagged_share", "tab:red"),
            ("anomalous windows flagged", "anomaly", "flagged_share", "tab:blue"),
            ("anomalous windows under an open alert", "anomaly", "alert_covered_share", "tab:green"))
    for ax, (key, entry) in zip(axes[0], sets.items()):
        labels = list(entry["settings"])
        y = range(len(labels))
        for j, (name, kind, field, colour) in enumerate(bars):
            values = [entry["settings"][lbl][kind][field] for lbl in labels]
            ax.barh([i + (j - 1) * 0.27 for i in y], values, height=0.27, color=colour, label=name)
        for i, lbl in enumerate(labels):
            normal = entry["settings"][lbl]["normal"]
            ax.text(1.01, i, f"{normal['raises']} false alerts in {normal['audio_s']:.0f} s", va="center", fontsize=7,
                    transform=ax.get_yaxis_transform())
        _share_axes(ax, labels, key, legend_below=0.14, legend_columns=3)
    fig.suptitle("Alert settings on normal and anomalous test audio (real daemon, hop 10 s) — " + subtitle(data), fontsize=8)
    save(fig, "false_alarms.png")


def plot_supplementary(data: dict) -> None:
    """Idle rule: per margin, the downtime windows it silences against the fault windows it
    hides (the trade-off ``scoring.idle_margin`` sets)."""
    sets = data.get("idle", {})
    if not sets:
        return
    fig, axes = plt.subplots(1, len(sets), figsize=(6.5 * len(sets), 4.4), squeeze=False)
    bars = (("machine stopped: windows idle", "stopped_idle", "tab:green"),
            ("machine stopped: windows flagged anomalous", "stopped_flagged", "tab:red"),
            ("faulty machine: windows called idle (hidden)", "anomaly_idle", "tab:purple"))
    for ax, (name, variants) in zip(axes[0], sets.items()):
        labels = list(variants)
        for j, (label, field, colour) in enumerate(bars):
            ax.barh([i + (j - 1) * 0.27 for i in range(len(labels))], [variants[v][field] for v in labels],
                    height=0.27, color=colour, label=label)
        _share_axes(ax, labels, name, legend_below=0.2, legend_columns=1)
    fig.suptitle(f"Site noise enrolled: idle rule by margin (mean of {data.get('repeats', '?')} splits) — "
                 + subtitle(data), fontsize=8)
    save(fig, "supplementary.png")


def main() -> int:
    done = 0
    for name, fn in (("daemon", plot_daemon), ("knn", plot_knn), ("false_alarms", plot_false_alarms),
                     ("supplementary", plot_supplementary)):
        data = load(name)
        if data is None:
            print(f"no {name}.json in {RESULTS}: skipped")
            continue
        if name == "daemon":
            busy = load("daemon_busy")
            fn(data, [("busy machine", busy)] if busy else [])
        else:
            fn(data)
        done += 1
    return 0 if done else 1


if __name__ == "__main__":
    raise SystemExit(main())
