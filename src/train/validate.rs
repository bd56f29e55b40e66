//! Validation while training, through the same library code as the stages: the validation
//! embeddings are searched in memory with `knn::search` (as `simile-distance`: L2, exact, the one
//! exclusion rule of `retrieval`) and scored with `metrics::evaluate` and the default metric
//! set (as `simile-score`), so a number in `val_metrics.parquet` is the number
//! `simile-embed` + `simile-distance` + `simile-score` give for the same weights; the
//! checkpointing metric gets simile-score's default interval beside it.
use super::data::{self, ImageCache};
use super::distributed::Dist;
use crate::dataset::{Dataset, Split};
use crate::error::{Error, Result};
use crate::image::Preprocess;
use crate::knn::search;
use crate::metrics::confidence::CiOptions;
use crate::metrics::{self, AggregateOptions, Relevance, Scores};
use crate::model::bert::TextNet;
use crate::model::{Compute, Net};
use crate::retrieval::{QueryGallery, SequenceRule};
use crate::tokenize::TextTokenizer;
use tch::{Device, Kind, Tensor};

/// What validation needs, prepared once.
pub struct Validator {
    pub qg: QueryGallery,
    /// Dataset rows to embed (queries and gallery, ascending).
    pub rows: Vec<usize>,
    q_map: Vec<usize>,
    g_map: Vec<usize>,
    n_gt: Vec<usize>,
    categories: Option<Vec<Option<String>>>,
    /// The key whose interval is reported (the checkpointing metric).
    ci_key: String,
}

impl Validator {
    /// None when the dataset has no validation split.
    pub fn new(ds: &Dataset, ci_key: &str) -> Result<Option<Validator>> {
        if ds.rows_of_split(Split::Validation).is_empty() {
            return Ok(None);
        }
        let qg = QueryGallery::from_dataset(ds, Split::Validation, SequenceRule::default())?;
        let (rows, q_map, g_map) = qg.union_rows();
        let n_gt = qg.positive_counts();
        let categories = ds.has_category().then(|| qg.queries.category.clone());
        Ok(Some(Validator {
            qg,
            rows,
            q_map,
            g_map,
            n_gt,
            categories,
            ci_key: ci_key.to_string(),
        }))
    }

    /// Embeds the validation images with `net` (eval mode, no gradients, on `device` in the
    /// run's `compute` mode, as `simile-embed --compute` would) and scores them.
    pub fn run(
        &self,
        net: &Net,
        cache: &ImageCache,
        pre: &Preprocess,
        (device, compute): (Device, Compute),
        batch_size: usize,
        dist: Option<&Dist>,
    ) -> Result<Scores> {
        let dim = net.dim as usize;
        // A rank embeds its share of the rows; the shares are gathered before the search.
        let mine = match dist {
            Some(d) => &self.rows[d.share(self.rows.len())],
            None => &self.rows[..],
        };
        let mut emb: Vec<f32> = Vec::with_capacity(mine.len() * dim);
        let s = pre.size as i64;
        for chunk in mine.chunks(batch_size) {
            let buf = data::batch(cache, chunk, pre, None, 0);
            let x = Tensor::f_from_slice(&buf)?
                .f_view([chunk.len() as i64, 3, s, s])?
                .f_to_device(device)?
                .f_to_kind(Kind::Float)?;
            let y = tch::no_grad(|| net.forward_in(&x, false, compute, device))?
                .f_to_device(Device::Cpu)?
                .f_contiguous()?;
            let v: Vec<f32> = Vec::try_from(y.f_flatten(0, -1)?)?;
            check_finite(&v)?;
            emb.extend_from_slice(&v);
        }
        self.score(emb, dim, device, dist)
    }

    /// Embeds the validation texts with `net` (eval mode, no gradients, in the run's
    /// `compute` mode, as `simile-embed` would: sorted by length so that each batch pads
    /// little) and scores them.
    pub fn run_texts(
        &self,
        net: &TextNet,
        tok: &TextTokenizer,
        ds: &Dataset,
        (device, compute): (Device, Compute),
        batch_size: usize,
        dist: Option<&Dist>,
    ) -> Result<Scores> {
        let dim = net.bert.config().hidden_size as usize;
        let mine = match dist {
            Some(d) => &self.rows[d.share(self.rows.len())],
            None => &self.rows[..],
        };
        let text = |r: usize| ds.text[r].as_deref().unwrap_or("");
        let mut order: Vec<usize> = (0..mine.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(text(mine[i]).len()));
        let mut emb = vec![0f32; mine.len() * dim];
        for batch in order.chunks(batch_size) {
            let texts: Vec<&str> = batch.iter().map(|&i| text(mine[i])).collect();
            let tb = tok.batch(&texts, &|k| {
                format!("validation text id {}", ds.ids[mine[batch[k]]])
            })?;
            let y = tch::no_grad(|| {
                net.forward_in(
                    &tb.ids.to_device(device),
                    &tb.mask.to_device(device),
                    false,
                    compute,
                    device,
                )
            })?
            .f_to_device(Device::Cpu)?
            .f_contiguous()?;
            let v: Vec<f32> = Vec::try_from(y.f_flatten(0, -1)?)?;
            check_finite(&v)?;
            for (k, &i) in batch.iter().enumerate() {
                emb[i * dim..(i + 1) * dim].copy_from_slice(&v[k * dim..(k + 1) * dim]);
            }
        }
        self.score(emb, dim, device, dist)
    }

    /// Searches and scores this rank's embeddings of the validation rows (gathered over the
    /// ranks first).
    fn score(
        &self,
        mut emb: Vec<f32>,
        dim: usize,
        device: Device,
        dist: Option<&Dist>,
    ) -> Result<Scores> {
        if let Some(d) = dist {
            emb = d.gather_shares(&emb, self.rows.len(), dim)?;
        }
        let set = metrics::default_metric_set();
        let mut hits: Vec<Vec<bool>> = vec![Vec::new(); self.qg.queries.len()];
        search::search_matrix(
            &emb,
            dim,
            &self.qg,
            &self.q_map,
            &self.g_map,
            set.max_k().max(1),
            device,
            |q, list| {
                let g: Vec<usize> = list.iter().map(|(p, _)| *p as usize).collect();
                hits[q] = metrics::hits_of(&self.qg, q, &g);
                Ok(())
            },
        )?;
        let rel: Vec<Relevance> = hits
            .iter()
            .zip(&self.n_gt)
            .map(|(h, &n)| Relevance { hits: h, n_gt: n })
            .collect();
        // The checkpointing metric's interval beside it (the defaults of simile-score).
        metrics::confidence::evaluate_with_interval(
            &rel,
            self.categories.as_deref(),
            &self.qg.queries.labels,
            &set,
            AggregateOptions::default(),
            &CiOptions::default(),
            &self.ci_key,
        )
    }
}

fn check_finite(v: &[f32]) -> Result<()> {
    if v.iter().any(|x| !x.is_finite()) {
        return Err(Error::input(
            "validation: the network produced NaN or infinite embeddings (the weights have diverged; lower the learning rate)",
        ));
    }
    Ok(())
}
