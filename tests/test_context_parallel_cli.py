"""Context parallelism through the command line: the loss curve equals one process.

Packed documents with document masking, so attention crosses the zigzag pieces only within documents and
positions restart per document. Layouts: cp=2 (ZeRO-3, full recompute, with validation), cp=2 x tp=2
(sequence parallelism, selective recompute) and cp=2 x dp=2 x pp=2 (8 processes; the zero-bubble ZB-H1
schedule, whose deferred weight gradients land in DataParallel's dp x cp buckets). The losses of every
step and the validation loss agree with the one-process run to 1e-5 relative (fp32: the layouts differ
only in the order of floating-point sums: the attention's log-sum-exp merge, the reduce-scatter of latent
gradients and the dp x cp gradient average); the gradient norm to 1e-4. The checkpoint holds every
region once (cp ranks share their parameters). Unsupported combinations are rejected up front, naming
the keys.
"""

import json

import pytest
from test_cli import TINY, read_metrics, run_cli

from models import MLAConfig
from train.config import load_config
from train.layout import unsupported

SMALL = [a for a in TINY if not a.startswith(("model.num_layers", "train.global_batch_size", "train.steps"))]
ARGS = [
    *SMALL,
    "model.num_layers=2",
    "train.global_batch_size=4",
    "train.steps=2",
    "train.eval_every=2",
    "data.document_masking=true",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cp-token-cache"))


@pytest.fixture(scope="module")
def reference(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cp-reference")
    result = run_cli([*ARGS, f"data.cache_dir={cache_dir}", f"train.out_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


LAYOUTS = [  # (dp, cp, tp, pp, extra overrides)
    (1, 2, 1, 1, ["distributed.zero_stage=3", "distributed.recompute=full"]),
    (1, 2, 2, 1, ["distributed.sequence_parallel=true", "distributed.recompute=selective"]),
    (2, 2, 1, 2, ["distributed.pp_schedule=zb1p", "train.micro_batch_size=1"]),
]


@pytest.mark.parametrize("dp,cp,tp,pp,extra", LAYOUTS, ids=lambda x: str(x))
def test_context_parallel_loss_curve_equals_one_process(
    dp, cp, tp, pp, extra, cache_dir, reference, tmp_path
):
    run_dir = tmp_path / "run"
    dims = [f"distributed.dp={dp}", f"distributed.cp={cp}", f"distributed.tp={tp}", f"distributed.pp={pp}"]
    run = run_cli(
        [*ARGS, f"data.cache_dir={cache_dir}", f"train.out_dir={run_dir}", *dims, *extra], dp * cp * tp * pp
    )
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    assert f"cp={cp}" in run.stdout
    got, expected = read_metrics(run_dir), read_metrics(reference)
    assert [(m["step"], m.get("split")) for m in got] == [(m["step"], m.get("split")) for m in expected]
    assert [m["step"] for m in got if "split" not in m] == [1, 2]
    for a, b in zip(got, expected, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
        if "grad_norm" in b:
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)
    # cp ranks hold the same parameters: only the first of the dp x cp replicas writes them
    manifest = json.loads((run_dir / "checkpoints" / "step-00000002" / "manifest.json").read_text())
    for name, entry in manifest["tensors"].items():
        regions = [json.dumps([p["index"], p.get("flat")]) for p in entry["pieces"]]
        assert len(regions) == len(set(regions)), f"{name} written twice: {entry['pieces']}"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.seq_len=30"], "data.seq_len=30: distributed.cp=2 splits each sequence into 2 x cp pieces"),
        (
            ["distributed.tp=4", "distributed.sequence_parallel=true", "data.seq_len=12"],
            "each rank's 6 tokens must be divisible by tp",
        ),
        (["model.dropout=0.1"], "model.dropout=0.1 with distributed.cp=2 is not supported"),
        (
            ["model.n_routed_experts=4", "model.num_experts_per_tok=2", "model.moe_intermediate_size=16"],
            "distributed.cp=2 with mixture-of-experts",
        ),
        (["train.curriculum_start_seq_len=8", "train.curriculum_steps=2"], "train.curriculum_start_seq_len"),
    ],
)
def test_unsupported_context_parallel_combinations_are_named(overrides, message):
    config = load_config(None, [*SMALL, "distributed.cp=2", *overrides])
    assert message in unsupported(config, MLAConfig(**config.model))
    base = load_config(None, [*SMALL, "distributed.cp=2"])
    assert unsupported(base, MLAConfig(**base.model)) is None
