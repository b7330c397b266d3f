"""PX, Path eXclusion (Iurada, Ciccone, Tommasi, CVPR 2024): NTK-SAP's data-driven successor.

PX bounds the trace of the NTK of a ReLU network by splitting it along input-output paths:
a data-dependent path-activation term (which paths the real data switches on) times a
data-free path kernel (the squared path values), and keeps the weights with the largest
share of that bound. Three rules go by that name; option `variant` picks one. Every one of
them, per round and per real batch x (B, *input_shape; 10 images per class by default):

    1. activation pass: the masked network on x; every ReLU/LeakyReLU records its gate from
       its input u: g = [u > 0] (same shape as u)
    2. jvf ("path activation") pass, no gradient: each activation replaced by u -> u * g:
                                                 z1 = jvf(x_jvf)              (B, K)
    3. pk ("path kernel") pass: each activation replaced by the identity:
                                                 z2 = pk(x_pk)                (B, K)
    R = sum over batches of sum(z1 * z2)                                       scalar
    score_j = a function of dR/dp_j, with p the pk copy's parameter (a leaf; masked after
              the leaf, so a pruned weight's gradient and score are 0)

and they differ in everything else (m: the mask; "kept": norm-layer parameters, and under
code-2025 the classifier's, which keep theta (* m) in both copies):

    |                  | code-2025            | paper                | code-2024 (default)   |
    |------------------|----------------------|----------------------|-----------------------|
    | activation pass  | eval mode            | eval mode            | train mode            |
    | jvf and pk mode  | norm_stats: eval     | norm_stats: eval     | train mode (fixed)    |
    |                  | ("running", default) | ("running", default) |                       |
    |                  | or train ("batch")   | or train ("batch")   |                       |
    | jvf parameters   | 1 * m; kept: theta   | 1 * m; norm: theta   | theta * m, all        |
    | x_jvf            | x ** 2               | x ** 2               | x                     |
    | pk parameters p  | theta**2; kept theta | theta**2; norm theta | theta**2; norm theta  |
    | x_pk             | all-ones images      | all-ones images      | x                     |
    | classifier       | kept (theta)         | 1 in jvf, squared    | squared in pk         |
    | score            | |dR/dp| theta^2 m    | |dR/dp| theta^2 m    | |dR/dp p p_jvf th^2|  |
    |                  |                      |                      | = |dR/dp| th^4 |th| m |
    | LeakyReLU gate   | leaky_gate (squared) | leaky_gate (squared) | binary (fixed)        |

("theta**2; kept theta": a kept tensor is its own pk leaf, p = theta, so its score is
|dR/dtheta| theta^2. Biases count as weights from a constant-1 unit: 1 in jvf, squared in pk,
except the code-2024 jvf, which never touched them.)

code-2025: the February 2025 released code, iurada/px-ntk-pruning commit ed6c40e,
lib/pruners.py class PX, with this library's deliberate differences listed further down:
    L437  pk copy in train mode;  L439-443 every state entry squared except names containing
          'weight_mask', 'bias_mask', 'bn', 'fc' (the classifier keeps theta);
    L446-452 jvf copy in train mode, the same names skipped, every other entry filled with 1;
    L455  activation copy in eval mode;  L433 gates torch.where(u > 0, 1.0, 0.0);
    L469  z1 = jvf_model(data.pow(2));  L473 z2 = pk_model(torch.ones_like(data));
    L484  score = p1.grad.abs() * p.pow(2): |dR/dp| theta^2, p = theta^2 (theta for 'fc').
The train mode of L437/L446 is norm_stats="batch"; the default here is "running" (below).

code-2024: the April 2024 code that produced the paper's numbers, commit 82ce2bf,
lib/pruners.py class PX, exactly as it ran, its copy bug included:
    L416-422 an auxiliary copy with theta * m, in train mode; jvf, pk and the activation copy
          are deep copies of it, so all three passes run in train mode (batch statistics;
          the activation pass too: its gates come from a train-mode network);
    L427, L437 activations off in pk and jvf (its ReLU modules return their input);
    L429-433 pk: every state entry squared except names containing 'weight_mask',
          'bias_mask', 'bn': the classifier and every bias are squared too;
    L443-444 `p[m > 0].fill_(1.0)` / `p[m <= 0].fill_(0.0)`: indexing with a boolean mask
          makes a copy, so the fill never reaches p (a reader reported this in the
          repository's issue tracker, "Question: Squaring Data Before Passing to jvf_model
          in PX Pruning Method", February 2025) and the jvf copy keeps theta * m: with its
          own gates it is the masked network itself, z1 = f(x) in train mode (for ReLU);
          the biases were never meant to change (the loop covers weights only);
    L408, L411 gates from the input of each ReLU/LeakyReLU module: torch.where(u > 0, 1.0,
          0.0), so a LeakyReLU is gated 0/1 (leaky_gate="binary" is fixed);
    L462-465 activation_model(data); z1 = jvf_model(data) (x, not squared); z2 =
          pk_model(data) (the real batch, not ones); (z1 * z2).sum().backward();
    L472-473 score = |p1.grad * p1 * p2 * p.pow(2)| with p1 the pk weight (theta^2 m),
          p2 the jvf weight (theta m, by the bug) and p the model's weight theta:
          |dR/d(theta^2)| * theta^4 * |theta| * m (with the fill working: theta^4 * m).
    Its loop scored the first `batch_limit` batches (2 of 128 in its launch scripts) of the
    shuffled, augmented training loader; here the batches are whatever `data` holds.
    Since pk sees the real batch, the all-ones blind spot of norm_stats="batch" (below)
    does not arise, and no rounding check runs.

paper: the equations of arXiv 2406.01820 as written. The paper's full text was not
available when this variant was written (only its abstract), so the variant rests on what
can be cited: the paper's sentence on the jvf copy quoted in the repository's issue tracker
(same issue, October 2024): "it takes the squared data as input, the parameters are all
one, and the activations status is an exact copy of that of f"; and its bound as a reader
restated it there (February 2025), per image n and output k,
    (sum_p a_p(x_n, theta) x_{n,s[p]}^2) * (sum_p sum_{j in p} v_p(theta)^2 / theta_j^2),
with a_p the 0/1 activation of path p, s[p] its input and v_p the product of its weights.
The first factor is jvf(x ** 2) with every weight 1; the second is sum_j dz2/d(theta_j^2)
with z2 = pk(1) and every weight squared (d v_p^2 / d theta_j^2 = v_p^2 / theta_j^2), so
the bound is sum_j dR/d(theta_j^2). The classifier's weights lie on every path, so it is 1
in jvf and squared in pk like any layer (the one difference from code-2025's structure);
the activation pass is read here as f in eval mode (the network as it computes). The score
is |dR/dp| * theta^2 with p = theta^2, as the February 2025 code computes it (its author
wrote, in the same issue, that he realigned that code "with the original implementation");
the paper's own saliency equation could not be checked. Norm layers are not in the
equations: they keep theta in both copies, as both codes do, and norm_stats chooses their
mode (default "running").

Options each variant fixes (a conflicting value is a ValueError naming the rule, never
ignored; None, the default of norm_stats and leaky_gate, means "the variant's"):
    code-2025  nothing: classifier (auto), leaky_gate (squared), norm_stats (running) free;
    paper      classifier must be None (the classifier is a path layer); leaky_gate and
               norm_stats free (squared, running);
    code-2024  classifier None, norm_stats "batch", leaky_gate "binary".
The metadata records the values used (norm_stats and leaky_gate resolved).

Which layer is what, by module type and structure (never by name):
    - norm layers: instances of BatchNorm*/SyncBatchNorm/InstanceNorm* (`_NormBase`),
      GroupNorm, LayerNorm, LocalResponseNorm (and RMSNorm where torch has it): their
      parameters keep theta in both copies and their buffers are not changed;
    - the classifier (code-2025 only): the last Conv/Linear layer (or module holding a
      prunable tensor) whose output reaches the logits, found once by one probe forward
      that follows the autograd graph back from the logits (so the order of definition in
      __init__ and side branches that do not reach the output do not matter). Option
      `classifier` names it instead (a module, e.g. "fc", or one of its parameters,
      "fc.weight"); every parameter below that module keeps theta;
    - everything else (Conv/Linear weights and biases, and any other parameter, e.g. a
      learnt scale) is transformed as the table says.
Activations are intercepted on the loop's private copy only, without patching torch:
forward pre-/post-hooks on nn.ReLU and nn.LeakyReLU modules (the module's own F.relu call
is left alone; an inplace module runs on a copy so the pre-activation u survives), and a
`torch.overrides.TorchFunctionMode` for functional calls anywhere in the forward:
torch.relu, F.relu, Tensor.relu, relu_ and F.leaky_relu(_). Dropout (module or
functional) is the identity in all three passes.

LeakyReLU (slope a): a path's gate is the product of its units' derivatives, 1 or a. z1
sums the *squared* entries of the path-activation Jacobian (that is why x enters squared
and the weights as 1 while pk squares them), so the gate in jvf is g = 1 if u > 0 else
a ** 2 (`leaky_gate="squared"`, the default of code-2025 and paper); `leaky_gate="binary"`
uses the 0/1 on/off pattern u > 0, i.e. treats LeakyReLU as ReLU (as code-2024 does; the
February 2025 code has no consistent rule: its hook turns leaky_relu into relu in the
activation pass and never gates it in jvf).

Works for ReLU/LeakyReLU networks only. Any other activation (GELU, SiLU, Tanh, Sigmoid,
ELU, Softmax, ... as a module or as a torch call in the forward) is a ValueError naming
it, raised before any score is computed, as is a model whose activation calls differ
between the passes (count, order or shape; e.g. a forward that branches on
`self.training`) or a model whose inputs are not floating point.

BatchNorm in jvf and pk (`norm_stats`, code-2025 and paper): "running" (default) runs both
copies in eval mode: norm layers use their running statistics, at init an affine identity,
so the copies are the plain ReLU network whose paths the decomposition sums over (as
SynFlow scores in eval mode). "batch" (the February 2025 code) runs both in train mode,
normalising with the batch's statistics, with the gradient flowing through them. It is not
the default because, with pk fed all-ones images, it measures nothing on the networks this
library exists for:
    - pk: the pk input is the same all-ones image for every b, so a train-mode BatchNorm's
      output has mean exactly beta over the positions of each image (and is beta itself for
      a BatchNorm1d); after global average pooling (CIFAR ResNets, VGG-BN, ImageNet
      ResNets) z2 = classifier(sum of betas) does not depend on any weight before the last
      BatchNorm, nor (beta = 0 at init) on the classifier's weights. In exact arithmetic
      their scores are 0; in floats they are rounding noise (ResNet-20 and VGG-16-BN at
      init: float64 scores 1e7 to 1e10 times smaller than float32 ones) and the masks
      follow the noise: on CIFAR ResNet-20 at 98.2 % the classifier keeps no weight and
      training stays at chance (benchmarks/quality_mnist5k.md, benchmarks/RESULTS.md).
    - jvf: the same argument over the batch: sum_b z1[b] after a train-mode BatchNorm and
      global pooling no longer depends on the data, so R = sum_b z1[b] * z2 (z2 equal for
      every b) loses the data-dependent term PX was designed to add.
With "batch" and all-ones pk, round 1 checks this on two images (float32 and float64
gradients of R) and names the tensors concerned in a `PXRoundingWarning`. Networks without
norm layers score the same under both rules.

Deliberate differences from the released codes (all variants):
    - norm layers and the classifier are chosen by module type and graph structure, not
      by the substrings 'bn' and 'fc' of parameter names. In the released ResNets the
      shortcut's BatchNorm ('shortcut.1') matches neither, so there its bias is set to 1
      in the February 2025 jvf and its affine parameters are squared in both codes' pk
      (1 and 0 at init, so squaring changes nothing there); here every norm layer keeps
      theta.
    - buffers are never transformed (the released codes also fill or square the running
      statistics of norm layers not named 'bn'; no effect in train mode) and the model's
      own running statistics are never updated: the train-mode passes write into
      throw-away copies of the buffers, so the activation pass of every batch sees the
      same (initial) statistics, as the released codes' separate copies do.
    - activations are intercepted with hooks and a torch function mode on the private
      copy, not by replacing torch.nn.functional.relu globally (2025) or by switching the
      repository's own ReLU modules off (2024), so torch.relu, Tensor.relu, functional
      and in-place variants are seen too, nothing outside the scorer is affected, and an
      activation PX cannot handle is an error instead of being silently left in place.
    - no deep copies: the three passes are `torch.func.functional_call`s of one model
      with substituted parameters and buffers.
    - dropout is off in every pass (the released copies run in train mode; its models
      have no dropout).
    - precision="auto" keeps float32 where the all-ones jvf copy exceeds it (it multiplies
      activations by about fan_in per layer when no train-mode norm layer rescales them:
      ResNet-20 in eval mode reaches |z1| ~ 1e46): z1 is then computed in float64 and
      multiplied by one power of two 2**-k per round before it meets pk, so every score
      of that round is divided by the same 2**k (ranking unchanged); a round whose float32
      scores are still not finite is redone in float64.
    - code-2025 and paper: BatchNorm in eval mode by default (norm_stats="running",
      above); the released rule is norm_stats="batch".
    - options the released code does not have: variant, norm_stats, leaky_gate, classifier.
Kept as released: max- and average-pooling run as they are in every pass (jvf and pk do
not gate a max-pool by the activation pass's choice).

The default is code-2024, chosen by measurement (benchmarks/px_variants.md): on mnist5k
ResNet-20 and LeNet-5 at 95 / 98.2 / 99.3 % sparsity (3 seeds) it trains to the best
accuracy of the three on ResNet-20 at all three (96.5 / 94.8 / 86.5 %, against 95.4 / 88.9 /
62.3 for "paper" and 80.6 / 58.1 / 36.0 for code-2025) and on LeNet-5 at 95 %, "paper"
leads on LeNet-5 at 98.2 % (by 0.3, inside the spread) and 99.3 %, and it is the only rule
that reproduces the paper's claim that PX beats NTK-SAP. Until December
2026 this library's default was code-2025 (with norm_stats="running"): pass
variant="code-2025" to reproduce masks made before.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import ntksap
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> data = [(torch.randn(6, 1, 4, 4), torch.arange(3).repeat(2))]
    >>> masks = ntksap.prune(net, "px", density=0.2, data=data, rounds=3)
    >>> masks.num_kept == round(0.2 * (16 * 8 + 8 * 3))
    True
    >>> masks.metadata["options"]["norm_stats"], masks.metadata["options"]["leaky_gate"]
    ('batch', 'binary')
    >>> new = ntksap.prune(net, "px", density=0.2, data=data, rounds=3, variant="code-2025")
    >>> new.metadata["options"]["classifier"], new.metadata["options"]["norm_stats"]
    ('3', 'running')
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ntksap.scoring.base import Option, ScoreContext, Scores, register_method
from ntksap.scoring.synflow import PRECISION_OPTION

LEAKY_GATES = ("squared", "binary")
#: Norm statistics of the jvf and pk passes: "running" = eval mode (the running statistics;
#: BatchNorm at init is then an affine identity), "batch" = train mode (as both released
#: codes; degenerate before global average pooling when pk is fed all-ones images).
NORM_STATS = ("batch", "running")

#: The PX rules (option `variant`; the module docstring says what each one does and cites
#: the source line of every difference). The first is the default.
VARIANTS = ("code-2025", "paper", "code-2024")


@dataclass(frozen=True)
class Rule:
    """What one PX variant does, resolved from the options (see the module docstring).

    Attributes:
        variant: one of VARIANTS.
        activation_train: the activation pass runs in train mode (else eval mode).
        copies_train: the jvf and pk passes run in train mode (norm_stats="batch").
        jvf_ones: the transformed jvf parameters are 1 (masked); False: theta * m, as the
            April 2024 code's fill of a copy left them.
        jvf_squares_x: jvf is fed x ** 2 (else x).
        pk_on_ones: pk is fed all-ones images (else the real batch x).
        keeps_classifier: the classifier keeps theta in both copies (else it is a path
            layer like any other: 1 in jvf, squared in pk).
        score_jvf_factor: the score carries the extra factors |p| * |jvf parameter| of the
            April 2024 code (|dR/dp * p * p_jvf * theta^2|) instead of |dR/dp| * theta^2.
        leaky_gate: the jvf gate of a LeakyReLU with negative input (LEAKY_GATES).
    """

    variant: str
    activation_train: bool
    copies_train: bool
    jvf_ones: bool
    jvf_squares_x: bool
    pk_on_ones: bool
    keeps_classifier: bool
    score_jvf_factor: bool
    leaky_gate: str


#: Options a variant fixes: variant -> {option: the only value it allows}; a conflicting
#: value is an error, never ignored. None = "auto": the value below (or the default rule).
_FIXED: dict[str, dict[str, Any]] = {
    "code-2025": {},
    "paper": {"classifier": None},
    "code-2024": {"norm_stats": "batch", "leaky_gate": "binary", "classifier": None},
}
#: Why each fixed option has its value (the end of the refusal message).
_WHY_FIXED = {
    ("paper", "classifier"): "the paper's jvf copy has 'all parameters one' and its path "
    "kernel squares every weight on a path, the classifier's too",
    ("code-2024", "classifier"): "the April 2024 code squares the classifier in pk like any "
    "layer (only names containing 'bn' are skipped)",
    ("code-2024", "norm_stats"): "the April 2024 code runs all three copies in train mode",
    ("code-2024", "leaky_gate"): "the April 2024 code gates with torch.where(u > 0, 1.0, 0.0)",
}
_AUTO = {"norm_stats": "running", "leaky_gate": "squared"}  # where a variant leaves them free


def check_variant_options(opts: dict[str, Any]) -> None:
    """ValueError when an option conflicts with the one value `opts["variant"]` fixes.

    Example:
        >>> check_variant_options({"variant": "code-2024", "norm_stats": "running",
        ...                        "leaky_gate": None, "classifier": None})
        Traceback (most recent call last):
        ...
        ValueError: px variant='code-2024' fixes norm_stats='batch' (the April 2024 code runs all three copies in train mode), got norm_stats='running'; leave norm_stats unset (None), or choose variant='code-2025' or 'paper', where norm_stats may be batch or running
    """  # noqa: E501
    variant = opts["variant"]
    for name, only in _FIXED[variant].items():
        given = opts.get(name)
        if given is None or given == only:
            continue
        free = [v for v in VARIANTS if name not in _FIXED[v]]
        allowed = {"norm_stats": NORM_STATS, "leaky_gate": LEAKY_GATES}.get(name)
        where = " or ".join(repr(v) for v in free)
        values = f", where {name} may be {' or '.join(allowed)}" if allowed else ""
        must = "no classifier (leave it None)" if only is None else f"{name}={only!r}"
        raise ValueError(
            f"px variant={variant!r} fixes {must} ({_WHY_FIXED[(variant, name)]}), got "
            f"{name}={given!r}; leave {name} unset (None), or choose variant={where}{values}"
        )


def variant_rule(opts: Mapping[str, Any]) -> Rule:
    """The `Rule` of the options' variant, with norm_stats / leaky_gate resolved (None ->
    the variant's value). The options must have passed `check_variant_options`.

    Example:
        >>> r = variant_rule({"variant": "code-2024", "norm_stats": None, "leaky_gate": None})
        >>> r.copies_train, r.jvf_ones, r.pk_on_ones, r.leaky_gate
        (True, False, False, 'binary')
    """
    variant = opts["variant"]
    fixed = _FIXED[variant]

    def pick(name: str) -> str:
        return fixed.get(name) or opts.get(name) or _AUTO[name]

    norm_stats = pick("norm_stats")
    old = variant == "code-2024"
    return Rule(
        variant=variant,
        activation_train=old,
        copies_train=norm_stats == "batch",
        jvf_ones=not old,
        jvf_squares_x=not old,
        pk_on_ones=not old,
        keeps_classifier=variant == "code-2025",
        score_jvf_factor=old,
        leaky_gate=pick("leaky_gate"),
    )


#: Activation module types PX can gate (valid choices named in every refusal).
GATED_MODULES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU)
VALID_ACTIVATIONS = "ReLU, LeakyReLU (modules, or torch.relu / F.relu / F.leaky_relu calls)"

#: Normalisation layers: their parameters keep theta in both copies (by type, not name).
NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
        nn.GroupNorm,
        nn.LayerNorm,
        nn.LocalResponseNorm,
        getattr(nn, "RMSNorm", None),
    )
    if t is not None
)

#: Layers a classifier can be (besides any module holding a prunable tensor itself).
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)

# torch functions (by __name__, as the function mode sees them) PX gates, passes, refuses.
_RELU = frozenset({"relu", "relu_"})
_LEAKY = frozenset({"leaky_relu", "leaky_relu_"})
_DROPOUT = frozenset(
    {
        "dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "feature_dropout",
        "feature_dropout_", "alpha_dropout", "alpha_dropout_", "feature_alpha_dropout",
        "feature_alpha_dropout_",
    }
)  # fmt: skip
_REFUSED = frozenset(
    {
        "gelu", "silu", "silu_", "tanh", "tanh_", "sigmoid", "sigmoid_", "elu", "elu_",
        "selu", "selu_", "celu", "celu_", "softplus", "mish", "mish_", "hardswish",
        "hardswish_", "hardsigmoid", "hardsigmoid_", "hardtanh", "hardtanh_", "relu6",
        "prelu", "rrelu", "rrelu_", "rrelu_with_noise", "softsign", "tanhshrink",
        "logsigmoid", "log_sigmoid", "glu", "threshold", "threshold_", "softshrink",
        "hardshrink", "softmax", "log_softmax", "softmin", "scaled_dot_product_attention",
    }
)  # fmt: skip
_REFUSED_MODULES: tuple[type[nn.Module], ...] = (
    nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.PReLU, nn.RReLU, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.GLU, nn.Threshold, nn.Softshrink, nn.Hardshrink,
    nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d, nn.MultiheadAttention,
)  # fmt: skip


def _refusal(what: str) -> ValueError:
    return ValueError(
        f"px works on ReLU/LeakyReLU networks only (its path decomposition needs on/off "
        f"gates); the model uses {what}. Valid activations: {VALID_ACTIVATIONS}"
    )


# ---------------------------------------------------------------------------------------
# Intercepting the activations
# ---------------------------------------------------------------------------------------
# The three passes, by what they do to an activation (the names appear in messages).
RECORD, GATE, IDENTITY = "activation", "jvf", "pk"


_ALIGN_RULE = (
    "The forward must make the same ReLU/LeakyReLU calls in the same order on same-shaped "
    "inputs in every pass, whatever the weights and inputs: the activation pass runs in eval "
    "mode (train mode with variant='code-2024'), jvf and pk in eval mode (train mode with "
    "norm_stats='batch', which variant='code-2024' fixes); a forward that branches on "
    "self.training or on values cannot be scored by px"
)


@dataclass
class _Site:
    """One activation call of a forward pass: where, what, and the input's shape."""

    label: str  # e.g. "module 'layer1.0.relu1' (ReLU)" or "leaky_relu in 'block'"
    shape: tuple[int, ...]
    slope: float | None  # None for ReLU, the negative slope for LeakyReLU


@dataclass
class _Interceptor:
    """Replaces the activations of one forward pass of `model` (see `intercept`).

    phase RECORD: the real activations run; `sites` and `gates` are recorded in call order.
    phase GATE: the i-th activation returns u * gates[i] (jvf); checked against `expected`.
    phase IDENTITY: every activation returns u (pk); checked against `expected`.
    """

    model: nn.Module
    phase: str
    leaky_gate: str = "squared"
    expected: list[_Site] | None = None
    gates: list[torch.Tensor] = field(default_factory=list)
    sites: list[_Site] = field(default_factory=list)
    stack: list[str] = field(default_factory=list)  # names of the modules being run
    inside: int = 0  # > 0 while a gated module runs (its own F.relu is left alone)

    # -- what every activation does ------------------------------------------------------
    def _site(self, label: str, u: torch.Tensor, slope: float | None) -> int:
        """Record (RECORD) or check (GATE, IDENTITY) the next site; its index."""
        i = len(self.sites)
        site = _Site(label, tuple(u.shape), slope)
        if self.expected is not None:
            want = self.expected[i] if i < len(self.expected) else None
            if want is None or (want.label, want.shape) != (site.label, site.shape):
                had = f"{want.label} {want.shape}" if want else "no activation"
                raise ValueError(
                    f"px cannot align the activation patterns between its passes: activation "
                    f"call {i + 1} of the {self.phase} pass is {site.label} {site.shape}, the "
                    f"activation pass had {had} there. {_ALIGN_RULE}"
                )
        self.sites.append(site)
        return i

    def _gate(self, u: torch.Tensor, slope: float | None) -> torch.Tensor:
        on = u > 0
        if slope is None or self.leaky_gate == "binary":
            return on.to(u.dtype)
        off = torch.full_like(u, slope**2)  # the squared path gate of a negative unit
        return torch.where(on, torch.ones_like(u), off)

    def replace(
        self, label: str, u: torch.Tensor, slope: float | None, inplace: bool
    ) -> torch.Tensor | None:
        """The substitute output for an activation with input u, or None in RECORD."""
        i = self._site(label, u, slope)
        if self.phase == RECORD:
            self.gates.append(self._gate(u.detach(), slope))
            return None
        if self.phase == IDENTITY:
            return u
        gate = self.gates[i]
        return u.mul_(gate) if inplace else u * gate

    def finish(self) -> None:
        """After the pass: every recorded activation must have been met."""
        if self.expected is not None and len(self.sites) != len(self.expected):
            raise ValueError(
                f"px cannot align the activation patterns between its passes: the "
                f"{self.phase} pass made {len(self.sites)} activation calls, the activation "
                f"pass {len(self.expected)}. {_ALIGN_RULE}"
            )


def _functional_spec(name: str, args: tuple, kwargs: dict) -> tuple[float | None, bool]:
    """(negative slope or None, inplace) of a functional relu/leaky_relu call.

    Signatures: relu(input, inplace=False) (F.relu; torch.relu and Tensor.relu take only
    the input), relu_(input), leaky_relu(input, negative_slope=0.01, inplace=False),
    leaky_relu_(input, negative_slope=0.01).
    """
    if name in _RELU:
        return None, name == "relu_" or bool(kwargs.get("inplace", args[1:2] == (True,)))
    slope = float(kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01))
    inplace = name == "leaky_relu_" or bool(kwargs.get("inplace", args[2:3] == (True,)))
    return slope, inplace


class _ActivationMode(TorchFunctionMode):
    """Functional relu/leaky_relu calls -> the interceptor; dropout -> identity; other
    activations -> ValueError. Inside __torch_function__ torch disables the mode, so calls
    made *by* torch functions are not seen, only those of the model's own forward code."""

    def __init__(self, owner: _Interceptor) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(
        self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        own = self.owner
        if own.inside or not args or not isinstance(args[0], torch.Tensor):
            return func(*args, **kwargs)
        where = f"'{own.stack[-1]}'" if own.stack and own.stack[-1] else "the model's forward"
        if name in _RELU or name in _LEAKY:
            out = own.replace(f"{name} in {where}", args[0], *_functional_spec(name, args, kwargs))
            return func(*args, **kwargs) if out is None else out
        if name in _DROPOUT:
            return args[0]
        if name in _REFUSED:
            raise _refusal(f"the torch function {name} (called in {where})")
        return func(*args, **kwargs)


def _module_hooks(own: _Interceptor, name: str, module: nn.Module) -> list:
    """Hooks that keep `own.stack` and, on a ReLU/LeakyReLU module, replace its output."""
    handles = []
    gated = isinstance(module, GATED_MODULES)
    pending: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def pre(mod: nn.Module, args: tuple) -> tuple | None:
        own.stack.append(name)
        if not gated:
            return None
        own.inside += 1
        u = args[0]
        slope = float(mod.negative_slope) if isinstance(mod, nn.LeakyReLU) else None
        label = f"module '{name}' ({type(mod).__name__})"
        inplace = bool(getattr(mod, "inplace", False))
        out = own.replace(label, u, slope, inplace)
        pending.append((u, out))
        if out is not None and inplace:
            return (u.clone(), *args[1:])  # the module's own relu_ runs on a throw-away copy
        return None

    def post(mod: nn.Module, args: tuple, output: Any) -> Any:
        own.stack.pop()
        if not gated:
            return None
        own.inside -= 1
        _, out = pending.pop()
        return out  # None in RECORD: the real output stands

    handles.append(module.register_forward_pre_hook(pre))
    handles.append(module.register_forward_hook(post))
    return handles


@contextlib.contextmanager
def intercept(
    model: nn.Module,
    phase: str,
    *,
    expected: list[_Site] | None = None,
    gates: list[torch.Tensor] | None = None,
    leaky_gate: str = "squared",
) -> Iterator[_Interceptor]:
    """Run forwards of `model` with its activations recorded, gated or removed.

    Hooks are registered on `model`'s modules and removed on exit; the function mode is
    active only inside the block. Nothing global is patched.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> with intercept(net, RECORD) as rec:
        ...     _ = net(torch.ones(1, 2))
        >>> [s.label for s in rec.sites]
        ["module '1' (ReLU)"]
    """
    own = _Interceptor(model, phase, leaky_gate, expected, list(gates or []))
    handles = []
    try:
        for name, module in model.named_modules():
            handles += _module_hooks(own, name, module)
        with _ActivationMode(own):
            yield own
        own.finish()
    finally:
        for h in handles:
            h.remove()


def refuse_unsupported_modules(model: nn.Module) -> None:
    """ValueError naming the first activation module PX cannot gate (GELU, Tanh, ...)."""
    bad = [
        (n, type(m).__name__)
        for n, m in model.named_modules()
        if isinstance(m, _REFUSED_MODULES) and not isinstance(m, GATED_MODULES)
    ]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise _refusal(f"{bad[0][1]} at '{bad[0][0]}'{more}")


# ---------------------------------------------------------------------------------------
# Which parameters are transformed
# ---------------------------------------------------------------------------------------
def _candidate_layers(ctx: ScoreContext) -> dict[nn.Module, str]:
    """Module -> name of every layer that may be the classifier: Conv/Linear layers and
    modules that hold a prunable tensor themselves."""
    prunable = {id(p) for p in ctx.params.values()}
    out: dict[nn.Module, str] = {}
    for name, m in ctx.model.named_modules():
        own = m._parameters.values()
        if isinstance(m, LAYER_TYPES) or any(p is not None and id(p) in prunable for p in own):
            out.setdefault(m, name)
    return out


def _reachable(root: Any) -> set[Any]:
    """Every autograd node the node `root` depends on (root included)."""
    seen: set[Any] = set()
    todo = [root]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(nxt for nxt, _ in node.next_functions)
    return seen


def find_classifier(ctx: ScoreContext, x: torch.Tensor, weights: Mapping[str, Any]) -> str:
    """Name of the last-called layer whose output reaches the logits (one eval forward of
    `x` with input gradients on, so every layer's output carries its autograd node)."""
    layers = _candidate_layers(ctx)
    calls: list[tuple[str, Any]] = []  # (layer name, grad_fn of its output), in call order

    def hook(mod: nn.Module, args: tuple, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            calls.append((layers[mod], out.grad_fn))

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.enable_grad():
            logits = ctx.forward(weights, x.detach().clone().requires_grad_(True))
    finally:
        for h in handles:
            h.remove()
    reach = _reachable(logits.grad_fn)
    for name, node in reversed(calls):
        if node in reach:
            return name
    raise ValueError(
        "px found no Conv/Linear layer whose output reaches the logits; name the classifier "
        "with classifier='<module name>'"
    )


def resolve_classifier(model: nn.Module, given: str) -> str:
    """The module name of `given` (a module, or one of its parameters), checked."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    if given in modules and given != "" and any(True for _ in modules[given].parameters()):
        return given
    owner = given.rpartition(".")[0]
    if given in params and owner in modules:
        return owner
    layers = [n for n, m in modules.items() if isinstance(m, LAYER_TYPES)]
    shown = ", ".join(layers[-5:]) + (" (the last 5)" if len(layers) > 5 else "")
    raise ValueError(
        f"px classifier must name a module with parameters (or one of its parameters) of the "
        f"model, got {given!r}; its Conv/Linear layers include: {shown or 'none'}; or leave "
        "classifier=None (auto: the last layer whose output reaches the logits)"
    )


def kept_parameters(model: nn.Module, classifier: str | None) -> set[str]:
    """Names of the parameters that keep theta in both copies: every norm layer's own
    parameters and every parameter below the classifier module (None: no classifier is
    kept, as in variants "paper" and "code-2024")."""
    kept_ids: set[int] = set()
    if classifier is not None:
        kept_ids.update(id(p) for p in model.get_submodule(classifier).parameters())
    for m in model.modules():
        if isinstance(m, NORM_TYPES):
            kept_ids.update(id(p) for p in m.parameters(recurse=False))
    return {n for n, p in model.named_parameters() if id(p) in kept_ids}


# ---------------------------------------------------------------------------------------
# The score
# ---------------------------------------------------------------------------------------
def _buffers(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Fresh copies of every buffer (floating ones in `dtype`): train-mode BatchNorm writes
    its running statistics into these, never into the model's own."""
    return {
        n: b.detach().to(dtype).clone() if b.is_floating_point() else b.detach().clone()
        for n, b in model.named_buffers()
    }


def _probe(ctx: ScoreContext, x: torch.Tensor, real: Mapping[str, torch.Tensor]) -> None:
    """Before any score: refuse other activations (functional ones show up here), resolve
    the classifier where the variant keeps it, and check that the jvf/pk mode calls the
    same activations as the activation pass's mode."""
    model, dtype, opts = ctx.model, x.dtype, ctx.options
    rule = variant_rule(opts)
    model.train(rule.activation_train)
    with intercept(model, RECORD) as rec:
        weights = {**real, **_buffers(model, dtype)}
        if rule.keeps_classifier:
            found = find_classifier(ctx, x, weights)
            if opts["classifier"] is None:
                opts["classifier"] = found  # resolved once; the loop records the options
        else:
            with torch.no_grad():
                ctx.forward(real, x, **_buffers(model, dtype))
    model.train(rule.copies_train)
    with torch.no_grad(), intercept(model, IDENTITY, expected=rec.sites):
        ctx.forward(real, x, **_buffers(model, dtype))


@dataclass
class _Copies:
    """The parameters of the three passes of one round, in one dtype (name -> tensor)."""

    theta: dict[str, torch.Tensor]  # every parameter of the model
    masks: dict[str, torch.Tensor]  # prunable name -> 0/1 mask
    real: dict[str, torch.Tensor]  # theta * m: the network itself (activation pass)
    ones: dict[str, torch.Tensor]  # jvf: 1 * m, theta (* m) where kept; code-2024: real
    pk_values: dict[str, torch.Tensor]  # pk before masking: theta**2, theta where kept
    leaves: dict[str, torch.Tensor]  # the prunable pk parameters: dR/d(leaf) is the score


def _masked(c_masks: Mapping[str, torch.Tensor], n: str, t: torch.Tensor) -> torch.Tensor:
    return t * c_masks[n] if n in c_masks else t


def _theta_and_real(ctx: ScoreContext, dtype: torch.dtype) -> tuple[dict, dict, dict]:
    masks = ctx.mask_float(dtype)
    theta = {n: p.detach().to(dtype) for n, p in ctx.model.named_parameters()}
    return theta, masks, {n: _masked(masks, n, t) for n, t in theta.items()}


def _copies(ctx: ScoreContext, dtype: torch.dtype, kept: set[str]) -> _Copies:
    theta, masks, real = _theta_and_real(ctx, dtype)
    if variant_rule(ctx.options).jvf_ones:
        ones = {
            n: real[n] if n in kept else _masked(masks, n, torch.ones_like(t))
            for n, t in theta.items()
        }
    else:  # code-2024: its `p[m > 0].fill_(1.0)` filled a copy, so jvf kept theta * m
        ones = dict(real)
    # The prunable pk parameters are leaves (masked after the leaf, so a pruned weight's
    # gradient is 0); theta itself where kept, as the released code leaves its 'fc' as is.
    leaves = {
        n: (theta[n] if n in kept else theta[n] ** 2).detach().requires_grad_(True)
        for n in ctx.params
    }
    pk_values = {
        n: leaves[n] if n in leaves else t if n in kept else t**2 for n, t in theta.items()
    }
    return _Copies(theta, masks, real, ones, pk_values, leaves)


@dataclass
class _Jvf:
    """How z1 is computed: the jvf parameters, their dtype, and the power of two z1 is
    multiplied by before it meets pk (1 unless the jvf values exceed the compute dtype)."""

    ones: dict[str, torch.Tensor]
    dtype: torch.dtype
    scale: float = 1.0


#: Largest |z1| used as is in float32: 2**100 leaves 2**28 of headroom for z1 * z2 and the
#: gradient sums before float32's 3.4e38 (2**128).
_F32_Z1_LIMIT = 2.0**100

#: Private copies of models whose all-ones jvf copy exceeds float32 (checked once per prune
#: on the first batch, so later rounds skip the float32 attempt). Keyed by the loop's copy.
_WIDE_JVF: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _z1(ctx: ScoreContext, c: _Copies, x: torch.Tensor, jvf: _Jvf) -> tuple[torch.Tensor, list]:
    """(z1 of batch x, shape (B, K), in x's dtype, times jvf.scale; the activation sites).

    The activation pass runs the masked network on x (in x's dtype; eval mode, train mode
    under code-2024) and records the gates; the jvf pass applies them to the jvf copy (all
    ones, fed x**2; code-2024: theta * m fed x), in jvf.dtype."""
    raw, sites = _z1_raw(ctx, c, x, jvf)
    return (raw * jvf.scale if jvf.scale != 1.0 else raw).to(x.dtype), sites  # 2**k: exact


def _z1_raw(ctx: ScoreContext, c: _Copies, x: torch.Tensor, jvf: _Jvf) -> tuple[torch.Tensor, list]:
    """z1 of batch x in jvf.dtype, unscaled, and the activation sites (see `_z1`)."""
    model, dtype, rule = ctx.model, x.dtype, variant_rule(ctx.options)
    with torch.no_grad():
        model.train(rule.activation_train)
        with intercept(model, RECORD, leaky_gate=rule.leaky_gate) as rec:
            ctx.forward(c.real, x, **_buffers(model, dtype))
        model.train(rule.copies_train)  # jvf and pk: batch statistics when True
        with intercept(model, GATE, expected=rec.sites, gates=rec.gates):
            xj = x.to(jvf.dtype)  # the gates stay in x's dtype: u * g promotes
            xj = xj.pow(2) if rule.jvf_squares_x else xj
            z1 = ctx.forward(jvf.ones, xj, **_buffers(model, jvf.dtype))  # (B, K)
    return z1, rec.sites


def _batch_r(
    ctx: ScoreContext,
    c: _Copies,
    x: torch.Tensor,
    jvf: _Jvf | None = None,
    z1: tuple[torch.Tensor, list] | None = None,
) -> torch.Tensor:
    """R of one batch x (B, *input_shape), differentiable with respect to `c.leaves`
    (z1 and the activation sites may be given when already computed for this x)."""
    model, dtype, rule = ctx.model, x.dtype, variant_rule(ctx.options)
    z1_, sites = z1 if z1 is not None else _z1(ctx, c, x, jvf or _Jvf(c.ones, dtype))
    model.train(rule.copies_train)
    pk = {n: _masked(c.masks, n, t) for n, t in c.pk_values.items()}  # fresh graph per batch
    xp = torch.ones_like(x) if rule.pk_on_ones else x  # code-2024: the real batch
    with intercept(model, IDENTITY, expected=sites):
        z2 = ctx.forward(pk, xp, **_buffers(model, dtype))  # (B, K)
    return (z1_ * z2).sum()


def _choose_jvf(
    ctx: ScoreContext, c: _Copies, x0: torch.Tensor
) -> tuple[_Jvf, tuple[torch.Tensor, list] | None]:
    """The jvf of this round and, when computed on the way, z1 of the first batch x0.

    In float32 (precision "auto" only) the all-ones jvf copy can exceed float32: it
    multiplies activations by about fan_in per layer when no train-mode norm layer rescales
    them (ResNet-20 in eval mode: |z1| ~ 1e46). Then z1 is computed in float64 and scaled
    by one power of two 2**-k per round (k from the first batch, the same on every rank),
    so pk, its gradient and the scores stay in float32: every score is divided by the same
    2**k, which leaves the ranking unchanged (the scores' absolute values are then relative).
    """
    plain = _Jvf(c.ones, x0.dtype)
    if x0.dtype != torch.float32 or ctx.options["precision"] != "auto":
        return plain, None
    if not _WIDE_JVF.get(ctx.model, False):
        z1 = _z1(ctx, c, x0, plain)
        peak = float(z1[0].abs().max())
        if math.isfinite(peak) and peak <= _F32_Z1_LIMIT:
            return plain, z1
        _WIDE_JVF[ctx.model] = True  # later rounds skip the float32 attempt
    wide = _Jvf({n: t.double() for n, t in c.ones.items()}, torch.float64)
    raw, sites = _z1_raw(ctx, c, x0, wide)
    peak = float(raw.abs().max())
    if not (math.isfinite(peak) and peak > 0):
        return wide, None  # float64 overflow (or all zero): px_scores' float64 redo decides
    wide.scale = 2.0 ** -math.frexp(peak)[1]  # max |z1| * scale in [0.5, 1)
    return wide, ((raw * wide.scale).to(x0.dtype), sites)


def _leaf_grads(r: torch.Tensor, c: _Copies) -> dict[str, torch.Tensor]:
    """dR/d(leaf) per prunable tensor; zeros for a tensor that does not reach the output."""
    names = list(c.leaves)
    grads = torch.autograd.grad(r, [c.leaves[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(c.leaves[n]) if g is None else g for n, g in zip(names, grads)}


class PXRoundingWarning(UserWarning):
    """Some px scores are float rounding noise (see norm_stats in `ntksap.scoring.px`)."""


def rounding_check(ctx: ScoreContext, x: torch.Tensor, kept: set[str]) -> list[str]:
    """Prunable tensors whose dR/dp on batch `x` is float rounding: its float32 and float64
    values differ by more than 1 % (relative norm). A real signal agrees to about 1e-6."""
    g = {}
    for dtype in (torch.float32, torch.float64):
        c = _copies(ctx, dtype, kept)
        g[dtype] = _leaf_grads(_batch_r(ctx, c, x.to(dtype)), c)
    noisy = []
    for n, g64 in g[torch.float64].items():
        g32 = g[torch.float32][n].double()
        scale = max(float(g64.norm()), float(g32.norm()))
        if scale > 0 and float((g32 - g64).norm()) > 0.01 * scale:
            noisy.append(n)
    return noisy


def _warn_rounding(ctx: ScoreContext, x: torch.Tensor, kept: set[str]) -> None:
    noisy = rounding_check(ctx, x, kept)
    if noisy:
        shown = ", ".join(noisy[:4]) + (", ..." if len(noisy) > 4 else "")
        warnings.warn(
            f"px: the scores of {len(noisy)} of {len(ctx.params)} prunable tensors are float "
            f"rounding noise ({shown}): their float32 and float64 values disagree. With "
            "norm_stats='batch' (as released in 2025) the pk copy sees the same all-ones image B "
            "times, and a train-mode BatchNorm followed by global average pooling hides every "
            "weight before it; norm_stats='running' (eval-mode norm layers) scores them",
            PXRoundingWarning,
            stacklevel=2,
        )


def _px_once(ctx: ScoreContext, dtype: torch.dtype) -> tuple[Scores, bool]:
    opts, rule = ctx.options, variant_rule(ctx.options)
    assert ctx.data is not None
    if ctx.round == 1 or (rule.keeps_classifier and opts["classifier"] is None):
        probe = ctx.data[0][0][:2].to(dtype)  # (2, *input_shape)
        _probe(ctx, probe, _theta_and_real(ctx, dtype)[2])
    kept = kept_parameters(ctx.model, opts["classifier"] if rule.keeps_classifier else None)
    norms = any(isinstance(m, NORM_TYPES) for m in ctx.model.modules())
    if ctx.round == 1 and rule.copies_train and rule.pk_on_ones and norms:
        _warn_rounding(ctx, probe, kept)  # see norm_stats in the module docstring
    c = _copies(ctx, dtype, kept)
    x0 = ctx.data[0][0].to(dtype)
    jvf, z1_first = _choose_jvf(ctx, c, x0)
    # dR/dp and R summed in float64 over this rank's batches (all of them in one process;
    # batch b on rank b mod world under distributed=True), then over the ranks
    grad = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in c.leaves.items()}
    total = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for x, _ in ctx.shard(ctx.data):
        reuse = z1_first if x is ctx.data[0][0] else None  # batch 0's z1 is already known
        r = _batch_r(ctx, c, x.to(dtype), jvf, reuse)  # x: (B, *input_shape)
        total += r.detach()
        for n, g in _leaf_grads(r, c).items():
            grad[n].add_(g)
    ctx.all_reduce_([*grad.values(), total])
    scores = {n: grad[n].to(dtype).abs() * c.theta[n] ** 2 * c.masks[n] for n in grad}
    if rule.score_jvf_factor:  # code-2024: |p1.grad * p1 * p2 * p.pow(2)|, p1 the pk leaf
        for n, s in scores.items():  # (theta^2 m), p2 the jvf weight (theta m, by the bug)
            s.mul_(c.leaves[n].detach().abs() * c.ones[n].abs())
    finite = bool(torch.isfinite(total)) and all(
        bool(torch.isfinite(s).all()) for s in scores.values()
    )
    return scores, finite


@register_method(
    "px",
    needs_data=True,
    default_rounds=100,
    options=[
        Option(
            "variant",
            "code-2024",
            str,
            "which PX rule: code-2024 (default) = the April 2024 code behind the paper's "
            "numbers, exactly as it ran (x not squared, real batch in pk, train mode, jvf "
            "weights left at theta by its fill of a copy, score |dR/dp * p * p_jvf * "
            "theta^2|; the best of the three on ResNet-20 in benchmarks/px_variants.md), "
            "code-2025 = the February 2025 released code's (with this "
            "library's documented deviations), paper = the paper's equations (the "
            "classifier is a path layer too)",
            choices=VARIANTS,
        ),
        Option(
            "classifier",
            None,
            str,
            "module (or parameter) left as theta in both copies (variant code-2025 only); "
            "auto: the last Conv/Linear layer whose output reaches the logits",
            allow_none=True,
        ),
        Option(
            "leaky_gate",
            None,
            str,
            "jvf gate of a LeakyReLU with negative input: squared = slope**2 (the squared "
            "path gate), binary = 0 (on/off, as a ReLU); auto: squared, binary under "
            "variant code-2024 (which fixes it)",
            choices=LEAKY_GATES,
            allow_none=True,
        ),
        Option(
            "norm_stats",
            None,
            str,
            "norm statistics in the jvf and pk copies: running = eval mode (BatchNorm at "
            "init an affine identity), batch = train mode (as released: before a global "
            "average pool its scores are rounding noise when pk is fed all-ones images); "
            "auto: running, batch under variant code-2024 (which fixes it)",
            choices=NORM_STATS,
            allow_none=True,
        ),
        PRECISION_OPTION,
    ],
    summary="Path eXclusion: data-driven NTK-trace path bound (Iurada 2024, ReLU nets)",
    validate=check_variant_options,
    # code-2025 was the default until December 2026: a run records the variant it used
    pinned=("variant",),
)
def px_scores(ctx: ScoreContext) -> Scores:
    """A function of dR/dp, R = sum(jvf(x) * pk(x)) over the data; T rounds (default 100).

    Options:
        variant: "code-2024" (default), "paper" or "code-2025": which PX rule (the module
            docstring compares them line by line, with the source of every difference,
            and says why code-2024 is the default).
        classifier: the module (e.g. "fc") or parameter ("fc.weight") whose parameters are
            left as theta in both copies, as the February 2025 code leaves its 'fc'. None
            (default): the last Conv/Linear layer whose output reaches the logits. Only
            variant "code-2025" keeps a classifier: with "paper" or "code-2024" a value is
            an error (they transform the classifier like every other layer).
        leaky_gate: "squared" (a LeakyReLU's jvf gate is slope**2 for negative inputs, the
            squared path gate) or "binary" (0/1, as a ReLU). None (default): "squared";
            "code-2024" fixes "binary" (another value is an error).
        norm_stats: "running" (jvf and pk in eval mode) or "batch" (train mode, as both
            released codes; see the module docstring for why it is not the default). None
            (default): "running"; "code-2024" fixes "batch" (another value is an error).
        precision: "auto" (the model's dtype; in float32, a jvf copy beyond float32's range
            is computed in float64 and scaled by a power of two 2**-k per round, so that
            round's scores are |dR/dp| * theta^2 / 2**k; float64 for the rest of the prune
            if the float32 scores are still not finite: the metadata then records
            "float64"), "float32" or "float64" (unscaled).
    """
    opts = ctx.options
    check_variant_options(opts)  # resolve_options did for prune; a hand-built context too
    rule = variant_rule(opts)
    # resolved once: the loop records the options dict, so the metadata names the values used
    opts["norm_stats"] = "batch" if rule.copies_train else "running"
    opts["leaky_gate"] = rule.leaky_gate
    refuse_unsupported_modules(ctx.model)
    if not ctx.data:
        raise ValueError("px needs data: pass data=[(inputs, targets), ...] (10 per class)")
    x0 = ctx.data[0][0]
    if not x0.is_floating_point():
        raise ValueError(
            f"px feeds the inputs to copies of the network with transformed weights (and jvf "
            f"x ** 2): they must be floating point images or features, got {x0.dtype}"
        )
    if ctx.options["classifier"] is not None:
        ctx.options["classifier"] = resolve_classifier(ctx.model, ctx.options["classifier"])
    precision = ctx.options["precision"]
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(precision, ctx.dtype)
    scores, finite = _px_once(ctx, dtype)
    if not finite and precision == "auto" and dtype != torch.float64:
        dtype = torch.float64  # the all-ones jvf network overflows float32 without norm layers
        scores, finite = _px_once(ctx, dtype)
        # later rounds start in float64 (sparser masks rarely bring float32 back in range);
        # the loop records the options dict, so the metadata says which precision was used
        ctx.options["precision"] = "float64"
    if not finite:
        hint = "" if dtype == torch.float64 else '; use precision="auto" or "float64"'
        raise FloatingPointError(f"px scores overflow in {dtype}{hint}")
    return scores
