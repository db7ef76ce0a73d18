//! The fine-tuning demo behind `scripts/finetune`: all-MiniLM-L6-v2 (a pretrained 6-layer BERT)
//! fine-tuned for Rotten Tomatoes sentence sentiment with AdamW and AdamW-SAGE through
//! sage-candle, over several seeds.
//!
//! - [`data`]: the ground-truth file reader and the fixed train/dev split.
//! - [`text`]: tokenization (`tokenizers`) and padding.
//! - [`train`]: one run.
//! - [`plot`]: the PNG (plotters).
#![deny(missing_docs)]

pub mod data;
pub mod plot;
pub mod text;
pub mod train;
