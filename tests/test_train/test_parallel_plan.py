"""The parallelization plan a model declares: blocks are the units by default, and a module's
`parallel_hint` leaves its parameters out of FSDP2 (they shard themselves), gives it its own
unit, or keeps it unsharded after forward; `apply_parallelism` reads only the plan."""
from __future__ import annotations

import pytest
import torch
from test_models.doubles import registered
from torch.distributed.fsdp import FSDPModule

import models
from models.config import model_config
from models.parallel_plan import ParallelHint
from train.parallel import apply_parallelism, init_distributed, shutdown_distributed

BASE = {"d_model": 32, "n_layers": 3, "n_heads": 4, "vocab_size": 64, "max_seq_len": 32}


class PCfg:
    activation_checkpointing = "every_k"
    ac_every = 2
    compile = False
    reshard_after_forward = True


@pytest.fixture
def group():
    init_distributed("fsdp2", "cpu", 60.0)
    yield
    shutdown_distributed()


def test_default_plan():
    plan = models.Decoder(model_config(BASE)).parallel_plan()
    assert plan.units == plan.checkpointable == plan.compiled == ["blocks.0", "blocks.1", "blocks.2"]
    assert plan.reshard_after_forward == {"blocks.2": False} and plan.ignored_params == []


def test_hints_shape_the_plan_and_fsdp2_follows_it(group):
    from torch.distributed.device_mesh import init_device_mesh
    with registered(mixer=False, memory=True):
        model = models.Decoder(model_config({**BASE, "memory": {"layers": [1], "kind": "test_memory"}}))
    memory = model.blocks[1].ffn
    memory.parallel_hint = ParallelHint(shard_self=True)
    meshes = []
    memory.shard = meshes.append                   # its own sharding (here: it keeps its parameters whole)
    model.blocks[0].mixer.parallel_hint = ParallelHint(own_unit=True, reshard_after_forward=False)
    plan = model.parallel_plan()
    assert plan.ignored_params == ["blocks.1.ffn.keys", "blocks.1.ffn.values"]
    assert plan.units[-1] == "blocks.0.mixer" and plan.reshard_after_forward["blocks.0.mixer"] is False

    mesh = init_device_mesh("cpu", (1,))
    apply_parallelism(model, PCfg(), {"mesh": mesh})
    assert meshes == [mesh]                                           # asked to shard itself, with the mesh
    assert isinstance(model.blocks[0].mixer, FSDPModule)              # its own unit
    assert not hasattr(memory.values, "device_mesh")                   # left out: a plain parameter
    assert hasattr(model.blocks[1].mixer.wq.weight, "device_mesh")    # the rest is sharded
    # every_k with k=2 over the checkpointable blocks: blocks 0 and 2 are wrapped
    wrapped = [type(b).__name__ for b in model.blocks]
    assert ["CheckpointWrapper" in w for w in wrapped] == [True, False, True]
    x = torch.randint(0, 64, (2, 8))
    model(x, labels=x).losses["ce"].value.backward()                  # and it still trains
    assert memory.values.grad is not None
