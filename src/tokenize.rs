//! Texts to token ids: a HuggingFace `tokenizer.json` (the `tokenizers` crate, offline), with
//! its own padding and truncation replaced by simile's: truncation to the model's
//! `max_length` (special tokens included, as sentence-transformers), padding to the longest
//! text of each batch (never to a fixed length: padding is work that changes nothing).
use crate::error::{Error, Result};
use std::path::Path;
use tch::Tensor;
use tokenizers::{Tokenizer, TruncationParams};

pub const TOKENIZER_JSON: &str = "tokenizer.json";

/// A loaded tokenizer, ready to make batches.
pub struct TextTokenizer {
    tok: Tokenizer,
    pad_id: u32,
    pub max_length: usize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("max_length", &self.max_length)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

/// A batch of token ids and its attention mask, both `[B, L]` int64 on the CPU, `L` the
/// longest text's length.
pub struct TokenBatch {
    pub ids: Tensor,
    pub mask: Tensor,
    /// Real tokens in the batch (for throughput figures).
    pub tokens: usize,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`; `max_length` counts the special tokens.
    pub fn load(path: &Path, max_length: usize) -> Result<TextTokenizer> {
        if max_length < 3 {
            return Err(Error::input(format!(
                "max_length {max_length}: must be at least 3 (two special tokens and one word)"
            )));
        }
        if !path.is_file() {
            return Err(Error::input(format!(
                "{}: no such tokenizer file (a text model folder holds its tokenizer.json)",
                path.display()
            )));
        }
        let mut tok = Tokenizer::from_file(path).map_err(|e| {
            Error::input(format!(
                "{}: not a HuggingFace tokenizer.json: {e}",
                path.display()
            ))
        })?;
        let pad_id = tok
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| tok.token_to_id("[PAD]"))
            .unwrap_or(0);
        tok.with_padding(None);
        tok.with_truncation(Some(TruncationParams {
            max_length,
            ..Default::default()
        }))
        .map_err(|e| Error::input(format!("{}: truncation: {e}", path.display())))?;
        Ok(TextTokenizer {
            tok,
            pad_id,
            max_length,
        })
    }

    /// Tokens the tokenizer can emit (added tokens included): must fit the model's embedding
    /// table.
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }

    /// The largest id the tokenizer can emit.
    pub fn max_id(&self) -> u32 {
        self.tok
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .unwrap_or(0)
    }

    /// Ids and mask for `texts`. A text with no token but the special ones (empty, or only
    /// characters the tokenizer drops) is an error naming `names[i]`: its embedding would be
    /// the same for every such text.
    pub fn batch(&self, texts: &[&str], names: &dyn Fn(usize) -> String) -> Result<TokenBatch> {
        let enc = self
            .tok
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| Error::internal(format!("tokenizing: {e}")))?;
        let len = enc.iter().map(|e| e.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![i64::from(self.pad_id); texts.len() * len];
        let mut mask = vec![0i64; texts.len() * len];
        let mut tokens = 0;
        for (i, e) in enc.iter().enumerate() {
            if e.get_special_tokens_mask().iter().all(|&s| s == 1) {
                return Err(Error::input(format!(
                    "{}: the text has no tokens once normalised (only spaces, control or unknown characters?): nothing to embed",
                    names(i)
                )));
            }
            for (j, (&t, &m)) in e.get_ids().iter().zip(e.get_attention_mask()).enumerate() {
                ids[i * len + j] = i64::from(t);
                mask[i * len + j] = i64::from(m);
            }
            tokens += e.len();
        }
        let shape = [texts.len() as i64, len as i64];
        Ok(TokenBatch {
            ids: Tensor::from_slice(&ids).view(shape),
            mask: Tensor::from_slice(&mask).view(shape),
            tokens,
        })
    }

    /// Each text's length in tokens before truncation (special tokens included), tokenized a
    /// chunk at a time (`progress` gets each chunk's size); refuses, listing every one of them
    /// by `names`, the texts with no token besides the special ones. What training checks
    /// before its first step and `simile-embed --check-only` reports.
    pub fn check_all(
        &self,
        texts: &[&str],
        names: &dyn Fn(usize) -> String,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<usize>> {
        let mut whole = self.tok.clone();
        whole
            .with_truncation(None)
            .map_err(|e| Error::internal(format!("tokenizing: {e}")))?;
        let mut lengths = Vec::with_capacity(texts.len());
        let mut empty = Vec::new();
        for (c, chunk) in texts.chunks(4096).enumerate() {
            let enc = whole
                .encode_batch(chunk.to_vec(), true)
                .map_err(|e| Error::internal(format!("tokenizing: {e}")))?;
            for (k, e) in enc.iter().enumerate() {
                if !e.get_special_tokens_mask().contains(&0) {
                    empty.push(format!("  {}", names(c * 4096 + k)));
                }
                lengths.push(e.len());
            }
            progress(chunk.len());
        }
        if !empty.is_empty() {
            let mut lines = vec![format!(
                "{} of {} texts have no tokens once normalised (only spaces, control or unknown characters?); nothing was written:",
                empty.len(),
                texts.len()
            )];
            lines.extend(empty);
            return Err(Error::InputMany(lines));
        }
        Ok(lengths)
    }
}

/// A small BERT-style `tokenizer.json` (lower-casing normaliser, BERT pre-tokenizer,
/// WordPiece over `words` after `[PAD] [UNK] [CLS] [SEP]`, `[CLS] text [SEP]`): what the tests
/// build their tiny text models with, in HuggingFace's format.
#[doc(hidden)]
pub fn wordpiece_json(words: &[&str]) -> String {
    let specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"];
    let vocab: serde_json::Map<String, serde_json::Value> = specials
        .iter()
        .chain(words)
        .enumerate()
        .map(|(i, w)| (w.to_string(), serde_json::json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let special = |s: &str| serde_json::json!({"SpecialToken": {"id": s, "type_id": 0}});
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
            "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [special("[CLS]"), {"Sequence": {"id": "A", "type_id": 0}}, special("[SEP]")],
            "pair": [special("[CLS]"), {"Sequence": {"id": "A", "type_id": 0}}, special("[SEP]"),
                {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}
            }
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100, "vocab": vocab}
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(dir: &Path, max: usize) -> TextTokenizer {
        let p = dir.join(TOKENIZER_JSON);
        std::fs::write(
            &p,
            wordpiece_json(&["the", "cat", "sat", "on", "mat", "##s"]),
        )
        .unwrap();
        TextTokenizer::load(&p, max).unwrap()
    }

    #[test]
    fn pads_to_the_longest_text_and_truncates_at_max_length() {
        let d = tempfile::tempdir().unwrap();
        let t = tok(d.path(), 5);
        let b = t
            .batch(&["The cat", "the cat sat on the mat", "cats"], &|i| {
                format!("text {i}")
            })
            .unwrap();
        // [CLS] the cat [SEP] / [CLS] the cat sat [SEP] (truncated to 5) / [CLS] cat ##s [SEP]
        assert_eq!(b.ids.size(), [3, 5]);
        let ids: Vec<i64> = Vec::try_from(b.ids.flatten(0, -1)).unwrap();
        assert_eq!(ids, [2, 4, 5, 3, 0, 2, 4, 5, 6, 3, 2, 5, 9, 3, 0]);
        let mask: Vec<i64> = Vec::try_from(b.mask.flatten(0, -1)).unwrap();
        assert_eq!(mask, [1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]);
        assert_eq!(b.tokens, 13);
        assert_eq!(t.max_id(), 9);
    }

    #[test]
    fn a_text_with_no_tokens_is_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        let t = tok(d.path(), 16);
        let e = t
            .batch(&["the cat", " \t "], &|i| format!("rows.csv:{}", i + 2))
            .err()
            .unwrap();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("rows.csv:3"), "{e}");
        // Unknown words are tokens ([UNK]), not nothing.
        assert!(t.batch(&["zebra"], &|_| String::new()).is_ok());
        // Lengths before truncation (max 16 here), special tokens included; every text
        // without a token named.
        let long = "the cat sat on the mat ".repeat(4);
        let names = |i: usize| format!("text {i}");
        let mut seen = 0;
        assert_eq!(
            t.check_all(&["the cat", &long, "cats"], &names, &mut |n| seen += n)
                .unwrap(),
            [4, 26, 4]
        );
        assert_eq!(seen, 3);
        let e = t
            .check_all(&["the cat", " \t ", "cats", "\u{7}"], &names, &mut |_| {})
            .unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let m = e.to_string();
        assert!(
            m.contains("2 of 4 texts") && m.contains("text 1") && m.contains("text 3"),
            "{m}"
        );
        let bad = d.path().join("bad.json");
        std::fs::write(&bad, "{}").unwrap();
        assert_eq!(TextTokenizer::load(&bad, 16).unwrap_err().exit_code(), 2);
    }
}
