"""Autograd collectives on rank-valued tensors, where every answer has a closed form.

Tolerance: exact. Sums of small integers are exact in fp32, whatever the reduction order.
"""

import pytest
import torch
from dist_harness import grid, run_distributed

from parallel import collectives as C


def _check_collectives(world: int) -> None:
    with grid(tp=world) as topo:
        g, r = topo.tp_group, topo.tp_rank
        total = sum(range(1, world + 1))

        x = torch.full((2, 3), float(r + 1), requires_grad=True)
        y = C.copy_to_group(x, g)
        assert torch.equal(y, x)
        (y * (r + 1)).sum().backward()
        assert torch.equal(x.grad, torch.full((2, 3), float(total)))

        x = torch.full((2, 3), float(r + 1), requires_grad=True)
        y = C.reduce_from_group(x, g)
        assert torch.equal(y, torch.full((2, 3), float(total)))
        (y * (r + 1)).sum().backward()
        assert torch.equal(x.grad, torch.full((2, 3), float(r + 1)))

        x = torch.full((2, 3), float(r), requires_grad=True)
        y = C.gather_from_group(x, 1, g)
        assert torch.equal(y, torch.arange(world).float().repeat_interleave(3).expand(2, -1))
        weights = torch.arange(3 * world, dtype=torch.float32).expand(2, -1)
        (y * weights).sum().backward()
        assert torch.equal(x.grad, weights[:, 3 * r : 3 * r + 3])

        x = torch.arange(2 * world, dtype=torch.float32).view(2, world).requires_grad_()
        y = C.split_to_group(x, 1, g)
        assert torch.equal(y, x[:, r : r + 1])
        (y * (r + 1)).sum().backward()
        expected = torch.arange(1, world + 1, dtype=torch.float32).expand(2, -1)
        assert torch.equal(x.grad, expected)

        x = (torch.arange(2 * world, dtype=torch.float32).view(2 * world, 1) * (r + 1)).requires_grad_()
        y = C.reduce_scatter_to_group(x, 0, g)
        assert torch.equal(y, torch.tensor([[2.0 * r], [2.0 * r + 1]]) * total)
        (y * (r + 1)).sum().backward()
        assert torch.equal(
            x.grad, torch.arange(1, world + 1, dtype=torch.float32).repeat_interleave(2)[:, None]
        )

        x = torch.full((1, 2), float(r + 1), requires_grad=True)
        y = C.gather_from_sequence_parallel(x, 0, g)
        assert torch.equal(y, torch.arange(1, world + 1, dtype=torch.float32)[:, None].expand(-1, 2))
        (y * torch.arange(world, dtype=torch.float32)[:, None]).sum().backward()
        assert torch.equal(x.grad, torch.full((1, 2), float(r * world)))


@pytest.mark.parametrize("world", [2, 4])
def test_collectives_closed_form(world):
    run_distributed(world, _check_collectives, world)


def test_single_process_collectives_are_identity():
    x = torch.randn(3, 4, requires_grad=True)
    for op in (C.copy_to_group, C.reduce_from_group):
        assert op(x, None) is x
    for op in (
        C.gather_from_group,
        C.split_to_group,
        C.reduce_scatter_to_group,
        C.gather_from_sequence_parallel,
    ):
        assert op(x, 0, None) is x


def _failing_rank() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise RuntimeError("rank one fails on purpose")


def test_harness_reports_the_failing_rank():
    with pytest.raises(AssertionError, match="rank one fails on purpose"):
        run_distributed(2, _failing_rank)
