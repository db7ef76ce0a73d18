//! Sentences to token ids with a Hugging Face `tokenizer.json` (the `tokenizers` crate), and
//! id lists to padded batches.

use std::path::Path;

use tokenizers::Tokenizer;

/// A tokenizer that truncates to `max_len` tokens (keeping the closing `[SEP]`).
pub struct TextEncoder {
    tok: Tokenizer,
    max_len: usize,
    pad: u32,
}

/// Padded token ids and the attention mask, row-major `rows × len`.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Token ids, padding included.
    pub ids: Vec<u32>,
    /// 1 for tokens, 0 for padding.
    pub mask: Vec<f32>,
    /// Sequences.
    pub rows: usize,
    /// Tokens per sequence (the longest in the batch).
    pub len: usize,
}

impl TextEncoder {
    /// Loads `tokenizer.json`; its own padding and truncation settings are turned off (batches
    /// are padded to their longest sequence here, which saves work on short sentences).
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self, String> {
        let mut tok = Tokenizer::from_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
        tok.with_padding(None);
        tok.with_truncation(None).map_err(|e| e.to_string())?;
        let pad = tok.token_to_id("[PAD]").unwrap_or(0);
        Ok(TextEncoder {
            tok,
            max_len: max_len.max(2),
            pad,
        })
    }

    /// The ids of one sentence, special tokens included, at most `max_len`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let enc = self.tok.encode(text, true).map_err(|e| e.to_string())?;
        let mut ids = enc.get_ids().to_vec();
        if ids.len() > self.max_len {
            let last = *ids.last().expect("non-empty");
            ids.truncate(self.max_len - 1);
            ids.push(last);
        }
        Ok(ids)
    }

    /// Pads `seqs` to the longest of them.
    pub fn pad(&self, seqs: &[&[u32]]) -> Batch {
        let len = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(seqs.len() * len);
        let mut mask = Vec::with_capacity(seqs.len() * len);
        for s in seqs {
            ids.extend_from_slice(s);
            ids.extend(std::iter::repeat_n(self.pad, len - s.len()));
            mask.extend(std::iter::repeat_n(1.0, s.len()));
            mask.extend(std::iter::repeat_n(0.0, len - s.len()));
        }
        Batch {
            ids,
            mask,
            rows: seqs.len(),
            len,
        }
    }
}
