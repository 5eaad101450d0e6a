#!/usr/bin/env python3
"""CyberBackup v4 against restic, borg, sftp and dd on the same data in one run (issue 21).

    python3 benches/scripts/peers.py [--scale 1] [--runs 3] [--only 1,2,3,4,5,6]
                                     [--tools cyberbackup,restic,borg,sftp]
                                     [--workdir DIR] [--out FILE.md] [--keep]

Installs nothing. Needs, and names what is missing of: release binaries
(cargo build --release -p cyberbackup-server -p cyberbackup-client -p cyberbackup-loadgen;
CARGO_TARGET_DIR is honoured), restic, rclone, borg, sshd + sftp + ssh-keygen
(openssh-server), dd.
On Debian: apt-get install restic rclone borgbackup openssh-server.

Workloads (made here from fixed seeds, in --workdir, on the disk being measured):
  1. one 1 GiB random file, first backup;
  2. a tree of about 2 GiB: 20,000 files of 1-64 KiB, 200 of 1-10 MiB, 4 of 256 MiB,
     nested directories, about a third of the small and a fifth of the medium files
     compressible text; first backup;
  3. the same tree backed up again unchanged; then again with 1% of its files changed
     (4 KiB overwritten at a seeded offset, the whole file when smaller);
  4. restore of (2)'s snapshot into an empty directory; restore of one 256 MiB file;
  5. 16 clients backing up their own trees at once, each 16 random files of 4 MiB (64 MiB a
     client, 1 GiB in all): CyberBackup through the load generator's v4 mode
     (`cyberbackup-loadgen --mode v4-backup -c 16 --files-per-snapshot 16 -n 16`, one
     snapshot a client, its content made in memory, no disk read); restic as 16 `restic
     backup` processes to one `rclone serve restic` repository; borg as 16 `borg create`
     processes, each to a repository of its own (borg locks a repository); sftp as 16
     sessions putting a tree each. The peers read 16 trees of the same shape generated
     on disk (one seed a client). An error in any client, the generator's included,
     fails the run;
  6. a tree of 1,000,000 empty and tiny (1-100 byte) files, 1,000 a directory: first
     backup, time and client peak RSS.
--scale F multiplies every file count and the sizes of the 1 GiB and 256 MiB files by F
(the 1-64 KiB and 1-10 MiB size ranges stay), so each workload's bytes scale by about F;
in (5) the 16 clients and their 16 files each stay, and the 4 MiB file size is scaled
(at least 64 KiB).

Every figure is the median of --runs runs (tools in a rotated order each run). Before
each measured command: sync, then drop the page cache when /proc/sys/vm/drop_caches can
be written (the report says whether it could). Each tool gets a fresh repository (and a
fresh server where it has one) per scenario and run.

Measured per command: wall time; client CPU (user + system of the child and its waited
children, from os.wait4); client peak RSS (ru_maxrss); server CPU (user + system from
/proc/PID/stat, before and after) for cyberbackup-server and `rclone serve restic`;
bytes sent where the tool says (CyberBackup's --json `bytes_sent`, restic's --json
summary `data_added`, borg's --json `deduplicated_size`, which is bytes added to its
local repository). In (5), wall is from the first client's start to the last one's
exit, client CPU and peak RSS are summed over the 16 processes (the load generator is
one process), and each client's own wall (the generator: its snapshot latency) is given
as p50 and max.

Writes Markdown (--out, default benches/results/latest.md, the report this repository
keeps; `--out -` for standard output) and JSON next to it (FILE.json, e.g. latest.json).
"""
import argparse
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
SERVER = os.path.join(TARGET, "release/cyberbackup-server")
CLI = os.path.join(TARGET, "release/cyberbackup")
LOADGEN = os.path.join(TARGET, "release/cyberbackup-loadgen")
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
TICK = os.sysconf("SC_CLK_TCK")
PASSWORD = "peers-bench-passphrase"
SSH_CIPHER = "aes256-gcm@openssh.com"
ALL_TOOLS = ["cyberbackup", "restic", "borg", "sftp"]
CLIENTS, CLIENT_FILES, CLIENT_FILE_BYTES = 16, 16, 4 * MIB  # scenario 5, at scale 1
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at "
         "which but have an they you were her she there been one all we their has would when if "
         "backup server client chunk snapshot restore repository encrypted storage network file "
         "directory archive compression index manifest session window throughput latency").split()


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- measuring

def proc_cpu(pid):
    """User + system CPU seconds of a running process (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / TICK
    except OSError:
        return 0.0


DROP_CACHES = {"tried": False, "ok": False, "error": None}


def settle():
    """sync, then drop the page cache when allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        DROP_CACHES["ok"] = True
    except OSError as e:
        DROP_CACHES["error"] = str(e)
    DROP_CACHES["tried"] = True


class Failed(Exception):
    pass


def measure(cmd, env=None, cwd=None, servers=(), scratch=None, ok_codes=(0,), stdin=None):
    """Runs cmd after settle(); returns wall, client CPU, peak RSS, server CPU, stdout."""
    settle()
    s0 = sum(proc_cpu(p) for p in servers)
    out_path = os.path.join(scratch, "cmd.out")
    err_path = os.path.join(scratch, "cmd.err")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err,
                             stdin=stdin if stdin is not None else subprocess.DEVNULL)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
    s1 = sum(proc_cpu(p) for p in servers)
    with open(out_path, errors="replace") as f:
        stdout = f.read()
    with open(err_path, errors="replace") as f:
        stderr = f.read()
    if p.returncode not in ok_codes:
        raise Failed(f"{' '.join(map(str, cmd[:6]))} exited {p.returncode}: {stderr[-1500:]}")
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_kib": ru.ru_maxrss,
            "server_cpu": (s1 - s0) if servers else None, "stdout": stdout}


def measure_many(jobs, servers=(), scratch=None, ok_codes=(0,)):
    """Runs jobs (dicts of cmd, env, cwd) all at once after settle(); returns the wall from
    the first start to the last exit, their client CPU and peak RSS summed, each one's own
    wall (client_p50, client_max), server CPU and each one's stdout (stdouts). Fails, naming
    every job that failed, once all have ended."""
    settle()
    s0 = sum(proc_cpu(p) for p in servers)
    procs, files = [], []
    ended = [None] * len(jobs)

    def reap(i, began, p):
        _, status, ru = os.wait4(p.pid, 0)
        now = time.perf_counter()
        p.returncode = os.waitstatus_to_exitcode(status)
        ended[i] = (now - began, now, ru)

    t0 = time.perf_counter()
    try:
        for i, j in enumerate(jobs):
            out = open(os.path.join(scratch, f"cmd{i:02d}.out"), "wb")
            err = open(os.path.join(scratch, f"cmd{i:02d}.err"), "wb")
            files += [out, err]
            began = time.perf_counter()
            procs.append((began, subprocess.Popen(j["cmd"], env=j.get("env"), cwd=j.get("cwd"), stdout=out,
                                                  stderr=err, stdin=subprocess.DEVNULL)))
    except BaseException:
        for _, p in procs:
            p.kill()
            p.wait()
        raise
    finally:
        for f in files:
            f.close()
    waiters = [threading.Thread(target=reap, args=(i, b, p)) for i, (b, p) in enumerate(procs)]
    for t in waiters:
        t.start()
    for t in waiters:
        t.join()
    s1 = sum(proc_cpu(p) for p in servers)
    stdouts, stderrs, bad = [], [], []
    for i, (_, p) in enumerate(procs):
        with open(os.path.join(scratch, f"cmd{i:02d}.out"), errors="replace") as f:
            stdouts.append(f.read())
        with open(os.path.join(scratch, f"cmd{i:02d}.err"), errors="replace") as f:
            stderrs.append(f.read())
        if p.returncode not in ok_codes:
            bad.append(f"[{i}] {' '.join(map(str, jobs[i]['cmd'][:6]))} exited {p.returncode}: {stderrs[-1][-600:]}")
    if bad:
        raise Failed(f"{len(bad)} of {len(jobs)} concurrent commands failed:\n" + "\n".join(bad[:4]))
    walls = [e[0] for e in ended]
    return {"wall": max(e[1] for e in ended) - t0, "cpu": sum(e[2].ru_utime + e[2].ru_stime for e in ended),
            "rss_kib": sum(e[2].ru_maxrss for e in ended), "server_cpu": (s1 - s0) if servers else None,
            "client_p50": statistics.median(walls), "client_max": max(walls), "stdouts": stdouts,
            "stderrs": stderrs, "codes": [p.returncode for _, p in procs]}


def run_all(cmds, env=None):
    """Runs commands at once, unmeasured (set-up); fails when any fails."""
    ps = [subprocess.Popen(c, env=env(i) if env else None, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           stdin=subprocess.DEVNULL, text=True) for i, c in enumerate(cmds)]
    errs = [(c, p.communicate()[1]) for c, p in zip(cmds, ps)]
    errs = [(c, p.returncode, e) for (c, e), p in zip(errs, ps)]
    bad = [f"{' '.join(map(str, c[:6]))} exited {rc}: {e[-600:]}" for c, rc, e in errs if rc != 0]
    if bad:
        raise Failed("\n".join(bad[:4]))


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise Failed(f"{' '.join(map(str, cmd[:6]))} exited {r.returncode}: {r.stderr[-1500:]}")
    return r.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise Failed(f"server exited {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise Failed(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def stop(proc):
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rmtree(p):
    shutil.rmtree(p, ignore_errors=True)


def last_json(stdout, pred):
    for line in reversed(stdout.strip().splitlines()):
        try:
            o = json.loads(line)
        except ValueError:
            continue
        if pred(o):
            return o
    return None


# ---------------------------------------------------------------- workloads

def write_random(path, size, rnd):
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, 4 * MIB)
            f.write(rnd.randbytes(n))
            left -= n


def text_bytes(size, rnd):
    out, n = [], 0
    while n < size:
        line = " ".join(rnd.choices(WORDS, k=12)) + "\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


def write_text(path, size, rnd):
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, 4 * MIB)
            f.write(text_bytes(n, rnd))
            left -= n


def gen_big(w, scale):
    path = os.path.join(w, "big.bin")
    size = max(MIB, int(GIB * scale) // MIB * MIB)
    if not (os.path.exists(path) and os.path.getsize(path) == size):
        write_random(path, size, random.Random(1))
    return {"path": path, "bytes": size, "files": 1}


def gen_tree(w, scale):
    root = os.path.join(w, "tree")
    marker = os.path.join(w, f"tree.done.{scale}")
    n_small, n_mid = max(1, round(20000 * scale)), max(1, round(200 * scale))
    large = max(MIB, int(256 * MIB * scale) // MIB * MIB)
    if not os.path.exists(marker):
        rmtree(root)
        rnd = random.Random(2)
        for i in range(n_small):
            d = os.path.join(root, "small", f"a{i % 20:02d}", f"b{(i // 20) % 25:02d}", f"c{i // 500:03d}")
            os.makedirs(d, exist_ok=True)
            size = rnd.randint(KIB, 64 * KIB)
            if rnd.random() < 0.33:
                write_text(os.path.join(d, f"f{i:05d}.txt"), size, rnd)
            else:
                write_random(os.path.join(d, f"f{i:05d}.bin"), size, rnd)
        for i in range(n_mid):
            d = os.path.join(root, "medium", f"m{i % 10}")
            os.makedirs(d, exist_ok=True)
            size = rnd.randint(MIB, 10 * MIB)
            if rnd.random() < 0.2:
                write_text(os.path.join(d, f"m{i:03d}.log"), size, rnd)
            else:
                write_random(os.path.join(d, f"m{i:03d}.dat"), size, rnd)
        os.makedirs(os.path.join(root, "large"), exist_ok=True)
        for i in range(4):
            write_random(os.path.join(root, "large", f"l{i}.img"), large, rnd)
        open(marker, "w").close()
    files = sorted(os.path.join(dp, n) for dp, _, ns in os.walk(root) for n in ns)
    return {"path": root, "files": len(files), "bytes": sum(os.path.getsize(p) for p in files),
            "file_list": files, "one_file": os.path.join(root, "large", "l0.img"), "one_bytes": large,
            "small": n_small, "medium": n_mid, "large_bytes": large}


def gen_many(w, scale):
    root = os.path.join(w, "many")
    marker = os.path.join(w, f"many.done.{scale}")
    n = max(1, round(1_000_000 * scale))
    t0 = time.perf_counter()
    if not os.path.exists(marker):
        rmtree(root)
        rnd = random.Random(6)
        for i in range(n):
            if i % 1000 == 0:
                d = os.path.join(root, f"g{i // 100000:02d}", f"d{i // 1000:04d}")
                os.makedirs(d, exist_ok=True)
            fd = os.open(os.path.join(d, f"f{i:07d}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            if i % 2:
                os.write(fd, rnd.randbytes(rnd.randint(1, 100)))
            os.close(fd)
        open(marker, "w").close()
    gen_s = time.perf_counter() - t0
    total = 0
    for dp, _, ns in os.walk(root):
        for name in ns:
            total += os.stat(os.path.join(dp, name)).st_size
    return {"path": root, "files": n, "bytes": total, "generate_s": gen_s}


def gen_clients(w, scale):
    """Scenario 5's trees for restic, borg and sftp: CLIENTS directories of CLIENT_FILES
    random files, one seed a client (the load generator makes the same shape in memory)."""
    root = os.path.join(w, "clients")
    size = max(64 * KIB, int(CLIENT_FILE_BYTES * scale) // KIB * KIB)
    marker = os.path.join(w, f"clients.done.{scale}")
    trees = [f"clients/c{c:02d}" for c in range(CLIENTS)]
    if not os.path.exists(marker):
        rmtree(root)
        for c, t in enumerate(trees):
            rnd = random.Random(500 + c)
            os.makedirs(os.path.join(w, t))
            for i in range(CLIENT_FILES):
                write_random(os.path.join(w, t, f"f{i:02d}.bin"), size, rnd)
        open(marker, "w").close()
    return {"path": root, "trees": trees, "clients": CLIENTS, "files_per_client": CLIENT_FILES,
            "file_bytes": size, "client_bytes": CLIENT_FILES * size, "files": CLIENTS * CLIENT_FILES,
            "bytes": CLIENTS * CLIENT_FILES * size}


class Change:
    """Overwrites 4 KiB (or the whole file) of 1% of the tree's files; revert() undoes it."""

    def __init__(self, tree):
        rnd = random.Random(3)
        files = tree["file_list"]
        self.picked = sorted(rnd.sample(files, max(1, round(len(files) / 100))))
        self.saved, self.plan = [], []
        for p in self.picked:
            size = os.path.getsize(p)
            n = min(size, 4 * KIB)
            off = rnd.randint(0, size - n)
            self.plan.append((p, off, rnd.randbytes(n)))
        self.bytes_changed = sum(len(b) for _, _, b in self.plan)
        self.files_bytes = sum(os.path.getsize(p) for p in self.picked)

    def apply(self):
        self.saved = []
        for p, off, data in self.plan:
            st = os.stat(p)
            with open(p, "r+b") as f:
                f.seek(off)
                self.saved.append((p, off, f.read(len(data)), st.st_atime_ns, st.st_mtime_ns))
                f.seek(off)
                f.write(data)

    def revert(self):
        for p, off, data, at, mt in self.saved:
            with open(p, "r+b") as f:
                f.seek(off)
                f.write(data)
            os.utime(p, ns=(at, mt))
        self.saved = []


# ---------------------------------------------------------------- the tools
# Each tool: start(base) -> sets up a fresh repository (and server); backup(path, label,
# kind) -> measurement with "bytes_sent" and "snap"; restore(snap, target, one=None);
# many(clients) -> scenario 5's measurement (16 clients at once; start(base, init=False)
# before it); stop(). `path` is relative to the workdir (cwd), `kind` is "random" or "mixed".

class CyberBackup:
    name = "cyberbackup"

    def __init__(self, w):
        self.w = w

    def start(self, base, init=True):
        self.base = base
        os.makedirs(base)
        self.log = open(os.path.join(base, "server.log"), "w")
        self.proc = subprocess.Popen(
            [SERVER, "--bind", "127.0.0.1", "--port", "0", "--admin-listen", "127.0.0.1:0",
             "--repository", os.path.join(base, "repository"), "--storage", os.path.join(base, "storage"),
             "--database", os.path.join(base, "server.db"), "--log", "warn"],
            cwd=base, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise Failed(f"cyberbackup-server did not start; see {base}/server.log")
        self.addr = line.strip().rsplit(" ", 1)[-1]
        self.env = dict(os.environ, CYBERBACKUP_PASSWORD=PASSWORD,
                        CYBERBACKUP_CONFIG_DIR=os.path.join(base, "client-config"))
        self.env.pop("CYBERBACKUP_PROTOCOL", None)
        if init:
            run([CLI, "init", "--server", self.addr, "--account", "bench"], env=self.env)

    def backup(self, path, kind):
        m = measure([CLI, "--json", "backup", path], env=self.env, cwd=self.w,
                    servers=[self.proc.pid], scratch=self.base)
        o = last_json(m["stdout"], lambda o: o.get("event") == "snapshot")
        m["bytes_sent"] = o and o.get("bytes_sent")
        m["snap"] = o and o.get("id")
        return m

    def restore(self, snap, target, one=None):
        cmd = [CLI, "restore", snap] + ([one] if one else []) + ["--target", target]
        return measure(cmd, env=self.env, cwd=self.w, servers=[self.proc.pid], scratch=self.base)

    @staticmethod
    def loadgen_cmd(addr, cl):
        return [LOADGEN, "-s", addr, "--mode", "v4-backup", "-c", str(cl["clients"]),
                "--files-per-snapshot", str(cl["files_per_client"]), "--size", str(cl["file_bytes"]),
                "-n", str(cl["clients"]), "--warmup", "0", "--timeout", "120s", "--user-prefix", "peers",
                "--json", "-q"]

    def many(self, cl):
        # The generator exits 1 on any error (--max-error-rate 0, its default): measure fails.
        m = measure(self.loadgen_cmd(self.addr, cl), cwd=self.base, servers=[self.proc.pid], scratch=self.base)
        try:
            rep = json.loads(m["stdout"])
        except ValueError:
            raise Failed(f"cyberbackup-loadgen printed no JSON report: {m['stdout'][-1500:]}")
        want_bytes = cl["clients"] * cl["client_bytes"]
        if (rep.get("error_count") or rep.get("checksum_mismatches") or rep.get("files") != cl["clients"]
                or rep.get("bytes") != want_bytes):
            raise Failed(f"cyberbackup-loadgen: {rep.get('files')} snapshots of {rep.get('bytes')} bytes "
                         f"(expected {cl['clients']} of {want_bytes}), errors {rep.get('errors')}, "
                         f"mismatches {rep.get('checksum_mismatches')}")
        lat = rep["file_latency_us"]
        m.update({"bytes_sent": None, "snap": None, "client_p50": lat["p50"] / 1e6, "client_max": lat["max"] / 1e6,
                  "lg_window_s": rep["measured_seconds"], "lg_mb_s": rep["mb_per_sec"],
                  "lg_cpu": rep["generator_cpu_user_s"] + rep["generator_cpu_system_s"],
                  "lg_p90": lat["p90"] / 1e6, "lg_snapshots": rep["files"], "lg_errors": rep["error_count"]})
        return m

    def stop(self):
        stop(self.proc)
        self.proc.stdout.close()
        self.log.close()


class Restic:
    name = "restic"

    def __init__(self, w):
        self.w = w

    def start(self, base, init=True):
        self.base = base
        os.makedirs(os.path.join(base, "repo"))
        open(os.path.join(base, "rclone.conf"), "w").close()
        port = free_port()
        self.log = open(os.path.join(base, "rclone.log"), "w")
        self.proc = subprocess.Popen(
            ["rclone", "--config", os.path.join(base, "rclone.conf"), "serve", "restic",
             "--addr", f"127.0.0.1:{port}", os.path.join(base, "repo")],
            stdout=self.log, stderr=self.log)
        wait_port(port, self.proc)
        self.env = dict(os.environ, RESTIC_PASSWORD=PASSWORD, RESTIC_REPOSITORY=f"rest:http://127.0.0.1:{port}/",
                        RESTIC_CACHE_DIR=os.path.join(base, "cache"))
        run(["restic", "init"], env=self.env)

    def backup(self, path, kind):
        m = measure(["restic", "backup", "--json", os.path.join(self.w, path)], env=self.env, cwd=self.w,
                    servers=[self.proc.pid], scratch=self.base)
        o = last_json(m["stdout"], lambda o: o.get("message_type") == "summary")
        m["bytes_sent"] = o and o.get("data_added")
        m["snap"] = o and o.get("snapshot_id")
        return m

    def restore(self, snap, target, one=None):
        cmd = ["restic", "restore", snap, "--target", target] + (["--include", os.path.join(self.w, one)] if one else [])
        return measure(cmd, env=self.env, cwd=self.w, servers=[self.proc.pid], scratch=self.base)

    def many(self, cl):
        # One repository for all (restic's backup lock is not exclusive); a cache each, as
        # 16 machines would have.
        jobs = [{"cmd": ["restic", "backup", "--json", os.path.join(self.w, t)], "cwd": self.w,
                 "env": dict(self.env, RESTIC_CACHE_DIR=os.path.join(self.base, f"cache{i:02d}"))}
                for i, t in enumerate(cl["trees"])]
        m = measure_many(jobs, servers=[self.proc.pid], scratch=self.base)
        sums = [last_json(o, lambda o: o.get("message_type") == "summary") for o in m["stdouts"]]
        m["bytes_sent"] = sum(o.get("data_added", 0) for o in sums) if all(sums) else None
        # restic 0.14 retries, with a growing back-off, loading a lock file that another
        # backup removed between listing and loading it (restic issue #1523); counted.
        retries = [e.count("returned error, retrying") for e in m["stderrs"]]
        m["lock_retries"], m["clients_retrying"] = sum(retries), sum(1 for r in retries if r)
        return m

    def stop(self):
        stop(self.proc)
        self.log.close()


class Borg:
    name = "borg"

    def __init__(self, w):
        self.w = w

    def start(self, base, init=True):
        self.base = base
        os.makedirs(base)
        self.repo = os.path.join(base, "repo")
        self.env = dict(os.environ, BORG_PASSPHRASE=PASSWORD, BORG_BASE_DIR=os.path.join(base, "home"),
                        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")
        if init:
            run(["borg", "init", "--encryption", "repokey-blake2", self.repo], env=self.env)
        self.n = 0

    def backup(self, path, kind):
        self.n += 1
        name = f"s{self.n}"
        comp = "none" if kind == "random" else "lz4"
        # borg exits 1 on warnings (e.g. a file changed while read); the data is saved.
        m = measure(["borg", "create", "--json", "--compression", comp, f"{self.repo}::{name}", path],
                    env=self.env, cwd=self.w, scratch=self.base, ok_codes=(0, 1))
        try:
            m["bytes_sent"] = json.loads(m["stdout"])["archive"]["stats"]["deduplicated_size"]
        except (ValueError, KeyError):
            m["bytes_sent"] = None
        m["snap"] = name
        return m

    def restore(self, snap, target, one=None):
        os.makedirs(target, exist_ok=True)
        cmd = ["borg", "extract", f"{self.repo}::{snap}"] + ([one] if one else [])
        return measure(cmd, env=self.env, cwd=target, scratch=self.base)

    def many(self, cl):
        # A repository each (borg locks a repository for a backup), made at once outside
        # the timing; a BORG_BASE_DIR (cache, keys) each.
        n = len(cl["trees"])
        repos = [os.path.join(self.base, f"repo{i:02d}") for i in range(n)]
        envs = [dict(self.env, BORG_BASE_DIR=os.path.join(self.base, f"home{i:02d}")) for i in range(n)]
        run_all([["borg", "init", "--encryption", "repokey-blake2", r] for r in repos], env=lambda i: envs[i])
        jobs = [{"cmd": ["borg", "create", "--json", "--compression", "none", f"{r}::s1", t], "env": e, "cwd": self.w}
                for r, e, t in zip(repos, envs, cl["trees"])]
        m = measure_many(jobs, scratch=self.base, ok_codes=(0, 1))
        m["warned"] = sum(1 for c in m["codes"] if c == 1)  # borg's exit 1: warnings, data saved
        try:
            m["bytes_sent"] = sum(json.loads(o)["archive"]["stats"]["deduplicated_size"] for o in m["stdouts"])
        except (ValueError, KeyError):
            m["bytes_sent"] = None
        return m

    def stop(self):
        pass


class Sftp:
    """sftp in batch mode to our own sshd on 127.0.0.1 (started once for the whole run)."""
    name = "sftp"
    sshd = None

    def __init__(self, w):
        self.w = w

    @classmethod
    def start_sshd(cls, w):
        d = os.path.join(w, "sshd")
        rmtree(d)
        os.makedirs(d)
        for k in ("host", "client"):
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", f"{d}/{k}"])
        shutil.copy(f"{d}/client.pub", f"{d}/authorized_keys")
        cls.port = free_port()
        with open(f"{d}/sshd_config", "w") as f:
            f.write(f"ListenAddress 127.0.0.1\nPort {cls.port}\nHostKey {d}/host\n"
                    f"AuthorizedKeysFile {d}/authorized_keys\nPermitRootLogin prohibit-password\n"
                    f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\n"
                    f"UsePAM no\nPidFile none\nSubsystem sftp /usr/lib/openssh/sftp-server\n"
                    # scenario 5's 16 sessions connect at once; the default (10:30:100)
                    # drops some of more than 10 unauthenticated connections
                    f"MaxStartups 100\n")
        os.makedirs("/run/sshd", exist_ok=True)
        cls.sshd = subprocess.Popen([shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f", f"{d}/sshd_config"],
                                    stdout=subprocess.DEVNULL, stderr=open(f"{d}/sshd.log", "w"))
        wait_port(cls.port, cls.sshd)
        cls.key = f"{d}/client"

    def start(self, base, init=True):
        self.base = base
        os.makedirs(os.path.join(base, "remote"))
        self.n = 0

    def _cmd(self, lines, name="batch"):
        batch = os.path.join(self.base, name)
        with open(batch, "w") as f:
            f.write("\n".join(lines) + "\n")
        return ["sftp", "-q", "-b", batch, "-i", self.key, "-P", str(self.port),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", f"Ciphers={SSH_CIPHER}", "-o", "LogLevel=ERROR", "root@127.0.0.1"]

    def _batch(self, lines, cwd):
        return measure(self._cmd(lines), cwd=cwd, scratch=self.base)

    def many(self, cl):
        jobs = [{"cmd": self._cmd([f"put -R -f {os.path.join(self.w, t)} {os.path.join(self.base, 'remote', f'c{i:02d}')}"],
                                  name=f"batch{i:02d}"), "cwd": self.w}
                for i, t in enumerate(cl["trees"])]
        m = measure_many(jobs, scratch=self.base)
        m["bytes_sent"] = None
        got = count_tree(os.path.join(self.base, "remote"))
        if got != (cl["files"], cl["bytes"]):
            raise Failed(f"sftp: the 16 sessions left {got[0]} files of {got[1]} bytes on the server, "
                         f"expected {cl['files']} of {cl['bytes']}")
        return m

    def backup(self, path, kind):
        self.n += 1
        dst = os.path.join(self.base, "remote", f"s{self.n}")
        src = os.path.join(self.w, path)
        if os.path.isdir(src):
            m = self._batch([f"put -R -f {src} {dst}"], self.w)
        else:
            m = self._batch([f"put -f {src} {dst}"], self.w)
        m["bytes_sent"] = None
        m["snap"] = dst
        return m

    def restore(self, snap, target, one=None):
        os.makedirs(target, exist_ok=True)
        if one:
            rel = one.split("/", 1)[1]  # "tree/large/l0.img" -> "large/l0.img"
            return self._batch([f"get {snap}/{rel} {target}/"], target)
        return self._batch([f"get -R {snap} {target}/"], target)

    def stop(self):
        pass

    @classmethod
    def stop_sshd(cls):
        stop(cls.sshd)
        cls.sshd = None


TOOL_CLASSES = {"cyberbackup": CyberBackup, "restic": Restic, "borg": Borg, "sftp": Sftp}


def dd(args, scratch):
    return measure(["dd", *args], scratch=scratch)


# ---------------------------------------------------------------- scenarios

def slim(m):
    return {k: v for k, v in m.items() if k not in ("stdout", "stdouts", "stderrs", "codes", "snap")}


def rotate(tools, i):
    i %= len(tools)
    return tools[i:] + tools[:i]


def scenario1(w, tools, runs, R, data):
    big = data["big"]
    mib = big["bytes"] // MIB
    for r in range(runs):
        log(f"scenario 1, run {r + 1}/{runs}")
        s = os.path.join(w, "run")
        rmtree(s)
        os.makedirs(s)
        out = os.path.join(s, "dd.out")
        R["1"]["dd oflag=direct"].append(slim(dd(["if=/dev/zero", f"of={out}", "bs=1M", f"count={mib}", "oflag=direct"], s)))
        os.remove(out)
        R["1"]["dd conv=fdatasync"].append(slim(dd(["if=/dev/zero", f"of={out}", "bs=1M", f"count={mib}", "conv=fdatasync"], s)))
        os.remove(out)
        R["1"]["dd iflag=direct (read)"].append(slim(dd([f"if={big['path']}", "of=/dev/null", "bs=1M", "iflag=direct"], s)))
        for name in rotate(tools, r):
            t = TOOL_CLASSES[name](w)
            base = os.path.join(s, name)
            t.start(base)
            try:
                R["1"][name].append(slim(t.backup("big.bin", "random")))
            finally:
                t.stop()
                rmtree(base)
        rmtree(s)


def scenario234(w, tools, runs, R, data, only):
    tree = data["tree"]
    change = Change(tree)
    data["change"] = {"files": len(change.picked), "bytes_overwritten": change.bytes_changed,
                      "bytes_of_changed_files": change.files_bytes}
    one_rel = os.path.relpath(tree["one_file"], w)
    for r in range(runs):
        log(f"scenarios 2-4, run {r + 1}/{runs}")
        s = os.path.join(w, "run")
        rmtree(s)
        os.makedirs(s)
        if "4" in only:
            R["4"]["dd iflag=direct (read, one large file)"].append(
                slim(dd([f"if={tree['one_file']}", "of=/dev/null", "bs=1M", "iflag=direct"], s)))
        for name in rotate(tools, r):
            t = TOOL_CLASSES[name](w)
            base = os.path.join(s, name)
            t.start(base)
            try:
                log(f"  {name}: backup")
                first = t.backup("tree", "mixed")
                R["2"][name].append(slim(first))
                if "3" in only and name != "sftp":
                    log(f"  {name}: unchanged")
                    R["3"][f"{name} unchanged"].append(slim(t.backup("tree", "mixed")))
                if "4" in only:
                    log(f"  {name}: restore")
                    tgt = os.path.join(s, "restore")
                    os.makedirs(tgt)
                    m = t.restore(first["snap"], tgt)
                    m["restored_ok"] = count_tree(tgt) == (tree["files"], tree["bytes"])
                    if not m["restored_ok"]:
                        log(f"  {name}: the restored tree differs in files or bytes: {count_tree(tgt)}")
                    R["4"][f"{name} tree"].append(slim(m))
                    rmtree(tgt)
                    os.makedirs(tgt)
                    m = t.restore(first["snap"], tgt, one=one_rel)
                    m["restored_ok"] = count_tree(tgt) == (1, tree["one_bytes"])
                    if not m["restored_ok"]:
                        log(f"  {name}: the restored file differs: {count_tree(tgt)}")
                    R["4"][f"{name} one file"].append(slim(m))
                    rmtree(tgt)
                if "3" in only and name != "sftp":
                    log(f"  {name}: 1% changed")
                    change.apply()
                    try:
                        R["3"][f"{name} 1% changed"].append(slim(t.backup("tree", "mixed")))
                    finally:
                        change.revert()
            finally:
                t.stop()
                rmtree(base)
        rmtree(s)


def scenario5(w, tools, runs, R, data):
    cl = data["clients"]
    for r in range(runs):
        log(f"scenario 5, run {r + 1}/{runs}")
        s = os.path.join(w, "run")
        rmtree(s)
        os.makedirs(s)
        for name in rotate(tools, r):
            t = TOOL_CLASSES[name](w)
            base = os.path.join(s, name)
            t.start(base, init=False)
            try:
                log(f"  {name}: {cl['clients']} clients at once")
                R["5"][name].append(slim(t.many(cl)))
            finally:
                t.stop()
                rmtree(base)
        rmtree(s)


def count_tree(root):
    n = b = 0
    for dp, _, ns in os.walk(root):
        for name in ns:
            st = os.lstat(os.path.join(dp, name))
            n += 1
            b += st.st_size
    return n, b


def scenario6(w, tools, runs, R, data):
    for r in range(runs):
        log(f"scenario 6, run {r + 1}/{runs}")
        s = os.path.join(w, "run")
        rmtree(s)
        os.makedirs(s)
        for name in rotate([t for t in tools if t != "sftp"], r):
            t = TOOL_CLASSES[name](w)
            base = os.path.join(s, name)
            t.start(base)
            try:
                log(f"  {name}")
                R["6"][name].append(slim(t.backup("many", "mixed")))
            finally:
                t.stop()
                rmtree(base)
        rmtree(s)


# ---------------------------------------------------------------- report

def machine():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release(), "memory": mem}


def versions():
    def first(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            return ((r.stdout or r.stderr).strip().splitlines() or ["?"])[0]
        except (OSError, subprocess.TimeoutExpired):
            return "missing"
    commit = first(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    return {"cyberbackup": first([CLI, "--version"]) + f" (commit {commit})",
            "cyberbackup-server": first([SERVER, "--version"]),
            "cyberbackup-loadgen": first([LOADGEN, "--version"]),
            "restic": first(["restic", "version"]), "rclone": first(["rclone", "version"]),
            "borg": first(["borg", "--version"]), "openssh": first(["ssh", "-V"]),
            "dd": first(["dd", "--version"])}


def med(runs, key):
    vals = [m[key] for m in runs if m.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(R):
    S = {}
    for sc, rows in R.items():
        S[sc] = {}
        for name, runs in rows.items():
            if runs:
                S[sc][name] = {k: med(runs, k) for k in ("wall", "cpu", "rss_kib", "server_cpu", "bytes_sent",
                                                         "client_p50", "client_max", "lg_window_s", "lg_mb_s",
                                                         "lg_cpu", "lg_p90", "lg_snapshots", "lg_errors",
                                                         "lock_retries", "clients_retrying", "warned")}
                S[sc][name]["runs"] = len(runs)
    return S


def fmt(v, spec=".2f", none="–"):
    return none if v is None else format(v, spec)


def table(rows, S, data_bytes, files=None, per_gib=True):
    """rows: list of (label, key in S). data_bytes: logical bytes for rates."""
    head = ("| tool | MB/s | files/s | wall s | client CPU s | client CPU s/GiB | server CPU s/GiB | "
            "client cores busy | server cores busy | peak RSS MiB | bytes sent |")
    out = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    gib = data_bytes / GIB
    for label, key, nbytes in rows:
        m = S.get(key)
        if not m:
            out.append(f"| {label} | not measured | | | | | | | | | |")
            continue
        b = nbytes if nbytes is not None else data_bytes
        g = b / GIB
        mbs = b / m["wall"] / 1e6
        fps = (files / m["wall"]) if files else None
        cpu_g = m["cpu"] / g if g else None
        srv_g = (m["server_cpu"] / g) if (m["server_cpu"] is not None and g) else None
        out.append(f"| {label} | {mbs:.1f} | {fmt(fps, '.0f')} | {m['wall']:.2f} | {m['cpu']:.2f} | {fmt(cpu_g)} | "
                   f"{fmt(srv_g)} | {m['cpu'] / m['wall']:.2f} | {fmt(m['server_cpu'] and m['server_cpu'] / m['wall'])} | "
                   f"{m['rss_kib'] / 1024:.0f} | {fmt(m['bytes_sent'], ',.0f')} |")
    return "\n".join(out)


def ratio(a, b):
    return (a / b) if (a is not None and b) else None


def targets(S, data):
    T = []

    def rate(sc, key, nbytes):
        m = S.get(sc, {}).get(key)
        return (nbytes / m["wall"]) if m else None

    def add(what, value, goal, ok, note=""):
        T.append({"target": what, "value": value, "goal": goal,
                  "met": None if value is None else bool(ok(value)), "note": note})

    if "big" in data and S.get("1"):
        b = data["big"]["bytes"]
        cb = rate("1", "cyberbackup", b)
        add("(1) CyberBackup / dd oflag=direct", ratio(cb, rate("1", "dd oflag=direct", b)), ">= 0.9x", lambda v: v >= 0.9)
        add("(1) CyberBackup / restic", ratio(cb, rate("1", "restic", b)), ">= 3x", lambda v: v >= 3)
        add("(1) CyberBackup / borg", ratio(cb, rate("1", "borg", b)), ">= 3x", lambda v: v >= 3)
        add("(1) CyberBackup / sftp (information)", ratio(cb, rate("1", "sftp", b)), "none", lambda v: True)
        m = S["1"].get("cyberbackup")
        add("(1) server CPU core-s/GiB", m and m["server_cpu"] / (b / GIB), "<= 0.35", lambda v: v <= 0.35)
    if "tree" in data and S.get("2"):
        b = data["tree"]["bytes"]
        cb = rate("2", "cyberbackup", b)
        add("(2) CyberBackup / restic", ratio(cb, rate("2", "restic", b)), ">= 3x", lambda v: v >= 3)
        add("(2) CyberBackup / borg", ratio(cb, rate("2", "borg", b)), ">= 3x", lambda v: v >= 3)
        add("(2) CyberBackup / sftp (information)", ratio(cb, rate("2", "sftp", b)), "none", lambda v: True)
        m = S["2"].get("cyberbackup")
        add("(2) server CPU core-s/GiB", m and m["server_cpu"] / (b / GIB), "<= 0.35", lambda v: v <= 0.35)
    if "tree" in data and S.get("3"):
        b = data["tree"]["bytes"]
        cu, ru = S["3"].get("cyberbackup unchanged"), S["3"].get("restic unchanged")
        add("(3) unchanged re-backup, restic wall / CyberBackup wall", ratio(ru and ru["wall"], cu and cu["wall"]),
            ">= 5x", lambda v: v >= 5)
        add("(3) unchanged re-backup, bytes sent / tree bytes", cu and cu["bytes_sent"] is not None and cu["bytes_sent"] / b,
            "< 1%", lambda v: v < 0.01, "as a fraction")
        cc = S["3"].get("cyberbackup 1% changed")
        ch = data.get("change", {})
        add("(3) 1% changed, bytes sent / bytes of the changed files",
            cc and cc["bytes_sent"] is not None and ch.get("bytes_of_changed_files") and cc["bytes_sent"] / ch["bytes_of_changed_files"],
            "about the changed chunks only (reported)", lambda v: True,
            f"{ch.get('files')} files changed, {ch.get('bytes_overwritten', 0):,} bytes overwritten, "
            f"{ch.get('bytes_of_changed_files', 0):,} bytes in those files")
    if "tree" in data and S.get("4"):
        b, one = data["tree"]["bytes"], data["tree"]["one_bytes"]
        ddr = rate("4", "dd iflag=direct (read, one large file)", one)
        cbt, cbo = rate("4", "cyberbackup tree", b), rate("4", "cyberbackup one file", one)
        add("(4) tree restore / dd read", ratio(cbt, ddr), ">= 0.8x", lambda v: v >= 0.8)
        add("(4) one-file restore / dd read", ratio(cbo, ddr), ">= 0.8x", lambda v: v >= 0.8)
        add("(4) tree restore / restic", ratio(cbt, rate("4", "restic tree", b)), ">= 3x", lambda v: v >= 3)
        add("(4) one-file restore / restic", ratio(cbo, rate("4", "restic one file", one)), ">= 3x", lambda v: v >= 3)
    if "clients" in data and S.get("5"):
        b = data["clients"]["bytes"]
        cb = rate("5", "cyberbackup", b)
        for peer in ("restic", "borg", "sftp"):
            add(f"(5) 16 clients at once, CyberBackup / {peer} (information)", ratio(cb, rate("5", peer, b)),
                "none", lambda v: True)
        m = S["5"].get("cyberbackup")
        add("(5) server CPU core-s/GiB, 16 clients at once (information)", m and m["server_cpu"] / (b / GIB),
            "none", lambda v: True)
    if S.get("6"):
        cb, rs = S["6"].get("cyberbackup"), S["6"].get("restic")
        add("(6) client peak RSS MiB", cb and cb["rss_kib"] / 1024, "< 512", lambda v: v < 512)
        add("(6) client peak RSS / restic's", ratio(cb and cb["rss_kib"], rs and rs["rss_kib"]), "< 1x", lambda v: v < 1)
        add("(6) CyberBackup files/s / restic files/s (information)", ratio(rs and rs["wall"], cb and cb["wall"]),
            "none", lambda v: True)
    return T


def report(args, data, R, S, T, info, started, elapsed):
    L = []
    P = L.append
    P(f"# CyberBackup v4 against restic, borg, sftp and dd (issue 21)\n")
    P(f"`python3 benches/scripts/peers.py {' '.join(args.argv)}` — {started}, {elapsed / 60:.1f} min. "
      f"Scale {args.scale}, {args.runs} run(s); every figure is the median of the runs, "
      f"each tool's runs on a fresh repository (and a fresh server where it has one).\n")
    m = info["machine"]
    P(f"**Machine:** {m['cpu']}, {m['cores']} cores, {m['memory']} RAM, kernel {m['kernel']}; "
      f"scratch directory `{args.workdir}` ({info['fs']}). ")
    P("The disk is a VM's virtual disk whose rate swings between runs (see the README's "
      "benchmark section); tools ran in a rotated order each run so no tool always meets the same "
      "moment. Other processes on the machine were not stopped.\n")
    if DROP_CACHES["ok"]:
        P("**Page cache:** `sync` and `echo 3 > /proc/sys/vm/drop_caches` before every measured "
          "command (it worked), so every read is from the disk, and every run starts cold.\n")
    else:
        P(f"**Page cache:** could not be dropped ({DROP_CACHES['error']}); `sync` before every "
          "measured command only, so reads may be served from the page cache.\n")
    P("**Versions:**\n")
    for k, v in info["versions"].items():
        P(f"- {k}: `{v}`")
    P("")
    P("**How each tool was configured:**\n")
    P("- **CyberBackup v4**: `cyberbackup-server --bind 127.0.0.1 --port 0 --admin-listen 127.0.0.1:0 "
      "--repository R --storage S --database D --log warn` (defaults otherwise: runtime auto, one shard a CPU), "
      "started fresh per scenario and run in a scratch directory; client `cyberbackup --json backup PATH` "
      "(FastCDC chunks, zstd kept when it saves >= 1/16, AES-256-GCM), `restore ID [PATH] --target DIR`, "
      "with `CYBERBACKUP_PASSWORD` set and `CYBERBACKUP_CONFIG_DIR` in scratch, after `init`. "
      "The server acknowledges chunks as durable before the snapshot is committed.")
    P("- **restic**: `restic backup --json PATH` (absolute path), `restic restore ID --target DIR "
      "[--include PATH]`, to `rest:http://127.0.0.1:PORT/` served by `rclone serve restic --addr 127.0.0.1:PORT DIR` "
      "(an empty rclone config; repository on the same disk), started fresh per scenario and run; "
      "`RESTIC_PASSWORD` set, `RESTIC_CACHE_DIR` in scratch (fresh per run), repository format of restic 0.14 "
      "(no compression). rclone's local backend does not fsync the files it writes.")
    P("- **borg**: local repository, `borg init --encryption repokey-blake2`, `borg create --json "
      "--compression none` for the random file (1) and `lz4` for every other workload, `borg extract` for "
      "restores; `BORG_PASSPHRASE` set, `BORG_BASE_DIR` (cache, keys) in scratch, fresh per run. No server "
      "process: its whole cost is client CPU.")
    P(f"- **sftp**: OpenSSH `sftp -b BATCH` (batch mode) to an sshd started by the suite on 127.0.0.1 "
      f"(its own config, a throwaway ed25519 key, `Ciphers={SSH_CIPHER}`), `put -f` / `put -R -f` "
      "(fsync@openssh.com, so durable), `get` / `get -R` to restore. Not deduplicating, so it has no scenario 3 "
      "figures; it is left out of scenario 6 (a million file creations on the server per run). Client CPU "
      "includes the `ssh` process sftp runs; sshd's CPU is not measured.")
    P("- **dd**: `dd if=/dev/zero of=F bs=1M count=N oflag=direct` and `... conv=fdatasync` (writes), "
      "`dd if=F of=/dev/null bs=1M iflag=direct` (reads: the 1 GiB file in (1), one large tree file in (4)).")
    cl5 = data.get("clients")
    if cl5:
        lg = " ".join(CyberBackup.loadgen_cmd("ADDR", cl5)[1:])
        P(f"- **(5), {cl5['clients']} clients at once**: CyberBackup: a fresh server as above (no `init`), then "
          f"`cyberbackup-loadgen {lg}`: {cl5['clients']} threads in one process, each with a connection and an "
          "account of its own (created inside the timing), take one snapshot each of "
          f"{cl5['files_per_client']} files of {cl5['file_bytes']:,} bytes through the client library's pipeline "
          "(chunk, hash, ask, encrypt, send, commit; compression off, one worker a client), then forget it. "
          "`-n` counts snapshots across all clients: they start together, so each takes one in practice, but the "
          "generator does not enforce it. **The generator reads no disk**: its content is made in memory (seeded "
          "StdRng, new for every snapshot, so nothing deduplicates) and that generation is part of its client CPU, "
          "while restic, borg and sftp read their trees from the disk with a cold page cache. Any error, set-up "
          "failure or checksum mismatch (the generator then exits 1), or a snapshot or byte count other than "
          "expected, fails the run. The generator's `--congestion` applies to its v3 uploads only, so its v4 "
          "connections, like the CLI's, use the system's congestion control. "
          f"restic: {cl5['clients']} `restic backup --json TREE` processes at once to one repository behind one "
          "`rclone serve restic` (restic's backup lock is not exclusive), a cache directory each. borg: "
          f"{cl5['clients']} `borg create --json --compression none` at once, each to a repository of its own "
          "(borg locks a repository for a backup; the repositories are made beforehand, outside the timing), a "
          f"`BORG_BASE_DIR` each. sftp: {cl5['clients']} `sftp -b` sessions at once, each `put -R -f TREE DIR` "
          "(sshd with `MaxStartups 100`, so none is turned away; the files are counted on arrival). Wall is from "
          "the first start to the last exit; client CPU s and peak RSS are summed over the processes (RSS: an "
          "upper bound of what they held at once; the generator is one process).")
    P("")
    P("Columns: MB/s is the workload's logical bytes (10^6) per wall second; client CPU is user + system "
      "of the client process and its children; server CPU is user + system of cyberbackup-server or rclone "
      "over the command; per GiB is per GiB of the workload (logical); bytes sent is CyberBackup's "
      "`bytes_sent`, restic's `data_added`, borg's `deduplicated_size` (what it added to its repository); "
      "cores busy is CPU seconds per wall second (2 is the whole machine). Every restore was checked "
      "afterwards (outside the timing) for the tree's file count and bytes.\n")

    P("## Workloads\n")
    if "big" in data:
        P(f"- (1) `big.bin`: {data['big']['bytes']:,} random bytes.")
    if "tree" in data:
        t = data["tree"]
        P(f"- (2) `tree/`: {t['files']:,} files, {t['bytes']:,} bytes ({t['bytes'] / GIB:.2f} GiB): {t['small']:,} of "
          f"1-64 KiB (a third text), {t['medium']} of 1-10 MiB (a fifth text), 4 of {t['large_bytes'] / MIB:.0f} MiB, "
          f"in nested directories.")
        ch = data.get("change")
        if ch:
            P(f"- (3) the same tree unchanged; then {ch['files']} files (1%) changed: {ch['bytes_overwritten']:,} "
              f"bytes overwritten, 4 KiB at a seeded offset each (whole file when smaller); the changed files hold "
              f"{ch['bytes_of_changed_files']:,} bytes.")
        P(f"- (4) restore of (2)'s first snapshot into an empty directory; restore of `tree/large/l0.img` "
          f"({t['one_bytes'] / MIB:.0f} MiB).")
    if "clients" in data:
        c = data["clients"]
        P(f"- (5) `clients/c00` .. `c{c['clients'] - 1:02d}`: {c['clients']} trees of {c['files_per_client']} random "
          f"files of {c['file_bytes']:,} bytes ({c['client_bytes'] / MIB:.1f} MiB a client, {c['bytes']:,} bytes or "
          f"{c['bytes'] / GIB:.2f} GiB in all), one seed a client, backed up at once by restic, borg and sftp; "
          "CyberBackup's 16 clients are the load generator's, whose snapshots have the same shape (as many files "
          "of the same size, random) made in memory.")
    if "many" in data:
        mn = data["many"]
        P(f"- (6) `many/`: {mn['files']:,} files (half empty, half 1-100 random bytes; {mn['bytes']:,} bytes), "
          f"1,000 a directory.")
    P("")

    tools = args.tools
    if "1" in S:
        b = data["big"]["bytes"]
        P(f"## (1) One {b / GIB:.2f} GiB random file, first backup\n")
        P(table([(k, k, b) for k in ["dd oflag=direct", "dd conv=fdatasync", "dd iflag=direct (read)"] + tools], S["1"], b))
        P("")
    if "2" in S:
        b, f = data["tree"]["bytes"], data["tree"]["files"]
        P(f"## (2) Tree of {f:,} files, {b / GIB:.2f} GiB, first backup\n")
        P(table([(k, k, b) for k in tools], S["2"], b, files=f))
        P("")
    if "3" in S:
        b, f = data["tree"]["bytes"], data["tree"]["files"]
        P("## (3) The same tree again: unchanged, then 1% of the files changed\n")
        rows = [(f"{k} unchanged", f"{k} unchanged", b) for k in tools if k != "sftp"]
        rows += [(f"{k} 1% changed", f"{k} 1% changed", b) for k in tools if k != "sftp"]
        P(table(rows, S["3"], b, files=f))
        P("\n(Rates and per-GiB figures are per the whole tree's logical bytes.)\n")
    if "4" in S:
        b, one = data["tree"]["bytes"], data["tree"]["one_bytes"]
        P("## (4) Restore\n")
        rows = [("dd iflag=direct (read, one large file)", "dd iflag=direct (read, one large file)", one)]
        rows += [(f"{k} tree", f"{k} tree", b) for k in tools]
        rows += [(f"{k} one file", f"{k} one file", one) for k in tools]
        P(table(rows, S["4"], b, files=data["tree"]["files"]))
        bad = [f"{k} (run {i + 1})" for k, runs in R["4"].items() for i, m in enumerate(runs)
               if m.get("restored_ok") is False]
        if bad:
            P("\n**A restore did not reproduce the tree's file count and bytes:** " + ", ".join(bad) + ".")
        P("\n(files/s is per the tree's files, so meaningless on the one-file rows; per GiB is per the bytes restored.)\n")
    if "5" in S:
        c = data["clients"]
        b = c["bytes"]
        P(f"## (5) {c['clients']} clients at once, each {c['client_bytes'] / MIB:.1f} MiB of random files, "
          f"{b / GIB:.2f} GiB in all\n")
        P(table([(k, k, b) for k in tools], S["5"], b, files=c["files"]))
        P("\n(MB/s is all clients' bytes over the wall from the first start to the last exit; client CPU and peak "
          "RSS are summed over the clients' processes; CyberBackup's clients are the load generator's threads, "
          "which read no disk.)\n")
        P("| tool | per client: wall p50 s | max s | notes |")
        P("|---|---|---|---|")
        for k in tools:
            m = S["5"].get(k)
            if not m:
                P(f"| {k} | not measured | | |")
                continue
            note = ""
            if k == "cyberbackup":
                note = (f"snapshot latency (start to commit), p90 {fmt(m['lg_p90'])} s; the generator's own window "
                        f"(its clients' first start to last commit, without the accounts' set-up and the forgets): "
                        f"{fmt(m['lg_window_s'])} s, {fmt(m['lg_mb_s'], '.1f')} MB/s, generator CPU in it "
                        f"{fmt(m['lg_cpu'])} s; {fmt(m['lg_snapshots'], '.0f')} snapshots, "
                        f"{fmt(m['lg_errors'], '.0f')} errors")
            else:
                note = "each process's wall, start to exit"
            if k == "restic" and m.get("clients_retrying"):
                note += (f"; {m['clients_retrying']:.0f} of {c['clients']} processes retried (median of the runs), "
                         f"{m['lock_retries']:.0f} times in all with a growing back-off, loading a lock file that a "
                         "finished backup had removed (restic 0.14's behaviour, restic issue #1523, changed by "
                         "restic PR #4520 in October 2023): that wait, not data, makes the max and the wall")
            if k == "borg" and m.get("warned"):
                note += f"; {m['warned']:.0f} processes exited 1 (warnings; the data is saved)"
            P(f"| {k} | {fmt(m['client_p50'])} | {fmt(m['client_max'])} | {note} |")
        P("")
    if "6" in S:
        mn = data["many"]
        P(f"## (6) {mn['files']:,} empty and tiny files, first backup\n")
        P(f"(Generating them took {mn['generate_s']:.0f} s, when not already there.)\n")
        P(table([(k, k, mn["bytes"]) for k in tools if k != "sftp"], S["6"], mn["bytes"], files=mn["files"]))
        P("\n(MB/s and per-GiB figures are meaningless here: the files hold almost no bytes; see files/s, "
          "client CPU s and peak RSS.)\n")
    P("## Targets\n")
    P("| target | value | goal | met |")
    P("|---|---|---|---|")
    for t in T:
        v = t["value"]
        vs = "–" if v is None else (f"{v * 100:.3f}%" if t.get("note") == "as a fraction" else f"{v:.3f}")
        met = "not measured" if t["met"] is None else ("information" if t["goal"] == "none" or "reported" in t["goal"]
                                                        else ("**met**" if t["met"] else "**not met**"))
        note = f" ({t['note']})" if t.get("note") and t["note"] != "as a fraction" else ""
        P(f"| {t['target']}{note} | {vs} | {t['goal']} | {met} |")
    P("")
    P("Raw runs are in the JSON file next to this report.")
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------- main

def check_tools(tools, only):
    missing = []
    for b in (SERVER, CLI) + ((LOADGEN,) if "5" in only else ()):
        if "cyberbackup" in tools and not os.path.exists(b):
            missing.append(f"{b} (cargo build --release -p cyberbackup-server -p cyberbackup-client"
                           f"{' -p cyberbackup-loadgen' if b == LOADGEN else ''})")
    need = {"restic": ["restic", "rclone"], "borg": ["borg"], "sftp": ["sftp", "ssh-keygen", "sshd"]}
    for t in tools:
        for exe in need.get(t, []):
            if not shutil.which(exe) and not (exe == "sshd" and os.path.exists("/usr/sbin/sshd")):
                missing.append(exe)
    if "sftp" in tools and not os.path.exists("/usr/lib/openssh/sftp-server"):
        missing.append("/usr/lib/openssh/sftp-server")
    if not shutil.which("dd"):
        missing.append("dd")
    return missing


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="1,2,3,4,5,6", help="scenarios, e.g. 1,2 (3 and 4 imply 2)")
    ap.add_argument("--tools", default=",".join(ALL_TOOLS))
    ap.add_argument("--workdir", default="/var/tmp/cyberbackup-peers")
    ap.add_argument("--out", default=os.path.join(ROOT, "benches", "results", "latest.md"),
                    help="Markdown report (JSON next to it); - for standard output")
    ap.add_argument("--keep", action="store_true", help="keep the generated workloads (reused by the next run at the same scale)")
    args = ap.parse_args()
    args.argv = sys.argv[1:]
    args.tools = [t for t in args.tools.split(",") if t]
    only = set(args.only.split(","))
    for t in args.tools:
        if t not in TOOL_CLASSES:
            sys.exit(f"unknown tool {t}; known: {', '.join(ALL_TOOLS)}")
    missing = check_tools(args.tools, only)
    if missing:
        sys.exit("missing: " + ", ".join(missing) +
                 "\n(on Debian: apt-get install restic rclone borgbackup openssh-server; or leave tools out with --tools)")
    w = os.path.abspath(args.workdir)
    os.makedirs(w, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t_start = time.perf_counter()
    data = {}
    R = {"1": {}, "2": {}, "3": {}, "4": {}, "5": {}, "6": {}}
    for sc in R:
        for k in ["dd oflag=direct", "dd conv=fdatasync", "dd iflag=direct (read)",
                  "dd iflag=direct (read, one large file)"] + ALL_TOOLS:
            R[sc][k] = []
        for t in ALL_TOOLS:
            for suffix in (" unchanged", " 1% changed", " tree", " one file"):
                R[sc][t + suffix] = []
    try:
        if "sftp" in args.tools and only & {"1", "2", "3", "4", "5"}:
            Sftp.start_sshd(w)
        if "1" in only:
            log("generating workload 1")
            data["big"] = gen_big(w, args.scale)
            scenario1(w, args.tools, args.runs, R, data)
        if only & {"2", "3", "4"}:
            log("generating workload 2")
            data["tree"] = gen_tree(w, args.scale)
            only.add("2")
            scenario234(w, args.tools, args.runs, R, data, only)
        if "5" in only:
            log("generating workload 5")
            data["clients"] = gen_clients(w, args.scale)
            scenario5(w, args.tools, args.runs, R, data)
        if "6" in only:
            log("generating workload 6")
            data["many"] = gen_many(w, args.scale)
            scenario6(w, args.tools, args.runs, R, data)
    finally:
        Sftp.stop_sshd()
        rmtree(os.path.join(w, "run"))
        if not args.keep:
            for name in os.listdir(w):
                if name in ("big.bin", "tree", "many", "clients", "sshd") or name.startswith(
                        ("tree.done.", "many.done.", "clients.done.")):
                    p = os.path.join(w, name)
                    rmtree(p) if os.path.isdir(p) else os.remove(p)
            try:
                os.rmdir(w)
            except OSError:
                pass
    elapsed = time.perf_counter() - t_start
    S = summarize(R)
    S = {k: v for k, v in S.items() if v}
    T = targets(S, data)
    fs = "?"
    try:
        fs = run(["df", "-hT", os.path.dirname(w)]).strip().splitlines()[-1]
        fs = " ".join(fs.split())
    except Failed:
        pass
    info = {"machine": machine(), "versions": versions(), "fs": fs}
    md = report(args, data, R, S, T, info, started, elapsed)
    for d in data.values():
        d.pop("file_list", None)
    js = {"started": started, "elapsed_s": elapsed, "argv": args.argv, "scale": args.scale, "runs": args.runs,
          "drop_caches": DROP_CACHES, "info": info, "workloads": data, "medians": S, "targets": T,
          "raw": {sc: {k: v for k, v in rows.items() if v} for sc, rows in R.items()}}
    if args.out and args.out != "-":
        with open(args.out, "w") as f:
            f.write(md)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(js, f, indent=1)
            f.write("\n")
    else:
        print(md)


if __name__ == "__main__":
    main()
