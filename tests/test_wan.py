"""Wan 2.1 / 2.2: the layer split against diffusers' forward, the encoders against WanPipeline,
the original (Wan-AI / ComfyUI) layout, LoRA files loaded by diffusers, the A14B experts, the
frame and size rules, float8 storage and block swapping; and training launched as users launch it.

Quick tests run in process on tiny models: Wan 2.1 T2V (`wan`), Wan 2.2 TI2V-5B-shaped
(`wan2.2-ti2v`: 48-channel VAE with 2x2 patchify, per-token timesteps in the pipeline), Wan 2.2
A14B-shaped (`wan2.2-a14b`: two experts, boundary 0.875), Wan 2.1 I2V-shaped (`wan-i2v`:
conditioning channels and a CLIP vision encoder) and Wan 2.2 I2V A14B-shaped (`wan2.2-i2v-a14b`:
conditioning channels, no image encoder, two experts). Slow ones share three launches (module
fixture `runs`): a LoRA run on images and 9-/17-frame videos; the same on 2 pipeline stages in 2
processes, reading the transformer from the original-layout single file; full fine-tuning of the
A14B low-noise expert; and one of their own (`i2v_run`): a LoRA run of the Wan 2.1 I2V model on
2 pipeline stages.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, eval_loss_through_diffusers, evals, launch, ok, run_folder, write_configs
from make_demo_dataset import make_demo_dataset, make_demo_videos
from make_tiny_models import (make_tiny_wan, make_tiny_wan22_a14b, make_tiny_wan22_i2v_a14b, make_tiny_wan22_ti2v,
                              make_tiny_wan_i2v)
from config.train_config import load_train_config
from config.training import AdapterConfig
from models import get_model_class
from models.keymaps.wan import WanKeymap
from test_video_models import engine_like_transformer
from training import objective
from saving.export import lora_state_dict, save_lora
from training.lora import add_lora, read_lora_file
from training.weights import SafetensorsFolder, read_weights
from utils.errors import ConfigError

VARIANTS = ["wan", "wan2.2-ti2v", "wan2.2-a14b"]
ORIGINAL_FILE = "wan-tiny-original.safetensors"


@pytest.fixture(scope="module")
def wan_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wan_models")
    for maker in (make_tiny_wan, make_tiny_wan22_ti2v, make_tiny_wan22_a14b, make_tiny_wan_i2v,
                  make_tiny_wan22_i2v_a14b):
        maker(root)
    return root


def make_model(root: Path, folder: str = "wan", **config):
    cls = get_model_class("wan")
    if folder in ("wan2.2-a14b", "wan2.2-i2v-a14b"):
        config.setdefault("expert", "high_noise")
    return cls(cls.config_class(type="wan", diffusers_path=str(root / folder), dtype="float32", **config))


def random_batch(channels: int = 16, seed: int = 0) -> dict:
    """Noisy latents (3 latent frames, 4x6), timesteps and zero-padded text embeddings."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(2, 12, 32, generator=g)
    text[0, 5:] = 0
    text[1, 9:] = 0
    return {"noisy": torch.randn(2, channels, 3, 4, 6, generator=g), "timesteps": torch.tensor([0.3, 0.8]),
            "text": {"text": text}}


def run_layers(model, layers, batch) -> torch.Tensor:
    x = model.input_fields.pack(model.model_inputs(batch["noisy"], batch["timesteps"], batch["text"]))
    for layer in layers:
        x = layer(x)
    return x


def diffusers_forward(model, transformer, batch) -> torch.Tensor:
    return model.reference_forward(transformer, model.model_inputs(batch["noisy"], batch["timesteps"], batch["text"]))


# ------------------------------------------------------------------------------------ layer split


@pytest.mark.parametrize("folder", VARIANTS)
@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_layers_equal_the_transformer_forward(wan_models, folder, lora):
    model = make_model(wan_models, folder)
    transformer, layers = engine_like_transformer(model, AdapterConfig(rank=4, alpha=8.0) if lora else None)
    batch = random_batch(transformer.config.in_channels)
    with torch.no_grad():
        ours = run_layers(model, layers, batch)
        reference = diffusers_forward(model, transformer, batch)
    assert ours.shape == reference.shape == batch["noisy"].shape
    if folder == "wan2.2-ti2v":
        # The pipeline gives TI2V-5B one timestep per token (all equal here): the blocks take the
        # other modulation path, equal up to rounding.
        assert model.expand_timesteps
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(ours, reference)  # same modules, same order of operations


def test_only_int_tensors_cross_stages_without_gradient(wan_models):
    model = make_model(wan_models)
    transformer, layers = engine_like_transformer(model, AdapterConfig(rank=4, alpha=4.0))
    x = model.input_fields.pack(model.model_inputs(**random_batch()))
    assert [type(layer).__name__ for layer in layers] == ["WanInputLayer", "WanBlockLayer", "WanBlockLayer",
                                                          "WanFinalLayer"]
    for layer in layers[:-1]:
        x = layer(x)
        for field, t in zip(layer.out_fields.names, x):
            # DeepSpeed sends a gradient back for every floating tensor crossing a stage.
            assert t.dtype == torch.int64 or (t.is_floating_point() and t.requires_grad), (field, t.dtype)
            assert t.is_contiguous(), field
    layers[-1](x).pow(2).mean().backward()
    grads = [p.grad for n, p in transformer.named_parameters() if "lora_A" in n]
    assert len(grads) == 2 * 10 and all(g is not None and g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------------------------ encoders


def test_text_matches_the_pipeline(wan_models):
    from diffusers import WanPipeline

    model = make_model(wan_models, max_sequence_length=32)
    model.load_text_encoders(torch.device("cpu"))
    captions = ["a red circle on a blue background", "two  dogs running on the beach in the evening light "]
    ours = model.encode_captions(captions)
    pipe = WanPipeline.from_pretrained(wan_models / "wan")
    embeds, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, max_sequence_length=32)
    for i, item in enumerate(ours):
        assert torch.equal(item["text"], embeds[i])
    # Zero padding past each caption (of different lengths), as the pipeline hands the transformer.
    lengths = [int(item["text"].abs().sum(dim=1).gt(0).sum()) for item in ours]
    assert all(0 < n < 32 for n in lengths) and lengths[0] != lengths[1]


@pytest.mark.parametrize("folder", ["wan", "wan2.2-ti2v"])
def test_encode_pixels_inverts_the_pipeline_decode(wan_models, folder):
    from diffusers import AutoencoderKLWan

    model = make_model(wan_models, folder)
    model.load_vae(torch.device("cpu"))
    pixels = torch.rand(2, 3, 9, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vae = AutoencoderKLWan.from_pretrained(wan_models / folder / "vae")
    with torch.no_grad():
        latents = torch.stack([item["latents"] for item in model.encode_pixels(pixels)])
        raw = vae.encode(pixels).latent_dist.mode()
    z = vae.config.z_dim
    # 16x for TI2V-5B's VAE (2x2 patchify first), 8x for Wan 2.1's; 4x in time.
    scale = 16 if folder == "wan2.2-ti2v" else 8
    assert latents.shape == (2, z, 3, 64 // scale, 64 // scale) and model.size_multiple == 2 * scale
    # What WanPipeline does before decoding (latents / (1 / std) + mean) gives the VAE's latents back.
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1)
    torch.testing.assert_close(latents / inv_std + mean, raw, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="4k\\+1 frames"):
        model.encode_pixels(pixels[:, :, :8])


# ------------------------------------------------------------------------------------ layouts


def test_layout_round_trip_and_diffusers_single_file_loader(wan_models):
    from diffusers import WanTransformer3DModel

    folder = wan_models / "wan"
    sd = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    original = load_file(folder / ORIGINAL_FILE)
    for k in ("patch_embedding.weight", "text_embedding.0.weight", "time_projection.1.weight", "head.modulation",
              "head.head.weight", "blocks.1.modulation", "blocks.1.self_attn.q.weight", "blocks.1.self_attn.norm_q.weight",
              "blocks.1.cross_attn.o.weight", "blocks.1.norm3.weight", "blocks.1.ffn.0.weight"):
        assert k in original, k
    assert not any(".norm2." in k for k in original)  # the feed-forward norm has no weights
    back = WanKeymap.original_to_diffusers({f"model.diffusion_model.{k}": v for k, v in original.items()}
                                            | {"vae.decoder.conv_in.weight": torch.zeros(1)})
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # diffusers' own single-file loader reads our original-layout file to the same weights.
    loaded = WanTransformer3DModel.from_single_file(str(folder / ORIGINAL_FILE), config=str(folder),
                                                    subfolder="transformer", local_files_only=True).state_dict()
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    # model.transformer_path reads the same weights, lazily.
    model = make_model(wan_models, transformer_path=str(folder / ORIGINAL_FILE))
    got = read_weights(model, sorted(sd))
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_lora_files_load_in_diffusers_and_reproduce_the_layers(wan_models, tmp_path):
    """The diffusers file and the ComfyUI file, each loaded by WanPipeline.load_lora_weights (the
    latter through diffusers' converter for original-layout Wan LoRAs), give the trained output."""
    from diffusers import WanPipeline

    model = make_model(wan_models)
    adapter = AdapterConfig(rank=4, alpha=8.0)
    transformer, layers = engine_like_transformer(model, adapter)
    batch = random_batch(seed=1)
    with torch.no_grad():
        trained = run_layers(model, layers, batch)
    written = save_lora(model, lora_state_dict(transformer), adapter, tmp_path, torch.float32)
    assert [p.name for p in written] == ["pytorch_lora_weights.safetensors", "lora_comfyui.safetensors"]
    comfy = load_file(tmp_path / "lora_comfyui.safetensors")
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in comfy
    assert "diffusion_model.blocks.1.ffn.2.lora_B.weight" in comfy
    outputs = []
    for name in ("pytorch_lora_weights.safetensors", "lora_comfyui.safetensors"):
        pipe = WanPipeline.from_pretrained(wan_models / "wan")
        pipe.load_lora_weights(tmp_path, weight_name=name)
        with torch.no_grad():
            outputs.append(diffusers_forward(model, pipe.transformer.eval(), batch))
        torch.testing.assert_close(outputs[-1], trained, rtol=1e-5, atol=1e-5)
    base = diffusers_forward(model, model.transformer_class.from_pretrained(wan_models / "wan" / "transformer"), batch)
    assert (outputs[0] - base).abs().max() > 1e-3  # the LoRA changes the output
    # init_from_existing reads the ComfyUI file back to the same LoRA.
    fresh = model.build_empty_transformer()
    add_lora(model, fresh, adapter)
    read = read_lora_file(model, fresh, tmp_path / "lora_comfyui.safetensors", adapter)
    state = lora_state_dict(transformer)
    assert len(read) == 20
    for module, (a, b) in read.items():
        torch.testing.assert_close(a, state[f"{module}.lora_A.weight"])
        torch.testing.assert_close(b, state[f"{module}.lora_B.weight"])


# ------------------------------------------------------------------------------------ experts, rules


def test_a14b_expert_trains_its_own_transformer_on_its_timesteps(wan_models):
    low = make_model(wan_models, "wan2.2-a14b", expert="low_noise")
    high = make_model(wan_models, "wan2.2-a14b", expert="high_noise")
    assert low.transformer_folder().name == "transformer_2" and high.transformer_folder().name == "transformer"
    assert (low.config.min_timestep, low.config.max_timestep) == (0.0, 0.875)
    assert (high.config.min_timestep, high.config.max_timestep) == (0.875, 1.0)
    generators = [torch.Generator().manual_seed(i) for i in range(256)]
    t = objective.sample_timesteps(high, generators, 24)
    assert t.min() >= 0.875 and t.max() <= 1.0
    t = objective.sample_timesteps(low, [torch.Generator().manual_seed(i) for i in range(256)], 24)
    assert t.max() <= 0.875 and t.min() >= 0.0
    # The two experts' weights differ (seeded apart), and each expert reads its own.
    a = SafetensorsFolder(low.transformer_folder()).read(["proj_out.weight"])["proj_out.weight"]
    b = SafetensorsFolder(high.transformer_folder()).read(["proj_out.weight"])["proj_out.weight"]
    assert not torch.equal(a, b)
    cls = get_model_class("wan")
    with pytest.raises(ConfigError, match="holds two experts.*set model.expert = 'high_noise' or 'low_noise'"):
        cls(cls.config_class(type="wan", diffusers_path=str(wan_models / "wan2.2-a14b")))
    with pytest.raises(ConfigError, match="model.expert: .* holds one transformer"):
        cls(cls.config_class(type="wan", diffusers_path=str(wan_models / "wan"), expert="low_noise"))


def make_data(root: Path) -> dict:
    images = make_demo_dataset(root / "images", count=8, seed=0)
    videos = make_demo_videos(root / "videos", count=4, seed=0, frames=(9, 17))
    return {"root": root, "images": images, "videos": videos}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return make_data(tmp_path_factory.mktemp("wan_data"))


def configure(wan_models, data, run: str, folder: str = "wan", frame_buckets=(1, 9, 17), **overrides) -> Path:
    """A LoRA run on images (one-frame clips) and 9- and 17-frame videos, evaluated on the training set."""
    dataset = {"frame_buckets": list(frame_buckets),
               "directory": [{"path": str(data["images"])}, {"path": str(data["videos"])}]}
    settings = dict(max_steps=12, eval_at_start=True, eval_datasets=[{"name": "train", "config": "dataset.toml"}],
                    adapter={"rank": 4, "alpha": 8}, optimizer={"lr": 3e-3},
                    model={"type": "wan", "diffusers_path": str(wan_models / folder), "max_sequence_length": 32})
    for k, v in overrides.items():
        settings[k] = {**settings[k], **v} if isinstance(settings.get(k), dict) and v is not None else v
    return write_configs(data["root"] / run, wan_models / folder, data["images"], dataset=dataset, **settings)


def test_frame_and_size_rules_and_expert_keys_are_config_errors(wan_models, data):
    with pytest.raises(ConfigError, match=r"frame_buckets.*4k\+1"):
        load_train_config(configure(wan_models, data, "rule_frames", frame_buckets=(1, 10)), get_model_class)
    with pytest.raises(ConfigError, match="resolutions.*multiple of 16"):
        load_train_config(_with_resolution(configure(wan_models, data, "rule_size"), 40), get_model_class)
    with pytest.raises(ConfigError, match="model.min_timestep.*set by model.expert"):
        load_train_config(configure(wan_models, data, "rule_expert", "wan2.2-a14b",
                                    model={"expert": "low_noise", "min_timestep": 0.1}), get_model_class)
    with pytest.raises(ConfigError, match="model.expert"):
        load_train_config(configure(wan_models, data, "rule_expert_name", model={"expert": "middle"}),
                          get_model_class)


def _with_resolution(config: Path, size: int) -> Path:
    dataset = config.parent / "dataset.toml"
    dataset.write_text(dataset.read_text().replace("resolutions = [64]", f"resolutions = [{size}]"))
    return config


# ------------------------------------------------------------------------------------ image-to-video


def i2v_example(model, seed: int = 2):
    """A training example of an image-to-video model: clean latents (3 latent frames, 4x6), its
    conditions as the cache holds them (the condition latent and the CLIP embedding for `wan-i2v`;
    none for TI2V, whose condition is the clip's own first latent frame), inputs and labels."""
    g = torch.Generator().manual_seed(seed)
    z = model.transformer_config()["out_channels"]
    latents = torch.randn(2, z, 3, 4, 6, generator=g)
    conditions = {}
    if model.image_to_video == "channels":
        conditions = {"condition": torch.randn(2, z, 3, 4, 6, generator=g)}
    if "image" in model.input_fields.names:
        conditions["image"] = torch.randn(2, 17, 16, generator=g)
    inputs, labels = objective.training_example(model, latents, random_batch()["text"],
                                                [torch.Generator().manual_seed(i) for i in range(2)],
                                                timesteps=torch.tensor([0.3, 0.8]), conditions=conditions)
    return latents, conditions, inputs, labels


@pytest.mark.parametrize("folder", ["wan-i2v", "wan2.2-ti2v", "wan2.2-i2v-a14b"])
def test_image_to_video_layers_equal_the_transformer_forward(wan_models, folder):
    """The layers equal diffusers' forward on the image-to-video inputs, and the inputs are those
    WanImageToVideoPipeline builds: conditioning channels and the CLIP embedding (Wan 2.1 I2V,
    detected from the transformer), or the clean first frame at timestep 0, left out of the loss
    (TI2V-5B with model.image_to_video = true)."""
    model = make_model(wan_models, folder, **({"image_to_video": True} if folder == "wan2.2-ti2v" else {}))
    transformer, layers = engine_like_transformer(model, AdapterConfig(rank=4, alpha=8.0))
    latents, conditions, inputs, labels = i2v_example(model)
    named = model.input_fields.unpack(inputs)
    with torch.no_grad():
        x = inputs
        for layer in layers:
            x = layer(x)
        reference = model.reference_forward(transformer, named)
    assert x.shape == reference.shape == latents.shape
    torch.testing.assert_close(x, reference, rtol=1e-5, atol=1e-5)
    if folder == "wan2.2-i2v-a14b":  # conditioning channels without an image encoder
        assert model.image_to_video == "channels" and model.input_fields.names == ("latents", "text", "timesteps")
        assert model.config.min_timestep == 0.9 and named["latents"].shape[1] == 36
    elif folder == "wan-i2v":
        assert model.image_to_video == "channels" and model.input_fields.names[-1] == "image"
        stacked = named["latents"]
        assert stacked.shape[1] == 16 + 4 + 16
        assert stacked[:, 16:20, 0].eq(1).all() and stacked[:, 16:20, 1:].eq(0).all()
        assert torch.equal(stacked[:, 20:], conditions["condition"]) and torch.equal(named["image"], conditions["image"])
        assert len(labels) == 2  # the pipeline generates every frame: all of them count
        with torch.no_grad():  # the CLIP embedding reaches the output
            another = torch.randn(named["image"].shape, generator=torch.Generator().manual_seed(9))
            other = model.reference_forward(transformer, {**named, "image": another})
        assert (other - reference).abs().max() > 1e-4
    else:
        assert model.image_to_video == "first_frame"
        assert torch.equal(named["latents"][:, :, 0], latents[:, :, 0])
        assert not torch.equal(named["latents"][:, :, 1:], latents[:, :, 1:])
        # One timestep per token (3 frames of 2x3 patches): 0 on the first frame's.
        assert named["timesteps"].shape == (2, 18)
        assert named["timesteps"][:, :6].eq(0).all()
        assert torch.equal(named["timesteps"][:, 6:], torch.tensor([[0.3], [0.8]]).expand(2, 12))
        # The loss is the mean over the generated frames: the first frame's prediction counts for nothing.
        target = labels[0]
        prediction = x.clone().requires_grad_(True)
        value = objective.loss(model, prediction, labels)
        value.backward()
        assert prediction.grad[:, :, 0].eq(0).all() and prediction.grad[:, :, 1:].ne(0).all()
        expected = (x[:, :, 1:] - target[:, :, 1:]).pow(2).flatten(1).mean(dim=1).mean()
        torch.testing.assert_close(value, expected)


def test_image_to_video_conditions_match_the_pipeline(wan_models):
    """What is cached per clip equals what WanImageToVideoPipeline computes from the clip's first
    frame: the condition latent and the CLIP embedding (Wan 2.1 I2V); for TI2V-5B the pipeline's
    condition is the cached clip's own first latent frame (the VAE is causal in time), and its
    per-token timesteps are ours."""
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    frames = torch.randint(0, 256, (2, 9, 64, 64, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    pixels = frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    model = make_model(wan_models, "wan-i2v")
    model.load_vae(torch.device("cpu"))
    with torch.no_grad():
        items = model.encode_pixels(pixels)
    assert sorted(items[0]) == ["condition", "image", "latents"]
    pipe = WanImageToVideoPipeline.from_pretrained(wan_models / "wan-i2v")
    with torch.no_grad():
        # The pipeline conditions a batch on one image: an image at a time.
        condition = torch.cat([pipe.prepare_latents(pixels[i:i + 1, :, 0], 1, 16, 64, 64, 9, torch.float32,
                                                    torch.device("cpu"))[1] for i in range(2)])
        for i in range(2):
            embeds = pipe.encode_image(Image.fromarray(frames[i, 0].numpy()), torch.device("cpu"))
            torch.testing.assert_close(items[i]["image"], embeds[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack([item["condition"] for item in items]), condition[:, 4:],
                               rtol=1e-5, atol=1e-5)
    latents = torch.stack([item["latents"] for item in items])
    cached = {k: torch.stack([item[k] for item in items]) for k in ("condition", "image")}
    inputs, _ = objective.training_example(model, latents, random_batch()["text"],
                                           [torch.Generator().manual_seed(i) for i in range(2)], conditions=cached)
    assert torch.equal(model.input_fields.unpack(inputs)["latents"][:, 16:20], condition[:, :4])  # the mask
    model.free_encoders()
    assert model.image_encoder is None and model.vae is None

    ti2v = make_model(wan_models, "wan2.2-ti2v", image_to_video=True)
    ti2v.load_vae(torch.device("cpu"))
    pipe = WanImageToVideoPipeline.from_pretrained(wan_models / "wan2.2-ti2v")
    with torch.no_grad():
        latents = torch.stack([item["latents"] for item in ti2v.encode_pixels(pixels)])
        parts = [pipe.prepare_latents(pixels[i:i + 1, :, 0], 1, 48, 64, 64, 9, torch.float32, torch.device("cpu"))
                 for i in range(2)]
    first, first_frame_mask = torch.cat([p[1] for p in parts]), parts[0][2]
    assert pipe.config.expand_timesteps and ti2v.encode_pixels(pixels)[0].keys() == {"latents"}
    torch.testing.assert_close(latents[:, :, :1], first, rtol=1e-5, atol=1e-5)
    # WanImageToVideoPipeline's timesteps at t = 300: the mask's 2x2-patch grid times t.
    expected = (first_frame_mask[0][0][:, ::2, ::2] * 300.0).flatten()
    inputs, _ = objective.training_example(ti2v, latents, random_batch()["text"],
                                           [torch.Generator().manual_seed(i) for i in range(2)],
                                           timesteps=torch.tensor([0.3, 0.3]), conditions={})
    torch.testing.assert_close(ti2v.input_fields.unpack(inputs)["timesteps"] * 1000, expected.expand(2, -1))


@pytest.mark.parametrize("full", [False, True], ids=["LoRA", "full"])
def test_image_to_video_activation_factors_match_a_measurement(tmp_path, full):
    """TI2V-5B's per-token timesteps make each block keep per-token modulations: the extra the
    declared factors add over text-to-video is what saved-tensor hooks measure (as
    bench/activation_factors.py does) on a TI2V-5B-shaped transformer of width 512, 2 blocks."""
    import json

    from accelerate import init_empty_weights

    sys.path.insert(0, str(REPO / "bench"))
    from activation_factors import saved_bytes_per_layer, set_up

    cls = get_model_class("wan")
    config = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=128, in_channels=48, out_channels=48,
                  text_dim=4096, freq_dim=256, ffn_dim=14336 * 4 // 24, num_layers=2, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=1e-6)
    with init_empty_weights():
        cls.transformer_class(**config).save_config(tmp_path / "transformer")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"z_dim": 48, "scale_factor_spatial": 16}))
    (tmp_path / "model_index.json").write_text(json.dumps({"expand_timesteps": True}))
    measured, declared = {}, {}
    for i2v in (False, True):
        model = cls(cls.config_class(type="wan", diffusers_path=str(tmp_path), dtype="bfloat16", image_to_video=i2v))
        torch.manual_seed(0)
        transformer = cls.transformer_class(**config).to(torch.bfloat16)
        g = torch.Generator().manual_seed(0)
        latents = torch.randn(1, 48, 3, 16, 16, generator=g).bfloat16()
        text = torch.randn(1, 12, 4096, generator=g).bfloat16()
        inputs, _ = objective.training_example(model, latents, {"text": text}, [g], timesteps=torch.tensor([0.6]))
        layers = set_up(model, transformer, full, rank=4)
        unit = model.tokens_per_sample(256, 256, 9) * 512 * 2
        measured[i2v] = saved_bytes_per_layer(layers, inputs)[-2] / unit  # the last block
        declared[i2v] = (model.full_finetune_activation_factors if full else model.activation_factors)["WanBlockLayer"]
    assert measured[True] - measured[False] == pytest.approx(declared[True] - declared[False], rel=0.1), measured


def test_image_to_video_keys_are_config_errors(wan_models, data):
    from training.sampling import sample_prompts

    with pytest.raises(ConfigError, match="model.image_to_video: .* is a text-to-video transformer"):
        make_model(wan_models, "wan", image_to_video=True)
    with pytest.raises(ConfigError, match="model.image_to_video: .* is an image-to-video transformer"):
        make_model(wan_models, "wan-i2v", image_to_video=False)
    assert make_model(wan_models, "wan2.2-ti2v").image_to_video is None  # TI2V-5B: text-to-video unless asked
    config = load_train_config(configure(wan_models, data, "i2v_sample", "wan-i2v",
                                         sample={"prompts": ["a fox"], "frames": 9, "width": 64, "height": 64}),
                               get_model_class)
    with pytest.raises(ConfigError, match=r"\[sample\]: image-to-video sampling .* is not supported yet"):
        sample_prompts(config.samples, get_model_class("wan")(config.model))


# ------------------------------------------------------------------------------------ low memory


def test_float8_storage_and_block_swap(wan_models, data):
    """float8 base weights in the blocks' LoRA linears, and block swapping: the forward and
    backward through swapped blocks equal those without, on the same float8 weights."""
    from memory.block_swap import BlockSwap, swapped_layer_indices
    from memory.float8 import Float8Linear
    from parallel.stages import load_stage, plan_stages

    config = load_train_config(configure(wan_models, data, "fp8", model={"dtype": "bfloat16",
                                                                          "transformer_dtype": "float8"}),
                               get_model_class)
    model = get_model_class("wan")(config.model)
    transformer, layers, parts = plan_stages(model, config)
    load_stage(model, config, transformer, layers, parts, 0, torch.device("cpu"))
    fp8 = [m for m in transformer.modules() if isinstance(m, Float8Linear)]
    assert len(fp8) == 20  # the 10 LoRA linears of each block
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if "lora_B" in n:
                p.add_(0.01)
    batch = random_batch()
    inputs, labels = objective.training_example(model, batch["noisy"], batch["text"],
                                            [torch.Generator().manual_seed(i) for i in range(2)])

    def loss_and_grads():
        x = inputs
        for layer in layers:
            x = layer(x)
        loss = objective.loss(model, x, labels)
        params = [p for layer in layers for p in layer.parameters() if p.requires_grad]
        for p in params:
            p.grad = None
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    reference = loss_and_grads()
    swapped = swapped_layer_indices(layers, 2)
    assert swapped == [1, 2]
    chosen = [layers[i] for i in swapped]
    swap = BlockSwap(chosen, [[transformer.get_submodule(n) for n in layer.module_names] for layer in chosen],
                     [False, False], torch.device("cpu"))
    for _ in range(2):
        loss, grads = loss_and_grads()
        assert torch.equal(loss, reference[0]) and all(torch.equal(a, b) for a, b in zip(grads, reference[1]))
    assert swap.loads >= 2
    swap.release()


# ------------------------------------------------------------------------------------ launches




@pytest.fixture(scope="module")
def runs(wan_models, data) -> dict:
    one = ok(launch(configure(wan_models, data, "one")))
    # Also reads the transformer from the original-layout single file: the same weights.
    two = ok(launch(configure(wan_models, data, "two", pipeline_stages=2,
                              model={"transformer_path": str(wan_models / "wan" / ORIGINAL_FILE)}), num_gpus=2))
    full = ok(launch(configure(wan_models, data, "full", "wan2.2-a14b", frame_buckets=(1, 9), adapter=None,
                               max_steps=8, eval_every_n_steps=8, optimizer={"lr": 1e-3},
                               model={"expert": "low_noise"})))
    return {"one": one, "two": two, "full": full}


@pytest.fixture(scope="module")
def i2v_run(wan_models, tmp_path_factory):
    # On 2 pipeline stages: the CLIP embedding enters the first stage only. Data of its own: its
    # caches (of the same model type) would otherwise be found by the text-to-video runs.
    data = make_data(tmp_path_factory.mktemp("wan_i2v_data"))
    return ok(launch(configure(wan_models, data, "i2v", "wan-i2v", pipeline_stages=2), num_gpus=2))


@pytest.mark.slow
def test_image_to_video_lora_trains_and_loads_in_diffusers(wan_models, i2v_run):
    """Wan 2.1 I2V on 2 pipeline stages: the condition latents and CLIP embeddings are cached with
    the clips, the LoRA trains, and WanImageToVideoPipeline's transformer (one process, diffusers'
    forward) with the saved LoRA reproduces the final eval loss on the same cached conditions."""
    from diffusers import WanImageToVideoPipeline

    result = i2v_run
    assert "cache: 24 new entries encoded, 12 samples ready" in result.output and "stage 1:" in result.output
    history = evals(result)
    assert history[12] < 0.95 * history[0], history
    pipe = WanImageToVideoPipeline.from_pretrained(wan_models / "wan-i2v")
    pipe.load_lora_weights(run_folder(result) / "adapters" / "final")
    assert eval_loss_through_diffusers(result.config, pipe.transformer) == pytest.approx(history[12], rel=1e-5)


@pytest.mark.slow
def test_lora_trains_and_its_files_load_in_diffusers(wan_models, runs):
    result = runs["one"]
    # 8 images (frame bucket 1) and two videos each in the 9- and 17-frame buckets.
    assert "cache: 24 new entries encoded, 12 samples ready" in result.output
    assert len(result.losses()) == 12
    history = evals(result)
    assert history[12] < 0.95 * history[0], history
    folder = run_folder(result) / "adapters" / "final"
    assert sorted(p.name for p in folder.iterdir()) == ["lora_comfyui.safetensors", "pytorch_lora_weights.safetensors"]
    # The saved LoRA, loaded into diffusers' transformer, reproduces the final eval loss.
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(wan_models / "wan")
    pipe.load_lora_weights(folder)
    assert eval_loss_through_diffusers(result.config, pipe.transformer) == pytest.approx(history[12], rel=1e-5)


@pytest.mark.slow
def test_two_pipeline_stages_train_like_one(runs):
    one, two = runs["one"], runs["two"]
    assert "stage 1:" in two.output
    assert two.losses() == pytest.approx(one.losses(), abs=1e-5)
    assert evals(two) == pytest.approx(evals(one), abs=1e-5)
    a = load_file(run_folder(one) / "adapters" / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(run_folder(two) / "adapters" / "final" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and len(a) == 40
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_full_finetune_of_one_expert_saves_both_layouts(wan_models, runs):
    from diffusers import WanTransformer3DModel

    from saving.export import ORIGINAL_LAYOUT_FILE

    result = runs["full"]
    history = evals(result)
    assert history[8] < 0.95 * history[0], history
    folder = run_folder(result) / "models" / "final"
    saved = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    initial = load_file(wan_models / "wan2.2-a14b" / "transformer_2" / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == initial.keys()
    assert [k for k in initial if torch.equal(saved[k], initial[k])] == []  # every weight trained
    # The low-noise expert started from transformer_2: diffusers' forward on it gives the first eval.
    untrained = eval_loss_through_diffusers(
        result.config, WanTransformer3DModel.from_pretrained(wan_models / "wan2.2-a14b" / "transformer_2"))
    assert untrained == pytest.approx(history[0], rel=1e-5)
    trained = WanTransformer3DModel.from_pretrained(folder / "transformer")
    assert eval_loss_through_diffusers(result.config, trained) == pytest.approx(history[8], rel=1e-5)
    single = WanTransformer3DModel.from_single_file(str(folder / ORIGINAL_LAYOUT_FILE), config=str(folder),
                                                    subfolder="transformer", local_files_only=True).state_dict()
    assert single.keys() == saved.keys() and all(torch.equal(single[k], saved[k]) for k in saved)


def test_example_config_loads(wan_models, data, tmp_path):
    """examples/wan.toml, with the tiny model, its single-file stand-in and a video dataset in
    place of the placeholder paths, passes every check and keeps the values it sets."""
    import re
    import tomllib

    from conftest import REPO, to_toml

    text = (REPO / "examples" / "wan.toml").read_text(encoding="utf-8")
    text, found = re.subn(r"^# (transformer_path = .*)$", r"\1", text, flags=re.MULTILINE)
    assert found == 1, "expected the commented-out transformer_path example"
    config = tomllib.loads(text)
    assert config["model"]["type"] == "wan"
    dataset = {"resolutions": [64], "frame_buckets": [1, 9, 17],
               "directory": [{"path": str(data["images"])}, {"path": str(data["videos"])}]}
    (tmp_path / "dataset.toml").write_text(to_toml(dataset))
    config["output_dir"], config["dataset"] = str(tmp_path / "runs"), str(tmp_path / "dataset.toml")
    config["model"]["diffusers_path"] = str(wan_models / "wan")
    config["model"]["transformer_path"] = str(wan_models / "wan" / ORIGINAL_FILE)
    (tmp_path / "train.toml").write_text(to_toml(config))
    loaded = load_train_config(tmp_path / "train.toml", get_model_class)
    assert type(loaded.model) is get_model_class("wan").config_class
    assert [s.frames for s in loaded.samples] == [33] and loaded.samples[0].negative_prompt
