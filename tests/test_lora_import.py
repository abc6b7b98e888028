"""init_from_existing reads LoRAs in every layout users hold: this trainer's saves (diffusers file,
folder, ComfyUI-layout file), diffusion-pipe's saves (an epoch folder with adapter_model.safetensors:
diffusers names for FLUX.1, original fused names with one shared A for HunyuanVideo) and kohya-style
files. Each is written here from a tiny model in that layout, and the loaded adapter must apply
exactly the file's weight change. In process, a few seconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from config.training import AdapterConfig
from models.flux import FluxConfig, FluxModel
from models.hunyuan_video import HunyuanVideoConfig, HunyuanVideoModel
from saving.export import save_lora
from training.lora import add_lora, read_lora_file
from utils.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_models import make_tiny_hunyuan_video  # noqa: E402

CONFIG = Path("/configs/train.toml")  # only named in the messages


@pytest.fixture(scope="module")
def tiny_hunyuan(tmp_path_factory) -> Path:
    return make_tiny_hunyuan_video(tmp_path_factory.mktemp("hunyuan"))


def materialised(model, adapter: AdapterConfig, seed: int = 0):
    """The tiny transformer with the adapter's LoRA layers, and LoRA weights for them whose A and B
    are both random, so every weight change is nonzero."""
    transformer = model.build_empty_transformer()
    add_lora(model, transformer, adapter)
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            # The transformer stays on the meta device: the values live in `lora` only.
            lora[name.replace(".default.", ".")] = torch.randn(p.shape, generator=generator)
    return transformer, lora


def changes(lora: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """scale * B @ A per module of a diffusers-named LoRA."""
    modules = {k.removesuffix(".lora_A.weight") for k in lora if k.endswith(".lora_A.weight")}
    return {m: scale * lora[f"{m}.lora_B.weight"] @ lora[f"{m}.lora_A.weight"] for m in modules}


def loaded_changes(model, transformer, path: Path, adapter: AdapterConfig) -> dict[str, torch.Tensor]:
    loaded = read_lora_file(model, transformer, path, adapter)
    scale = adapter.alpha / adapter.rank
    for a, b in loaded.values():
        assert a.shape[0] == adapter.rank and b.shape[1] == adapter.rank
    return {m: scale * b @ a for m, (a, b) in loaded.items()}


def assert_same_changes(expected, got):
    assert sorted(got) == sorted(expected)
    for m in expected:
        torch.testing.assert_close(got[m], expected[m], rtol=1e-5, atol=1e-5, msg=m)


def flux(tiny_models):
    return FluxModel(FluxConfig(type="flux", diffusers_path=str(tiny_models / "flux"), dtype="float32"))


def test_our_saves_load_exactly_from_every_file_we_write(tmp_path, tiny_models):
    model, adapter = flux(tiny_models), AdapterConfig(rank=4, alpha=8.0)
    transformer, lora = materialised(model, adapter)
    files = save_lora(model, lora, adapter, tmp_path / "final", torch.float32)
    expected = changes(lora, 2.0)
    # The folder (pytorch_lora_weights.safetensors), then each file we write beside it.
    for path in [tmp_path / "final"] + files:
        assert_same_changes(expected, loaded_changes(model, transformer, path, adapter))
    # Our diffusers file and our ComfyUI file give back exactly the trained A and B, not only B @ A.
    for path in [files[0], tmp_path / "final" / "lora_comfyui.safetensors"]:
        loaded = read_lora_file(model, transformer, path, adapter)
        for m, (a, b) in loaded.items():
            torch.testing.assert_close(a, lora[f"{m}.lora_A.weight"])
            torch.testing.assert_close(b, lora[f"{m}.lora_B.weight"])


def test_diffusion_pipe_flux_epoch_folder(tmp_path, tiny_models):
    # diffusion-pipe targets every linear of FLUX.1's blocks (the modulation linears too), alpha = rank,
    # and writes "diffusion_model." + diffusers names into <run>/epochN/adapter_model.safetensors.
    model = flux(tiny_models)
    every_linear = AdapterConfig(rank=4, alpha=4.0, target_modules=(
        r"(single_)?transformer_blocks\.\d+\.(norm1(_context)?\.linear|norm\.linear|attn\.(to_q|to_k|to_v|to_out\.0"
        r"|add_q_proj|add_k_proj|add_v_proj|to_add_out)|ff(_context)?\.net\.(0\.proj|2)|proj_mlp|proj_out)"))
    transformer, lora = materialised(model, every_linear, seed=1)
    epoch = tmp_path / "epoch3"
    epoch.mkdir()
    save_file({"diffusion_model." + k: v for k, v in lora.items()}, epoch / "adapter_model.safetensors")
    (epoch / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 4, "peft_type": "LORA"}))
    assert any(".norm1.linear." in k for k in lora)

    assert_same_changes(changes(lora, 1.0), loaded_changes(model, transformer, epoch, every_linear))

    # With our default targets (no modulation linears) the message says what to write instead.
    default = AdapterConfig(rank=4, alpha=4.0)
    ours = model.build_empty_transformer()
    add_lora(model, ours, default)
    with pytest.raises(ConfigError) as info:
        read_lora_file(model, ours, epoch, default)
    message = str(info.value)
    assert message.startswith(f"adapter.init_from_existing: {epoch / 'adapter_model.safetensors'} is not a LoRA of "
                              f"this flux adapter's target_modules: 0 of its ")
    target = message.split("adapter.target_modules = '")[1].rstrip("'")
    suggested = AdapterConfig(rank=4, alpha=4.0, target_modules=target)
    again = model.build_empty_transformer()
    add_lora(model, again, suggested)
    assert_same_changes(changes(lora, 1.0), loaded_changes(model, again, epoch, suggested))


def test_diffusion_pipe_hunyuan_video_original_layout_with_shared_a(tmp_path, tiny_hunyuan):
    # diffusion-pipe trains HunyuanVideo in Tencent's code: fused q/k/v (and a single block's
    # linear1) are one linear with one LoRA, whose A every part shares.
    model = HunyuanVideoModel(HunyuanVideoConfig(type="hunyuan-video", diffusers_path=str(tiny_hunyuan),
                                                 dtype="float32"))
    adapter = AdapterConfig(rank=4, alpha=4.0)
    transformer = model.build_empty_transformer()
    add_lora(model, transformer, adapter)
    layout, dims = model.keymap.original_modules(model.transformer_config())
    ours = {n.removesuffix(".lora_A.default.weight") for n, _ in transformer.named_parameters()
            if n.endswith(".lora_A.default.weight")}
    generator = torch.Generator().manual_seed(2)
    tensors, expected = {}, {}
    for entry in layout.entries:
        targeted = [d for d in entry.diffusers if d in ours]
        if not targeted:
            continue
        assert targeted == list(entry.diffusers)  # the default targets cover whole fused modules
        module = transformer.get_submodule(entry.diffusers[0])
        rows = sum(dims[d] for d in entry.part_dims) if entry.fused else module.base_layer.out_features
        a = torch.randn(4, module.base_layer.in_features, generator=generator)
        b = torch.randn(rows, 4, generator=generator)
        tensors[f"diffusion_model.{entry.original}.lora_A.weight"] = a
        tensors[f"diffusion_model.{entry.original}.lora_B.weight"] = b
        parts = torch.split(b, [dims[d] for d in entry.part_dims]) if entry.fused else [b]
        expected.update({d: part @ a for d, part in zip(entry.diffusers, parts)})
    assert any("img_attn_qkv" in k for k in tensors) and any("linear1" in k for k in tensors)
    epoch = tmp_path / "epoch1"
    epoch.mkdir()
    save_file(tensors, epoch / "adapter_model.safetensors")

    assert_same_changes(expected, loaded_changes(model, transformer, epoch, adapter))


def test_kohya_style_file_with_alpha(tmp_path, tiny_models):
    model, adapter = flux(tiny_models), AdapterConfig(rank=4, alpha=4.0)
    transformer, lora = materialised(model, adapter, seed=3)
    original = model.keymap.lora_to_original(lora, model.transformer_config(), prefix="")
    tensors = {}
    for key, value in original.items():
        module, kind = key.rsplit(".lora_", 1)
        kohya = "lora_unet_" + module.replace(".", "_")
        if kind == "A.weight":
            tensors[f"{kohya}.lora_down.weight"] = value
            # alpha / rank of the fused module (its rank is 3 or 4 x 4): written as kohya does, 1/2 here.
            tensors[f"{kohya}.alpha"] = torch.tensor(value.shape[0] / 2)
        else:
            tensors[f"{kohya}.lora_up.weight"] = value
    path = tmp_path / "kohya.safetensors"
    save_file(tensors, path)
    assert_same_changes(changes(lora, 0.5), loaded_changes(model, transformer, path, adapter))


def test_a_file_of_higher_rank_names_the_rank_to_set(tmp_path, tiny_models):
    model = flux(tiny_models)
    transformer, lora = materialised(model, AdapterConfig(rank=8, alpha=8.0))
    path = tmp_path / "rank8.safetensors"
    save_file({"transformer." + k: v for k, v in lora.items()}, path)
    small = AdapterConfig(rank=4, alpha=4.0)
    ours = model.build_empty_transformer()
    add_lora(model, ours, small)
    with pytest.raises(ConfigError, match=r"has rank 8 LoRAs \(e.g. .*\), adapter.rank = 4: set adapter.rank = 8$"):
        read_lora_file(model, ours, path, small)
    # A lower-rank file fills the rest with fresh directions that change nothing.
    big = AdapterConfig(rank=12, alpha=12.0)
    ours = model.build_empty_transformer()
    add_lora(model, ours, big)
    assert_same_changes(changes(lora, 1.0), loaded_changes(model, ours, path, big))


def test_an_untrained_comfyui_file_loads_as_zero_changes(tmp_path, tiny_models):
    # B = 0 everywhere (a save before the first step): no part of a fused module has a column to
    # keep, and each still loads, at the adapter's rank, changing nothing.
    model, adapter = flux(tiny_models), AdapterConfig(rank=4, alpha=4.0)
    transformer, lora = materialised(model, adapter)
    lora = {k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in lora.items()}
    save_lora(model, lora, adapter, tmp_path / "zero", torch.float32)
    got = loaded_changes(model, transformer, tmp_path / "zero" / "lora_comfyui.safetensors", adapter)
    assert_same_changes(changes(lora, 1.0), got)


@pytest.mark.slow
def test_flux_comfyui_file_loads_in_diffusers_exactly_at_the_released_width(tmp_path):
    # diffusers' kohya FLUX.1 converter hard-codes the released width (3072; linear1 split 3072 x 3 +
    # 12288), so the check runs there: one double and one single block, weights allocated, never
    # initialised (only the LoRA values are compared).
    from accelerate import init_empty_weights
    from diffusers import FluxPipeline, FluxTransformer2DModel

    config = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True)
    (tmp_path / "model" / "transformer").mkdir(parents=True)
    with init_empty_weights():
        transformer = FluxTransformer2DModel(**config)
    transformer.save_config(tmp_path / "model" / "transformer")
    model = FluxModel(FluxConfig(type="flux", diffusers_path=str(tmp_path / "model"), dtype="float32"))
    adapter = AdapterConfig(rank=2, alpha=4.0)
    _, lora = materialised(model, adapter, seed=4)
    files = save_lora(model, lora, adapter, tmp_path / "final", torch.float32)
    comfy = tmp_path / "final" / "lora_comfyui.safetensors"
    assert comfy in files

    converted = FluxPipeline.lora_state_dict(comfy)  # raises on any key it cannot place
    transformer = transformer.to_empty(device="cpu")
    FluxPipeline.load_lora_into_transformer(converted, network_alphas=None, transformer=transformer)
    loaded = {n.replace(".default_0.", "."): p for n, p in transformer.named_parameters() if "lora_" in n}
    # Every module of our LoRA, nothing else, and the same weight change (scale 2 inside B).
    assert_same_changes(changes(lora, 2.0), changes(loaded, 1.0))
    # The diffusers file of the same save loads to the same modules.
    assert sorted(FluxPipeline.lora_state_dict(files[0])) == sorted(converted)


def lycoris_change(parts: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """A LoKr / LoHa module's weight change by its definition (LyCORIS): scale * (w1 kron w2), or
    scale * (w1_a w1_b) * (w2_a w2_b), a factor given whole or as the product of its _a and _b."""
    def factor(name):
        return parts[name] if name in parts else parts[f"{name}_a"] @ parts[f"{name}_b"]
    if "hada_w1_a" in parts:
        return scale * factor("hada_w1") * factor("hada_w2")
    return scale * torch.kron(factor("lokr_w1"), factor("lokr_w2"))


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_lycoris_kohya_files_load_to_the_same_weight_changes(tmp_path, tiny_models, kind):
    """A LoKr / LoHa in the LyCORIS layout ComfyUI and sd-scripts read: "lora_unet_" + the original
    module name where FLUX.1 has the module unfused, "lycoris_" + the diffusers name where the
    original fuses it, each with an .alpha whose scale is LyCORIS's (alpha over the decomposed
    factor's rank; 1 when no factor is decomposed)."""
    from models.keymaps.flux import FluxKeymap
    from training.lora import read_lycoris_file

    model, adapter = flux(tiny_models), AdapterConfig(type=kind, rank=4, alpha=2.0)
    transformer = model.build_empty_transformer()
    add_lora(model, transformer, adapter)
    generator = torch.Generator().manual_seed(0)
    trained: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in transformer.named_parameters():
        if f".{kind if kind == 'lokr' else 'hada'}_" in name:
            module, _, part = name.removesuffix(".default").rpartition(".")
            trained.setdefault(module, {})[part] = torch.randn(p.shape, generator=generator)
    expected = {m: lycoris_change(parts, 2.0 / 4) for m, parts in trained.items()}
    table = FluxKeymap.for_config(model.transformer_config())
    tensors, names = {}, set()
    for module, parts in trained.items():
        entry = table.by_diffusers[module][0]
        name = ("lycoris_" + module if entry.fused else "lora_unet_" + entry.original).replace(".", "_")
        names.add(name.split("_")[0])
        decomposed = [p for p in ("lokr_w1", "lokr_w2", "hada_w1") if f"{p}_b" in parts]
        rank = parts[f"{decomposed[-1]}_b"].shape[0] if decomposed else None
        alpha = 3.0
        file_scale = alpha / rank if rank else 1.0
        for part, value in parts.items():
            # the file's own scale replaces ours in the scaled factor; the change stays the same
            scaled = part in ("lokr_w1", "lokr_w1_a", "hada_w1_a")
            tensors[f"{name}.{part}"] = value * (2.0 / 4 / file_scale) if scaled else value
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
        torch.testing.assert_close(lycoris_change({p: tensors[f"{name}.{p}"] for p in parts}, file_scale),
                                   expected[module])
    assert names == {"lycoris", "lora"}  # both namings are in the file
    path = tmp_path / f"{kind}.safetensors"
    save_file(tensors, path)
    loaded = read_lycoris_file(model, transformer, path, adapter)
    got: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in loaded.items():
        module, _, part = name.removesuffix(".default").rpartition(".")
        got.setdefault(module, {})[part] = value
    assert_same_changes(expected, {m: lycoris_change(parts, 2.0 / 4) for m, parts in got.items()})

    other = AdapterConfig(type="loha" if kind == "lokr" else "lokr", rank=4, alpha=2.0)
    with pytest.raises(ConfigError, match=f"is a {kind} file; adapter.type = '{other.type}'"):
        read_lycoris_file(model, transformer, path, other)
    with pytest.raises(ConfigError, match=f"is a {kind} file; adapter.type = 'lora'"):
        read_lora_file(model, transformer, path, AdapterConfig(rank=4))
    # sd-scripts' LoKr on FLUX.1's fused q, k, v: no exact split onto separate modules
    fused = {f"lora_unet_double_blocks_0_img_attn_qkv.{part}": v for part, v in
             {"lokr_w1": torch.zeros(4, 4), "lokr_w2": torch.zeros(24, 8), "alpha": torch.tensor(1.0)}.items()}
    save_file(fused, tmp_path / "fused.safetensors")
    with pytest.raises(ConfigError, match="LoKr/LoHa modules on 1 fused original modules"):
        read_lycoris_file(model, transformer, tmp_path / "fused.safetensors", AdapterConfig(type="lokr", rank=4))


def test_wan_kohya_names_are_original_names(tmp_path):
    """Wan's original layout differs from diffusers' by names only (self_attn.q = attn1.to_q):
    kohya files name the original modules ("lora_unet_blocks_0_self_attn_q"), for LoRA and LoKr."""
    from make_tiny_models import make_tiny_wan
    from models.keymaps.wan import WanKeymap
    from models.wan import WanConfig, WanModel
    from training.lora import read_lycoris_file

    model = WanModel(WanConfig(type="wan", diffusers_path=str(make_tiny_wan(tmp_path)), dtype="float32"))

    def kohya(module):
        return "lora_unet_" + WanKeymap.diffusers_to_original_key(module).replace(".", "_")

    adapter = AdapterConfig(rank=4, alpha=4.0)
    transformer, lora = materialised(model, adapter)
    assert "lora_unet_blocks_0_self_attn_q" in {kohya(k.rpartition(".lora_")[0]) for k in lora}
    tensors = {}
    for key, value in lora.items():
        module, kind = key.rsplit(".lora_", 1)
        tensors[f"{kohya(module)}.lora_{'down' if kind == 'A.weight' else 'up'}.weight"] = value
        tensors[f"{kohya(module)}.alpha"] = torch.tensor(2.0)  # scale 2 / 4
    save_file(tensors, tmp_path / "lora.safetensors")
    assert_same_changes(changes(lora, 0.5), loaded_changes(model, transformer, tmp_path / "lora.safetensors", adapter))

    adapter = AdapterConfig(type="lokr", rank=4, alpha=4.0)
    transformer = model.build_empty_transformer()
    add_lora(model, transformer, adapter)
    generator = torch.Generator().manual_seed(0)
    trained, tensors = {}, {}
    for name, p in transformer.named_parameters():
        if ".lokr_" in name:
            module, _, part = name.removesuffix(".default").rpartition(".")
            trained.setdefault(module, {})[part] = value = torch.randn(p.shape, generator=generator)
            tensors[f"{kohya(module)}.{part}"] = value  # no alpha: scale 1, ours is 4 / 4
    save_file(tensors, tmp_path / "lokr.safetensors")
    got: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in read_lycoris_file(model, transformer, tmp_path / "lokr.safetensors", adapter).items():
        module, _, part = name.removesuffix(".default").rpartition(".")
        got.setdefault(module, {})[part] = value
    assert_same_changes({m: lycoris_change(p, 1.0) for m, p in trained.items()},
                        {m: lycoris_change(p, 1.0) for m, p in got.items()})

    # Saved, a LoKr of Wan has the original layout too (no module is fused): "diffusion_model." + the
    # original module, as ComfyUI's generic key map names the checkpoint's weights; it reads back.
    adapter = AdapterConfig(type="lokr", rank=4, alpha=2.0)
    transformer = model.build_empty_transformer()
    add_lora(model, transformer, adapter)
    saved = {f"{m}.{part}": v for m, parts in trained.items() for part, v in parts.items()}
    files = save_lora(model, saved, adapter, tmp_path / "saved", torch.float32)
    assert [f.name for f in files] == ["pytorch_lora_weights.safetensors", "lora_comfyui.safetensors"]
    comfy = load_file(files[1])
    weights = {WanKeymap.diffusers_to_original_key(n) for n, _ in transformer.named_parameters()
               if n.endswith(".base_layer.weight")}
    assert {k.removeprefix("diffusion_model.").rpartition(".")[0] + ".base_layer.weight" for k in comfy} <= weights
    assert "diffusion_model.blocks.0.self_attn.q.lokr_w1" in comfy
    for path in files:
        got = {}
        for name, value in read_lycoris_file(model, transformer, path, adapter).items():
            module, _, part = name.removesuffix(".default").rpartition(".")
            got.setdefault(module, {})[part] = value
        assert_same_changes({m: lycoris_change(p, 0.5) for m, p in trained.items()},
                            {m: lycoris_change(p, 0.5) for m, p in got.items()})
