"""FLUX.2 [dev]: the layer split, the encoders, the original (BFL / ComfyUI) layout, the LoRA
files, float8 storage with block swapping, and training launched as users launch it.

Quick tests run in process on the tiny model (tools/make_tiny_models.make_tiny_flux2). Slow ones
share three launches (module fixtures): a LoRA run on one process, the same run over 2 pipeline
stages on 2 processes reading the transformer from the original-layout single file, and a full
fine-tuning run; the tests read what they left.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import eval_loss_through_diffusers, evals, launch, losses, ok, run_folder, write_configs
from make_demo_dataset import make_demo_dataset
from make_tiny_models import make_tiny_flux2
from models import get_model_class
from config.training import AdapterConfig
from models.flux2 import TEXT_ENCODER_LAYERS
from models.keymaps.flux2 import Flux2Keymap
from saving.export import ORIGINAL_LAYOUT_FILE, stage_weights
from test_video_models import engine_like_transformer
from saving.export import lora_state_dict, save_lora
from training.weights import SafetensorsFolder, read_weights

ORIGINAL_FILE = "flux2-tiny-original.safetensors"
TEXT_LEN = 64  # the tiny tokenizer's system prompt takes about 40 tokens of it


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_tiny_flux2(tmp_path_factory.mktemp("flux2_model"))


def make_model(root: Path, **config):
    cls = get_model_class("flux2")
    config = {"dtype": "float32", "max_sequence_length": TEXT_LEN, **config}
    return cls(cls.config_class(type="flux2", diffusers_path=str(root), **config))


def random_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"noisy": torch.randn(2, 32, 3, 4, generator=g), "timesteps": torch.tensor([0.3, 0.8]),
            "text": {"text": torch.randn(2, 10, 48, generator=g)}}


def run_layers(model, layers, batch: dict) -> torch.Tensor:
    x = model.input_fields.pack(model.model_inputs(batch["noisy"], batch["timesteps"], batch["text"]))
    for layer in layers:
        x = layer(x)
    return x


def diffusers_forward(model, transformer, batch: dict) -> torch.Tensor:
    return model.reference_forward(transformer, model.model_inputs(batch["noisy"], batch["timesteps"], batch["text"]))


# ------------------------------------------------------------------------------------ tiny model


def test_tiny_pipeline_generates_and_is_deterministic(root, tmp_path):
    from diffusers import Flux2Pipeline

    pipe = Flux2Pipeline.from_pretrained(root)
    image = pipe(prompt="a red circle", height=64, width=48, num_inference_steps=2, max_sequence_length=TEXT_LEN,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 64, 48)
    again = make_tiny_flux2(tmp_path)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel


# ------------------------------------------------------------------------------------ layers


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_layers_equal_the_transformer_forward(root, lora):
    model = make_model(root, guidance=3.5)
    transformer, layers = engine_like_transformer(model, AdapterConfig(rank=4, alpha=8.0) if lora else None)
    assert [type(layer).__name__ for layer in layers] == (
        ["Flux2InputLayer"] + ["Flux2DoubleBlockLayer"] * 2 + ["Flux2SingleBlockLayer"] * 2 + ["Flux2FinalLayer"])
    batch = random_batch()
    with torch.no_grad():
        ours = run_layers(model, layers, batch)
        reference = diffusers_forward(model, transformer, batch)
    assert ours.shape == reference.shape == model.pack_latents(batch["noisy"]).shape == (2, 12, 32)
    # Same modules, same order of operations: equal, not just close.
    assert torch.equal(ours, reference)


def test_only_int_tensors_cross_stages_without_gradient(root):
    model = make_model(root)
    transformer, layers = engine_like_transformer(model, AdapterConfig(rank=4, alpha=4.0))
    x = model.input_fields.pack(model.model_inputs(**random_batch()))
    for layer in layers[:-1]:
        x = layer(x)
        for field, t in zip(layer.out_fields.names, x):
            assert t.dtype == torch.int64 or (t.is_floating_point() and t.requires_grad), (field, t.dtype)
            assert t.is_contiguous(), field
    layers[-1](x).pow(2).mean().backward()
    grads = [p.grad for n, p in transformer.named_parameters() if "lora_A" in n]
    # Every double block's projections and MLPs, every single block's two fused linears.
    assert len(grads) == 2 * 12 + 2 * 2
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------------------------ encoders


def test_text_matches_the_pipeline(root):
    from diffusers import Flux2Pipeline

    # The hidden states stacked are the pipeline's own default choice.
    default = inspect.signature(Flux2Pipeline.encode_prompt).parameters["text_encoder_out_layers"].default
    assert TEXT_ENCODER_LAYERS == tuple(default)
    model = make_model(root)
    model.load_text_encoders(torch.device("cpu"))
    captions = ["a red circle on a blue background", "two dogs running on the beach in the evening light"]
    with torch.no_grad():
        ours = model.encode_captions(captions)
        pipe = Flux2Pipeline.from_pretrained(root)
        embeds, _ = pipe.encode_prompt(captions, device=torch.device("cpu"), max_sequence_length=TEXT_LEN)
    assert embeds.shape == (2, TEXT_LEN, 48)
    for i, item in enumerate(ours):
        assert torch.equal(item["text"], embeds[i])
    assert not torch.equal(ours[0]["text"], ours[1]["text"])  # the captions, not only the system prompt


def test_encode_pixels_and_decode_match_the_pipeline(root):
    from diffusers import Flux2Pipeline

    model = make_model(root)
    model.load_vae(torch.device("cpu"))
    pixels = torch.rand(2, 3, 1, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pipe = Flux2Pipeline.from_pretrained(root)
    with torch.no_grad():
        latents = torch.stack([item["latents"] for item in model.encode_pixels(pixels)])
        expected = pipe._encode_vae_image(pixels[:, :, 0], generator=None)
        assert latents.shape == (2, 32, 4, 3)
        assert torch.equal(latents, expected)
        decoded = model.decode_latents(latents)
    assert decoded.shape == (2, 3, 1, 64, 48)


# ------------------------------------------------------------------------------------ layouts


def test_layout_round_trip_and_diffusers_single_file_loader(root):
    from diffusers import Flux2Transformer2DModel

    sd = load_file(root / "transformer" / "diffusion_pytorch_model.safetensors")
    original = load_file(root / ORIGINAL_FILE)
    inner = 2 * 16
    assert original["double_blocks.0.img_attn.qkv.weight"].shape == (3 * inner, inner)
    assert original["double_blocks.1.txt_attn.qkv.weight"].shape == (3 * inner, inner)
    assert original["single_blocks.1.linear1.weight"].shape == (3 * inner + 2 * 3 * inner, inner)
    assert "double_stream_modulation_img.lin.weight" in original and "guidance_in.in_layer.weight" in original
    assert "double_blocks.0.img_attn.norm.query_norm.scale" in original
    assert len(original) < len(sd)  # q, k, v fused
    config = make_model(root).transformer_config()
    for back in (Flux2Keymap.original_to_diffusers(original), Flux2Keymap.original_to_diffusers(original, config),
                 Flux2Keymap.original_to_diffusers({"model.diffusion_model." + k: v for k, v in original.items()})):
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # diffusers' own single-file loader reads our original-layout file to the same weights.
    loaded = Flux2Transformer2DModel.from_single_file(str(root / ORIGINAL_FILE), config=str(root),
                                                      subfolder="transformer", local_files_only=True).state_dict()
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    # ... and model.transformer_path reads it lazily, key by key.
    keys = sorted(SafetensorsFolder(root / "transformer").files)
    lazy = read_weights(make_model(root, transformer_path=str(root / ORIGINAL_FILE)), keys)
    assert all(torch.equal(lazy[k], sd[k]) for k in keys)


def test_original_layout_converts_layer_by_layer(root):
    # Each stage converts its own layers' weights: a fused tensor must join weights of one layer.
    model = make_model(root)
    transformer = model.build_empty_transformer()
    layers = model.layers(transformer)
    sd = load_file(root / "transformer" / "diffusion_pytorch_model.safetensors")
    whole = model.original_layout(sd)
    parts = {}
    for names in stage_weights(transformer, layers):
        part = model.original_layout({n: sd[n] for n in names})
        assert not parts.keys() & part.keys()
        parts.update(part)
    assert parts.keys() == whole.keys() == load_file(root / ORIGINAL_FILE).keys()
    assert all(torch.equal(parts[k], whole[k]) for k in whole)


def merge_kohya_lora(original: dict, lora: dict) -> dict:
    """Merge a kohya-named original-layout LoRA into original weights as ComfyUI does:
    W += alpha / rank * up @ down, module "lora_unet_<name with _ for .>"."""
    by_kohya_name = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_"): k
                     for k in original if k.endswith(".weight")}
    merged = dict(original)
    for key in lora:
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            down, up = lora[key].double(), lora[f"{name}.lora_up.weight"].double()
            weight = by_kohya_name[name]
            merged[weight] = (merged[weight].double() + lora[f"{name}.alpha"].item() / down.shape[0] * up @ down).float()
    return merged


def lora_through_diffusers(root: Path, adapter_dir: Path, batch: dict) -> dict[str, torch.Tensor]:
    """The output of diffusers' transformer with each of our LoRA files loaded as users load them,
    and of the original-layout weights merged with the ComfyUI file, converted back."""
    from diffusers import Flux2Pipeline, Flux2Transformer2DModel

    model = make_model(root)
    out = {}
    transformer = Flux2Transformer2DModel.from_pretrained(root / "transformer").eval()
    transformer.load_lora_adapter(load_file(adapter_dir / "pytorch_lora_weights.safetensors"), prefix="transformer")
    for file in ("pytorch_lora_weights.safetensors", "lora_comfyui.safetensors"):
        pipe = Flux2Pipeline.from_pretrained(root)
        pipe.load_lora_weights(adapter_dir, weight_name=file)
        with torch.no_grad():
            out[file] = diffusers_forward(model, pipe.transformer.eval(), batch)
    with torch.no_grad():
        out["load_lora_adapter"] = diffusers_forward(model, transformer, batch)
    merged = merge_kohya_lora(load_file(root / ORIGINAL_FILE), load_file(adapter_dir / "lora_comfyui.safetensors"))
    config = model.transformer_config()
    from_comfy = Flux2Transformer2DModel.from_config(config).eval()
    from_comfy.load_state_dict(Flux2Keymap.original_to_diffusers(merged, config), strict=True)
    with torch.no_grad():
        out["merged original"] = diffusers_forward(model, from_comfy, batch)
    return out


def test_lora_files_load_in_diffusers_and_comfyui_layout_equals_by_merge(root, tmp_path):
    model = make_model(root)
    adapter = AdapterConfig(rank=4, alpha=8.0)
    transformer, layers = engine_like_transformer(model, adapter)
    batch = random_batch(seed=1)
    with torch.no_grad():
        trained = run_layers(model, layers, batch)
    written = save_lora(model, lora_state_dict(transformer), adapter, tmp_path, torch.float32)
    assert [p.name for p in written] == ["pytorch_lora_weights.safetensors", "lora_comfyui.safetensors"]
    comfy = load_file(tmp_path / "lora_comfyui.safetensors")
    # The fused q/k/v get one block-diagonal LoRA of 3 x the rank.
    assert comfy["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (12, 32)
    assert comfy["lora_unet_single_blocks_1_linear1.lora_up.weight"].shape == (32 * 3 + 2 * 96, 4)
    outputs = lora_through_diffusers(root, tmp_path, batch)
    for name, output in outputs.items():
        torch.testing.assert_close(output, trained, rtol=1e-5, atol=1e-5, msg=name)
    base = diffusers_forward(model, get_model_class("flux2").transformer_class.from_pretrained(root / "transformer"),
                             batch)
    assert (trained - base).abs().max() > 1e-3  # the LoRA changes the output


# ------------------------------------------------------------------------------------ float8, block swap


def test_float8_storage_and_block_swapping(root, tmp_path):
    from config.train_config import load_train_config
    from memory.block_swap import BlockSwap, swapped_layer_indices
    from memory.float8 import Float8Linear
    from parallel.stages import load_stage, plan_stages
    from test_low_memory import loss_and_grads
    from training import objective

    data = make_demo_dataset(tmp_path / "data", count=2, seed=0)
    model_table = {"type": "flux2", "diffusers_path": str(root), "dtype": "bfloat16", "transformer_dtype": "float8",
                   "max_sequence_length": TEXT_LEN}
    config = load_train_config(write_configs(tmp_path, root, data, blocks_to_swap=3, model=model_table),
                               get_model_class)
    model = get_model_class("flux2")(config.model)
    transformer, layers, parts = plan_stages(model, config)
    load_stage(model, config, transformer, layers, parts, 0, torch.device("cpu"))
    # Every LoRA-targeted linear of the blocks stores its frozen weight in float8.
    fp8 = [m for layer in layers[1:-1] for m in layer.modules() if isinstance(m, Float8Linear)]
    assert len(fp8) == 2 * 12 + 2 * 2
    assert all(m.weight_fp8.dtype == torch.float8_e4m3fn for m in fp8)
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if "lora_B" in n:
                p.add_(0.01)
    g = torch.Generator().manual_seed(1)
    inputs, labels = objective.training_example(model, torch.randn(2, 32, 2, 2, generator=g),
                                                {"text": torch.randn(2, 8, 48, generator=g)},
                                                [torch.Generator().manual_seed(i) for i in range(2)])
    ref_loss, ref_grads = loss_and_grads(model, layers, inputs, labels, checkpointed=True)
    swapped = swapped_layer_indices(layers, 3)
    assert swapped == [2, 3, 4]  # the last 3 of the 4 blocks
    chosen = [layers[i] for i in swapped]
    owned = [[transformer.get_submodule(n) for n in layer.module_names] for layer in chosen]
    swap = BlockSwap(chosen, owned, [True] * 3, torch.device("cpu"))
    for _ in range(2):
        loss, grads = loss_and_grads(model, layers, inputs, labels, checkpointed=True)
        assert torch.equal(loss, ref_loss)
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    assert swap.loads > 3
    swap.release()


# ------------------------------------------------------------------------------------ launches




STEPS = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("flux2_data")
    return {"root": folder, "images": make_demo_dataset(folder / "images", count=6, seed=0)}


def configure(root, data, run: str, **overrides) -> Path:
    settings = dict(max_steps=STEPS, eval_at_start=True, eval_every_n_steps=STEPS,
                    eval_datasets=[{"name": "train", "config": "dataset.toml"}], adapter={"rank": 4, "alpha": 8},
                    optimizer={"lr": 1e-2}, model={"type": "flux2", "diffusers_path": str(root),
                                                   "max_sequence_length": TEXT_LEN})
    for k, v in overrides.items():
        settings[k] = {**settings[k], **v} if isinstance(settings.get(k), dict) and v is not None else v
    return write_configs(data["root"] / run, root, data["images"], **settings)


@pytest.fixture(scope="module")
def one_stage(root, data):
    return ok(launch(configure(root, data, "one")))


@pytest.fixture(scope="module")
def two_stages(root, data, one_stage):
    # Also reads the transformer from the original-layout single file: the same weights.
    return ok(launch(configure(root, data, "two", pipeline_stages=2,
                               model={"transformer_path": str(root / ORIGINAL_FILE)}), num_gpus=2))


@pytest.fixture(scope="module")
def full(root, data):
    return ok(launch(configure(root, data, "full", adapter=None, optimizer={"lr": 1e-3})))


@pytest.mark.slow
def test_lora_trains_and_its_files_reproduce_the_final_eval_in_diffusers(root, one_stage):
    from diffusers import Flux2Pipeline

    history = evals(one_stage)
    assert len(losses(one_stage)) == STEPS and history[STEPS] < 0.95 * history[0], history
    adapter = run_folder(one_stage) / "adapters" / "final"
    assert sorted(p.name for p in adapter.iterdir()) == ["lora_comfyui.safetensors",
                                                          "pytorch_lora_weights.safetensors"]
    pipe = Flux2Pipeline.from_pretrained(root)
    assert eval_loss_through_diffusers(one_stage.config, pipe.transformer) == pytest.approx(history[0], rel=1e-5)
    for file in ("pytorch_lora_weights.safetensors", "lora_comfyui.safetensors"):
        pipe = Flux2Pipeline.from_pretrained(root)
        pipe.load_lora_weights(adapter, weight_name=file)
        assert eval_loss_through_diffusers(one_stage.config, pipe.transformer) == pytest.approx(history[STEPS],
                                                                                                 rel=1e-5), file


@pytest.mark.slow
def test_two_pipeline_stages_train_like_one(one_stage, two_stages):
    assert "stage 1:" in two_stages.output
    assert losses(two_stages) == pytest.approx(losses(one_stage), abs=1e-5)
    assert evals(two_stages) == pytest.approx(evals(one_stage), abs=1e-5)
    a = load_file(run_folder(one_stage) / "adapters" / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(run_folder(two_stages) / "adapters" / "final" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_full_finetune_trains_every_weight_and_both_saved_layouts_reproduce_the_eval(root, full):
    from diffusers import Flux2Transformer2DModel

    history = evals(full)
    assert history[STEPS] < 0.95 * history[0], history
    folder = run_folder(full) / "models" / "final"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", ORIGINAL_LAYOUT_FILE]
    saved = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    initial = load_file(root / "transformer" / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == initial.keys()
    # Every weight was trained: none kept its initial value. (The RMS-norm scales start at 1.)
    assert [k for k in initial if torch.equal(saved[k], initial[k])] == []
    trained = eval_loss_through_diffusers(full.config, Flux2Transformer2DModel.from_pretrained(folder / "transformer"))
    assert trained == pytest.approx(history[STEPS], rel=1e-5)
    single_file = Flux2Transformer2DModel.from_single_file(str(folder / ORIGINAL_LAYOUT_FILE), config=str(folder),
                                                           subfolder="transformer", local_files_only=True)
    assert eval_loss_through_diffusers(full.config, single_file) == trained


# ------------------------------------------------------------------------------------ example, bench


def test_example_config_loads(root, tmp_path):
    """examples/flux2.toml, with the tiny model and its single-file stand-in in place of the
    placeholder paths, passes every check and keeps the values it sets."""
    import re
    import tomllib

    from conftest import REPO, to_toml
    from config.train_config import load_train_config

    text = (REPO / "examples" / "flux2.toml").read_text(encoding="utf-8")
    text, found = re.subn(r"^# (transformer_path = .*)$", r"\1", text, flags=re.MULTILINE)
    assert found == 1, "expected the commented-out transformer_path example"
    config = tomllib.loads(text)
    assert config["model"]["type"] == "flux2" and config["pipeline_stages"] == 2
    data = make_demo_dataset(tmp_path / "data", count=2, seed=0)
    (tmp_path / "dataset.toml").write_text(to_toml({"resolutions": [64], "directory": [{"path": str(data)}]}))
    config["output_dir"], config["dataset"] = str(tmp_path / "runs"), str(tmp_path / "dataset.toml")
    config["model"]["diffusers_path"] = str(root)
    config["model"]["transformer_path"] = str(root / ORIGINAL_FILE)
    (tmp_path / "train.toml").write_text(to_toml(config))
    loaded = load_train_config(tmp_path / "train.toml", get_model_class)
    assert type(loaded.model).__name__ == "Flux2Config"
    assert loaded.settings.pipeline_stages == 2 and loaded.settings.adapter.rank == 32


def test_full_size_writer_at_tiny_size(tmp_path):
    """bench/make_full_size_flux2.py writes a folder the trainer reads: the transformer in several
    shards with a weight index, the text encoder deep enough for the hidden states read."""
    import sys

    from conftest import REPO
    from make_tiny_models import FLUX2_TRANSFORMER, FLUX2_VAE

    sys.path.insert(0, str(REPO / "bench"))
    from make_full_size_flux2 import make_full_size_flux2
    from training.preflight import check_weight_files

    folder = make_full_size_flux2(tmp_path, device="cpu", shard_gb=1e-4, transformer=FLUX2_TRANSFORMER, vae=FLUX2_VAE)
    assert len(list((folder / "transformer").glob("*.safetensors"))) > 1
    model = make_model(folder, dtype="bfloat16")
    transformer = model.build_empty_transformer()
    check_weight_files(model, transformer)  # every weight, in its shape
    model.load_text_encoders(torch.device("cpu"))
    with torch.no_grad():
        (item,) = model.encode_captions(["a red circle"])
    assert item["text"].shape == (TEXT_LEN, FLUX2_TRANSFORMER["joint_attention_dim"])
