"""diffusion-pipe's config names, for users who bring its TOML files.

A key or value that means the same here under another name is translated before the config is
built, and the translation is a note printed at start. Every other diffusion-pipe key or value
gets one line naming what to write here instead; the config loader reports those together with
every other unknown key of the file (config/train_config.py).

Sections: "" is the top level of the training TOML, "model", "adapter", "optimizer" and
"monitoring" its tables, "dataset" the dataset TOML (its top level and every [[directory]]).
"""

from __future__ import annotations

import re
from typing import Any, Optional

# Same meaning, another name: (section, diffusion-pipe's key) -> (our key, value map or None).
RENAMED: dict[tuple[str, str], tuple[str, Optional[dict]]] = {
    ("", "eval_before_first_step"): ("eval_at_start", None),
    # Its flux_shift is the resolution-dependent time shift of FLUX.1's sampler (mu 0.5 at 256
    # image tokens to 1.15 at 4096), as ours.
    ("model", "flux_shift"): ("resolution_dependent_shift", None),
    # skip_empty_caption = true skips a media file without a caption file, false trains it uncaptioned.
    ("dataset", "skip_empty_caption"): ("missing_caption", {True: "skip", False: "empty"}),
}

# Same meaning, another value: (section, key) -> {its value: ours}.
VALUE_ALIASES: dict[tuple[str, str], dict[Any, Any]] = {
    # Both store the frozen block weights as float8_e4m3fn (ours with a scale per output row).
    ("model", "transformer_dtype"): {"float8_e4m3fn": "float8"},
    # optimi's AdamW is AdamW; it keeps small updates of bfloat16 weights with Kahan summation,
    # which stochastic rounding does here (switched on for bfloat16 weights, see config/train_config.py).
    ("optimizer", "type"): {"adamw_optimi": "adamw", "AdamW": "adamw", "AdamW8bit": "adamw8bit",
                            "Adafactor": "adafactor"},
}

_REMOVE = "remove it"
_NO_CAPTION_EDITS = "captions are used as written here: edit the caption files instead, and remove it"
_DATA_IN_DIFFUSERS = ("here the model is a diffusers folder: set diffusers_path to one (e.g. a download of "
                      "{repo}), and transformer_path to a single-file transformer if you have one")

# Keys with no equivalent of the same meaning: (section, key) -> what to write here instead.
REPLACEMENTS: dict[tuple[str, str], str] = {
    ("", "eval_micro_batch_size_per_gpu"): "eval runs at micro_batch_size_per_gpu here, and pads a bucket's last "
                                           "batch with items of weight 0, so no eval item is dropped: " + _REMOVE,
    ("", "image_eval_micro_batch_size_per_gpu"): "eval runs at micro_batch_size_per_gpu here: " + _REMOVE,
    ("", "eval_gradient_accumulation_steps"): "eval does not accumulate here: " + _REMOVE,
    ("", "image_micro_batch_size_per_gpu"): "one micro_batch_size_per_gpu for every bucket here: " + _REMOVE,
    ("", "eval_every_n_examples"): "write eval_every_n_steps or eval_every_n_epochs",
    ("", "save_every_n_examples"): "write save_every_n_steps or save_every_n_epochs",
    ("", "force_constant_lr"): "set optimizer.lr with lr_scheduler = 'constant' (both may change when resuming)",
    ("", "pseudo_huber_c"): "write [model] loss_type = 'pseudo_huber' with huber_delta (examples/flux.toml gives "
                            "its formula), and remove it",
    ("", "disable_block_swap_for_eval"): "eval swaps the same blocks as training here: " + _REMOVE,
    ("", "reentrant_activation_checkpointing"): "activation_checkpointing chooses the method here: " + _REMOVE,
    ("", "map_num_proc"): "the cache is filled by the GPUs' processes here (caching_batch_size, caching_workers): "
                          + _REMOVE,
    ("", "x_axis_examples"): "TensorBoard's x-axis is the step here: " + _REMOVE,
    ("", "upload_hf_from_epoch"): "nothing is uploaded here; upload <run>/adapters/ yourself, and " + _REMOVE,
    ("", "huggingface_repo"): "nothing is uploaded here; upload <run>/adapters/ yourself, and " + _REMOVE,
    ("", "video_clip_mode"): "is a dataset key here: write it in the dataset TOML (its top level, or a "
                             "[[directory]]), and remove it here",
    ("", "partition_split"): "no manual split here: partition_method = 'type:BlockLayer' gives every stage the "
                             "same number of transformer blocks; " + _REMOVE,
    # The release's ckpts/ folder: its files are read one by one here.
    ("model", "ckpt_path"): "name its files: transformer_path = '<ckpt_path>/hunyuan-video-t2v-720p/transformers/"
                            "mp_rank_00_model_states.pt', vae_path = '<ckpt_path>/hunyuan-video-t2v-720p/vae/"
                            "pytorch_model.pt', llm_path = '<ckpt_path>/text_encoder', clip_path = "
                            "'<ckpt_path>/text_encoder_2', and diffusers_path = a diffusers folder for the "
                            "configs and tokenizers (e.g. hunyuanvideo-community/HunyuanVideo without its "
                            "*.safetensors)",
    ("model", "single_file_path"): _DATA_IN_DIFFUSERS.format(repo="Lightricks/LTX-Video"),
    ("model", "bypass_guidance_embedding"): "the guidance embedding is always used here (see guidance): " + _REMOVE,
    ("model", "first_frame_conditioning_p"): "image-to-video conditioning is not trained here: " + _REMOVE,
    ("adapter", "fuse_adapters"): "not available here: merge those LoRAs into the base weights first, and " + _REMOVE,
    ("dataset", "ar_buckets"): "write min_ar, max_ar and num_ar_buckets (evenly spaced in log space) instead",
    ("dataset", "size_buckets"): "write resolutions (an area each) with min_ar, max_ar and num_ar_buckets instead",
    ("dataset", "cache_shuffle_num"): "write caption_shuffle_variants (shuffled captions cached per caption) and "
                                      "keep_tokens (leading tags kept in place)",
    ("dataset", "cache_shuffle_delimiter"): "captions are shuffled at commas here (caption_shuffle_variants): " + _REMOVE,
    ("dataset", "shuffle_tags"): "write caption_shuffle_variants (shuffled captions cached per caption) and "
                                 "keep_tokens",
    ("dataset", "caption_prefix"): _NO_CAPTION_EDITS,
    ("dataset", "mask_path"): "write mask_path in each [[directory]] table (that folder's masks)",
    ("dataset", "default_mask_file"): "every media file needs its own mask in mask_path (a missing one is "
                                      "listed like a missing caption): " + _REMOVE,
    ("dataset", "control_path"): "edit (control image) training is not available here: " + _REMOVE,
    ("dataset", "subsample_ratio"): "every item trains each epoch here: " + _REMOVE,
}

_OUR_OPTIMIZERS = "here: 'adamw', 'adamw8bit' or 'adafactor'"
# Options of its optimizers (optimi's, AdamW8bitKahan, Prodigy, automagic, ...) that ours do not take.
_OPTIMIZER_OPTIONS = {"stabilize", "kahan_sum", "gradient_release", "d_coef", "use_bias_correction",
                      "safeguard_warmup", "decouple", "growth_rate", "decouple_lr", "max_lr", "optimizer_accelerated",
                      "foreach", "fused", "lr_bump", "min_lr"}


def _foreign_value(section: str, key: str, value) -> Optional[str]:
    """What to write instead of a diffusion-pipe value of one of our keys, or None."""
    if (section, key) == ("", "micro_batch_size_per_gpu") and isinstance(value, list):
        return ("per-resolution micro-batch sizes are not available here: write one integer for every bucket "
                "(e.g. the one you gave the largest resolution)")
    if (section, key) == ("", "activation_checkpointing") and value == "unsloth":
        return ("'unsloth' (offloading checkpoints to CPU memory) is not available here: true recomputes every "
                "layer (the least GPU memory), and blocks_to_swap keeps frozen block weights in CPU memory")
    if (section, key) == ("", "partition_method") and value == "manual":
        return ("'manual' (with partition_split) is not available here: 'type:BlockLayer' gives every stage the "
                "same number of transformer blocks, 'uniform' the same number of layers")
    if (section, key) == ("model", "transformer_dtype") and isinstance(value, str) and value.startswith("float8_"):
        return "only float8_e4m3fn storage here: write 'float8'"
    if (section, key) == ("optimizer", "type") and isinstance(value, str):
        lowered = value.lower()
        if lowered == "adamw8bitkahan":
            return "8-bit AdamW is 'adamw8bit' here (its Kahan summation: stochastic_rounding = true)"
        if lowered not in ("adamw", "adamw8bit", "adafactor"):
            return _OUR_OPTIMIZERS
    return None


def _section_of(where: str, dataset_file: bool) -> tuple[str, str]:
    """(section, key) of a dotted key such as 'optimizer.stabilize' or 'directory[0].mask_path'."""
    if dataset_file:
        return "dataset", where.rsplit(".", 1)[-1]
    parts = re.sub(r"\[\d+\]", "", where).split(".")
    return (parts[0] if len(parts) > 1 else ""), parts[-1]


def replacement_for_key(where: str, dataset_file: bool = False) -> Optional[str]:
    """For an unknown key (dotted), diffusion-pipe's meaning of it as 'what to write here', or None."""
    section, key = _section_of(where, dataset_file)
    if section == "optimizer" and key in _OPTIMIZER_OPTIONS:
        return f"not an option of the optimizers here ({_OUR_OPTIMIZERS[6:]}): " + _REMOVE
    return REPLACEMENTS.get((section, key))


def _translate_table(table: dict, section: str, prefix: str, notes: list[str], problems: list[tuple[str, str]]):
    """`table` with diffusion-pipe's names and values translated, in place; notes and problems added."""
    for (sec, old), (new, values) in RENAMED.items():
        if sec != section or old not in table:
            continue
        where_old, where_new = (f"{prefix}{old}", f"{prefix}{new}")
        if new in table:
            problems.append((where_old, f"is diffusion-pipe's name for '{where_new}', which is also set: keep one"))
            del table[old]
            continue
        value = table.pop(old)
        if values is not None and value in values:
            value = values[value]
        table[new] = value
        notes.append(f"'{where_old}' is diffusion-pipe's name: read as {where_new} = {_toml(value)}")
    for key, value in list(table.items()):
        aliases = VALUE_ALIASES.get((section, key), {})
        if isinstance(value, str) and value in aliases:
            table[key] = aliases[value]
            if aliases[value] != value.lower():
                notes.append(f"'{prefix}{key}' = {_toml(value)} is diffusion-pipe's value: read as {_toml(aliases[value])}")
            continue
        message = _foreign_value(section, key, value)
        if message is not None:
            problems.append((f"{prefix}{key}", f"= {_toml(value)} is diffusion-pipe's; {message}"))


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"'{value}'" if isinstance(value, str) else repr(value)


def translate_train(raw: dict) -> tuple[list[str], list[tuple[str, str]]]:
    """Translate a training TOML's diffusion-pipe names in place: (notes, problems as (key, message))."""
    notes, problems = [], []
    _translate_table(raw, "", "", notes, problems)
    for section in ("model", "adapter", "optimizer"):
        if isinstance(raw.get(section), dict):
            _translate_table(raw[section], section, f"{section}.", notes, problems)
    return notes, problems


def translate_dataset(raw: dict) -> tuple[list[str], list[tuple[str, str]]]:
    """Translate a dataset TOML's diffusion-pipe names in place: (notes, problems as (key, message))."""
    notes, problems = [], []
    _translate_table(raw, "dataset", "", notes, problems)
    directories = raw.get("directory")
    if isinstance(directories, list):
        for i, d in enumerate(directories):
            if isinstance(d, dict):
                _translate_table(d, "dataset", f"directory[{i}].", notes, problems)
    return notes, problems
