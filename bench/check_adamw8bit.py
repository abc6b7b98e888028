"""bitsandbytes' 8-bit AdamW through build_optimizer on a CUDA GPU (not testable on CPU), with and
without stochastic rounding: its state bytes against memory/estimate.py, tiny updates, a checkpoint
round trip and a small fit. Needs the requirements plus bitsandbytes:
    python3 bench/check_adamw8bit.py
"""
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config.training import OptimizerConfig, adamw8bit_missing
from memory.estimate import ParamInfo, optimizer_state_bytes
from training.optimizers import build_optimizer

print("adamw8bit_missing:", repr(adamw8bit_missing()))
dev = "cuda"
shapes = [(3072, 3072), (12288, 3072), (3072,), (1000,), (64, 64), (4095,), (4097,)]


def make(sr, values=None, lr=1e-3):
    params = [torch.nn.Parameter((torch.randn(s, device=dev, generator=torch.Generator(dev).manual_seed(i)) * 0.02)
                                 .to(torch.bfloat16) if values is None else torch.full(s, values, device=dev,
                                 dtype=torch.bfloat16)) for i, s in enumerate(shapes)]
    cfg = OptimizerConfig(type="adamw8bit", lr=lr, weight_decay=0.0, stochastic_rounding=sr)
    opt = build_optimizer(params, cfg, 1.0, None, {id(p): f"p{i}" for i, p in enumerate(params)}, 0, low_memory=True)
    return params, opt, cfg


for sr in (False, True):
    params, opt, cfg = make(sr)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    real = sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items()
               if isinstance(v, torch.Tensor) and v.dim() > 0 and not k.startswith("qmap"))
    est = sum(optimizer_state_bytes(ParamInfo(tuple(p.shape), p.dtype, True), cfg) for p in params)
    print(f"state bytes sr={sr}: real {real} estimate {est} equal={real == est}; dtypes",
          sorted({str(v.dtype) for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)}),
          "params still bf16:", all(p.dtype == torch.bfloat16 for p in params))

# tiny updates: weights 1.0, constant gradient, lr 1e-4 for 50 steps: expected mean 0.995
for sr in (False, True):
    params, opt, _ = make(sr, values=1.0, lr=1e-4)
    for _ in range(50):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    mean = torch.cat([p.float().flatten() for p in params]).double().mean().item()
    print(f"tiny updates sr={sr}: mean weight {mean:.6f} (float32 math: {1 - 50e-4:.6f})")


def run(steps, sr, state=None):
    params, opt, _ = make(sr, values=1.0, lr=1e-3)
    if state is not None:
        with torch.no_grad():
            for p, v in zip(params, state[0]):
                p.copy_(v)
        opt.load_state_dict(state[1])
    g = torch.Generator(dev).manual_seed(5)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, device=dev, generator=g).to(p.dtype)
        opt.step()
    return params, opt


for sr in (True, False):
    straight, _ = run(6, sr)
    first, opt = run(3, sr)
    state = ([p.detach().clone() for p in first], copy.deepcopy(opt.state_dict()))
    # same noise for the gradients of steps 4-6: regenerate from the same seed, skipping 3 steps
    params, opt2, _ = make(sr, values=1.0, lr=1e-3)
    with torch.no_grad():
        for p, v in zip(params, state[0]):
            p.copy_(v)
    opt2.load_state_dict(state[1])
    g = torch.Generator(dev).manual_seed(5)
    for step in range(6):
        grads = [torch.randn(p.shape, device=dev, generator=g).to(p.dtype) for p in params]
        if step < 3:
            continue
        for p, gr in zip(params, grads):
            p.grad = gr
        opt2.step()
    same = all(torch.equal(a, b) for a, b in zip(straight, params))
    print(f"checkpoint round trip sr={sr}: resumed == straight: {same}")

# a fit: y = x @ W, W learned in bf16 with adamw8bit + SR at a small lr
torch.manual_seed(0)
true_w = torch.randn(256, 64, device=dev)
for sr in (False, True):
    w = torch.nn.Parameter(torch.zeros(256, 64, device=dev, dtype=torch.bfloat16) + 1.0)
    opt = build_optimizer([w], OptimizerConfig(type="adamw8bit", lr=2e-4, weight_decay=0.0, stochastic_rounding=sr),
                          0.0, None, {id(w): "w"}, 0)
    g = torch.Generator(dev).manual_seed(0)
    losses = []
    for step in range(300):
        x = torch.randn(128, 256, device=dev, generator=g)
        loss = (x @ w.float() - x @ true_w).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"fit sr={sr}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
