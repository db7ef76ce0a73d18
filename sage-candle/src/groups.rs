//! Parameter groups chosen by name: glob rules (`*` matches any run of characters) mapping a
//! parameter's name to one of the optimizer's [`ParamGroup`]s.
//!
//! One source for both framework adapters: sage-burn compiles this same file (it belongs in
//! sage-core behind `alloc`; until it moves there, examples here name no crate).

use sage_core::ParamGroup;

/// Whether `name` matches `pattern`, where `*` matches any run of characters (dots included)
/// and every other character matches itself.
///
/// `*encoder.layer.*.attention.self.*.weight` matches
/// `encoder.layer.3.attention.self.query.weight`; `*.bias` does not.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    // Position of the last `*` and where in `name` it started matching: on a mismatch the
    // star absorbs one more character (linear-time greedy matching, no recursion).
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// The groups of an optimizer and the rules that put each named parameter in one: the first
/// rule whose pattern matches wins, and unmatched names go to the fallback group.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupRules {
    groups: Vec<ParamGroup>,
    labels: Vec<String>,
    rules: Vec<(String, usize)>,
    fallback: usize,
}

/// Weight-decay default of the authors' fine-tuning runs.
pub const AUTHORS_WEIGHT_DECAY: f64 = 0.01;

impl GroupRules {
    /// One group for every parameter.
    pub fn single(group: ParamGroup) -> Self {
        GroupRules {
            groups: vec![group],
            labels: vec!["all".into()],
            rules: Vec::new(),
            fallback: 0,
        }
    }

    /// The authors' split for BERT-style encoders (parameter names as in Hugging Face BERT,
    /// with or without a prefix such as `bert.`):
    ///
    /// | group | SAGE | decay | parameters |
    /// |---|---|---|---|
    /// | 0 `sage` | on | `weight_decay` | encoder attention Q/K/V/output and FFN in/out weights |
    /// | 1 `sage-bias` | on | 0 | the same layers' biases |
    /// | 2 `plain` | off | `weight_decay` | every other weight (embeddings, pooler, classifier) |
    /// | 3 `plain-no-decay` | off | 0 | other biases and LayerNorm |
    pub fn authors(weight_decay: f64) -> Self {
        let linear = [
            "*encoder.layer.*.attention.self.query",
            "*encoder.layer.*.attention.self.key",
            "*encoder.layer.*.attention.self.value",
            "*encoder.layer.*.attention.output.dense",
            "*encoder.layer.*.intermediate.dense",
            "*encoder.layer.*.output.dense",
        ];
        let mut r = GroupRules {
            groups: vec![
                ParamGroup::sage().weight_decay(weight_decay),
                ParamGroup::sage(),
                ParamGroup::plain().weight_decay(weight_decay),
                ParamGroup::plain(),
            ],
            labels: ["sage", "sage-bias", "plain", "plain-no-decay"]
                .map(String::from)
                .to_vec(),
            rules: Vec::new(),
            fallback: 2,
        };
        for l in linear {
            r = r
                .rule(format!("{l}.weight"), 0)
                .rule(format!("{l}.bias"), 1);
        }
        // Names the authors' `no_decay` list catches (torch's LayerNorm is gamma/beta in old BERT).
        for p in ["*LayerNorm*", "*layer_norm*", "*.gamma", "*.beta", "*bias"] {
            r = r.rule(p, 3);
        }
        r
    }

    /// Like [`authors`](Self::authors), with SAGE off everywhere: the plain-AdamW baseline with
    /// the same decay split (and the same group indices).
    pub fn authors_baseline(weight_decay: f64) -> Self {
        let mut r = Self::authors(weight_decay);
        for g in &mut r.groups {
            g.sage = false;
        }
        r
    }

    /// Empty rules over `groups` (labelled by index); names go to `fallback` until rules are added.
    pub fn new(groups: Vec<ParamGroup>, fallback: usize) -> Self {
        let labels = (0..groups.len()).map(|i| i.to_string()).collect();
        GroupRules {
            groups,
            labels,
            rules: Vec::new(),
            fallback,
        }
    }

    /// Adds a rule after the existing ones: names matching `pattern` go to group `group`.
    pub fn rule(mut self, pattern: impl Into<String>, group: usize) -> Self {
        self.rules.push((pattern.into(), group));
        self
    }

    /// The group index of `name`.
    pub fn assign(&self, name: &str) -> usize {
        self.rules
            .iter()
            .find(|(p, _)| glob_match(p, name))
            .map_or(self.fallback, |&(_, g)| g)
    }

    /// The groups, in index order.
    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// The groups, mutably (to change a rate multiplier or a decay).
    pub fn groups_mut(&mut self) -> &mut [ParamGroup] {
        &mut self.groups
    }

    /// A short label of group `i` (for reports).
    pub fn label(&self, i: usize) -> &str {
        self.labels.get(i).map_or("?", String::as_str)
    }

    /// The rules in order (the first that matches a name wins): pattern and group index.
    pub fn rules(&self) -> impl Iterator<Item = (&str, usize)> + '_ {
        self.rules.iter().map(|(p, g)| (p.as_str(), *g))
    }

    /// The fallback group.
    pub fn fallback(&self) -> usize {
        self.fallback
    }

    /// Checks that every rule and the fallback name an existing group.
    pub fn validate(&self) -> Result<(), String> {
        let n = self.groups.len();
        if self.fallback >= n {
            return Err(format!("fallback group {} of {n} groups", self.fallback));
        }
        if let Some((p, g)) = self.rules.iter().find(|(_, g)| *g >= n) {
            return Err(format!("rule `{p}` names group {g} of {n} groups"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob() {
        assert!(glob_match(
            "*encoder.layer.*.attention.self.*.weight",
            "encoder.layer.3.attention.self.query.weight"
        ));
        assert!(!glob_match(
            "*.bias",
            "encoder.layer.3.attention.self.query.weight"
        ));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*c", "abbbc"));
        assert!(glob_match("a*b*c", "axbyc"));
        assert!(!glob_match("a*b*c", "axbyd"));
        assert!(glob_match("*bias", "x.bias"));
        assert!(!glob_match("*bias", "x.bias.y"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exact2"));
    }

    #[test]
    fn authors_split() {
        let r = GroupRules::authors(0.01);
        let cases = [
            ("encoder.layer.0.attention.self.query.weight", 0),
            ("bert.encoder.layer.11.attention.self.value.bias", 1),
            ("encoder.layer.5.attention.output.dense.weight", 0),
            ("encoder.layer.5.attention.output.LayerNorm.weight", 3),
            ("encoder.layer.5.intermediate.dense.bias", 1),
            ("encoder.layer.5.output.dense.weight", 0),
            ("encoder.layer.5.output.LayerNorm.bias", 3),
            ("embeddings.word_embeddings.weight", 2),
            ("embeddings.LayerNorm.weight", 3),
            ("pooler.dense.weight", 2),
            ("pooler.dense.bias", 3),
            ("classifier.weight", 2),
            ("classifier.bias", 3),
        ];
        for (name, g) in cases {
            assert_eq!(r.assign(name), g, "{name}");
        }
        assert!(r.groups()[0].sage && r.groups()[1].sage);
        assert!(!r.groups()[2].sage && !r.groups()[3].sage);
        assert_eq!(r.groups()[1].weight_decay, 0.0);
        assert_eq!(r.groups()[3].weight_decay, 0.0);
        let b = GroupRules::authors_baseline(0.01);
        assert!(b.groups().iter().all(|g| !g.sage));
        assert_eq!(b.assign("encoder.layer.0.attention.self.query.weight"), 0);
        assert!(r.validate().is_ok());
        assert!(GroupRules::new(vec![], 0).validate().is_err());
    }
}
