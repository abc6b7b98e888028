"""LTX-Video and HunyuanVideo: the layer split, the encoders, the checkpoint layouts, the LoRA
export, and LoRA training launched as users launch it (`deepspeed ... train.py`).

Quick tests run in process on tiny models. Slow ones: the launches, shared as module fixtures
(per model: a 1-stage run and a 2-stage run that reads the transformer from the original-layout
single file, both on images mixed with 9- and 17-frame videos), and diffusers' own single-file
loader for HunyuanVideo at the hidden size its converter hard-codes (3072).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ORIGINAL_FILE, evals, launch, losses, ok, run_folder, write_configs
from make_demo_dataset import make_demo_dataset, make_demo_videos
from make_tiny_models import make_tiny_hunyuan_video, make_tiny_ltx_video
from config.dataset_config import BUCKET_DEFAULTS, BucketSettings, Dataset, ResolvedDirectory
from config.training import AdapterConfig
from models import get_model_class
from models.keymaps.hunyuan_video import HunyuanVideoKeymap
from models.keymaps.keymap import detect_original_prefix
from models.keymaps.ltx_video import LTXVideoKeymap
from saving.export import lora_state_dict, save_lora
from training.lora import add_lora, init_lora
from training.weights import SafetensorsFolder, load_weights, read_weights
from utils.errors import ConfigError

NAMES = ["ltx-video", "hunyuan-video"]
LATENT_SHAPE = {"ltx-video": (2, 16, 3, 2, 4), "hunyuan-video": (2, 16, 3, 4, 6)}  # (B, C, F', H', W')


def make_model(name: str, root: Path, **config):
    cls = get_model_class(name)
    return cls(cls.config_class(type=name, diffusers_path=str(root / name), dtype="float32", **config))


def random_batch(name: str, seed: int = 0) -> dict:
    """Noisy latents, timesteps and text embeddings, with text masks that pad different lengths."""
    g = torch.Generator().manual_seed(seed)
    text = {"text": torch.randn(2, 12, 32, generator=g), "text_mask": torch.ones(2, 12, dtype=torch.bool)}
    text["text_mask"][0, 5:] = False
    text["text_mask"][1, 9:] = False
    if name == "hunyuan-video":
        text["pooled"] = torch.randn(2, 32, generator=g)
    return {"noisy": torch.randn(LATENT_SHAPE[name], generator=g), "timesteps": torch.tensor([0.3, 0.8]), "text": text}


def run_layers(model, layers, batch: dict) -> torch.Tensor:
    x = model.input_fields.pack(model.model_inputs(batch["noisy"], batch["timesteps"], batch["text"]))
    for layer in layers:
        x = layer(x)
    return x


def diffusers_forward(model, transformer, batch: dict) -> torch.Tensor:
    """The transformer's own forward, called as diffusers' pipeline calls it (the model's
    reference_forward), in the layout of model.pack_latents (the training target's layout)."""
    return model.reference_forward(transformer, model.model_inputs(batch["noisy"], batch["timesteps"], batch["text"]))


def engine_like_transformer(model, adapter: AdapterConfig | None = None, seed: int = 0, random_b: bool = True):
    """The transformer as the engine builds it (meta, LoRA, layers, per-layer weights), LoRA B random."""
    transformer = model.build_empty_transformer()
    if adapter is not None:
        add_lora(model, transformer, adapter)
    layers = model.layers(transformer)
    names = [n for layer in layers for n in layer.module_names]
    load_weights(model, transformer, names, torch.device("cpu"))
    if adapter is not None:
        init_lora(transformer, names, adapter, torch.device("cpu"), seed)
        if random_b:
            g = torch.Generator().manual_seed(seed + 1)
            with torch.no_grad():
                for n, p in transformer.named_parameters():
                    if "lora_B" in n:
                        p.copy_(0.1 * torch.randn(p.shape, generator=g))
    for layer in layers:  # as parallel/stages.load_stage: the loaded scale_shift_table, not the meta one
        layer.bind_root_parameters(transformer)
    return transformer.eval(), layers


# ------------------------------------------------------------------------------------ tiny models


def test_tiny_pipelines_load_and_generate(video_models):
    from diffusers import HunyuanVideoPipeline, LTXPipeline

    g = torch.Generator().manual_seed(0)
    ltx = LTXPipeline.from_pretrained(video_models / "ltx-video")
    video = ltx("a red circle", height=64, width=64, num_frames=9, num_inference_steps=2, max_sequence_length=32,
                generator=g, output_type="pt").frames
    assert video.shape == (1, 9, 3, 64, 64)
    hunyuan = HunyuanVideoPipeline.from_pretrained(video_models / "hunyuan-video")
    video = hunyuan("a red circle", height=64, width=64, num_frames=9, num_inference_steps=2, max_sequence_length=32,
                    generator=g, output_type="pt").frames
    assert video.shape == (1, 9, 3, 64, 64)


@pytest.mark.parametrize("maker", [make_tiny_ltx_video, make_tiny_hunyuan_video], ids=NAMES)
def test_tiny_models_are_deterministic(video_models, tmp_path, maker):
    again = maker(tmp_path)
    first = video_models / again.name
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (first / rel).read_bytes() == (again / rel).read_bytes(), rel


# ------------------------------------------------------------------------------------ layer split


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_layers_equal_the_transformer_forward(video_models, name, lora):
    model = make_model(name, video_models, **({"guidance": 3.5} if name == "hunyuan-video" else {}))
    adapter = AdapterConfig(rank=4, alpha=8.0) if lora else None
    transformer, layers = engine_like_transformer(model, adapter)
    batch = random_batch(name)
    with torch.no_grad():
        ours = run_layers(model, layers, batch)
        reference = diffusers_forward(model, transformer, batch)
    target = model.pack_latents(batch["noisy"])
    assert ours.shape == reference.shape == target.shape
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    if not lora:
        # Same modules, same order of operations: not just close, equal.
        assert torch.equal(ours, reference)


@pytest.mark.parametrize("name", NAMES)
def test_only_int_tensors_cross_stages_without_gradient(video_models, name):
    model = make_model(name, video_models)
    transformer, layers = engine_like_transformer(model, AdapterConfig(rank=4, alpha=4.0))
    batch = random_batch(name)
    inputs = model.model_inputs(batch["noisy"], batch["timesteps"], batch["text"])
    assert inputs["text_mask"].dtype == torch.int64
    x = model.input_fields.pack(inputs)
    for layer in layers[:-1]:
        x = layer(x)
        for field, t in zip(layer.out_fields.names, x):
            # DeepSpeed sends a gradient back for every floating tensor crossing a stage.
            assert t.dtype == torch.int64 or (t.is_floating_point() and t.requires_grad), (field, t.dtype)
            assert t.is_contiguous(), field
    loss = layers[-1](x).pow(2).mean()
    loss.backward()
    grads = [p.grad for n, p in transformer.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_hunyuan_layer_order_and_modules(video_models):
    model = make_model("hunyuan-video", video_models)
    layers = model.layers(model.build_empty_transformer())
    assert [layer.module_names for layer in layers] == [
        ["x_embedder", "time_text_embed", "context_embedder"],  # the token refiner belongs to the input layer
        ["transformer_blocks.0"], ["transformer_blocks.1"],
        ["single_transformer_blocks.0"], ["single_transformer_blocks.1"],
        ["norm_out", "proj_out"],
    ]
    # Two block classes: "selective" checkpointing recomputes the single-stream ones.
    blocks = [type(layer).__name__ for layer in layers[1:-1]]
    assert blocks == ["HunyuanDoubleBlockLayer"] * 2 + ["HunyuanSingleBlockLayer"] * 2


def test_partition_type_must_match_a_layer_class(video_models):
    from config.train_config import TrainConfig, TrainConfigFile
    from parallel.stages import plan_stages, resolve_partition_method

    model = make_model("hunyuan-video", video_models)

    def config(method):
        settings = TrainConfigFile(output_dir=Path("o"), dataset_file=Path("d"), model_table={"type": model.name},
                                   max_steps=1, adapter=AdapterConfig(rank=4, alpha=4.0), pipeline_stages=2,
                                   partition_method=method)
        return TrainConfig(file=Path("train.toml"), settings=settings, model=model.config, dataset=None,
                           eval_datasets=[])

    assert plan_stages(model, config("type:BlockLayer"))[2] == [0, 3, 6]
    # "blocks": the same number of blocks per stage
    transformer, layers, parts = plan_stages(model, config("blocks"))
    assert parts == [0, 3, 6]
    assert resolve_partition_method("parameters", layers, full_finetune=True) == "parameters"
    assert resolve_partition_method("blocks", layers, full_finetune=True) == \
        "type:^(HunyuanDoubleBlockLayer|HunyuanSingleBlockLayer)$"
    with pytest.raises(ConfigError, match=r"'type:HunyuanBlockLayer' matches none of the hunyuan-video layer classes "
                                          r"\(HunyuanInputLayer, HunyuanDoubleBlockLayer, HunyuanSingleBlockLayer, "
                                          r"HunyuanFinalLayer\)"):
        plan_stages(model, config("type:HunyuanBlockLayer"))


def test_ltx_rope_scale_follows_frame_rate(video_models):
    assert make_model("ltx-video", video_models).rope_interpolation_scale == (8 / 25, 32, 32)
    assert make_model("ltx-video", video_models, frame_rate=24.0).rope_interpolation_scale == (8 / 24, 32, 32)


@pytest.mark.parametrize("name", NAMES)
def test_default_lora_targets(video_models, name):
    model = make_model(name, video_models)
    transformer = model.build_empty_transformer()
    add_lora(model, transformer, AdapterConfig(rank=4, alpha=4.0))
    targeted = {n.removesuffix(".lora_A.default.weight") for n, _ in transformer.named_parameters()
                if n.endswith(".lora_A.default.weight")}
    if name == "ltx-video":
        per_block = [f"attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")]
        expected = {f"transformer_blocks.{i}.{m}" for i in range(2) for m in per_block + ["ff.net.0.proj", "ff.net.2"]}
    else:
        double = [f"attn.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                        "to_add_out")] + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                                                          "ff_context.net.2"]
        single = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"]
        expected = ({f"transformer_blocks.{i}.{m}" for i in range(2) for m in double}
                    | {f"single_transformer_blocks.{i}.{m}" for i in range(2) for m in single})
    assert targeted == expected


# ------------------------------------------------------------------------------------ encoders


def test_ltx_text_matches_the_pipeline(video_models):
    from diffusers import LTXPipeline

    model = make_model("ltx-video", video_models, max_sequence_length=32)
    model.load_text_encoders(torch.device("cpu"))
    captions = ["a red circle on a blue background", "two dogs running on the beach in the evening light"]
    ours = model.encode_captions(captions)
    pipe = LTXPipeline.from_pretrained(video_models / "ltx-video")
    embeds, mask, _, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, max_sequence_length=32)
    for i, item in enumerate(ours):
        assert item["text_mask"].dtype == torch.bool
        assert torch.equal(item["text"], embeds[i]) and torch.equal(item["text_mask"], mask[i])
    lengths = [int(item["text_mask"].sum()) for item in ours]
    assert all(0 < n < 32 for n in lengths) and lengths[0] != lengths[1]  # padding differs per caption


def test_hunyuan_template_crop_start(video_models):
    from transformers import AutoTokenizer

    from models.hunyuan_video import template_crop_start

    model = make_model("hunyuan-video", video_models)
    tokenizer = AutoTokenizer.from_pretrained(video_models / "hunyuan-video" / "tokenizer")
    crop = template_crop_start(tokenizer, model.prompt_template)
    caption = "a red circle on a blue background"
    ids = tokenizer(model.prompt_template.format(caption)).input_ids
    # The template's tokens before the prompt are the same with and without a prompt ...
    assert ids[:crop] == tokenizer(model.prompt_template.format("")).input_ids[:crop]
    # ... and the cropped tokens are the caption, then the template's closing <|eot_id|>.
    assert tokenizer.convert_ids_to_tokens(ids[-1]) == "<|eot_id|>"
    assert tokenizer.decode(ids[crop:-1]).strip() == caption


def test_hunyuan_text_matches_the_pipeline(video_models):
    from diffusers import HunyuanVideoPipeline

    model = make_model("hunyuan-video", video_models, max_sequence_length=32)
    model.load_text_encoders(torch.device("cpu"))
    captions = ["a red circle on a blue background", "two dogs running on the beach in the evening light"]
    ours = model.encode_captions(captions)
    pipe = HunyuanVideoPipeline.from_pretrained(video_models / "hunyuan-video")
    template = {"template": model.prompt_template, "crop_start": model.crop_start}
    embeds, pooled, mask = pipe.encode_prompt(captions, prompt_template=template, max_sequence_length=32)
    for i, item in enumerate(ours):
        assert torch.equal(item["text"], embeds[i]) and torch.equal(item["pooled"], pooled[i])
        assert torch.equal(item["text_mask"], mask[i].bool())
    # Right padding: each mask is a prefix of ones, as the transformer's text mask expects.
    for item in ours:
        n = int(item["text_mask"].sum())
        assert 0 < n < 32 and item["text_mask"][:n].all()


@pytest.mark.parametrize("name", NAMES)
def test_encode_pixels(video_models, name):
    from diffusers import AutoencoderKLHunyuanVideo, AutoencoderKLLTXVideo

    model = make_model(name, video_models)
    model.load_vae(torch.device("cpu"))
    pixels = torch.rand(2, 3, 9, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = torch.stack([item["latents"] for item in model.encode_pixels(pixels)])
        if name == "ltx-video":
            vae = AutoencoderKLLTXVideo.from_pretrained(video_models / name / "vae")
            raw = vae.encode(pixels).latent_dist.mode()
            # What LTXPipeline does to latents before decoding undoes the normalisation.
            from diffusers import LTXPipeline

            back = LTXPipeline._denormalize_latents(latents, vae.latents_mean, vae.latents_std,
                                                    vae.config.scaling_factor)
            assert latents.shape == (2, 16, 2, 2, 2)
        else:
            vae = AutoencoderKLHunyuanVideo.from_pretrained(video_models / name / "vae")
            raw = vae.encode(pixels).latent_dist.mode()
            back = latents / vae.config.scaling_factor
            assert latents.shape == (2, 16, 3, 8, 8)
    torch.testing.assert_close(back, raw)
    assert not torch.allclose(latents, raw)  # the normalisation did something
    # A clip of 8 frames never reaches encode_pixels: check_dataset rejects its frame bucket.
    settings = BUCKET_DEFAULTS.overridden_by(BucketSettings(frame_buckets=[8]))
    with pytest.raises(ConfigError, match="frames"):
        model.check_dataset(Dataset(video_models / "dataset.toml", [ResolvedDirectory(video_models, settings)]))


# ------------------------------------------------------------------------------------ layouts


def test_hunyuan_layout_round_trip(video_models):
    folder = video_models / "hunyuan-video"
    sd = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    original = HunyuanVideoKeymap.diffusers_to_original(sd)
    inner = 2 * 16
    assert original["double_blocks.0.img_attn_qkv.weight"].shape == (3 * inner, inner)
    assert original["double_blocks.1.txt_attn_qkv.bias"].shape == (3 * inner,)
    assert original["single_blocks.1.linear1.weight"].shape == (3 * inner + 4 * inner, inner)
    assert original["txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight"].shape == (3 * inner, inner)
    assert "final_layer.adaLN_modulation.1.weight" in original and "guidance_in.mlp.0.weight" in original
    assert not any(k.startswith(("transformer_blocks", "single_transformer_blocks", "context_embedder")) for k in original)
    config = make_model("hunyuan-video", video_models).transformer_config()
    for back in (HunyuanVideoKeymap.original_to_diffusers(original),
                 HunyuanVideoKeymap.original_to_diffusers(original, config),
                 HunyuanVideoKeymap.original_to_diffusers({"model.diffusion_model." + k: v for k, v in original.items()})):
        assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # The tiny model's single-file stand-in, read lazily key by key (also from a .pt file).
    keys = sorted(sd)
    lazy = HunyuanVideoKeymap.load_diffusers_keys_from_original(folder / ORIGINAL_FILE["hunyuan-video"], keys, config)
    assert all(torch.equal(lazy[k], sd[k]) for k in keys)
    torch.save({"module": original}, video_models / "hunyuan-original.pt")
    lazy = HunyuanVideoKeymap.load_diffusers_keys_from_original(video_models / "hunyuan-original.pt", keys, config)
    assert all(torch.equal(lazy[k], sd[k]) for k in keys)
    with pytest.raises(ValueError, match="not in the HunyuanVideo"):
        HunyuanVideoKeymap.original_to_diffusers({**original, "double_blocks.0.unknown.weight": torch.zeros(1)})


def test_ltx_layout_round_trip_and_diffusers_single_file_loader(video_models):
    from diffusers import LTXVideoTransformer3DModel

    folder = video_models / "ltx-video"
    sd = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    original = load_file(folder / ORIGINAL_FILE["ltx-video"])
    assert all(k.startswith("model.diffusion_model.") for k in original)
    assert "model.diffusion_model.patchify_proj.weight" in original
    assert "model.diffusion_model.adaln_single.linear.weight" in original
    assert "model.diffusion_model.transformer_blocks.1.attn2.k_norm.weight" in original
    # q, k, v stay separate: every tensor is passed through unchanged, only renamed.
    assert original.keys() == LTXVideoKeymap.diffusers_to_original(sd, prefix="model.diffusion_model.").keys()
    back = LTXVideoKeymap.original_to_diffusers({**original, "vae.decoder.conv_in.weight": torch.zeros(1)})
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # diffusers' own single-file loader reads our original-layout file to the same weights.
    loaded = LTXVideoTransformer3DModel.from_single_file(str(folder / ORIGINAL_FILE["ltx-video"]), config=str(folder),
                                                         subfolder="transformer", local_files_only=True).state_dict()
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)


@pytest.mark.parametrize("name", NAMES)
def test_transformer_path_reads_the_same_weights(video_models, name):
    folder = video_models / name
    model = make_model(name, video_models, transformer_path=str(folder / ORIGINAL_FILE[name]))
    keys = sorted(SafetensorsFolder(folder / "transformer").files)
    expected = SafetensorsFolder(folder / "transformer").read(keys)
    got = read_weights(model, keys)
    assert all(torch.equal(got[k], expected[k]) for k in keys)


# The files HunyuanVideo users hold for its VAE and text encoders (make_tiny_models.py writes them):
# ComfyUI's single files, the release's VAE .pt, diffusion-pipe's llm_path / clip_path folders.
HUNYUAN_FILES = {
    "comfyui": {"vae_path": "hunyuan_video_vae_tiny.safetensors", "llm_path": "llava_llama3_tiny.safetensors",
                "clip_path": "clip_l_tiny.safetensors"},
    "release, diffusion-pipe folders": {"vae_path": "hunyuan_video_vae_tiny.pt",
                                        "llm_path": "llava-llama-3-tiny-text-encoder-tokenizer",
                                        "clip_path": "clip-vit-large-patch14-tiny"},
}


def hunyuan_encodings(model) -> tuple[list[dict], list[dict]]:
    """The model's text embeddings of two captions and latents of two clips."""
    model.check_encoder_files()
    model.load_text_encoders(torch.device("cpu"))
    model.load_vae(torch.device("cpu"))
    pixels = torch.rand(2, 3, 9, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        return (model.encode_captions(["a red circle on a blue background", "two dogs running on the beach"]),
                model.encode_pixels(pixels))


@pytest.mark.parametrize("files", list(HUNYUAN_FILES))
def test_hunyuan_encoders_from_single_files_equal_the_diffusers_folder(video_models, files):
    folder = video_models / "hunyuan-video"
    reference = make_model("hunyuan-video", video_models, max_sequence_length=16)
    paths = {k: str(folder / v) for k, v in HUNYUAN_FILES[files].items()}
    model = make_model("hunyuan-video", video_models, max_sequence_length=16, **paths)
    (text, latents), (ref_text, ref_latents) = hunyuan_encodings(model), hunyuan_encodings(reference)
    for got, expected in zip(text + latents, ref_text + ref_latents):
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    # Other weight files: the caches are encoded again.
    assert model.text_cache_signature() != reference.text_cache_signature()
    assert model.latent_cache_signature() != reference.latent_cache_signature()


def test_hunyuan_wrong_encoder_file_is_one_line(video_models, tmp_path):
    folder = video_models / "hunyuan-video"
    html = tmp_path / "vae.safetensors"
    html.write_text("<html>Not found</html>")
    (tmp_path / "empty").mkdir()
    cases = [
        ({"vae_path": folder / ORIGINAL_FILE["hunyuan-video"]},
         f"model.vae_path: {folder / ORIGINAL_FILE['hunyuan-video']} is not the HunyuanVideo VAE the config in "
         f"diffusers_path describes: it holds none of its "),
        ({"llm_path": folder / "clip_l_tiny.safetensors"}, "model.llm_path: "),
        ({"clip_path": folder / "llava_llama3_tiny.safetensors"}, "model.clip_path: "),
        ({"vae_path": html}, f"model.vae_path: {html} is not a readable .safetensors file ("),
        ({"llm_path": tmp_path / "empty"}, f"model.llm_path: {tmp_path / 'empty'} has no config.json; expected a "
                                           f"transformers folder of the LLaVA-Llama-3 text encoder with its tokenizer"),
        ({"llm_path": folder / "clip-vit-large-patch14-tiny"},
         f"model.llm_path: {folder / 'clip-vit-large-patch14-tiny'} holds a model of type 'clip', not the LLaVA-Llama-3 "
         f"text encoder (model_type 'llama' in its config.json)"),
    ]
    for paths, start in cases:
        model = make_model("hunyuan-video", video_models, **{k: str(v) for k, v in paths.items()})
        with pytest.raises(ConfigError) as info:
            model.check_encoder_files()
        message = str(info.value)
        assert message.startswith(start) and "\n" not in message, message
    # A Llama file of another size: its shapes are named.
    llama = load_file(folder / "llava_llama3_tiny.safetensors")
    llama["model.norm.weight"] = torch.ones(7)
    save_file(llama, tmp_path / "llama.safetensors")
    with pytest.raises(ConfigError, match=r"1 weights have another shape \(e.g. 'model.norm.weight': expected "
                                          r"\(32,\), found \(7,\)\): a model of another size"):
        make_model("hunyuan-video", video_models, llm_path=str(tmp_path / "llama.safetensors")).check_encoder_files()


# ------------------------------------------------------------------------------------ LoRA export


def merge_original_lora(original: dict, lora: dict, prefix: str = "diffusion_model.") -> dict:
    """Merge a ComfyUI-format LoRA into original-layout weights: W += B @ A (scale 1; no alpha keys)."""
    merged = dict(original)
    prefix_of_weights = detect_original_prefix(original)
    for key, a in lora.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(prefix):-len(".lora_A.weight")]
            b = lora[f"{prefix}{module}.lora_B.weight"]
            weight = f"{prefix_of_weights}{module}.weight"
            merged[weight] = merged[weight] + b.float() @ a.float()
    return merged


def lora_through_both_formats(video_models, tmp_path, name, adapter_dir: Path | None = None,
                              targets=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Outputs of (diffusers model + diffusers-format LoRA file, original-layout checkpoint merged
    with the ComfyUI-format file and converted back, the model the adapter was saved from)."""
    from diffusers import HunyuanVideoTransformer3DModel, LTXVideoTransformer3DModel

    model = make_model(name, video_models)
    batch = random_batch(name, seed=1)
    trained = None
    if adapter_dir is None:
        adapter = AdapterConfig(rank=4, alpha=8.0, target_modules=targets)
        transformer, layers = engine_like_transformer(model, adapter)
        with torch.no_grad():
            trained = run_layers(model, layers, batch)
        adapter_dir = tmp_path / "adapter"
        written = save_lora(model, lora_state_dict(transformer), adapter, adapter_dir, torch.float32)
        assert [p.name for p in written] == ["pytorch_lora_weights.safetensors", "lora_comfyui.safetensors"]
    cls = LTXVideoTransformer3DModel if name == "ltx-video" else HunyuanVideoTransformer3DModel
    folder = video_models / name / "transformer"

    with_lora = cls.from_pretrained(folder).eval()
    with_lora.load_lora_adapter(load_file(adapter_dir / "pytorch_lora_weights.safetensors"), prefix="transformer")

    comfy = load_file(adapter_dir / "lora_comfyui.safetensors")
    assert comfy and all(k.startswith("diffusion_model.") for k in comfy)
    original = load_file(video_models / name / ORIGINAL_FILE[name])
    merged = merge_original_lora(original, comfy)
    back = model.keymap.original_to_diffusers(merged, model.transformer_config())
    from_comfy = cls.from_config(cls.load_config(folder)).eval()
    from_comfy.load_state_dict(back, strict=True)
    with torch.no_grad():
        return diffusers_forward(model, with_lora, batch), diffusers_forward(model, from_comfy, batch), trained


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("targets", [None, ["to_q", "to_v", "proj_mlp", "add_k_proj"]], ids=["default", "partial"])
def test_comfyui_lora_equals_the_diffusers_lora(video_models, tmp_path, name, targets):
    # "partial" leaves parts of HunyuanVideo's fused modules without a LoRA: zero rows in B.
    if name == "ltx-video" and targets is not None:
        targets = ["to_q", "to_v", "ff.net.2"]
    via_diffusers, via_comfy, trained = lora_through_both_formats(video_models, tmp_path, name, targets=targets)
    torch.testing.assert_close(via_diffusers, trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_comfy, via_diffusers, rtol=1e-5, atol=1e-5)
    base = diffusers_forward(make_model(name, video_models),
                             get_model_class(name).transformer_class.from_pretrained(video_models / name / "transformer"),
                             random_batch(name, seed=1))
    assert (via_diffusers - base).abs().max() > 1e-3  # the LoRA changes the output


def test_hunyuan_fused_lora_is_blockdiagonal():
    g = torch.Generator().manual_seed(0)
    parts = {m: (torch.randn(3, 8, generator=g), torch.randn(8, 3, generator=g)) for m in ("attn.to_q", "attn.to_v")}
    lora = {f"transformer.single_transformer_blocks.0.{m}.lora_{x}.weight": t
            for m, (a, b) in parts.items() for x, t in (("A", a), ("B", b))}
    out = HunyuanVideoKeymap.lora_to_original(lora, {"num_attention_heads": 2, "attention_head_dim": 4, "mlp_ratio": 2.0})
    a, b = out["diffusion_model.single_blocks.0.linear1.lora_A.weight"], out["diffusion_model.single_blocks.0.linear1.lora_B.weight"]
    assert a.shape == (6, 8) and b.shape == (3 * 8 + 16, 6)
    delta = b @ a
    torch.testing.assert_close(delta[:8], parts["attn.to_q"][1] @ parts["attn.to_q"][0])
    assert not delta[8:16].any() and not delta[24:].any()  # k and the MLP input have no LoRA
    torch.testing.assert_close(delta[16:24], parts["attn.to_v"][1] @ parts["attn.to_v"][0])


@pytest.mark.slow
def test_hunyuan_layout_matches_diffusers_single_file_loader(tmp_path):
    """diffusers' converter splits single-block linear1 at a hard-coded hidden size of 3072, so this
    runs at 3072 wide (24 heads x 128), one block of each kind, MLP ratio 1: ~0.5 G bf16 weights."""
    from accelerate import init_empty_weights
    from diffusers import HunyuanVideoTransformer3DModel

    config = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=1,
                  num_single_layers=1, num_refiner_layers=1, mlp_ratio=1.0, patch_size=2, patch_size_t=1,
                  guidance_embeds=True, text_embed_dim=64, pooled_projection_dim=64, rope_axes_dim=(16, 56, 56))
    with init_empty_weights():
        shapes = HunyuanVideoTransformer3DModel(**config)
    (tmp_path / "transformer").mkdir()
    shapes.save_config(tmp_path / "transformer")
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g).to(torch.bfloat16) for k, v in shapes.state_dict().items()}
    save_file({k: v.contiguous() for k, v in HunyuanVideoKeymap.diffusers_to_original(sd).items()},
              str(tmp_path / "original.safetensors"))
    loaded = HunyuanVideoTransformer3DModel.from_single_file(
        str(tmp_path / "original.safetensors"), config=str(tmp_path), subfolder="transformer", local_files_only=True,
        torch_dtype=torch.bfloat16).state_dict()
    assert set(loaded) == set(sd)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


# ------------------------------------------------------------------------------------ launches




@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("video_data")
    images = make_demo_dataset(root / "images", count=8, seed=0)
    videos = make_demo_videos(root / "videos", count=4, seed=0, frames=(9, 17))
    return {"root": root, "images": images, "videos": videos}


def configure(video_models, mixed_data, name: str, run: str, **overrides) -> Path:
    # Images are one-frame clips; the 9- and 17-frame videos fill their own frame buckets.
    dataset = {"frame_buckets": [1, 9, 17],
               "directory": [{"path": str(mixed_data["images"])}, {"path": str(mixed_data["videos"])}]}
    settings = dict(max_steps=20, eval_at_start=True, eval_datasets=[{"name": "train", "config": "dataset.toml"}],
                    adapter={"rank": 4, "alpha": 8}, optimizer={"lr": 3e-3}, sample=VIDEO_SAMPLE[name],
                    model={"type": name, "diffusers_path": str(video_models / name), "max_sequence_length": 32})
    for k, v in overrides.items():
        settings[k] = {**settings[k], **v} if isinstance(settings.get(k), dict) else v
    return write_configs(mixed_data["root"] / name / run, video_models / name, mixed_data["images"],
                         dataset=dataset, **settings)


# Drawn once, at the end of each launch (test_samples_equal_the_pipeline_through_a_launch).
VIDEO_SAMPLE = {"ltx-video": {"prompts": ["a red circle"], "width": 64, "height": 96, "frames": 9, "steps": 3,
                              "guidance": 2.5, "negative_prompt": "blurry", "seed": 3},
                "hunyuan-video": {"prompts": ["a red circle"], "width": 48, "height": 32, "frames": 5, "steps": 3,
                                  "guidance": 4.0, "seed": 3}}


@pytest.fixture(scope="module")
def one_stage(video_models, mixed_data):
    return {name: ok(launch(configure(video_models, mixed_data, name, "one"))) for name in NAMES}


@pytest.fixture(scope="module")
def two_stages(video_models, mixed_data, one_stage):
    # Also reads the transformer from the original-layout single file: the same weights.
    return {name: ok(launch(configure(video_models, mixed_data, name, "two", pipeline_stages=2,
                                      model={"transformer_path": str(video_models / name / ORIGINAL_FILE[name])}),
                            num_gpus=2))
            for name in NAMES}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_lora_trains_on_images_and_videos(one_stage, name):
    result = one_stage[name]
    # 8 images (frame bucket 1) and two videos each in the 9- and 17-frame buckets: 12 latents and 12
    # captions, and the [sample] table's prompt (and negative prompt) embedded with the captions.
    prompts = len(VIDEO_SAMPLE[name]["prompts"]) + ("negative_prompt" in VIDEO_SAMPLE[name])
    assert f"cache: {24 + prompts} new entries encoded, 12 samples ready" in result.output
    assert len(losses(result)) == 20
    start, end = evals(result)[0], evals(result)[20]
    assert end < 0.95 * start, (start, end)
    files = sorted(p.name for p in (run_folder(result) / "adapters" / "final").iterdir())
    assert files == ["lora_comfyui.safetensors", "pytorch_lora_weights.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_two_pipeline_stages_train_like_one(one_stage, two_stages, name):
    one, two = one_stage[name], two_stages[name]
    assert "stage 1:" in two.output
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
    assert evals(two) == pytest.approx(evals(one), abs=1e-5)
    a = load_file(run_folder(one) / "adapters" / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(run_folder(two) / "adapters" / "final" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_trained_comfyui_lora_equals_the_diffusers_lora(video_models, tmp_path, one_stage, name):
    adapter = run_folder(one_stage[name]) / "adapters" / "final"
    via_diffusers, via_comfy, _ = lora_through_both_formats(video_models, tmp_path, name, adapter_dir=adapter)
    torch.testing.assert_close(via_comfy, via_diffusers, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_samples_equal_the_pipeline_through_a_launch(video_models, one_stage, two_stages, name):
    """The final samples of the 1-stage and the 2-stage launch (DeepSpeed's engine, the trained
    LoRA) are the latents of the model's diffusers pipeline with the saved LoRA loaded."""
    sample = VIDEO_SAMPLE[name]
    model = make_model(name, video_models, max_sequence_length=32)
    pipe = model.pipeline_class.from_pretrained(video_models / name, dtype=torch.float32)
    call = dict(prompt=sample["prompts"][0], width=sample["width"], height=sample["height"],
                num_frames=sample["frames"], num_inference_steps=sample["steps"], guidance_scale=sample["guidance"],
                max_sequence_length=32, output_type="latent")
    if model.sample_guidance == "classifier_free":
        call["negative_prompt"] = sample["negative_prompt"]
    if name == "hunyuan-video":  # the tiny tokenizer's template length (test_sampling_models says why)
        from models.hunyuan_video import template_crop_start

        crop_start = template_crop_start(pipe.tokenizer, model.prompt_template)
        call["prompt_template"] = {"template": model.prompt_template, "crop_start": crop_start}
    for result in (one_stage[name], two_stages[name]):
        pipe.unload_lora_weights()
        pipe.load_lora_weights(run_folder(result) / "adapters" / "final")
        theirs = pipe(**call, generator=torch.Generator().manual_seed(sample["seed"])).frames
        expected = theirs if theirs.dim() == 3 else model.pack_latents(theirs)
        ours = load_file(run_folder(result) / "samples" / "step00000020" / "latents.safetensors")["0"]
        torch.testing.assert_close(model.pack_latents(ours), expected, rtol=1e-4, atol=1e-5)
        assert (run_folder(result) / "samples" / "step00000020" / "0.mp4").stat().st_size > 0


# ------------------------------------------------------------------------------------ examples


@pytest.mark.parametrize("name, example", [("ltx-video", "ltx_video.toml"), ("hunyuan-video", "hunyuan_video.toml")])
def test_example_config_loads(video_models, mixed_data, tmp_path, name, example):
    """The example, with the tiny model, its single-file stand-in and a video dataset in place of the
    placeholder paths, passes every check and keeps the values it sets."""
    import re
    import tomllib

    from config.train_config import load_train_config
    from conftest import REPO, to_toml
    from utils.errors import ConfigError

    text = (REPO / "examples" / example).read_text(encoding="utf-8")
    text, found = re.subn(r"^# (transformer_path = .*)$", r"\1", text, flags=re.MULTILINE)
    assert found == 1, "expected the commented-out transformer_path example"
    single_files = HUNYUAN_FILES["comfyui"] if name == "hunyuan-video" else {}
    for key in single_files:
        text, found = re.subn(rf"^# ({key} = .*)$", r"\1", text, flags=re.MULTILINE)
        assert found == 1, f"expected the commented-out {key} example"
    config = tomllib.loads(text)
    assert config["model"]["type"] == name
    dataset = {"resolutions": [64], "frame_buckets": [1, 9, 17],
               "directory": [{"path": str(mixed_data["images"])}, {"path": str(mixed_data["videos"])}]}
    (tmp_path / "dataset.toml").write_text(to_toml(dataset))
    config["output_dir"], config["dataset"] = str(tmp_path / "runs"), str(tmp_path / "dataset.toml")
    config["model"]["diffusers_path"] = str(video_models / name)
    config["model"]["transformer_path"] = str(video_models / name / ORIGINAL_FILE[name])
    for key, file in single_files.items():
        config["model"][key] = str(video_models / name / file)
    (tmp_path / "train.toml").write_text(to_toml(config))
    loaded = load_train_config(tmp_path / "train.toml", get_model_class)
    assert type(loaded.model) is get_model_class(name).config_class
    for key, value in config["model"].items():
        if not key.endswith("_path"):
            assert getattr(loaded.model, key) == value, key
    for key, file in single_files.items():
        assert getattr(loaded.model, key) == str(video_models / name / file)
    if single_files:
        # A folder where the VAE's single file goes, and a file that is not there: one line each.
        for value, message in [(video_models / name / "vae", f"'model.vae_path' is a folder: {video_models / name / 'vae'}; "
                                                            f"expected the VAE's single file"),
                               (tmp_path / "no.safetensors", f"'model.vae_path' does not exist: {tmp_path / 'no.safetensors'}")]:
            (tmp_path / "train.toml").write_text(to_toml({**config, "model": {**config["model"], "vae_path": str(value)}}))
            with pytest.raises(ConfigError) as info:
                load_train_config(tmp_path / "train.toml", get_model_class)
            assert str(info.value).startswith(f"{tmp_path / 'train.toml'}: {message}"), str(info.value)
        (tmp_path / "train.toml").write_text(to_toml(config))
    # Frame buckets the model cannot take are refused before any model loads.
    dataset["frame_buckets"] = [1, 10]
    (tmp_path / "dataset.toml").write_text(to_toml(dataset))
    with pytest.raises(ConfigError, match="frame_buckets"):
        load_train_config(tmp_path / "train.toml", get_model_class)
