"""The simile stages' command lines from a DAG run's params, shared by simile_dag.py (bash tasks,
any executor) and the Kubernetes variant in docs/pipelines.md (pods). Not a DAG file itself
(.airflowignore); Airflow puts the DAG folder on sys.path, so the DAG files import it.
"""

from __future__ import annotations

import shlex
from datetime import timedelta

from airflow.models.param import Param

# Every stage is idempotent (manifests), so a failed or lost task is simply run again: on a
# cluster a retry goes to whichever worker is free.
DEFAULT_ARGS = {"retries": 2, "retry_delay": timedelta(seconds=10)}

PARAMS = {
    "bin_dir": Param("/opt/simile/bin", type="string", description="folder of the six simile-* binaries"),
    "work_dir": Param("/tmp/simile-fontid", type="string", description="where every artifact is written"),
    # The input.
    "source": Param("fonts", enum=["fonts", "csv", "folder", "dataset"], description="what prepare reads"),
    "font_dir": Param("/usr/share/fonts/truetype/aenigma", type="string", description="source=fonts: TrueType fonts"),
    "max_fonts": Param(0, type="integer", minimum=0, description="source=fonts: keep only the first N font groups (0: all)"),
    "font_size": Param(64, type="integer", minimum=8, description="source=fonts: glyph image size in pixels"),
    "csv": Param("", type="string", description="source=csv: the OML-format CSV"),
    "csv_root": Param("", type="string", description="source=csv: folder its paths resolve against (default: the CSV's)"),
    "unlabeled": Param(False, type="boolean", description="source=csv: a CSV of `path` alone (an inference batch; no score)"),
    "images": Param("", type="string", description="source=folder: one sub-folder of images per label"),
    "val_fraction": Param(0.3, type="number", minimum=0, maximum=1, description="source=folder: labels held out"),
    "dataset": Param("", type="string", description="source=dataset: an existing dataset.parquet"),
    "prepare_args": Param("", type="string", description="extra simile-prepare flags, e.g. --skip-file-check"),
    # The model.
    "train": Param(True, type="boolean", description="train `config` on the dataset; false: embed with `model`"),
    "config": Param("/opt/simile/pipelines/configs/fontid.toml", type="string", description="training config (TOML)"),
    "train_set": Param("", type="string", description="extra simile-train flags, e.g. --set epochs=5"),
    "model": Param("", type="string", description="train=false: a zoo key (smallcnn) or a model folder"),
    # Embedding and search.
    "split": Param("auto", enum=["auto", "validation", "train", "inference", "all"],
                   description="rows embedded (and searched); auto: validation, or all when two-sided or search is off"),
    "search": Param(True, type="boolean", description="run distance (and rerank, score); false: embed only"),
    "gallery_dataset": Param("", type="string", description="two-sided: the cached gallery's dataset.parquet"),
    "gallery_embeddings": Param("", type="string", description="two-sided: its embeddings (made with `model`)"),
    "embed_shards": Param(4, type="integer", minimum=1),
    "distance_shards": Param(4, type="integer", minimum=1),
    "merge_shards": Param(2, type="integer", minimum=1,
                          description="parallel merges of the distance shards, one per query range (then joined)"),
    "top_k": Param(10, type="integer", minimum=1),
    "device": Param("auto", type="string", description="auto, cpu, cuda or cuda:<i>"),
    "threads": Param(0, type="integer", minimum=0,
                     description="CPU threads per stage process (0: all cores); with several task slots per worker, cores / slots"),
    "rerank": Param(False, type="boolean", description="run simile-rerank between distance and score (one dataset only)"),
    "rerank_method": Param("aqe", type="string", description="simile-rerank --method"),
    "score": Param(True, type="boolean", description="run simile-score (needs labelled queries)"),
    "force": Param(False, type="boolean", description="redo every stage even when it is up to date"),
}


def q(s) -> str:
    return shlex.quote(str(s))


def skip(why: str) -> str:
    # Exit code 99 marks the task skipped (BashOperator's skip_on_exit_code).
    return f"echo {q('skipped: ' + why)}; exit 99"


def build_commands(p: dict) -> dict:
    """Every stage's command line from a run's params; raises ValueError on a contradiction."""
    w = p["work_dir"].rstrip("/")
    b = p["bin_dir"].rstrip("/")
    f = " --force" if p["force"] else ""
    # --threads is not a parameter of any manifest: changing it redoes nothing.
    thr = f" --threads {int(p['threads'])}" if int(p["threads"]) > 0 else ""
    two_sided = bool(p["gallery_dataset"] or p["gallery_embeddings"])
    for k in ("bin_dir", "work_dir", "csv", "csv_root", "images", "dataset", "gallery_dataset", "gallery_embeddings"):
        if p[k] and not p[k].startswith("/"):
            raise ValueError(f"params.{k} must be an absolute path: {p[k]!r}")

    def need(key: str, why: str) -> str:
        if not str(p[key]).strip():
            raise ValueError(f"params.{key} is required {why}")
        return p[key]

    # The input.
    src = p["source"]
    ds = f"{w}/dataset.parquet"
    extra = f" {p['prepare_args']}" if p["prepare_args"].strip() else ""
    if src == "fonts":
        fonts = f" --max-fonts {int(p['max_fonts'])}" if int(p["max_fonts"]) > 0 else ""
        prepare = (f"{q(b)}/simile-prepare fonts --font-dir {q(p['font_dir'])} --out {q(w)}"
                   f" --size {int(p['font_size'])}{fonts}{extra}{f}")
    elif src == "csv":
        root = f" --root {q(p['csv_root'])}" if p["csv_root"] else ""
        unl = " --unlabeled" if p["unlabeled"] else ""
        prepare = (f"mkdir -p {q(w)} && {q(b)}/simile-prepare csv --csv {q(need('csv', 'with source=csv'))}"
                   f"{root}{unl} --out {q(ds)}{extra}{f}")
    elif src == "folder":
        prepare = (f"mkdir -p {q(w)} && {q(b)}/simile-prepare folder --images {q(need('images', 'with source=folder'))}"
                   f" --val-fraction {float(p['val_fraction'])} --out {q(ds)}{extra}{f}")
    else:
        ds = need("dataset", "with source=dataset")
        prepare = skip(f"source=dataset: {ds} is read as it is")
    unlabeled = src == "csv" and p["unlabeled"]

    # The model. A retry of a killed training run continues it from its last checkpoint (a
    # first attempt never does: an unfinished run found there is refused, as by hand).
    if p["train"]:
        if two_sided:
            raise ValueError("a two-sided run searches a cached gallery embedded with an existing model: "
                             "set train=false and model to that model")
        if p["model"]:
            raise ValueError("params.model is for train=false; with train=true the model is WORK/model")
        model = f"{w}/model"
        resume = (f'if [ "${{AIRFLOW_CTX_TRY_NUMBER:-1}}" -gt 1 ] && [ ! -f {q(model)}/model.safetensors.manifest.json ]'
                  f" && {{ [ -f {q(model)}/checkpoints/last/state.json ] || [ -f {q(model)}/checkpoints/.last.old/state.json ]; }};"
                  " then resume=--resume; echo 'retry: continuing the killed run (--resume)'; else resume=; fi; ")
        if p["force"]:  # --force starts over (and simile-train refuses it with --resume)
            resume = "resume=; "
        train = (f"{resume}{q(b)}/simile-train --dataset {q(ds)} --config {q(p['config'])} --out {q(model)}"
                 f" --device {q(p['device'])}{thr} {p['train_set']} $resume{f}")
    else:
        model = need("model", "with train=false (a zoo key such as smallcnn, or a model folder)")
        train = skip(f"train=false: embedding with {model}")

    # Embedding and search.
    if two_sided and not (p["gallery_dataset"] and p["gallery_embeddings"]):
        raise ValueError("a two-sided run needs both gallery_dataset and gallery_embeddings")
    search = bool(p["search"])
    split = p["split"]
    if split == "auto":
        split = "all" if two_sided or not search else "validation"
    if search and not two_sided and split not in ("validation", "train"):
        raise ValueError(f"searching one dataset needs split validation or train, not {split!r}")
    if p["rerank"] and two_sided:
        raise ValueError("simile-rerank works on one-dataset neighbours only: set rerank=false for a two-sided run")
    if unlabeled and search and not two_sided:
        raise ValueError("an unlabeled batch has no queries or gallery of its own: search it two-sided "
                         "(gallery_dataset, gallery_embeddings) or only embed it (search=false)")
    ne, nd = int(p["embed_shards"]), int(p["distance_shards"])
    emb, nb, rr = f"{w}/emb.npy", f"{w}/neighbors.parquet", f"{w}/reranked.parquet"
    emb_parts = " ".join(q(f"{w}/emb.part-{i}-of-{ne}.npy") for i in range(ne))
    nb_parts = " ".join(q(f"{w}/neighbors.part-{i}-of-{nd}.parquet") for i in range(nd))
    dev = f" --device {q(p['device'])}{thr}"
    embed = [
        f"{q(b)}/simile-embed --dataset {q(ds)} --model {q(model)} --split {split}{dev}"
        f" --out {q(emb)} --shard {i}/{ne}{f}"
        for i in range(ne)
    ]
    if two_sided:
        qsplit = f" --query-split {split}" if split != "all" else ""
        inputs = (f"--query-dataset {q(ds)} --query-embeddings {q(emb)}{qsplit}"
                  f" --gallery-dataset {q(p['gallery_dataset'])} --gallery-embeddings {q(p['gallery_embeddings'])}")
    else:
        inputs = f"--dataset {q(ds)} --embeddings {q(emb)} --split {split}"
    distance = [
        f"{q(b)}/simile-distance {inputs} --top-k {int(p['top_k'])}{dev} --out {q(nb)} --gallery-shard {i}/{nd}{f}"
        for i in range(nd)
    ] if search else []
    off = "search=false (embed only)"
    # The gallery-shard parts merged per query range in parallel, then the ranges joined.
    nm = int(p["merge_shards"])
    distance_merge = [
        f"{q(b)}/simile-distance merge --out {q(nb)} --query-shard {i}/{nm} {nb_parts}{f}"
        for i in range(nm)
    ] if search else []
    distance_join = f"{q(b)}/simile-distance merge --out {q(nb)} --query-parts{f}" if search else skip(off)
    if not search:
        rerank = skip(off)
    elif p["rerank"]:
        rerank = (f"{q(b)}/simile-rerank --dataset {q(ds)} --neighbors {q(nb)} --embeddings {q(emb)}"
                  f" --method {q(p['rerank_method'])}{thr} --out {q(rr)}{f}")
    else:
        rerank = skip("rerank=false")
    scored = rr if p["rerank"] else nb
    gal = f" --gallery-dataset {q(p['gallery_dataset'])}" if two_sided else ""
    if not search:
        score = skip(off)
    elif unlabeled or not p["score"]:
        score = skip("an unlabeled batch has nothing to score" if unlabeled else "score=false")
    else:
        score = f"{q(b)}/simile-score --dataset {q(ds)} --neighbors {q(scored)}{gal} --out {q(w + '/metrics.json')}{f}"
    return {
        "prepare": prepare,
        "train": train,
        "embed": embed,
        "embed_merge": f"{q(b)}/simile-embed merge --out {q(emb)} {emb_parts}{f}",
        "distance": distance,
        "distance_merge": distance_merge,
        "distance_join": distance_join,
        "rerank": rerank,
        "score": score,
    }
