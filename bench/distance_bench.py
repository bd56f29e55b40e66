"""simile-distance vs FAISS IndexFlatL2 / IndexFlatIP on identical random inputs, same run.

Run through bench/distance_vs_faiss.sh (it builds simile and prepares the virtualenv).
Reports seconds, effective GFLOP/s (2*Q*G*D / time), the ratio simile/FAISS throughput,
recall of the exact top-k (float64 brute force on a sample of queries, ties counted as
hits), and for the large gallery the peak anonymous and file-backed memory of each.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_dataset(path, n_query, n_gallery):
    """A simile dataset.parquet: ids 0..Q-1 are queries, Q..Q+G-1 the gallery (validation)."""
    n = n_query + n_gallery
    nulls_s = pa.nulls(n, pa.string())
    nulls_i = pa.nulls(n, pa.int32())
    is_q = np.zeros(n, dtype=bool)
    is_q[:n_query] = True
    table = pa.table(
        {
            "id": pa.array(np.arange(n, dtype=np.int64)),
            "label": pa.array(np.zeros(n, dtype=np.int64)),
            "path": nulls_s,
            "text": nulls_s,
            "split": pa.array(["validation"] * n, pa.string()),
            "is_query": pa.array(is_q),
            "is_gallery": pa.array(~is_q),
            "category": nulls_s,
            "sequence": nulls_s,
            "x_1": nulls_i,
            "x_2": nulls_i,
            "y_1": nulls_i,
            "y_2": nulls_i,
        }
    )
    schema = pa.schema(
        [pa.field("id", pa.int64(), nullable=False)] + [f for f in table.schema][1:]
    ).with_metadata(
        {
            "simile.artifact": "dataset",
            "simile.schema_version": "1",
            "simile.root": ".",
            "simile.source": "bench/distance_bench.py",
            "simile.source_kind": "csv",
            "simile.source_fingerprint": "",
            "simile.modality": "text",
        }
    )
    pq.write_table(table.cast(schema), path)


def write_embeddings(path, q, g_chunks):
    """emb.npy = [queries; gallery], float32, written in chunks (the gallery may be large)."""
    n = q.shape[0] + sum(c.shape[0] for c in g_chunks)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, q.shape[1]))
    mm[: q.shape[0]] = q
    at = q.shape[0]
    for c in g_chunks:
        mm[at : at + c.shape[0]] = c
        at += c.shape[0]
    mm.flush()
    del mm


class Peak:
    """Polls /proc/<pid>/status for the peak RssAnon and RssFile (kB) of a process."""

    def __init__(self, pid):
        self.pid, self.anon, self.file, self.stop = pid, 0, 0, False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stop:
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            self.anon = max(self.anon, int(line.split()[1]))
                        elif line.startswith("RssFile:"):
                            self.file = max(self.file, int(line.split()[1]))
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.02)

    def done(self):
        self.stop = True
        self.t.join()
        return self.anon / 1024, self.file / 1024


def self_status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("RssAnon", "RssFile", "VmHWM"):
                out[k] = int(v.split()[0]) / 1024
    return out


def run_simile(binary, work, metric, k, threads, compute="fp32", extra=()):
    out = os.path.join(work, f"nn-{metric}-{k}-{compute}.parquet")
    cmd = [
        binary,
        "--dataset", os.path.join(work, "dataset.parquet"),
        "--embeddings", os.path.join(work, "emb.npy"),
        "--out", out,
        "--top-k", str(k),
        "--metric", metric,
        "--threads", str(threads),
        "--device", "cpu",
        "--compute", compute,
        *extra,
    ]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    peak = Peak(p.pid)
    err = p.stderr.read()
    # wait4 gives the child's CPU time (all threads): on a shared machine the wall clock
    # depends on the neighbours, CPU seconds much less.
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    cpu = ru.ru_utime + ru.ru_stime
    anon, filemb = peak.done()
    if p.returncode != 0:
        sys.exit(f"simile-distance failed ({p.returncode}): {err}")
    with open(out + ".manifest.json") as f:
        man = json.load(f)
    t = pq.read_table(out, columns=["query_id", "gallery_id"])
    qid = t.column("query_id").to_numpy()
    gid = t.column("gallery_id").to_numpy()
    return {
        "wall": wall,
        "cpu": cpu,
        "search": man["timings_s"].get("search", wall),
        "anon_mb": anon,
        "file_mb": filemb,
        "qid": qid,
        "gid": gid,
        "summary": err.strip().splitlines()[-1] if err.strip() else "",
    }


def simile_lists(res, n_query, n_gallery_offset, k):
    """Gallery positions per query (ids Q.. are gallery rows 0..)."""
    lists = [[] for _ in range(n_query)]
    for q, g in zip(res["qid"], res["gid"]):
        lists[q].append(g - n_gallery_offset)
    return lists


def exact_recall(q, g, lists, metric, k, sample):
    """Recall of the exact top-k on `sample` queries, float64; ties at the k-th count as hits."""
    hits = total = 0
    g64 = None
    for qi in sample:
        qv = q[qi].astype(np.float64)
        if metric == "l2":
            d = np.empty(g.shape[0])
            for a in range(0, g.shape[0], 1 << 18):
                gb = g[a : a + (1 << 18)].astype(np.float64)
                d[a : a + gb.shape[0]] = np.sqrt(((gb - qv) ** 2).sum(1))
        else:
            if g64 is None and g.shape[0] <= 200_000:
                g64 = g.astype(np.float64)
            d = -(g64 @ qv) if g64 is not None else -(g.astype(np.float64) @ qv)
        kth = np.partition(d, k - 1)[k - 1]
        found = np.asarray(lists[qi][:k], dtype=np.int64)
        hits += int((d[found] <= kth + 1e-9 * abs(kth) + 1e-12).sum())
        total += k
    return hits / total


def run_faiss(q, g, metric, k, threads):
    import faiss

    faiss.omp_set_num_threads(threads)
    d = q.shape[1]
    index = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
    before = self_status()
    t0, c0 = time.perf_counter(), time.process_time()
    index.add(g)
    _, ids = index.search(q, k)
    t, c = time.perf_counter() - t0, time.process_time() - c0
    after = self_status()
    del index
    return {"wall": t, "cpu": c, "ids": ids, "anon_mb": after["RssAnon"] - before["RssAnon"]}


def gflops(nq, ng, d, t):
    return 2.0 * nq * ng * d / t / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--simile", required=True)
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "simile-bench-distance"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the script")
    ap.add_argument("--skip-large", action="store_true", help="skip the 2M-row gallery")
    ap.add_argument("--large-queries", type=int, default=2000)
    ap.add_argument("--recall-sample", type=int, default=200)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--repeat", type=int, default=1, help="best of N runs of each (noisy machines)")
    ap.add_argument("--only", help="what to run, comma-separated: 128, 512, large (default: all)")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    rng = np.random.default_rng(0)
    n = 5_000 if a.quick else 50_000
    only = a.only.split(",") if a.only else ["128", "512", "large"]
    dims = [int(x) for x in only if x.isdigit()]
    sizes = [(n, n, d) for d in dims]
    best = lambda runs: min(runs, key=lambda r: r["wall"])
    rows = []
    print(f"threads={a.threads}  simile={a.simile}", flush=True)
    hdr = ("| case | Q | G | D | k | FAISS s | FAISS GFLOP/s | simile s (search) | simile GFLOP/s | ratio "
           "| FAISS cpu-s | simile cpu-s | ratio (cpu) | recall FAISS | recall simile |")
    print(hdr)
    print("|" + "---|" * 15)
    for nq, ng, d in sizes:
        q = rng.standard_normal((nq, d), dtype=np.float32)
        g = rng.standard_normal((ng, d), dtype=np.float32)
        write_dataset(os.path.join(a.work, "dataset.parquet"), nq, ng)
        write_embeddings(os.path.join(a.work, "emb.npy"), q, [g])
        sample = rng.choice(nq, size=min(a.recall_sample, nq), replace=False)
        cases = [("l2", 10, "fp32"), ("l2", 100, "fp32"), ("dot", 10, "fp32"), ("dot", 100, "fp32"),
                 ("l2", 10, "bf16"), ("l2", 100, "bf16")]
        faiss_cache = {}
        for metric, k, compute in cases:
            if (metric, k) not in faiss_cache:
                faiss_cache[(metric, k)] = best([run_faiss(q, g, metric, k, a.threads) for _ in range(a.repeat)])
            f = faiss_cache[(metric, k)]
            s = best([run_simile(a.simile, a.work, metric, k, a.threads, compute) for _ in range(a.repeat)])
            lists = simile_lists(s, nq, nq, k)
            rf = exact_recall(q, g, f["ids"], metric, k, sample)
            rs = exact_recall(q, g, lists, metric, k, sample)
            gf = gflops(nq, ng, d, f["wall"])
            gs = gflops(nq, ng, d, s["wall"])
            name = f"Flat{'L2' if metric == 'l2' else 'IP'} vs {metric} {compute}"
            row = dict(case=name, Q=nq, G=ng, D=d, k=k, faiss_s=f["wall"], faiss_gflops=gf,
                       simile_s=s["wall"], simile_search_s=s["search"], simile_gflops=gs,
                       ratio=gs / gf, faiss_cpu=f["cpu"], simile_cpu=s["cpu"],
                       ratio_cpu=f["cpu"] / s["cpu"], recall_faiss=rf, recall_simile=rs)
            rows.append(row)
            print(f"| {name} | {nq} | {ng} | {d} | {k} | {f['wall']:.2f} | {gf:.1f} | "
                  f"{s['wall']:.2f} ({s['search']:.2f}) | {gs:.1f} | {gs / gf:.2f}x | "
                  f"{f['cpu']:.1f} | {s['cpu']:.1f} | {f['cpu'] / s['cpu']:.2f}x | {rf:.4f} | {rs:.4f} |",
                  flush=True)
        del q, g
    if not a.skip_large and "large" in only:
        nq, ng, d = (a.large_queries, 200_000 if a.quick else 2_000_000, 128)
        q = rng.standard_normal((nq, d), dtype=np.float32)
        chunks = [rng.standard_normal((min(250_000, ng - i), d), dtype=np.float32)
                  for i in range(0, ng, 250_000)]
        write_dataset(os.path.join(a.work, "dataset.parquet"), nq, ng)
        write_embeddings(os.path.join(a.work, "emb.npy"), q, chunks)
        g = np.concatenate(chunks)
        del chunks
        f = run_faiss(q, g, "l2", 10, a.threads)
        # Drop our gallery copy before simile runs: its memory is measured separately anyway.
        s = run_simile(a.simile, a.work, "l2", 10, a.threads)
        lists = simile_lists(s, nq, nq, 10)
        sample = rng.choice(nq, size=min(50, nq), replace=False)
        rf = exact_recall(q, g, f["ids"], "l2", 10, sample)
        rs = exact_recall(q, g, lists, "l2", 10, sample)
        gf, gs = gflops(nq, ng, d, f["wall"]), gflops(nq, ng, d, s["wall"])
        print()
        print("| large gallery | Q | G | D | k | FAISS s | simile s (search) | ratio | FAISS cpu-s | simile cpu-s "
              "| simile peak RssAnon MB | simile peak RssFile MB | FAISS index RssAnon MB | recall FAISS | recall simile |")
        print("|" + "---|" * 15)
        print(f"| FlatL2 vs l2 | {nq} | {ng} | {d} | 10 | {f['wall']:.2f} | {s['wall']:.2f} ({s['search']:.2f}) | "
              f"{gs / gf:.2f}x | {f['cpu']:.1f} | {s['cpu']:.1f} | {s['anon_mb']:.0f} | {s['file_mb']:.0f} | "
              f"{f['anon_mb']:.0f} | {rf:.4f} | {rs:.4f} |",
              flush=True)
        rows.append(dict(case="large", Q=nq, G=ng, D=d, k=10, faiss_s=f["wall"], simile_s=s["wall"],
                         simile_search_s=s["search"], ratio=gs / gf, simile_anon_mb=s["anon_mb"],
                         simile_file_mb=s["file_mb"], faiss_anon_mb=f["anon_mb"],
                         recall_faiss=rf, recall_simile=rs))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
