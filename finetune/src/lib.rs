//! The fine-tuning demo behind `scripts/finetune`: all-MiniLM-L6-v2 (a pretrained 6-layer BERT)
//! fine-tuned for Rotten Tomatoes sentence sentiment with AdamW and AdamW-SAGE through
//! sage-candle, over several seeds.
//!
//! - [`data`]: the ground-truth file reader and the fixed train/dev split.
//! - [`text`]: tokenization (`tokenizers`) and padding.
//! - [`train`]: one run (with epoch checkpoints to resume from).
//! - [`analysis`]: the paper's claims 2 and 3 on a trained model (full-set sensitivity, its
//!   distribution, one-shot pruning).
//! - [`protocol`]: the paper's protocol (grid, selection on dev, seeds on test, journal).
//! - [`stats`]: mean, standard deviation, the paired t-test.
//! - [`plot`]: the PNGs (plotters).
#![deny(missing_docs)]

pub mod analysis;
pub mod data;
pub mod plot;
pub mod protocol;
pub mod stats;
pub mod text;
pub mod train;
