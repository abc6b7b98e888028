"""Model inputs that are not what the config says: a folder of another model type, weights with
missing, extra or reshaped keys, a LoRA of another model or rank for init_from_existing. Each is
one line naming the config file and key, what was expected and what was found, before anything
is cached; the files themselves are never touched."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from config.training import AdapterConfig
from conftest import launch, write_configs
from models.flux import FluxConfig, FluxModel
from saving.export import save_lora
from training.lora import add_lora
from training.preflight import check_inputs
from utils.errors import ConfigError

CONFIG = Path("/configs/train.toml")  # only named in the messages


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def flux_copy(tmp_path, tiny_models) -> Path:
    """A copy of the tiny FLUX model that a test may damage."""
    return Path(shutil.copytree(tiny_models / "flux", tmp_path / "flux"))


def check(folder: Path, adapter: AdapterConfig | None = None, transformer_path: Path | None = None) -> str:
    model = FluxModel(FluxConfig(type="flux", diffusers_path=str(folder), dtype="float32",
                                 transformer_path=str(transformer_path) if transformer_path else None))
    before = folder_digest(folder) if folder.is_dir() else None
    with pytest.raises(ConfigError) as info:
        check_inputs(model, CONFIG, adapter)
    if before is not None:
        assert folder_digest(folder) == before  # read, never written
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{CONFIG}: ")
    return message


def test_the_tiny_model_and_a_matching_lora_pass(tiny_models, tmp_path):
    model = FluxModel(FluxConfig(type="flux", diffusers_path=str(tiny_models / "flux"), dtype="float32"))
    adapter = AdapterConfig(rank=4, alpha=4.0)
    transformer = model.build_empty_transformer()
    add_lora(model, transformer, adapter)
    lora = {n.replace(".default.", "."): torch.zeros(p.shape) for n, p in transformer.named_parameters() if "lora_" in n}
    save_lora(model, lora, adapter, tmp_path / "lora", torch.float32)
    check_inputs(model, CONFIG, AdapterConfig(rank=4, alpha=4.0, init_from_existing=str(tmp_path / "lora")))


def test_a_folder_of_another_model_type(flux_copy):
    config = flux_copy / "transformer" / "config.json"
    values = json.loads(config.read_text())
    values["_class_name"] = "LTXVideoTransformer3DModel"
    config.write_text(json.dumps(values))
    message = check(flux_copy)
    assert message == (f"{CONFIG}: model.diffusers_path: {flux_copy / 'transformer'} holds a "
                       f"LTXVideoTransformer3DModel, but model.type = 'flux' expects a FluxTransformer2DModel")


def test_a_single_file_given_as_the_diffusers_folder(flux_copy):
    single = flux_copy / "flux1-tiny-original.safetensors"
    message = check(single)
    assert message == (f"{CONFIG}: model.diffusers_path: {single} is a file; expected a diffusers folder of a flux "
                       f"model (a single-file transformer goes in model.transformer_path)")


def test_a_folder_that_is_no_model(tmp_path):
    (tmp_path / "empty").mkdir()
    message = check(tmp_path / "empty")
    assert message == (f"{CONFIG}: model.diffusers_path: {tmp_path / 'empty'} has no transformer/config.json; "
                       f"expected a diffusers folder of a flux model")


def _rewrite_weights(folder: Path, edit) -> None:
    (file,) = (folder / "transformer").glob("*.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def test_weights_with_missing_and_extra_keys(flux_copy):
    _rewrite_weights(flux_copy, lambda t: (t.pop("proj_out.weight"), t.__setitem__("lora_leftover.weight",
                                                                                    torch.zeros(2))))
    message = check(flux_copy)
    expected_count = len(load_file(next((flux_copy / "transformer").glob("*.safetensors"))))
    assert message.startswith(f"{CONFIG}: model.diffusers_path: the weights in {flux_copy / 'transformer'} are not "
                              f"those of the FluxTransformer2DModel its config.json describes: expected "
                              f"{expected_count} weights, found {expected_count}: ")
    assert message.endswith("1 missing ('proj_out.weight'); 1 unexpected ('lora_leftover.weight')")


def test_weights_of_another_shape(flux_copy):
    def widen(tensors):
        tensors["proj_out.bias"] = torch.zeros(tensors["proj_out.bias"].shape[0] + 4)
    _rewrite_weights(flux_copy, widen)
    message = check(flux_copy)
    bias = load_file(next((flux_copy / "transformer").glob("*.safetensors")))["proj_out.bias"].shape[0]
    assert message.endswith(f"1 of another shape ('proj_out.bias': expected ({bias - 4}), found ({bias}))")


def test_weights_that_are_no_safetensors(flux_copy):
    (file,) = (flux_copy / "transformer").glob("*.safetensors")
    file.write_bytes(b"this is not a weights file")
    message = check(flux_copy)
    assert message.startswith(f"{CONFIG}: model weights: {file} is not a readable .safetensors file (")


def test_transformer_path_that_is_no_safetensors(flux_copy, tmp_path):
    bogus = tmp_path / "flux1-dev.safetensors"
    bogus.write_text("<html>Access denied</html>")  # what a failed download often leaves
    message = check(flux_copy, transformer_path=bogus)
    assert message.startswith(f"{CONFIG}: model.transformer_path: {bogus} is not a readable .safetensors file (")


def _lora(tmp_path, tiny_models, rank=4, metadata=None, rename=None) -> Path:
    model = FluxModel(FluxConfig(type="flux", diffusers_path=str(tiny_models / "flux"), dtype="float32"))
    transformer = model.build_empty_transformer()
    add_lora(model, transformer, AdapterConfig(rank=rank, alpha=float(rank)))
    tensors = {"transformer." + n.replace(".default.", "."): torch.zeros(p.shape)
               for n, p in transformer.named_parameters() if "lora_" in n}
    if rename:
        tensors = {rename(k): v for k, v in tensors.items()}
    path = tmp_path / f"lora_{rank}_{len(list(tmp_path.glob('lora_*')))}.safetensors"
    save_file(tensors, path, metadata={"format": "pt", **(metadata or {})})
    return path


def test_a_lora_saved_for_another_model_type(tmp_path, tiny_models):
    lora = _lora(tmp_path, tiny_models, metadata={"trainer_model_type": "ltx-video"})
    message = check(tiny_models / "flux", AdapterConfig(rank=4, alpha=4.0, init_from_existing=str(lora)))
    assert message == (f"{CONFIG}: adapter.init_from_existing: {lora} is a LoRA for model type 'ltx-video' (its "
                       f"metadata says so), but model.type = 'flux'")


def test_a_lora_of_another_architecture(tmp_path, tiny_models):
    # Another model's LoRA has other module names (no metadata to tell: made by another trainer).
    lora = _lora(tmp_path, tiny_models, rename=lambda k: k.replace("transformer_blocks", "blocks"))
    message = check(tiny_models / "flux", AdapterConfig(rank=4, alpha=4.0, init_from_existing=str(lora)))
    assert message.startswith(f"{CONFIG}: adapter.init_from_existing: {lora} has LoRAs on ")
    assert message.endswith("modules this transformer does not have (e.g. 'blocks.0.attn.add_k_proj'): a LoRA of "
                            "another model?")


def test_a_lora_of_another_rank(tmp_path, tiny_models):
    lora = _lora(tmp_path, tiny_models, rank=8)
    message = check(tiny_models / "flux", AdapterConfig(rank=4, alpha=4.0, init_from_existing=str(lora)))
    assert message.startswith(f"{CONFIG}: adapter.init_from_existing: {lora} has rank 8 LoRAs")
    assert message.endswith(", adapter.rank = 4: set adapter.rank = 8")


@pytest.mark.slow
def test_launch_with_a_folder_of_another_model_stops_before_caching(tmp_path, flux_copy, image_dataset):
    config = flux_copy / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "HunyuanVideoTransformer3DModel"}))
    cfg = write_configs(tmp_path / "run", flux_copy, image_dataset)
    result = launch(cfg)
    assert result.returncode == 2, result.output[-3000:]
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {cfg}: model.diffusers_path: {flux_copy / 'transformer'} holds a "
                      f"HunyuanVideoTransformer3DModel, but model.type = 'flux' expects a FluxTransformer2DModel"]
    assert not (image_dataset / "cache").exists() and not (cfg.parent / "runs").exists()
