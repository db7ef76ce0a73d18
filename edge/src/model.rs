//! The model: a 64 → 32 (ReLU) → 10 MLP with softmax cross-entropy, its forward and backward
//! passes, and the data formats. No I/O, no allocator, no target-specific code: the firmware
//! and the host program that pretrains the model (`edge/pretrain`) compile this same file, so
//! the device fine-tunes exactly the function the host trained.

/// Pixels per image (8 × 8).
pub const INPUTS: usize = 64;
/// Hidden units.
pub const HIDDEN: usize = 32;
/// Digit classes.
pub const CLASSES: usize = 10;
/// Hidden-layer weights (`[HIDDEN][INPUTS]`, row-major).
pub const W1: usize = HIDDEN * INPUTS;
/// Output-layer weights (`[CLASSES][HIDDEN]`, row-major).
pub const W2: usize = CLASSES * HIDDEN;
/// Every parameter of the model.
pub const PARAMS: usize = W1 + HIDDEN + W2 + CLASSES;
/// The output layer's parameters (what last-layer fine-tuning trains).
pub const LAST_PARAMS: usize = W2 + CLASSES;

/// One layer's weights (`[out][in]`, row-major) and biases.
#[derive(Clone, Copy)]
pub struct Layer<'a> {
    /// Weights.
    pub w: &'a [f32],
    /// Biases.
    pub b: &'a [f32],
}

/// The whole model, borrowed.
#[derive(Clone, Copy)]
pub struct Mlp<'a> {
    /// Hidden layer (64 → 32, ReLU).
    pub l1: Layer<'a>,
    /// Output layer (32 → 10).
    pub l2: Layer<'a>,
}

/// Gradients of one layer, added to by [`backward`].
pub struct LayerGrad<'a> {
    /// Of the weights.
    pub w: &'a mut [f32],
    /// Of the biases.
    pub b: &'a mut [f32],
}

/// An image with pixels scaled to [0, 1].
pub type Image = [f32; INPUTS];

/// Hidden activations: `relu(w1·x + b1)`.
pub fn hidden(l1: Layer<'_>, x: &Image) -> [f32; HIDDEN] {
    let mut h = [0.0; HIDDEN];
    for ((h, row), b) in h.iter_mut().zip(l1.w.chunks_exact(INPUTS)).zip(l1.b) {
        let z = b + row.iter().zip(x).map(|(w, x)| w * x).sum::<f32>();
        *h = z.max(0.0);
    }
    h
}

/// Logits: `w2·h + b2`.
pub fn logits(l2: Layer<'_>, h: &[f32; HIDDEN]) -> [f32; CLASSES] {
    let mut z = [0.0; CLASSES];
    for ((z, row), b) in z.iter_mut().zip(l2.w.chunks_exact(HIDDEN)).zip(l2.b) {
        *z = b + row.iter().zip(h).map(|(w, h)| w * h).sum::<f32>();
    }
    z
}

/// Softmax probabilities (in place) and the cross-entropy of class `y`.
pub fn softmax_xent(z: &mut [f32; CLASSES], y: usize) -> f32 {
    // Subtracting the max keeps exp() finite.
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for z in z.iter_mut() {
        *z = libm::expf(*z - max);
        sum += *z;
    }
    for z in z.iter_mut() {
        *z /= sum;
    }
    -libm::logf(z[y].max(f32::MIN_POSITIVE))
}

/// The class with the highest logit (the first on ties).
pub fn predict(z: &[f32; CLASSES]) -> usize {
    (0..CLASSES).fold(0, |b, k| if z[k] > z[b] { k } else { b })
}

/// The output layer's backward pass from hidden features `h` and label `y`: adds `scale ×`
/// the gradient of the loss to `g2`; returns the loss and `scale × d loss / d h`.
pub fn backward_head(
    l2: Layer<'_>,
    h: &[f32; HIDDEN],
    y: usize,
    scale: f32,
    g2: LayerGrad<'_>,
) -> (f32, [f32; HIDDEN]) {
    let mut z = logits(l2, h);
    let loss = softmax_xent(&mut z, y);
    // d loss / d logits = softmax − one-hot.
    let mut dz = z;
    dz[y] -= 1.0;
    let mut dh = [0.0f32; HIDDEN];
    for (k, &d) in dz.iter().enumerate() {
        let d = d * scale;
        g2.b[k] += d;
        let (gw, w) = (
            &mut g2.w[k * HIDDEN..(k + 1) * HIDDEN],
            &l2.w[k * HIDDEN..(k + 1) * HIDDEN],
        );
        for j in 0..HIDDEN {
            gw[j] += d * h[j];
            dh[j] += d * w[j];
        }
    }
    (loss, dh)
}

/// Forward and backward for one labelled image: adds `scale ×` the gradient of its loss to
/// `g2` (output layer) and, when given, `g1` (hidden layer); returns the loss.
pub fn backward(
    m: Mlp<'_>,
    x: &Image,
    y: usize,
    scale: f32,
    g2: LayerGrad<'_>,
    g1: Option<LayerGrad<'_>>,
) -> f32 {
    let h = hidden(m.l1, x);
    let (loss, dh) = backward_head(m.l2, &h, y, scale, g2);
    if let Some(g1) = g1 {
        for (j, &d) in dh.iter().enumerate() {
            // ReLU passes the gradient only where the unit was active.
            if h[j] <= 0.0 {
                continue;
            }
            g1.b[j] += d;
            for (gw, &x) in g1.w[j * INPUTS..(j + 1) * INPUTS].iter_mut().zip(x) {
                *gw += d * x;
            }
        }
    }
    loss
}

/// A set of labelled 8×8 images in the byte layout of `edge/data/*.bin`: `n × 64` pixel bytes
/// (grey levels 0..=16, row-major), then `n` label bytes (0..=9).
#[derive(Clone, Copy)]
pub struct Images<'a> {
    bytes: &'a [u8],
    n: usize,
}

impl<'a> Images<'a> {
    /// The images in `bytes`; `None` unless its length is a multiple of 65, every pixel is in
    /// 0..=16 and every label in 0..=9.
    pub fn new(bytes: &'a [u8]) -> Option<Self> {
        let n = bytes.len() / (INPUTS + 1);
        let ok = bytes.len() == n * (INPUTS + 1)
            && bytes[..n * INPUTS].iter().all(|&p| p <= 16)
            && bytes[n * INPUTS..]
                .iter()
                .all(|&y| usize::from(y) < CLASSES);
        ok.then_some(Images { bytes, n })
    }

    /// How many images.
    pub fn len(&self) -> usize {
        self.n
    }

    /// The raw grey levels of image `i`.
    pub fn pixels(&self, i: usize) -> &'a [u8] {
        &self.bytes[i * INPUTS..(i + 1) * INPUTS]
    }

    /// Image `i`'s label.
    pub fn label(&self, i: usize) -> usize {
        usize::from(self.bytes[self.n * INPUTS + i])
    }

    /// Image `i` scaled to [0, 1], and its label.
    pub fn sample(&self, i: usize) -> (Image, usize) {
        let mut x = [0.0; INPUTS];
        for (x, &p) in x.iter_mut().zip(self.pixels(i)) {
            *x = f32::from(p) * (1.0 / 16.0);
        }
        (x, self.label(i))
    }
}

/// Splits a flat parameter array into the model's layers.
pub fn layers(p: &[f32; PARAMS]) -> Mlp<'_> {
    let (w1, rest) = p.split_at(W1);
    let (b1, rest) = rest.split_at(HIDDEN);
    let (w2, b2) = rest.split_at(W2);
    Mlp {
        l1: Layer { w: w1, b: b1 },
        l2: Layer { w: w2, b: b2 },
    }
}

/// Accuracy and mean loss of `m` on the images `which` of `set`.
pub fn evaluate(m: Mlp<'_>, set: &Images<'_>, which: impl Iterator<Item = usize>) -> (f32, f32) {
    let (mut loss, mut correct, mut n) = (0.0, 0u32, 0u32);
    for i in which {
        let (x, y) = set.sample(i);
        let mut z = logits(m.l2, &hidden(m.l1, &x));
        correct += u32::from(predict(&z) == y);
        loss += softmax_xent(&mut z, y);
        n += 1;
    }
    let n = n.max(1) as f32;
    (correct as f32 / n, loss / n)
}

/// Marsaglia's xorshift32: tiny, and the same sequence on every target.
#[derive(Clone, Copy, Debug)]
pub struct XorShift(pub u32);

impl XorShift {
    /// The next value.
    pub fn next_u32(&mut self) -> u32 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        x
    }
    /// Uniform in [-1, 1).
    pub fn symmetric(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 * (2.0 / (1u32 << 24) as f32) - 1.0
    }
    /// Uniform-enough in 0..n for a shuffle (n ≤ 2^16, so the modulo bias is < 2^-16).
    pub fn below(&mut self, n: usize) -> usize {
        self.next_u32() as usize % n
    }
    /// Fisher–Yates.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}
