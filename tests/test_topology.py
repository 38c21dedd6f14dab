"""The (pp, dp, cp, tp) rank grid: pure arithmetic first, then the groups a real world builds."""

import pytest
import torch.distributed as dist
from dist_harness import grid, run_distributed

from parallel import ParallelDims, init_distributed


def test_rank_order_is_pp_dp_tp_with_tp_fastest():
    dims = ParallelDims(dp=2, tp=2, pp=2)
    assert [dims.coords_of(r) for r in range(8)] == [
        (0, 0, 0, 0), (0, 0, 0, 1), (0, 1, 0, 0), (0, 1, 0, 1),
        (1, 0, 0, 0), (1, 0, 0, 1), (1, 1, 0, 0), (1, 1, 0, 1),
    ]  # fmt: skip
    assert dims.tp_group_ranks() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.dp_group_ranks() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dims.pp_group_ranks() == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_rank_order_with_cp_and_ep():
    """rank = ((pp dp + d) cp + c) tp + t; ep splits dp as d = edp * ep + e."""
    dims = ParallelDims(dp=4, cp=2, ep=2)
    assert [dims.coords_of(r) for r in range(8)] == [(0, d, c, 0) for d in range(4) for c in range(2)]
    assert dims.cp_group_ranks() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.dp_group_ranks() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert dims.dp_cp_group_ranks() == [list(range(8))]
    assert dims.ep_group_ranks() == [[0, 2], [1, 3], [4, 6], [5, 7]]  # dp ranks (0, 1) and (2, 3)
    assert dims.edp_group_ranks() == [[0, 1, 4, 5], [2, 3, 6, 7]]  # same ep rank, any cp rank


@pytest.mark.parametrize(
    "dp,tp,pp,cp,ep", [(1, 1, 1, 1, 1), (3, 1, 2, 1, 1), (2, 4, 1, 1, 2), (1, 2, 3, 2, 1), (4, 1, 2, 3, 2)]
)
def test_every_rank_is_in_exactly_one_group_of_each_kind(dp, tp, pp, cp, ep):
    dims = ParallelDims(dp=dp, tp=tp, pp=pp, cp=cp, ep=ep)
    for groups, size in (
        (dims.tp_group_ranks(), tp),
        (dims.dp_group_ranks(), dp),
        (dims.pp_group_ranks(), pp),
        (dims.cp_group_ranks(), cp),
        (dims.dp_cp_group_ranks(), dp * cp),
        (dims.ep_group_ranks(), ep),
        (dims.edp_group_ranks(), dp // ep * cp),
    ):
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(dims.world_size))
        assert all(len(g) == size for g in groups)
    for rank in range(dims.world_size):  # the coordinates name the rank back
        pp_rank, dp_rank, cp_rank, tp_rank = dims.coords_of(rank)
        assert dims.rank_of(pp_rank, dp_rank, tp_rank, cp_rank) == rank


def test_bad_dims_are_rejected():
    with pytest.raises(ValueError, match="ParallelDims.tp=0"):
        ParallelDims(tp=0)
    with pytest.raises(ValueError, match="ParallelDims.ep=2 does not divide dp=3"):
        ParallelDims(dp=3, ep=2)


def test_single_process_has_no_groups():
    topo = init_distributed()
    assert (topo.world_size, topo.rank, topo.tp_group, topo.dp_group) == (1, 0, None, None)
    assert topo.is_first_stage and topo.is_last_stage and not topo.is_distributed


def test_world_size_mismatch_names_all_four_numbers():
    with pytest.raises(ValueError, match=r"dp\*cp\*tp\*pp = 2\*2\*2\*1 = 8 does not equal world_size=1"):
        init_distributed(ParallelDims(dp=2, tp=2, cp=2))


def _check_groups() -> list:
    with grid(dp=2, tp=2) as topo:
        assert topo.backend == "gloo" and str(topo.device) == "cpu"
        tp_ranks = [None, None]
        dist.all_gather_object(tp_ranks, topo.rank, group=topo.tp_group)
        dp_ranks = [None, None]
        dist.all_gather_object(dp_ranks, topo.rank, group=topo.dp_group)
        return [topo.rank, topo.dp_rank, topo.tp_rank, tp_ranks, dp_ranks, topo.tp_ranks, topo.dp_ranks]


def test_groups_of_a_real_world():
    results = run_distributed(4, _check_groups)
    for rank, dp_rank, tp_rank, tp_ranks, dp_ranks, tp_list, dp_list in results:
        assert (dp_rank, tp_rank) == divmod(rank, 2)
        assert tp_ranks == tp_list == [2 * dp_rank, 2 * dp_rank + 1]
        assert dp_ranks == dp_list == [tp_rank, 2 + tp_rank]


def _check_cp_ep_groups() -> list:
    with grid(dp=2, cp=2, ep=2) as topo:
        seen = {}
        for kind in ("cp", "dp", "dp_cp", "ep", "edp"):
            group = getattr(topo, f"{kind}_group")
            members = [None] * dist.get_world_size(group)
            dist.all_gather_object(members, topo.rank, group=group)
            seen[kind] = (members, getattr(topo, f"{kind}_ranks"))
        return [topo.rank, topo.cp_rank, topo.ep_rank, topo.edp_rank, topo.dp_cp_rank, seen]


def test_cp_and_ep_groups_of_a_real_world():
    """dp=2, cp=2, ep=2: ranks (dp, cp) = (0,0) (0,1) (1,0) (1,1); both dp ranks form one ep group,
    so every expert is held once per cp rank (edp = cp members)."""
    for rank, cp_rank, ep_rank, edp_rank, dp_cp_rank, seen in run_distributed(4, _check_cp_ep_groups):
        assert (cp_rank, ep_rank, dp_cp_rank) == (rank % 2, rank // 2, rank)
        assert seen["cp"] == ([rank - cp_rank, rank - cp_rank + 1],) * 2
        assert seen["dp"] == ([cp_rank, cp_rank + 2],) * 2
        assert seen["dp_cp"] == ([0, 1, 2, 3],) * 2
        assert seen["ep"] == ([cp_rank, cp_rank + 2],) * 2
        edp = [2 * ep_rank, 2 * ep_rank + 1]
        assert seen["edp"] == (edp, edp) and edp_rank == cp_rank


def _check_mismatch() -> None:
    with pytest.raises(ValueError, match="does not equal world_size=2"):
        init_distributed(ParallelDims(dp=3))


def test_world_size_mismatch_in_a_real_world():
    run_distributed(2, _check_mismatch)


def test_every_rank_agrees_on_this_attempts_store_keys_despite_a_dead_attempts_keys():
    """torchrun keeps its store across restarts: a dead attempt's keys (leader token, answers, replies)
    are still there. Ranks that start before the new rank 0 read the dead token first; all must still
    agree on the new one, whatever order they start in."""
    import datetime
    import threading
    import time

    import torch.distributed as dist

    from parallel.rendezvous import STORE_PREFIX, _agree_on_attempt

    timeout = datetime.timedelta(seconds=20)
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timeout)
    key = f"{STORE_PREFIX}/agree"
    server.set(f"{key}/leader", "dead")  # the attempt before, all of its processes gone
    for r in (1, 2):
        server.set(f"{key}/ack/dead/{r}", f"old-nonce-{r}")
        server.set(f"{key}/go/old-nonce-{r}", "dead")
    tokens = {}

    def rank(r: int, delay: float) -> None:
        time.sleep(delay)
        store = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timeout)
        tokens[r] = _agree_on_attempt(store, r, 3, timeout)

    threads = [threading.Thread(target=rank, args=(r, d)) for r, d in ((1, 0.0), (2, 0.0), (0, 0.5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(tokens) == 3 and len(set(tokens.values())) == 1, tokens
    assert tokens[0] != "dead"
