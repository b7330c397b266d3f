"""PX, Path eXclusion (Iurada, Ciccone, Tommasi, CVPR 2024): NTK-SAP's data-driven successor.

PX bounds the trace of the NTK of a ReLU network by splitting it along input-output paths:
a data-dependent path-activation term (which paths the real data switches on) times a
data-free path kernel (the squared path values), and keeps the weights with the largest
share of that bound. Per round, on the class-balanced real batches (10 images per class):

    1. activation pass: the masked network, eval mode, on real x (B, *input_shape); every
       ReLU/LeakyReLU records its gate from its input u: g = [u > 0] (same shape as u)
    2. jvf ("path activation") pass: every parameter set to 1 (masks applied) except the
       norm layers and the classifier, which keep theta; each activation replaced by
       u -> u * g; eval mode; no gradient:       z1 = jvf(x ** 2)             (B, K)
    3. pk ("path kernel") pass: every parameter squared (masks applied) except the norm
       layers and the classifier; activations replaced by the identity; eval mode:
                                                 z2 = pk(ones_like(x))        (B, K)
    R = sum over batches of sum(z1 * z2)                                       scalar
    score_j = |dR/dp_j| * theta_j ** 2, with p the pk pass's parameter: theta ** 2 for
              every transformed tensor (i.e. |dR/d(theta^2)| * theta^2) and theta itself
              for the classifier (and a prunable norm parameter), exactly as the released
              code (`p1.grad.abs() * p.pow(2)` with the 'fc' weights left unsquared);
              zero where already pruned (the mask multiplies the pk parameter).
The defaults are the paper's: 100 rounds, exponential schedule, global scope (the loop's).

Which layer is what, by module type and structure (never by name):
    - norm layers: instances of BatchNorm*/SyncBatchNorm/InstanceNorm* (`_NormBase`),
      GroupNorm, LayerNorm, LocalResponseNorm (and RMSNorm where torch has it): their
      parameters keep theta in both copies and their buffers are not changed;
    - the classifier: the last Conv/Linear layer (or module holding a prunable tensor)
      whose output reaches the logits, found once by one probe forward that follows the
      autograd graph back from the logits (so the order of definition in __init__ and
      side branches that do not reach the output do not matter). Option `classifier`
      names it instead (a module, e.g. "fc", or one of its parameters, "fc.weight");
      every parameter below that module keeps theta;
    - everything else (Conv/Linear weights and biases, and any other parameter, e.g. a
      learnt scale) is transformed: 1 in jvf, theta ** 2 in pk.
Activations are intercepted on the loop's private copy only, without patching torch:
forward pre-/post-hooks on nn.ReLU and nn.LeakyReLU modules (the module's own F.relu call
is left alone; an inplace module runs on a copy so the pre-activation u survives), and a
`torch.overrides.TorchFunctionMode` for functional calls anywhere in the forward:
torch.relu, F.relu, Tensor.relu, relu_ and F.leaky_relu(_). Dropout (module or
functional) is the identity in all three passes.

LeakyReLU (slope a): a path's gate is the product of its units' derivatives, 1 or a. z1
sums the *squared* entries of the path-activation Jacobian (that is why x enters squared
and the weights as 1 while pk squares them), so the gate in jvf is g = 1 if u > 0 else
a ** 2 (`leaky_gate="squared"`, default); `leaky_gate="binary"` uses the 0/1 on/off
pattern u > 0, i.e. treats LeakyReLU as ReLU. (The released code has no consistent rule:
its hook turns leaky_relu into relu in the activation pass and never gates it in jvf.)

Works for ReLU/LeakyReLU networks only. Any other activation (GELU, SiLU, Tanh, Sigmoid,
ELU, Softmax, ... as a module or as a torch call in the forward) is a ValueError naming
it, raised before any score is computed, as is a model whose activation calls differ
between the passes (count, order or shape; e.g. a forward that branches on
`self.training`) or a model whose inputs are not floating point.

BatchNorm in jvf and pk (`norm_stats`): "running" (default) runs both copies in eval mode:
norm layers use their running statistics, at init an affine identity, so the copies are the
plain ReLU network whose paths the decomposition sums over (as SynFlow scores in eval mode).
"batch" (the spec and the released code) runs both in train mode, normalising with the
batch's statistics, with the gradient flowing through them. We do not make it the default
because on the networks this library exists for it measures nothing:
    - pk: the pk input is the same all-ones image for every b, so a train-mode BatchNorm's
      output has mean exactly beta over the positions of each image; after global average
      pooling (CIFAR ResNets, VGG-BN, ImageNet ResNets) z2 = classifier(sum of betas) does
      not depend on any weight before the last BatchNorm, nor (beta = 0 at init) on the
      classifier's weights. In exact arithmetic their scores are 0; in floats they are
      rounding noise (ResNet-20 and VGG-16-BN at init: float64 scores 1e7 to 1e10 times
      smaller than float32 ones) and the masks follow the noise: on CIFAR ResNet-20 at
      98.2 % the classifier keeps no weight and training stays at chance
      (benchmarks/quality_mnist5k.md, benchmarks/RESULTS.md).
    - jvf: the same argument over the batch: sum_b z1[b] after a train-mode BatchNorm and
      global pooling no longer depends on the data, so R = sum_b z1[b] * z2 (z2 equal for
      every b) loses the data-dependent term PX was designed to add.
With "batch", round 1 checks this on two images (float32 and float64 gradients of R) and
names the tensors concerned in a `PXRoundingWarning`. Networks without norm layers score the
same under both rules.

Deliberate differences from the released code (iurada/px-ntk-pruning, lib/pruners.py
class PX, commit ed6c40e):
    - norm layers and the classifier are chosen by module type and graph structure, not
      by the substrings 'bn' and 'fc' of parameter names. In the released ResNets the
      shortcut's BatchNorm ('shortcut.1') matches neither, so there its bias is set to 1
      in jvf (and its affine parameters squared in pk); here every norm layer keeps theta.
    - buffers are never transformed (the released code also fills or squares the running
      statistics of norm layers not named 'bn'; no effect in train mode) and the model's
      own running statistics are never updated: the train-mode passes write into
      throw-away copies of the buffers, so the activation pass of every batch sees the
      same (initial) statistics, as the released code's separate eval copy does.
    - activations are intercepted with hooks and a torch function mode on the private
      copy, not by replacing torch.nn.functional.relu globally, so torch.relu, Tensor.relu
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
    - BatchNorm in eval mode by default (norm_stats="running", above); the released rule
      is norm_stats="batch".
    - options the released code does not have: norm_stats, leaky_gate, classifier.
Kept as released: max- and average-pooling
run as they are in every pass (jvf and pk do not gate a max-pool by the activation pass's
choice).

Example:
    >>> import torch
    >>> from torch import nn
    >>> import ntksap
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> data = [(torch.randn(6, 1, 4, 4), torch.arange(3).repeat(2))]
    >>> masks = ntksap.prune(net, "px", density=0.2, data=data, rounds=3)
    >>> masks.num_kept == round(0.2 * (16 * 8 + 8 * 3)), masks.metadata["options"]["classifier"]
    (True, '3')
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
#: Norm statistics of the jvf and pk passes: "running" = eval mode (default: the running
#: statistics; BatchNorm at init is then an affine identity), "batch" = train mode (as
#: released; degenerate before global average pooling, see the module docstring).
NORM_STATS = ("batch", "running")

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
    "mode, jvf and pk in eval mode (train mode with norm_stats='batch'); a forward that branches "
    "on self.training or on values cannot be scored by px"
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


def kept_parameters(model: nn.Module, classifier: str) -> set[str]:
    """Names of the parameters that keep theta in both copies: every norm layer's own
    parameters and every parameter below the classifier module."""
    kept_ids = {id(p) for p in model.get_submodule(classifier).parameters()}
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
    the classifier, and check that the jvf/pk mode calls the same activations as eval."""
    model, dtype, opts = ctx.model, x.dtype, ctx.options
    model.eval()
    with intercept(model, RECORD) as rec:
        found = find_classifier(ctx, x, {**real, **_buffers(model, dtype)})
    if opts["classifier"] is None:
        opts["classifier"] = found  # resolved once; the loop records the options dict
    model.train(opts["norm_stats"] == "batch")
    with torch.no_grad(), intercept(model, IDENTITY, expected=rec.sites):
        ctx.forward(real, x, **_buffers(model, dtype))


@dataclass
class _Copies:
    """The parameters of the three passes of one round, in one dtype (name -> tensor)."""

    theta: dict[str, torch.Tensor]  # every parameter of the model
    masks: dict[str, torch.Tensor]  # prunable name -> 0/1 mask
    real: dict[str, torch.Tensor]  # theta * m: the network itself (activation pass)
    ones: dict[str, torch.Tensor]  # jvf: 1 * m, theta (* m) where kept
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
    ones = {
        n: real[n] if n in kept else _masked(masks, n, torch.ones_like(t)) for n, t in theta.items()
    }
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

    The activation pass runs the masked network in eval mode on x (in x's dtype) and records
    the gates; the jvf pass applies them to the all-ones copy fed x**2, in jvf.dtype."""
    raw, sites = _z1_raw(ctx, c, x, jvf)
    return (raw * jvf.scale if jvf.scale != 1.0 else raw).to(x.dtype), sites  # 2**k: exact


def _z1_raw(ctx: ScoreContext, c: _Copies, x: torch.Tensor, jvf: _Jvf) -> tuple[torch.Tensor, list]:
    """z1 of batch x in jvf.dtype, unscaled, and the activation sites (see `_z1`)."""
    model, opts, dtype = ctx.model, ctx.options, x.dtype
    with torch.no_grad():
        model.eval()
        with intercept(model, RECORD, leaky_gate=opts["leaky_gate"]) as rec:
            ctx.forward(c.real, x, **_buffers(model, dtype))
        model.train(opts["norm_stats"] == "batch")  # jvf and pk: batch statistics
        with intercept(model, GATE, expected=rec.sites, gates=rec.gates):
            xj = x.to(jvf.dtype).pow(2)  # the gates stay in x's dtype: u * g promotes
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
    model, dtype = ctx.model, x.dtype
    z1_, sites = z1 if z1 is not None else _z1(ctx, c, x, jvf or _Jvf(c.ones, dtype))
    model.train(ctx.options["norm_stats"] == "batch")
    pk = {n: _masked(c.masks, n, t) for n, t in c.pk_values.items()}  # fresh graph per batch
    with intercept(model, IDENTITY, expected=sites):
        z2 = ctx.forward(pk, torch.ones_like(x), **_buffers(model, dtype))  # (B, K)
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
            "norm_stats='batch' (as released) the pk copy sees the same all-ones image B "
            "times, and a train-mode BatchNorm followed by global average pooling hides every "
            "weight before it; norm_stats='running' (eval-mode norm layers) scores them",
            PXRoundingWarning,
            stacklevel=2,
        )


def _px_once(ctx: ScoreContext, dtype: torch.dtype) -> tuple[Scores, bool]:
    opts = ctx.options
    assert ctx.data is not None
    if ctx.round == 1 or opts["classifier"] is None:
        probe = ctx.data[0][0][:2].to(dtype)  # (2, *input_shape)
        _probe(ctx, probe, _theta_and_real(ctx, dtype)[2])
    kept = kept_parameters(ctx.model, opts["classifier"])
    norms = any(isinstance(m, NORM_TYPES) for m in ctx.model.modules())
    if ctx.round == 1 and opts["norm_stats"] == "batch" and norms:
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
            "classifier",
            None,
            str,
            "module (or parameter) left as theta in both copies; auto: the last Conv/Linear "
            "layer whose output reaches the logits",
            allow_none=True,
        ),
        Option(
            "leaky_gate",
            "squared",
            str,
            "jvf gate of a LeakyReLU with negative input: squared = slope**2 (the squared "
            "path gate), binary = 0 (on/off, as a ReLU)",
            choices=LEAKY_GATES,
        ),
        Option(
            "norm_stats",
            "running",
            str,
            "norm statistics in the jvf and pk copies: running = eval mode (BatchNorm at "
            "init an affine identity), batch = train mode (as released: its scores are "
            "rounding noise before a global average pool)",
            choices=NORM_STATS,
        ),
        PRECISION_OPTION,
    ],
    summary="Path eXclusion: data-driven NTK-trace path bound (Iurada 2024, ReLU nets)",
)
def px_scores(ctx: ScoreContext) -> Scores:
    """|dR/dp| * theta^2, R = sum(jvf(x**2) * pk(1)); T rounds (default 100).

    Options:
        classifier: the module (e.g. "fc") or parameter ("fc.weight") whose parameters are
            left as theta in both copies, as the released code leaves its 'fc'. None
            (default): the last Conv/Linear layer whose output reaches the logits.
        leaky_gate: "squared" (default: a LeakyReLU's jvf gate is slope**2 for negative
            inputs, the squared path gate) or "binary" (0/1, as a ReLU).
        norm_stats: "running" (default: jvf and pk in eval mode) or "batch" (train mode,
            as the released code; see the module docstring for why it is not the default).
        precision: "auto" (the model's dtype; in float32, a jvf copy beyond float32's range
            is computed in float64 and scaled by a power of two 2**-k per round, so that
            round's scores are |dR/dp| * theta^2 / 2**k; float64 for the rest of the prune
            if the float32 scores are still not finite: the metadata then records
            "float64"), "float32" or "float64" (unscaled).
    """
    refuse_unsupported_modules(ctx.model)
    if not ctx.data:
        raise ValueError("px needs data: pass data=[(inputs, targets), ...] (10 per class)")
    x0 = ctx.data[0][0]
    if not x0.is_floating_point():
        raise ValueError(
            f"px squares the inputs (jvf is fed x ** 2): they must be floating point images "
            f"or features, got {x0.dtype}"
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
