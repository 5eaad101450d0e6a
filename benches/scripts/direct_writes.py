#!/usr/bin/env python3
"""Direct writes through the shard's own io_uring ring (`storage::ring`) against the
writer threads, on the case the ring is for: large v3 uploads written with O_DIRECT.

    python3 benches/scripts/direct_writes.py [--runs 5] [--duration 10] [--out FILE]

Builds the release server and load generator (in $CARGO_TARGET_DIR when set, else
target/), then alternates the two modes, `--runs` times each, on each scenario:

  s2: 64 connections x 16 MiB files, closed loop (scenario 2 of suite.py);
  s1: 1 connection x 1 GiB files, two files (scenario 1).

Each run is a fresh glommio server (after a `sync`) in a temporary directory, as in
suite.py (whose Server and congestion-control choice this reuses). The mode is the
server's `--direct-writes ring|threads` flag when it has one, else the environment
variable CYBERBACKUP_DIRECT_WRITES=threads (unset for ring). Per run: MB/s of the
measured window, and server CPU seconds (utime + stime of /proc/PID/stat over the whole
load-generator run) per GiB acknowledged in it. On this noisy 2-CPU VM the CPU per GiB
is the steadier figure; both are compared on the medians. The `direct-writer-*`
threads the server started are counted after each run, to show which path ran (ring
runs start them only when a ring is full).

Prints a Markdown report; `--out FILE.md` also writes it there, and FILE.json.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import suite  # noqa: E402

ROOT = suite.ROOT
TARGET = os.path.abspath(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"))
suite.REL = os.path.join(TARGET, "release")

SCENARIOS = {
    "s2_64x16MiB": ["-c", "64", "--size", "16MiB", "--warmup", "1"],
    "s1_1x1GiB": ["-c", "1", "--size", "1GiB", "-n", "2", "--warmup", "0"],
}


def has_flag():
    out = subprocess.run([os.path.join(suite.REL, "cyberbackup-server"), "--help"],
                         capture_output=True, text=True).stdout
    return "--direct-writes" in out


def writer_threads(pid):
    n = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            if open(f"/proc/{pid}/task/{t}/comm").read().startswith("direct-writer"):
                n += 1
        except OSError:
            pass
    return n


def one(mode, args, flag):
    extra = ["--direct-writes", mode] if flag else []
    old = os.environ.pop("CYBERBACKUP_DIRECT_WRITES", None)
    if not flag and mode == "threads":
        os.environ["CYBERBACKUP_DIRECT_WRITES"] = "threads"
    try:
        s = suite.Server("glommio", extra)
    finally:
        os.environ.pop("CYBERBACKUP_DIRECT_WRITES", None)
        if old is not None:
            os.environ["CYBERBACKUP_DIRECT_WRITES"] = old
    cc = ["--congestion", suite.CONGESTION] if suite.CONGESTION else []
    try:
        u0, s0 = s.cpu_split()
        out = subprocess.run([os.path.join(suite.REL, "cyberbackup-loadgen"), "-s", s.addr, "--json", "-q",
                              *cc, *args], capture_output=True, text=True)
        u1, s1 = s.cpu_split()
        writers = writer_threads(s.p.pid)
        if out.returncode != 0:
            raise RuntimeError(f"loadgen failed: {out.stderr[-2000:]}")
        rep = json.loads(out.stdout)
    finally:
        s.stop()
    gib = rep["all_acked_bytes"] / (1 << 30)
    cpu = (u1 - u0) + (s1 - s0)
    return {"mode": mode, "mb_per_sec": rep["mb_per_sec"], "acked_gib": gib, "cpu_s": cpu,
            "user_s": u1 - u0, "system_s": s1 - s0, "cpu_s_per_gib": cpu / gib if gib else None,
            "errors": rep.get("errors"), "writer_threads": writers}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5, help="runs per mode and scenario")
    ap.add_argument("--duration", default="10", help="measured seconds of s2")
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="default: all")
    ap.add_argument("--out")
    a = ap.parse_args()
    out = os.path.abspath(a.out) if a.out else None
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "cyberbackup-server", "-p", "cyberbackup-loadgen"],
                   cwd=ROOT, check=True)
    flag = has_flag()
    # The servers' defaults relative to the working directory (the v4 repository)
    # land in a scratch directory, not in the tree.
    scratch = tempfile.mkdtemp(prefix="cb-direct-writes-")
    os.chdir(scratch)
    res = {"switch": "--direct-writes" if flag else "CYBERBACKUP_DIRECT_WRITES", "scenarios": {}}
    try:
        for name in a.scenario or list(SCENARIOS):
            args = SCENARIOS[name] + (["-d", a.duration] if "-n" not in SCENARIOS[name] else [])
            runs = res["scenarios"][name] = []
            for i in range(a.runs):
                # Alternate which mode goes first, so neither always follows the other.
                for mode in (("ring", "threads") if i % 2 == 0 else ("threads", "ring")):
                    print(f"{name} run {i + 1}/{a.runs}: {mode}...", file=sys.stderr)
                    runs.append(one(mode, args, flag))
    finally:
        suite.purge_retired()
        os.chdir(ROOT)
        shutil.rmtree(scratch, ignore_errors=True)
    md = ["# Direct writes: ring against writer threads", "",
          f"`python3 benches/scripts/direct_writes.py --runs {a.runs} --duration {a.duration}`; "
          f"mode switched with {res['switch']}; glommio runtime; "
          f"{os.cpu_count()} CPUs, kernel {os.uname().release}.", "",
          "| scenario | mode | MB/s | core-s/GiB | user | system | direct-writer threads |", "|---|---|---|---|---|---|---|"]
    summary = {}
    for name, runs in res["scenarios"].items():
        for x in runs:
            g = x["acked_gib"] or 1
            md.append(f"| {name} | {x['mode']} | {x['mb_per_sec']:.1f} | {x['cpu_s_per_gib']:.3f} | "
                      f"{x['user_s'] / g:.3f} | {x['system_s'] / g:.3f} | {x['writer_threads']} |")
        med = {m: {k: statistics.median(x[k] for x in runs if x["mode"] == m) for k in ("mb_per_sec", "cpu_s_per_gib")}
               for m in ("ring", "threads")}
        summary[name] = {"median": med,
                         "ring_vs_threads_mb_per_sec": med["ring"]["mb_per_sec"] / med["threads"]["mb_per_sec"],
                         "ring_vs_threads_cpu_per_gib": med["ring"]["cpu_s_per_gib"] / med["threads"]["cpu_s_per_gib"]}
    res["summary"] = summary
    md += ["", "| scenario | median MB/s ring | threads | ratio | median core-s/GiB ring | threads | ratio |",
           "|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        r, t = s["median"]["ring"], s["median"]["threads"]
        md.append(f"| {name} | {r['mb_per_sec']:.1f} | {t['mb_per_sec']:.1f} | {s['ring_vs_threads_mb_per_sec']:.3f} | "
                  f"{r['cpu_s_per_gib']:.3f} | {t['cpu_s_per_gib']:.3f} | {s['ring_vs_threads_cpu_per_gib']:.3f} |")
    text = "\n".join(md) + "\n"
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
        with open(os.path.splitext(out)[0] + ".json", "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
