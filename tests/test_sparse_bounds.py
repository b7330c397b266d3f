"""ntksap.sparse never reads out of bounds, checks its input as torch's modules do, and
lets NaN / inf through exactly as the dense masked layers do.

- Forged CSR arrays (row pointers past nnz, decreasing or not starting at 0, columns past
  the fan-in or negative, lengths or shapes that disagree) are a ValueError naming the
  array, the rule and the offending entry when a layer is built; written into a built
  layer (in place, after its first call), into a chain, or handed to the C++ functions
  directly, a RuntimeError; never a crash. These run in ONE child process, so that a
  segfault fails the cases it reaches instead of killing pytest.
- Inputs of the wrong width / channels / rank / dtype / device / size raise RuntimeErrors
  worded like torch's own (the same numbers, torch's own phrase where it has one), in
  every mode: the C++ kernels, the pure-torch fallback and dense mode.
- NaN and inf in the input, in a residual or in a bias come out where torch's own modules
  with the masked dense weights put them (a sparse product skips zero weights; the dense
  one gives 0 * NaN = 0 * inf = NaN; the fused ReLU keeps NaN).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ntksap
import ntksap.sparse as sp
from ntksap.sparse import layers
from ntksap.sparse.layers import SparseChain, SparseConv2d, SparseLinear, to_csr

# Errors about the input are RuntimeErrors, as torch's modules raise, and also ValueErrors
# (a size that does not fit: SHAPE) or TypeErrors (dtype, device, rank:
# KIND), as ntksap's own input checks raise.
SHAPE, KIND = ValueError, TypeError

# -- forged arrays, in a child process ------------------------------------------------------

# The child builds every case, prints one JSON line per case as soon as it is done (so the
# cases before a crash are reported) and exits 0. Shapes: Linear (6, 10), conv (8, 4, 3, 3)
# so the fan-ins are 10 and 4 * 3 * 3 = 36.
CHILD = textwrap.dedent(
    r'''
    import json, sys, traceback
    import torch
    import torch.nn.functional as F
    from ntksap.sparse import _ext
    from ntksap.sparse.layers import SparseChain, SparseConv2d, SparseLinear, to_csr

    gen = torch.Generator().manual_seed(0)
    W_LIN = torch.randn(6, 10, generator=gen) * (torch.rand(6, 10, generator=gen) < 0.5)
    W_CONV = torch.randn(8, 4, 3, 3, generator=gen) * (torch.rand(8, 4, 3, 3, generator=gen) < 0.3)
    B_LIN, B_CONV = torch.randn(6, generator=gen), torch.randn(8, generator=gen)
    X_LIN, X_CONV = torch.randn(3, 10, generator=gen), torch.randn(2, 4, 6, 6, generator=gen)
    EXT = _ext.extension()


    def forge(kind, what):
        """(weight_shape, rowptr, col_idx, values, bias) of a valid layer, one part forged."""
        w, b = (W_LIN, B_LIN) if kind == "linear" else (W_CONV, B_CONV)
        shape = tuple(w.shape)
        rp, col, val = (t.clone() for t in to_csr(w))
        nnz = col.numel()
        if what == "rowptr_past_nnz":
            rp[-1] = nnz + 10**6
        elif what == "rowptr_decreasing":
            i = 1 + int((rp[2:] > rp[1:-1]).nonzero()[0, 0])  # rp[i] < rp[i + 1], i >= 1
            rp[i], rp[i + 1] = int(rp[i + 1]), int(rp[i])
        elif what == "rowptr_start":
            rp[0] = -(10**6)
        elif what == "col_past":
            col[0] = shape[1] * (1 if kind == "linear" else 9) + 10**6
        elif what == "col_negative":
            col[0] = -(10**6)
        elif what == "values_short":
            val = val[:-1].clone()
        elif what == "shape_rows":
            shape = (shape[0] + 1, *shape[1:])
        elif what == "shape_fanin":
            shape = (shape[0], 3) if kind == "linear" else (shape[0], 1, 3, 3)
        elif what == "bias_short":
            b = b[:3].clone()
        return shape, rp, col, val, b


    def build(kind, what):
        shape, rp, col, val, b = forge(kind, what)
        if kind == "linear":
            return SparseLinear(shape, rp, col, val, b, relu=True), X_LIN
        return SparseConv2d(shape, rp, col, val, b, padding=1, relu=True), X_CONV


    def chain():
        layers = [
            SparseConv2d.from_dense(W_CONV, B_CONV, padding=1, relu=True),
            SparseConv2d.from_dense(torch.randn(4, 8, 3, 3, generator=gen)
                                    * (torch.rand(4, 8, 3, 3, generator=gen) < 0.3),
                                    None, padding=1, relu=True, residual=True),
        ]
        return SparseChain(layers, [(0, -1), (1, 0)], output=2)


    def case(name):
        kind, _, what = name.partition(":")
        if kind in ("linear", "conv"):  # forged arrays given to the constructor
            layer, x = build(kind, what)
            layer(x)
            return {}
        if EXT is None:
            return {"skip": "no C++ kernels"}
        if kind == "linear_inplace":  # written after the first call
            layer = SparseLinear.from_dense(W_LIN, B_LIN, relu=True)
            layer(X_LIN)
            if what == "col":
                layer.col_idx[0] = 10**6
            else:
                layer.rowptr[-1] = 10**6
            layer(X_LIN)
            return {}
        if kind == "conv_inplace":
            layer = SparseConv2d.from_dense(W_CONV, B_CONV, padding=1, relu=True)
            layer(X_CONV)
            if what == "col":
                layer.col_idx[0] = -(10**6)
            else:
                i = int((layer.rowptr[1:] > layer.rowptr[:-1]).nonzero()[0, 0])
                layer.rowptr[i + 1] = -(10**6)
            layer(X_CONV)
            return {}
        if kind == "chain":
            ch = chain()
            if what == "reassigned_rowptr":  # a forged tensor in place of a buffer, before use
                rp = ch.layers[1].rowptr.clone()
                rp[0] = 10**6
                ch.layers[1].rowptr = rp
                ch(X_CONV)
                return {}
            ch(X_CONV)
            if what == "rowptr":
                ch.layers[1].rowptr[-1] = 10**6
            elif what == "col":
                ch.layers[0].col_idx[0] = -(10**6)
            ch(X_CONV)
            return {}
        if kind == "direct":  # the extension's functions, called with bad arrays
            shape, rp, col, val, b = forge("conv", "rowptr_past_nnz")
            e = torch.empty(0)
            if what == "conv_rowptr":
                EXT.sparse_conv2d(X_CONV, rp, col, val, b, 4, 3, 3, 1, 1, e, True, e, False)
            elif what == "conv_channels":
                rp, col, val = to_csr(W_CONV)
                EXT.sparse_conv2d(X_CONV[:, :3], rp, col, val, b, 4, 3, 3, 1, 1, e, True, e, False)
            elif what == "conv_meta":
                rp, col, val = to_csr(W_CONV)
                x = torch.empty(2, 4, 6, 6, device="meta")
                EXT.sparse_conv2d(x, rp, col, val, b, 4, 3, 3, 1, 1, e, True, e, False)
            elif what == "conv_empty_rowptr":
                EXT.sparse_conv2d(X_CONV, torch.zeros(0, dtype=torch.int32), col, val, e,
                                  4, 3, 3, 1, 1, e, True, e, False)
            elif what == "conv_padded_lie":
                # strides of a padded buffer's interior, but no border before it in storage:
                # the kernel must copy instead of reading in place (before the storage)
                rp, col, val = to_csr(W_CONV)
                n, c, h, w_, p = 2, 4, 6, 6, 1
                wp, plane = w_ + 2 * p, (h + 2 * p + 1) * (w_ + 2 * p)
                x = torch.randn(n * c * plane).as_strided((n, c, h, w_), (c * plane, plane, wp, 1))
                y = EXT.sparse_conv2d(x, rp, col, val, b, 4, 3, 3, 1, p, e, False, e, True)[0]
                ref = F.conv2d(x, W_CONV, b, padding=p)
                return {"max_err": float((y - ref).abs().max())}
            elif what == "linear_col":
                shape, rp, col, val, b = forge("linear", "col_past")
                EXT.sparse_linear(X_LIN, rp, col, val, b, 10, True)
            elif what == "linear_width":
                rp, col, val = to_csr(W_LIN)
                EXT.sparse_linear(X_LIN[:, :4], rp, col, val, B_LIN, 10, True)
            elif what == "chain_rowptr":
                EXT.SparseChainExec([rp], [col], [val], [b], [[0, -1, 8, 4, 3, 3, 1, 1, 1]], 1)
            return {}
        if kind == "width":  # Linear(1000, 50) called with 10 features
            w = torch.randn(50, 1000, generator=gen) * (torch.rand(50, 1000, generator=gen) < 0.1)
            layer = SparseLinear.from_dense(w, None)
            layer(torch.randn(2, 10))
            return {}
        raise KeyError(name)


    for name in sys.argv[1:]:
        try:
            out = {"case": name, "result": "ok", **case(name)}
        except Exception as exc:
            out = {"case": name, "result": "raised", "type": type(exc).__name__,
                   "mro": [k.__name__ for k in type(exc).__mro__], "message": str(exc)}
        print(json.dumps(out), flush=True)
    '''
)

# case -> (exception class the result must be an instance of, words of the message);
# None: must run and give the right result
FORGED: dict[str, tuple[str | None, list[str]]] = {
    "linear:rowptr_past_nnz": ("ValueError", ["rowptr[-1] = 100", "must equal nnz"]),
    "linear:rowptr_decreasing": ("ValueError", ["rowptr must never decrease"]),
    "linear:rowptr_start": ("ValueError", ["rowptr[0] = -1000000, must be 0"]),
    "linear:col_past": ("ValueError", ["col_idx[0] = 1000010 is outside [0, 10) (in_features)"]),
    "linear:col_negative": ("ValueError", ["col_idx[0] = -1000000 is outside [0, 10)"]),
    "linear:values_short": ("ValueError", ["values has", "one value per column index"]),
    "linear:shape_rows": ("ValueError", ["rowptr must have out + 1 = 8 entries"]),
    "linear:shape_fanin": ("ValueError", ["is outside [0, 3) (in_features)"]),
    "linear:bias_short": ("ValueError", ["bias must be", "of the 6 outputs"]),
    "conv:rowptr_past_nnz": ("ValueError", ["rowptr[-1] = 100", "must equal nnz"]),
    "conv:rowptr_decreasing": ("ValueError", ["rowptr must never decrease"]),
    "conv:rowptr_start": ("ValueError", ["rowptr[0] = -1000000, must be 0"]),
    "conv:col_past": (
        "ValueError",
        ["col_idx[0] = 1000036 is outside [0, 36) (in_channels/groups * kh * kw = 4 * 3 * 3)"],
    ),
    "conv:col_negative": ("ValueError", ["col_idx[0] = -1000000 is outside [0, 36)"]),
    "conv:values_short": ("ValueError", ["values has"]),
    "conv:shape_rows": ("ValueError", ["rowptr must have out + 1 = 10 entries"]),
    "conv:shape_fanin": ("ValueError", ["is outside [0, 9) (in_channels/groups * kh * kw"]),
    "conv:bias_short": ("ValueError", ["bias must be", "of the 8 outputs"]),
    "linear_inplace:col": ("RuntimeError", ["col_idx[0] = 1000000 is outside [0, 10)"]),
    "linear_inplace:rowptr": ("RuntimeError", ["rowptr[-1] = 1000000 must equal nnz"]),
    "conv_inplace:col": ("RuntimeError", ["col_idx[0] = -1000000 is outside [0, 36)"]),
    "conv_inplace:rowptr": ("RuntimeError", ["rowptr decreases at index"]),
    "chain:rowptr": ("RuntimeError", ["op 1: rowptr[-1] = 1000000 must equal nnz"]),
    "chain:col": ("RuntimeError", ["op 0: col_idx[0] = -1000000 is outside [0, 36)"]),
    "chain:reassigned_rowptr": ("RuntimeError", ["op 1: rowptr[0] = 1000000, must be 0"]),
    "direct:conv_rowptr": ("RuntimeError", ["must equal nnz"]),
    "direct:conv_channels": ("RuntimeError", ["x has 3 channels, the weight expects 4"]),
    "direct:conv_meta": ("RuntimeError", ["x must be a CPU tensor"]),
    "direct:conv_empty_rowptr": ("RuntimeError", ["rowptr must be 1-D with >= 1 entry"]),
    "direct:conv_padded_lie": (None, []),
    "direct:linear_col": ("RuntimeError", ["col_idx[0] = 1000010 is outside [0, 10)"]),
    "direct:linear_width": ("RuntimeError", ["x has 4 features, the weight expects 10"]),
    "direct:chain_rowptr": ("RuntimeError", ["op 0: rowptr[-1] =", "must equal nnz"]),
    "width:linear_1000_called_with_10": (
        "RuntimeError",
        ["mat1 and mat2 shapes cannot be multiplied (2x10 and 1000x50)", "in_features=1000"],
    ),
}


@pytest.fixture(scope="module")
def forged_results(tmp_path_factory) -> dict[str, dict]:
    """Every FORGED case in a child process: results by case. A child that dies (a
    segfault) marks the case it was running as crashed and a new child runs the rest, so
    each case gets its own verdict (one child when nothing crashes)."""
    script = tmp_path_factory.mktemp("forged") / "child.py"
    script.write_text(CHILD)
    results: dict[str, dict] = {}
    left = list(FORGED)
    while left:
        proc = subprocess.run(
            [sys.executable, str(script), *left],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                results[row["case"]] = row
        left = [c for c in left if c not in results]
        if left:  # the child died in left[0]
            results[left[0]] = {
                "case": left[0],
                "result": "crashed",
                "ended": f"exit status {proc.returncode}; stderr: {proc.stderr[-600:]}",
            }
            left = left[1:]
    return results


@pytest.mark.parametrize("name", list(FORGED))
def test_forged_arrays_raise_and_never_crash(name, forged_results):
    row = forged_results[name]
    assert row["result"] != "crashed", f"{name} crashed the process: {row['ended']}"
    if "skip" in row:
        pytest.skip(row["skip"])
    error, words = FORGED[name]
    if error is None:
        assert row["result"] == "ok", row
        assert row["max_err"] <= 1e-4, row
        return
    assert row["result"] == "raised", f"{name} ran without an error: {row}"
    assert error in row["mro"], row
    for word in words:
        assert word in row["message"], (word, row["message"])


def test_check_csr_names_the_first_bad_entry():
    """check_csr (the function the loader calls too): every rule, with the offending index
    and value, checked against hand-made arrays."""
    rp = torch.tensor([0, 2, 3, 5], dtype=torch.int32)
    col = torch.tensor([0, 4, 2, 1, 3], dtype=torch.int32)
    val = torch.ones(5)
    check_csr = layers.check_csr
    check_csr(rp, col, val, (3, 5))
    check_csr(rp, col, val, (3, 5, 1, 1))  # a conv's (out, in/groups, kh, kw)
    bad = [
        ((rp.long(), col, val, (3, 5)), "rowptr must be torch.int32, got torch.int64"),
        ((rp, col.double(), val, (3, 5)), "col_idx must be torch.int32"),
        ((rp, col, val.half(), (3, 5)), "values must be torch.float32"),
        ((rp.view(2, 2), col, val, (3, 5)), "rowptr must be 1-D, got shape [2, 2]"),
        ((rp, col, val, (3, 0)), "weight_shape[1] must be a positive int, got 0"),
        ((rp, col, val, (3, 5, 1)), "weight_shape must be (out, in) or"),
        ((rp, col, val, (2, 5)), "rowptr must have out + 1 = 3 entries"),
        ((rp, col, val[:4], (3, 5)), "values has 4 entries and col_idx 5"),
        ((rp.clone().index_fill_(0, torch.tensor([2]), 1), col, val, (3, 5)),
         "rowptr must never decrease: rowptr[1] = 2 > rowptr[2] = 1"),
        ((rp + 1, col, val, (3, 5)), "rowptr[0] = 1, must be 0"),
        ((rp.clone().index_fill_(0, torch.tensor([3]), 4), col, val, (3, 5)),
         "rowptr[-1] = 4 must equal nnz = len(col_idx) = 5"),
        ((rp, col, val, (3, 4)), "col_idx[1] = 4 is outside [0, 4) (in_features)"),
        ((rp, col.clone().index_fill_(0, torch.tensor([3]), -2), val, (3, 5)),
         "col_idx[3] = -2 is outside [0, 5)"),
        ((rp, col.clone().index_fill_(0, torch.tensor([1]), 0), val, (3, 5)),
         "row 0 has col_idx[1] = 0 after col_idx[0] = 0"),  # a duplicate
        ((rp, col.clone().index_fill_(0, torch.tensor([4]), 0), val, (3, 5)),
         "row 2 has col_idx[4] = 0 after col_idx[3] = 1"),  # unsorted
        ((rp, col, val, (3, 1, 2, 2)),
         "col_idx[1] = 4 is outside [0, 4) (in_channels/groups * kh * kw = 1 * 2 * 2)"),
        ((rp, col.to("meta"), val, (3, 5)), "col_idx must be a dense CPU tensor, got one on meta"),
    ]  # fmt: skip
    for args, words in bad:
        with pytest.raises(ValueError) as info:
            check_csr(*args)
        assert words in str(info.value), (words, str(info.value))


def test_constructors_check_geometry_and_flags():
    w = torch.randn(8, 4, 3, 3)
    rp, col, val = to_csr(w)
    cases = [
        ({"stride": 0}, "stride must be an int >= 1"),
        ({"stride": (1, 2, 3)}, "stride must be an int >= 1 or a pair"),
        ({"padding": -1}, "padding must be an int >= 0"),
        ({"padding": "full"}, "padding must be 'same', 'valid' or ints >= 0"),
        ({"padding": "same", "stride": 2}, "padding='same' is not supported for strided"),
        ({"dilation": 0}, "dilation must be an int >= 1"),
        ({"groups": 0}, "groups must be a positive int"),
        ({"groups": 3}, "groups=3 must divide the 8 output channels"),
        ({"relu": "yes"}, "relu must be True or False"),
        ({"mode": "fast"}, "mode must be one of"),
    ]
    for kwargs, words in cases:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            SparseConv2d((8, 4, 3, 3), rp, col, val, **kwargs)
    with pytest.raises(ValueError, match=r"needs weight_shape \(out, in/groups, kh, kw\)"):
        SparseConv2d((8, 36), rp, col, val)
    with pytest.raises(ValueError, match=r"needs weight_shape \(out, in\)"):
        SparseLinear((8, 4, 3, 3), rp, col, val)
    with pytest.raises(ValueError, match=r"dense_weight must have weight_shape \[8, 4, 3, 3\]"):
        SparseConv2d((8, 4, 3, 3), rp, col, val, dense_weight=torch.zeros(8, 4, 3, 2))
    # a chain whose layers do not fit together
    a = SparseConv2d.from_dense(torch.randn(8, 4, 3, 3), None, padding=1)
    b = SparseConv2d.from_dense(torch.randn(8, 16, 3, 3), None, padding=1)
    with pytest.raises(ValueError, match=r"reads value 1 \(8 channels\) but its weight"):
        SparseChain([a, b], [(0, -1), (1, -1)], output=2)
    c = SparseConv2d.from_dense(torch.randn(6, 8, 3, 3), None, padding=1, residual=True)
    with pytest.raises(ValueError, match=r"adds value 1 \(8 channels\) to its 6 output"):
        SparseChain([a, c], [(0, -1), (1, 1)], output=2)
    with pytest.raises(ValueError, match=r"chain step 0 must be a pair of ints"):
        SparseChain([a], [(0.0, -1)], output=1)


# -- wrong inputs: errors like torch's, in every mode ----------------------------------------


def _modes():
    """(label, context manager factory, layer mode) for every way a layer computes."""
    out = [("torch fallback", sp.extension_disabled, "sparse"), ("dense", _null, "dense")]
    if sp.extension_available():
        out.insert(0, ("C++", _null, "sparse"))
    return out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _raises_like_torch(fn, torch_fn, kind, words, torch_words=()):
    """fn raises a RuntimeError, as torch's module does (torch_fn must raise one), that is
    also a `kind`, with `words` and with the phrases of torch's own message given in
    `torch_words`."""
    with pytest.raises(RuntimeError) as theirs:
        torch_fn()
    with pytest.raises(RuntimeError) as ours:
        fn()
    assert isinstance(ours.value, kind), type(ours.value)
    for w in [*words, *torch_words]:
        assert w in str(ours.value), (w, str(ours.value))
    for w in torch_words:
        assert w in str(theirs.value), (w, str(theirs.value))


def test_conv_inputs_are_checked_like_torch():
    """A conv converted for 1 channel refuses 3, 4 and 0 channels (torch's phrase), other
    ranks, float64, a meta tensor, a map smaller than the kernel and a wrong residual, in
    the C++, fallback and dense modes."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3, padding=0)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.5)
    for _label, ctx, mode in _modes():
        layer = SparseConv2d.from_dense(conv.weight, conv.bias, mode=mode, relu=True)
        layer.source_name = "features.0"
        with ctx(), torch.no_grad():
            for c in (3, 4, 0):
                x = torch.randn(2, c, 8, 8)
                phrase = f"expected input[2, {c}, 8, 8] to have 1 channels, but got {c} channels"
                _raises_like_torch(
                    lambda x=x, layer=layer: layer(x),
                    lambda x=x: conv(x),
                    SHAPE,
                    ["SparseConv2d 'features.0'", "weight of size [4, 1, 3, 3]"],
                    [phrase],
                )
            for shape in [(2, 8), (1, 1, 1, 8, 8)]:
                x = torch.randn(shape)
                _raises_like_torch(
                    lambda x=x, layer=layer: layer(x),
                    lambda x=x: conv(x),
                    KIND,
                    [f"expected a 4-D (N, C, H, W) input, got input of size {list(shape)}"],
                )
            x = torch.randn(2, 1, 2, 8)
            _raises_like_torch(
                lambda x=x, layer=layer: layer(x),
                lambda x=x: conv(x),
                SHAPE,
                [f"input {list(x.shape)}"],
                ["Kernel size can't be greater than actual input size"],
            )
            x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
            _raises_like_torch(
                lambda x=x, layer=layer: layer(x),
                lambda x=x: conv(x),
                KIND,
                ["float32", "float64"],
            )
            with pytest.raises(KIND, match="runs on the CPU, got input on meta"):
                layer(torch.empty(2, 1, 8, 8, device="meta"))
        res_layer = SparseConv2d.from_dense(conv.weight, conv.bias, mode=mode, residual=True)
        with ctx(), torch.no_grad():
            x = torch.randn(2, 1, 8, 8)
            with pytest.raises(SHAPE, match=r"residual has shape \[1, 4, 1, 1\]"):
                res_layer(x, torch.zeros(1, 4, 1, 1))  # would broadcast in dense mode
            with pytest.raises(KIND, match=r"residual of dtype torch\.float64"):
                res_layer(x, torch.zeros(2, 4, 6, 6, dtype=torch.float64))
            with pytest.raises(KIND, match="called without a residual"):
                res_layer(x)


def test_linear_inputs_are_checked_like_torch():
    torch.manual_seed(0)
    lin = nn.Linear(1000, 50)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) < 0.1)
    for _label, ctx, mode in _modes():
        layer = SparseLinear.from_dense(lin.weight, lin.bias, mode=mode)
        with ctx(), torch.no_grad():
            for shape, rows in [((2, 10), 2), ((3, 4, 999), 12), ((1001,), 1)]:
                x = torch.randn(shape)
                words = f"({rows}x{shape[-1]} and 1000x50)"
                _raises_like_torch(
                    lambda x=x, layer=layer: layer(x),
                    lambda x=x: lin(x),
                    SHAPE,
                    [words, "in_features=1000"],
                    ["mat1 and mat2 shapes cannot be multiplied"],
                )
            _raises_like_torch(
                lambda layer=layer: layer(torch.tensor(1.0)),
                lambda: lin(torch.tensor(1.0)),
                KIND,
                ["at least 1-D"],
            )
            _raises_like_torch(
                lambda layer=layer: layer(torch.randn(2, 1000, dtype=torch.float64)),
                lambda: lin(torch.randn(2, 1000, dtype=torch.float64)),
                KIND,
                ["float32"],
            )
            with pytest.raises(KIND, match=r"must be a torch\.Tensor, got list"):
                layer([0.0] * 1000)
            # what torch takes, the layer takes: a 1-D input, extra leading dims
            for shape in [(1000,), (2, 3, 1000)]:
                x = torch.randn(shape)
                torch.testing.assert_close(layer(x), lin(x), rtol=1e-4, atol=1e-4)


def _small_chain(seed=0):
    gen = torch.Generator().manual_seed(seed)
    convs = [nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
             nn.Conv2d(8, 6, 3, stride=2, padding=1)]  # fmt: skip
    with torch.no_grad():
        for c in convs:
            c.weight.copy_(torch.randn(c.weight.shape, generator=gen))
            c.weight.mul_(torch.rand(c.weight.shape, generator=gen) < 0.3)
            c.bias.copy_(torch.randn(c.bias.shape, generator=gen))
    layers = [
        SparseConv2d.from_dense(convs[0].weight, convs[0].bias, padding=1, relu=True),
        SparseConv2d.from_dense(convs[1].weight, convs[1].bias, padding=1, relu=True,
                                residual=True),
        SparseConv2d.from_dense(convs[2].weight, convs[2].bias, stride=2, padding=1),
    ]  # fmt: skip
    chain = SparseChain(layers, [(0, -1), (1, 1), (2, -1)], output=3)

    def reference(x):
        a = convs[0](x).relu()
        b = (convs[1](a) + a).relu()
        return convs[2](b)

    return chain, reference, convs


def test_chain_inputs_are_checked_like_torch():
    chain, reference, _ = _small_chain()
    for mode in ["fused", "layers"]:
        chain.set_mode(mode)
        for ctx in [_null, sp.extension_disabled]:
            with ctx(), torch.no_grad():
                for c in (1, 4, 0):
                    x = torch.randn(2, c, 8, 8)
                    _raises_like_torch(
                        lambda x=x: chain(x),
                        lambda x=x: reference(x),
                        SHAPE,
                        [],
                        [f"expected input[2, {c}, 8, 8] to have 3 channels, but got {c} channels"],
                    )
                for shape in [(3, 8, 8), (2, 3, 8)]:  # (C, H, W): torch would take it unbatched
                    with pytest.raises(KIND, match=r"\(N, C, H, W\) tensor, got input"):
                        chain(torch.randn(shape))
                with pytest.raises(KIND, match="float32"):
                    chain(torch.randn(2, 3, 8, 8, dtype=torch.float64))
                with pytest.raises(KIND, match="CPU"):
                    chain(torch.empty(2, 3, 8, 8, device="meta"))


def test_sparse_model_checks_dtype_and_device():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    masks = ntksap.prune(net, "random", density=0.5, seed=0)
    x = torch.randn(2, 3, 8, 8)
    fast = sp.convert(net, masks, example_input=x, autotune=False)
    with pytest.raises(KIND, match="SparseModel computes in float32, got input 0"):
        fast(x.double())
    with pytest.raises(KIND, match="SparseModel runs on the CPU, got input 0 on meta"):
        fast(torch.empty(2, 3, 8, 8, device="meta"))
    with pytest.raises(KIND, match="SparseModel runs on dense CPU tensors, got input 0"):
        fast(torch.zeros(2, 3, dtype=torch.long).to_sparse())
    with pytest.raises(SHAPE, match="to have 3 channels, but got 2 channels"):
        fast(torch.randn(2, 2, 8, 8))


# -- NaN / inf: where the dense masked model puts them ---------------------------------------


def assert_same_nonfinite(got: torch.Tensor, want: torch.Tensor) -> None:
    """NaN where `want` has NaN, inf of the same sign where it has inf, close elsewhere."""
    assert got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan()), (
        f"NaN at {int(got.isnan().sum())} places, the dense model at {int(want.isnan().sum())}"
    )
    assert torch.equal(got.isinf(), want.isinf())
    assert torch.equal(got[got.isinf()], want[want.isinf()])
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-4)


def _poison(x: torch.Tensor, seed: int) -> torch.Tensor:
    """x with a few NaN, +inf and -inf entries (different images and channels)."""
    gen = torch.Generator().manual_seed(seed)
    x = x.clone()
    flat = x.view(-1)
    idx = torch.randperm(flat.numel(), generator=gen)[:6]
    flat[idx[:2]] = float("nan")
    flat[idx[2:4]] = float("inf")
    flat[idx[4:]] = float("-inf")
    return x


@pytest.mark.parametrize(
    ("n", "c", "o", "k", "s", "p"),
    [(2, 4, 6, 3, 1, 1), (3, 5, 4, 3, 2, 1), (2, 4, 6, 1, 2, 0), (1, 3, 5, 3, 1, 0)],
)
def test_conv_nan_and_inf_as_dense(n, c, o, k, s, p):
    """Input, residual and bias poisoned in turn; fused ReLU and residual; every mode."""
    gen = torch.Generator().manual_seed(n * 100 + k * 10 + s)
    conv = nn.Conv2d(c, o, k, stride=s, padding=p)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        conv.weight.mul_(torch.rand(conv.weight.shape, generator=gen) < 0.3)
        conv.weight[0] = 0  # a dead output channel: only the dense zeros reach it
    x = torch.randn(n, c, 9, 9, generator=gen)
    ho = (9 + 2 * p - k) // s + 1
    res = torch.randn(n, o, ho, ho, generator=gen)
    for _label, ctx, mode in _modes():
        with ctx(), torch.no_grad():
            plain = SparseConv2d.from_dense(conv.weight, conv.bias, stride=s, padding=p, mode=mode)
            fused = SparseConv2d.from_dense(
                conv.weight, conv.bias, stride=s, padding=p, relu=True, residual=True, mode=mode
            )
            xp = _poison(x, 1)
            assert_same_nonfinite(plain(xp), conv(xp))
            assert_same_nonfinite(fused(xp, res), (conv(xp) + res).relu())
            rp = _poison(res, 2)  # through the residual epilogue and the fused ReLU
            assert_same_nonfinite(fused(x, rp), (conv(x) + rp).relu())
            bias = conv.bias.clone()
            bias[1] = float("nan")
            nan_bias = SparseConv2d.from_dense(
                conv.weight, bias, stride=s, padding=p, relu=True, mode=mode
            )
            ref = F.conv2d(x, conv.weight, bias, s, p).relu()
            assert_same_nonfinite(nan_bias(x), ref)


@pytest.mark.parametrize("n", [1, 3, 9])  # the C++ kernel: per-sample path below 8, batched above
def test_linear_nan_and_inf_as_dense(n):
    gen = torch.Generator().manual_seed(n)
    lin = nn.Linear(40, 12)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen))
        lin.weight.mul_(torch.rand(lin.weight.shape, generator=gen) < 0.3)
        lin.weight[:6, 5] = 0  # rows that never see column 5 in a sparse sum
        lin.weight[3:9, 7] = 0
    x = torch.randn(n, 40, generator=gen)
    xp = x.clone()
    xp[0, 5] = float("nan")
    xp[-1, 7] = float("-inf")
    for _label, ctx, mode in _modes():
        with ctx(), torch.no_grad():
            for relu in (False, True):
                layer = SparseLinear.from_dense(lin.weight, lin.bias, relu=relu, mode=mode)
                want = lin(xp).relu() if relu else lin(xp)
                assert_same_nonfinite(layer(xp), want)
            # a NaN produced by the bias goes through the fused ReLU as NaN
            bias = lin.bias.clone()
            bias[2] = float("nan")
            layer = SparseLinear.from_dense(lin.weight, bias, relu=True, mode=mode)
            assert_same_nonfinite(layer(x), F.linear(x, lin.weight, bias).relu())


@pytest.mark.parametrize("n", [2, 17])  # spatial only; a blocked group of 16 + 1 spatial
def test_chain_nan_and_inf_as_dense(n):
    chain, reference, convs = _small_chain(seed=n)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 3, 8, 8, generator=gen)
    xp = _poison(x, 4)
    xp[-1, 0, 3, 3] = float("-inf")  # -inf: relu(-inf) = 0 in the sparse path, NaN dense
    with torch.no_grad():
        want = reference(xp)
        for policy in ["auto", "blocked", "spatial"]:
            chain.policy = policy
            assert_same_nonfinite(chain(xp), want)
            assert_same_nonfinite(chain(x), reference(x))  # finite again: the fast path
        # a NaN bias inside the chain: the executor must not spread it like the sparse sum
        with torch.no_grad():
            chain.layers[0].bias[2] = float("nan")
            convs[0].bias[2] = float("nan")
        chain.policy = "auto"
        assert_same_nonfinite(chain(x), reference(x))


@pytest.mark.skipif(not sp.extension_available(), reason="C++ kernels not built here")
def test_conv_reading_a_padded_buffer_in_place_sees_its_nan():
    """A conv writing a padded pool buffer (as the converter arranges) and a conv reading it
    in place: a NaN that came in through the first conv's residual is seen by the second
    (its input is scanned unless the first conv had everything finite)."""
    gen = torch.Generator().manual_seed(7)
    w1, w2 = (torch.randn(6, 6, 3, 3, generator=gen) for _ in range(2))
    w1, w2 = (w * (torch.rand(w.shape, generator=gen) < 0.2) for w in (w1, w2))
    first = SparseConv2d.from_dense(w1, None, padding=1, relu=True, residual=True)
    second = SparseConv2d.from_dense(w2, None, padding=1)
    first.pool, first.slot, first.out_pad = layers.BufferPool(), 0, 1
    second.in_padded = True
    x = torch.randn(2, 6, 7, 7, generator=gen)
    res = torch.randn(2, 6, 7, 7, generator=gen)
    with torch.no_grad():
        for poisoned in (False, True, False):  # the buffer is reused: finite again after
            r = res.clone()
            if poisoned:
                r[1, 2, 3, 4] = float("nan")
            a = first(x, r)
            assert_same_nonfinite(a, (F.conv2d(x, w1, padding=1) + r).relu())
            assert a.stride() == (6 * 10 * 9, 10 * 9, 9, 1)  # read in place by `second`
            assert_same_nonfinite(second(a), F.conv2d(a, w2, padding=1))


class _Block(nn.Module):
    """conv-bn-relu, conv-bn + shortcut, relu, strided conv: outputs the feature map (a
    global pool would smear any NaN over the whole sample and hide where it went)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 6, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.bn1(self.conv1(x)).relu()
        b = (self.bn2(self.conv2(a)) + a).relu()
        return self.conv3(b)


@pytest.mark.parametrize("chain", [True, False])
@pytest.mark.parametrize("nan_bias", [False, True])
def test_converted_model_nan_and_inf_as_masked_model(chain, nan_bias):
    """A converted model (BN folded, ReLU and shortcut fused; one chain, or every conv its
    own call reading its input in place) puts NaN / inf where the masked dense model does;
    also with a NaN BatchNorm bias (folded into a conv's bias: the chain executor refuses
    its fast path, a conv reading that conv's output in place scans it)."""
    torch.manual_seed(0)
    net = _Block().eval()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        if nan_bias:
            net.bn1.bias[3] = float("nan")
    masks = ntksap.prune(net, "random", density=0.3, seed=0)
    masked = ntksap.remove_masks(ntksap.apply_masks(copy.deepcopy(net), masks)).eval()
    for n in (2, 17):
        x = torch.randn(n, 3, 8, 8)
        fast = sp.convert(net, masks, example_input=x, autotune=False, chain=chain)
        assert bool(fast.chains()) == (chain and sp.extension_available())
        xp = _poison(x, 5)
        xp[0, 1, 4, 4] = float("-inf")
        with torch.no_grad():
            assert_same_nonfinite(fast(xp), masked(xp))
            assert_same_nonfinite(fast(x), masked(x))
