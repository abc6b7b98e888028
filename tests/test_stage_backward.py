"""A pipeline stage's layers run their backward once a micro-batch.

DeepSpeed's pipeline engine runs one backward pass per floating-point output of a stage that is
not the last; FLUX.1's double blocks, behind both the image and the text states, then ran theirs
twice. `models/pipeline_layers.one_backward_pass` re-links the stage's outputs so that one pass
carries every output's gradient. These tests run DeepSpeed's own `_exec_backward_pass` on the
outputs of a tiny FLUX.1's first stage.
"""

from __future__ import annotations

import types

import torch
from deepspeed.runtime.pipe.engine import PipelineEngine

from models import get_model_class
from test_frozen_fields import lora_transformer
from training.objective import training_example


def deepspeed_backward(outputs: tuple, grads: list) -> None:
    """DeepSpeed's backward instruction for a stage that is not the last, on these outputs and
    the gradients the next stage sent back for them."""
    engine = types.SimpleNamespace(
        optimizer=object(), is_last_stage=lambda: False, wall_clock_breakdown=lambda: False,
        is_pipe_partitioned=False, is_grad_partitioned=False, using_bf16_optimizer=False, grad_layer=grads,
        pipe_buffers={"outputs": [outputs], "output_tensors": [None]})
    PipelineEngine._exec_backward_pass(engine, buffer_id=0)


def first_stage(tiny_models):
    cls = get_model_class("flux")
    model = cls(cls.config_class(type="flux", diffusers_path=str(tiny_models / "flux"), dtype="float32"))
    transformer, layers = lora_transformer(model)
    stage = [layer for layer in layers if layer.kind != "block" or "Double" in type(layer).__name__][:-1]
    assert [layer.kind for layer in stage] == ["input", "block", "block"]  # input + both double blocks
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 4, 6, generator=g)
    text = {"text": torch.randn(1, 8, 32, generator=g), "pooled": torch.randn(1, 32, generator=g)}
    inputs, _ = training_example(model, latents, text, [torch.Generator().manual_seed(1)])
    return transformer, stage, inputs


def backward_passes(transformer, stage, inputs, ends_stage: bool, run_backward) -> tuple[list[int], dict]:
    """How many times each block's backward ran, and the LoRA gradients."""
    transformer.zero_grad(set_to_none=True)
    stage[-1].ends_stage = ends_stage
    counts = []
    for layer in stage[1:]:
        weight = next(p for n, p in layer.named_parameters() if "lora_A" in n)
        counts.append(0)
        i = len(counts) - 1
        weight.register_hook(lambda grad, i=i: counts.__setitem__(i, counts[i] + 1))
    x = inputs
    for layer in stage:
        x = layer(x)
    floats = [t for t in x if t.is_floating_point()]
    assert len(floats) >= 2  # image and text states at least: what made the extra passes
    grads = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(floats)]
    run_backward(x, floats, grads)
    return counts, {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}


def test_a_stage_runs_its_backward_once_under_deepspeed_and_gets_the_same_gradients(tiny_models):
    transformer, stage, inputs = first_stage(tiny_models)
    once, reference = backward_passes(transformer, stage, inputs, False,
                                      lambda out, floats, grads: torch.autograd.backward(floats, grads))
    assert once == [1, 1]

    # Without the re-linking, DeepSpeed's instruction runs the double blocks once per output:
    # the cost this fixes (if DeepSpeed runs one pass some day, this fails: drop one_backward_pass).
    twice, plain = backward_passes(transformer, stage, inputs, False,
                                   lambda out, floats, grads: deepspeed_backward(out, grads))
    assert twice == [2, 2]

    counts, grads = backward_passes(transformer, stage, inputs, True,
                                    lambda out, floats, grads: deepspeed_backward(out, grads))
    assert counts == [1, 1]
    assert grads.keys() == reference.keys() and len(grads) > 0
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(plain[name], reference[name], rtol=1e-6, atol=1e-7, msg=name)


def test_the_last_output_refuses_to_drop_gradients(tiny_models):
    """If the other outputs' gradients have not arrived when the last output's pass runs (a
    DeepSpeed that calls backward differently), the step fails instead of training on a part."""
    transformer, stage, inputs = first_stage(tiny_models)

    def last_only(out, floats, grads):
        floats[-1].backward(grads[-1])

    try:
        backward_passes(transformer, stage, inputs, True, last_only)
    except RuntimeError as e:
        assert "got no gradient before the last one's backward pass" in str(e)
    else:
        raise AssertionError("the backward pass went on without the other outputs' gradients")
