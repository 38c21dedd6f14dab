"""The layout planner (`python -m train.plan`) on the three questions of the README, and on requests that
cannot be met. The layouts' bytes are the estimator's (tested against live tensors in test_memory.py)."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from train.gpus import gpu_preset
from train.memory import GIB
from train.plan import main

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
KEYS = {"dp", "tp", "pp", "zero_stage", "offload_optimizer", "micro_batch_size", "bytes_per_gpu", "fits"}


@pytest.mark.parametrize(
    "config,gpu,precision",
    [
        ("mla-13b.yaml", "a5000", "bf16"),
        ("mla-24b-qlora.yaml", "v100s", "fp16"),
        ("mla-7b.yaml", "t4", "fp16"),
    ],
)
def test_the_three_questions_get_fitting_layouts(config, gpu, precision, capsys):
    assert main(["--config", str(CONFIGS / config), "--gpus", "2", "--gpu", gpu, "--json"]) == 0
    layouts = json.loads(capsys.readouterr().out)
    assert layouts and all(KEYS <= set(x) for x in layouts)
    for x in layouts:
        assert x["fits"] and x["bytes_per_gpu"] <= gpu_preset(gpu).memory_gib * GIB
        assert (
            x["dp"] * x["cp"] * x["tp"] * x["pp"] == 2 and x["precision"] == precision
        )  # no bf16 on V100/T4
    speeds = [x["tokens_per_s"] for x in layouts]
    assert speeds == sorted(speeds, reverse=True)


def test_full_training_of_13b_on_two_a5000_is_refused_with_advice(capsys):
    args = ["--config", str(CONFIGS / "mla-13b.yaml"), "--gpus", "2", "--gpu", "a5000", "lora.enabled=false"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "error: no layout fits on 2 x a5000" in err
    assert "more GPUs: " in err and "QLoRA fits on 2 x a5000" in err


def test_a_smaller_memory_override_can_make_it_impossible(capsys):
    args = [
        "--config",
        str(CONFIGS / "mla-7b.yaml"),
        "--gpus",
        "1",
        "--gpu",
        "t4",
        "--gpu-memory",
        "4",
        "--json",
    ]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert all(not x["fits"] for x in json.loads(out)) and "no layout fits on 1 x t4" in err


def test_unknown_gpu_lists_the_known_ones(capsys):
    assert main(["--config", str(CONFIGS / "mla-7b.yaml"), "--gpus", "2", "--gpu", "a6000"]) == 2
    assert "unknown GPU; known: v100, v100s, t4" in capsys.readouterr().err


def test_expert_parallelism_is_searched_and_divides_the_expert_state_per_gpu():
    """An MoE model on 4 GPUs: ep in {1, 2, 4} is searched; at dp=4, ZeRO-0, ep=4 holds a quarter of the
    routed experts, so parameters, gradients and optimizer state shrink by 3/4 of the experts' share."""
    from train.config import load_config
    from train.layout import model_config
    from train.memory import estimate_memory
    from train.plan import layouts

    moe = [
        "n_routed_experts=8",
        "num_experts_per_tok=2",
        "moe_intermediate_size=256",
        "first_k_dense_replace=0",
    ]
    config = load_config(CONFIGS / "small.yaml", [f"model.{m}" for m in moe] + ["train.global_batch_size=8"])
    mcfg = model_config(config, config.data.vocab_size)
    found = layouts(config, mcfg, 4, gpu_preset("a5000"))
    assert {c.distributed.ep for c in found if c.distributed.dp == 4} == {1, 2, 4}
    assert all(c.distributed.dp % c.distributed.ep == 0 for c in found)
    pick = next(c for c in found if c.distributed.dp == 4 and c.distributed.zero_stage == 0)
    by_ep = {
        ep: estimate_memory(replace(pick, distributed=replace(pick.distributed, ep=ep)), mcfg).device
        for ep in (1, 4)
    }
    experts = 3 * mcfg.hidden_size * mcfg.moe_intermediate_size * 8 * mcfg.num_layers  # routed elements
    w = 2 if pick.train.precision in ("bf16", "fp16") else 4
    saved = experts * 3 // 4
    assert by_ep[1]["parameters"] - by_ep[4]["parameters"] == w * saved
    assert by_ep[1]["optimizer state"] - by_ep[4]["optimizer state"] == pytest.approx(8 * saved, rel=1e-3)
