#!/usr/bin/env python3
"""Runs a command and prints one JSON line: its wall seconds, its peak anonymous memory (the
largest RssAnon of /proc/<pid>/status, sampled every 10 ms: heap and other private memory,
not the file-backed pages of memory-mapped inputs) and its peak resident set (VmHWM, which
counts those pages too), both in MiB, and its exit code.

    peak_rss.py CMD [ARGS...]
"""
import json
import subprocess
import sys
import time


def status(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("RssAnon", "VmHWM"):
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


t0 = time.time()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
anon, hwm = 0, 0
while p.poll() is None:
    s = status(p.pid)
    anon = max(anon, s.get("RssAnon", 0))
    hwm = max(hwm, s.get("VmHWM", 0))
    time.sleep(0.01)
print(json.dumps({"wall_s": round(time.time() - t0, 2), "peak_anon_mib": round(anon / 1024, 1),
                  "peak_rss_mib": round(hwm / 1024, 1), "exit": p.returncode}))
