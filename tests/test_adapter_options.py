"""Adapter options: which modules get the adapter (target_include / target_exclude), LoRA+ (a larger
learning rate for lora_B) and EMA of the trained weights. Each changes what it names and nothing
else; the defaults build exactly what they built before."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from config.training import AdapterConfig
from models.flux import FluxConfig, FluxModel
from parallel.stages import describe_targets
from saving.export import lora_state_dict, save_lora
from training.lora import add_lora, init_lora, load_lora_into
from training.objective import training_example
from training.preflight import check_inputs
from training.weights import load_weights
from utils.errors import ConfigError

CONFIG = Path("/configs/train.toml")  # only named in the messages


def flux(tiny_models) -> FluxModel:
    return FluxModel(FluxConfig(type="flux", diffusers_path=str(tiny_models / "flux"), dtype="float32"))


def lora_modules(model, adapter) -> list[str]:
    transformer = model.build_empty_transformer()
    add_lora(model, transformer, adapter)
    return [n for n, m in transformer.named_modules() if hasattr(m, "lora_A")], transformer


def test_include_and_exclude_select_modules(tiny_models):
    model = flux(tiny_models)
    default, _ = lora_modules(model, AdapterConfig(rank=4, alpha=4.0))
    # only the single blocks, plus their modulation layers
    chosen, transformer = lora_modules(model, AdapterConfig(rank=4, alpha=4.0, target_include=[r"norm\.linear$"],
                                                            target_exclude=[r"^transformer_blocks\."]))
    expected = [n for n in default if n.startswith("single_transformer_blocks.")]
    expected += [f"single_transformer_blocks.{i}.norm.linear" for i in range(2)]
    assert sorted(chosen) == sorted(expected)
    # a whole name never matches another module that ends with it (the final proj_out is not a
    # single block's proj_out)
    only_final, _ = lora_modules(model, AdapterConfig(rank=4, alpha=4.0, target_modules=["to_q"],
                                                      target_include=["^proj_out$"]))
    assert "proj_out" in only_final and "single_transformer_blocks.0.proj_out" not in only_final
    text = describe_targets(transformer)
    assert text.splitlines()[0] == f"adapter on {len(expected)} modules:"
    assert "single_transformer_blocks.{0-1}: norm.linear, proj_mlp, proj_out, attn.to_q, attn.to_k, attn.to_v" in text
    # the default is unchanged by the options' existence
    assert AdapterConfig().target_include == [] and AdapterConfig().target_exclude == []


@pytest.mark.parametrize("keys, message", [
    ({"target_include": [r"norm\.linear$", "modulation"]},
     "adapter.target_include[1]: 'modulation' matches no linear module of the flux transformer"),
    ({"target_exclude": ["norm_out"]}, "adapter.target_exclude[0]: 'norm_out' matches none of the 34 targeted"),
    ({"target_exclude": ["."]}, "adapter.target_exclude: leaves no module to train"),
])
def test_a_pattern_that_finds_nothing_is_a_config_error(tiny_models, keys, message):
    with pytest.raises(ConfigError) as info:
        check_inputs(flux(tiny_models), CONFIG, AdapterConfig(rank=4, alpha=4.0, **keys))
    assert str(info.value).startswith(f"{CONFIG}: {message}")
    assert "\n" not in str(info.value)


def test_lora_plus_gives_lora_b_a_larger_learning_rate():
    from config.training import OptimizerConfig
    from training.optimizers import build_optimizer, lora_plus_groups

    def first_step(ratio):
        a, b = torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(3, 4))
        names = {id(a): "x.to_q.lora_A.default.weight", id(b): "x.to_q.lora_B.default.weight"}
        groups = lora_plus_groups([a, b], names, 1e-2, ratio)
        opt = build_optimizer(groups, OptimizerConfig(lr=1e-2, weight_decay=0.0), 0.0, None)
        a.grad, b.grad = torch.full_like(a, 0.5), torch.full_like(b, 0.5)
        opt.step()
        return (1 - a.detach()).abs().max().item(), (1 - b.detach()).abs().max().item(), groups

    params = [torch.nn.Parameter(torch.ones(1))]
    assert lora_plus_groups(params, {}, 1e-2, None) is params  # no LoRA+: one group, as before
    a_step, b_step, _ = first_step(None)
    a_plus, b_plus, groups = first_step(16.0)
    assert [len(g["params"]) for g in groups] == [1, 1]
    assert a_plus == pytest.approx(a_step) and a_step == pytest.approx(1e-2, rel=1e-4)  # Adam's first step: lr
    assert b_plus == pytest.approx(16 * b_step, rel=1e-4)


def dora_setup(tiny_models, adapter):
    """The tiny Flux transformer with its weights loaded and the adapter initialised, as a stage loads."""
    from utils.seeding import generator_for

    model = flux(tiny_models)
    transformer = model.build_empty_transformer()
    add_lora(model, transformer, adapter)
    names = [n for n, _ in transformer.named_children()]
    load_weights(model, transformer, names, torch.device("cpu"))
    init_lora(transformer, names, adapter, torch.device("cpu"), seed=0)
    latents = torch.randn(2, 16, 8, 8, generator=generator_for(1))
    text = {"text": torch.randn(2, 6, 32, generator=generator_for(2)), "pooled": torch.randn(2, 32, generator=generator_for(3))}
    inputs, _ = training_example(model, latents, text, [generator_for(4, i) for i in range(2)])
    return model, transformer, model.input_fields.unpack(inputs)


def test_dora_starts_as_the_base_model_and_loads_back_through_diffusers(tiny_models, tmp_path):
    from diffusers import FluxTransformer2DModel

    adapter = AdapterConfig(rank=4, alpha=8.0, use_dora=True)
    model, transformer, inputs = dora_setup(tiny_models, adapter)
    base = FluxTransformer2DModel.from_pretrained(tiny_models / "flux" / "transformer")
    with torch.no_grad():
        # B = 0 and m = the base rows' norms: the adapted model is the base model
        torch.testing.assert_close(model.reference_forward(transformer, inputs), model.reference_forward(base, inputs))
        # a trained adapter: B and the magnitudes moved
        g = torch.Generator().manual_seed(5)
        for n, p in transformer.named_parameters():
            if "lora_B" in n or "lora_magnitude_vector" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        ours = model.reference_forward(transformer, inputs)
    files = save_lora(model, lora_state_dict(transformer), adapter, tmp_path / "dora", torch.float32)
    # DoRA: the diffusers file only (the original layout has no magnitudes)
    assert [f.name for f in files] == ["pytorch_lora_weights.safetensors"]
    base.load_lora_adapter(str(tmp_path / "dora" / "pytorch_lora_weights.safetensors"), prefix="transformer")
    assert any("lora_magnitude_vector" in n for n, _ in base.named_parameters())
    with torch.no_grad():
        theirs = model.reference_forward(base, inputs)
    assert not torch.allclose(ours, model.reference_forward(FluxTransformer2DModel.from_pretrained(
        tiny_models / "flux" / "transformer"), inputs), atol=1e-4)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # and it starts a run again (init_from_existing) with the same weights
    _, again, _ = dora_setup(tiny_models, adapter)
    load_lora_into(model, again, tmp_path / "dora", adapter)
    with torch.no_grad():
        torch.testing.assert_close(model.reference_forward(again, inputs), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_lokr_and_loha_start_as_the_base_model_and_load_back(tiny_models, tmp_path, kind):
    """LoKr and LoHa through peft: the adapter starts as the base model; once trained, its saved
    file gives the same outputs loaded by diffusers (LoKr: load_lora_adapter) or peft (LoHa:
    diffusers has no LoHa loader), and starts a run again through init_from_existing."""
    from diffusers import FluxTransformer2DModel
    from peft import LoHaConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = AdapterConfig(type=kind, rank=4, alpha=2.0)
    model, transformer, inputs = dora_setup(tiny_models, adapter)
    marker = f"{kind}_" if kind == "lokr" else "hada_"
    trained = {n: p for n, p in transformer.named_parameters() if marker in n}
    assert trained and all(p.requires_grad for p in trained.values())
    base = FluxTransformer2DModel.from_pretrained(tiny_models / "flux" / "transformer")
    with torch.no_grad():
        torch.testing.assert_close(model.reference_forward(transformer, inputs), model.reference_forward(base, inputs))
        g = torch.Generator().manual_seed(5)
        for p in trained.values():  # a trained adapter: every factor moved (the zero one too)
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        ours = model.reference_forward(transformer, inputs)
        assert not torch.allclose(ours, model.reference_forward(base, inputs), atol=1e-4)
    files = save_lora(model, lora_state_dict(transformer), adapter, tmp_path / kind, torch.float32)
    assert [f.name for f in files] == ["pytorch_lora_weights.safetensors"]  # no original (ComfyUI) layout
    if kind == "lokr":
        base.load_lora_adapter(str(files[0]), prefix="transformer")
    else:
        state = {k.removeprefix("transformer."): v for k, v in load_file(files[0]).items()}
        modules = sorted({k.rpartition(".hada_")[0] for k in state})
        # the scale is in hada_w1_a: alpha = r applies the file as it is
        base = inject_adapter_in_model(LoHaConfig(r=4, alpha=4, target_modules=modules), base)
        assert not set_peft_model_state_dict(base, state).unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(model.reference_forward(base, inputs), ours, rtol=1e-5, atol=1e-5)
    _, again, _ = dora_setup(tiny_models, adapter)
    load_lora_into(model, again, tmp_path / kind, adapter)
    with torch.no_grad():
        torch.testing.assert_close(model.reference_forward(again, inputs), ours, rtol=1e-5, atol=1e-5)
    higher = AdapterConfig(type=kind, rank=8, alpha=2.0, init_from_existing=str(tmp_path / kind))
    if kind == "loha":
        # another rank is another factoring: one line naming the module and the rank to set
        with pytest.raises(ConfigError, match=r"is factored as .*; this adapter \(rank 8\) as .*: set adapter.rank"):
            check_inputs(model, CONFIG, higher)
    else:
        # peft keeps w2 whole at rank 8 where rank 4 factored it: the file's product fills it, exactly
        check_inputs(model, CONFIG, higher)
        _, again, _ = dora_setup(tiny_models, higher)
        assert any(n.endswith("lokr_w2_a.default") for n, _ in transformer.named_parameters())
        assert not any(n.endswith("lokr_w2_a.default") for n, _ in again.named_parameters())
        load_lora_into(model, again, tmp_path / kind, higher)
        with torch.no_grad():
            torch.testing.assert_close(model.reference_forward(again, inputs), ours, rtol=1e-5, atol=1e-5)
