//! simile-train: train an embedding network on a dataset's train split, validating on its
//! validation split; writes a model folder `simile-embed` reads. Everything it does is in
//! `simile::train`.
use clap::Parser;
use simile::model::Compute;
use simile::train::{self, TrainOptions};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "simile-train",
    version,
    about = "Train an embedding network (OML's recipe: sampler, miner, loss) into a model folder",
    after_help = "Examples:
  simile-train --dataset work/fontid/dataset.parquet --config pipelines/configs/fontid.toml --out work/model
  simile-train --dataset d.parquet --config c.toml --out m --set optimizer.lr=3e-4 --set epochs=20
  simile-train --dataset d.parquet --config c.toml --out m --resume      # after a kill
  simile-train --dataset verses.parquet --config pipelines/configs/verses.toml --out m  # texts
  simile-train --dataset d.parquet --config c.toml --out m --compute bf16
  simile-train --dataset d.parquet --config c.toml --out m --log-every 100 --tensorboard runs/m
  simile-train --dataset d.parquet --config c.toml --out m --nproc 2     # 2 data-parallel ranks
  RANK=1 WORLD_SIZE=4 MASTER_ADDR=node0 MASTER_PORT=29500 simile-train ...   # one rank of a job

Writes into OUT: model.json + model.safetensors (the best weights by metric_for_checkpointing),
config.toml (the resolved config), train_log.parquet (one row per step), val_metrics.parquet (one
row per validation), checkpoints/last and checkpoints/best, and a manifest. Decoded images are
cached once per dataset and input size in ${SIMILE_CACHE:-~/.cache/simile}/images (--cache-dir).
A text dataset trains a text encoder (arch = \"bert\", model.init a text model such as minilm-l6-v2);
its folder carries the tokenizer (schemas/train.md, \"Text encoders\").
Data-parallel training: --nproc N starts N ranks here (as torchrun --nproc-per-node N); with
torchrun's RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set (torchrun, a Kubernetes PyTorchJob,
Slurm's srun), this process is one rank of a job: Gloo on the CPU (docs/training.md, 'Several
processes and machines'). The summary line states the run's GFLOP/s and their share of the
machine's peak for the compute mode (a matrix-multiply probe, measured once and cached in
${SIMILE_CACHE:-~/.cache/simile}/peak.json). Rank 0 writes the outputs. Exit codes: 0 ok, 2 bad input, 1 internal
failure (a rank that died or stopped answering included)."
)]
struct Cli {
    /// The dataset (`dataset.parquet` from simile-prepare): trains on split 'train',
    /// validates on split 'validation'.
    #[arg(long)]
    dataset: PathBuf,
    /// The training config (TOML); see pipelines/configs/ and schemas/train.md.
    #[arg(long)]
    config: PathBuf,
    /// The model folder to write.
    #[arg(long)]
    out: PathBuf,
    /// Override one config key, e.g. --set optimizer.lr=3e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Continue from OUT/checkpoints/last.
    #[arg(long)]
    resume: bool,
    /// Train from scratch even when OUT holds a finished run with the same config, dataset
    /// and version (which is otherwise kept: "up to date"), or an unfinished run.
    #[arg(long, conflicts_with = "resume")]
    force: bool,
    #[command(flatten)]
    dev: simile::cli::DeviceArgs,
    /// fp32; bf16 (autocast: convolutions and linear layers in bf16, fp32 weights; fast on
    /// GPUs and on CPUs with AVX512-BF16 or AMX, slow on others, which get a warning); fp16
    /// (CUDA only: autocast with a dynamic loss scale, as torch.amp.GradScaler).
    #[arg(long, default_value = "fp32")]
    compute: Compute,
    /// Folder of the decoded-image cache.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// A log line (epoch, step, loss, lr, images/s, ETA) every N steps (50), seconds (30s) or
    /// minutes (2m); off to silence. Default: every 30s when stderr is not a terminal (a log
    /// file, Airflow, a cluster job), none on a terminal, where the progress bar shows it.
    #[arg(long, value_name = "N|Ns|Nm|off", value_parser = simile::train::monitor::parse_log_every)]
    log_every: Option<simile::train::monitor::LogEvery>,
    /// Also write TensorBoard event files into DIR (scalars: train/loss, train/lr, ... per
    /// step, and the validation metrics under their names): `tensorboard --logdir DIR`.
    #[arg(long, value_name = "DIR")]
    tensorboard: Option<PathBuf>,
    /// Start N data-parallel ranks on this machine (as torchrun --nproc-per-node N), the
    /// --threads (default: the cores) split between them; exits with the first failing
    /// rank's code.
    #[arg(long, value_name = "N",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    nproc: Option<usize>,
    /// Testing: checkpoint after this many steps and stop (as a kill would).
    #[arg(long, hide = true)]
    stop_after_steps: Option<usize>,
}

fn main() {
    // libgomp's wait policy can only be chosen before the process starts (see the function).
    simile::device::reexec_with_passive_openmp();
    simile::cli::run(|| {
        let c = simile::cli::parse::<Cli>();
        let launch = simile::train::distributed::Launch::from_env()?;
        if let (Some(n), None) = (c.nproc.filter(|&n| n > 1), &launch) {
            let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
            let timeout = simile::train::distributed::Launch::timeout_from_env()?;
            let ended = simile::train::launch::run_local(
                n,
                &simile::train::launch::rank_args(&args),
                c.dev.threads,
                timeout,
            )?;
            if let Some(e) = ended {
                let how = match e.signal {
                    Some(s) => format!("was killed by signal {s}"),
                    None => format!("exited with code {}", e.code),
                };
                eprintln!("simile-train: rank {} {how}; the job failed", e.rank);
                std::process::exit(e.code);
            }
            return Ok(());
        }
        if let (Some(n), Some(l)) = (c.nproc, &launch) {
            if n != l.world_size {
                return Err(simile::cli::user_error(format!(
                    "--nproc {n} inside a job of WORLD_SIZE={}: a rank started by a launcher takes no --nproc",
                    l.world_size
                )));
            }
        }
        c.dev.start(true);
        simile::manifest::reuse_up_to_date(!c.force);
        let opts = TrainOptions {
            dataset: c.dataset,
            config: c.config,
            sets: c.sets,
            out: c.out,
            resume: c.resume,
            device: c.dev.device,
            compute: c.compute,
            cache_dir: c.cache_dir,
            stop_after_steps: c.stop_after_steps,
            force: c.force,
            log_every: c.log_every,
            tensorboard: c.tensorboard,
            launch: launch.filter(|l| l.joins_job()),
        };
        let rank = opts.launch.as_ref().map(|l| l.rank);
        let s = train::run(&opts, |d| match rank {
            Some(r) if r > 0 => {}
            Some(_) => eprintln!(
                "simile-train: device {d}, {} data-parallel ranks",
                opts.launch.as_ref().map_or(1, |l| l.world_size)
            ),
            None => eprintln!("simile-train: device {d}"),
        })?;
        if rank.is_some_and(|r| r > 0) {
            return Ok(());
        }
        if s.stopped {
            println!(
                "simile-train: stopped after step {} (checkpoint in {})",
                s.steps,
                s.out.join("checkpoints/last").display()
            );
            return Ok(());
        }
        let best = match &s.best {
            Some((k, v, e)) => format!("best {k} = {v:.4} (epoch {e})"),
            None => "no validation split: the model is the last weights".into(),
        };
        let util = match &s.utilisation {
            Some(u) => match (u.share(), u.peak_gflop_s) {
                (Some(share), Some(peak)) => format!(
                    " ({:.1} GFLOP/s, {:.0}% of the machine's {} peak {peak:.0} GFLOP/s)",
                    u.gflop_s,
                    share * 100.0,
                    opts.compute
                ),
                _ => format!(" ({:.1} GFLOP/s)", u.gflop_s),
            },
            None => String::new(),
        };
        println!(
            "simile-train: {} epochs, {} steps, {:.0} {}/s{util}, {:.1} s; {best} -> {}",
            s.epochs,
            s.steps,
            s.images_per_s,
            s.unit,
            s.seconds,
            s.out.display()
        );
        Ok(())
    })
}
