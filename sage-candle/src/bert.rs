//! A BERT encoder with a sentence-classification head, on candle-nn, every op differentiable.
//!
//! Parameter names follow Hugging Face's `BertModel` without the `bert.` prefix
//! (`embeddings.word_embeddings.weight`, `encoder.layer.0.attention.self.query.weight`, ...),
//! so a sentence-transformers checkpoint loads by name. The head is mean pooling over the
//! attention mask (how sentence-transformers trained MiniLM) then dropout and a linear layer
//! `classifier`.
//!
//! candle-nn's `LayerNorm` runs a fused kernel with no backward pass, so gradients would stop
//! at every norm: [`LayerNorm`] here is written with elementary ops.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, Init, Linear, VarBuilder, VarMap};

/// The fields of a Hugging Face BERT `config.json` this encoder reads.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
pub struct BertConfig {
    /// Token vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Transformer blocks.
    pub num_hidden_layers: usize,
    /// Attention heads per block.
    pub num_attention_heads: usize,
    /// Feed-forward inner width.
    pub intermediate_size: usize,
    /// Longest sequence.
    pub max_position_embeddings: usize,
    /// Segment vocabulary.
    pub type_vocab_size: usize,
    /// LayerNorm ε.
    pub layer_norm_eps: f64,
    /// Dropout after embeddings, attention output and feed-forward.
    pub hidden_dropout_prob: f32,
    /// Dropout on attention probabilities.
    pub attention_probs_dropout_prob: f32,
}

impl BertConfig {
    /// A tiny configuration for tests.
    pub fn tiny(vocab_size: usize) -> Self {
        BertConfig {
            vocab_size,
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 32,
            max_position_embeddings: 32,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
        }
    }
}

/// A small, seedable random generator (SplitMix64): candle's CPU generator cannot be seeded,
/// and seeds must reproduce runs (dropout masks, initialisation).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
    /// Uniform index below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Inverted dropout with a mask from `rng`; the identity when `rng` is `None` (evaluation).
pub fn dropout(x: &Tensor, p: f32, rng: Option<&mut Rng>) -> Result<Tensor> {
    let Some(rng) = rng else { return Ok(x.clone()) };
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.uniform() < p { 0.0 } else { keep })
        .collect();
    x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?)
}

/// LayerNorm over the last dimension from elementary (differentiable) ops.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// `weight` (ones) and `bias` (zeros) of width `d` under `vb`.
    pub fn new(d: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get_with_hints(d, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(d, "bias", Init::Const(0.0))?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let c = x.broadcast_sub(&mean)?;
        let var = c.sqr()?.mean_keepdim(D::Minus1)?;
        let y = c.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        y.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
    p: f32,
}

impl Embeddings {
    fn new(c: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let e = |n, name| candle_nn::embedding(n, c.hidden_size, vb.pp(name));
        Ok(Embeddings {
            word: e(c.vocab_size, "word_embeddings")?,
            position: e(c.max_position_embeddings, "position_embeddings")?,
            token_type: e(c.type_vocab_size, "token_type_embeddings")?,
            norm: LayerNorm::new(c.hidden_size, c.layer_norm_eps, vb.pp("LayerNorm"))?,
            p: c.hidden_dropout_prob,
        })
    }

    fn forward(&self, ids: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        let (_, s) = ids.dims2()?;
        let pos = Tensor::arange(0u32, s as u32, ids.device())?;
        let x = self
            .word
            .forward(ids)?
            .broadcast_add(&self.position.forward(&pos)?)?
            .broadcast_add(&self.token_type.forward(&pos.zeros_like()?)?)?;
        dropout(&self.norm.forward(&x)?, self.p, rng)
    }
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    inter: Linear,
    out: Linear,
    out_norm: LayerNorm,
    heads: usize,
    p_hidden: f32,
    p_attn: f32,
}

impl Layer {
    fn new(c: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let h = c.hidden_size;
        let a = vb.pp("attention");
        let s = a.pp("self");
        Ok(Layer {
            query: candle_nn::linear(h, h, s.pp("query"))?,
            key: candle_nn::linear(h, h, s.pp("key"))?,
            value: candle_nn::linear(h, h, s.pp("value"))?,
            attn_out: candle_nn::linear(h, h, a.pp("output").pp("dense"))?,
            attn_norm: LayerNorm::new(h, c.layer_norm_eps, a.pp("output").pp("LayerNorm"))?,
            inter: candle_nn::linear(h, c.intermediate_size, vb.pp("intermediate").pp("dense"))?,
            out: candle_nn::linear(c.intermediate_size, h, vb.pp("output").pp("dense"))?,
            out_norm: LayerNorm::new(h, c.layer_norm_eps, vb.pp("output").pp("LayerNorm"))?,
            heads: c.num_attention_heads,
            p_hidden: c.hidden_dropout_prob,
            p_attn: c.attention_probs_dropout_prob,
        })
    }

    /// `x`: [b, s, h]; `bias`: [b, 1, 1, s] additive attention bias.
    fn forward(&self, x: &Tensor, bias: &Tensor, mut rng: Option<&mut Rng>) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let d = h / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, s, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(bias)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let probs = dropout(&probs, self.p_attn, rng.as_deref_mut())?;
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, s, h))?;
        let a = dropout(
            &self.attn_out.forward(&ctx)?,
            self.p_hidden,
            rng.as_deref_mut(),
        )?;
        let x = self.attn_norm.forward(&(a + x)?)?;
        let f = self.out.forward(&self.inter.forward(&x)?.gelu_erf()?)?;
        let f = dropout(&f, self.p_hidden, rng)?;
        self.out_norm.forward(&(f + x)?)
    }
}

/// BERT with a mean-pooling classification head.
pub struct BertClassifier {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    classifier: Linear,
    p: f32,
    /// Cut the graph after the embeddings: no gradient is computed for them (a frozen
    /// embedding table saves the 30522×h gradient every step).
    pub freeze_embeddings: bool,
}

impl BertClassifier {
    /// Builds the model's variables under `vb` (names as in Hugging Face BERT) and a
    /// `classifier` with `labels` outputs.
    pub fn new(c: &BertConfig, labels: usize, vb: VarBuilder) -> Result<Self> {
        let enc = vb.pp("encoder").pp("layer");
        Ok(BertClassifier {
            embeddings: Embeddings::new(c, vb.pp("embeddings"))?,
            layers: (0..c.num_hidden_layers)
                .map(|i| Layer::new(c, enc.pp(i.to_string())))
                .collect::<Result<_>>()?,
            classifier: candle_nn::linear(c.hidden_size, labels, vb.pp("classifier"))?,
            p: c.hidden_dropout_prob,
            freeze_embeddings: false,
        })
    }

    /// Logits [b, labels] for token ids [b, s] (u32) and a 0/1 attention mask [b, s] (f32);
    /// `rng` turns dropout on (training), `None` is evaluation.
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        mut rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let mut x = self.embeddings.forward(ids, rng.as_deref_mut())?;
        if self.freeze_embeddings {
            x = x.detach();
        }
        // Padding gets a large negative bias before the softmax.
        let bias = ((mask.ones_like()? - mask)? * -10000.0)?.reshape((b, 1, 1, s))?;
        for l in &self.layers {
            x = l.forward(&x, &bias, rng.as_deref_mut())?;
        }
        let m = mask.unsqueeze(2)?;
        let pooled = x.broadcast_mul(&m)?.sum(1)?.broadcast_div(&m.sum(1)?)?;
        let pooled = dropout(&pooled, self.p, rng)?;
        self.classifier.forward(&pooled)
    }
}

/// Sets every variable of `varmap` from `rng` as BERT initialises: weights N(0, 0.02²),
/// biases 0, LayerNorm weights 1. Names are visited in sorted order, so a seed reproduces.
pub fn init_random(varmap: &VarMap, rng: &mut Rng) -> Result<()> {
    for (name, var) in crate::named_vars(varmap, |_| true) {
        init_var(&name, &var, rng)?;
    }
    Ok(())
}

/// Initialises one variable like [`init_random`].
pub fn init_var(name: &str, var: &candle_core::Var, rng: &mut Rng) -> Result<()> {
    let t = var.as_tensor();
    let n = t.elem_count();
    let data: Vec<f32> = if name.ends_with("bias") {
        vec![0.0; n]
    } else if name.contains("LayerNorm") {
        vec![1.0; n]
    } else {
        (0..n).map(|_| 0.02 * rng.normal()).collect()
    };
    var.set(&Tensor::from_vec(data, t.shape(), t.device())?)
}

/// Copies every tensor of a safetensors file whose name is a variable of `varmap` into it;
/// returns the names of variables the file did not have (e.g. a new classifier).
pub fn load_pretrained(
    varmap: &VarMap,
    path: &std::path::Path,
    device: &Device,
) -> Result<Vec<String>> {
    let file = candle_core::safetensors::load(path, device)?;
    let mut missing = Vec::new();
    for (name, var) in crate::named_vars(varmap, |_| true) {
        match file.get(&name) {
            Some(t) => var.set(&t.to_dtype(DType::F32)?)?,
            None => missing.push(name),
        }
    }
    Ok(missing)
}
