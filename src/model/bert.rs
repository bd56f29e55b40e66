//! The BERT-family text encoder (BERT, MiniLM, bge/e5-small, any HuggingFace `BertModel`
//! folder): token, position and segment embeddings, then post-LN transformer layers (masked
//! self-attention, erf-GELU feed-forward), pooled by mean over the real tokens
//! (sentence-transformers) or the first token (OML's `HFWrapper`). Parameter names are
//! HuggingFace's (`embeddings.word_embeddings.weight`, `encoder.layer.N.attention.self.query`),
//! so a `model.safetensors` loads after prefix stripping alone.
use crate::error::{Error, Result};
use crate::torch_ext::QLinear;
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

/// The sizes of a BERT encoder: HuggingFace `config.json`'s fields of the same names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub max_position_embeddings: i64,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: i64,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
}

fn default_type_vocab() -> i64 {
    2
}
fn default_ln_eps() -> f64 {
    1e-12
}
fn default_dropout() -> f64 {
    0.1
}

/// The largest sizes accepted from a `config.json` (bert-large is 1024 x 24, 30k tokens).
const MAX_HIDDEN: i64 = 8192;
const MAX_LAYERS: i64 = 96;
const MAX_VOCAB: i64 = 1 << 22;
const MAX_POSITIONS: i64 = 1 << 16;

impl BertConfig {
    /// Reads a HuggingFace `config.json`, refusing what is not a BERT encoder this code runs.
    pub fn from_hf_json(path: &std::path::Path) -> Result<BertConfig> {
        use crate::error::IoContext;
        let bytes = std::fs::read(path).at(path)?;
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::input(format!("{}: not JSON: {e}", path.display())))?;
        let mt = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        if !mt.is_empty() && mt != "bert" {
            return Err(Error::input(format!(
                "{}: model_type '{mt}': simile runs BERT-family encoders (model_type \"bert\": BERT, MiniLM, bge, e5)",
                path.display()
            )));
        }
        if let Some(act) = v.get("hidden_act").and_then(|a| a.as_str()) {
            if act != "gelu" {
                return Err(Error::input(format!(
                    "{}: hidden_act '{act}': only \"gelu\" (erf) is supported",
                    path.display()
                )));
            }
        }
        if let Some(pe) = v.get("position_embedding_type").and_then(|a| a.as_str()) {
            if pe != "absolute" {
                return Err(Error::input(format!(
                    "{}: position_embedding_type '{pe}': only \"absolute\" is supported",
                    path.display()
                )));
            }
        }
        let c: BertConfig = serde_json::from_value(v)
            .map_err(|e| Error::input(format!("{}: {e}", path.display())))?;
        c.validate()
            .map_err(|e| Error::input(format!("{}: {e}", path.display())))?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        let check = |what: &str, v: i64, max: i64| {
            if (1..=max).contains(&v) {
                Ok(())
            } else {
                Err(Error::input(format!("{what} {v}: must be 1 to {max}")))
            }
        };
        check("vocab_size", self.vocab_size, MAX_VOCAB)?;
        check("hidden_size", self.hidden_size, MAX_HIDDEN)?;
        check("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS)?;
        check("num_attention_heads", self.num_attention_heads, MAX_HIDDEN)?;
        check("intermediate_size", self.intermediate_size, 4 * MAX_HIDDEN)?;
        check(
            "max_position_embeddings",
            self.max_position_embeddings,
            MAX_POSITIONS,
        )?;
        check("type_vocab_size", self.type_vocab_size, 1024)?;
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::input(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        for (what, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::input(format!("{what} {p}: must be in [0, 1)")));
            }
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps < 1.0) {
            return Err(Error::input(format!(
                "layer_norm_eps {}: must be in (0, 1)",
                self.layer_norm_eps
            )));
        }
        Ok(())
    }
}

/// How token states become one vector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextPool {
    /// The mean over the real (unpadded) tokens: sentence-transformers' models.
    #[default]
    Mean,
    /// The first token's state (`[CLS]`): OML's `HFWrapper`.
    Cls,
}

impl std::str::FromStr for TextPool {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "mean" => Ok(TextPool::Mean),
            "cls" => Ok(TextPool::Cls),
            _ => Err(format!("'{s}': expected mean or cls")),
        }
    }
}

/// HuggingFace's BERT initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms.
const HF_INIT: nn::Init = nn::Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

fn linear(p: nn::Path, cin: i64, cout: i64) -> nn::Linear {
    nn::linear(
        p,
        cin,
        cout,
        nn::LinearConfig {
            ws_init: HF_INIT,
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        },
    )
}

fn layer_norm(p: nn::Path, dim: i64, eps: f64) -> nn::LayerNorm {
    nn::layer_norm(
        p,
        vec![dim],
        nn::LayerNormConfig {
            eps,
            ..Default::default()
        },
    )
}

#[derive(Debug)]
struct Layer {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    attn_out: nn::Linear,
    attn_norm: nn::LayerNorm,
    inter: nn::Linear,
    out: nn::Linear,
    out_norm: nn::LayerNorm,
}

/// A layer's linear maps in int8 (see [`Bert::quantize_int8`]).
#[derive(Debug)]
struct QLayer {
    query: QLinear,
    key: QLinear,
    value: QLinear,
    attn_out: QLinear,
    inter: QLinear,
    out: QLinear,
}

/// `x` through a linear map: its int8 copy when the encoder is quantized.
fn linear_of(x: &Tensor, lin: &nn::Linear, q: Option<&QLinear>) -> Result<Tensor> {
    match q {
        Some(q) => q.forward(x),
        None => Ok(x.apply(lin)),
    }
}

/// A BERT encoder (without the pretraining pooler).
#[derive(Debug)]
pub struct Bert {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_norm: nn::LayerNorm,
    layers: Vec<Layer>,
    /// Int8 copies of the layers' linear maps, used instead of them (inference only).
    quant: Option<Vec<QLayer>>,
    cfg: BertConfig,
}

impl Bert {
    /// Creates the variables under `p` (HuggingFace's initialisation; load weights after).
    pub fn new(p: &nn::Path, cfg: &BertConfig) -> Result<Bert> {
        cfg.validate()?;
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let e = p / "embeddings";
        let word = (&e / "word_embeddings").var("weight", &[cfg.vocab_size, h], HF_INIT);
        let position =
            (&e / "position_embeddings").var("weight", &[cfg.max_position_embeddings, h], HF_INIT);
        let token_type =
            (&e / "token_type_embeddings").var("weight", &[cfg.type_vocab_size, h], HF_INIT);
        let emb_norm = layer_norm(&e / "LayerNorm", h, eps);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = p / "encoder" / "layer" / i;
                let a = &l / "attention";
                Layer {
                    query: linear(&a / "self" / "query", h, h),
                    key: linear(&a / "self" / "key", h, h),
                    value: linear(&a / "self" / "value", h, h),
                    attn_out: linear(&a / "output" / "dense", h, h),
                    attn_norm: layer_norm(&a / "output" / "LayerNorm", h, eps),
                    inter: linear(&l / "intermediate" / "dense", h, cfg.intermediate_size),
                    out: linear(&l / "output" / "dense", cfg.intermediate_size, h),
                    out_norm: layer_norm(&l / "output" / "LayerNorm", h, eps),
                }
            })
            .collect();
        Ok(Bert {
            word,
            position,
            token_type,
            emb_norm,
            layers,
            quant: None,
            cfg: cfg.clone(),
        })
    }

    /// PyTorch's `quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)` on the encoder:
    /// from now on every layer's six linear maps run in int8 (weights quantized once, per
    /// tensor; activations per call), on the CPU, for inference. Embeddings, attention and
    /// LayerNorms stay float32, as in PyTorch.
    pub fn quantize_int8(&mut self) -> Result<()> {
        let q = self
            .layers
            .iter()
            .map(|l| {
                Ok(QLayer {
                    query: QLinear::new(&l.query)?,
                    key: QLinear::new(&l.key)?,
                    value: QLinear::new(&l.value)?,
                    attn_out: QLinear::new(&l.attn_out)?,
                    inter: QLinear::new(&l.inter)?,
                    out: QLinear::new(&l.out)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.quant = Some(q);
        Ok(())
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// The last layer's token states `[B, L, H]` of `ids` `[B, L]` (int64) where `mask`
    /// `[B, L]` (int64, 1 = token, 0 = padding) says which positions are real. Padding never
    /// changes a real token's state: keys at padded positions are masked out of attention.
    pub fn forward_t(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Result<Tensor> {
        if train && self.quant.is_some() {
            return Err(Error::internal("an int8-quantized encoder cannot train"));
        }
        let (b, l) = ids.size2()?;
        let h = self.cfg.hidden_size;
        let heads = self.cfg.num_attention_heads;
        let (pd, ad) = (
            self.cfg.hidden_dropout_prob,
            self.cfg.attention_probs_dropout_prob,
        );
        let pos = Tensor::arange(l, (Kind::Int64, ids.device()));
        let x = Tensor::embedding(&self.word, ids, -1, false, false)
            + Tensor::embedding(&self.position, &pos, -1, false, false).unsqueeze(0)
            + self.token_type.get(0);
        let mut x = x.apply(&self.emb_norm).dropout(pd, train);
        // [B, 1, 1, L]: true where a key may be attended to.
        let keep = mask.ne(0).view([b, 1, 1, l]);
        let split = |t: Tensor| t.view([b, l, heads, h / heads]).transpose(1, 2);
        for (i, layer) in self.layers.iter().enumerate() {
            let q8 = self.quant.as_ref().map(|q| &q[i]);
            let q = split(linear_of(&x, &layer.query, q8.map(|q| &q.query))?);
            let k = split(linear_of(&x, &layer.key, q8.map(|q| &q.key))?);
            let v = split(linear_of(&x, &layer.value, q8.map(|q| &q.value))?);
            // Autocast has no CPU rule for a bool mask with low-precision q/k/v; the mask is
            // boolean, so nothing is cast.
            let a = Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                Some(&keep),
                if train { ad } else { 0.0 },
                false,
                None,
                false,
            );
            let a = a.transpose(1, 2).reshape([b, l, h]);
            let a = linear_of(&a, &layer.attn_out, q8.map(|q| &q.attn_out))?.dropout(pd, train);
            x = (a + &x).apply(&layer.attn_norm);
            let f = linear_of(&x, &layer.inter, q8.map(|q| &q.inter))?.gelu("none");
            let f = linear_of(&f, &layer.out, q8.map(|q| &q.out))?.dropout(pd, train);
            x = (f + &x).apply(&layer.out_norm);
        }
        Ok(x)
    }
}

/// One vector per text from token states `[B, L, H]`: the mean over real tokens (padding
/// excluded from both sum and count) or the first token's state.
pub fn pool(states: &Tensor, mask: &Tensor, how: TextPool) -> Tensor {
    match how {
        TextPool::Cls => states.select(1, 0),
        TextPool::Mean => {
            let m = mask.to_kind(states.kind()).unsqueeze(-1);
            let sum = (states * &m).sum_dim_intlist([1i64].as_slice(), false, states.kind());
            let n = m
                .sum_dim_intlist([1i64].as_slice(), false, states.kind())
                .clamp_min(1e-9);
            sum / n
        }
    }
}

/// A text embedding network: the encoder, pooling, optional L2 normalisation.
#[derive(Debug)]
pub struct TextNet {
    pub bert: Bert,
    pub pool: TextPool,
    pub normalise: bool,
}

impl TextNet {
    pub fn new(
        p: &nn::Path,
        spec: &super::ArchSpec,
        pool: TextPool,
        normalise: bool,
    ) -> Result<TextNet> {
        let cfg = spec.bert.as_ref().ok_or_else(|| {
            Error::input("architecture bert needs its sizes (the 'bert' section)")
        })?;
        if spec.proj_dim.is_some() {
            return Err(Error::input(
                "architecture bert: proj_dim is not supported (the embedding is the encoder's hidden size)",
            ));
        }
        Ok(TextNet {
            bert: Bert::new(p, cfg)?,
            pool,
            normalise,
        })
    }

    /// Embeddings `[B, H]` in float32: the encoder under `compute`'s autocast, pooled, then
    /// normalised in fp32.
    pub fn forward_in(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        train: bool,
        compute: super::Compute,
        device: tch::Device,
    ) -> Result<Tensor> {
        let pooled = {
            let _amp = compute.autocast(device)?;
            let states = self.bert.forward_t(ids, mask, train)?;
            pool(&states, mask, self.pool)
        };
        let f = pooled.f_to_kind(Kind::Float)?;
        Ok(if self.normalise {
            super::arch::l2_normalise(&f)
        } else {
            f
        })
    }
}

/// Refuses a tokenizer that can emit ids past the model's embedding table.
pub fn check_vocab(
    tok: &crate::tokenize::TextTokenizer,
    cfg: &BertConfig,
    tokenizer: &std::path::Path,
) -> Result<()> {
    let max = i64::from(tok.max_id());
    if max >= cfg.vocab_size {
        return Err(Error::input(format!(
            "{}: the tokenizer has ids up to {max} ({} tokens) but the model's vocab_size is {}: they do not belong together",
            tokenizer.display(),
            tok.vocab_size(),
            cfg.vocab_size
        )));
    }
    Ok(())
}

/// A tiny random BERT (2 layers, hidden 32, 4 heads) as a HuggingFace folder: `config.json`,
/// `tokenizer.json` over `words`, `model.safetensors` with BERT's `bert.` prefix and a pooler
/// (as `BertForPreTraining` saves them). What the tests import.
#[doc(hidden)]
pub fn write_tiny_hf_folder(dir: &std::path::Path, words: &[&str], seed: i64) -> Result<()> {
    use crate::error::IoContext;
    std::fs::create_dir_all(dir).at(dir)?;
    let cfg = tiny_config(4 + words.len() as i64);
    let mut v = serde_json::to_value(&cfg).map_err(|e| Error::internal(e.to_string()))?;
    v["model_type"] = "bert".into();
    v["hidden_act"] = "gelu".into();
    let p = dir.join("config.json");
    std::fs::write(&p, v.to_string()).at(&p)?;
    let p = dir.join(crate::tokenize::TOKENIZER_JSON);
    std::fs::write(&p, crate::tokenize::wordpiece_json(words)).at(&p)?;
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(tch::Device::Cpu);
    Bert::new(&(vs.root() / "bert"), &cfg)?;
    let pooler = linear(vs.root() / "bert" / "pooler" / "dense", 32, 32);
    drop(pooler);
    vs.save(dir.join("model.safetensors"))
        .map_err(|e| super::write_error(&dir.join("model.safetensors"), e))
}

#[doc(hidden)]
pub fn tiny_config(vocab_size: i64) -> BertConfig {
    BertConfig {
        vocab_size,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 64,
        max_position_embeddings: 512,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        hidden_dropout_prob: 0.1,
        attention_probs_dropout_prob: 0.1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn net(pool: TextPool) -> (nn::VarStore, TextNet) {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let mut arch = super::super::ArchSpec::new("bert");
        arch.bert = Some(tiny_config(50));
        let n = TextNet::new(&vs.root(), &arch, pool, true).unwrap();
        (vs, n)
    }

    fn embed(n: &TextNet, ids: &Tensor, mask: &Tensor) -> Tensor {
        tch::no_grad(|| {
            n.forward_in(ids, mask, false, super::super::Compute::Fp32, Device::Cpu)
                .unwrap()
        })
    }

    /// OML's padding test: the same texts padded to 200 and to 300 tokens embed the same, and
    /// the same as unpadded, for both poolings.
    #[test]
    fn padding_never_changes_an_embedding() {
        for pool in [TextPool::Mean, TextPool::Cls] {
            let (_vs, n) = net(pool);
            let lens = [7i64, 3, 12];
            let mut rows = Vec::new();
            for (i, &l) in lens.iter().enumerate() {
                let ids = Tensor::randint_low(4, 50, [1, l], (Kind::Int64, Device::Cpu));
                let alone = embed(&n, &ids, &ids.ones_like());
                rows.push((i, ids, alone));
            }
            for width in [200i64, 300] {
                let ids = Tensor::zeros([3, width], (Kind::Int64, Device::Cpu));
                let mask = Tensor::zeros([3, width], (Kind::Int64, Device::Cpu));
                for (i, t, _) in &rows {
                    let l = t.size()[1];
                    ids.get(*i as i64).narrow(0, 0, l).copy_(&t.get(0));
                    let _ = mask.get(*i as i64).narrow(0, 0, l).fill_(1);
                }
                // Garbage in the padded positions must not matter either.
                let junk = Tensor::randint_low(4, 50, [3, width], (Kind::Int64, Device::Cpu));
                let ids = ids.where_self(&mask.ne(0), &junk);
                let y = embed(&n, &ids, &mask);
                for (i, _, alone) in &rows {
                    let d = (y.get(*i as i64) - alone.get(0))
                        .abs()
                        .max()
                        .double_value(&[]);
                    assert!(d < 1e-6, "{pool:?} width {width} row {i}: {d}");
                }
            }
        }
    }

    /// Mean pooling divides by the real tokens only; CLS takes position 0.
    #[test]
    fn pooling_follows_the_mask() {
        let s = Tensor::from_slice(&[1f32, 2., 3., 4., 100., 100.]).view([1, 3, 2]);
        let m = Tensor::from_slice(&[1i64, 1, 0]).view([1, 3]);
        let mean: Vec<f32> = Vec::try_from(pool(&s, &m, TextPool::Mean).flatten(0, -1)).unwrap();
        assert_eq!(mean, [2.0, 3.0]);
        let cls: Vec<f32> = Vec::try_from(pool(&s, &m, TextPool::Cls).flatten(0, -1)).unwrap();
        assert_eq!(cls, [1.0, 2.0]);
    }

    /// The encoder equals the attention written out by hand (softmax over real keys,
    /// post-LN residuals, erf GELU): a naive reference for one layer.
    #[test]
    fn one_layer_equals_a_naive_reference() {
        tch::manual_seed(5);
        let vs = nn::VarStore::new(Device::Cpu);
        let mut cfg = tiny_config(50);
        cfg.num_hidden_layers = 1;
        let b = Bert::new(&vs.root(), &cfg).unwrap();
        let ids = Tensor::from_slice(&[5i64, 9, 11, 0]).view([1, 4]);
        let mask = Tensor::from_slice(&[1i64, 1, 1, 0]).view([1, 4]);
        let got = tch::no_grad(|| b.forward_t(&ids, &mask, false)).unwrap();
        let v = vs.variables();
        let w = |n: &str| v[n].shallow_clone();
        let ln = |x: &Tensor, p: &str| {
            x.layer_norm(
                [32i64].as_slice(),
                Some(w(&format!("{p}.weight"))),
                Some(w(&format!("{p}.bias"))),
                1e-12,
                false,
            )
        };
        let lin = |x: &Tensor, p: &str| {
            x.linear(&w(&format!("{p}.weight")), Some(w(&format!("{p}.bias"))))
        };
        tch::no_grad(|| {
            let x = w("embeddings.word_embeddings.weight").index_select(0, &ids.get(0))
                + w("embeddings.position_embeddings.weight").narrow(0, 0, 4)
                + w("embeddings.token_type_embeddings.weight").get(0);
            let x = ln(&x, "embeddings.LayerNorm");
            let p = "encoder.layer.0.attention";
            let (q, k, vv) = (
                lin(&x, &format!("{p}.self.query")),
                lin(&x, &format!("{p}.self.key")),
                lin(&x, &format!("{p}.self.value")),
            );
            let mut heads = Vec::new();
            for h in 0..4 {
                let s = |t: &Tensor| t.narrow(1, h * 8, 8);
                let sc = s(&q).matmul(&s(&k).tr()) / 8f64.sqrt();
                let sc = sc.masked_fill(&mask.get(0).eq(0).unsqueeze(0), f64::NEG_INFINITY);
                heads.push(sc.softmax(-1, Kind::Float).matmul(&s(&vv)));
            }
            let a = lin(&Tensor::cat(&heads, 1), &format!("{p}.output.dense"));
            let x = ln(&(a + &x), &format!("{p}.output.LayerNorm"));
            let f = lin(
                &lin(&x, "encoder.layer.0.intermediate.dense").gelu("none"),
                "encoder.layer.0.output.dense",
            );
            let want = ln(&(f + &x), "encoder.layer.0.output.LayerNorm");
            // Real tokens only: a padded position's own state is never read.
            let d = (got.get(0).narrow(0, 0, 3) - want.narrow(0, 0, 3))
                .abs()
                .max()
                .double_value(&[]);
            assert!(d < 1e-5, "{d}");
        });
    }

    #[test]
    fn configs_that_cannot_run_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config.json");
        for (json, why) in [
            (r#"{"model_type":"roberta"}"#, "model_type"),
            (r#"{"model_type":"bert","hidden_act":"relu"}"#, "hidden_act"),
        ] {
            std::fs::write(&p, json).unwrap();
            let e = BertConfig::from_hf_json(&p).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().contains(why), "{e}");
        }
        let mut c = tiny_config(10);
        c.num_attention_heads = 5;
        assert!(c.validate().unwrap_err().to_string().contains("multiple"));
    }
}
