"""The command line, end to end: layout-independent loss curves and one-line errors for bad input.

Loss parity: the first steps' losses for (dp, tp) in {(1,1), (2,1), (1,2), (2,2)} with the same global
batch agree to 1e-5 relative in fp32. The only differences are the order of floating-point sums (TP
all-reduces, the DP average); the learning rate is kept small so that Adam's sign-like first updates
cannot turn last-bit gradient differences into visible loss differences.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "examples" / "train_mla.py")
TINY = [
    "model.hidden_size=64",
    "model.num_layers=4",
    "model.num_heads=4",
    "model.q_lora_rank=32",
    "model.kv_lora_rank=32",
    "model.qk_nope_head_dim=16",
    "model.qk_rope_head_dim=8",
    "model.v_head_dim=16",
    "model.intermediate_size=128",
    "model.max_seq_len=64",
    "data.vocab_size=512",
    "data.seq_len=32",
    "data.max_corpus_mb=0.5",
    "train.global_batch_size=8",
    "train.steps=4",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "optim.lr=1e-4",
    "optim.min_lr=1e-5",
    "optim.warmup_steps=0",
    "train.grad_clip=0.5",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("token-cache"))


@pytest.fixture(scope="module")
def reference_run(cache_dir, tmp_path_factory) -> Path:
    """The single-process run every layout is compared with."""
    out = tmp_path_factory.mktemp("reference")
    result = run_cli([*TINY, f"data.cache_dir={cache_dir}", f"train.out_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def run_cli(args: list[str], nproc: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        cmd = [sys.executable, SCRIPT, *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            SCRIPT,
        ]
        cmd += args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


LAYOUTS = [  # (dp, tp, pp, extra overrides)
    (2, 1, 1, []),
    (1, 2, 1, []),
    (2, 2, 1, []),
    (2, 1, 1, ["train.micro_batch_size=2"]),  # gradient accumulation over 2 micro-batches per rank
    (1, 1, 1, ["train.micro_batch_size=1"]),
    (1, 1, 2, ["distributed.pp_schedule=gpipe", "distributed.num_microbatches=4"]),
    (1, 1, 2, ["distributed.pp_schedule=zb1p", "distributed.num_microbatches=2"]),
    (
        1,
        1,
        2,
        [
            "distributed.pp_schedule=interleaved_1f1b",
            "distributed.virtual_stages=2",
            "train.micro_batch_size=2",
        ],
    ),
    (2, 2, 2, ["distributed.pp_schedule=1f1b", "train.micro_batch_size=2"]),  # 3D: 8 processes
    (2, 1, 1, ["distributed.zero_stage=1"]),
    (2, 1, 1, ["distributed.zero_stage=2", "distributed.offload_optimizer=true", "train.micro_batch_size=2"]),
    (1, 2, 2, ["distributed.zero_stage=2", "distributed.pp_schedule=zb1p", "train.micro_batch_size=2"]),
    (2, 1, 1, ["distributed.zero_stage=3", "distributed.recompute=true"]),
    (1, 1, 1, ["train.compile=true", "train.compile_backend=eager"]),  # tracing only: inductor is slow on CPU
    (  # sequence-sharded hidden states between pipeline stages; selective recompute
        1,
        2,
        2,
        [
            "distributed.sequence_parallel=true",
            "distributed.recompute=selective",
            "train.micro_batch_size=2",
        ],
    ),
]


@pytest.mark.parametrize("dp,tp,pp,extra", LAYOUTS, ids=lambda x: str(x))
def test_loss_curve_does_not_depend_on_layout(dp, tp, pp, extra, cache_dir, reference_run, tmp_path):
    reference_dir, run_dir = reference_run, tmp_path / "run"
    args = [*TINY, f"data.cache_dir={cache_dir}", f"train.out_dir={run_dir}", f"distributed.dp={dp}", *extra]
    run = run_cli([*args, f"distributed.tp={tp}", f"distributed.pp={pp}"], dp * tp * pp)
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    expected = [m for m in read_metrics(reference_dir) if "split" not in m]
    got = [m for m in read_metrics(run_dir) if "split" not in m]
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for a, b in zip(got, expected, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)
    val = [m for m in read_metrics(run_dir) if m.get("split") == "val"]
    val_ref = [m for m in read_metrics(reference_dir) if m.get("split") == "val"]
    assert val and val[-1]["loss"] == pytest.approx(val_ref[-1]["loss"], rel=1e-5)


def test_single_process_run_writes_the_contract_files(cache_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli([*TINY, f"data.cache_dir={cache_dir}", f"train.out_dir={out}", "train.sample_tokens=4"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "single process" in result.stdout
    assert "val_loss" in result.stdout and "sample:" in result.stdout
    metrics = read_metrics(out)
    train_records = [m for m in metrics if "split" not in m]
    assert all({"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(m) for m in train_records)
    assert any(m.get("split") == "val" for m in metrics)
    assert (out / "config.yaml").exists() and (out / "final" / "model.safetensors").exists()


def test_bf16_autocast_trains_at_tp2(cache_dir, tmp_path):
    out = tmp_path / "run"
    args = [*TINY, f"data.cache_dir={cache_dir}", f"train.out_dir={out}", "train.precision=bf16"]
    result = run_cli([*args, "distributed.tp=2", "optim.lr=3e-3", "train.steps=6"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [m["loss"] for m in read_metrics(out) if "split" not in m]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_fp16_trains_with_dynamic_loss_scaling(cache_dir, tmp_path):
    out = tmp_path / "run"
    args = [*TINY, f"data.cache_dir={cache_dir}", f"train.out_dir={out}", "train.precision=fp16"]
    result = run_cli([*args, "train.steps=3", "model.num_layers=1"])
    assert result.returncode == 0, result.stderr[-3000:]
    records = [m for m in read_metrics(out) if "split" not in m]
    assert all(math.isfinite(m["loss"]) and "loss_scale" in m and "skipped_steps" in m for m in records)


def test_print_config_prints_and_exits(tmp_path):
    result = run_cli(["--print-config", "train.steps=7"])
    assert result.returncode == 0
    assert "steps: 7" in result.stdout


def _assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.parametrize(
    "override,fragments",
    [
        ("train.stpes=3", ["train.stpes", "did you mean 'train.steps'"]),
        ("train.precision=fp8", ["train.precision='fp8'", "fp32, bf16, fp16"]),
        ("distributed.pp_schedule=zigzag", ["distributed.pp_schedule='zigzag'"]),
        ("data.seq_len=128", ["data.seq_len=128", "model.max_seq_len=64"]),
        ("model.vocab_size=300", ["model.vocab_size=300", "token id"]),
        ("distributed.dp=2", ["dp*cp*tp*pp", "world size 1"]),
        ("distributed.num_microbatches=3", ["distributed.num_microbatches=3", "does not divide"]),
    ],
)
def test_bad_input_is_a_one_line_error(override, fragments, cache_dir, tmp_path):
    result = run_cli(
        [*TINY, f"data.cache_dir={cache_dir}", f"train.out_dir={tmp_path}", override], timeout=120
    )
    _assert_one_line_error(result, *fragments)


def test_empty_corpus_is_a_one_line_error(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "empty.txt").write_text("   \n")
    args = [
        *TINY,
        f"data.corpus={tmp_path / 'corpus'}",
        f"data.cache_dir={tmp_path}",
        f"train.out_dir={tmp_path}",
    ]
    _assert_one_line_error(run_cli(args, timeout=120), "data.corpus")


def test_world_size_mismatch_and_indivisible_heads_fail_fast_under_torchrun(cache_dir, tmp_path):
    common = [*TINY, f"data.cache_dir={cache_dir}", f"train.out_dir={tmp_path}"]
    _assert_one_line_error(
        run_cli([*common, "distributed.dp=3"], nproc=2, timeout=120), "dp*cp*tp*pp", "world size 2"
    )
    result = run_cli([*common, "distributed.tp=2", "model.num_heads=3"], nproc=2, timeout=120)
    _assert_one_line_error(result, "model.num_heads=3 is not divisible by tp=2")
    result = run_cli([*common, "distributed.pp=2", "model.num_layers=1"], nproc=2, timeout=120)
    _assert_one_line_error(result, "model.num_layers=1 is too few for 2 pipeline stages")


TIED_FOLDER = ROOT / "tests" / "fixtures" / "deepseek_v2_tied_yarn"  # tie_word_embeddings: true


def test_zero3_refuses_the_tied_embeddings_of_a_pretrained_folder():
    """The check reads the resolved model config: the folder ties its embeddings though no key says so."""
    from train.config import ConfigError, load_config
    from train.layout import Layout, model_config

    overrides = [f"model.pretrained={TIED_FOLDER}", "distributed.zero_stage=3", "data.seq_len=32"]
    config = load_config(None, overrides)
    mcfg = model_config(config, vocab_size=131)
    with pytest.raises(ConfigError, match="model.tie_embeddings=true with distributed.zero_stage=3"):
        Layout.resolve(config, mcfg, dp=1, tp=1)


def test_zero3_with_a_tied_pretrained_folder_is_a_one_line_error(cache_dir, tmp_path):
    from train.data.tokenizer import train_tokenizer

    run_keys = [arg for arg in TINY if not arg.startswith("model.")]  # the folder defines the model
    # the fixture folder has no tokenizer.json: without data.tokenizer that is the first error
    train_tokenizer([(ROOT / "README.md").read_text()], 300).save(str(tmp_path / "tokenizer.json"))
    args = [*run_keys, f"data.cache_dir={cache_dir}", f"train.out_dir={tmp_path}"]
    args.append(f"data.tokenizer={tmp_path / 'tokenizer.json'}")
    result = run_cli([*args, f"model.pretrained={TIED_FOLDER}", "distributed.zero_stage=3"], timeout=120)
    _assert_one_line_error(result, "model.tie_embeddings=true", "distributed.zero_stage=3")
