"""The public op ``dynamic_conv2d``: argument checks, fake kernels, autograd.

The schemas and device kernels are compiled (``csrc/``); this file registers
what torch.library expects from Python: a fake (meta) kernel for each op, used
by torch.compile and opcheck, and the autograd formulas, whose backward calls
the registered backward op so every device dispatches its own kernel. The
formulas cover every order and forward mode (the backward has a backward and
a jvp of its own); ``dynamic_conv2d`` applies them through autograd.Function
classes so that torch.func's transforms accept them too.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead_wrappers
from torch.utils.flop_counter import register_flop_formula

from . import backends
from .reference import dynamic_conv2d_reference

IntPair = Union[int, Sequence[int]]

__all__ = ["dynamic_conv2d", "per_sample_conv2d", "check_dynamic_conv2d_args"]


def _pair(value: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return (value[0], value[1])
    raise ValueError(f"dynamic_conv2d: expected {name} to be an int or a pair of ints, got {value!r}")


def _shape(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(t.shape)


def check_dynamic_conv2d_args(x, weight, attn, bias, stride, padding, dilation, groups) -> Tuple[int, int, int, int]:
    """Validate the arguments of dynamic_conv2d (padding already numeric).

    Returns the output shape (B, C_out, H_out, W_out). Raises ValueError whose
    message names the expected and the actual value.
    """
    def fail(msg):
        raise ValueError(f"dynamic_conv2d: {msg}")

    if x.dim() != 4:
        fail(f"expected x of shape (B, C_in, H, W), got {x.dim()}-D tensor of shape {_shape(x)}")
    if weight.dim() != 5:
        fail(f"expected weight of shape (K, C_out, C_in/groups, kh, kw), got {weight.dim()}-D tensor of shape {_shape(weight)}")
    if attn.dim() != 2:
        fail(f"expected attn of shape (B, K), got {attn.dim()}-D tensor of shape {_shape(attn)}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        fail(f"expected groups to be a positive int, got {groups!r}")
    for name, pair, minimum in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if min(pair) < minimum:
            fail(f"expected {name} >= {minimum}, got {tuple(pair)}")
    batch, in_channels, height, width = x.shape
    num_kernels, out_channels, group_in, kh, kw = weight.shape
    if min(num_kernels, out_channels, kh, kw) < 1:
        fail(f"expected a non-empty weight, got shape {_shape(weight)}")
    if in_channels < 1:
        fail(f"expected x with at least one input channel, got shape {_shape(x)}")
    if in_channels % groups:
        fail(f"expected C_in divisible by groups, got C_in={in_channels}, groups={groups}")
    if out_channels % groups:
        fail(f"expected C_out divisible by groups, got C_out={out_channels}, groups={groups}")
    if group_in * groups != in_channels:
        fail(f"expected weight.shape[2] == C_in/groups = {in_channels // groups} (x has C_in={in_channels}, "
             f"groups={groups}), got {group_in}")
    if _shape(attn) != (batch, num_kernels):
        fail(f"expected attn of shape (B, K) = {(batch, num_kernels)}, got {_shape(attn)}")
    if bias is not None and _shape(bias) != (num_kernels, out_channels):
        fail(f"expected bias of shape (K, C_out) = {(num_kernels, out_channels)}, got {_shape(bias)}")
    for name, t in (("weight", weight), ("attn", attn), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            fail(f"expected {name} to have the dtype of x ({x.dtype}), got {t.dtype}")
        if t.device != x.device:
            fail(f"expected {name} on the device of x ({x.device}), got {t.device}")
    if not x.dtype.is_floating_point:
        fail(f"expected a floating-point dtype, got {x.dtype}")
    span = [dilation[i] * (k - 1) + 1 for i, k in enumerate((kh, kw))]
    padded = [size + 2 * padding[i] for i, size in enumerate((height, width))]
    if span[0] > padded[0] or span[1] > padded[1]:
        fail(f"expected the dilated kernel ({span[0]}x{span[1]}) to fit in the padded input, "
             f"got a padded input of {padded[0]}x{padded[1]}")
    out_h = (padded[0] - span[0]) // stride[0] + 1
    out_w = (padded[1] - span[1]) // stride[1] + 1
    return (batch, out_channels, out_h, out_w)


def _resolve_padding(x, weight, padding, stride, dilation):
    """Numeric symmetric padding for the kernels; 'same' with an odd total pads x's far side once."""
    if not isinstance(padding, str):
        return x, _pair(padding, "padding")
    if padding == "valid":
        return x, (0, 0)
    if padding != "same":
        raise ValueError(f"dynamic_conv2d: expected padding to be 'same', 'valid', an int or a pair, got {padding!r}")
    if stride != (1, 1):
        raise ValueError(f"dynamic_conv2d: padding='same' needs stride 1 (as F.conv2d), got stride={stride}")
    totals = [dilation[i] * (weight.shape[3 + i] - 1) for i in range(2)]
    left = tuple(t // 2 for t in totals)
    extra_h, extra_w = (totals[i] - 2 * left[i] for i in range(2))
    if extra_h or extra_w:
        x = F.pad(x, (0, extra_w, 0, extra_h))
    return x, left


def _autocast_inputs(x, weight, attn, bias):
    """The tensors as the op takes them inside ``torch.autocast``.

    As for ``F.conv2d`` (a lower-precision op in autocast's tables): the float
    tensors on x's device go to autocast's dtype (bfloat16 or float16), float64
    stays; so a module whose attention comes out of an autocast ``nn.Linear``
    in bfloat16 and whose x and weight are float32 gets one dtype. Outside
    autocast the tensors are returned as they are (mixed dtypes are an error).
    """
    device_type = x.device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return x, weight, attn, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        eligible = (t is not None and t.device.type == device_type and t.is_floating_point()
                    and t.dtype != torch.float64)
        return t.to(dtype) if eligible else t

    return cast(x), cast(weight), cast(attn), cast(bias)


def dynamic_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    attn: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: Union[IntPair, str] = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> torch.Tensor:
    """Per-sample dynamic convolution: each sample's kernel is a mix of K kernels.

    Equivalent to::

        y[b] = F.conv2d(x[b:b+1], sum_k attn[b, k] * weight[k],
                        sum_k attn[b, k] * bias[k], stride, padding, dilation, groups)

    Args:
        x: (B, C_in, H, W) float32, float64, bfloat16 or float16.
        weight: (K, C_out, C_in // groups, kh, kw), same dtype and device as x.
        attn: (B, K) mixing coefficients, any real values (softmax not assumed).
        bias: (K, C_out) or None.
        stride, dilation: int or (h, w). padding: int, (h, w), 'same' or 'valid'.
        groups: positive int dividing C_in and C_out.

    Returns:
        (B, C_out, H_out, W_out), dtype of x, channels-last when x is (as
        ``nn.Conv2d``'s; the kernels write NCHW, so that costs a copy of the
        output), else contiguous. Differentiable in x, weight, attn
        and bias. Half types accumulate in float32. Inside ``torch.autocast``
        it runs as ``F.conv2d`` does: float32 and half inputs are cast to
        autocast's dtype (float64 is not), and so is the output.

    Example::

        >>> x = torch.randn(8, 16, 32, 32)
        >>> w = torch.randn(4, 32, 16, 3, 3)
        >>> a = torch.softmax(torch.randn(8, 4), dim=1)
        >>> dynamic_conv2d(x, w, a, padding=1).shape
        torch.Size([8, 32, 32, 32])
    """
    stride = _pair(stride, "stride")
    dilation = _pair(dilation, "dilation")
    for name, t in (("x", x), ("weight", weight), ("attn", attn), ("bias", bias)):
        if not (t is None and name == "bias") and not isinstance(t, torch.Tensor):
            raise ValueError(f"dynamic_conv2d: expected {name} to be a torch.Tensor, got {type(t).__name__}")
    x, weight, attn, bias = _autocast_inputs(x, weight, attn, bias)
    channels_last = _is_channels_last(x)
    if weight.dim() == 5:
        x, padding = _resolve_padding(x, weight, padding, stride, dilation)
    else:
        padding = (0, 0)  # the shape check below reports the weight
    check_dynamic_conv2d_args(x, weight, attn, bias, stride, padding, dilation, groups)
    backend = backends.get_backend()
    if backend == "reference":
        y = dynamic_conv2d_reference(x, weight, attn, bias, stride, padding, dilation, groups)
        return y.contiguous(memory_format=torch.channels_last) if channels_last else y.contiguous()
    if backend == "cpp" and x.device.type != "cpu":
        raise ValueError(f"dynamic_conv2d: backend 'cpp' runs CPU tensors, got x on {x.device}")
    if backend == "triton":
        backends.require_triton()
        name, conv_args = "chanflex::dynamic_conv2d_triton", (list(stride), list(padding), list(dilation), groups)
    elif backend == "cuda":
        backends.require_cuda_kernels(x.device)
        name, conv_args = "chanflex::dynamic_conv2d_cuda", (stride, padding, dilation, groups)
    else:
        name, conv_args = "chanflex::dynamic_conv2d", (stride, padding, dilation, groups)
    tensors = (x, weight, attn, bias)
    if _differentiated(tensors):
        y = _AUTOGRAD_FUNCTIONS[name].apply(*tensors, OpArgs(*conv_args))
    else:
        y = _FORWARD_OPS[name](*tensors, *conv_args)
    # The kernels write NCHW; a channels-last input gets a channels-last output, as from nn.Conv2d.
    return y.contiguous(memory_format=torch.channels_last) if channels_last else y


def _is_channels_last(x: torch.Tensor) -> bool:
    """x is laid out channels-last, as nn.Conv2d decides its output's layout (a tensor both ways counts as NCHW).

    Under torch.vmap x is a batched tensor, which refuses layout queries; its output is NCHW.
    """
    if torch._C._functorch.is_batchedtensor(x):
        return False
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _differentiated(tensors) -> bool:
    """True when the call goes through the autograd.Function (forward mode, torch.func, eager autograd).

    torch.compile and torch.jit.trace record the op itself (its registered autograd serves them).
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        if fwAD._current_level >= 0 or torch._C._are_functorch_transforms_active():
            # The traced graph would record the op with its reverse-mode formula only and drop the
            # tangents; refusing here makes dynamo run the transform eagerly (a clear error otherwise).
            raise NotImplementedError("dynamic_conv2d: torch.func transforms and forward-mode AD over it cannot be "
                                      "traced by torch.compile; run the transform outside the compiled function")
        return False
    if torch._C._are_functorch_transforms_active():  # torch.func: its wrappers need the Function
        return True
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return True
    # Forward mode: dual tensors exist only inside a dual level (forward_ad, torch.func.jvp);
    # checking the level first keeps unpack_dual's cost off every first-order backward.
    return fwAD._current_level >= 0 and any(t is not None and fwAD.unpack_dual(t).tangent is not None
                                            for t in tensors)


def _mixed_kernels(weight, attn, tangent_weight, tangent_attn):
    """([tW; W], [a; ta]): 2K kernels whose mix is sum_k a[b,k] tW_k + ta[b,k] W_k; a missing half is left out."""
    kernels = [w for w in (tangent_weight, weight if tangent_attn is not None else None) if w is not None]
    coeffs = [c for c, w in ((attn, tangent_weight), (tangent_attn, tangent_attn)) if w is not None]
    return (torch.cat(kernels), torch.cat(coeffs, dim=1)) if kernels else None


def jacobian_vector_product(conv, x, weight, attn, bias, tx, tw, ta, tb, out_shape):
    """J t: dynamic_conv2d's derivative at (x, weight, attn, bias) along t = (tx, tw, ta, tb), None = 0.

    The op is linear in x and bilinear in (attn, weight) and (attn, bias), so

        J t = conv(tx, W, a) + conv(x, [tW; W], [a; ta]) + a @ tb + ta @ b

    with conv(x, w, a) the op without bias. Used by forward mode (the forward's
    jvp) and by the double backward (where it is the gradient for grad_out).
    None if t is all None.
    """
    terms = [conv(tx, weight, attn)] if tx is not None else []
    mixed = _mixed_kernels(weight, attn, tw, ta)
    if mixed is not None:
        terms.append(conv(x, *mixed))
    bias_terms = [attn @ tb] if tb is not None else []
    if ta is not None and bias is not None:
        bias_terms.append(ta @ bias)
    if bias_terms:
        terms.append(sum(bias_terms)[:, :, None, None].expand(out_shape))
    return sum(terms) if terms else None


def per_sample_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      stride: IntPair = 1, padding: Union[IntPair, str] = 0, dilation: IntPair = 1,
                      groups: int = 1) -> torch.Tensor:
    """Convolve each sample with its own kernel: ``y[b] = conv2d(x[b], weight[b], bias[b])``.

    For kernels generated per sample (hypernetwork stems, seed 002's flex
    layer). It is dynamic_conv2d with K = B and identity attention, so it runs
    the fused kernels instead of a batch-as-groups copy; the mixing costs
    B * |W| per sample, small next to the conv for the kernels it is meant for.

    Args:
        x: (B, C_in, H, W). weight: (B, C_out, C_in/groups, kh, kw). bias: (B, C_out) or None.
        stride, padding, dilation, groups: as :func:`dynamic_conv2d`.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError(f"per_sample_conv2d: expected tensors x and weight, got {type(x).__name__} and "
                         f"{type(weight).__name__}")
    if x.dim() != 4 or weight.dim() != 5 or weight.shape[0] != x.shape[0]:
        raise ValueError(f"per_sample_conv2d: expected x (B, C_in, H, W) and weight (B, C_out, C_in/groups, kh, kw) "
                         f"with the same B, got x {_shape(x)} and weight {_shape(weight)}")
    identity = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
    return dynamic_conv2d(x, weight, identity, bias, stride, padding, dilation, groups)


# --- fake kernels -----------------------------------------------------------

@torch.library.register_fake("chanflex::dynamic_conv2d")
@torch.library.register_fake("chanflex::dynamic_conv2d_cuda")
def dynamic_conv2d_fake(x, weight, attn, bias, stride, padding, dilation, groups):
    shape = check_dynamic_conv2d_args(x, weight, attn, bias, stride, padding, dilation, groups)
    return x.new_empty(shape)


@torch.library.register_fake("chanflex::dynamic_conv2d_backward")
@torch.library.register_fake("chanflex::dynamic_conv2d_backward_cuda")
def dynamic_conv2d_backward_fake(grad_out, x, weight, attn, bias, stride, padding, dilation, groups, output_mask):
    shape = check_dynamic_conv2d_args(x, weight, attn, bias, stride, padding, dilation, groups)
    torch._check(tuple(grad_out.shape) == shape, lambda: f"expected grad_out of shape {shape}, got {tuple(grad_out.shape)}")
    torch._check(not output_mask[3] or bias is not None, lambda: "grad of bias requested without a bias")
    like = (x, weight, attn, bias)
    return tuple(
        x.new_empty(like[i].shape) if output_mask[i] else x.new_empty(0) for i in range(4)
    )


# --- autograd ---------------------------------------------------------------

def _shape_only(shape, like: torch.Tensor) -> torch.Tensor:
    """A stride-0 stand-in with the right shape for a tensor backward does not read."""
    return like.new_zeros(()).expand(shape)


def setup_context(ctx, inputs, output):
    x, weight, attn, bias, stride, padding, dilation, groups = inputs
    need_x, need_w, need_attn, need_bias = ctx.needs_input_grad[:4]
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.shapes = (x.shape, weight.shape, None if bias is None else bias.shape)
    # Save only what the requested gradients read: x for dW and dattn, weight
    # for dx and dattn, bias for dattn; attn is tiny and always kept.
    ctx.save_for_backward(
        x if (need_w or need_attn) else None,
        weight if (need_x or need_attn) else None,
        attn,
        bias if (need_attn and bias is not None) else None,
    )


def make_backward(backward_fn):
    """The autograd backward of a dynamic_conv2d op whose gradients ``backward_fn`` computes.

    Shared by the compiled and the Triton ops and their autograd.Function classes;
    ``backward_fn`` has the signature of chanflex::dynamic_conv2d_backward.
    """
    def backward(ctx, grad_out):
        x, weight, attn, bias = ctx.saved_tensors
        x_shape, weight_shape, bias_shape = ctx.shapes
        x = _shape_only(x_shape, attn) if x is None else x
        weight = _shape_only(weight_shape, attn) if weight is None else weight
        if bias is None and bias_shape is not None:
            bias = _shape_only(bias_shape, attn)
        need = list(ctx.needs_input_grad[:4])
        need[3] = need[3] and bias_shape is not None
        grads = backward_fn(grad_out, x, weight, attn, bias, *ctx.conv_args, need)
        return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 4

    return backward


def setup_backward_context(ctx, inputs, output):
    grad_out, x, weight, attn, bias, stride, padding, dilation, groups, output_mask = inputs
    # Gradients of the outputs nobody used arrive as None, not as zeros to convolve.
    ctx.set_materialize_grads(False)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.save_for_backward(grad_out, x, weight, attn, bias)


def make_double_backward(forward_fn, backward_fn):
    """The autograd backward of the backward (double backward: gradient penalties, MAML).

    forward_fn and backward_fn have the signatures of the forward and backward
    ops (the ops themselves, or the autograd.Function calls of
    make_autograd_functions). backward_fn(g) returns J^T g, the transposed
    Jacobian of the forward at p = (x, weight, attn, bias) applied to g.
    For cotangents h = (hx, hW, ha, hb)
    of its outputs, S = <h, J^T g> = <g, J h>, and J h is the forward's
    directional derivative, itself dynamic convolutions:

        J h = conv(hx, W, a) + conv(x, [hW; W], [a; ha]) + a @ hb + ha @ b

    (jacobian_vector_product). So dS/dg is those forward calls, and dS/dp
    their backward calls with cotangent g.
    Everything here is a differentiable op again, so higher orders work too.
    """
    def backward(ctx, hx, hw, ha, hb):
        g, x, weight, attn, bias = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        need_g, need_x, need_w, need_attn, need_bias = ctx.needs_input_grad[:5]
        # Unrequested outputs of the backward were empty tensors: drop their cotangents.
        hx, hw, ha, hb = (h if h is not None and like is not None and h.shape == like.shape else None
                          for h, like in zip((hx, hw, ha, hb), (x, weight, attn, bias)))

        def conv(xx, ww, aa):
            return forward_fn(xx, ww, aa, None, stride, padding, dilation, groups)

        def conv_vjp(xx, ww, aa, mask):  # (grad_x, grad_weight, grad_attn) of conv(xx, ww, aa) for cotangent g
            return backward_fn(g, xx, ww, aa, None, stride, padding, dilation, groups, [*mask, False])[:3]

        mixed = _mixed_kernels(weight, attn, hw, ha)
        grad_x = grad_w = grad_attn = grad_bias = None
        grad_g = jacobian_vector_product(conv, x, weight, attn, bias, hx, hw, ha, hb, g.shape) if need_g else None
        if need_x and mixed is not None:
            grad_x = conv_vjp(x, *mixed, (True, False, False))[0]
        if (need_w or need_attn) and hx is not None:  # from conv(hx, W, a)
            _, grad_w, grad_attn = conv_vjp(hx, weight, attn, (False, need_w, need_attn))
        if need_w and ha is not None:  # from conv(x, W, ha)
            term = conv_vjp(x, weight, ha, (False, True, False))[1]
            grad_w = term if grad_w is None else grad_w + term
        if need_attn:  # from conv(x, hW, a) and a @ hb
            terms = [grad_attn] if grad_attn is not None else []
            if hw is not None:
                terms.append(conv_vjp(x, hw, attn, (False, False, True))[2])
            if hb is not None:
                terms.append(g.sum(dim=(2, 3)) @ hb.t())
            grad_attn = sum(terms) if terms else None
        if need_bias and ha is not None:  # from ha @ b
            grad_bias = ha.t() @ g.sum(dim=(2, 3))
        return grad_g, grad_x, grad_w, grad_attn, grad_bias, None, None, None, None, None

    return backward


def make_backward_jvp(backward_fn):
    """The forward-mode derivative of the backward (forward-over-reverse, torch.func.hessian).

    The backward's outputs are linear in each of grad_out g, x and (weight, bias),
    and in attn through the mix, so along t = (tg, tx, tW, ta, tb):

        d grad_x = B_x(tg; W, a) + B_x(g; [tW; W], [a; ta])
        d grad_W = B_W(tg, x; a) + B_W(g, tx; a) + B_W(g, x; ta)
        d grad_a = B_a(tg, x, W, b) + B_a(g, tx, W) + B_a(g, x, tW, tb)
        d grad_b = a^T sum(tg) + ta^T sum(g)

    each B a call of ``backward_fn`` (differentiable again).
    """
    def jvp(ctx, tg, tx, tw, ta, tb, *_):  # then the non-tensor arguments' (None)
        g, x, weight, attn, bias = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        mask = ctx.output_mask
        like = (x, weight, attn, bias)
        terms = [[] for _ in range(4)]  # per output of the backward

        def grads_of(gg, xx, ww, aa, bb, which):
            which = [i for i in which if mask[i] and (i != 3 or bb is not None)]
            if which:
                out = backward_fn(gg, xx, ww, aa, bb, stride, padding, dilation, groups,
                                  [i in which for i in range(4)])
                for i in which:
                    terms[i].append(out[i])

        if tg is not None:
            grads_of(tg, x, weight, attn, bias, (0, 1, 2, 3))
        if tx is not None:
            grads_of(g, tx, weight, attn, None, (1, 2))
        mixed = _mixed_kernels(weight, attn, tw, ta)
        if mixed is not None:
            grads_of(g, x, *mixed, None, (0,))
        if ta is not None:
            grads_of(g, x, weight, ta, None, (1,))
        if tw is not None:
            grads_of(g, x, tw, attn, tb, (2,))
        elif tb is not None and mask[2]:
            terms[2].append(g.sum(dim=(2, 3)) @ tb.t())
        if ta is not None and mask[3] and bias is not None:
            terms[3].append(ta.t() @ g.sum(dim=(2, 3)))
        return tuple(sum(t) if t else (torch.zeros_like(like[i]) if mask[i] else g.new_empty(0))
                     for i, t in enumerate(terms))

    return jvp


@dataclasses.dataclass(frozen=True)
class OpArgs:
    """The ops' non-tensor arguments as one object, for ``torch.autograd.Function.apply``.

    torch.func counts a list argument of an autograd.Function as several pytree
    leaves but hands its jvp one tangent for it (torch.func.hessian then fails
    to unflatten); one object is one leaf.
    """
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    output_mask: Tuple[bool, ...] = ()

    @property
    def conv_args(self):
        return (self.stride, self.padding, self.dilation, self.groups)


class _Function(torch.autograd.Function):
    """autograd.Function without the per-call ``inspect.signature`` outside torch.func.

    Function.apply binds the arguments to forward's signature on every call when
    setup_context is defined (about 40 us, as much as the rest of a small layer's
    call); every call here passes all arguments positionally, so outside torch.func
    transforms this goes straight to the C++ apply, as Function.apply then does.
    """

    @classmethod
    def apply(cls, *args):
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*_unwrap_dead_wrappers(args))


def make_autograd_functions(forward_op, backward_op):
    """``torch.autograd.Function`` classes for a (forward, backward) op pair: what dynamic_conv2d calls.

    The ops' own ``torch.library.register_autograd`` formulas serve callers of
    ``torch.ops.chanflex.*``; its generated wrapper has no setup_context (torch.func's
    grad, vjp, jacrev and per-sample gradients refuse it: pytorch/pytorch#168393) and
    no forward mode. These classes have both, with the same formulas, which call
    the classes again (so every order is differentiable).

    Both classes have vmap rules (make_vmap_rules); returns the forward's class,
    what dynamic_conv2d applies.
    """
    class DynamicConv2dFunction(_Function):
        @staticmethod
        def forward(x, weight, attn, bias, args):
            return forward_op(x, weight, attn, bias, *args.conv_args)

        @staticmethod
        def vmap(info, in_dims, x, weight, attn, bias, args):
            return forward_rule(info, in_dims[:4], x, weight, attn, bias, *args.conv_args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            *tensors, args = inputs
            setup_context(ctx, (*tensors, *args.conv_args), output)
            ctx.save_for_forward(*tensors)

        @staticmethod
        def backward(ctx, grad_out):
            return (*first_backward(ctx, grad_out)[:4], None)

        @staticmethod
        def jvp(ctx, tx, tw, ta, tb, _):
            x, weight, attn, bias = ctx.saved_tensors
            out_shape = check_dynamic_conv2d_args(x, weight, attn, bias, *ctx.conv_args)
            tangent = jacobian_vector_product(lambda xx, ww, aa: forward_fn(xx, ww, aa, None, *ctx.conv_args),
                                              x, weight, attn, bias, tx, tw, ta, tb, out_shape)
            return tangent if tangent is not None else x.new_zeros(out_shape)

    class DynamicConv2dBackwardFunction(_Function):
        @staticmethod
        def forward(grad_out, x, weight, attn, bias, args):
            return backward_op(grad_out, x, weight, attn, bias, *args.conv_args, list(args.output_mask))

        @staticmethod
        def vmap(info, in_dims, grad_out, x, weight, attn, bias, args):
            return backward_rule(info, in_dims[:5], grad_out, x, weight, attn, bias, *args.conv_args,
                                 list(args.output_mask))

        @staticmethod
        def setup_context(ctx, inputs, output):
            *tensors, args = inputs
            setup_backward_context(ctx, (*tensors, *args.conv_args, list(args.output_mask)), output)
            ctx.output_mask = args.output_mask
            ctx.save_for_forward(*tensors)

        @staticmethod
        def backward(ctx, *grads):
            return (*double_backward(ctx, *grads)[:5], None)

        @staticmethod
        def jvp(ctx, *tangents):
            return backward_jvp(ctx, *tangents)

    # The formulas call functions with the ops' signatures: these, so that each order is differentiable.
    def forward_fn(x, weight, attn, bias, stride, padding, dilation, groups):
        return DynamicConv2dFunction.apply(x, weight, attn, bias, OpArgs(stride, padding, dilation, groups))

    def backward_fn(grad_out, x, weight, attn, bias, stride, padding, dilation, groups, output_mask):
        if not _differentiated((grad_out, x, weight, attn, bias)):  # first order: the op alone is quicker
            return backward_op(grad_out, x, weight, attn, bias, stride, padding, dilation, groups, output_mask)
        args = OpArgs(stride, padding, dilation, groups, tuple(output_mask))
        return DynamicConv2dBackwardFunction.apply(grad_out, x, weight, attn, bias, args)

    first_backward = make_backward(backward_fn)
    double_backward = make_double_backward(forward_fn, backward_fn)
    backward_jvp = make_backward_jvp(backward_fn)
    forward_rule, backward_rule = make_vmap_rules(forward_fn, backward_fn)
    return DynamicConv2dFunction


# --- vmap ---------------------------------------------------------------------

def _vmapped(t: Optional[torch.Tensor], dim: Optional[int], size: int) -> Optional[torch.Tensor]:
    """t with its vmapped dimension first; an unbatched t repeated ``size`` times (a view)."""
    if t is None:
        return None
    return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)


def _fold(t: torch.Tensor) -> torch.Tensor:
    """(V, B, ...) -> (V * B, ...): the vmapped dimension folded into the batch."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _at(t: Optional[torch.Tensor], dim: Optional[int], index: int) -> Optional[torch.Tensor]:
    return t if t is None or dim is None else t.select(dim, index)


def make_vmap_rules(forward_fn, backward_fn):
    """torch.vmap rules for a (forward, backward) op pair, so vmap never takes torch's per-slice fallback.

    The per-sample arguments (x, attn, grad_out) batched over vmap's dimension V
    fold into the op's batch: one call of batch V * B. Kernels (weight, bias)
    batched over V (model ensembles), or the kernels' gradients asked for one per
    vmapped slice (per-sample gradients), are a loop of V calls, as separate
    convolutions need. They are the autograd.Function classes' ``vmap``
    staticmethods; forward_fn and backward_fn (make_autograd_functions) apply the
    classes again, so transforms outside the vmap still see them.
    """
    def forward_rule(info, in_dims, x, weight, attn, bias, stride, padding, dilation, groups):
        x_dim, weight_dim, attn_dim, bias_dim = in_dims[:4]
        size = info.batch_size
        if weight_dim is None and bias_dim is None:
            xs, attns = _vmapped(x, x_dim, size), _vmapped(attn, attn_dim, size)
            y = forward_fn(_fold(xs), weight, _fold(attns), bias, stride, padding, dilation, groups)
            return y.reshape(size, xs.shape[1], *y.shape[1:]), 0
        return torch.stack([
            forward_fn(*(_at(t, d, v) for t, d in zip((x, weight, attn, bias), in_dims)),
                       stride, padding, dilation, groups)
            for v in range(size)]), 0

    def backward_rule(info, in_dims, grad_out, x, weight, attn, bias, stride, padding, dilation, groups,
                      output_mask):
        tensors = (grad_out, x, weight, attn, bias)
        size = info.batch_size
        kernels_batched = in_dims[2] is not None or in_dims[4] is not None
        # dW and dbias sum over the batch: folded, they would sum over the vmapped slices too.
        if not kernels_batched and not output_mask[1] and not output_mask[3]:
            grad_dim, x_dim, _, attn_dim, _ = in_dims[:5]
            gs, xs, attns = (_vmapped(grad_out, grad_dim, size), _vmapped(x, x_dim, size),
                             _vmapped(attn, attn_dim, size))
            grads = backward_fn(_fold(gs), _fold(xs), weight, _fold(attns), bias, stride, padding, dilation, groups,
                                output_mask)
            batch = xs.shape[1]
            out = tuple(g.reshape(size, batch, *g.shape[1:]) if need else g
                        for g, need in zip(grads, output_mask))
            return out, tuple(0 if need else None for need in output_mask)
        slices = [backward_fn(*(_at(t, d, v) for t, d in zip(tensors, in_dims)), stride, padding, dilation, groups,
                              output_mask) for v in range(size)]
        out = tuple(torch.stack([s[i] for s in slices]) if need else slices[0][i]
                    for i, need in enumerate(output_mask))
        return out, tuple(0 if need else None for need in output_mask)

    return forward_rule, backward_rule


# forward op name -> the op, and the autograd.Function dynamic_conv2d calls when differentiated
_FORWARD_OPS = {}
_AUTOGRAD_FUNCTIONS = {}


def register_op_autograd(forward_name: str, backward_name: str) -> None:
    """Autograd for a (forward, backward) pair of dynamic_conv2d ops, to any order.

    Shared by the compiled ops and the Triton ones; the names are "chanflex::..." ops
    with the schemas of chanflex::dynamic_conv2d and chanflex::dynamic_conv2d_backward.
    """
    forward_op = getattr(torch.ops.chanflex, forward_name.split("::")[1])
    backward_op = getattr(torch.ops.chanflex, backward_name.split("::")[1])
    torch.library.register_autograd(forward_name, make_backward(backward_op), setup_context=setup_context)
    torch.library.register_autograd(backward_name, make_double_backward(forward_op, backward_op),
                                    setup_context=setup_backward_context)
    _FORWARD_OPS[forward_name] = forward_op
    _AUTOGRAD_FUNCTIONS[forward_name] = make_autograd_functions(forward_op, backward_op)


register_op_autograd("chanflex::dynamic_conv2d", "chanflex::dynamic_conv2d_backward")
register_op_autograd("chanflex::dynamic_conv2d_cuda", "chanflex::dynamic_conv2d_backward_cuda")


# --- FLOP counting (torch.utils.flop_counter.FlopCounterMode) ----------------

def _conv_macs(x_shape, weight_shape, out_shape) -> int:
    """Multiply-accumulates of the convolution proper: B * C_out * H_out * W_out * (C_in/groups) * kh * kw."""
    batch = x_shape[0]
    _, out_channels, group_in, kh, kw = weight_shape
    return batch * out_channels * out_shape[2] * out_shape[3] * group_in * kh * kw


def _mix_macs(x_shape, weight_shape, bias_shape) -> int:
    """Mixing each sample's kernel (and bias) from the K kernels: B * K * (|W| + C_out)."""
    size = math.prod(weight_shape[1:])
    return x_shape[0] * weight_shape[0] * (size + (bias_shape[1] if bias_shape is not None else 0))


@register_flop_formula([torch.ops.chanflex.dynamic_conv2d, torch.ops.chanflex.dynamic_conv2d_cuda])
def _dynamic_conv2d_flops(x_shape, weight_shape, attn_shape, bias_shape, *args, out_shape=None, **kwargs) -> int:
    """2 FLOPs per multiply-accumulate: the conv plus the kernel mixing."""
    return 2 * (_conv_macs(x_shape, weight_shape, out_shape) + _mix_macs(x_shape, weight_shape, bias_shape))


@register_flop_formula([torch.ops.chanflex.dynamic_conv2d_backward, torch.ops.chanflex.dynamic_conv2d_backward_cuda])
def _dynamic_conv2d_backward_flops(grad_shape, x_shape, weight_shape, attn_shape, bias_shape, stride, padding,
                                   dilation, groups, output_mask, *args, out_shape=None, **kwargs) -> int:
    """dx: one transposed conv (and a re-mix); dW and dattn: one conv-sized
    correlation per sample, then a K-fold scatter (dW) and dot (dattn)."""
    conv = _conv_macs(x_shape, weight_shape, grad_shape)
    mix = _mix_macs(x_shape, weight_shape, bias_shape)
    need_x, need_w, need_attn, _ = output_mask
    macs = (conv + mix) if need_x else 0
    if need_w or need_attn:
        macs += conv + mix * (int(need_w) + int(need_attn))
    return 2 * macs
