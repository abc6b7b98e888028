"""Check which SDPA backends run a full-width Flux block forward+backward on this GPU.

Usage: python bench/attention_backends.py [--tokens 4608]
"""
import argparse
import time

import torch
from diffusers import FluxTransformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, default=4096)
args = ap.parse_args()
side = int(args.tokens ** 0.5)
torch.manual_seed(0)
with torch.device("cuda"):
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                                   guidance_embeds=True, axes_dims_rope=(16, 56, 56)).to(torch.bfloat16)
rows = torch.arange(side).view(-1, 1).expand(side, side)
img_ids = torch.stack([torch.zeros_like(rows), rows, rows.T], -1).reshape(-1, 3).cuda()
inputs = dict(hidden_states=torch.randn(1, side * side, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True),
              encoder_hidden_states=torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16),
              pooled_projections=torch.randn(1, 768, device="cuda", dtype=torch.bfloat16),
              timestep=torch.tensor([0.5], device="cuda"), guidance=torch.tensor([1.0], device="cuda"),
              img_ids=img_ids, txt_ids=torch.zeros(512, 3, device="cuda", dtype=torch.long), return_dict=False)
for backend in [SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, None]:
    try:
        ctx = sdpa_kernel([backend]) if backend is not None else torch.autocast("cuda", enabled=False)
        with ctx:
            torch.cuda.synchronize(); t = time.perf_counter()
            out = model(**inputs)[0]
            out.float().pow(2).mean().backward()
            torch.cuda.synchronize()
        print(f"{backend}: ok {time.perf_counter() - t:.3f} s, out finite {torch.isfinite(out).all().item()}", flush=True)
    except Exception as e:  # report and go on to the next backend
        print(f"{backend}: FAILED {str(e).splitlines()[0][:150]}", flush=True)
        break
