"""Full fine-tuning (no [adapter] table) of LTX-Video and HunyuanVideo.

Quick tests, in process: LTX-Video's final layer owns `scale_shift_table` (a parameter of the
transformer itself) once its stage is loaded, for full fine-tuning and for a LoRA; each model's
original-layout hook converts the weights of one pipeline layer at a time to what the whole
transformer converts to.

Slow: one launch per model (module fixture `runs`): float32 full fine-tuning on images and
9-frame videos, evaluated at the start and the end, the transformer saved at the end. The tests
read what it left: the eval losses, and the saved files, loaded with diffusers' own loaders (and
our converter for HunyuanVideo's fused original layout) and run through diffusers' forward on
the run's eval set.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ORIGINAL_FILE, eval_loss_through_diffusers, evals, launch, run_folder, write_configs
from make_demo_dataset import make_demo_dataset, make_demo_videos
from models import get_model_class
from models.keymaps.hunyuan_video import HunyuanVideoKeymap
from models.keymaps.keymap import detect_original_prefix
from saving.export import ORIGINAL_LAYOUT_FILE, stage_weights

NAMES = ["ltx-video", "hunyuan-video"]
STEPS = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("full_video_data")
    return {"root": root, "images": make_demo_dataset(root / "images", count=4, seed=0),
            "videos": make_demo_videos(root / "videos", count=2, seed=0, frames=(9,))}


def configure(video_models, data, name: str, run: str, **overrides) -> Path:
    """Full fine-tuning in float32 on images (one-frame clips) and 9-frame videos, evaluated on
    the training set."""
    dataset = {"frame_buckets": [1, 9], "directory": [{"path": str(data["images"])}, {"path": str(data["videos"])}]}
    settings = dict(adapter=None, max_steps=STEPS, eval_at_start=True, eval_every_n_steps=STEPS,
                    eval_datasets=[{"name": "train", "config": "dataset.toml"}], optimizer={"lr": 1e-3},
                    model={"type": name, "diffusers_path": str(video_models / name), "max_sequence_length": 32})
    settings.update(overrides)
    return write_configs(data["root"] / name / run, video_models / name, data["images"], dataset=dataset, **settings)


def transformer_class(name: str):
    return get_model_class(name).transformer_class


# ------------------------------------------------------------------------------------ quick


@pytest.mark.parametrize("full", [True, False], ids=["full", "lora"])
def test_ltx_final_layer_owns_scale_shift_table(video_models, data, full):
    from config.train_config import load_train_config
    from parallel.stages import load_stage, plan_stages

    adapter = None if full else {"rank": 4, "alpha": 4}
    config = load_train_config(configure(video_models, data, "ltx-video", f"unit-{full}", adapter=adapter),
                               get_model_class)
    model = get_model_class("ltx-video")(config.model)
    transformer, layers, parts = plan_stages(model, config)
    final = layers[-1]
    # registered when the layer is built (on the meta device), so the engine's check sees it
    assert dict(final.named_parameters())["scale_shift_table"] is transformer.scale_shift_table
    load_stage(model, config, transformer, layers, parts, 0, torch.device("cpu"))
    table = dict(final.named_parameters())["scale_shift_table"]
    # the loaded parameter, not the meta one it replaced
    assert table is transformer.scale_shift_table and not table.is_meta
    expected = load_file(video_models / "ltx-video" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(table.detach(), expected["scale_shift_table"])
    assert table.requires_grad == full
    owned = {id(p) for layer in layers for p in layer.parameters()}
    assert all(id(p) in owned for p in transformer.parameters())
    if full:
        # the layer computes with its own parameter: the gradient reaches it
        width = table.shape[-1]
        stream = {"hidden": torch.randn(1, 4, width), "embedded_timestep": torch.randn(1, 1, width)}
        final.run(stream)["prediction"].sum().backward()
        assert table.grad is not None and table.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_original_layout_converts_layer_by_layer(video_models, name):
    # save_full_model hands the hook the weights of whole pipeline layers, one stage's at a time:
    # every fused tensor (q/k/v, HunyuanVideo's token refiner and single-block linear1) must join
    # weights of one layer only.
    from training.weights import SafetensorsFolder

    folder = video_models / name
    model = get_model_class(name)(get_model_class(name).config_class(type=name, diffusers_path=str(folder)))
    transformer = model.build_empty_transformer()
    layers = model.layers(transformer)
    weights = SafetensorsFolder(folder / "transformer")
    sd = weights.read(sorted(weights.files))
    whole = model.original_layout(sd)
    parts = {}
    for names in stage_weights(transformer, layers):
        part = model.original_layout({n: sd[n] for n in names})
        assert not parts.keys() & part.keys()
        parts.update(part)
    assert parts.keys() == whole.keys()
    assert all(torch.equal(parts[k], whole[k]) for k in whole)
    # the same tensors as the release-layout file the tiny model comes with, without its prefix
    release = load_file(folder / ORIGINAL_FILE[name])
    prefix = detect_original_prefix(release)
    assert {k.removeprefix(prefix) for k in release} == whole.keys()
    assert all(torch.equal(release[prefix + k], v) for k, v in whole.items())


# ------------------------------------------------------------------------------------ launches


@pytest.fixture(scope="module")
def runs(video_models, data) -> dict:
    results = {}
    for name in NAMES:
        result = launch(configure(video_models, data, name, "full"))
        assert result.returncode == 0, result.output[-5000:]
        results[name] = result
    return results


def from_original_layout(name: str, folder: Path):
    """The saved original-layout file as a diffusers transformer: diffusers' own single-file loader
    for LTX-Video (the config from the saved folder, nothing downloaded), our converter for
    HunyuanVideo (diffusers' splits the fused tensors at the released width only)."""
    cls = transformer_class(name)
    file = folder / ORIGINAL_LAYOUT_FILE
    if name == "ltx-video":
        return cls.from_single_file(str(file), config=str(folder), subfolder="transformer", local_files_only=True)
    config = cls.load_config(folder / "transformer")
    transformer = cls.from_config(config)
    transformer.load_state_dict(HunyuanVideoKeymap.original_to_diffusers(load_file(file), config), strict=True)
    return transformer


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_full_finetune_trains_every_weight_and_saves_both_layouts(video_models, runs, name):
    result = runs[name]
    history = evals(result)
    assert sorted(history) == [0, STEPS]
    assert history[STEPS] < 0.95 * history[0], history
    assert "memory estimate per GPU (full fine-tuning" in result.output
    folder = run_folder(result) / "models" / "final"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", ORIGINAL_LAYOUT_FILE]
    saved = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    initial = load_file(video_models / name / "transformer" / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == initial.keys()
    # Every weight is in the optimizer: none kept its initial value (LTX-Video's scale_shift_table,
    # a parameter of the transformer itself, included).
    unchanged = [k for k in initial if torch.equal(saved[k], initial[k])]
    assert unchanged == []
    if name == "ltx-video":
        assert "scale_shift_table" in saved
    original = load_file(folder / ORIGINAL_LAYOUT_FILE)
    expected = {"ltx-video": ["patchify_proj.weight", "adaln_single.linear.weight", "scale_shift_table",
                              "transformer_blocks.1.attn2.k_norm.weight"],
                "hunyuan-video": ["img_in.proj.weight", "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight",
                                  "double_blocks.1.txt_attn_qkv.weight", "single_blocks.1.linear1.weight",
                                  "final_layer.adaLN_modulation.1.weight"]}[name]
    assert all(k in original for k in expected)  # the release's names, unprefixed


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_saved_files_reproduce_the_final_eval(video_models, runs, name):
    result = runs[name]
    history = evals(result)
    folder = run_folder(result) / "models" / "final"
    cls = transformer_class(name)
    untrained = eval_loss_through_diffusers(result.config, cls.from_pretrained(video_models / name / "transformer"))
    assert untrained == pytest.approx(history[0], rel=1e-5)  # our eval and diffusers' forward agree
    diffusers_folder = cls.from_pretrained(folder / "transformer")
    trained = eval_loss_through_diffusers(result.config, diffusers_folder)
    assert trained == pytest.approx(history[STEPS], rel=1e-5)
    assert abs(untrained - trained) > 100 * 1e-5 * trained  # a save of the untrained weights would fail
    # The original-layout file, read back, is the same model: the same weights, the same output.
    single_file = from_original_layout(name, folder)
    reference = diffusers_folder.state_dict()
    assert single_file.state_dict().keys() == reference.keys()
    assert all(torch.equal(v, reference[k]) for k, v in single_file.state_dict().items())
    assert eval_loss_through_diffusers(result.config, single_file) == trained
