//! The embed stage for text datasets: the rows' texts -> tokens -> a BERT encoder ->
//! `emb.npy` + `emb.ids.npy`, rows in id order as for images.
//!
//! Texts are embedded a window at a time (64 batches of rows in id order): inside a window
//! they are sorted by length so that each batch pads to a similar length (padding is work that
//! changes nothing), and the window's embeddings go back to id order before they are written.
//! Memory holds a window's tokens and embeddings, never the whole dataset's.
use super::embed::{EmbedOptions, EmbedSummary, PhaseTimes};
use super::Model;
use crate::dataset::Dataset;
use crate::device;
use crate::error::{Error, Result};
use crate::manifest::ManifestBuilder;
use crate::npy::{self, NpyWriter};
use std::time::Instant;

/// Batches per window (see the module comment).
const WINDOW_BATCHES: usize = 64;

pub(super) struct Job<'a> {
    pub opts: &'a EmbedOptions,
    pub ds: &'a Dataset,
    /// The dataset rows to embed (a shard's), in id order.
    pub rows: &'a [usize],
    /// Their range among the split's rows (for the shard's manifest).
    pub range: (usize, usize),
    pub model: &'a Model,
    pub t0: Instant,
}

impl Job<'_> {
    pub fn run(self, on_device: impl FnOnce(&str)) -> Result<EmbedSummary> {
        let Job {
            opts,
            ds,
            rows,
            range,
            model,
            t0,
        } = self;
        let tok = model
            .tokenizer()
            .ok_or_else(|| Error::internal("a text model without a tokenizer"))?;
        let text_spec = model
            .spec
            .text
            .as_ref()
            .ok_or_else(|| Error::internal("a text model without its text section"))?;
        refuse_missing_texts(opts, ds, rows)?;
        let (out, mut params) = super::embed::output_and_params(opts, model);
        let (dim, bs) = (model.spec.embedding_dim as usize, opts.batch_size);
        params.insert("text".into(), serde_json::json!(text_spec));
        let params = serde_json::Value::Object(params);
        let mut m = ManifestBuilder::new("embed", params);
        // The texts are in the dataset: its fingerprint covers them.
        m.input("dataset", &opts.dataset)?;
        m.input("model", &model.dir.join(super::MODEL_JSON))?;
        m.input("weights", &model.weights_path())?;
        m.input("tokenizer", &model.dir.join(&text_spec.tokenizer))?;
        if let Some(s) = opts.shard {
            m.shard(s, range.0, range.1);
        }
        let ids_path = npy::ids_path(&out);
        m.companion(&ids_path);
        m.skip_if_done(&out)?;
        let dev = model.device;
        on_device(&device::describe(dev));

        let total = rows.len();
        let mut t = PhaseTimes::default();
        let mut w = NpyWriter::create(&out, opts.out_dtype, &[total, dim])?;
        let pb = crate::progress::bar(total as u64, "embed");
        let mut tokens = 0usize;
        let name = |r: usize| text_name(opts, ds, r);
        let mut buf = vec![0f32; (WINDOW_BATCHES * bs).min(total) * dim];
        for window in rows.chunks(WINDOW_BATCHES * bs) {
            let mut order: Vec<usize> = (0..window.len()).collect();
            order.sort_by_key(|&i| std::cmp::Reverse(text_of(ds, window[i]).len()));
            for batch in order.chunks(bs) {
                let tt = Instant::now();
                let texts: Vec<&str> = batch.iter().map(|&i| text_of(ds, window[i])).collect();
                let tb = tok.batch(&texts, &|k| name(window[batch[k]]))?;
                tokens += tb.tokens;
                t.decode += tt.elapsed().as_secs_f64();
                let tf = Instant::now();
                let y = model.embed_tokens(&tb)?;
                let v: Vec<f32> = Vec::try_from(y.flatten(0, -1)).map_err(Error::from)?;
                t.forward += tf.elapsed().as_secs_f64();
                for (k, &i) in batch.iter().enumerate() {
                    buf[i * dim..(i + 1) * dim].copy_from_slice(&v[k * dim..(k + 1) * dim]);
                }
                pb.inc(batch.len() as u64);
            }
            w.write_f32(&buf[..window.len() * dim])?;
        }
        pb.finish_and_clear();

        let ids: Vec<i64> = rows.iter().map(|&r| ds.ids[r]).collect();
        let sealed = vec![npy::seal_i64(&ids_path, &ids)?];
        let main = w.seal()?;
        let seconds = t0.elapsed().as_secs_f64();
        m.rows("rows", total as u64)
            .rows("tokens", tokens as u64)
            .timing("tokenize", t.decode)
            .timing("inference", t.forward)
            .timing("total", seconds);
        m.commit(main, sealed)?;
        Ok(EmbedSummary {
            out,
            ids: ids_path,
            rows: total,
            dim,
            skipped: 0,
            skipped_list: None,
            device: device::describe(dev),
            seconds,
            times: t,
            modality: crate::dataset::Modality::Text,
        })
    }
}

/// What `--check-only` found in a text dataset.
#[derive(Debug)]
pub struct TextCheck {
    pub texts: usize,
    /// The model's `max_length` (tokens, special tokens included).
    pub max_length: usize,
    /// Texts longer than `max_length` (embedded from their first `max_length` tokens): (id,
    /// tokens before truncation), in id order.
    pub truncated: Vec<(i64, usize)>,
    /// Lengths in tokens before truncation: the median and the longest.
    pub median: usize,
    pub longest: usize,
    /// Wall time of tokenizing them all.
    pub seconds: f64,
}

/// `--check-only` on texts: tokenizes every text the run would embed with the model's
/// tokenizer; refuses rows without a text or texts without a token (all of them listed, as
/// the embedding would stop at the first), and counts the texts truncated at `max_length`.
pub(super) fn check(
    opts: &EmbedOptions,
    ds: &Dataset,
    rows: &[usize],
    model: &Model,
) -> Result<TextCheck> {
    let tok = model
        .tokenizer()
        .ok_or_else(|| Error::internal("a text model without a tokenizer"))?;
    refuse_missing_texts(opts, ds, rows)?;
    let t = Instant::now();
    let pb = crate::progress::bar(rows.len() as u64, "check");
    let texts: Vec<&str> = rows.iter().map(|&r| text_of(ds, r)).collect();
    let lengths = tok.check_all(&texts, &|k| text_name(opts, ds, rows[k]), &mut |n| {
        pb.inc(n as u64)
    })?;
    pb.finish_and_clear();
    let max_length = tok.max_length;
    let truncated = rows
        .iter()
        .zip(&lengths)
        .filter(|&(_, &l)| l > max_length)
        .map(|(&r, &l)| (ds.ids[r], l))
        .collect();
    let mut sorted = lengths;
    sorted.sort_unstable();
    Ok(TextCheck {
        texts: rows.len(),
        max_length,
        truncated,
        median: sorted.get(sorted.len() / 2).copied().unwrap_or(0),
        longest: sorted.last().copied().unwrap_or(0),
        seconds: t.elapsed().as_secs_f64(),
    })
}

/// Refuses rows without a text (a dataset with both columns), naming the first few.
fn refuse_missing_texts(opts: &EmbedOptions, ds: &Dataset, rows: &[usize]) -> Result<()> {
    let missing: Vec<String> = rows
        .iter()
        .filter(|&&r| ds.text[r].is_none())
        .take(6)
        .map(|&r| format!("id {}", ds.ids[r]))
        .collect();
    if !missing.is_empty() {
        return Err(Error::input(format!(
            "{}: row(s) without a text ({}{}): a text model embeds a text per row",
            opts.dataset.display(),
            missing[..missing.len().min(5)].join(", "),
            if missing.len() > 5 { ", ..." } else { "" }
        )));
    }
    Ok(())
}

/// How errors name a row's text.
fn text_name(opts: &EmbedOptions, ds: &Dataset, r: usize) -> String {
    format!(
        "{}: id {} (column 'text')",
        opts.dataset.display(),
        ds.ids[r]
    )
}

fn text_of(ds: &Dataset, row: usize) -> &str {
    ds.text[row].as_deref().unwrap_or("")
}
