"""Several machines ("nodes") through DeepSpeed's own launcher, tried on this one: two launchers
with node ranks 0 and 1 (`deepspeed --hostfile H --no_ssh --node_rank R --master_addr A`, as on a
cluster where each node starts its own launcher) train exactly as one launcher with the same
layout, and the dataset cache, on a filesystem both "nodes" share, is built once; a "node" whose
cache folder is its own (a mount namespace hides the shared one) builds its own copy."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import REPO, free_port, launch, write_configs


def start_node(config, hostfile, node_rank: int, port: int, own_disk: tuple[Path, Path] | None = None) -> subprocess.Popen:
    """One node's launcher. `own_disk` = (folder, mount point): this node sees `folder` at the
    mount point instead of what the others see there, as a node with a local disk would."""
    cmd = ["deepspeed", f"--hostfile={hostfile}", "--no_ssh", f"--node_rank={node_rank}", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(REPO / "train.py"), "--deepspeed", "--config", str(config)]
    if own_disk:
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               f'mount --bind "{own_disk[0]}" "{own_disk[1]}" && exec "$@"', "sh", *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


@pytest.mark.slow
def test_two_nodes_train_as_one_and_share_one_cache(tmp_path, tiny_models, image_dataset):
    # 2 pipeline stages, one on each "node": activations and gradients cross between the nodes
    settings = dict(max_steps=3, micro_batch_size_per_gpu=1, pipeline_stages=2, gradient_accumulation_steps=2,
                    checkpoint_every_n_steps=3)
    nodes_cfg = write_configs(tmp_path / "nodes", tiny_models / "flux", image_dataset, **settings)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    procs = [start_node(nodes_cfg, hostfile, rank, port) for rank in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {rank}:\n{out[-4000:]}"
    assert "nnodes=2" in outputs[0] and "node_rank=1" in outputs[1]
    # the start of a pipelined run says how busy its schedule can keep the GPUs: 2 / (2 + 2 - 1)
    assert "pipeline: 2 stages, 2 micro-batches a step: each GPU computes at most 67% of the time" in outputs[0]
    # and what the split's balance leaves of that: stage 0's two double blocks (1.2 each) against
    # two single blocks, 2/3 x 4.4 / 4.8
    assert "the stages carry 55% / 45% of the work, so about 61%" in outputs[0], \
        re.findall(r"pipeline: .*", outputs[0])
    # the cache was encoded once, by the ranks of both nodes together, into the shared folder
    assert re.search(r"cache: [1-9]\d* new entries encoded", outputs[0])

    one_cfg = write_configs(tmp_path / "one", tiny_models / "flux", image_dataset, **settings)
    one = launch(one_cfg, num_gpus=2)
    assert one.returncode == 0, one.output[-4000:]
    assert "cache: 0 new entries encoded" in one.output  # the nodes' cache, reused

    run_dirs = sorted(p for p in (tmp_path / "nodes" / "runs").iterdir() if p.is_dir())
    assert len(run_dirs) == 1  # both nodes wrote into one run folder
    nodes_losses = one.losses(run_dirs[0])
    assert len(nodes_losses) == 3
    assert nodes_losses == pytest.approx(one.losses(), rel=1e-6)
    # each node saved its stage's layers into the one checkpoint: the first layer and the last
    last = int(re.search(r"stage 1: layers \d+-(\d+)", outputs[0]).group(1))
    latest = (run_dirs[0] / "checkpoints" / "latest").read_text().strip()
    parts = {f.name for f in (run_dirs[0] / "checkpoints" / latest).iterdir()}
    assert {"layer_00-model_states.pt", f"layer_{last:02d}-model_states.pt"} <= parts, parts
    shutil.rmtree(tmp_path / "nodes" / "runs")


def mount_namespaces() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not mount_namespaces(), reason="needs mount namespaces (unshare --mount, root) to give one "
                                                   "'node' a cache folder of its own")
def test_a_node_that_does_not_share_the_cache_folder_builds_its_own(tmp_path, tiny_models, image_dataset):
    from data.tensor_store import TensorStore

    settings = dict(max_steps=2, micro_batch_size_per_gpu=1, pipeline_stages=2, gradient_accumulation_steps=2)
    config = write_configs(tmp_path / "nodes", tiny_models / "flux", image_dataset, **settings)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    shared, node_b_disk = image_dataset / "cache", tmp_path / "node-b-disk"
    shared.mkdir()
    node_b_disk.mkdir()
    port = free_port()
    procs = [start_node(config, hostfile, 0, port), start_node(config, hostfile, 1, port, own_disk=(node_b_disk, shared))]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {rank}:\n{out[-4000:]}"
    assert "is not one folder for every rank (nodes without a shared filesystem): ranks 0, 1 each write" in outputs[0]
    # Both copies hold every entry, with the same tensors: each node trained from its own.
    for kind in ("latents", "text"):
        a, b = TensorStore(shared / "flux" / kind), TensorStore(node_b_disk / "flux" / kind)
        assert len(a) > 0 and a.index.keys() == b.index.keys(), kind
        for key in a.index:
            for name, tensor in a.get(key).items():
                assert torch.equal(tensor, b.get(key)[name]), (kind, key, name)
