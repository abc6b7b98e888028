"""The training math does not depend on how processes are arranged: 1 process, 2 pipeline
stages, 2 data-parallel replicas and 2 x 2 give the same losses, weights and eval loss."""

from __future__ import annotations

import json
import types

import pytest
import torch
from safetensors.torch import load_file

from conftest import launch, write_configs

# Each layout trains on 2 micro-batches of 1 sample per optimizer step.
LAYOUTS = {
    "1 process, 1 stage, accumulation 2": dict(num_gpus=1, pipeline_stages=1, gradient_accumulation_steps=2),
    # activation checkpointing recomputes the forward: same math, so it rides along here
    "2 processes, 2 stages, accumulation 2": dict(num_gpus=2, pipeline_stages=2, gradient_accumulation_steps=2,
                                                  activation_checkpointing=True),
    "2 processes, 2 replicas": dict(num_gpus=2, pipeline_stages=1, gradient_accumulation_steps=1),
    # equal block counts: 2 double blocks | 2 single blocks, where "parameters" splits 1 | 3
    # (parallel/engine.PartitionedPipelineModule takes either)
    "4 processes, 2 stages x 2 replicas": dict(num_gpus=4, pipeline_stages=2, gradient_accumulation_steps=1,
                                               partition_method="blocks"),
}


def test_cost_partition_balances_declared_layer_costs():
    from models.flux import FluxDoubleBlockLayer, FluxFinalLayer, FluxInputLayer, FluxSingleBlockLayer
    from parallel.stages import partition

    def layer(cls):  # partition reads only the class's kind and cost
        return types.SimpleNamespace(kind=cls.kind, cost=cls.cost)

    flux_dev = ([layer(FluxInputLayer)] + [layer(FluxDoubleBlockLayer)] * 19 + [layer(FluxSingleBlockLayer)] * 38
                + [layer(FluxFinalLayer)])
    # input + 19 double + 8 single (19 x 1.2 + 8 = 30.8) against 30 single + final
    assert partition(flux_dev, 2, "cost") == [0, 28, 59]
    assert partition(flux_dev, 4, "cost") == [0, 14, 28, 43, 59]
    # One kind of block, no declared cost: the same blocks on every stage, as "blocks" does.
    video = [types.SimpleNamespace(kind="input", cost=None)] + [types.SimpleNamespace(kind="block", cost=None)] * 28 \
        + [types.SimpleNamespace(kind="output", cost=None)]
    assert partition(video, 2, "cost") == [0, 15, 30]


def test_the_start_line_gives_what_the_split_leaves_of_the_pipeline():
    from config.parallel import pipeline_summary
    from models.flux import FluxDoubleBlockLayer, FluxFinalLayer, FluxInputLayer, FluxSingleBlockLayer
    from parallel.stages import stage_costs

    flux_dev = ([FluxInputLayer] + [FluxDoubleBlockLayer] * 19 + [FluxSingleBlockLayer] * 38 + [FluxFinalLayer])
    flux_dev = [types.SimpleNamespace(kind=cls.kind, cost=cls.cost) for cls in flux_dev]
    # What "parameters" gives FLUX.1-dev's LoRA r32 (the full-size model on the meta device): 18
    # double blocks on stage 0, each holding about twice a single block's adapter, so stage 1
    # paces the pipeline (71% measured on 4 x H100, fifth run).
    parameters = stage_costs(flux_dev, [0, 19, 59])
    assert parameters == pytest.approx([18 * 1.2, 1.2 + 38])
    line = pipeline_summary(2, 8, parameters, "parameters")
    assert line.startswith("pipeline: 2 stages, 8 micro-batches a step: each GPU computes at most 89% of the time")
    # 8/9 x (21.6 + 39.2) / (2 x 39.2)
    assert "the stages carry 36% / 64% of the work, so about 69%" in line
    assert line.endswith("partition_method = 'cost' balances the costs")
    balanced = pipeline_summary(2, 8, stage_costs(flux_dev, [0, 28, 59]), "cost")
    assert "carry 51% / 49% of the work, so about 88%" in balanced and "balances" not in balanced


def run_layout(tmp_path, tiny_models, data, name, num_gpus, **settings):
    folder = tmp_path / name.replace(" ", "_").replace(",", "")
    cfg = write_configs(folder, tiny_models / "flux", data, max_steps=4, micro_batch_size_per_gpu=1,
                        eval_datasets=[{"name": "held", "config": "dataset.toml"}], eval_at_start=True,
                        **settings)
    result = launch(cfg, num_gpus=num_gpus)
    assert result.returncode == 0, f"{name}:\n{result.output[-4000:]}"
    run_dir = result.run_dirs()[-1]
    weights = load_file(run_dir / "adapters" / "final" / "pytorch_lora_weights.safetensors")
    evals = json.loads((run_dir / "eval.json").read_text())
    # every rank's peak memory, with its stage (the estimate printed at start is per stage)
    peaks = json.loads((run_dir / "memory.json").read_text())
    replicas = num_gpus // settings["pipeline_stages"]
    assert [(p["rank"], p["stage"]) for p in peaks] == [(r, r // replicas) for r in range(num_gpus)], peaks
    assert all(p["peak_gib"] > 0 for p in peaks)
    return result.losses(run_dir), weights, evals, result.output


def compare(reference, other, name):
    ref_losses, ref_weights, ref_evals, _ = reference
    losses, weights, evals, _ = other
    assert losses == pytest.approx(ref_losses, rel=1e-5), name
    assert weights.keys() == ref_weights.keys(), name
    for k in weights:
        torch.testing.assert_close(weights[k], ref_weights[k], atol=1e-5, rtol=1e-4, msg=f"{name}: {k}")
    assert [e["step"] for e in evals] == [e["step"] for e in ref_evals]
    for e, r in zip(evals, ref_evals):
        assert e["held"] == pytest.approx(r["held"], rel=1e-6), name


@pytest.mark.slow
def test_two_stages_match_one(tmp_path, tiny_models, image_dataset):
    names = list(LAYOUTS)[:2]
    reference = run_layout(tmp_path, tiny_models, image_dataset, names[0], **LAYOUTS[names[0]])
    other = run_layout(tmp_path, tiny_models, image_dataset, names[1], **LAYOUTS[names[1]])
    # the 2-stage run really split the model
    assert "stage 1: layers" in other[3]
    compare(reference, other, names[1])
    # and the adapter trained: weights moved away from lora_B = 0
    assert any(v.abs().max() > 0 for k, v in reference[1].items() if "lora_B" in k)


@pytest.mark.slow
def test_data_parallel_and_hybrid_layouts_match(tmp_path, tiny_models, image_dataset):
    results = {name: run_layout(tmp_path, tiny_models, image_dataset, name, **settings)
               for name, settings in LAYOUTS.items() if name != list(LAYOUTS)[1]}
    reference = results.pop(list(LAYOUTS)[0])
    for name, other in results.items():
        compare(reference, other, name)


def test_each_local_process_takes_its_share_of_the_cpu_cores():
    from parallel.launch import cpu_threads_per_process

    # 4 processes a thread per core each would be 256 spinning threads on 64 cores
    assert cpu_threads_per_process({"LOCAL_SIZE": "4"}, 64) == 16
    assert cpu_threads_per_process({"LOCAL_WORLD_SIZE": "8"}, 4) == 1
    assert cpu_threads_per_process({}, 64) == 64
    assert cpu_threads_per_process({"LOCAL_SIZE": "4", "OMP_NUM_THREADS": "2"}, 64) == 2  # the user's choice wins
