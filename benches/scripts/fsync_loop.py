#!/usr/bin/env python3
"""Baseline for small-file durability: N files of 4 KiB made durable one by one (write,
fdatasync, rename, fsync of the directory: mode "each"), with fdatasync per file but
one directory sync ("batch"), or with one sync for all ("sync").

    python3 benches/scripts/fsync_loop.py DIR N each|batch|sync
"""
import os, sys, time
d = sys.argv[1]; n = int(sys.argv[2]); mode = sys.argv[3]
os.makedirs(d, exist_ok=True)
data = os.urandom(4096)
dfd = os.open(d, os.O_RDONLY)
t0 = time.time()
if mode == "each":
    for i in range(n):
        p = os.path.join(d, f"f{i}")
        fd = os.open(p + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, data); os.fdatasync(fd); os.close(fd)
        os.rename(p + ".tmp", p); os.fsync(dfd)
else:
    fds = []
    for i in range(n):
        p = os.path.join(d, f"f{i}")
        fd = os.open(p + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, data); fds.append((fd, p))
    os.sync() if mode == "sync" else None
    for fd, p in fds:
        if mode != "sync": os.fdatasync(fd)
        os.close(fd); os.rename(p + ".tmp", p)
    os.fsync(dfd)
dt = time.time() - t0
print(f"{mode}: {n/dt:.0f} files/s")
