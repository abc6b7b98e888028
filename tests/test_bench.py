"""The GPU benchmarks stay runnable: bench/step.py's step-time table for each model and
bench/cache_speed.py, on tiny models on the CPU; and what the step table compares is comparable:
each model's layer list computes what its whole diffusers transformer computes."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, free_port, losses, write_configs
from make_tiny_models import make_tiny_flux2, make_tiny_hunyuan_video, make_tiny_ltx_video, make_tiny_wan

sys.path.insert(0, str(REPO / "bench"))

import step  # noqa: E402
from training import objective  # noqa: E402

NAMES = ["flux", "ltx-video", "hunyuan-video"]
# (resolution, frames, checkpointing): both checkpointing settings are covered across the models.
SIZES = {"flux": ("64", 1, "on"), "ltx-video": ("64x32", 9, "off"), "hunyuan-video": ("64x32", 9, "on"),
         "wan": ("64x32", 9, "on"), "flux2": ("64", 1, "on")}


@pytest.fixture(scope="module")
def model_dirs(tiny_models, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bench_models")
    return {"flux": tiny_models / "flux", "ltx-video": make_tiny_ltx_video(root),
            "hunyuan-video": make_tiny_hunyuan_video(root), "wan": make_tiny_wan(root),
            "flux2": make_tiny_flux2(root)}


def bench_args(name, model_dirs, **kw):
    args = dict(model=name, model_dir=model_dirs[name], dtype="float32", text_len=16, full=False, rank=4,
                warmup=1, steps=1, batch=2, checkpointing=False, compile=False, float8=None,
                attention=None, ema=None, dora=False)
    return argparse.Namespace(**{**args, **kw})


def lora_layers_and_batch(name, model_dirs):
    """The model, its transformer and our layers on the CPU with a LoRA whose B is not zero (so it
    changes what they compute), and a training batch from `training_example`."""
    args = bench_args(name, model_dirs)
    model = step.make_model(args)
    cpu = torch.device("cpu")
    resolution, frames, _ = SIZES[name]
    batch = step.synthetic_batch(model, *step.parse_resolution(resolution), frames, 2, cpu)
    transformer, layers = step.our_layers(model, step.row_config(model, args), cpu)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model, transformer, layers, batch


@pytest.mark.parametrize("name", NAMES + ["wan", "flux2"])
def test_layers_equal_reference_forward(model_dirs, name):
    """The layers row and the diffusers row of the table run the same function: with a LoRA whose
    B is not zero, our layers and the transformer's own forward (`reference_forward`) agree on a
    batch from `training_example`."""
    model, transformer, layers, (inputs, _) = lora_layers_and_batch(name, model_dirs)
    with torch.no_grad():
        x = inputs
        for layer in layers:
            x = layer(x)
        reference = model.reference_forward(transformer, model.input_fields.unpack(inputs))
    assert x.shape == reference.shape
    torch.testing.assert_close(x, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES + ["wan", "flux2"])
def test_compiled_layers_recompute_inside_their_graph_as_eager_checkpointing(model_dirs, name):
    """compile with activation checkpointing (memory/checkpointing.recomputes_inside_graph): each
    model's layers, with the checkpoint traced into their compiled graphs, give the loss and LoRA
    gradients of the eager layers under DeepSpeed's (non-reentrant) checkpoint."""
    from torch.utils.checkpoint import checkpoint

    from memory.checkpointing import recomputes_inside_graph
    from parallel.engine import compile_layers

    model, transformer, layers, (inputs, labels) = lora_layers_and_batch(name, model_dirs)
    trained = [p for p in transformer.parameters() if p.requires_grad]

    settings = SimpleNamespace(compile=True, activation_checkpointing=True, blocks_to_swap=0)
    inside = [recomputes_inside_graph(layer, settings, model) for layer in layers]
    assert sum(inside) == sum(layer.kind == "block" for layer in layers) > 0

    def loss_and_grads(outer_checkpoint: bool):
        x = inputs
        for layer, recomputed in zip(layers, inside):
            again = outer_checkpoint or not recomputed  # the rest stay under DeepSpeed's checkpoint
            x = checkpoint(layer, x, use_reentrant=False) if again else layer(x)
        loss = objective.loss(model, x, labels)
        grads = torch.autograd.grad(loss, trained)
        return loss.detach(), grads

    reference = loss_and_grads(outer_checkpoint=True)
    torch._dynamo.reset()
    compile_layers(layers, lambda layer: recomputes_inside_graph(layer, settings, model))
    loss, grads = loss_and_grads(outer_checkpoint=False)
    torch.testing.assert_close(loss, reference[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, reference[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_latent_shapes_follow_the_vae(model_dirs):
    # The tiny VAEs compress as the released ones: Flux 8x, LTX-Video 32x and 8x in time, Hunyuan 8x and 4x.
    shape = lambda name, w, h, f: step.latent_shape(step.make_model(bench_args(name, model_dirs)), w, h, f)  # noqa: E731
    assert shape("flux", 1024, 512, 1) == (16, 64, 128)
    assert shape("ltx-video", 768, 512, 49) == (16, 7, 16, 24)
    assert shape("hunyuan-video", 512, 512, 33) == (16, 9, 64, 64)
    assert shape("wan", 832, 480, 81) == (16, 21, 60, 104)  # Wan 2.1: 8x and 4x in time
    assert shape("flux2", 1024, 1024, 1) == (32, 64, 64)  # FLUX.2: 8x, then 2x2 patches of 8 channels as channels


def run_bench(*cmd: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_step_table_runs_all_three_modes(model_dirs, tmp_path, name):
    rows_file = tmp_path / "rows.jsonl"
    resolution, frames, ckpt = SIZES[name]
    proc = run_bench(str(REPO / "bench" / "step.py"), str(model_dirs[name]), "--model", name, "--resolution",
                     resolution, "--frames", str(frames), "--text_len", "16", "--dtype", "float32", "--rank", "4",
                     "--steps", "1", "--warmup", "1", "--checkpointing", ckpt, "--device", "cpu",
                     "--json", str(rows_file))
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [r["mode"] for r in rows] == ["engine", "layers", "diffusers"]
    assert all("error" not in r and r["s_per_step"] > 0 for r in rows), rows
    assert all(r["model"] == name and r["frames"] == frames and r["checkpointing"] == (ckpt == "on") for r in rows)
    # The engine and the plain loop run the same layers on the same batch: the same first loss. The
    # diffusers loop's LoRA also starts with B = 0, so its first loss is the base model's too.
    by_mode = {r["mode"]: r for r in rows}
    assert by_mode["engine"]["first_loss"] == pytest.approx(by_mode["layers"]["first_loss"], rel=1e-5)
    assert by_mode["diffusers"]["first_loss"] == pytest.approx(by_mode["layers"]["first_loss"], rel=1e-4)
    # FLOPs are counted once (layers row) and stand for every row of the shape, with an MFU.
    assert all(r["tflop_per_step"] > 0 and r["mfu"] > 0 for r in rows), rows
    assert "model          resolution frames mode" in proc.stdout and "training   ckpt   s/step" in proc.stdout


@pytest.mark.slow
def test_step_table_with_compiled_layers(model_dirs, tmp_path):
    # --compile: the engine and layers rows run torch.compile'd layers, and still compute the same step.
    rows_file = tmp_path / "rows.jsonl"
    run_bench(str(REPO / "bench" / "step.py"), str(model_dirs["flux"]), "--model", "flux", "--resolution", "64",
              "--mode", "engine", "layers", "--text_len", "16", "--dtype", "float32", "--rank", "4", "--steps", "1",
              "--warmup", "1", "--checkpointing", "on", "--device", "cpu", "--compile", "--json", str(rows_file))
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [r["mode"] for r in rows] == ["engine compiled", "layers compiled"]
    assert all("error" not in r for r in rows), rows
    assert rows[0]["first_loss"] == pytest.approx(rows[1]["first_loss"], rel=1e-5)


@pytest.mark.slow
def test_step_table_trainer_options(model_dirs, tmp_path):
    # Engine rows with float8 products, a named attention backend, and two checkpointing settings
    # (selective too); no layers row, so the FLOPs come from a child of their own.
    rows_file = tmp_path / "rows.jsonl"
    run_bench(str(REPO / "bench" / "step.py"), str(model_dirs["flux"]), "--model", "flux", "--resolution", "64",
              "--mode", "engine", "--text_len", "16", "--dtype", "bfloat16", "--rank", "4", "--steps", "1",
              "--warmup", "1", "--checkpointing", "off", "selective", "--float8", "matmul",
              "--attention", "_native_math", "--device", "cpu", "--json", str(rows_file))
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [(r["mode"], r["checkpointing"]) for r in rows] == [("engine fp8mm math", False),
                                                                ("engine fp8mm math", "selective")]
    assert all("error" not in r and r["tflop_per_step"] > 0 for r in rows), rows
    assert rows[0]["first_loss"] == pytest.approx(rows[1]["first_loss"], rel=1e-3)


@pytest.mark.slow
def test_step_table_reports_a_failing_row(model_dirs, tmp_path):
    # An odd frame count fails in every row (the latent shape does not patch): error rows, no crash.
    rows_file = tmp_path / "rows.jsonl"
    proc = run_bench(str(REPO / "bench" / "step.py"), str(model_dirs["flux"]), "--model", "flux", "--resolution",
                     "40", "--mode", "layers", "--text_len", "16", "--dtype", "float32", "--checkpointing", "off",
                     "--device", "cpu", "--json", str(rows_file))
    (row,) = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert row["error"] and "s_per_step" not in row
    assert "error: " in proc.stdout


@pytest.mark.slow
def test_cache_speed_table(model_dirs, tmp_path):
    rows_file = tmp_path / "rows.jsonl"
    proc = run_bench(str(REPO / "bench" / "cache_speed.py"), str(model_dirs["flux"]), "--resolution", "64",
                     "--text_len", "16", "--batch", "1", "2", "--steps", "1", "--warmup", "1", "--dtype", "float32",
                     "--device", "cpu", "--json", str(rows_file))
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [(r["stage"], r["batch"]) for r in rows] == [("text", 1), ("text", 2), ("latents", 1), ("latents", 2)]
    assert all("error" not in r and r["items_per_s"] > 0 for r in rows), rows
    assert "stage    batch  s/batch  items/s" in proc.stdout


@pytest.mark.slow
def test_kernel_rates_table():
    # bench/kernel_rates.py at tiny shapes on the CPU: every linear variant timed, attention through
    # each SDPA backend in its own process, a backend with no kernel here a "failed" row, not a crash.
    proc = run_bench(str(REPO / "bench" / "kernel_rates.py"), "--small", "--device", "cpu")
    lines = proc.stdout.splitlines()
    linear = [line.split()[3:-2] for line in lines if line.startswith("linear small")]
    assert [" ".join(v) for v in linear] == ["bf16", "fp8 storage", "fp8 matmul"]
    assert any(line.startswith("attention small") and "flash_attention fwd+bwd" in line for line in lines)
    assert any("cudnn_attention" in line and "failed:" in line for line in lines)


@pytest.mark.slow
def test_step_table_with_dora_and_ema(model_dirs, tmp_path):
    # --dora and --ema: DoRA in the engine and layers rows, the moving average updated after each engine
    # step. DoRA starts as the base model, so the first losses agree with each other as without it.
    rows_file = tmp_path / "rows.jsonl"
    run_bench(str(REPO / "bench" / "step.py"), str(model_dirs["flux"]), "--model", "flux", "--resolution", "64",
              "--mode", "engine", "layers", "--text_len", "16", "--dtype", "float32", "--rank", "4", "--steps", "1",
              "--warmup", "1", "--checkpointing", "off", "--device", "cpu", "--dora", "--ema", "cpu",
              "--json", str(rows_file))
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [r["mode"] for r in rows] == ["engine ema-cpu dora", "layers dora"]
    assert all("error" not in r for r in rows), rows
    assert 0 < rows[0]["ema_s_per_update"] < rows[0]["s_per_step"] and "ema_s_per_update" not in rows[1]
    assert rows[0]["first_loss"] == pytest.approx(rows[1]["first_loss"], rel=1e-5)


@pytest.mark.slow
def test_peak_breakdown_runs_on_cpu():
    # The GPU check of the memory estimate (bench/peak_breakdown.py), at a tiny width on the CPU:
    # both checkpointing modes print a measured peak beside the estimate.
    out = run_bench(str(REPO / "bench" / "peak_breakdown.py"), "--model", "flux", "--device", "cpu", "--heads", "1", "--shape", "128", "128",
                    "1", "--blocks", "2", "2").stdout
    lines = [line for line in out.splitlines() if line.startswith("checkpointing ")]
    assert [line.split(":")[0] for line in lines] == ["checkpointing false", "checkpointing true"], out
    assert all("measured peak" in line and "estimate without optimizer state" in line for line in lines)


@pytest.mark.slow
def test_cache_speed_end_to_end_from_files(model_dirs, tmp_path):
    # --images: generated JPEGs cached through DatasetCache with and without worker processes; each
    # row's rate and projection are there, and the table prints them.
    rows_file = tmp_path / "rows.jsonl"
    proc = run_bench(str(REPO / "bench" / "cache_speed.py"), str(model_dirs["flux"]), "--resolution", "64",
                     "--text_len", "16", "--batch", "2", "--steps", "1", "--warmup", "0", "--dtype", "float32",
                     "--device", "cpu", "--images", "6", "--workers", "0", "2", "--json", str(rows_file))
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    files = [r for r in rows if r["stage"] == "files"]
    assert [(r["workers"], r["batch"], r["encoded"]) for r in files] == [(0, 2, 6), (2, 2, 6)], proc.stdout
    for r in files:
        assert r["items_per_s"] > 0 and r["of_encoder_only"] > 0
        assert r["hours_1_gpu"] == pytest.approx(330_000 / r["items_per_s"] / 3600)
        assert r["hours_8_gpus"] == pytest.approx(r["hours_1_gpu"] / 8)
    assert "workers batch  items/s of encoder-only  h, 1 GPU h, 8 GPUs" in proc.stdout


@pytest.mark.slow
def test_pipeline_timeline_times_every_instruction_of_both_stages(tmp_path, tiny_models, image_dataset):
    # bench/pipeline_timeline.py in place of train.py over 2 stages: one line a step per rank, each
    # with the schedule's instructions (a forward and a backward per micro-batch), and a summary
    # table naming both stages.
    config = write_configs(tmp_path / "run", tiny_models / "flux", image_dataset, max_steps=2, pipeline_stages=2,
                           gradient_accumulation_steps=2, eval_at_start=False)
    folder = tmp_path / "timeline"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BENCH_TIMELINE_DIR": str(folder)}
    proc = subprocess.run(["deepspeed", "--num_gpus=2", f"--master_port={free_port()}",
                           str(REPO / "bench" / "pipeline_timeline.py"), "--deepspeed", "--config", str(config)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank, sends in ((0, "SendActivation"), (1, "SendGrad")):
        steps = [json.loads(line) for line in (folder / f"timeline-r{rank}.jsonl").read_text().splitlines()]
        assert [s["step"] for s in steps] == [1, 2] and all(s["stage"] == rank for s in steps)
        ops = [op["op"] for op in steps[-1]["ops"]]
        assert ops.count("ForwardPass") == ops.count("BackwardPass") == 2 and ops.count(sends) == 2
        # the batch's reading inside each load, timed on its own (both ends of the pipeline load)
        assert ops.count("NextBatch") == ops.count("LoadMicroBatch") == 2
        assert ops[-1] == "OptimizerStep" and all(op["cpu"][0] <= op["cpu"][1] for op in steps[-1]["ops"])
        # the container's CPU-quota stalls during the step (None where the kernel does not say)
        assert all(s["cpu_throttled_ms"] is None or s["cpu_throttled_ms"] >= 0 for s in steps)
    summary = run_bench(str(REPO / "bench" / "pipeline_timeline.py"), "--summarize", str(folder), "2").stdout
    assert "rank 0 (stage 0)" in summary and "rank 1 (stage 1)" in summary and "| BackwardPass |" in summary
    assert "| CPU quota throttling" in summary
    # The loads experiment (a step's micro-batches read and placed on the device at its first load)
    # trains on the same numbers; its whole step's reading falls in the first NextBatch.
    staged = tmp_path / "staged"
    config = write_configs(tmp_path / "staged_run", tiny_models / "flux", image_dataset, max_steps=2,
                           pipeline_stages=2, gradient_accumulation_steps=2, eval_at_start=False)
    proc = subprocess.run(["deepspeed", "--num_gpus=2", f"--master_port={free_port()}",
                           str(REPO / "bench" / "pipeline_timeline.py"), "--deepspeed", "--config", str(config)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**env, "BENCH_TIMELINE_DIR": str(staged), "BENCH_STAGE_BATCHES": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    step = json.loads((staged / "timeline-r0.jsonl").read_text().splitlines()[-1])
    assert step["staged_batches"] is True
    first_read, second_read = [op["cpu"][1] - op["cpu"][0] for op in step["ops"] if op["op"] == "NextBatch"]
    assert first_read > second_read
    (plain_run,) = (tmp_path / "run" / "runs").iterdir()
    (staged_run,) = (tmp_path / "staged_run" / "runs").iterdir()
    assert losses(staged_run) == losses(plain_run)


def test_cpu_throttling_is_read_from_cgroup_v2_and_v1(tmp_path):
    from pipeline_timeline import cpu_throttled_ms

    v2 = tmp_path / "v2.stat"
    v2.write_text("usage_usec 9000000\nnr_periods 40\nnr_throttled 3\nthrottled_usec 250000\n")
    v1 = tmp_path / "v1.stat"
    v1.write_text("nr_periods 40\nnr_throttled 3\nthrottled_time 250000000\n")
    missing = (str(tmp_path / "none"), "throttled_usec", 1e-3)
    assert cpu_throttled_ms([missing, (str(v2), "throttled_usec", 1e-3)]) == pytest.approx(250.0)
    assert cpu_throttled_ms([missing, (str(v1), "throttled_time", 1e-6)]) == pytest.approx(250.0)
    assert cpu_throttled_ms([missing]) is None


@pytest.mark.slow
def test_cpu_overhead_profiles_the_engine_step(model_dirs):
    out = run_bench(str(REPO / "bench" / "cpu_overhead.py"), str(model_dirs["flux"]), "--resolution", "32",
                    "--no_compile", "--steps", "2", "--warmup", "1", "--top", "5").stdout
    assert "compile off, checkpointing on:" in out and "ms a step" in out
    assert "activation checkpointing" in out and "DeepSpeed" in out  # the groups the time falls in
