"""The DNS benchmark's report: a Markdown table and a plot from the JSON lines that
tests/bench/dns.sh collects.

usage: dns_report.py RESULTS.jsonl OUT.md OUT.png COMMAND
"""

import json
import os
import platform
import subprocess
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERVERS = ["knot", "nsd", "waymark"]
MODES = ["saturation", "rate", "saturation, churn", "rate, churn"]


def machine():
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for cmd in (["knotd", "--version"], ["nsd", "-v"], ["dnsperf", "-h"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
            text = (out.stdout + out.stderr).strip().splitlines()
            line = next((l for l in text if "ersion" in l or l.startswith("knotd")), text[0])
            versions.append(f"{cmd[0]}: {line.strip()}")
        except (OSError, StopIteration, IndexError, subprocess.SubprocessError):
            pass
    return cpu, os.cpu_count(), platform.release(), versions


def fmt(v, digits=1):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def main():
    results_path, md_path, png_path, command = sys.argv[1:5]
    runs, notes = [], {}
    for line in open(results_path):
        r = json.loads(line)
        if "server" in r:
            runs.append(r)
        else:
            notes[r["services"]] = (r["churn"], r["verify"])
    by = {(r["server"], r["services"], r["mode"]): r for r in runs}
    counts = sorted({r["services"] for r in runs})

    cpu, ncpu, kernel, versions = machine()
    out = []
    out.append("# DNS performance: Waymark, Knot DNS and NSD side by side\n")
    out.append(f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    out.append(f"- Machine: {cpu}, {ncpu} cores, Linux {kernel}; the server pinned to one "
               "core, dnsperf to the other (`taskset`, every thread).")
    for v in versions:
        out.append(f"- {v}")
    out.append(f"- Command: `{command}`")
    out.append("- Query mix (the same file for every server): 80% A of existing services, "
               "10% SRV, 10% names that do not exist; dnsperf with 16 clients and 1,000 "
               "queries outstanding.")
    out.append("- `rate` = dnsperf held at a fixed rate (`-Q`); p99 comes from dnsperf's "
               "per-query output (`-v`), which only the fixed-rate runs use. CPU is the "
               "server's user + system time from /proc (every process and thread of it); "
               "memory is its PSS at the end of the run.")
    out.append("- `churn` = while `dnsbench churn` changes the registry (registrations, "
               "deregistrations, health flips) through the HTTP API on the server's core.\n")

    for n in counts:
        out.append(f"## {n:,} services ({3 * n:,} instances)\n")
        out.append("| server | run | queries/s | avg ms | p99 ms | lost | CPU ms / 1k queries "
                   "| queries per CPU-second | memory MiB |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for server in SERVERS:
            for mode in MODES:
                r = by.get((server, n, mode))
                if not r:
                    continue
                per_cpu = r["completed"] / r["cpu_s"] if r["cpu_s"] else None
                out.append(
                    f"| {server} | {mode} | {fmt(r['qps'], 0)} | {fmt(r['avg_ms'], 3)} | "
                    f"{fmt(r['p99_ms'], 3)} | {fmt(r['lost'])} | {fmt(r['cpu_ms_per_1k'], 2)} | "
                    f"{fmt(per_cpu, 0)} | {fmt(r['pss_mib'], 0)} |")
        out.append("")
        out.append("| ratio | vs Knot | vs NSD | target |")
        out.append("|---|---:|---:|---|")

        def ratio(mode, key, other, invert=False):
            a, b = by.get(("waymark", n, mode)), by.get((other, n, mode.split(",")[0]))
            if not a or not b or not b[key] or not a[key]:
                return None
            return b[key] / a[key] if invert else a[key] / b[key]

        rows = [
            ("saturation queries/s, Waymark / peer", "saturation", "qps", False, "≥ 0.9 of Knot"),
            ("saturation queries/s under churn, Waymark / peer", "saturation, churn", "qps",
             False, "≥ 0.9 of Knot"),
            ("CPU per query at the fixed rate, Waymark / peer", "rate", "cpu_ms_per_1k", False,
             "≤ 1.2 × Knot"),
            ("CPU per query at the fixed rate under churn, Waymark / peer", "rate, churn",
             "cpu_ms_per_1k", False, "≤ 1.2 × Knot"),
        ]
        for label, mode, key, inv, target in rows:
            out.append(f"| {label} | {fmt(ratio(mode, key, 'knot', inv), 2)} | "
                       f"{fmt(ratio(mode, key, 'nsd', inv), 2)} | {target} |")
        out.append("")
        if n in notes:
            churn, verify = notes[n]
            out.append(f"Churn: {churn.strip()}  ")
            out.append(f"Checked answers: {verify.strip()}\n")

    open(md_path, "w").write("\n".join(out) + "\n")

    fig, axes = plt.subplots(len(counts), 2, figsize=(12, 4.2 * len(counts)), squeeze=False)
    colors = {"knot": "#4c72b0", "nsd": "#55a868", "waymark": "#c44e52"}
    for row, n in enumerate(counts):
        labels, qps, cpu_q, cols = [], [], [], []
        for server in SERVERS:
            for mode in ("saturation", "saturation, churn"):
                r = by.get((server, n, mode))
                if r:
                    labels.append(server + (" (churn)" if "churn" in mode else ""))
                    qps.append(r["qps"] / 1000)
                    cols.append(colors[server])
        ax = axes[row][0]
        ax.bar(labels, qps, color=cols)
        ax.set_title(f"{n:,} services: saturation throughput")
        ax.set_ylabel("thousand queries / s")
        for i, v in enumerate(qps):
            ax.text(i, v, f"{v:.0f}k", ha="center", va="bottom")
        labels, cols = [], []
        for server in SERVERS:
            for mode in ("rate", "rate, churn"):
                r = by.get((server, n, mode))
                if r:
                    labels.append(server + (" (churn)" if "churn" in mode else ""))
                    cpu_q.append(r["cpu_ms_per_1k"])
                    cols.append(colors[server])
        ax = axes[row][1]
        ax.bar(labels, cpu_q, color=cols)
        ax.set_title(f"{n:,} services: server CPU at {int(by.get(('knot', n, 'rate'), {}).get('qps', 0)):,} q/s")
        ax.set_ylabel("CPU ms per 1,000 queries (µs per query)")
        for i, v in enumerate(cpu_q):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)


if __name__ == "__main__":
    main()
