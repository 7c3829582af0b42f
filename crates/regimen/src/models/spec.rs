//! Model specs: a model written as one line of comma-separated tokens, like
//! `conv:32,bn,relu,conv:32,bn,relu,maxpool:2,flatten,dropout:0.25,linear:256,relu,linear:10`.
//!
//! | token | layer |
//! |---|---|
//! | `linear:OUT[:nobias]` | [`Linear`] from the flattened features to `OUT` (`OUT` may be `classes`) |
//! | `conv:OUT[:K[:S[:P]]][:nobias]` | [`Conv2d`] `K x K` (3), stride `S` (1), padding `P` (`K / 2`, "same") |
//! | `bn` | [`BatchNorm`] over channels (2-D for images, 1-D for features) |
//! | `maxpool[:K[:S]]`, `avgpool[:K[:S]]` | [`MaxPool2d`], [`AvgPool2d`] (`K` 2 by default, stride `K` by default) |
//! | `gap` | [`GlobalAvgPool`]: `[N, C, H, W]` to `[N, C]` |
//! | `fmp[:K[:RATIO]]` | [`FractionalMaxPool2d`] (2, `1/sqrt 2`) |
//! | `flatten` | [`Flatten`] |
//! | `dropout[:P]` | [`Dropout`] (0.5) |
//! | `maxout:OUT[:K]` | [`Maxout`] with `K` pieces (2) |
//! | `prelu[:shared]` | [`PReLU`], a slope per channel (or one shared) |
//! | `swish:learned` | [`Swish`] with a learned beta |
//! | `sigmoid`, `tanh`, `relu`, `leaky_relu[:A]`, `elu[:A]`, `selu`, `softplus[:B]`, `gelu`, `mish`, `swish[:B]`, `silu` | [`Activation`] |
//! | `act` | the spec's activation (`activation=`, ReLU by default) |
//! | `softmax` | [`Softmax`] (not last: the loss takes logits) |
//! | `res:OUT[:S[:P]]` | a pre-activation residual block: `bn, act, conv3x3 (stride S), bn, act, conv3x3`, plus a 1x1 convolution shortcut when the shape changes, with stochastic depth `P` |
//!
//! Options are tokens with `=`: `init=NAME` ([`Init::parse`]: `he`, `xavier`, `normal:0.01`,
//! ...; weights of linear, conv and maxout layers, biases zero) and `activation=NAME`.
//! The built-in models are specs too, so a name can open a spec and take options:
//! `deep-mlp:10:256,activation=tanh,init=xavier`.
//!
//! A spec is checked against the input shape before any weight is allocated ([`ModelSpec::plan`]):
//! every error names the token by its position and text, with the shape that reached it.
//! Layers are named by position (`0.weight`, `3.running_mean`, `5.branch.2.weight`), the
//! names of the equivalent PyTorch `nn.Sequential`.

use crate::backend::{Unary, Window};
use crate::error::{Error, Result};
use crate::init::Init;
use crate::layer::Layer;
use crate::layers::{
    parse_activation, Activation, AvgPool2d, BatchNorm, Conv2d, Dropout, Flatten,
    FractionalMaxPool2d, GlobalAvgPool, Linear, MaxPool2d, Maxout, PReLU, Residual, Sequential,
    Softmax, Swish,
};
use crate::rng::Rng;

/// The built-in models: a name and its spec. `classes` is the dataset's class count.
pub const BUILT_IN: &[(&str, &str, &str)] = &[
    (
        "digits-mlp",
        "flatten,linear:128,act,linear:classes",
        "one hidden layer of 128 (the default on the 8x8 digits)",
    ),
    (
        "digits-cnn",
        "conv:16:3:1:1:nobias,bn,act,maxpool:2,conv:32:3:1:1:nobias,bn,act,gap,linear:classes",
        "two conv blocks and global pooling (the default CNN on the digits)",
    ),
    (
        "mlp",
        "flatten,linear:512,act,dropout:0.2,linear:512,act,dropout:0.2,linear:classes",
        "the mlp benchmark model (bench/README.md)",
    ),
    (
        "cnn",
        "conv:32:3:1:1:nobias,bn,act,conv:32:3:1:1:nobias,bn,act,maxpool:2,\
         conv:64:3:1:1:nobias,bn,act,conv:64:3:1:1:nobias,bn,act,maxpool:2,\
         dropout:0.25,flatten,linear:256,act,dropout:0.25,linear:classes",
        "the cnn benchmark model (bench/README.md)",
    ),
    (
        "resnet[:N[:WIDTH[:P]]]",
        "",
        "a pre-activation ResNet for 32x32 colour images: a 3x3 stem, three stages of N (2) blocks of WIDTH (16), 2 WIDTH, 4 WIDTH channels, stochastic depth rising linearly to P (0.1)",
    ),
    (
        "deep-mlp[:DEPTH[:WIDTH]]",
        "",
        "the lecture's deep MLP: DEPTH (10) hidden layers of WIDTH (500), any activation= and init=",
    ),
];

/// The names a model spec may start with.
pub const NAMES: &[&str] = &[
    "digits-mlp",
    "digits-cnn",
    "mlp",
    "cnn",
    "resnet",
    "deep-mlp",
];

/// A parsed model spec: layer tokens and options, not yet bound to an input shape.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// The spec as given.
    pub text: String,
    ops: Vec<(usize, String, Op)>,
    init: Init,
    activation: Unary,
}

#[derive(Clone, Debug, PartialEq)]
enum Width {
    N(usize),
    Classes,
}

#[derive(Clone, Debug, PartialEq)]
enum Op {
    Linear {
        out: Width,
        bias: bool,
    },
    Conv {
        out: usize,
        k: usize,
        s: usize,
        p: usize,
        bias: bool,
    },
    BatchNorm,
    MaxPool {
        k: usize,
        s: usize,
    },
    AvgPool {
        k: usize,
        s: usize,
    },
    Gap,
    Fmp {
        k: usize,
        ratio: f32,
    },
    Flatten,
    Dropout(f32),
    Maxout {
        out: usize,
        k: usize,
    },
    PReLU {
        shared: bool,
    },
    SwishLearned,
    Act(Option<Unary>),
    Softmax,
    Res {
        out: usize,
        s: usize,
        p: f32,
    },
}

/// The result of checking a spec against an input: output shape and parameter count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// `[C, H, W]` or `[F]` after each token, batch axis left out.
    pub shapes: Vec<Vec<usize>>,
    pub params: usize,
}

fn expand_builtin(
    name: &str,
    args: &[&str],
    err: &dyn Fn(&str) -> Error,
) -> Result<Option<String>> {
    let num = |i: usize, default: usize| -> Result<usize> {
        match args.get(i) {
            None => Ok(default),
            Some(a) => a
                .parse::<usize>()
                .ok()
                .filter(|&v| (1..=100_000).contains(&v))
                .ok_or_else(|| err("expected a whole number from 1 to 100000")),
        }
    };
    let max_args = match name {
        "resnet" => 3,
        "deep-mlp" => 2,
        _ => 0,
    };
    if !NAMES.contains(&name) {
        return Ok(None);
    }
    if let Some((_, spec, _)) = BUILT_IN.iter().find(|(n, _, _)| *n == name) {
        if !args.is_empty() {
            return Err(err("this built-in model takes no parameters"));
        }
        return Ok(Some(spec.to_string()));
    }
    if args.len() > max_args {
        return Err(err("too many parameters"));
    }
    Ok(match name {
        "deep-mlp" => {
            let (depth, width) = (num(0, 10)?, num(1, 500)?);
            if depth > 1000 {
                return Err(err("at most 1000 hidden layers"));
            }
            let mut s = String::from("flatten");
            for _ in 0..depth {
                s += &format!(",linear:{width},act");
            }
            Some(s + ",linear:classes")
        }
        "resnet" => {
            let (n, width) = (num(0, 2)?, num(1, 16)?);
            if n > 100 {
                return Err(err("at most 100 blocks per stage"));
            }
            let p: f32 = match args.get(2) {
                None => 0.1,
                Some(a) => a
                    .parse()
                    .ok()
                    .filter(|v: &f32| (0.0..1.0).contains(v))
                    .ok_or_else(|| err("the stochastic depth P must be in [0, 1)"))?,
            };
            let total = 3 * n;
            let mut s = format!("conv:{width}:3:1:1:nobias");
            let mut block = 0;
            for stage in 0..3 {
                for i in 0..n {
                    block += 1;
                    let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                    // Huang et al.'s linear decay rule: deeper blocks are dropped more often.
                    let pb = p * block as f32 / total as f32;
                    s += &format!(",res:{}:{stride}:{pb}", width << stage);
                }
            }
            Some(s + ",bn,act,gap,linear:classes")
        }
        _ => None,
    })
}

impl ModelSpec {
    /// Parse a spec (or a built-in name, optionally followed by more tokens and options).
    pub fn parse(text: &str) -> Result<ModelSpec> {
        let mut ops = Vec::new();
        let mut init = Init::PyTorchDefault;
        let mut activation = Unary::Relu;
        let raw: Vec<&str> = text.split(',').map(str::trim).collect();
        if raw.len() > 100_000 {
            return Err(Error::config(
                "model spec",
                "(too long)",
                "at most 100000 tokens",
            ));
        }
        // Expand a built-in name in first position into its tokens; positions in errors are
        // those of the expansion for its tokens and of the user's text for the rest.
        let mut tokens: Vec<(usize, String)> = Vec::new();
        for (i, tok) in raw.iter().enumerate() {
            let pos = i + 1;
            let err = |why: &str| Error::config(&format!("model spec token {pos}"), tok, why);
            let mut parts = tok.split(':');
            let name = parts.next().unwrap_or("");
            let args: Vec<&str> = parts.collect();
            match expand_builtin(name, &args, &err)? {
                Some(exp) if i == 0 => {
                    for t in exp.split(',') {
                        tokens.push((pos, t.trim().to_string()));
                    }
                }
                Some(_) => return Err(err("a built-in model name may only open a spec")),
                None => tokens.push((pos, tok.to_string())),
            }
        }
        let mut seen_options = std::collections::HashSet::new();
        for (pos, tok) in tokens {
            let err = |why: &str| Error::config(&format!("model spec token {pos}"), &tok, why);
            if tok.is_empty() {
                return Err(err(
                    "empty token (two commas in a row, or a trailing comma?)",
                ));
            }
            if let Some((key, value)) = tok.split_once('=') {
                if !seen_options.insert(key.trim().to_string()) {
                    return Err(err(&format!("{}= given twice", key.trim())));
                }
                match key.trim() {
                    "init" => {
                        init = Init::parse(value.trim()).map_err(|e| err(&e.to_string()))?;
                    }
                    "activation" => {
                        activation =
                            parse_activation(value.trim()).map_err(|e| err(&e.to_string()))?;
                    }
                    _ => return Err(err("unknown option: expected init=... or activation=...")),
                }
                continue;
            }
            let op = parse_op(&tok).map_err(|why| err(&why))?;
            ops.push((pos, tok.clone(), op));
        }
        if ops.is_empty() {
            return Err(Error::config("model spec", text, "has no layers"));
        }
        if let Some((pos, tok, Op::Softmax)) = ops.last() {
            return Err(Error::config(
                &format!("model spec token {pos}"),
                tok,
                "the loss applies the softmax itself, so a model ends with its logits (e.g. linear:classes); `regimen predict` reports probabilities",
            ));
        }
        Ok(ModelSpec {
            text: text.to_string(),
            ops,
            init,
            activation,
        })
    }

    /// Check the spec against `[C, H, W]` inputs and `classes` classes without allocating any
    /// weight: the shape after each token and the number of learnable parameters. The final
    /// output must be one logit per class.
    pub fn plan(&self, input: [usize; 3], classes: usize) -> Result<Plan> {
        self.walk(input, classes, None)
    }

    /// Whether the model normalizes features (`bn` on `[N, F]`, batch norm 1-D) in training:
    /// such a layer cannot take a batch of one sample (one value per channel), which a short
    /// last batch, or a rank's share of it, can be.
    pub fn has_feature_batch_norm(&self, input: [usize; 3], classes: usize) -> Result<bool> {
        let plan = self.plan(input, classes)?;
        Ok(self.ops.iter().enumerate().any(|(i, (_, _, op))| {
            let before = if i == 0 {
                input.len()
            } else {
                plan.shapes[i - 1].len()
            };
            matches!(op, Op::BatchNorm) && before == 1
        }))
    }

    /// Build the model (weights drawn from `rng` in layer order). A model whose weights alone
    /// would not fit in this machine's available memory is refused before anything is
    /// allocated (an allocation that fails aborts the process).
    pub fn build(&self, input: [usize; 3], classes: usize, rng: &mut Rng) -> Result<Sequential> {
        let plan = self.walk(input, classes, None)?;
        let need = (plan.params as u64).saturating_mul(4);
        if let Some(avail) = crate::io::available_memory() {
            if need > avail {
                return Err(Error::config(
                    "model",
                    &self.text,
                    &format!(
                        "its {} parameters need {} for the weights alone; this machine has {} available",
                        plan.params,
                        crate::io::human_bytes(need),
                        crate::io::human_bytes(avail)
                    ),
                ));
            }
        }
        let mut model = Sequential::new();
        self.walk(input, classes, Some((&mut model, rng)))?;
        Ok(model)
    }

    fn walk(
        &self,
        input: [usize; 3],
        classes: usize,
        mut out: Option<(&mut Sequential, &mut Rng)>,
    ) -> Result<Plan> {
        if classes == 0 || classes > 1 << 24 || input.contains(&0) {
            return Err(Error::config(
                "model input",
                format!("{input:?} with {classes} classes"),
                "needs non-zero sizes and at most 16777216 classes",
            ));
        }
        let mut shape: Vec<usize> = input.to_vec();
        let mut params = 0usize;
        let mut shapes = Vec::with_capacity(self.ops.len());
        for (pos, tok, op) in &self.ops {
            let at = |why: String| Error::config(&format!("model spec token {pos}"), tok, &why);
            let overflow = || at("the sizes overflow".into());
            let batch = |s: &[usize]| [&[1usize][..], s].concat();
            let (next, n, layer): (Vec<usize>, usize, Option<Box<dyn Layer>>) = match op {
                Op::Linear { out: w, bias } => {
                    if shape.len() != 1 {
                        return Err(at(format!(
                            "a linear layer takes flat features, and the input here has shape {shape:?}: put flatten or gap before it"
                        )));
                    }
                    let o = match w {
                        Width::N(o) => *o,
                        Width::Classes => classes,
                    };
                    let n = shape[0]
                        .checked_mul(o)
                        .and_then(|v| v.checked_add(if *bias { o } else { 0 }))
                        .ok_or_else(overflow)?;
                    let layer = out.as_mut().map(|(_, rng)| {
                        let mut l = Linear::new(shape[0], o, rng);
                        if !bias {
                            l = l.without_bias();
                        }
                        if self.init != Init::PyTorchDefault {
                            l = l.with_init(self.init, rng);
                        }
                        Box::new(l) as Box<dyn Layer>
                    });
                    (vec![o], n, layer)
                }
                Op::Conv {
                    out: o,
                    k,
                    s,
                    p,
                    bias,
                } => {
                    let (c, h, w) = image(&shape).map_err(&at)?;
                    let win = Window {
                        kh: *k,
                        kw: *k,
                        stride: *s,
                        pad: *p,
                    };
                    let (oh, ow) = match (win.out_len(h, *k), win.out_len(w, *k)) {
                        (Some(a), Some(b)) => (a, b),
                        _ => return Err(at(format!("a {k}x{k} window with padding {p} does not fit the input of shape {shape:?}"))),
                    };
                    let n = c
                        .checked_mul(k * k)
                        .and_then(|v| v.checked_mul(*o))
                        .and_then(|v| v.checked_add(if *bias { *o } else { 0 }))
                        .ok_or_else(overflow)?;
                    let layer = out.as_mut().map(|(_, rng)| {
                        let mut l = Conv2d::new(c, *o, *k, rng).stride(*s).padding(*p);
                        if !bias {
                            l = l.without_bias();
                        }
                        if self.init != Init::PyTorchDefault {
                            l = l.with_init(self.init, rng);
                        }
                        Box::new(l) as Box<dyn Layer>
                    });
                    (vec![*o, oh, ow], n, layer)
                }
                Op::BatchNorm => {
                    if shape.len() != 3 && shape.len() != 1 {
                        return Err(at(format!(
                            "batch norm takes [C, H, W] or [F], not {shape:?}"
                        )));
                    }
                    let c = shape[0];
                    let layer = out.as_ref().map(|_| {
                        Box::new(if shape.len() == 3 {
                            BatchNorm::d2(c)
                        } else {
                            BatchNorm::d1(c)
                        }) as Box<dyn Layer>
                    });
                    (shape.clone(), 2 * c, layer)
                }
                Op::MaxPool { k, s } => {
                    let l = MaxPool2d::new(*k).stride(*s);
                    let next = l
                        .output_shape(&batch(&shape))
                        .map_err(|e| at(e.to_string()))?[1..]
                        .to_vec();
                    (next, 0, Some(Box::new(l) as Box<dyn Layer>))
                }
                Op::AvgPool { k, s } => {
                    let l = AvgPool2d::new(*k).stride(*s);
                    let next = l
                        .output_shape(&batch(&shape))
                        .map_err(|e| at(e.to_string()))?[1..]
                        .to_vec();
                    (next, 0, Some(Box::new(l) as Box<dyn Layer>))
                }
                Op::Gap => {
                    let (c, _, _) = image(&shape).map_err(&at)?;
                    (
                        vec![c],
                        0,
                        Some(Box::new(GlobalAvgPool::new()) as Box<dyn Layer>),
                    )
                }
                Op::Fmp { k, ratio } => {
                    let (c, h, w) = image(&shape).map_err(&at)?;
                    let (oh, ow) = ((h as f32 * ratio) as usize, (w as f32 * ratio) as usize);
                    if oh == 0 || ow == 0 || h < *k || w < *k || oh + k - 1 > h || ow + k - 1 > w {
                        return Err(at(format!(
                            "pooling {k}x{k} windows from {h}x{w} down to {oh}x{ow} does not fit"
                        )));
                    }
                    (
                        vec![c, oh, ow],
                        0,
                        Some(
                            Box::new(FractionalMaxPool2d::with_ratio(*k, *ratio)) as Box<dyn Layer>
                        ),
                    )
                }
                Op::Flatten => {
                    let f = shape
                        .iter()
                        .try_fold(1usize, |a, &b| a.checked_mul(b))
                        .ok_or_else(overflow)?;
                    (vec![f], 0, Some(Box::new(Flatten::new()) as Box<dyn Layer>))
                }
                Op::Dropout(p) => (
                    shape.clone(),
                    0,
                    Some(Box::new(Dropout::new(*p).map_err(|e| at(e.to_string()))?)
                        as Box<dyn Layer>),
                ),
                Op::Maxout { out: o, k } => {
                    if shape.len() != 1 {
                        return Err(at(format!(
                            "maxout takes flat features, and the input here has shape {shape:?}: put flatten or gap before it"
                        )));
                    }
                    let ok = o.checked_mul(*k).ok_or_else(overflow)?;
                    let n = shape[0]
                        .checked_mul(ok)
                        .and_then(|v| v.checked_add(ok))
                        .ok_or_else(overflow)?;
                    let layer = match out.as_mut() {
                        Some((_, rng)) => {
                            let mut l = Maxout::new(shape[0], *o, *k, rng)?;
                            if self.init != Init::PyTorchDefault {
                                l.linear = l.linear.with_init(self.init, rng);
                            }
                            Some(Box::new(l) as Box<dyn Layer>)
                        }
                        None => None,
                    };
                    (vec![*o], n, layer)
                }
                Op::PReLU { shared } => {
                    let n = if *shared { 1 } else { shape[0] };
                    (
                        shape.clone(),
                        n,
                        out.as_ref()
                            .map(|_| Box::new(PReLU::new(n)) as Box<dyn Layer>),
                    )
                }
                Op::SwishLearned => (
                    shape.clone(),
                    1,
                    out.as_ref()
                        .map(|_| Box::new(Swish::learned(1.0)) as Box<dyn Layer>),
                ),
                Op::Act(a) => (
                    shape.clone(),
                    0,
                    Some(Box::new(Activation::new(a.unwrap_or(self.activation))) as Box<dyn Layer>),
                ),
                Op::Softmax => {
                    if shape.len() != 1 {
                        return Err(at(format!(
                            "softmax normalizes flat features, not {shape:?}"
                        )));
                    }
                    (
                        shape.clone(),
                        0,
                        Some(Box::new(Softmax::new()) as Box<dyn Layer>),
                    )
                }
                Op::Res { out: o, s, p } => {
                    let (c, h, w) = image(&shape).map_err(&at)?;
                    let win = Window {
                        kh: 3,
                        kw: 3,
                        stride: *s,
                        pad: 1,
                    };
                    let (oh, ow) = match (win.out_len(h, 3), win.out_len(w, 3)) {
                        (Some(a), Some(b)) => (a, b),
                        _ => {
                            return Err(at(format!(
                                "a residual block does not fit the input of shape {shape:?}"
                            )))
                        }
                    };
                    let project = *s != 1 || c != *o;
                    let n = (|| {
                        let conv1 = c.checked_mul(9)?.checked_mul(*o)?;
                        let conv2 = o.checked_mul(9)?.checked_mul(*o)?;
                        let short = if project { c.checked_mul(*o)? } else { 0 };
                        conv1
                            .checked_add(conv2)?
                            .checked_add(short)?
                            .checked_add(2 * c + 2 * o)
                    })()
                    .ok_or_else(overflow)?;
                    let layer = match out.as_mut() {
                        Some((_, rng)) => {
                            let conv =
                                |cin: usize, k: usize, stride: usize, pad: usize, rng: &mut Rng| {
                                    let l = Conv2d::new(cin, *o, k, rng)
                                        .stride(stride)
                                        .padding(pad)
                                        .without_bias();
                                    if self.init != Init::PyTorchDefault {
                                        l.with_init(self.init, rng)
                                    } else {
                                        l
                                    }
                                };
                            let branch = Sequential::new()
                                .push(BatchNorm::d2(c))
                                .push(Activation::new(self.activation))
                                .push(conv(c, 3, *s, 1, rng))
                                .push(BatchNorm::d2(*o))
                                .push(Activation::new(self.activation))
                                .push(conv(*o, 3, 1, 1, rng));
                            let mut block = Residual::new(branch);
                            if project {
                                block = block.with_shortcut(conv(c, 1, *s, 0, rng));
                            }
                            Some(Box::new(
                                block.stochastic_depth(*p).map_err(|e| at(e.to_string()))?,
                            ) as Box<dyn Layer>)
                        }
                        None => None,
                    };
                    (vec![*o, oh, ow], n, layer)
                }
            };
            if next.contains(&0) {
                return Err(at(format!("the output shape {next:?} is empty")));
            }
            if let (Some((model, _)), Some(layer)) = (out.as_mut(), layer) {
                let name = model.len().to_string();
                model.push_boxed(&name, layer);
            }
            params = params.checked_add(n).ok_or_else(overflow)?;
            shape = next;
            shapes.push(shape.clone());
        }
        if shape != [classes] {
            let (pos, tok, _) = self.ops.last().expect("non-empty");
            return Err(Error::config(
                &format!("model spec token {pos}"),
                tok,
                &format!(
                    "the model's output has shape {shape:?}, but the data has {classes} classes: end with one logit per class (e.g. flatten,linear:classes)"
                ),
            ));
        }
        Ok(Plan { shapes, params })
    }
}

fn image(shape: &[usize]) -> std::result::Result<(usize, usize, usize), String> {
    match shape {
        [c, h, w] => Ok((*c, *h, *w)),
        _ => Err(format!(
            "takes images [C, H, W], and the input here is flat: {shape:?}"
        )),
    }
}

fn parse_op(tok: &str) -> std::result::Result<Op, String> {
    let mut parts = tok.split(':');
    let name = parts.next().unwrap_or("");
    let mut args: Vec<&str> = parts.collect();
    let nobias = if args.last() == Some(&"nobias") {
        args.pop();
        true
    } else {
        false
    };
    if nobias && !matches!(name, "linear" | "conv") {
        return Err("only linear and conv take nobias".into());
    }
    let count =
        |i: usize, what: &str, default: Option<usize>| -> std::result::Result<usize, String> {
            match args.get(i) {
                None => default.ok_or_else(|| format!("{what} is missing")),
                Some(a) => a
                    .parse::<usize>()
                    .ok()
                    .filter(|&v| (1..=1 << 24).contains(&v))
                    .ok_or_else(|| {
                        format!("{what} must be a whole number from 1 to 16777216, not {a:?}")
                    }),
            }
        };
    let real = |i: usize,
                what: &str,
                default: f32,
                ok: &dyn Fn(f32) -> bool,
                range: &str|
     -> std::result::Result<f32, String> {
        match args.get(i) {
            None => Ok(default),
            Some(a) => a
                .parse::<f32>()
                .ok()
                .filter(|v| ok(*v))
                .ok_or_else(|| format!("{what} must be {range}, not {a:?}")),
        }
    };
    let max = |n: usize| -> std::result::Result<(), String> {
        if args.len() > n {
            Err(format!("too many parameters (at most {n})"))
        } else {
            Ok(())
        }
    };
    Ok(match name {
        "linear" => {
            max(1)?;
            let out = match args.first() {
                Some(&"classes") => Width::Classes,
                _ => Width::N(count(0, "OUT (the output features)", None)?),
            };
            Op::Linear { out, bias: !nobias }
        }
        "conv" => {
            max(4)?;
            let out = count(0, "OUT (the output channels)", None)?;
            let k = count(1, "K (the kernel size)", Some(3))?;
            let s = count(2, "S (the stride)", Some(1))?;
            let p = match args.get(3) {
                None => k / 2,
                Some(a) => a.parse::<usize>().ok().filter(|&v| v < k).ok_or_else(|| {
                    format!("P (the padding) must be a whole number below the kernel size {k}, not {a:?}")
                })?,
            };
            Op::Conv { out, k, s, p, bias: !nobias }
        }
        "bn" | "batchnorm" => {
            max(0)?;
            Op::BatchNorm
        }
        "maxpool" | "avgpool" => {
            max(2)?;
            let k = count(0, "K (the window)", Some(2))?;
            let s = count(1, "S (the stride)", Some(k))?;
            if name == "maxpool" {
                Op::MaxPool { k, s }
            } else {
                Op::AvgPool { k, s }
            }
        }
        "gap" => {
            max(0)?;
            Op::Gap
        }
        "fmp" => {
            max(2)?;
            let k = count(0, "K (the window)", Some(2))?;
            let ratio = real(1, "RATIO", std::f32::consts::FRAC_1_SQRT_2, &|v| v > 0.0 && v < 1.0, "in (0, 1)")?;
            Op::Fmp { k, ratio }
        }
        "flatten" => {
            max(0)?;
            Op::Flatten
        }
        "dropout" => {
            max(1)?;
            Op::Dropout(real(0, "P", 0.5, &|v| (0.0..1.0).contains(&v), "in [0, 1)")?)
        }
        "maxout" => {
            max(2)?;
            Op::Maxout {
                out: count(0, "OUT (the output features)", None)?,
                k: count(1, "K (the pieces)", Some(2))?,
            }
        }
        "prelu" => match args.as_slice() {
            [] => Op::PReLU { shared: false },
            ["shared"] => Op::PReLU { shared: true },
            _ => return Err("expected prelu or prelu:shared".into()),
        },
        "swish" if args == ["learned"] => Op::SwishLearned,
        "act" => {
            max(0)?;
            Op::Act(None)
        }
        "softmax" => {
            max(0)?;
            Op::Softmax
        }
        "res" => {
            max(3)?;
            Op::Res {
                out: count(0, "OUT (the output channels)", None)?,
                s: count(1, "S (the stride)", Some(1))?,
                p: real(2, "P (the stochastic depth)", 0.0, &|v| (0.0..1.0).contains(&v), "in [0, 1)")?,
            }
        }
        _ => match parse_activation(tok) {
            Ok(_) if !args.is_empty() && !matches!(name, "leaky_relu" | "lrelu" | "elu" | "softplus" | "swish" | "silu") => {
                return Err(format!("the activation {name} takes no parameter"))
            }
            Ok(a) => Op::Act(Some(a)),
            // A known activation with a bad parameter: say that, not "unknown layer".
            Err(e) if parse_activation(name).is_ok() => return Err(e.to_string()),
            Err(_) => {
                return Err(format!(
                    "unknown layer '{name}': expected linear, conv, bn, maxpool, avgpool, gap, fmp, flatten, dropout, maxout, prelu, swish:learned, an activation ({}), act, softmax or res",
                    "sigmoid, tanh, relu, leaky_relu, elu, selu, softplus, gelu, mish, swish, silu"
                ))
            }
        },
    })
}
