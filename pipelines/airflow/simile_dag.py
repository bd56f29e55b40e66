"""The simile pipeline as an Airflow 2.10 DAG, for any dataset (docs/pipelines.md).

commands -> prepare -> train -> embed, mapped over `embed_shards` row shards -> embed_merge
-> distance, mapped over `distance_shards` gallery shards -> distance_merge, mapped over
`merge_shards` query ranges -> distance_join -> rerank -> score.

Every stage task runs one stage binary with BashOperator. Each stage skips itself when its
output is up to date (same inputs' contents, parameters and simile version in its manifest), so
running the DAG again reuses every finished stage; `force` redoes them all. A stage that the
params leave out runs `exit 99` and is marked skipped (BashOperator's skip_on_exit_code); a
mapped stage left out expands over no shards and is skipped too. Every later task runs when
nothing upstream failed (trigger rule none_failed), so a skipped stage does not skip the rest.

The params choose:
- the input, `source`: `fonts` (Font-ID from `font_dir`), `csv` (an OML CSV, `csv` + optional
  `csv_root`, `unlabeled` for a `path`-only inference batch), `folder` (one sub-folder of images
  per label, `images` + `val_fraction`) or `dataset` (an existing dataset.parquet, `dataset`:
  the prepare task is skipped);
- the model: `train` true trains `config` on the dataset into WORK/model; false embeds with
  `model`, a zoo key (`smallcnn`) or a model folder; `search` off makes it an embed-only run of
  every row (e.g. the nightly re-embedding of a catalogue);
- the search: one dataset (its `split`'s queries against its gallery) or, with
  `gallery_dataset` and `gallery_embeddings`, two-sided: the whole new dataset (a query batch)
  against a cached gallery (docs/large_gallery.md), the gallery embeddings made with `model`.

Each shard is a mapped task instance that Airflow runs, and retries, on its own (`retries` in
DEFAULT_ARGS). Paths in the params must be absolute: a BashOperator runs in a temporary folder,
and on a cluster every worker must see the same `bin_dir` and `work_dir`.

    airflow dags test simile 2026-01-01 -c '{"bin_dir": "/src/simile/target/release",
        "work_dir": "/data/fontid", "embed_shards": 4, "distance_shards": 4}'
"""

from __future__ import annotations

import pendulum
from airflow import DAG
from airflow.decorators import task
from airflow.operators.bash import BashOperator
from simile_commands import DEFAULT_ARGS, PARAMS, build_commands

with DAG(
    dag_id="simile",
    description="simile on any dataset: prepare, train, sharded embed and distance, rerank, score",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params=PARAMS,
    default_args=DEFAULT_ARGS,
    render_template_as_native_obj=False,
    tags=["simile"],
) as dag:

    @task(multiple_outputs=True, retries=0)
    def commands(**context) -> dict:
        """Every stage's command line, from the run's params (one place for the flags)."""
        return build_commands(context["params"])

    @task
    def shard_commands(cmds: dict, key: str) -> list:
        """The mapped tasks' commands (a mapped task cannot expand over a keyed XCom)."""
        return cmds[key]

    cmds = commands()

    def stage(task_id: str) -> BashOperator:
        # Rendered when the task runs: the command `commands` pushed under this task's name.
        cmd = "{{ ti.xcom_pull(task_ids='commands', key='%s') }}" % task_id
        return BashOperator(task_id=task_id, bash_command=cmd, trigger_rule="none_failed")

    def shards(task_id: str) -> BashOperator:
        # One task instance per shard, each run and retried on its own; no shards: skipped.
        return BashOperator.partial(task_id=task_id, trigger_rule="none_failed").expand(
            bash_command=shard_commands.override(task_id=f"{task_id}_cmds")(cmds, task_id)
        )

    prepare = stage("prepare")
    train = stage("train")
    embed = shards("embed")
    embed_merge = stage("embed_merge")
    distance = shards("distance")
    distance_merge = shards("distance_merge")
    distance_join = stage("distance_join")
    rerank = stage("rerank")
    score = stage("score")

    (cmds >> prepare >> train >> embed >> embed_merge >> distance >> distance_merge
     >> distance_join >> rerank >> score)
