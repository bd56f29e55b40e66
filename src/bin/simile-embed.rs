//! simile-embed: turn a dataset into an embeddings file (`emb.npy` + `emb.ids.npy`); `merge`
//! joins shard parts; `import` makes a model folder from a PyTorch checkpoint or TorchScript
//! file; `classify` runs a model folder's classification head (a check of weights and
//! preprocessing).
use clap::{Args, Parser, Subcommand};
use simile::cli::user_error;
use simile::dataset::Split;
use simile::device::DeviceArg;
use simile::image::{Preprocess, ResizeMode};
use simile::model::embed::{self, EmbedOptions, OnBadImage};
use simile::model::{self, import, ArchSpec, Compute, ModelSpec, Pool, Quantize};
use simile::npy::DType;
use simile::shard::ShardSpec;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "simile-embed",
    version,
    about = "Turn a dataset into an embeddings file with a model folder or a zoo key",
    args_conflicts_with_subcommands = true,
    after_help = "Examples:
  simile-embed --dataset work/dataset.parquet --model smallcnn --out work/emb.npy
  simile-embed --dataset work/dataset.parquet --model efficientnet-lite0-imagenet \\
      --split validation --batch-size 64 --compute bf16 --out work/emb.npy
  simile-embed --dataset d.parquet --model work/model --out work/emb.npy --shard 0/4
  simile-embed merge --out work/emb.npy        # joins work/emb.part-*-of-*.npy
  simile-embed import --arch resnet18 --weights resnet18.pth --size 224 --resize crop --out work/r18
  simile-embed import --torchscript traced.pt --size 224 --out work/ts
  simile-embed import --hf ./bge-small-en-v1.5 --out work/bge      # a HuggingFace BERT folder
  simile-embed classify --model efficientnet-lite0-imagenet cat.png
  simile-embed --dataset work/verses.parquet --model minilm-l6-v2 --out work/emb.npy   # texts
  simile-embed --dataset work/verses.parquet --model minilm-l6-v2 --quantize int8 --out work/emb8.npy
  simile-embed --dataset work/verses.parquet --model minilm-l6-v2 --split all --check-only

Zoo keys: smallcnn (untrained baseline, random weights with seed 0), efficientnet-lite0-imagenet,
minilm-l6-v2 (sentence-transformers' all-MiniLM-L6-v2, for text datasets).
Writes OUT, OUT's .ids.npy (dataset ids, in id order) and OUT.manifest.json, atomically; with
--on-bad-image skip, also <stem>.skipped.tsv listing the rows left out (merge joins the parts').
Exit codes: 0 ok, 2 bad input, 1 internal failure."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    embed: EmbedArgs,
}

#[derive(Args)]
struct EmbedArgs {
    /// The dataset (`dataset.parquet` from simile-prepare).
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// A model folder (model.json + weights) or a zoo key.
    #[arg(long)]
    model: Option<String>,
    /// The embeddings file to write (`.npy`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Which rows: validation, train, inference or all.
    #[arg(long, default_value = "all")]
    split: String,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[command(flatten)]
    dev: simile::cli::DeviceArgs,
    /// Precision of the forward pass: fp32, bf16 (~2x fp32 on CPUs with AVX512-BF16 or AMX),
    /// fp16 (CUDA only).
    #[arg(long, default_value = "fp32")]
    compute: Compute,
    /// Text models: `int8` runs the encoder's linear layers in int8, as PyTorch's
    /// `quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)` does (CPU, fp32 compute; about
    /// 2x fp32 on a CPU; the embeddings move a little: see docs/models.md). none or int8.
    #[arg(long, default_value = "none")]
    quantize: Quantize,
    /// Element type of the output file: f32 or f16.
    #[arg(long, default_value = "f32")]
    out_dtype: String,
    /// Compute only shard i of n (0-based): rows [M*i/n, M*(i+1)/n) in id order; auto/N takes
    /// i from JOB_COMPLETION_INDEX (a Kubernetes Indexed Job).
    #[arg(long, value_name = "I/N")]
    shard: Option<ShardSpec>,
    /// A corrupt, missing or truncated image: `error` (default; lists every bad file before
    /// anything runs) or `skip` (left out and listed in <stem>.skipped.tsv).
    #[arg(long, default_value = "error")]
    on_bad_image: OnBadImage,
    /// Image root overriding the one recorded in the dataset.
    #[arg(long)]
    root: Option<PathBuf>,
    #[command(flatten)]
    force: simile::cli::ForceArg,
    /// Keep decoded images in memory up to this many MiB (else they are decoded twice).
    #[arg(long, default_value_t = 2048)]
    cache_mib: usize,
    /// Only decode, crop and resize every image (as the model's input says) and report the
    /// unreadable ones, with the images/s of decoding; texts: tokenize every text, refuse
    /// texts without tokens and list those longer than the model's max_length. Runs no
    /// model, writes nothing.
    #[arg(long)]
    check_only: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Join shard parts `<stem>.part-<i>-of-<n>.npy` (with their ids files and manifests)
    /// into one embeddings file; refuses gaps, duplicates and parts from different inputs.
    Merge {
        /// The merged embeddings file; its parts are found beside it unless listed.
        #[arg(long)]
        out: PathBuf,
        /// The parts, if not all `<stem>.part-*` files beside --out.
        parts: Vec<PathBuf>,
        #[command(flatten)]
        force: simile::cli::ForceArg,
    },
    /// Make a model folder from a PyTorch state dict (.pth, .ckpt, .safetensors) for one of
    /// simile's architectures, or from a TorchScript file.
    Import(ImportArgs),
    /// Print the top classes of images through a model folder's classification head.
    Classify {
        #[arg(long)]
        model: String,
        #[arg(long, default_value_t = 5)]
        top: i64,
        #[arg(long, default_value = "cpu")]
        device: DeviceArg,
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
}

#[derive(Args)]
struct ImportArgs {
    /// The model folder to write.
    #[arg(long)]
    out: PathBuf,
    /// Architecture of the state dict: smallcnn, resnet18, resnet34, resnet50,
    /// efficientnet-lite0, vits16, vits14.
    #[arg(long, conflicts_with = "torchscript", requires = "weights")]
    arch: Option<String>,
    /// The state dict (.pth, .pt, .ckpt read through the torch Python; .safetensors directly).
    #[arg(long, requires = "arch")]
    weights: Option<PathBuf>,
    /// A TorchScript file (torch.jit.trace / torch.jit.script) returning [batch, dim].
    #[arg(long)]
    torchscript: Option<PathBuf>,
    /// A HuggingFace BERT-family text encoder folder (config.json, model.safetensors or
    /// pytorch_model.bin, tokenizer.json): BERT, MiniLM, bge, e5, your fine-tuned one.
    /// Pooling, max length and normalisation default to its sentence-transformers files.
    #[arg(long, conflicts_with_all = ["torchscript", "arch"])]
    hf: Option<PathBuf>,
    /// Text models (--hf): mean (sentence-transformers) or cls (OML's HFWrapper).
    #[arg(long, requires = "hf")]
    pooling: Option<simile::model::bert::TextPool>,
    /// Text models (--hf): tokens per text at most, special tokens included.
    #[arg(long, requires = "hf")]
    max_length: Option<usize>,
    /// Input side in pixels.
    #[arg(long, default_value_t = 224)]
    size: u32,
    /// pad (OML default: longest side, white padding), stretch, or crop (shorter side to
    /// size/crop-ratio, centre crop).
    #[arg(long, default_value = "pad")]
    resize: ResizeMode,
    #[arg(long, default_value_t = 0.875)]
    crop_ratio: f64,
    /// Channel mean, three comma-separated values on the 0..1 scale (default ImageNet's).
    #[arg(long, value_parser = parse3, default_value = "0.485,0.456,0.406")]
    mean: [f32; 3],
    #[arg(long, value_parser = parse3, default_value = "0.229,0.224,0.225")]
    std: [f32; 3],
    /// L2-normalise the embeddings.
    #[arg(long)]
    normalise: bool,
    /// Pooling of the convolutional backbones: avg or gem.
    #[arg(long, default_value = "avg")]
    pool: String,
    #[arg(long, default_value_t = 3.0)]
    gem_p: f64,
    /// The checkpoint has a projection `proj` to this many dimensions.
    #[arg(long)]
    proj_dim: Option<i64>,
    /// smallcnn's first-block width.
    #[arg(long)]
    width: Option<i64>,
}

fn parse3(s: &str) -> Result<[f32; 3], String> {
    let v: Vec<f32> = s
        .split(',')
        .map(|x| x.trim().parse::<f32>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("'{s}': expected three numbers, e.g. 0.5,0.5,0.5"))?;
    v.try_into()
        .map_err(|_| format!("'{s}': expected exactly three numbers"))
}

fn main() {
    // libgomp's wait policy can only be chosen before the process starts (see the function).
    simile::device::reexec_with_passive_openmp();
    simile::cli::run(|| {
        let cli = simile::cli::parse::<Cli>();
        match cli.cmd {
            Some(Cmd::Merge { out, parts, force }) => {
                force.apply();
                let s = simile::embeddings::merge_parts(&out, &parts)?;
                eprintln!(
                    "merged {} parts into {} ({} rows x {})",
                    s.parts,
                    out.display(),
                    s.rows,
                    s.dim
                );
                if let Some(l) = &s.skipped_list {
                    eprintln!("{} rows were skipped, listed in {}", s.skipped, l.display());
                }
                Ok(())
            }
            Some(Cmd::Import(a)) => run_import(a),
            Some(Cmd::Classify {
                model,
                top,
                device,
                images,
            }) => {
                let dev = simile::device::resolve(device)?;
                let m = model::Model::load(&model, dev)?;
                let res = embed::classify_files(&m, &images, top)?;
                for (f, classes) in images.iter().zip(res) {
                    let cs: Vec<String> =
                        classes.iter().map(|(c, p)| format!("{c}:{p:.4}")).collect();
                    println!("{}\t{}", f.display(), cs.join("\t"));
                }
                Ok(())
            }
            None => {
                cli.embed.force.apply();
                run_embed(cli.embed)
            }
        }
    })
}

fn run_embed(a: EmbedArgs) -> anyhow::Result<()> {
    a.dev.start(true);
    // --check-only writes nothing, so it needs no --out.
    let out = a.out.or_else(|| a.check_only.then(PathBuf::new));
    let (Some(dataset), Some(model), Some(out)) = (a.dataset, a.model, out) else {
        return Err(user_error(
            "simile-embed needs --dataset, --model and --out (or a subcommand: merge, import, classify); see --help",
        ));
    };
    let split = match a.split.as_str() {
        "all" => None,
        s => Some(
            s.parse::<Split>()
                .map_err(|e| user_error(format!("--split {e} or all")))?,
        ),
    };
    let out_dtype = match a.out_dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        o => {
            return Err(user_error(format!(
                "--out-dtype '{o}': expected f32 or f16"
            )))
        }
    };
    let opts = EmbedOptions {
        dataset,
        model,
        out,
        split,
        batch_size: a.batch_size,
        device: a.dev.device,
        compute: a.compute,
        out_dtype,
        shard: a.shard,
        on_bad_image: a.on_bad_image,
        root: a.root,
        cache_mib: a.cache_mib,
        quantize: a.quantize,
    };
    if a.check_only {
        match embed::check_only(&opts)? {
            embed::Check::Images(c) => {
                for (id, p, why) in &c.bad {
                    println!("unreadable\t{id}\t{}\t{why}", p.display());
                }
                println!(
                    "checked {} images in {:.1} s ({:.0} images/s decode + crop + resize): {} unreadable",
                    c.images,
                    c.seconds,
                    c.images as f64 / c.seconds.max(1e-9),
                    c.bad.len()
                );
            }
            embed::Check::Texts(c) => {
                for (id, tokens) in &c.truncated {
                    println!("truncated\t{id}\t{tokens}");
                }
                println!(
                    "checked {} texts in {:.1} s ({:.0} texts/s tokenizing): {} longer than the model's {} tokens (embedded from their first {}); tokens a text: median {}, longest {}",
                    c.texts,
                    c.seconds,
                    c.texts as f64 / c.seconds.max(1e-9),
                    c.truncated.len(),
                    c.max_length,
                    c.max_length,
                    c.median,
                    c.longest
                );
            }
        }
        return Ok(());
    }
    let s = embed::run(&opts, |d| eprintln!("device: {d}"))?;
    let t = &s.times;
    let texts = s.modality == simile::dataset::Modality::Text;
    println!(
        "wrote {} ({} x {}) and {} in {:.1} s ({:.0} {}/s) on {}",
        s.out.display(),
        s.rows,
        s.dim,
        s.ids.display(),
        s.seconds,
        s.rows as f64 / s.seconds.max(1e-9),
        if texts { "texts" } else { "images" },
        s.device
    );
    if texts {
        println!(
            "time: forward {:.1} s, tokenizing {:.1} s",
            t.forward, t.decode
        );
        return Ok(());
    }
    println!(
        "time: forward {:.1} s, batch tensors {:.1} s, waiting for images {:.1} s; decoding {:.1} s beside it{}",
        t.forward,
        t.tensor,
        t.wait,
        t.decode,
        if t.check > 0.0 {
            format!(", check pass {:.1} s before it", t.check)
        } else {
            String::new()
        }
    );
    if let Some(l) = &s.skipped_list {
        println!(
            "skipped {} unreadable images, listed in {}",
            s.skipped,
            l.display()
        );
    }
    Ok(())
}

fn run_import(a: ImportArgs) -> anyhow::Result<()> {
    if let Some(hf) = &a.hf {
        let o = import::HfTextOptions {
            pooling: a.pooling,
            max_length: a.max_length,
            normalise: a.normalise.then_some(true),
        };
        let h = import::import_hf_text(hf, &o, &a.out)?;
        let t = h.spec.text.as_ref().expect("a text model");
        println!(
            "wrote {} (bert text encoder, {}-d embeddings, {:?} pooling, {} tokens{}): {} tensors loaded, prefix '{}' stripped",
            a.out.display(),
            h.spec.embedding_dim,
            t.pooling,
            t.max_length,
            if h.spec.normalise { ", L2-normalised" } else { "" },
            h.report.loaded,
            h.report.prefix
        );
        return Ok(());
    }
    let input = Preprocess {
        size: a.size,
        resize: a.resize,
        crop_ratio: a.crop_ratio,
        mean: a.mean,
        std: a.std,
    };
    input.validate()?;
    if let Some(ts) = a.torchscript {
        let spec = import::import_torchscript(&ts, input, a.normalise, &a.out)?;
        println!(
            "wrote {} (TorchScript, {}-d embeddings, input {} px {})",
            a.out.display(),
            spec.embedding_dim,
            spec.input.size,
            spec.input.resize
        );
        return Ok(());
    }
    let (Some(arch), Some(weights)) = (a.arch, a.weights) else {
        return Err(user_error(
            "import needs --arch and --weights (a state dict), or --torchscript",
        ));
    };
    let mut spec = ArchSpec::new(&arch);
    spec.pool = match a.pool.as_str() {
        "avg" => Pool::Avg,
        "gem" => Pool::Gem,
        p => return Err(user_error(format!("--pool '{p}': expected avg or gem"))),
    };
    spec.gem_p = a.gem_p;
    spec.proj_dim = a.proj_dim;
    spec.width = a.width;
    spec.validate()?;
    spec.check_size(a.size, "--size")?;
    let mspec = ModelSpec::new(spec, a.normalise, input)?;
    let r = import::import_state_dict(&weights, mspec.clone(), &a.out)?;
    println!(
        "wrote {} ({arch}, {}-d embeddings): {} tensors loaded, prefix '{}' stripped",
        a.out.display(),
        mspec.embedding_dim,
        r.loaded,
        r.prefix
    );
    if !r.dropped.is_empty() {
        println!("dropped {} entries:", r.dropped.len());
        for d in r.dropped.iter().take(20) {
            println!("  {d}");
        }
        if r.dropped.len() > 20 {
            println!("  ... and {} more", r.dropped.len() - 20);
        }
    }
    Ok(())
}
