#!/usr/bin/env python3
"""First figures of protocol v4, each as a ratio to a baseline measured in the same run.

    python3 benches/scripts/v4_basics.py [--runs 3] [--small 20000] [--workdir DIR]

Needs release binaries (cargo build --release -p cyberbackup-server -p cyberbackup-client).
Measures, on the same disk as the working directory:
  - dd of 1 GiB with oflag=direct and with conv=fdatasync (write), and dd iflag=direct
    reading it back;
  - v4 backup of one 1 GiB random file (first backup), its restore, and the second,
    unchanged backup (time and bytes sent);
  - v4 backup of a tree of N small files (1-16 KiB, random);
  - the v3 CLI uploading the same 1 GiB file and the same small files;
  - the server's CPU seconds (user + system, from /proc) per GiB ingested over v4.
Each figure is the median of --runs runs. Prints a Markdown table.
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVER = os.path.join(ROOT, "target/release/cyberbackup-server")
CLI = os.path.join(ROOT, "target/release/cyberbackup")
GIB = 1 << 30
TICK = os.sysconf("SC_CLK_TCK")


def cpu_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / TICK


class Server:
    def __init__(self, base):
        self.dir = base
        os.makedirs(base, exist_ok=True)
        self.log = open(os.path.join(base, "server.log"), "a")
        self.p = subprocess.Popen(
            [SERVER, "--bind", "127.0.0.1", "--port", "0", "--admin-listen", "127.0.0.1:0", "--log", "warn"],
            cwd=base, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.p.stdout.readline()
        self.addr = line.strip().rsplit(" ", 1)[-1]

    def cpu(self):
        return cpu_of(self.p.pid)

    def stop(self):
        self.p.terminate()
        self.p.wait(timeout=60)


def timed(cmd, env=None, cwd=None):
    """Runs cmd; returns (seconds, child CPU seconds, stdout)."""
    before = os.times()
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    after = os.times()
    if out.returncode != 0:
        sys.exit(f"{cmd[:4]} failed ({out.returncode}): {out.stderr[-2000:]}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return dt, cpu, out.stdout


def dd(args):
    t0 = time.perf_counter()
    subprocess.run(["dd", *args], check=True, capture_output=True)
    return time.perf_counter() - t0


def drop_caches():
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--small", type=int, default=20000)
    ap.add_argument("--workdir", default=os.path.join(ROOT, "target/v4-basics"))
    a = ap.parse_args()
    for b in (SERVER, CLI):
        if not os.path.exists(b):
            sys.exit(f"missing {b}: cargo build --release -p cyberbackup-server -p cyberbackup-client")
    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir)
    w = a.workdir
    big = os.path.join(w, "big.bin")
    with open(big, "wb") as f:
        rnd = random.Random(1)
        for _ in range(1024):
            f.write(rnd.randbytes(1 << 20))
    small = os.path.join(w, "small")
    rnd = random.Random(2)
    for i in range(a.small):
        d = os.path.join(small, f"d{i // 500:03d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:05d}.txt"), "wb") as f:
            f.write(rnd.randbytes(rnd.randint(1024, 16 * 1024)))
    small_files = sorted(os.path.join(dp, n) for dp, _, ns in os.walk(small) for n in ns)
    small_bytes = sum(os.path.getsize(p) for p in small_files)

    R = {k: [] for k in ["dd_direct", "dd_fdatasync", "dd_read", "v4_big", "v4_big_cpu_client",
                         "v4_big_cpu_server", "v4_restore", "v4_again", "v4_again_bytes",
                         "v4_small", "v4_small_cpu_server", "v3_big", "v3_small"]}
    for run in range(a.runs):
        out = os.path.join(w, "dd.out")
        R["dd_direct"].append(dd(["if=/dev/zero", f"of={out}", "bs=1M", "count=1024", "oflag=direct"]))
        os.remove(out)
        R["dd_fdatasync"].append(dd(["if=/dev/zero", f"of={out}", "bs=1M", "count=1024", "conv=fdatasync"]))
        os.remove(out)
        drop_caches()
        R["dd_read"].append(dd([f"if={big}", "of=/dev/null", "bs=1M", "iflag=direct"]))

        base = os.path.join(w, f"server{run}")
        srv = Server(base)
        cfg = tempfile.mkdtemp(dir=w)
        env = dict(os.environ, CYBERBACKUP_CONFIG_DIR=cfg, CYBERBACKUP_PASSWORD="bench",
                   CYBERBACKUP_PROTOCOL="4")
        timed([CLI, "init", "-s", srv.addr, "-a", f"bench{run}"], env)
        c0 = srv.cpu()
        dt, cpu, o = timed([CLI, "--json", "backup", big], env)
        R["v4_big"].append(dt)
        R["v4_big_cpu_client"].append(cpu)
        R["v4_big_cpu_server"].append(srv.cpu() - c0)
        dt, _, o = timed([CLI, "--json", "backup", big], env)
        R["v4_again"].append(dt)
        R["v4_again_bytes"].append(json.loads(o.strip().splitlines()[-1])["bytes_sent"])
        target = os.path.join(w, f"restore{run}")
        dt, _, _ = timed([CLI, "restore", "latest", "--target", target], env)
        R["v4_restore"].append(dt)
        shutil.rmtree(target)
        c0 = srv.cpu()
        dt, _, _ = timed([CLI, "--json", "backup", small], env)
        R["v4_small"].append(dt)
        R["v4_small_cpu_server"].append(srv.cpu() - c0)
        # v3: the same data through the v3 CLI (its own identity file).
        v3dir = tempfile.mkdtemp(dir=w)
        env3 = dict(os.environ, CYBERBACKUP_PROTOCOL="3")
        dt, _, _ = timed([CLI, "backup", "--server", srv.addr, "--user", f"v3bench{run}", "-q", big],
                         env3, cwd=v3dir)
        R["v3_big"].append(dt)
        dt, _, _ = timed([CLI, "backup", "--server", srv.addr, "-q", *small_files], env3, cwd=v3dir)
        R["v3_small"].append(dt)
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)

    m = {k: statistics.median(v) for k, v in R.items()}
    gib = lambda s: 1.0 / s  # GiB/s for 1 GiB
    print(f"# v4 first figures ({a.runs} runs, medians; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n")
    print(f"Machine: {os.cpu_count()} CPUs; working directory {w}\n")
    print("| figure | value | ratio |")
    print("|---|---|---|")
    print(f"| dd 1 GiB oflag=direct | {gib(m['dd_direct']):.2f} GiB/s | baseline |")
    print(f"| dd 1 GiB conv=fdatasync | {gib(m['dd_fdatasync']):.2f} GiB/s | baseline |")
    print(f"| dd 1 GiB iflag=direct read | {gib(m['dd_read']):.2f} GiB/s | baseline |")
    print(f"| v4 backup, 1 GiB random file | {gib(m['v4_big']):.2f} GiB/s | {m['dd_direct'] / m['v4_big']:.2f}x dd direct, {m['dd_fdatasync'] / m['v4_big']:.2f}x dd fdatasync, {m['v3_big'] / m['v4_big']:.2f}x v3 CLI |")
    print(f"| v3 CLI upload, same file | {gib(m['v3_big']):.2f} GiB/s | |")
    print(f"| v4 client CPU per GiB (1 GiB file) | {m['v4_big_cpu_client']:.2f} core-s | |")
    print(f"| v4 server CPU per GiB (1 GiB file) | {m['v4_big_cpu_server']:.2f} core-s | |")
    print(f"| v4 restore, 1 GiB | {gib(m['v4_restore']):.2f} GiB/s | {m['dd_read'] / m['v4_restore']:.2f}x dd read |")
    print(f"| v4 second backup, unchanged 1 GiB | {m['v4_again']:.3f} s, {int(m['v4_again_bytes'])} bytes sent | {m['v4_big'] / m['v4_again']:.0f}x faster than the first |")
    print(f"| v4 backup, {a.small} small files ({small_bytes / 2**20:.0f} MiB) | {a.small / m['v4_small']:.0f} files/s | {m['v3_small'] / m['v4_small']:.2f}x v3 CLI |")
    print(f"| v3 CLI upload, same small files | {a.small / m['v3_small']:.0f} files/s | |")
    print(f"| v4 server CPU, small files | {m['v4_small_cpu_server']:.2f} core-s for {small_bytes / 2**20:.0f} MiB | |")
    print("\nRaw runs:", json.dumps(R))


if __name__ == "__main__":
    main()
