"""The simile pipeline as an Airflow 2.10 DAG (docs/pipelines.md).

prepare -> train -> embed, mapped over `embed_shards` shards -> embed merge -> distance, mapped
over `distance_shards` gallery shards -> distance merge -> rerank (when `rerank` is on) -> score.

Every task runs one stage binary with BashOperator. Each stage skips itself when its output is up
to date (same inputs' contents, parameters and simile version in its manifest), so running the
DAG again reuses every finished stage; `force` redoes them all. Paths in the params must be
absolute: a BashOperator runs in a temporary folder.

    airflow dags test simile 2026-01-01 -c '{"bin_dir": "/src/simile/target/release",
        "work_dir": "/data/fontid", "embed_shards": 4, "distance_shards": 4}'
"""

from __future__ import annotations

import shlex

import pendulum
from airflow import DAG
from airflow.decorators import task
from airflow.models.param import Param
from airflow.operators.bash import BashOperator

PARAMS = {
    "bin_dir": Param("/opt/simile/bin", type="string", description="folder of the six simile-* binaries"),
    "work_dir": Param("/tmp/simile-fontid", type="string", description="where every artifact is written"),
    "font_dir": Param("/usr/share/fonts/truetype/aenigma", type="string", description="TrueType fonts for Font-ID"),
    "max_fonts": Param(0, type="integer", minimum=0, description="keep only the first N font groups (0: all)"),
    "font_size": Param(64, type="integer", minimum=8, description="glyph image size in pixels"),
    "config": Param("/opt/simile/pipelines/configs/fontid.toml", type="string", description="training config (TOML)"),
    "train_set": Param("", type="string", description="extra simile-train flags, e.g. --set epochs=5"),
    "embed_shards": Param(4, type="integer", minimum=1),
    "distance_shards": Param(4, type="integer", minimum=1),
    "top_k": Param(10, type="integer", minimum=1),
    "device": Param("auto", type="string", description="auto, cpu, cuda or cuda:<i>"),
    "rerank": Param(False, type="boolean", description="run simile-rerank between distance and score"),
    "rerank_method": Param("aqe", type="string", description="simile-rerank --method"),
    "force": Param(False, type="boolean", description="redo every stage even when it is up to date"),
}


def q(s) -> str:
    return shlex.quote(str(s))


def paths(p: dict) -> dict:
    w = p["work_dir"].rstrip("/")
    return {
        "bin": p["bin_dir"].rstrip("/"),
        "ds": f"{w}/dataset.parquet",
        "model": f"{w}/model",
        "emb": f"{w}/emb.npy",
        "nb": f"{w}/neighbors.parquet",
        "rr": f"{w}/reranked.parquet",
        "metrics": f"{w}/metrics.json",
        "force": " --force" if p["force"] else "",
    }


with DAG(
    dag_id="simile",
    description="simile: prepare, train, sharded embed and distance, rerank, score",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params=PARAMS,
    render_template_as_native_obj=False,
    tags=["simile"],
) as dag:

    @task(multiple_outputs=True)
    def commands(**context) -> dict:
        """Every stage's command line, from the run's params (one place for the flags)."""
        p = context["params"]
        x = paths(p)
        b, f = x["bin"], x["force"]
        fonts = f" --max-fonts {int(p['max_fonts'])}" if int(p["max_fonts"]) > 0 else ""
        ne, nd = int(p["embed_shards"]), int(p["distance_shards"])
        emb_parts = [f"{p['work_dir'].rstrip('/')}/emb.part-{i}-of-{ne}.npy" for i in range(ne)]
        nb_parts = [f"{p['work_dir'].rstrip('/')}/neighbors.part-{i}-of-{nd}.parquet" for i in range(nd)]
        search = "--split validation --top-k %d --device %s" % (int(p["top_k"]), q(p["device"]))
        scored = x["rr"] if p["rerank"] else x["nb"]
        return {
            "prepare": f"{q(b)}/simile-prepare fonts --font-dir {q(p['font_dir'])} --out {q(p['work_dir'])}"
            f" --size {int(p['font_size'])}{fonts}{f}",
            "train": f"{q(b)}/simile-train --dataset {q(x['ds'])} --config {q(p['config'])} --out {q(x['model'])}"
            f" --device {q(p['device'])} {p['train_set']}{f}",
            "embed": [
                f"{q(b)}/simile-embed --dataset {q(x['ds'])} --model {q(x['model'])} --split validation"
                f" --device {q(p['device'])} --out {q(x['emb'])} --shard {i}/{ne}{f}"
                for i in range(ne)
            ],
            "embed_merge": f"{q(b)}/simile-embed merge --out {q(x['emb'])} {' '.join(map(q, emb_parts))}{f}",
            "distance": [
                f"{q(b)}/simile-distance --dataset {q(x['ds'])} --embeddings {q(x['emb'])} {search}"
                f" --out {q(x['nb'])} --gallery-shard {i}/{nd}{f}"
                for i in range(nd)
            ],
            "distance_merge": f"{q(b)}/simile-distance merge --out {q(x['nb'])} {' '.join(map(q, nb_parts))}{f}",
            # Exit code 99 marks the task skipped (BashOperator's skip_on_exit_code).
            "rerank": (
                f"{q(b)}/simile-rerank --dataset {q(x['ds'])} --neighbors {q(x['nb'])} --embeddings {q(x['emb'])}"
                f" --method {q(p['rerank_method'])} --out {q(x['rr'])}{f}"
                if p["rerank"]
                else "echo 'rerank is off (params.rerank)'; exit 99"
            ),
            "score": f"{q(b)}/simile-score --dataset {q(x['ds'])} --neighbors {q(scored)} --out {q(x['metrics'])}{f}",
        }

    @task
    def shard_commands(cmds: dict, key: str) -> list:
        """The mapped tasks' commands (a mapped task cannot expand over a keyed XCom)."""
        return cmds[key]

    cmds = commands()

    def stage(task_id: str, **kw) -> BashOperator:
        # Rendered when the task runs: the command `commands` pushed under this task's name.
        cmd = "{{ ti.xcom_pull(task_ids='commands', key='%s') }}" % task_id
        return BashOperator(task_id=task_id, bash_command=cmd, **kw)

    prepare = stage("prepare")
    train = stage("train")
    embed = BashOperator.partial(task_id="embed").expand(
        bash_command=shard_commands.override(task_id="embed_cmds")(cmds, "embed")
    )
    embed_merge = stage("embed_merge")
    distance = BashOperator.partial(task_id="distance").expand(
        bash_command=shard_commands.override(task_id="distance_cmds")(cmds, "distance")
    )
    distance_merge = stage("distance_merge")
    rerank = stage("rerank")
    # Score runs after a skipped rerank too (then on the merged neighbours).
    score = stage("score", trigger_rule="none_failed")

    cmds >> prepare >> train >> embed >> embed_merge >> distance >> distance_merge >> rerank >> score
