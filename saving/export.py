"""The trained weights as files: adapter files, or the whole transformer (diffusers shards and the
original release's single file), each written atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from config.training import AdapterConfig
from models.base import ModelRecipe
from models.keymaps.keymap import RenameKeymap
from models.pipeline_layers import is_adapter_weight, named_weights
from utils.atomic import replace_folder
from utils.dist import Distributed
from utils.faults import disk_full, disk_full_error, remove_quietly


# The peft LoKr and LoHa factor that carries the alpha / rank scale in the saved files.
LYCORIS_SCALED = frozenset({"lokr_w1", "lokr_w1_a", "hada_w1_a"})


def adapter_file_key(param_name: str) -> str:
    """A trained adapter parameter's key in the adapter files."""
    # "x.to_q.lora_A.default.weight" -> "x.to_q.lora_A.weight" (diffusers' LoRA file naming); a DoRA
    # magnitude is "x.to_q.lora_magnitude_vector", as peft saves it and diffusers loads it; LoKr
    # and LoHa weights "x.to_q.lokr_w1.default" -> "x.to_q.lokr_w1" (peft's state dict keys).
    name = param_name.removesuffix(".default").replace(".default.", ".")
    return name.removesuffix(".weight") if name.endswith(".lora_magnitude_vector.weight") else name


def lora_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """This process's materialised LoRA weights, keyed like diffusers' LoRA files (no prefix)."""
    return {adapter_file_key(n): p.detach().cpu() for n, p in transformer.named_parameters()
            if is_adapter_weight(n) and not p.is_meta}


def save_lora(recipe: ModelRecipe, lora: dict[str, torch.Tensor], adapter: AdapterConfig, out_dir: Path,
              dtype: torch.dtype) -> list[Path]:
    """Write the adapter in diffusers format plus the model's extra formats.

    The alpha/rank scale is multiplied into lora_B (LoKr: lokr_w1, LoHa: hada_w1_a, each a
    factor the update is linear in), so every loader, with or without an alpha field,
    applies the adapter exactly as trained. LoKr and LoHa have an original layout only where
    the key map renames modules without fusing any (LTX-Video, Wan): FLUX.1 and HunyuanVideo
    fuse q, k and v, which a Kronecker or Hadamard product cannot be split into (ComfyUI's FLUX.1
    key map reads the diffusers file, patching slices of fused modules).
    """
    scale = adapter.alpha / adapter.rank
    scaled = {k: (v.float() * scale if ".lora_B." in k or k.rpartition(".")[2] in LYCORIS_SCALED
                  else v.float()).to(dtype).contiguous()
              for k, v in sorted(lora.items())}
    out_dir.mkdir(parents=True, exist_ok=True)
    diffusers_file = out_dir / "pytorch_lora_weights.safetensors"
    save_file({f"transformer.{k}": v for k, v in scaled.items()}, diffusers_file,
              metadata={"format": "pt", "trainer_model_type": recipe.name})
    written = [diffusers_file]
    renames_only = recipe.keymap is not None and issubclass(recipe.keymap, RenameKeymap)
    if adapter.use_dora or (adapter.type != "lora" and not renames_only):
        # The original layout has no DoRA magnitudes, and LoKr / LoHa only where it fuses no
        # module (examples/flux.toml); ComfyUI reads FLUX.1's LoKr / LoHa in the diffusers file.
        return written
    for filename, tensors in recipe.extra_lora_formats(scaled).items():
        # kohya's alpha scalars stay float32: exact at any rank.
        save_file({k: (v.float() if k.endswith(".alpha") else v.to(dtype)).contiguous() for k, v in tensors.items()},
                  out_dir / filename, metadata={"format": "pt"})
        written.append(out_dir / filename)
    return written


def gather_adapter(model, transformer, place: Distributed) -> dict[str, torch.Tensor] | None:
    """All LoRA weights on rank 0 (each pipeline stage holds a slice); None elsewhere."""
    gathered = place.gather_object(lora_state_dict(transformer) if place.dp_rank == 0 else {})
    if gathered is None:
        return None
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged


def save_adapter(model, transformer, adapter, out_dir: Path, dtype: torch.dtype, place: Distributed,
                 ema=None) -> list[Path]:
    """Write the adapter files to `out_dir` atomically (a temporary folder renamed at the end);
    with `ema` (training/ema.EMA), the averaged adapter too, in the same formats, in `out_dir/ema/`."""
    lora = gather_adapter(model, transformer, place)
    averaged = None
    if ema is not None:
        with ema.applied():
            averaged = gather_adapter(model, transformer, place)
            # On CPU, .cpu() returns the parameters' own storage, which the block's end restores.
            averaged = None if averaged is None else {k: v.clone() for k, v in averaged.items()}
    if not place.is_main:
        return []
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        files = save_lora(model, lora, adapter, tmp, dtype)
        if averaged is not None:
            files += save_lora(model, averaged, adapter, tmp / "ema", dtype)
    except Exception as e:
        remove_quietly(tmp)
        if disk_full(e, out_dir.parent):
            raise disk_full_error(out_dir, "the adapter", "Earlier adapters and checkpoints are kept; "
                                  f"{out_dir.name} is {'unchanged' if out_dir.exists() else 'not written'}.") from e
        raise
    replace_folder(tmp, out_dir)
    return [out_dir / f.relative_to(tmp) for f in files]


# Largest diffusers weight shard of a full-model save; also bounds the host memory a save takes.
SHARD_BYTES = 4 * 2**30
ORIGINAL_LAYOUT_FILE = "transformer_original_layout.safetensors"


def stage_weights(transformer, layers) -> list[list[str]]:
    """The transformer weight names owned by each of `layers` (pipeline layers), found through
    their `module_names` as the weights are loaded, named as in the transformer (the diffusers
    keys), not as in the layer modules."""
    return [[n for n, _ in named_weights(transformer, layer.module_names)] for layer in layers]


def save_full_model(model, transformer, engine, out_dir: Path, dtype: torch.dtype, place: Distributed) -> list[Path]:
    """Write the whole transformer, in `dtype`, to `out_dir` atomically (temporary folder, then a
    rename): `transformer/` in the diffusers layout (config.json, safetensors shards and their
    index) and, when the model has one, the original release's single-file layout.

    Nothing is gathered through one process: data-parallel rank 0 of each pipeline stage writes
    its own stage's shards, a few GiB at a time (SHARD_BYTES), and the parts of the single file;
    rank 0 then writes the index and config and joins the parts on disk.
    """
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if place.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "transformer").mkdir(parents=True)
    place.barrier()
    writer = place.dp_rank == 0
    params = dict(transformer.named_parameters())
    chunks = []
    if writer:
        chunk, size = [], 0
        for names in stage_weights(transformer, engine.module.forward_funcs):
            nbytes = sum(params[n].numel() for n in names) * dtype.itemsize
            if chunk and size + nbytes > SHARD_BYTES:
                chunks.append(chunk)
                chunk, size = [], 0
            chunk += names
            size += nbytes
        if chunk:
            chunks.append(chunk)
    # Shards are numbered across stages (stage k's writer has a lower rank than stage k+1's).
    counts = place.all_gather_object(len(chunks))
    total, first = sum(counts), sum(counts[:place.rank])
    try:
        weight_map = _write_parts(model, params, chunks, tmp, dtype, first, total)
    except Exception as e:
        _save_failed(e, tmp, out_dir)
    maps = place.gather_object(weight_map)
    written = []
    if place.is_main:
        try:
            _finish_full_model(transformer, tmp, maps, total, params, dtype)
        except Exception as e:
            _save_failed(e, tmp, out_dir)
        replace_folder(tmp, out_dir)
        written = sorted(p for p in out_dir.rglob("*") if p.is_file())
    place.barrier()
    return written


def _write_parts(model, params, chunks, tmp: Path, dtype, first: int, total: int) -> dict[str, str]:
    """Write this stage's diffusers shards and original-layout parts; returns {weight: shard}."""
    weight_map = {}
    for j, names in enumerate(chunks):
        tensors = {n: params[n].detach().to("cpu", dtype).contiguous() for n in names}
        shard = f"diffusion_pytorch_model-{first + j + 1:05d}-of-{total:05d}.safetensors"
        save_file(tensors, tmp / "transformer" / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        original = model.original_layout(tensors)
        if original is not None:
            save_file({k: v.contiguous() for k, v in original.items()}, tmp / f"original-part-{first + j:05d}.safetensors",
                      metadata={"format": "pt"})
        del tensors, original
    return weight_map


def _finish_full_model(transformer, tmp: Path, maps: list[dict], total: int, params, dtype) -> None:
    """Rank 0: the config, the shard index (or the single shard's name), the joined single file."""
    folder = tmp / "transformer"
    transformer.save_config(folder)
    merged = {k: v for part in maps for k, v in part.items()}
    if total == 1:  # one shard: diffusers' name for an unsharded model
        (folder / "diffusion_pytorch_model-00001-of-00001.safetensors").rename(
            folder / "diffusion_pytorch_model.safetensors")
    else:
        size = sum(params[k].numel() for k in merged) * dtype.itemsize
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": size}, "weight_map": dict(sorted(merged.items()))}, indent=2))
    parts = sorted(tmp.glob("original-part-*.safetensors"))
    if parts:
        join_safetensors(parts, tmp / ORIGINAL_LAYOUT_FILE)
        for part in parts:
            part.unlink(missing_ok=True)  # a single part was renamed


def _save_failed(error: Exception, tmp: Path, out_dir: Path):
    """Remove the half-written save and raise: a clear DiskFullError when the disk is full (the
    launcher then stops the other ranks)."""
    remove_quietly(tmp)
    if disk_full(error, out_dir.parent):
        raise disk_full_error(out_dir, "the transformer", "Earlier saves and checkpoints are kept; "
                              f"{out_dir.name} is {'unchanged' if out_dir.exists() else 'not written'}.") from error
    raise error


def join_safetensors(parts: list[Path], out: Path) -> None:
    """Join safetensors files with distinct keys into one, copying their data on disk (memory
    use does not grow with the model). The format: an 8-byte little-endian header length, a
    JSON header (dtype, shape, data offsets of each tensor), then the data. A single part is
    renamed."""
    if len(parts) == 1:
        os.replace(parts[0], out)
        return
    headers, sizes, starts = [], [], []
    for part in parts:
        with open(part, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        headers.append(header)
        starts.append(8 + n)
        sizes.append(part.stat().st_size - 8 - n)
    joined, offset = {"__metadata__": {"format": "pt"}}, 0
    for header, size in zip(headers, sizes):
        for key, info in header.items():
            if key in joined:
                raise ValueError(f"join_safetensors: {key} is in more than one part")
            begin, end = info["data_offsets"]
            joined[key] = {**info, "data_offsets": [begin + offset, end + offset]}
        offset += size
    text = json.dumps(joined, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as safetensors writes it
    with open(out, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for part, start in zip(parts, starts):
            with open(part, "rb") as src:
                src.seek(start)
                shutil.copyfileobj(src, f, 64 * 2**20)


