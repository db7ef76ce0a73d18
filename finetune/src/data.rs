//! The Rotten Tomatoes sentences of Hutto & Gilbert (ICWSM 2014), as shipped in the source
//! distribution of `vadersentiment` 3.3.2: `movieReviewSnippets_GroundTruth.txt`, one sentence
//! a line, tab-separated `id`, mean human rating (−4…4), text.

use std::path::Path;

/// One labelled sentence.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// The file's sentence id.
    pub id: u32,
    /// The sentence.
    pub text: String,
    /// 1 when the mean rating is positive, 0 when negative.
    pub label: u32,
}

/// Parses the ground-truth file's text. Ratings of exactly 0 carry no sentiment and are
/// dropped; a line that is not `id<TAB>rating<TAB>text` is an error naming its line number.
pub fn parse_ground_truth(text: &str) -> Result<Vec<Example>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let mut f = line.splitn(3, '\t');
        let (Some(id), Some(rating), Some(sentence)) = (f.next(), f.next(), f.next()) else {
            return Err(format!(
                "line {}: expected id, rating and text separated by tabs",
                i + 1
            ));
        };
        let id: u32 = id
            .trim()
            .parse()
            .map_err(|_| format!("line {}: id `{id}` is not a number", i + 1))?;
        let rating: f64 = rating
            .trim()
            .parse()
            .map_err(|_| format!("line {}: rating `{rating}` is not a number", i + 1))?;
        if rating == 0.0 {
            continue;
        }
        out.push(Example {
            id,
            text: sentence.trim().to_string(),
            label: (rating > 0.0) as u32,
        });
    }
    Ok(out)
}

/// Reads and parses the file (invalid UTF-8 is replaced, not fatal).
pub fn read_ground_truth(path: &Path) -> Result<Vec<Example>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_ground_truth(&String::from_utf8_lossy(&bytes))
}

/// The fixed split: sentences whose id is a multiple of 10 are the dev set, the rest train.
pub fn split(examples: Vec<Example>) -> (Vec<Example>, Vec<Example>) {
    examples.into_iter().partition(|e| e.id % 10 != 0)
}

/// The first `n` examples after a shuffle fixed by `seed` (the same subset for every run).
pub fn subset(examples: &[Example], n: usize, seed: u64) -> Vec<Example> {
    let mut idx: Vec<usize> = (0..examples.len()).collect();
    shuffle(&mut idx, &mut sage_candle::bert::Rng::new(seed));
    idx.truncate(n);
    idx.into_iter().map(|i| examples[i].clone()).collect()
}

/// Fisher–Yates.
pub fn shuffle<T>(v: &mut [T], rng: &mut sage_candle::bert::Rng) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i + 1));
    }
}
