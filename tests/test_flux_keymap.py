"""The Flux key map: round trips, diffusers' single-file loader, and exact LoRA export."""

import pytest
import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from models.keymaps.flux import FluxKeymap
from models.keymaps.keymap import LINEAR

TINY = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
INNER = 2 * 16


def tiny_flux(seed=0):
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TINY).eval()


def flux_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(4, 4, 3)
    img_ids[..., 1] = torch.arange(4)[:, None]
    img_ids[..., 2] = torch.arange(4)[None, :]
    return dict(
        hidden_states=torch.randn(1, 16, 64, generator=g),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.7]),
        guidance=torch.tensor([3.5]),
        img_ids=img_ids.reshape(16, 3),
        txt_ids=torch.zeros(8, 3),
    )


def assert_same(a, b):
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_roundtrip_and_names(tmp_path):
    model = tiny_flux()
    sd = model.state_dict()
    orig = FluxKeymap.diffusers_to_original(sd)

    assert orig["double_blocks.0.img_attn.qkv.weight"].shape == (3 * INNER, INNER)
    assert orig["single_blocks.1.linear1.weight"].shape == (3 * INNER + 4 * INNER, INNER)
    assert orig["single_blocks.1.linear2.weight"].shape == (INNER, INNER + 4 * INNER)
    for k in ["img_in.weight", "time_in.in_layer.bias", "vector_in.out_layer.weight", "guidance_in.in_layer.weight",
              "txt_in.bias", "double_blocks.1.txt_mod.lin.weight", "double_blocks.1.txt_attn.norm.key_norm.scale",
              "double_blocks.0.img_mlp.2.bias", "single_blocks.0.norm.query_norm.scale",
              "single_blocks.0.modulation.lin.weight", "final_layer.adaLN_modulation.1.bias"]:
        assert k in orig, k
    assert not any(k.endswith("norm.weight") for k in orig)
    assert torch.equal(orig["double_blocks.0.img_attn.qkv.weight"][INNER : 2 * INNER],
                       sd["transformer_blocks.0.attn.to_k.weight"])
    assert torch.equal(orig["single_blocks.1.linear1.bias"][3 * INNER :], sd["single_transformer_blocks.1.proj_mlp.bias"])
    # (shift, scale) in the original, (scale, shift) in diffusers
    half = sd["norm_out.linear.weight"].shape[0] // 2
    assert torch.equal(orig["final_layer.adaLN_modulation.1.weight"][:half], sd["norm_out.linear.weight"][half:])
    assert len(orig) == len(sd) - 2 * 8 - 2 * 6  # tensors fused away: 8 per double block, 6 per single block

    assert_same(FluxKeymap.original_to_diffusers(orig), sd)  # split sizes from shapes
    prefixed = {"model.diffusion_model." + k: v for k, v in orig.items()}
    prefixed["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)  # other components are ignored
    assert_same(FluxKeymap.original_to_diffusers(prefixed, model.config), sd)  # split sizes from config

    # Lazy per-key loading of one "pipeline stage" from a single file.
    path = tmp_path / "flux.safetensors"
    save_file({"diffusion_model." + k: v.contiguous() for k, v in orig.items()}, str(path))
    wanted = [k for k in sd if k.startswith(("single_transformer_blocks.1.", "norm_out."))]
    got = FluxKeymap.load_diffusers_keys_from_original(path, wanted, model.config)
    assert_same(got, {k: sd[k] for k in wanted})

    with pytest.raises(ValueError, match="bogus.weight"):
        FluxKeymap.diffusers_to_original({**sd, "bogus.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="double_blocks.0.img_attn.extra"):
        FluxKeymap.original_to_diffusers({**orig, "double_blocks.0.img_attn.extra": torch.zeros(1)})


def test_layout_table_covers_model_once():
    layout = FluxKeymap.for_config(tiny_flux().config)
    modules = [d for e in layout.entries for d in e.diffusers]
    assert len(modules) == len(set(modules))
    sd_modules = {k.rpartition(".")[0] for k in tiny_flux().state_dict()}
    assert set(modules) == sd_modules


@pytest.mark.slow
def test_full_width_single_file_matches_diffusers(tmp_path):
    # Full Flux width (inner 3072) but one block of each kind: the real split sizes, ~0.5 G params in bf16.
    cfg = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=128,
               num_attention_heads=24, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True,
               axes_dims_rope=(16, 56, 56))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build directly in bf16: no fp32 copy in memory
    try:
        torch.manual_seed(0)
        model = FluxTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(default)
    sd = model.state_dict()
    config_dir = tmp_path / "config"
    model.save_config(config_dir)  # from_single_file(config=dir) only reads config.json
    del model

    path = tmp_path / "flux1-test.safetensors"
    save_file(FluxKeymap.diffusers_to_original(sd), str(path))

    loaded = FluxTransformer2DModel.from_single_file(str(path), config=str(config_dir), torch_dtype=torch.bfloat16)
    assert_same(loaded.state_dict(), sd)
    del loaded

    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    # ours == sd and theirs == sd, so ours == theirs; one at a time keeps peak memory down.
    assert_same(FluxKeymap.original_to_diffusers(load_file(str(path))), sd)
    assert_same(convert_flux_transformer_checkpoint_to_diffusers(load_file(str(path))), sd)


ALL_LINEAR = ["x_embedder", "context_embedder", "linear_1", "linear_2", "linear", "to_q", "to_k", "to_v", "to_out.0",
              "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2",
              "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]


@pytest.mark.parametrize(
    "targets, use_config",
    [
        (ALL_LINEAR, True),
        (["to_q", "to_v", "add_k_proj", "proj_mlp", "linear"], True),
        (["to_q", "to_v", "add_k_proj", "proj_mlp", "linear"], False),
        (["to_k"], False),  # linear1 then needs the mlp size without a config
    ],
    ids=["all", "partial-config", "partial-inferred", "only-k"],
)
def test_lora_export_is_exact(targets, use_config):
    inputs = flux_inputs()
    model = tiny_flux()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base_out = model(**inputs).sample

    r, alpha = 4, 8
    model.add_adapter(LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
        lora_out = model(**inputs).sample
    assert not torch.allclose(lora_out, base_out, atol=1e-3)

    lora_sd = {k: v * (alpha / r) if "lora_B" in k else v for k, v in get_peft_model_state_dict(model).items()}
    orig_lora = FluxKeymap.lora_to_original(lora_sd, config=model.config if use_config else None)
    assert all(k.startswith("diffusion_model.") for k in orig_lora)
    if targets is ALL_LINEAR:
        linear_entries = {e.original for e in FluxKeymap.for_config(model.config).entries if e.params == LINEAR}
        assert {k.removeprefix("diffusion_model.").rsplit(".", 2)[0] for k in orig_lora} == linear_entries
        assert orig_lora["diffusion_model.single_blocks.0.linear1.lora_A.weight"].shape == (4 * r, INNER)
        assert orig_lora["diffusion_model.single_blocks.0.linear1.lora_B.weight"].shape == (7 * INNER, 4 * r)

    merged = FluxKeymap.diffusers_to_original(base_sd)
    for k, a in orig_lora.items():
        if k.endswith(".lora_A.weight"):
            b = orig_lora[k.replace("lora_A", "lora_B")]
            w = k.removeprefix("diffusion_model.").replace(".lora_A.weight", ".weight")
            merged[w] = merged[w] + b @ a

    fresh = FluxTransformer2DModel(**TINY).eval()
    fresh.load_state_dict(FluxKeymap.original_to_diffusers(merged))
    with torch.no_grad():
        merged_out = fresh(**inputs).sample
    torch.testing.assert_close(merged_out, lora_out, atol=1e-5, rtol=1e-5)


def test_lora_unknown_keys():
    a, b = torch.zeros(4, 32), torch.zeros(32, 4)
    with pytest.raises(ValueError, match="nonsense.lora_A.weight"):
        FluxKeymap.lora_to_original({"nonsense.lora_A.weight": a, "nonsense.lora_B.weight": b})
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        FluxKeymap.lora_to_original({"x_embedder.lora_magnitude_vector": a})
    with pytest.raises(ValueError, match="missing lora_A or lora_B"):
        FluxKeymap.lora_to_original({"x_embedder.lora_A.weight": a})


# ------------------------------------------------------------------------------------ VAE and text encoder files


def test_flux_vae_file_is_what_diffusers_single_file_loader_reads(tiny_models):
    from diffusers import AutoencoderKL

    folder = tiny_models / "flux"
    ours = AutoencoderKL.from_pretrained(folder / "vae").state_dict()
    theirs = AutoencoderKL.from_single_file(folder / "ae_tiny.safetensors", config=str(folder / "vae")).state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_flux_encoders_from_single_files_equal_the_diffusers_folder(tiny_models, tmp_path, dtype):
    from models.flux import FluxConfig, FluxModel

    folder = tiny_models / "flux"
    files = {"vae_path": "ae_tiny.safetensors", "clip_path": "clip_l_tiny.safetensors", "t5_path": "t5xxl_tiny.safetensors"}
    # The same files with every weight halved: what is read from them shows.
    for name in files.values():
        save_file({k: v / 2 for k, v in load_file(folder / name).items()}, tmp_path / name)
    models = [FluxModel(FluxConfig(type="flux", diffusers_path=str(folder), dtype=dtype, max_sequence_length=16,
                                   **paths))
              for paths in ({}, {k: str(folder / v) for k, v in files.items()}, {k: str(tmp_path / v) for k, v in files.items()})]
    pixels = torch.rand(2, 3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    encoded = []
    for model in models:
        model.check_encoder_files()
        model.load_text_encoders(torch.device("cpu"))
        model.load_vae(torch.device("cpu"))
        with torch.no_grad():
            encoded.append(model.encode_captions(["a photo of a cat", "a small wooden house in a snowy forest"])
                           + model.encode_pixels(pixels))
    # T5's feed-forward output stays float32 in float16, as transformers loads it.
    t5 = models[1].text_encoders[3]
    assert t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == (
        torch.float32 if dtype == "float16" else getattr(torch, dtype))
    for expected, got, halved in zip(*encoded):
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
        assert all(not torch.equal(halved[k], expected[k]) for k in got)
    assert models[1].text_cache_signature() != models[0].text_cache_signature()
    # A file of another part: one line naming the key, the file and what it should be.
    wrong = FluxModel(FluxConfig(type="flux", diffusers_path=str(folder), t5_path=str(folder / "clip_l_tiny.safetensors")))
    with pytest.raises(ValueError) as info:
        wrong.check_encoder_files()
    assert str(info.value).startswith(f"model.t5_path: {folder / 'clip_l_tiny.safetensors'} is not the T5-XXL text "
                                      f"encoder the config in diffusers_path describes: it holds none of its ")
    assert "t5xxl_fp16.safetensors" in str(info.value) and "\n" not in str(info.value)
