"""tools/make_tiny_models.py: the tiny FLUX folder loads, runs, and its original-layout file round-trips."""

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.keymaps.flux import FluxKeymap

TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_tiny_models.py"


def _load_tool():
    # tools/ is not a package: load the script as a module.
    spec = importlib.util.spec_from_file_location("make_tiny_models", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    return _load_tool()


@pytest.fixture(scope="module")
def flux_dir(tool, tmp_path_factory):
    return tool.make_tiny_flux(tmp_path_factory.mktemp("tiny"))


def test_layout(flux_dir):
    assert flux_dir.name == "flux"
    for sub in ["transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"]:
        assert (flux_dir / sub).is_dir(), sub
    assert (flux_dir / "model_index.json").is_file()
    assert (flux_dir / "flux1-tiny-original.safetensors").is_file()


def test_pipeline_loads_and_runs(flux_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_dir)
    assert pipe.transformer.config.num_layers == 2 and pipe.vae.config.latent_channels == 16
    # Known words stay whole: the tokenizers really were built from the corpus.
    assert pipe.tokenizer.tokenize("a photo of a cat") == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    assert pipe.tokenizer_2.tokenize("a photo of a cat") == ["\u2581a", "\u2581photo", "\u2581of", "\u2581a", "\u2581cat"]
    out = pipe("a photo of a cat", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
               generator=torch.Generator().manual_seed(0))
    image = out.images[0]
    assert image.size == (64, 64)


def test_original_file_round_trips(flux_dir):
    saved = load_file(str(flux_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    back = FluxKeymap.original_to_diffusers(load_file(str(flux_dir / "flux1-tiny-original.safetensors")))
    assert set(back) == set(saved)
    for k in saved:
        assert torch.equal(back[k], saved[k]), k


def test_deterministic(tool, flux_dir, tmp_path):
    again = tool.make_tiny_flux(tmp_path)
    files = sorted(p.relative_to(flux_dir) for p in flux_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (flux_dir / rel).read_bytes() == (again / rel).read_bytes(), rel
