"""The rendezvous store of one torchrun attempt, kept apart from earlier attempts' keys."""

from __future__ import annotations

import datetime
import os
import time
import uuid

import torch.distributed as dist


def attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun, the rendezvous store with this attempt's keys apart from earlier attempts'.

    torchrun's c10d rendezvous shares one TCPStore across worker restarts (`--max-restarts`) without
    separating the attempts (pytorch/pytorch#135712), so a restarted worker may read a dead worker's
    address and fail to connect. Every key is prefixed with a token all ranks of this attempt agree on
    through the store (`_agree_on_attempt`); TORCHELASTIC_RESTART_COUNT cannot serve, since each node's
    agent counts its own restarts and the counts differ between nodes after a restart. None outside
    torchrun (or without MASTER_ADDR/MASTER_PORT): plain env:// initialisation.
    """
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    from torch.distributed.rendezvous import _create_c10d_store  # what env:// uses; agent store aware

    store = _create_c10d_store(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, world_size, timeout
    )
    attempt = _agree_on_attempt(store, rank, world_size, timeout)
    return dist.PrefixStore(f"{STORE_PREFIX}/attempt-{attempt}/default_pg", store)


STORE_PREFIX = "mla-parallel"


def _agree_on_attempt(store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta) -> str:
    """A token naming this attempt, the same on every rank, from a store that still holds the keys of
    earlier attempts (whose processes are all gone: torchrun stops every worker before a new round).

    Rank 0 publishes a fresh token under `leader`; every other rank answers the token it reads with a
    nonce of its own, and waits for `go/<its nonce>`, which only the live rank 0 writes, after reading
    that answer under its own token. A rank that read a dead attempt's token gets no answer and reads
    `leader` again, so no stale key can be taken for this attempt's."""
    key = f"{STORE_PREFIX}/agree"
    deadline = time.monotonic() + timeout.total_seconds()
    if rank == 0:
        token = uuid.uuid4().hex
        store.set(f"{key}/leader", token)
        store.wait([f"{key}/ack/{token}/{r}" for r in range(1, world_size)], timeout)
        for r in range(1, world_size):
            store.set(f"{key}/go/{store.get(f'{key}/ack/{token}/{r}').decode()}", token)
        return token
    nonce, answered = uuid.uuid4().hex, None
    while time.monotonic() < deadline:
        if store.check([f"{key}/go/{nonce}"]):
            return store.get(f"{key}/go/{nonce}").decode()
        if store.check([f"{key}/leader"]):
            token = store.get(f"{key}/leader").decode()
            if token != answered:
                store.set(f"{key}/ack/{token}/{rank}", nonce)
                answered = token
        time.sleep(0.05)
    raise TimeoutError(
        f"rank {rank}: rank 0 did not start this attempt within {timeout.total_seconds():.0f} s "
        f"(torchrun store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')})"
    )
