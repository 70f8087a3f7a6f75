"""Run under torchrun (2 gloo ranks) by tests/test_train/test_memory_sharded.py:

1. the column-sharded value read (models/memory_sharded.py) against the dense read of every
   rank's tokens in one process, in float64: outputs, the table's gradient and the weights';
2. then `ablate train` with the remaining arguments (an FSDP2 run with memory layers).
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F


def check_sharded_read() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from models.memory_sharded import column_sharded_bag

    r, P = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    M, v, N, K = 50, 8, 6, 5
    table = torch.randn(M, v, dtype=torch.float64, generator=g)
    slots = torch.randint(0, M, (P, N, K), generator=g)
    weights = torch.rand(P, N, K, dtype=torch.float64, generator=g)
    grad_out = torch.randn(P, N, v, dtype=torch.float64, generator=g)

    t_ref, w_ref = table.clone().requires_grad_(), weights.clone().requires_grad_()
    ref = F.embedding_bag(slots.reshape(P * N, K), t_ref, per_sample_weights=w_ref.reshape(P * N, K), mode="sum")
    (ref * grad_out.reshape(P * N, v)).sum().backward()

    mesh = init_device_mesh("cpu", (P,))
    sharded = distribute_tensor(table.clone(), mesh, [Shard(1)]).requires_grad_()
    w = weights[r].clone().requires_grad_()
    out = column_sharded_bag(slots[r], w, sharded)
    (P * (out * grad_out[r]).sum()).backward()        # the trainer scales each rank's loss by P

    cols = slice(r * v // P, (r + 1) * v // P)
    torch.testing.assert_close(out, ref.view(P, N, v)[r], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sharded.grad.to_local(), t_ref.grad[:, cols], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad / P, w_ref.grad[r], rtol=1e-12, atol=1e-12)
    if r == 0:
        print("sharded read: equal to the dense read (outputs, table and weight gradients)", flush=True)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    check_sharded_read()
    from train.cli import main
    sys.exit(main(["train", *sys.argv[1:]]))
