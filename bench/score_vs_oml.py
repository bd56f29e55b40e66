"""simile-score vs OML 4.0's calc_retrieval_metrics on the same neighbours, in one run.

Generates a dataset (simile's dataset.parquet) and neighbour lists for N queries x k, written
both as simile's neighbors.parquet and as the tensors OML's metric call takes; times simile's
whole process (read Parquet, ground truth, metrics, write metrics.json) and OML's metric call
alone; checks the numbers agree within 1e-6; prints the ratio and simile's peak memory.
Run it through bench/score_vs_oml.sh, which makes the virtualenv and builds simile.
"""
import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

# io::Fingerprint (src/io.rs): size, first and last 64 KiB, 64 sampled 4 KiB blocks.
BLOCK = 64 << 20


def fingerprint(path):
    """simile's dataset fingerprint (src/io.rs): the xxh3 of the content for a file of one
    64 MiB block, else the xxh3 of its size and every block's xxh3 (little-endian u64s)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= BLOCK:
            return "xxh3:%016x" % xxhash.xxh3_64_intdigest(f.read())
        h = xxhash.xxh3_64()
        h.update(struct.pack("<Q", size))
        while True:
            block = f.read(BLOCK)
            if not block:
                break
            h.update(struct.pack("<Q", xxhash.xxh3_64_intdigest(block)))
    return "xxh3:%016x" % h.intdigest()


def labels_for(n, rng):
    """Contiguous classes of 2..12 items: (labels, class start of each item, class size)."""
    sizes = rng.integers(2, 13, size=n // 2 + 1)
    cs = np.cumsum(sizes)
    last = int(np.searchsorted(cs, n))
    sizes = sizes[: last + 1].copy()
    sizes[-1] -= cs[last] - n
    if sizes[-1] < 2:  # fold a remainder of 0 or 1 into the previous class
        sizes[-2] += sizes[-1]
        sizes = sizes[:-1]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return labels, np.repeat(starts, sizes), np.repeat(sizes, sizes)


def write_dataset(path, labels):
    n = len(labels)
    nulls_s = pa.nulls(n, pa.string())
    nulls_i = pa.nulls(n, pa.int32())
    t = pa.table(
        {
            "id": pa.array(np.arange(n, dtype=np.int64)),
            "label": pa.array(labels.astype(np.int64)),
            "path": nulls_s,
            "text": nulls_s,
            "split": pa.array(["validation"] * n, pa.string()),
            "is_query": pa.array(np.ones(n, dtype=bool)),
            "is_gallery": pa.array(np.ones(n, dtype=bool)),
            "category": nulls_s,
            "sequence": nulls_s,
            "x_1": nulls_i,
            "x_2": nulls_i,
            "y_1": nulls_i,
            "y_2": nulls_i,
        }
    )
    meta = {
        "simile.artifact": "dataset",
        "simile.schema_version": "1",
        "simile.root": ".",
        "simile.source": "bench/score_vs_oml.py",
        "simile.source_kind": "csv",
        "simile.source_fingerprint": "",
        "simile.modality": "image",
    }
    t = t.replace_schema_metadata(meta)
    pq.write_table(t, path, compression="snappy")


def neighbours(starts, sizes, k, rng, q0, q1):
    """Lists of queries q0..q1: kept positives (each with p = 0.8) and random negatives,
    ordered by a score that favours positives. Returns (ids [n, k], dists [n, k])."""
    n_all = len(starts)
    q = np.arange(q0, q1)
    s, m = starts[q0:q1, None], sizes[q0:q1, None]
    maxpos = int(sizes.max()) - 1
    j = np.arange(maxpos)[None, :]
    pos = s + j + (j >= (q[:, None] - s))
    pos_ok = (j < m - 1) & (rng.random((q1 - q0, maxpos)) < 0.8)
    # Negatives: uniform over the other classes, distinct within a row.
    r = rng.integers(0, n_all - m, size=(q1 - q0, k))
    neg = np.where(r < s, r, r + m)
    while True:
        srt = np.sort(neg, axis=1)
        dup_rows = np.nonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))[0]
        if len(dup_rows) == 0:
            break
        for row in dup_rows:
            vals, first = np.unique(neg[row], return_index=True)
            bad = np.setdiff1d(np.arange(k), first)
            rr = rng.integers(0, n_all - m[row, 0], size=len(bad))
            neg[row, bad] = np.where(rr < s[row, 0], rr, rr + m[row, 0])
    cand = np.concatenate([pos, neg], axis=1)
    score = np.concatenate(
        [
            np.where(pos_ok, rng.random((q1 - q0, maxpos)), np.inf),
            0.3 + rng.random((q1 - q0, k)),
        ],
        axis=1,
    )
    order = np.argsort(score, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(cand, order, axis=1)
    dists = np.take_along_axis(score, order, axis=1).astype(np.float32)
    return ids, dists


def write_neighbours(path, ds_path, starts, sizes, k, rng, chunk=100_000):
    n = len(starts)
    schema = pa.schema(
        [
            pa.field("query_id", pa.int64(), nullable=False),
            pa.field("rank", pa.int32(), nullable=False),
            pa.field("gallery_id", pa.int64(), nullable=False),
            pa.field("distance", pa.float32(), nullable=False),
        ]
    ).with_metadata(
        {
            "simile.artifact": "neighbors",
            "simile.schema_version": "1",
            "simile.metric": "l2",
            "simile.k": str(k),
            "simile.split": "validation",
            "simile.dataset": os.path.abspath(ds_path),
            "simile.dataset_fingerprint": fingerprint(ds_path),
            "simile.n_queries": str(n),
            "simile.n_gallery": str(n),
            "simile.exclusions": "self,sequence",
            "simile.complete": "true",
        }
    )
    all_ids = np.empty((n, k), dtype=np.int64)
    rank = np.tile(np.arange(1, k + 1, dtype=np.int32), chunk)
    with pq.ParquetWriter(path, schema, compression="snappy") as w:
        for q0 in range(0, n, chunk):
            q1 = min(q0 + chunk, n)
            ids, d = neighbours(starts, sizes, k, rng, q0, q1)
            all_ids[q0:q1] = ids
            t = pa.table(
                {
                    "query_id": np.repeat(np.arange(q0, q1, dtype=np.int64), k),
                    "rank": rank[: (q1 - q0) * k],
                    "gallery_id": ids.reshape(-1),
                    "distance": d.reshape(-1),
                },
                schema=schema,
            )
            w.write_table(t, row_group_size=1 << 20)
    return all_ids


def run_simile(exe, args, repeats):
    times, peaks = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        p = subprocess.run(
            ["/usr/bin/time", "-f", "%M", exe] + args, capture_output=True, text=True
        )
        times.append(time.perf_counter() - t0)
        if p.returncode != 0:
            sys.exit(f"simile-score failed:\n{p.stderr}")
        peaks.append(int(p.stderr.strip().splitlines()[-1]))
    return times, peaks, p.stderr


def ci_cost(a, ds, nb, out):
    """What the confidence intervals add to simile-score's time: the same scoring with
    intervals off, over labels (the default) and over queries, in one run."""
    base = ["--dataset", ds, "--neighbors", nb, "--out", out, "--force"]
    rows = []
    for name, extra in (("--ci off", ["--ci", "off"]), ("--ci-by label (default)", []),
                        ("--ci-by query", ["--ci-by", "query"])):
        times, peaks, _ = run_simile(a.simile, base + extra, a.repeats)
        timings = json.load(open(out + ".manifest.json"))["timings_s"]
        rows.append((name, statistics.median(times), max(peaks) / 1024,
                     timings.get("intervals"), json.load(open(out))))
    off = rows[0][1]
    print(f"\n| simile-score, {a.queries:,} queries x k = {a.k} | whole process (median of {a.repeats}) "
          f"| intervals step | over --ci off | peak RSS |\n|---|---|---|---|---|")
    for name, t, peak, iv, _ in rows:
        step = f"{iv:.2f} s" if iv is not None else "-"
        print(f"| {name} | {t:.2f} s | {step} | {100 * (t - off) / off:+.0f}% | {peak:.0f} MiB |")
    m = rows[1][4]
    for key in ("OVERALL/cmc/1", "OVERALL/map/5"):
        print(f"{key}: {m[key]:.6f}, label interval [{m[key + '/ci_low']:.6f}, {m[key + '/ci_high']:.6f}], "
              f"query interval [{rows[2][4][key + '/ci_low']:.6f}, {rows[2][4][key + '/ci_high']:.6f}]")
    for _, _, _, _, got in rows[1:]:
        for k, v in rows[0][4].items():
            if got[k] != v:
                sys.exit(f"{k}: {got[k]} with intervals, {v} without")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--simile", required=True)
    ap.add_argument("--queries", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "simile-bench-score"))
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the files in --workdir from a previous run of the same size")
    ap.add_argument("--no-oml", action="store_true", help="time simile only")
    ap.add_argument("--ci-cost", action="store_true",
                    help="time simile with --ci off, --ci-by label and --ci-by query (no OML)")
    a = ap.parse_args()

    os.makedirs(a.workdir, exist_ok=True)
    ds = os.path.join(a.workdir, "dataset.parquet")
    nb = os.path.join(a.workdir, "neighbors.parquet")
    out = os.path.join(a.workdir, "metrics.json")
    rng = np.random.default_rng(20240501)
    t0 = time.perf_counter()
    labels, starts, sizes = labels_for(a.queries, rng)
    if a.reuse and os.path.exists(nb):
        ids = pq.read_table(nb, columns=["gallery_id"])["gallery_id"].to_numpy().reshape(a.queries, a.k)
    else:
        write_dataset(ds, labels)
        ids = write_neighbours(nb, ds, starts, sizes, a.k, rng)
    print(f"generated {a.queries} queries x k={a.k} in {time.perf_counter() - t0:.1f} s "
          f"({os.path.getsize(nb) / 2**20:.0f} MiB of neighbours)", file=sys.stderr)
    if a.ci_cost:
        ci_cost(a, ds, nb, out)
        return
    if a.no_oml:
        args = ["--dataset", ds, "--neighbors", nb, "--out", out]
        times, peaks, log = run_simile(a.simile, args, a.repeats)
        print(f"simile: {[round(t, 2) for t in times]} s, peak {max(peaks) / 1024:.0f} MiB", file=sys.stderr)
        print(open(out + ".manifest.json").read().split('"timings_s"')[1][:400], file=sys.stderr)
        return

    import torch
    from oml.functional.metrics import calc_retrieval_metrics

    # OML's inputs: retrieved gallery indices and every positive of each query.
    retrieved = list(torch.from_numpy(ids))
    ar = np.arange(a.queries)
    gt = [torch.from_numpy(np.delete(np.arange(s, s + m), q - s))
          for q, s, m in zip(ar, starts, sizes)]
    cmc, prec, mapk = (1, 5), (5,), (5,)
    t0 = time.perf_counter()
    oml = calc_retrieval_metrics(retrieved, gt, cmc_top_k=cmc, precision_top_k=prec,
                                 map_top_k=mapk, reduce=True, verbose=False)
    t_oml = time.perf_counter() - t0
    del retrieved, gt

    args = ["--dataset", ds, "--neighbors", nb, "--out", out,
            "--cmc", ",".join(map(str, cmc)), "--precision", ",".join(map(str, prec)),
            "--map", ",".join(map(str, mapk))]
    times, peaks, log = run_simile(a.simile, args, a.repeats)
    t_simile = statistics.median(times)
    got = json.load(open(out))
    worst = 0.0
    for fam, ks in (("cmc", cmc), ("precision", prec), ("map", mapk)):
        for k in ks:
            o = float(oml[fam][k])
            s = got[f"OVERALL/{fam}/{k}"]
            worst = max(worst, abs(o - s))
            print(f"  {fam}@{k}: simile {s:.8f}  OML {o:.8f}", file=sys.stderr)
    # Every metric simile has, for the record (not compared: OML lacks most of them).
    more = ["--cmc", "1,5,10,100", "--precision", "5,10,100", "--map", "5,10,100",
            "--ndcg", "10,100", "--recall", "10,100", "--map-at-r", "--r-precision", "--mrr",
            "--per-query", os.path.join(a.workdir, "per_query.parquet")]
    t_all, p_all, _ = run_simile(a.simile, args[:6] + more, 1)
    res = {
        "queries": a.queries,
        "k": a.k,
        "neighbour_rows": a.queries * a.k,
        "neighbours_file_mib": round(os.path.getsize(nb) / 2**20, 1),
        "oml_s": round(t_oml, 2),
        "simile_s": round(t_simile, 3),
        "simile_runs_s": [round(t, 3) for t in times],
        "ratio": round(t_oml / t_simile, 1),
        "simile_peak_rss_mib": round(max(peaks) / 1024),
        "max_abs_diff": worst,
        "simile_all_metrics_s": round(t_all[0], 3),
        "simile_all_metrics_peak_rss_mib": round(p_all[0] / 1024),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    print(f"\n| queries x k | OML calc_retrieval_metrics | simile-score (whole process) | ratio | simile peak RSS | max abs diff |\n"
          f"|---|---|---|---|---|---|\n"
          f"| {a.queries:,} x {a.k} | {t_oml:.1f} s | {t_simile:.2f} s | {t_oml / t_simile:.0f}x | "
          f"{max(peaks) / 1024:.0f} MiB | {worst:.1e} |")
    if worst > 1e-6:
        sys.exit(f"numbers differ by {worst} > 1e-6")


if __name__ == "__main__":
    main()
