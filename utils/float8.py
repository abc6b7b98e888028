"""Frozen linear weights stored in float8 (`transformer_dtype = "float8"`).

A storage format, not an architecture change: `Float8Linear` holds an nn.Linear's weight as
float8_e4m3fn with one float32 scale per output row, and dequantizes it to the compute dtype in
its forward. It replaces the base layer of peft's LoRA linears (`lora_layer.base_layer`) after
LoRA was injected, so LoRA weights and names are untouched. The backward keeps the float8
weight, not a dequantized copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = torch.finfo(FLOAT8).max  # 448


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, float32 scale of shape (rows, 1)) with weight ~ w8 * scale."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FLOAT8_MAX
    return (w / scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8), scale


def dequantize(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (w8.to(torch.float32) * scale).to(dtype)


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

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = dtype
        w8, scale = quantize_rows(linear.weight)
        # Not persistent: derived from the base weights, which checkpoints never hold.
        self.register_buffer("weight_fp8", w8, persistent=False)
        self.register_buffer("weight_scale", scale, persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else self.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        out = _Float8LinearFn.apply(x.to(dtype), self.weight_fp8, self.weight_scale, bias)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8_e4m3fn"


def quantize_lora_base_layers(modules: list[nn.Module], dtype: torch.dtype) -> int:
    """Replace the nn.Linear base layer of every peft LoRA linear inside `modules` by a
    Float8Linear; returns how many were replaced. Only loaded (not meta) layers."""
    from peft.tuners.lora import Linear as LoraLinear

    count = 0
    for module in modules:
        for sub in module.modules():
            base = getattr(sub, "base_layer", None)
            if isinstance(sub, LoraLinear) and type(base) is nn.Linear and not base.weight.is_meta:
                sub.base_layer = Float8Linear(base, dtype)
                count += 1
    return count
