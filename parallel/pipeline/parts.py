"""This rank's share of the model: the chunks it holds, keyed by their (virtual) pipeline stage.

Without pipeline parallelism a rank holds one chunk, the whole model, as stage 0. With p pipeline ranks
and v virtual stages per rank, rank r holds stages r, r + p, ..., r + (v - 1) p. Every function that
works on "this rank's model" (the runner, the checkpoint format, the Hugging Face export, the adapter
files) takes a `ModelParts`; `ModelParts.of` is the one place that turns what a caller holds (a module,
a wrapper with `.module`, a list or dict of chunks) into one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from torch import nn


def _unwrapped(module: nn.Module) -> nn.Module:
    """The model inside wrappers that keep it as `.module` (DataParallel)."""
    while isinstance(getattr(module, "module", None), nn.Module):
        module = module.module
    return module


class ModelParts(dict):
    """{global stage index: chunk}, in increasing stage order; chunks are never wrapped."""

    def __init__(self, chunks: Mapping[int, nn.Module]) -> None:
        super().__init__((stage, _unwrapped(chunks[stage])) for stage in sorted(chunks))
        if not self:
            raise ValueError("ModelParts: expected at least one model chunk")

    @classmethod
    def of(cls, model: nn.Module | Sequence[nn.Module] | Mapping[int, nn.Module]) -> ModelParts:
        """A module (stage 0), a list of chunks (stages 0, 1, ...) or a {stage: chunk} mapping."""
        if isinstance(model, ModelParts):
            return model
        if isinstance(model, nn.Module):
            return cls({0: model})
        if isinstance(model, Mapping):
            return cls(model)
        return cls(dict(enumerate(model)))

    @property
    def chunks(self) -> list[nn.Module]:
        return list(self.values())

    @property
    def first(self) -> nn.Module:
        return next(iter(self.values()))

    def parameters(self) -> Iterator[nn.Parameter]:
        for chunk in self.values():
            yield from chunk.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameter names are global (layer indices count from the whole model), so never collide."""
        for chunk in self.values():
            yield from chunk.named_parameters()
