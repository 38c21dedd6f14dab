"""Where ZeRO keeps its fp32 master weights: next to the model, or offloaded to host memory.

Each rank holds one master chunk per bucket (its 1/N share of the bucket's parameters, in fp32) and,
attached as `.grad`, the chunk of the reduced gradient. With offload the chunks, their gradients and so
the inner optimizer's state (created like the chunks) live in host memory, pinned when a GPU is present
so that copies in both directions can be asynchronous; the inner optimizer then steps on the CPU. Only
two transfers cross the bus per step: each reduced gradient chunk goes down (`chunk.to(master.device)`)
and each updated master chunk comes up (`flat.copy_(master)`). On a CPU-only machine the same code runs
with host-to-host copies.
"""

from __future__ import annotations

import torch


def master_chunk(chunk: torch.Tensor, offload: bool) -> torch.Tensor:
    """An fp32 master copy of `chunk`, in (pinned) host memory when `offload`. Its `.grad` is created by
    the first reduction of a step and freed by `zero_grad`, so it is not held between steps."""
    master = chunk.to(torch.device("cpu") if offload else chunk.device).clone()
    if offload and torch.cuda.is_available():
        master = master.pin_memory()
    return master
