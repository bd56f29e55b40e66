#!/usr/bin/env python3
"""Synthetic catalogue + query batch for the large-gallery recipe, and its checks.

    gen_gallery.py gallery --out DIR --rows N [--dim D] [--class-size 10] [--noise 0.6] [--seed 0]
    gen_gallery.py batch   --out DIR --gallery DIR --queries Q [--seed 1]
    gen_gallery.py check   --gallery DIR --batch DIR --neighbors nn.parquet --catalog catalog.parquet \
                           [--sample 100] [--show 3]

`gallery` writes, streamed (memory stays ~ one chunk, whatever N):
    DIR/catalog.csv          label,path,split,is_query,is_gallery: every row a validation
                             gallery item (is_query=False), paths that need not exist
    DIR/emb.npy, emb.ids.npy float32 [N, D] and the ids 0..N-1 (a CSV row's id is its position)
    DIR/gen.json             the generation parameters (read by `batch`)
Rows come in identities (labels) of 1..2*class_size-1 items around a Gaussian centre:
item = centre + noise * N(0, I), centre ~ N(0, I). Centres are drawn per block of labels from a
seed derived from (seed, block), so a query batch regenerates any centre without storing them.

`batch` writes DIR/batch.csv (a `path` column alone: an unlabelled inference set),
DIR/emb.npy + emb.ids.npy (new samples of random catalogue identities) and DIR/truth.npy (each
query's generating label, for the check only: simile never sees it).

`check` reads neighbors.parquet (pyarrow) and:
- brute-forces `--sample` random queries against the whole gallery in float64 (streamed in
  chunks) and requires simile's neighbour lists to equal it: the same distances (within 1e-6
  relative: both are rounded once from float64) and the same ids, up to ties in float32
  distance;
- reports top-1 identity accuracy of the whole batch against truth.npy;
- prints `--show` queries with their neighbours and labels.
Exit status 1 when the brute-force comparison fails.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

BLOCK = 4096  # labels per centre block
CHUNK = 262_144  # rows per streamed chunk (128 MiB of float32 at D = 128)


def centres(seed, dim, block):
    rng = np.random.default_rng([seed, 1, block])
    return rng.standard_normal((BLOCK, dim), dtype=np.float32)


def write_npy_header(f, shape, descr):
    np.lib.format.write_array_header_1_0(
        f, {"descr": descr, "fortran_order": False, "shape": tuple(shape)}
    )


def atomic_open(path, mode="wb"):
    tmp = f"{path}.tmp.{os.getpid()}"
    return tmp, open(tmp, mode)


def class_sizes(rows, mean, seed):
    """Label sizes in 1..2*mean-1 summing to exactly `rows` (the last one trimmed)."""
    rng = np.random.default_rng([seed, 0])
    sizes = rng.integers(1, 2 * mean, size=rows // mean * 2 + 16)
    cum = np.cumsum(sizes)
    n = int(np.searchsorted(cum, rows)) + 1
    sizes = sizes[:n].copy()
    sizes[-1] -= int(cum[n - 1] - rows)
    assert sizes.sum() == rows and sizes.min() >= 1
    return sizes


def cmd_gallery(a):
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    sizes = class_sizes(a.rows, a.class_size, a.seed)
    labels = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    emb_p = os.path.join(a.out, "emb.npy")
    ids_p = os.path.join(a.out, "emb.ids.npy")
    csv_p = os.path.join(a.out, "catalog.csv")
    tmp_e, fe = atomic_open(emb_p)
    tmp_c, fc = atomic_open(csv_p, "w")
    with fe, fc:
        write_npy_header(fe, (a.rows, a.dim), "<f4")
        fc.write("label,path,split,is_query,is_gallery\n")
        cache = {}
        for s in range(0, a.rows, CHUNK):
            e = min(s + CHUNK, a.rows)
            lab = labels[s:e]
            # Centres of the label blocks this chunk touches (labels are contiguous).
            blocks = range(int(lab[0]) // BLOCK, int(lab[-1]) // BLOCK + 1)
            cache = {b: cache.get(b) if b in cache else centres(a.seed, a.dim, b) for b in blocks}
            c = np.empty((e - s, a.dim), dtype=np.float32)
            for b in blocks:
                m = (lab // BLOCK) == b
                c[m] = cache[b][lab[m] % BLOCK]
            rng = np.random.default_rng([a.seed, 2, s])
            x = c + np.float32(a.noise) * rng.standard_normal((e - s, a.dim), dtype=np.float32)
            fe.write(np.ascontiguousarray(x, dtype="<f4").tobytes())
            fc.write(
                "".join(
                    f"{l},g/{i:08d}.jpg,validation,False,True\n"
                    for i, l in zip(range(s, e), lab.tolist())
                )
            )
            if sys.stderr.isatty():
                print(f"\rgallery: {e:,}/{a.rows:,} rows", end="", file=sys.stderr, flush=True)
        if sys.stderr.isatty():
            print(file=sys.stderr)
    np.save(ids_p + ".tmp.npy", np.arange(a.rows, dtype=np.int64))
    os.replace(ids_p + ".tmp.npy", ids_p)
    os.replace(tmp_c, csv_p)
    os.replace(tmp_e, emb_p)
    meta = dict(
        rows=a.rows, dim=a.dim, labels=int(len(sizes)), class_size=a.class_size,
        noise=a.noise, seed=a.seed, seconds=round(time.time() - t0, 1),
    )
    with open(os.path.join(a.out, "gen.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"gallery: {a.rows:,} x {a.dim} in {meta['labels']:,} identities, {meta['seconds']} s",
          file=sys.stderr)


def cmd_batch(a):
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.gallery, "gen.json")) as f:
        g = json.load(f)
    rng = np.random.default_rng([a.seed, 3])
    truth = rng.integers(0, g["labels"], size=a.queries).astype(np.int64)
    x = np.empty((a.queries, g["dim"]), dtype=np.float32)
    for b in np.unique(truth // BLOCK):
        m = (truth // BLOCK) == b
        x[m] = centres(g["seed"], g["dim"], int(b))[truth[m] % BLOCK]
    x += np.float32(g["noise"]) * rng.standard_normal(x.shape, dtype=np.float32)
    with open(os.path.join(a.out, "batch.csv.tmp"), "w") as f:
        f.write("path\n")
        f.write("".join(f"q/{i:08d}.jpg\n" for i in range(a.queries)))
    os.replace(os.path.join(a.out, "batch.csv.tmp"), os.path.join(a.out, "batch.csv"))
    for name, arr in (("emb.ids", np.arange(a.queries, dtype=np.int64)), ("truth", truth), ("emb", x)):
        p = os.path.join(a.out, name + ".tmp.npy")
        np.save(p, arr)
        os.replace(p, os.path.join(a.out, name + ".npy"))
    print(f"batch: {a.queries:,} queries of random catalogue identities", file=sys.stderr)


def read_neighbors(path):
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["query_id", "rank", "gallery_id", "distance"])
    return {c: t.column(c).to_numpy() for c in t.column_names}


def brute_force(gal, q, k, extra=32):
    """k + extra nearest rows of every query by l2, distances in float64, streamed."""
    qn = (q.astype(np.float64) ** 2).sum(1)
    qd = q.astype(np.float64)
    best_d = np.full((len(q), 0), np.inf)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    keep = k + extra
    for s in range(0, gal.shape[0], CHUNK):
        g = np.asarray(gal[s : s + CHUNK], dtype=np.float64)
        d2 = qn[:, None] + (g * g).sum(1)[None, :] - 2.0 * qd @ g.T
        np.maximum(d2, 0, out=d2)
        kk = min(keep, d2.shape[1])
        part = np.argpartition(d2, kk - 1, axis=1)[:, :kk]
        best_d = np.concatenate([best_d, np.take_along_axis(d2, part, 1)], 1)
        best_i = np.concatenate([best_i, part + s], 1)
        if best_d.shape[1] > keep:
            o = np.argpartition(best_d, keep - 1, axis=1)[:, :keep]
            best_d = np.take_along_axis(best_d, o, 1)
            best_i = np.take_along_axis(best_i, o, 1)
    # Re-score the survivors directly (no expansion), as simile reports them.
    out_d, out_i = [], []
    for r in range(len(q)):
        ids = np.sort(best_i[r])
        rows = np.asarray(gal[ids], dtype=np.float64)
        d = np.sqrt(((rows - qd[r]) ** 2).sum(1)).astype(np.float32)
        o = np.lexsort((ids, d))
        out_d.append(d[o])
        out_i.append(ids[o])
    return out_d, out_i


def cmd_check(a):
    t0 = time.time()
    nn = read_neighbors(a.neighbors)
    gal = np.load(os.path.join(a.gallery, "emb.npy"), mmap_mode="r")
    gids = np.load(os.path.join(a.gallery, "emb.ids.npy"), mmap_mode="r")
    qemb = np.load(os.path.join(a.batch, "emb.npy"))
    truth = np.load(os.path.join(a.batch, "truth.npy"))
    import pyarrow.parquet as pq

    cat = pq.read_table(a.catalog, columns=["id", "label"])
    label_of = np.empty(int(cat.column("id").to_numpy().max()) + 1, dtype=np.int64)
    label_of[cat.column("id").to_numpy()] = cat.column("label").to_numpy()
    qid, rank, gid, dist = nn["query_id"], nn["rank"], nn["gallery_id"], nn["distance"]
    if not (np.all(np.diff(qid) >= 0)):
        sys.exit("check: neighbors.parquet is not sorted by query_id")
    k = int(rank.max())
    starts = np.searchsorted(qid, np.arange(len(qemb) + 1))
    # Top-1 identity accuracy of the whole batch (gallery ids are catalogue row ids).
    first = starts[:-1][starts[:-1] < starts[1:]]
    acc = float(np.mean(label_of[gid[first]] == truth[qid[first]]))
    print(f"check: {len(qemb):,} queries, k = {k}: top-1 identity = generating identity for "
          f"{acc:.4f} of them")
    # Brute force on a sample.
    rng = np.random.default_rng(7)
    sample = np.sort(rng.choice(len(qemb), size=min(a.sample, len(qemb)), replace=False))
    assert np.array_equal(np.asarray(gids[:10]), np.arange(min(10, len(gids))))
    bd, bi = brute_force(gal, qemb[sample], k)
    bad = 0
    for j, q in enumerate(sample):
        s, e = starts[q], starts[q + 1]
        sd, si = dist[s:e], gid[s:e]
        rd, ri = bd[j][: e - s], bi[j][: e - s]
        ok = e - s == min(k, len(gids)) and np.allclose(sd, rd, rtol=1e-6, atol=0)
        if ok:
            # Ids equal except where float32 distances tie (then either id is right).
            kth = rd[-1]
            tied = set(bi[j][bd[j] == kth].tolist())
            for a_, b_, d_ in zip(si, ri, rd):
                if a_ != b_ and not (d_ == kth and a_ in tied):
                    ok = False
        if not ok:
            bad += 1
            if bad <= 3:
                pairs = lambda i, d: list(zip(i[:5].tolist(), d[:5].tolist()))
                print(f"  query {q}: simile {pairs(si, sd)} vs brute force {pairs(ri, rd)}")
    print(f"check: {len(sample)} sampled queries vs float64 brute force over {len(gids):,} "
          f"gallery rows: {len(sample) - bad} equal, {bad} differ ({time.time() - t0:.1f} s)")
    for q in range(min(a.show, len(qemb))):
        s, e = starts[q], starts[q + 1]
        items = ", ".join(
            f"{g} (label {label_of[g]}, {d:.3f})" for g, d in zip(gid[s:min(e, s + 3)], dist[s:e])
        )
        print(f"  query {q} (generated from label {truth[q]}): {items}")
    sys.exit(1 if bad else 0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gallery")
    g.add_argument("--out", required=True)
    g.add_argument("--rows", type=int, required=True)
    g.add_argument("--dim", type=int, default=128)
    g.add_argument("--class-size", type=int, default=10)
    g.add_argument("--noise", type=float, default=0.6)
    g.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("batch")
    b.add_argument("--out", required=True)
    b.add_argument("--gallery", required=True)
    b.add_argument("--queries", type=int, required=True)
    b.add_argument("--seed", type=int, default=1)
    c = sub.add_parser("check")
    c.add_argument("--gallery", required=True)
    c.add_argument("--batch", required=True)
    c.add_argument("--neighbors", required=True)
    c.add_argument("--catalog", required=True)
    c.add_argument("--sample", type=int, default=100)
    c.add_argument("--show", type=int, default=3)
    a = p.parse_args()
    {"gallery": cmd_gallery, "batch": cmd_batch, "check": cmd_check}[a.cmd](a)


if __name__ == "__main__":
    main()
