"""Autograd beyond first-order reverse mode: double backward and forward mode.

- Double backward (create_graph=True: gradient penalties, MAML, Hessian-vector
  products): the backward ops have their own autograd formula
  (chanflex_kernels.ops.make_double_backward); before it, differentiating a
  gradient of dynamic_conv2d gave zeros for the kernels' share, with only a warning.
- Forward mode (torch.func.jvp, jacfwd, torch.autograd.forward_ad): before it the
  compiled ops dropped the tangents silently.
- torch.func's reverse transforms (grad, vjp, jacrev, hessian, per-sample
  gradients as vmap(grad)): before, torch refused the ops' generated autograd
  wrapper (pytorch/pytorch#168393); dynamic_conv2d now calls
  torch.autograd.Function classes (chanflex_kernels.ops.make_autograd_functions).

Checked against torch.autograd.gradgradcheck (float64, compiled kernels) and
against the pure-PyTorch reference, whose higher-order derivatives are
PyTorch's own, for every backend.
"""
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from chanflex_kernels import ChannelFlexConv2d, DynamicConv2d, dynamic_conv2d, use_backend
from chanflex_kernels import triton as triton_backend
from chanflex_kernels.reference import dynamic_conv2d_reference
from comparison import Case, assert_close_scaled, make_inputs
from test_op import EDGE_CASES, random_cases

GRADGRAD_CASES = [c for c in EDGE_CASES if c.batch > 0] + random_cases(4, seed=2468)
TRITON_RUNS = triton_backend.AVAILABLE and (triton_backend.launch.interpreting() or torch.cuda.is_available())
BACKENDS = ["auto"] + (["triton"] if TRITON_RUNS else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("x", "weight", "attn", "bias")


def first_order_functional(fn, inputs, wrt, probes, conv_args):
    """S = sum_i <probe_i, dL/d input_i> for L = <y, r> + ||y||^2 / 2, as a differentiable graph.

    L's gradient grad_out = r + y depends on every input, so the double backward
    exercises all of its paths (the probes weigh grad_x, grad_weight, grad_attn, grad_bias).
    """
    y = fn(*inputs, **conv_args)
    r = probes[-1]
    loss = (y * r).sum() + 0.5 * y.square().sum()
    grads = torch.autograd.grad(loss, [inputs[i] for i in wrt], create_graph=True)
    return sum((g * probes[i]).sum() for g, i in zip(grads, wrt))


@pytest.mark.parametrize("case", GRADGRAD_CASES, ids=lambda c: c.id)
def test_gradgradcheck(case):
    inputs = tuple(t.requires_grad_() for t in make_inputs(case) if t is not None)
    if case.bias:
        fn = lambda x, w, a, b: dynamic_conv2d(x, w, a, b, **case.conv_args)  # noqa: E731
    else:
        fn = lambda x, w, a: dynamic_conv2d(x, w, a, **case.conv_args)  # noqa: E731
    # Full Jacobians on small cases; a random projection of them (fast_mode) on the larger ones.
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=inputs[0].numel() > 300)


def test_third_order():
    """The double backward is built of differentiable ops, so one more order works too."""
    case = Case(2, 4, 4, 6, 5, stride=(2, 1), padding=(1, 1), groups=2, num_kernels=3)
    inputs = tuple(t.requires_grad_() for t in make_inputs(case))

    def first_grads(x, w, a, b):
        y = dynamic_conv2d(x, w, a, b, **case.conv_args)
        return torch.autograd.grad(y.square().sum(), (x, w, a, b), create_graph=True)

    assert torch.autograd.gradgradcheck(first_grads, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wrt", [(0, 1, 2, 3), (0,), (1,), (2,), (3,), (0, 1)],
                         ids=lambda w: "+".join(NAMES[i] for i in w))
@pytest.mark.parametrize("case", [Case(3, 4, 6, 7, 6, padding=(1, 1)),
                                  Case(2, 6, 4, 8, 7, kernel=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1),
                                       groups=2, num_kernels=3)], ids=lambda c: c.id)
def test_matches_reference(case, wrt, backend):
    """Gradients of a functional of the first-order gradients, for every input, vs the reference.

    wrt: which first-order gradients the functional reads (one alone leaves the
    others' cotangents None: the paths a gradient penalty on x alone takes).
    """
    dtype = torch.float64 if backend == "auto" else torch.float32  # the Triton kernels run float32 and half
    raw = make_inputs(case)
    gen = torch.Generator().manual_seed(7)
    out_shape = dynamic_conv2d_reference(*raw, **case.conv_args).shape
    probes = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in raw]
    probes.append(torch.randn(out_shape, generator=gen, dtype=torch.float64))

    def second_order(fn, dtype, device):
        inputs = [t.to(device=device, dtype=dtype).requires_grad_() for t in raw]
        cast = [p.to(device=device, dtype=dtype) for p in probes]
        s = first_order_functional(fn, inputs, wrt, cast, case.conv_args)
        return torch.autograd.grad(s, inputs, allow_unused=True)

    expected = second_order(dynamic_conv2d_reference, torch.float64, "cpu")
    device = "cpu" if backend == "auto" else DEVICE
    with use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "an autograd kernel was not registered"
        actual = second_order(dynamic_conv2d, dtype, device)
    for name, e, a in zip(NAMES, expected, actual):
        e = torch.zeros(()) if e is None else e
        a = torch.zeros(()) if a is None else a
        assert_close_scaled(a.cpu().expand(e.shape), e, dtype, f"second-order grad of {name}")


@pytest.mark.parametrize("module", ["dynamic", "channel_flex"])
def test_r1_penalty_trains_the_kernels(module):
    """A discriminator's R1 penalty ||dD(x)/dx||^2: its gradient reaches every parameter as the reference's."""
    torch.manual_seed(0)
    if module == "dynamic":
        layer = DynamicConv2d(3, 8, 3, padding=1, num_kernels=4, temperature=1.0).double()
        call = layer
    else:
        layer = ChannelFlexConv2d(4, 8, 3, padding=1).double()
        call = lambda x: layer(x, channels=[0, 2, 3])  # noqa: E731
    x = torch.randn(3, 3, 9, 8, dtype=torch.float64)

    def penalty_grads(backend):
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        with use_backend(backend):
            score = call(xx).tanh().sum()
            grad_x, = torch.autograd.grad(score, xx, create_graph=True)
            grad_x.square().sum().backward()
        return {n: p.grad.clone() for n, p in layer.named_parameters()}

    expected = penalty_grads("reference")
    actual = penalty_grads("auto")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert expected[name].abs().max() > 0, f"{name}: the reference's penalty gradient is zero; the test is void"
        assert_close_scaled(actual[name], expected[name], torch.float64, f"R1 penalty grad of {name}")


# --- forward mode -------------------------------------------------------------

FORWARD_CASES = [Case(3, 4, 6, 7, 6, padding=(1, 1)),
                 Case(2, 6, 4, 8, 7, kernel=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2,
                      num_kernels=3),
                 Case(3, 4, 6, 7, 6, kernel=(1, 1), bias=False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,which", [
    pytest.param(c, w, id=f"{c.id}-{'+'.join(NAMES[i] for i in w)}")
    for c in FORWARD_CASES for w in [(0, 1, 2, 3), (0,), (1,), (2,), (3,)][:5 if c.bias else 4]
    for w in [tuple(i for i in w if i < 3 or c.bias)]
])
def test_jvp_matches_reference(case, which, backend):
    """torch.func.jvp and forward_ad's dual tensors: the output and its tangent, tangents on some inputs only."""
    dtype = torch.float64 if backend == "auto" else torch.float32
    device = "cpu" if backend == "auto" else DEVICE
    raw = [t for t in make_inputs(case) if t is not None]
    gen = torch.Generator().manual_seed(11)
    tangents = [torch.randn(raw[i].shape, generator=gen, dtype=torch.float64) for i in which]

    def jvp(fn, dtype, device):
        inputs = [t.to(device=device, dtype=dtype) for t in raw]

        def f(*varying):
            args = list(inputs)
            for i, v in zip(which, varying):
                args[i] = v
            return fn(*args, **case.conv_args)

        primals = tuple(inputs[i] for i in which)
        moved = tuple(t.to(device=device, dtype=dtype) for t in tangents)
        out, tangent = torch.func.jvp(f, primals, moved)
        with fwAD.dual_level():
            dual_out = f(*(fwAD.make_dual(p, t) for p, t in zip(primals, moved)))
            dual_tangent = fwAD.unpack_dual(dual_out).tangent
        assert dual_tangent is not None, "forward_ad: the output carries no tangent"
        return out, tangent, dual_tangent

    expected, expected_tangent, _ = jvp(dynamic_conv2d_reference, torch.float64, "cpu")
    with use_backend(backend):
        out, tangent, dual_tangent = jvp(dynamic_conv2d, dtype, device)
    assert_close_scaled(out.cpu(), expected, dtype, "output")
    assert_close_scaled(tangent.cpu(), expected_tangent, dtype, "torch.func.jvp tangent")
    assert_close_scaled(dual_tangent.cpu(), expected_tangent, dtype, "forward_ad tangent")


def test_jacfwd_equals_reverse_mode_jacobian():
    """jacfwd (vmap over jvp) and the reverse-mode Jacobian agree for every input."""
    case = Case(2, 4, 4, 5, 5, stride=(2, 1), padding=(1, 1), groups=2, num_kernels=3)
    inputs = make_inputs(case)
    f = lambda *t: dynamic_conv2d(*t, **case.conv_args)  # noqa: E731
    forward = torch.func.jacfwd(f, argnums=(0, 1, 2, 3))(*inputs)
    reverse = torch.autograd.functional.jacobian(f, inputs)
    for name, fwd, rev in zip(NAMES, forward, reverse):
        assert_close_scaled(fwd, rev, torch.float64, f"Jacobian wrt {name}")


def test_module_jvp():
    """A DynamicConv2d's jvp along x (its attention depends on x too) equals the reference backend's."""
    torch.manual_seed(0)
    layer = DynamicConv2d(4, 6, 3, padding=1, temperature=1.0).double()
    x, tangent = torch.randn(2, 2, 4, 7, 7, dtype=torch.float64)
    actual = torch.func.jvp(layer, (x,), (tangent,))[1]
    with use_backend("reference"):
        expected = torch.func.jvp(layer, (x,), (tangent,))[1]
    assert_close_scaled(actual, expected, torch.float64, "module jvp tangent")


# --- torch.func --------------------------------------------------------------

TRANSFORMS = ["grad", "per_sample_grad", "jacrev", "hessian", "hvp_forward_over_reverse", "hvp_all_inputs"]


def func_transform(name, fn, x, weight, attn, bias, conv_args):
    """One torch.func use of fn (dynamic_conv2d or the reference); returns a tensor or a tuple of them."""
    def loss(w, a):
        return fn(x, w, a, bias, **conv_args).square().sum()

    if name == "grad":
        return torch.func.grad(loss, argnums=(0, 1))(weight, attn)
    if name == "per_sample_grad":  # DP-SGD's per-sample gradients of the kernels
        def sample_loss(w, xi, ai):
            return fn(xi[None], w, ai[None], bias, **conv_args).square().sum()
        return torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(weight, x, attn)
    if name == "jacrev":
        return torch.func.jacrev(lambda a: fn(x, weight, a, bias, **conv_args))(attn)
    if name == "hessian":
        return torch.func.hessian(lambda a: loss(weight, a))(attn)
    if name == "hvp_forward_over_reverse":
        direction = torch.linspace(-1, 1, weight.numel(), dtype=weight.dtype).reshape(weight.shape)
        return torch.func.jvp(torch.func.grad(lambda w: loss(w, attn)), (weight,), (direction,))[1]
    if name == "hvp_all_inputs":  # every term of the backward's jvp: tangents on x, weight, attn and bias
        inputs = (x, weight, attn, bias)
        directions = tuple(torch.linspace(-1, 1, t.numel(), dtype=t.dtype).reshape(t.shape).to(t.device).flip(0)
                           for t in inputs)
        def full_loss(*tensors):
            return fn(*tensors, **conv_args).square().sum()
        return torch.func.jvp(torch.func.grad(full_loss, argnums=(0, 1, 2, 3)), inputs, directions)[1]
    raise ValueError(name)


# jacrev is vmap over one backward per output element: minutes in Triton's interpreter.
INTERPRETED = TRITON_RUNS and triton_backend.launch.interpreting()


@pytest.mark.parametrize("transform,backend", [
    (t, b) for b in BACKENDS for t in TRANSFORMS if not (b == "triton" and INTERPRETED and t == "jacrev")])
def test_torch_func_matches_reference(transform, backend):
    case = Case(3, 4, 6, 6, 5, stride=(1, 2), padding=(1, 1), groups=2, num_kernels=3)
    dtype = torch.float64 if backend == "auto" else torch.float32
    device = "cpu" if backend == "auto" else DEVICE
    raw = make_inputs(case)
    expected = func_transform(transform, dynamic_conv2d_reference, *raw, case.conv_args)
    with use_backend(backend), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule.*")  # the ops have vmap rules: no per-slice fallback
        actual = func_transform(transform, dynamic_conv2d, *(t.to(device=device, dtype=dtype) for t in raw),
                                case.conv_args)
    expected = expected if isinstance(expected, tuple) else (expected,)
    actual = actual if isinstance(actual, tuple) else (actual,)
    for e, a in zip(expected, actual, strict=True):
        assert_close_scaled(a.cpu(), e, dtype, transform)


def test_torch_func_inside_torch_compile():
    """torch.func over the op inside torch.compile: right results, or a clear error with fullgraph=True.

    Traced, the graph would keep the op with its reverse-mode formula only (jvp's tangent
    was silently wrong, grad raised deep inside); the op refuses the trace, so dynamo
    runs the transform eagerly, and fullgraph=True reports why it cannot."""
    case = Case(2, 3, 4, 5, 5, padding=(1, 1), bias=False)
    x, weight, attn = (t.float() for t in make_inputs(case) if t is not None)
    tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))

    def jvp(fn, x, t):
        return torch.func.jvp(lambda xx: fn(xx, weight, attn, padding=1), (x,), (t,))[1]

    def grad(fn, w):
        return torch.func.grad(lambda ww: fn(x, ww, attn, padding=1).square().sum())(w)

    torch._dynamo.reset()
    compiled_jvp = torch.compile(lambda x, t: jvp(dynamic_conv2d, x, t))(x, tangent)
    compiled_grad = torch.compile(lambda w: grad(dynamic_conv2d, w))(weight)
    assert_close_scaled(compiled_jvp, jvp(dynamic_conv2d_reference, x, tangent), torch.float32, "compiled jvp")
    assert_close_scaled(compiled_grad, grad(dynamic_conv2d_reference, weight), torch.float32, "compiled grad")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="cannot be traced by torch.compile"):
        torch.compile(lambda x, t: jvp(dynamic_conv2d, x, t), fullgraph=True)(x, tangent)


# --- torch.vmap --------------------------------------------------------------

VMAP_SIZE = 3
# use -> (calls of the forward op, calls of the backward op) for a vmapped dimension of VMAP_SIZE
# (per-sample gradients vmap over the batch, also VMAP_SIZE):
# per-sample arguments fold into one call of the op; batched kernels, or the kernels' gradients
# wanted per slice, take one call a slice.
VMAP_USES = {
    "x+attn": (1, 0),
    "x": (1, 0),
    "attn": (1, 0),
    "weight": (VMAP_SIZE, 0),
    "bias": (VMAP_SIZE, 0),
    "all-in_dim1": (VMAP_SIZE, 0),
    "nested": (1, 0),
    "per_sample_grad_x_attn": (1, 1),
    "per_sample_grad_kernels": (1, VMAP_SIZE),
    "grad_of_vmap": (1, 1),
    "vmap_of_vjp_x_attn": (1, 1),
    "vmap_of_vjp_kernels": (1, VMAP_SIZE),
    "ensemble_grad": (VMAP_SIZE, VMAP_SIZE),
}


def vmap_use(name, fn, case):
    """One torch.vmap use of fn (dynamic_conv2d or the reference) on VMAP_SIZE slices of case's inputs."""
    slices = [make_inputs(case, seed=v) for v in range(VMAP_SIZE)]
    x, weight, attn, bias = slices[0]
    xs, ws, attns, biases = (torch.stack(t) for t in zip(*slices))
    vmap, grad = torch.func.vmap, torch.func.grad

    def conv(xx, ww, aa, bb):
        return fn(xx, ww, aa, bb, **case.conv_args)

    def sample_loss(ww, bb, xi, ai):
        return conv(xi[None], ww, ai[None], bb).square().sum()

    if name == "x+attn":
        return vmap(lambda xx, aa: conv(xx, weight, aa, bias))(xs, attns)
    if name == "x":
        return vmap(lambda xx: conv(xx, weight, attn, bias))(xs)
    if name == "attn":
        return vmap(lambda aa: conv(x, weight, aa, bias))(attns)
    if name == "weight":  # an ensemble of kernels on one batch
        return vmap(lambda ww: conv(x, ww, attn, bias))(ws)
    if name == "bias":
        return vmap(lambda bb: conv(x, weight, attn, bb))(biases)
    if name == "all-in_dim1":
        moved = (t.movedim(0, 1) for t in (xs, ws, attns, biases))
        return vmap(conv, in_dims=1, out_dims=1)(*moved)
    if name == "nested":
        return vmap(vmap(lambda xi, ai: conv(xi[None], weight, ai[None], bias)))(xs, attns)
    if name == "per_sample_grad_x_attn":
        return vmap(grad(sample_loss, argnums=(2, 3)), in_dims=(None, None, 0, 0))(weight, bias, x, attn)
    if name == "per_sample_grad_kernels":  # DP-SGD
        return vmap(grad(sample_loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(weight, bias, x, attn)
    if name == "grad_of_vmap":
        return grad(lambda ww, bb: vmap(lambda xx, aa: conv(xx, ww, aa, bb))(xs, attns).square().sum(),
                    argnums=(0, 1))(weight, bias)
    if name.startswith("vmap_of_vjp"):  # several cotangents at once, as jacrev does
        argnums = (0, 2) if name.endswith("x_attn") else (1, 3)
        primals = [(x, weight, attn, bias)[i] for i in argnums]

        def partial(*args):
            full = [x, weight, attn, bias]
            for i, t in zip(argnums, args):
                full[i] = t
            return conv(*full)

        out, vjp_fn = torch.func.vjp(partial, *primals)
        ramp = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
        cotangents = torch.stack([ramp * (1 + v) for v in range(VMAP_SIZE)])
        return vmap(vjp_fn)(cotangents)
    if name == "ensemble_grad":
        return vmap(grad(lambda ww, xx: conv(xx, ww, attn, bias).square().sum(), argnums=(0, 1)))(ws, xs)
    raise ValueError(name)


def op_calls(run):
    """run()'s result and how many times it called the forward and the backward op."""
    with torch.profiler.profile() as prof:
        result = run()
    names = [e.name for e in prof.events() if e.name.startswith("chanflex::dynamic_conv2d")]
    backward = sum("backward" in n for n in names)
    return result, (len(names) - backward, backward)


VMAP_CASE = Case(VMAP_SIZE, 4, 6, 6, 5, stride=(1, 2), padding=(1, 1), groups=2, num_kernels=3)


@pytest.mark.parametrize("use,backend", [
    (u, b) for b in BACKENDS for u in VMAP_USES
    if b == "auto" or u in ("x+attn", "per_sample_grad_kernels", "ensemble_grad")])
def test_vmap_matches_reference(use, backend):
    """torch.vmap over each argument, per-sample and ensemble gradients: the reference's values,
    no per-slice fallback (its warning is an error here), and the op called once per vmap when it can be."""
    dtype = torch.float64 if backend == "auto" else torch.float32
    expected = vmap_use(use, dynamic_conv2d_reference, VMAP_CASE)
    with use_backend(backend), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule.*")
        actual, calls = op_calls(lambda: vmap_use(use, lambda *t, **kw: dynamic_conv2d(
            *(t_.to(device=DEVICE if backend != "auto" else "cpu", dtype=dtype) for t_ in t), **kw), VMAP_CASE))
    assert calls == VMAP_USES[use], f"op calls (forward, backward): expected {VMAP_USES[use]}, got {calls}"
    expected = expected if isinstance(expected, tuple) else (expected,)
    actual = actual if isinstance(actual, tuple) else (actual,)
    for e, a in zip(expected, actual, strict=True):
        assert_close_scaled(a.cpu(), e, dtype, f"vmap {use}")


def test_vmap_module_ensemble():
    """An ensemble of DynamicConv2d layers run by vmap over their stacked parameters equals each layer's call."""
    torch.manual_seed(0)
    layers = [DynamicConv2d(4, 6, 3, padding=1, num_kernels=3).double() for _ in range(VMAP_SIZE)]
    params, buffers = torch.func.stack_module_state(layers)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)

    def call(p, b):
        return torch.func.functional_call(layers[0], (p, b), (x,))

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*batching rule.*")
        actual = torch.func.vmap(call)(params, buffers)
    expected = torch.stack([layer(x) for layer in layers])
    assert_close_scaled(actual, expected, torch.float64, "vmapped ensemble")


def dual_forward_over_reverse(fn, case, tangent_on, grad_wrt, create_graph):
    """Tangents of torch.autograd.grad's gradients, taken with forward_ad dual tensors (forward over reverse)."""
    inputs = make_inputs(case)
    tangents = make_inputs(case, seed=1)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(t.clone().requires_grad_(), tangents[i]) if i in tangent_on
                 else t.clone().requires_grad_() for i, t in enumerate(inputs)]
        y = fn(*duals, **case.conv_args)
        grads = torch.autograd.grad(y.square().sum(), [duals[i] for i in grad_wrt], create_graph=create_graph)
        return [fwAD.unpack_dual(g).tangent for g in grads]


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("tangent_on,grad_wrt", [((0,), (1, 2)), ((1,), (0, 3)), ((2,), (0, 1, 2, 3)),
                                                 ((3,), (2,)), ((0, 1, 2, 3), (0, 1, 2, 3))],
                         ids=lambda w: "+".join(NAMES[i] for i in w))
def test_forward_over_reverse_with_dual_tensors(tangent_on, grad_wrt, create_graph):
    """forward_ad dual tensors through torch.autograd.grad: the gradients' tangents are the reference's."""
    case = Case(2, 4, 6, 6, 5, stride=(1, 2), padding=(1, 1), groups=2, num_kernels=3)
    expected = dual_forward_over_reverse(dynamic_conv2d_reference, case, tangent_on, grad_wrt, create_graph)
    actual = dual_forward_over_reverse(dynamic_conv2d, case, tangent_on, grad_wrt, create_graph)
    for i, e, a in zip(grad_wrt, expected, actual, strict=True):
        assert (e is None) == (a is None), f"tangent of grad {NAMES[i]}: expected {e is not None}, got {a is not None}"
        if e is not None:
            assert_close_scaled(a, e, torch.float64, f"tangent of grad {NAMES[i]}")
