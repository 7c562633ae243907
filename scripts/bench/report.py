#!/usr/bin/env python3
"""Summarise scripts/bench.sh raw results: medians, ratio to the kernel.

    report.py OUTDIR

Reads OUTDIR/bench-raw.csv (one line per run) and OUTDIR/bench-info.txt
(key=value), prints a table and writes OUTDIR/bench-results.csv and
OUTDIR/bench-results.md.
"""

import csv
import os
import statistics
import sys

DESC = {
    "walk_find_cold": "`find .` over the whole merged tree, caches dropped",
    "walk_find_warm": "`find .`, second walk on the same mount",
    "walk_stat_cold": "`find . -printf` of size/mode/owner/mtime: lstat of every entry, caches dropped",
    "walk_stat_warm": "the same, second walk",
    "walk_lsR_cold": "`ls -lR .` (lstat + getxattr of every entry), caches dropped",
    "walk_lsR_warm": "the same, second walk",
    "read_tar_cold": "read every small file: `tar -cf - . | wc -c`, caches dropped",
    "read_tar_warm": "the same, second read",
    "fio_seqread": "fio 1 MiB sequential read of a lower file (lower page cache warm)",
    "fio_seqwrite": "fio 1 MiB sequential write of a new file (no fsync)",
    "fio_randread": "fio 4 KiB random read of a lower file (lower page cache warm)",
    "small_writes": "N write(2) calls of 100 bytes to a new file (passthrough; the writes' own time)",
    "copyup_small": "append 1 byte to each of N small lower files (copy-up)",
    "copyup_big": "append 1 byte to the big lower file (copy-up of the whole file)",
    "create_files": "create N empty files in 100 lower-backed dirs",
    "rm_lower_tree": "`rm -rf` of a tree spread over the 3 lowers",
    "build_untar": "build: `tar -xzf` a source tarball (in a lower) into the mount",
    "build_grep": "build: `grep -r` over the unpacked tree",
    "build_git_status": "build: `git status` in a git repo living in the lowers",
    "build_total": "build: the three steps above",
    "conc_1": "1 job: read its lower tree, create/stat/read/unlink N files of 4 KiB",
    "conc_sep_2": "2 such jobs at once, each in its own dir",
    "conc_sep_4": "4 jobs at once, each in its own dir",
    "conc_one_2": "2 jobs at once, all creating in one shared dir",
    "conc_one_4": "4 jobs at once, all creating in one shared dir",
    "conc_sep_2_scaling": "throughput of 2 jobs / 1 job (separate dirs)",
    "conc_sep_4_scaling": "throughput of 4 jobs / 1 job (separate dirs)",
    "conc_one_2_scaling": "throughput of 2 jobs / 1 job (one dir)",
    "conc_one_4_scaling": "throughput of 4 jobs / 1 job (one dir)",
    "mem_walk": "stat-walk of the memory tree (time)",
    "mem_peak": "daemon peak RSS (VmHWM) after the walk",
    "mem_rss_walk": "daemon RSS right after the walk",
    "mem_rss_forget": "daemon RSS after `echo 2 > drop_caches` (the kernel forgets the inodes)",
    "diff": "`layerfs diff` of a large upper; kernel column: naive full walk of both merged views (python over 2 kernel overlay mounts)",
}


def fnum(v):
    if v is None:
        return "-"
    a = abs(v)
    if a >= 1000:
        return f"{v:.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 10:
        return f"{v:.2f}"
    return f"{v:.3f}"


def close(w, a, b):
    """tar's output size depends on readdir order (which name of a hard-link
    group is stored in full, long names taking extra blocks): allow 1%."""
    if not w.startswith("read_tar"):
        return False
    try:
        a, b = float(a), float(b)
    except ValueError:
        return False
    return abs(a - b) <= 0.01 * max(a, b)


def main():
    out = sys.argv[1]
    info = {}
    with open(os.path.join(out, "bench-info.txt")) as f:
        for line in f:
            if "=" in line:
                k, v = line.rstrip("\n").split("=", 1)
                info[k] = v
    impls = info.get("impls", "").split(",")
    labels = {i: info.get(f"label.{i}", i) for i in impls}
    with open(os.path.join(out, "bench-raw.csv")) as f:
        rows = list(csv.DictReader(f))
    for r in rows:  # e.g. the naive diff baseline is in the kernel column
        if r["impl"] not in impls:
            impls.insert(0, r["impl"]) if r["impl"] == "kernel" else impls.append(r["impl"])
            labels[r["impl"]] = r["impl"]

    order, meta = [], {}
    runs = {}
    for r in rows:
        w = r["workload"]
        if w not in meta:
            order.append(w)
            meta[w] = (r["unit"], r["better"])
        runs.setdefault((w, r["impl"]), []).append(r)

    res = {}  # (w, impl) -> dict
    for (w, impl), rs in runs.items():
        ok = [float(r["value"]) for r in rs if r["status"] == "ok" and r["value"] != ""]
        bad = [r for r in rs if r["status"] != "ok"]
        checks = sorted({r["check"] for r in rs if r["status"] == "ok"})
        res[(w, impl)] = {
            "median": statistics.median(ok) if ok else None,
            "values": ok, "n_ok": len(ok), "n": len(rs),
            "status": "ok" if not bad else (bad[0]["status"] if not ok else "partial"),
            "msg": "; ".join(sorted({f"rep {r['rep']}: {r['status']}: {r['msg']}" for r in bad})),
            "check": "|".join(checks),
        }

    # derived: scaling of the concurrent jobs (N * t(1 job) / t(N jobs))
    for name, n in (("conc_sep_2", 2), ("conc_sep_4", 4), ("conc_one_2", 2), ("conc_one_4", 4)):
        if name not in meta or "conc_1" not in meta:
            continue
        d = name + "_scaling"
        meta[d] = ("x", "higher")
        for impl in impls:
            a, b = res.get(("conc_1", impl)), res.get((name, impl))
            v = None
            if a and b and a["median"] and b["median"]:
                v = n * a["median"] / b["median"]
            res[(d, impl)] = {"median": v, "values": [], "n_ok": 1 if v else 0, "n": 1,
                              "status": "ok" if v else "n/a", "msg": "", "check": ""}
    # put the scaling rows after the last conc row
    derived = [d for d in ("conc_sep_2_scaling", "conc_sep_4_scaling", "conc_one_2_scaling", "conc_one_4_scaling") if d in meta]
    if derived:
        last = max(i for i, w in enumerate(order) if w.startswith("conc_"))
        order = order[:last + 1] + derived + order[last + 1:]

    # the baseline: the kernel, or the first kernel variant (kernel+OPTS)
    base = "kernel" if "kernel" in impls else next((i for i in impls if i.startswith("kernel")), None)
    notes = []
    table = []  # (w, unit, better, [cells])
    for w in order:
        unit, better = meta[w]
        kern = res.get((w, base))
        kmed = kern["median"] if kern else None
        cells, ratios = [], {}
        for impl in impls:
            r = res.get((w, impl))
            if r is None:
                cells.append("n/a")
                continue
            ratio = None
            if r["median"] is not None and kmed:
                ratio = r["median"] / kmed
            ratios[impl] = ratio
            r["ratio"] = ratio
            if r["median"] is None:
                cells.append(r["status"].upper() if r["status"] != "n/a" else "n/a")
            else:
                c = fnum(r["median"])
                if ratio is not None and impl != base:
                    c += f" ({ratio:.2f}x)"
                if r["status"] == "partial":
                    c += " !"
                cells.append(c)
            if r["msg"]:
                notes.append(f"{w} / {labels.get(impl, impl)}: {r['msg']}")
            if (kern and impl != base and r["check"] and kern["check"] and r["check"] != kern["check"]
                    and w not in ("diff", "mem_rss_forget") and not close(w, r["check"], kern["check"])):
                notes.append(f"{w} / {labels.get(impl, impl)}: result differs from the kernel's "
                             f"(check {r['check']} vs {kern['check']})")
        table.append((w, unit, better, cells))

    # CSV
    with open(os.path.join(out, "bench-results.csv"), "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["workload", "unit", "better", "impl", "impl_label", "median", "ratio_to_kernel",
                     "runs_ok", "runs", "values", "status", "check", "note"])
        for w in order:
            unit, better = meta[w]
            for impl in impls:
                r = res.get((w, impl))
                if r is None:
                    continue
                ratio = r.get("ratio")
                wr.writerow([w, unit, better, impl, labels.get(impl, impl),
                             "" if r["median"] is None else f"{r['median']:.6g}",
                             "" if ratio is None else f"{ratio:.4f}",
                             r["n_ok"], r["n"], " ".join(f"{v:.6g}" for v in r["values"]),
                             r["status"], r["check"], r["msg"]])

    # text table
    heads = ["workload", "unit", "better"] + [labels.get(i, i) for i in impls]
    body = [[w, u, "lower" if b == "lower" else "higher"] + cells for (w, u, b, cells) in table]
    widths = [max(len(x) for x in col) for col in zip(heads, *body)]
    machine = (f"{info.get('date', '')} | {info.get('host_cpu', '')} | nproc {info.get('nproc', '')} | "
               f"kernel {info.get('kernel', '')} | mode {info.get('mode', '')} | reps {info.get('reps', '')}")
    lines = [machine, "  ".join(h.ljust(wd) for h, wd in zip(heads, widths)),
             "  ".join("-" * wd for wd in widths)]
    for row in body:
        lines.append("  ".join(c.ljust(wd) for c, wd in zip(row, widths)))
    print("\n".join(lines))
    print("(cells: median, then the ratio to the kernel's median; for s/MiB lower is better, "
          "for MiB/s, IOPS and x higher is better)")
    if notes:
        print("\nNotes:")
        for n in notes:
            print("  - " + n)

    # markdown
    md = []
    md.append(f"## Benchmark: layerfs vs kernel overlayfs vs fuse-overlayfs ({info.get('mode', '')} mode)\n")
    md.append(f"- date: {info.get('date', '')}")
    md.append(f"- machine: {info.get('host_cpu', '')}, {info.get('nproc', '')} cores, "
              f"{info.get('mem', '')} RAM, kernel {info.get('kernel', '')}, "
              f"{info.get('os', '')}; layers on {info.get('fs', '')}")
    md.append(f"- load average at start / end: {info.get('load_start', '')} / {info.get('load_end', '')}")
    md.append(f"- repetitions: {info.get('reps', '')} (median shown); a fresh mount with a fresh "
              "upper/work dir for every run; implementations interleaved per workload")
    md.append(f"- layer set: {info.get('dataset', '')}")
    for impl in impls:
        md.append(f"- {labels.get(impl, impl)}: {info.get(f'version.{impl}', '')}")
    for k in sorted(info):
        if k.startswith("skipped."):
            md.append(f"- not measured: {k[8:]}: {info[k]}")
    md.append("")
    md.append("Cells: median, then (ratio to the kernel). Time (s) and memory (MiB): lower is better; "
              "MiB/s, IOPS and scaling (x): higher is better.\n")
    md.append("| workload | unit | " + " | ".join(labels.get(i, i) for i in impls) + " |")
    md.append("| --- | --- | " + " | ".join("---:" for _ in impls) + " |")
    for (w, u, b, cells) in table:
        md.append(f"| {w} | {u} | " + " | ".join(cells) + " |")
    md.append("\nWorkloads:\n")
    for w in order:
        if w in DESC:
            md.append(f"- `{w}`: {DESC[w]}")
    if notes:
        md.append("\nNotes:\n")
        for n in notes:
            md.append(f"- {n}")
    with open(os.path.join(out, "bench-results.md"), "w") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
