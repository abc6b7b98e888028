"""Frozen linear weights stored in float8 (`transformer_dtype = "float8"`).

A storage format, not an architecture change: `Float8Linear` holds an nn.Linear's weight as
float8_e4m3fn with one float32 scale per output row, and dequantizes it to the compute dtype in
its forward. It replaces the base layer of peft's LoRA linears (`lora_layer.base_layer`) after
LoRA was injected, so LoRA weights and names are untouched. The backward keeps the float8
weight, not a dequantized copy.

With `float8_matmul = true` the products themselves run in float8 (`torch._scaled_mm`, which takes
one scale per row of each operand): the forward quantizes each input token (row) to float8 with its
own scale and multiplies by the stored weight as it is; the backward folds the weight's row scales
into the incoming gradient, quantizes that per token and multiplies by the stored weight too. No
dequantized weight is made at all, and float8 tensor cores (Ada, Hopper and later) do twice the
bf16 rate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = torch.finfo(FLOAT8).max  # 448


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 rows, float32 scale of shape (rows, 1)) with t ~ t8 * scale, for a 2-D weight,
    activation or gradient: each row gets its own scale."""
    t = t.detach().float()
    scale = t.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FLOAT8_MAX
    return (t / scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8), scale


def dequantize(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (w8.to(torch.float32) * scale).to(dtype)


def supports_float8_matmul(in_features: int, out_features: int) -> bool:
    # _scaled_mm needs both dimensions of the weight in multiples of 16.
    return in_features % 16 == 0 and out_features % 16 == 0


def float8_matmul(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, bias, out_dtype) -> torch.Tensor:
    """x @ (w8 * scale).T (+ bias) as one float8 product: x quantized per row (token)."""
    rows = x.reshape(-1, x.shape[-1])
    x8, x_scale = quantize_rows(rows)
    # _scaled_mm wants the second operand column-major: w8 (out, in) transposed is exactly that.
    out = torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=scale.t(), out_dtype=out_dtype)
    out = out if bias is None else out + bias  # not _scaled_mm's bias: not every backend takes it with row scales
    return out.reshape(*x.shape[:-1], w8.shape[0])


def float8_matmul_grad_input(grad: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad @ (w8 * scale) as one float8 product: the weight's row scales go into the gradient
    (they lie along the reduced dimension, where _scaled_mm takes no scale)."""
    rows = grad.reshape(-1, grad.shape[-1])
    g8, g_scale = quantize_rows(rows.float() * scale.t())
    # The second operand must be column-major: a transposed float8 copy (1 byte per weight, freed after).
    w8_cols = w8.t().contiguous().t()
    ones = torch.ones(1, w8.shape[1], device=w8.device, dtype=torch.float32)
    out = torch._scaled_mm(g8, w8_cols, scale_a=g_scale, scale_b=ones, out_dtype=grad.dtype)
    return out.reshape(*grad.shape[:-1], w8.shape[1])


class _Float8MatmulFn(torch.autograd.Function):
    # As _Float8LinearFn, but both products in float8 (see the module docstring).
    @staticmethod
    def forward(ctx, x, w8, scale, bias):
        ctx.save_for_backward(w8, scale)
        return float8_matmul(x, w8, scale, bias, x.dtype)

    @staticmethod
    def backward(ctx, grad):
        w8, scale = ctx.saved_tensors
        grad_x = float8_matmul_grad_input(grad, w8, scale) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class _Float8LinearFn(torch.autograd.Function):
    # Only the input gets a gradient (the weight and bias are frozen). Saving w8 and the scale
    # instead of the dequantized weight keeps the backward's memory at 1 byte per weight.
    @staticmethod
    def forward(ctx, x, w8, scale, bias):
        ctx.save_for_backward(w8, scale)
        return F.linear(x, dequantize(w8, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        w8, scale = ctx.saved_tensors
        grad_x = grad @ dequantize(w8, scale, grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class Float8Linear(nn.Module):
    """A frozen nn.Linear whose weight is stored in float8; computes in `dtype` (or the autocast dtype)."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, matmul: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = dtype
        # Shapes _scaled_mm cannot take keep the dequantizing path.
        self.matmul = matmul and supports_float8_matmul(self.in_features, self.out_features)
        w8, scale = quantize_rows(linear.weight)
        # Not persistent: derived from the base weights, which checkpoints never hold.
        self.register_buffer("weight_fp8", w8, persistent=False)
        self.register_buffer("weight_scale", scale, persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else self.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        fn = _Float8MatmulFn if self.matmul else _Float8LinearFn
        return fn.apply(x.to(dtype), self.weight_fp8, self.weight_scale, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, float8_e4m3fn"
                + (", float8 matmul" if self.matmul else ""))


def quantize_lora_base_layers(modules: list[nn.Module], dtype: torch.dtype, matmul: bool = False) -> int:
    """Replace the nn.Linear base layer of every peft LoRA linear inside `modules` by a
    Float8Linear (computing in float8 when `matmul`); returns how many were replaced. Only
    loaded (not meta) layers."""
    count = 0
    for module in modules:
        for sub in module.modules():
            base = getattr(sub, "base_layer", None)
            if isinstance(sub, LoraLinear) and type(base) is nn.Linear and not base.weight.is_meta:
                sub.base_layer = Float8Linear(base, dtype, matmul)
                count += 1
    return count
