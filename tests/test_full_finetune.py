"""Full fine-tuning (no [adapter] table), launched as users launch it.

Module fixtures, each one launch (~15 s on CPU):

    full        1 stage, float32: eval at 0, 5, 10; the transformer saved at step 5 and at the end
    two_stages  the same on 2 processes with pipeline_stages = 2 (slow)
    zero_hybrid the same on 4 processes, 2 stages x 2 replicas with zero_stage = 1 (slow)
    bf16_sr     bfloat16 weights with stochastic rounding, lr 1e-5: updates far below bfloat16's
                resolution (slow); bf16_plain: the same with plain rounding (slow)
    fp32_master the same with float32 master weights, the reference SR should track (slow)

The tests read what the launches left: losses, evals and the saved files, whose eval losses are
recomputed in process through diffusers' own forward (conftest.eval_loss_through_diffusers).
The last tests call save_full_model in process: many small shards, and a full disk.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (Launch, assert_killed_rank_ended_the_job, configure_held_out, eval_loss_through_diffusers, evals,
                      held_out_work, launch, launch_and_kill_rank, ok, run_folder, write_configs)
from memory.estimate import ParamInfo, zero_shard_bytes

from utils.dist import Distributed

EVAL = "held_out"
# 2 micro-batches of 1 sample a step: the same samples as 2 replicas at accumulation 1.
FULL = dict(adapter=None, max_steps=10, eval_at_start=True, eval_every_n_steps=5, save_every_n_steps=5,
            micro_batch_size_per_gpu=1, gradient_accumulation_steps=2, optimizer={"lr": 1e-3})
# Updates of about lr = 1e-5 per step: under half a bfloat16 step for nearly every weight.
TINY_UPDATES = dict(adapter=None, max_steps=40, eval_at_start=True, eval_every_n_steps=20,
                    checkpoint_every_n_steps=20, steps_per_print=10, model={"dtype": "bfloat16"},
                    optimizer={"lr": 1e-5, "weight_decay": 0.0})


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_models):
    return held_out_work(tmp_path_factory.mktemp("full_finetune"), tiny_models)


def configure(work, name: str, base: dict, **overrides) -> Path:
    return configure_held_out(work, name, base, EVAL, **overrides)


@pytest.fixture(scope="module")
def full(work):
    return ok(launch(configure(work, "full", FULL)))


@pytest.fixture(scope="module")
def two_stages(work, full):
    return ok(launch(configure(work, "two_stages", FULL, pipeline_stages=2), num_gpus=2))


@pytest.fixture(scope="module")
def zero_hybrid(work, two_stages):
    return ok(launch(configure(work, "zero_hybrid", FULL, pipeline_stages=2, gradient_accumulation_steps=1,
                               zero_stage=1, checkpoint_every_n_steps=5), num_gpus=4))


@pytest.fixture(scope="module")
def bf16_sr(work):
    return ok(launch(configure(work, "bf16_sr", TINY_UPDATES, optimizer={"stochastic_rounding": True})))


@pytest.fixture(scope="module")
def bf16_plain(work):
    return ok(launch(configure(work, "bf16_plain", TINY_UPDATES)))


@pytest.fixture(scope="module")
def fp32_master(work):
    return ok(launch(configure(work, "fp32_master", TINY_UPDATES, full_finetune_dtype="float32")))


def saved(result: Launch, name: str = "final") -> Path:
    return run_folder(result) / "models" / name


def load_saved(folder: Path):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.float32)


def from_original_layout(folder: Path, work):
    """The single original-layout file, converted back to diffusers naming and loaded strictly."""
    from diffusers import FluxTransformer2DModel

    from models.keymaps.flux import FluxKeymap

    config = FluxTransformer2DModel.load_config(work["model"] / "transformer")
    transformer = FluxTransformer2DModel.from_config(config)
    original = load_file(folder / "transformer_original_layout.safetensors")
    transformer.load_state_dict(FluxKeymap.original_to_diffusers(original, config), strict=True)
    return transformer, original


# ------------------------------------------------------------------------------------ one stage


@pytest.mark.slow
def test_full_finetune_trains_and_saves_the_transformer(full):
    folder = run_folder(full)
    history = evals(folder, EVAL)
    assert sorted(history) == [0, 5, 10]
    assert history[10] < history[5] < history[0]
    assert history[10] < 0.95 * history[0]
    assert len(full.losses()) == 10
    # the start of the run: the memory estimate of the whole transformer in training
    assert "memory estimate per GPU (full fine-tuning, optimizer adamw" in full.output
    assert "stage 0: weights float32" in full.output
    # saves on schedule and at the end; no adapters, no temporary folders left
    assert sorted(p.name for p in (folder / "models").iterdir()) == ["final", "step00000005"]
    assert not (folder / "adapters").exists()
    for name in ("final", "step00000005"):
        files = sorted(str(p.relative_to(folder / "models" / name)) for p in (folder / "models" / name).rglob("*")
                       if p.is_file())
        assert files == ["transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                         "transformer_original_layout.safetensors"]


@pytest.mark.slow
def test_saved_diffusers_folder_reproduces_the_final_eval(full, work):
    from diffusers import FluxTransformer2DModel

    history = evals(full, EVAL)
    trained = eval_loss_through_diffusers(full.config, load_saved(saved(full)), items=4)
    assert trained == pytest.approx(history[10], rel=1e-5)
    at_five = eval_loss_through_diffusers(full.config, load_saved(saved(full, "step00000005")), items=4)
    assert at_five == pytest.approx(history[5], rel=1e-5)
    base = FluxTransformer2DModel.from_pretrained(work["model"] / "transformer")
    untrained = eval_loss_through_diffusers(full.config, base, items=4)
    assert untrained == pytest.approx(history[0], rel=1e-5)
    # training moved the loss far beyond the tolerance: a save of the untrained weights would fail
    assert abs(untrained - trained) > 100 * 1e-5 * trained


@pytest.mark.slow
def test_original_layout_file_is_the_same_model(full, work):
    from diffusers import FluxTransformer2DModel

    from models.keymaps.flux import FluxKeymap

    folder = saved(full)
    diffusers_weights = load_saved(folder).state_dict()
    transformer, original = from_original_layout(folder, work)
    # the release layout: fused qkv, unprefixed keys
    assert "double_blocks.0.img_attn.qkv.weight" in original and "single_blocks.1.linear1.weight" in original
    for key, value in transformer.state_dict().items():
        assert torch.equal(value, diffusers_weights[key]), key
    in_process = eval_loss_through_diffusers(full.config, transformer, items=4)
    assert in_process == pytest.approx(evals(full, EVAL)[10], rel=1e-5)
    # and it reads back as model.transformer_path does
    config = FluxTransformer2DModel.load_config(work["model"] / "transformer")
    keys = sorted(diffusers_weights)
    read = FluxKeymap.load_diffusers_keys_from_original(folder / "transformer_original_layout.safetensors", keys, config)
    assert all(torch.equal(read[k], diffusers_weights[k]) for k in keys)


# ------------------------------------------------------------------------------------ two stages


@pytest.mark.slow
def test_two_stages_train_and_save_the_same_model(full, two_stages):
    one, two = run_folder(full), run_folder(two_stages)
    assert "stage 1: layers" in two_stages.output
    assert two_stages.losses() == pytest.approx(full.losses(), rel=1e-5)
    for step, value in evals(one, EVAL).items():
        assert evals(two, EVAL)[step] == pytest.approx(value, rel=1e-5)
    folder = saved(two_stages)
    # each stage wrote its own shard; rank 0 the index naming both
    index = json.loads((folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["diffusion_pytorch_model-00001-of-00002.safetensors",
                      "diffusion_pytorch_model-00002-of-00002.safetensors"]
    first = load_file(folder / "transformer" / shards[0])
    assert "x_embedder.weight" in first and "proj_out.weight" not in first
    reference = load_saved(saved(full)).state_dict()
    loaded = load_saved(folder).state_dict()
    assert loaded.keys() == reference.keys() == set(index["weight_map"])
    for key in reference:
        torch.testing.assert_close(loaded[key], reference[key], atol=1e-5, rtol=1e-4, msg=key)
    # the single original-layout file, joined from the stages' parts, holds the same
    joined = load_file(folder / "transformer_original_layout.safetensors")
    single = load_file(saved(full) / "transformer_original_layout.safetensors")
    assert joined.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(joined[key], single[key], atol=1e-5, rtol=1e-4, msg=key)


# ------------------------------------------------------------------------------------ ZeRO-1


def optimizer_state_mib(output: str) -> list[float]:
    """Each stage's optimizer state as the memory estimate at start printed it."""
    return [float(m) for m in re.findall(r"optimizer state ([\d.]+) MiB", output)]


@pytest.mark.slow
def test_zero1_over_two_replicas_trains_the_same_model(two_stages, zero_hybrid):
    # The same math as without ZeRO: AdamW is elementwise, so stepping each replica's flat slice
    # and gathering the slices changes nothing; float32 weights, so the master copy is exact. What
    # may differ is the order of the float32 sums of the gradient reduction: the same 1e-5
    # tolerance as between layouts.
    assert zero_hybrid.losses() == pytest.approx(two_stages.losses(), rel=1e-5)
    assert evals(zero_hybrid, EVAL) == pytest.approx(evals(two_stages, EVAL), rel=1e-5)
    folder, reference = saved(zero_hybrid) / "transformer", saved(two_stages) / "transformer"
    shards = sorted(p.name for p in reference.glob("*-of-00002.safetensors"))
    for shard in shards:
        ours, theirs = load_file(folder / shard), load_file(reference / shard)
        assert ours.keys() == theirs.keys()
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=1e-4, msg=key)
    # Each replica of each stage checkpointed half its stage's optimizer state: float32 master
    # weights and AdamW's two moments of its slice (DeepSpeed pads a slice to an even length).
    # The memory estimate counts exactly that, up to the padding.
    checkpoint = run_folder(zero_hybrid) / "checkpoints" / "step00000010"
    for stage, shard in enumerate(shards):
        weights = load_file(reference / shard).values()
        estimated, _ = zero_shard_bytes([ParamInfo(tuple(t.shape), t.dtype, True) for t in weights], 2)
        stage_params = sum(t.numel() for t in weights)
        for replica in range(2):
            state = torch.load(checkpoint / f"zero_pp_rank_{replica}_mp_rank_{stage:02d}_optim_states.pt",
                               weights_only=False)["optimizer_state_dict"]
            (master,) = state["single_partition_of_fp32_groups"]
            moments = state["base_optimizer_state"]["state"][0]
            kept = [master, moments["exp_avg"], moments["exp_avg_sq"]]
            assert all(t.dtype == torch.float32 and t.numel() == master.numel() for t in kept)
            assert stage_params / 2 <= master.numel() <= stage_params / 2 + 2
            assert abs(sum(t.nbytes for t in kept) - estimated) <= 3 * 4 * 2
    # and the estimate printed at start: 12 bytes per weight of half the stage, against 8 per
    # weight of the whole stage (printed to 0.1 MiB)
    assert "ZeRO-1 over 2 replicas" in zero_hybrid.output
    for sharded, whole in zip(optimizer_state_mib(zero_hybrid.output), optimizer_state_mib(two_stages.output)):
        assert sharded == pytest.approx(whole * 12 / 2 / 8, abs=0.06)


@pytest.mark.slow
def test_a_killed_rank_of_four_ends_the_job_and_the_zero1_run_resumes_exactly(work, zero_hybrid):
    # The zero_hybrid run again, held while it writes its step-10 checkpoint (step 5's is
    # complete); one of its 4 processes is killed there. The job ends, and resumed from the
    # last complete checkpoint it finishes exactly as the run that was never killed: every
    # replica's slice of master weights and moments comes back.
    config = configure(work, "zero_hybrid_killed", FULL, pipeline_stages=2, gradient_accumulation_steps=1,
                       zero_stage=1, checkpoint_every_n_steps=5)
    runs = config.parent / "runs"
    saving = lambda: any(runs.glob("*/checkpoints/step00000010/trainer_state.json"))  # noqa: E731
    killed = launch_and_kill_rank(config, 4, 3, ready=saving, env={"TRAINER_TEST_PAUSE_AT": "checkpoint10:120"})
    # sooner than the 30 s DeepSpeed's launcher grants each survivor: they leave at once
    assert_killed_rank_ended_the_job(killed, 3, within=25)
    assert "rank 0: stopping at once: only 3 of this machine's 4 ranks are still running (local rank 3 ended)" \
        in killed.output
    folder = next(runs.iterdir())
    assert (folder / "checkpoints" / "latest").read_text() == "step00000005"
    result = ok(launch(config, "--resume_from_checkpoint", num_gpus=4))
    assert "starting at step 5" in result.output
    assert result.losses(folder) == zero_hybrid.losses()
    assert evals(folder, EVAL) == evals(zero_hybrid, EVAL)
    original = saved(zero_hybrid) / "transformer"
    for shard in original.glob("*.safetensors"):
        a, b = load_file(folder / "models" / "final" / "transformer" / shard.name), load_file(shard)
        assert all(torch.equal(a[k], b[k]) for k in b)


# ------------------------------------------------------------------------------------ bfloat16 weights


@pytest.mark.slow
def test_stochastic_rounding_trains_where_plain_bfloat16_stalls(bf16_sr, bf16_plain, fp32_master):
    sr, plain, master = (evals(r, EVAL) for r in (bf16_sr, bf16_plain, fp32_master))
    assert sr[0] == plain[0] == master[0]
    drop = {name: h[0] - h[40] for name, h in (("sr", sr), ("plain", plain), ("master", master))}
    # float32 master weights: the updates add up (about 1.5% of the loss in 40 steps) ...
    assert drop["master"] > 0.01 * master[0]
    # ... with stochastic rounding bfloat16 weights follow (the rounding is unbiased) ...
    assert drop["sr"] == pytest.approx(drop["master"], rel=0.3)
    assert sr[40] < sr[20] < sr[0]
    # ... and with plain rounding nearly every update is lost.
    assert drop["plain"] < 0.1 * drop["sr"]
    assert "WARNING: full fine-tuning bfloat16 weights with plain rounding" in bf16_plain.output
    assert "WARNING: full fine-tuning bfloat16" not in bf16_sr.output
    # the saved weights are bfloat16 (save_dtype float32 holds them exactly)
    weights = load_file(saved(bf16_sr) / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, v.to(torch.bfloat16).float()) for v in weights.values())


@pytest.mark.slow
def test_resume_with_stochastic_rounding_reproduces_the_run(work, bf16_sr):
    # Resumed from the step-20 checkpoint, the rest of the run is the same bit for bit: the weights,
    # the float32 optimizer state of bfloat16 weights and the step that seeds the rounding noise.
    config = configure(work, "bf16_sr_resume", TINY_UPDATES, optimizer={"stochastic_rounding": True})
    original = run_folder(bf16_sr)
    copy = config.parent / "runs" / original.name
    shutil.copytree(original, copy)
    shutil.rmtree(copy / "models")  # so the comparison below reads what the resumed run saved
    result = ok(launch(config, "--resume_from_checkpoint", "step00000020"))
    assert "starting at step 20" in result.output
    assert result.losses(copy) == bf16_sr.losses()
    assert evals(copy, EVAL) == evals(original, EVAL)
    a = load_file(copy / "models" / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(original / "models" / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


# ------------------------------------------------------------------------------------ saving in process


class OneProcessEngine:
    """What save_full_model reads of DeepSpeed's engine, for one process holding every layer."""

    def __init__(self, layers):
        self.module = type("Module", (), {"forward_funcs": layers})()


def loaded_transformer(work, tmp_path):
    from config.train_config import load_train_config
    from models import get_model_class
    from parallel.stages import load_stage, plan_stages

    config = load_train_config(write_configs(tmp_path / "cfg", work["model"], work["data"], adapter=None),
                               get_model_class)
    model = get_model_class("flux")(config.model)
    transformer, layers, parts = plan_stages(model, config)
    load_stage(model, config, transformer, layers, parts, 0, torch.device("cpu"))
    return model, transformer, layers


def test_small_shards_and_many_original_parts_join_into_the_same_model(work, tmp_path, monkeypatch):
    from saving import export

    model, transformer, layers = loaded_transformer(work, tmp_path)
    # 64 KiB shards: the tiny transformer (0.5 MiB in float32) is written in several pieces, and
    # its original-layout file is joined from as many parts.
    monkeypatch.setattr(export, "SHARD_BYTES", 64 * 2**10)
    out = tmp_path / "models" / "final"
    files = export.save_full_model(model, transformer, OneProcessEngine(layers), out, torch.float32,
                                   Distributed.alone())
    shards = sorted((out / "transformer").glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) >= 4 and out / "transformer" / "diffusion_pytorch_model.safetensors.index.json" in files
    assert not list(out.glob("original-part-*")) and not out.with_name("final.tmp").exists()
    weights = {k: v.detach() for k, v in transformer.state_dict().items()}
    assert all(torch.equal(load_saved(out).state_dict()[k], v) for k, v in weights.items())
    rebuilt, _ = from_original_layout(out, work)
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in weights.items())


def test_a_full_disk_while_saving_keeps_the_previous_save(work, tmp_path, monkeypatch):
    import errno

    from saving import export
    from utils.errors import DiskFullError

    model, transformer, layers = loaded_transformer(work, tmp_path)
    out = tmp_path / "models" / "final"
    export.save_full_model(model, transformer, OneProcessEngine(layers), out, torch.float32, Distributed.alone())
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = []

    def fails_on_the_second_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_file_real(tensors, path, metadata=metadata)

    save_file_real = export.save_file
    monkeypatch.setattr(export, "save_file", fails_on_the_second_file)
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(1.0)
    with pytest.raises(DiskFullError) as info:
        export.save_full_model(model, transformer, OneProcessEngine(layers), out, torch.float32, Distributed.alone())
    assert str(info.value).startswith(f"disk full: cannot write the transformer to {out}")
    assert "final is unchanged" in str(info.value)
    assert not out.with_name("final.tmp").exists()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_model_whose_layers_do_not_own_every_weight_refuses_full_finetuning(work, tmp_path):
    # DeepSpeed would neither average nor checkpoint a weight that no layer module holds: refused
    # with a config error before anything loads.
    from config.train_config import load_train_config
    from models import get_model_class
    from models.flux import FluxModel
    from parallel.engine import build_engine
    from utils.errors import ConfigError

    class FinalLayerReachesItsNormElsewhere(FluxModel):
        def layers(self, transformer):
            layers = super().layers(transformer)
            del layers[-1].norm_out  # as if looked up through the transformer when it runs
            return layers

    config = load_train_config(write_configs(tmp_path, work["model"], work["data"], adapter=None), get_model_class)
    with pytest.raises(ConfigError) as info:
        build_engine(FinalLayerReachesItsNormElsewhere(config.model), config, Distributed.alone(), 1)
    assert str(info.value).startswith(f"{config.file}: full fine-tuning (no [adapter] table) is not available for "
                                      f"model type 'flux': its weights ['norm_out.linear.weight', "
                                      f"'norm_out.linear.bias'] are not parameters of its pipeline layers")
