"""`benchmarks/run_all.py`: the headline functions on synthetic JSON, failure handling with stand-in
scripts, and one real `--quick` run of the whole benchmark suite (about 2-3 minutes on 2 cores)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import run_all  # noqa: E402

# The quick suite took 140-340 s on the shared 2-core machine at load average 4-9 (this module: 150-170 s);
# each script also has run_all's own limit (300 s with --quick). This bounds the whole run so CI cannot hang.
QUICK_SUITE_TIMEOUT_S = 900
BENCH_SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))


def values(rows: list[dict]) -> dict[str, object]:
    return {r["label"]: r["value"] for r in rows}


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------- headline functions


SYNTHETIC = {
    "bench_data_parallel": {"variants": [{"bucket_cap_mb": 25.0, "median_paired_ratio": 0.98}]},
    "bench_tensor_parallel": {
        "world_size": 2,
        "runs": [
            {"q_lora_rank": 192, "shape": [2, 64, 256], "speedup_paired": 9.0},  # smaller: not a headline
            {
                "q_lora_rank": 192,
                "shape": [4, 128, 256],
                "speedup_paired": 1.5,
                "measured": {"total": {"bytes": 1100}},
                "minimum": {"latent": {"total": 1000}},
            },
        ],
    },
    "bench_pipeline": {
        "rows": [
            {"schedule": "gpipe", "p": 2, "m": 4, "bubble_measured": 0.22, "bubble_formula": 0.2},
            {"schedule": "1f1b", "p": 2, "m": 4, "bubble_measured": 0.25, "bubble_formula": 0.2},
            {"schedule": "interleaved_1f1b", "p": 2, "m": 4, "bubble_measured": 0.2, "bubble_formula": 0.1},
            {
                "schedule": "zb1p",
                "p": 2,
                "m": 4,
                "bubble_measured": 0.1,
                "bubble_formula": None,
                "bubble_simulated": 0.05,
            },
            {"costs_ms": {"F": 1.0}, "m": 4},
        ]
    },  # fmt: skip
    "bench_zero": {
        "memory": [
            {
                "dp": dp,
                "precision": "bf16",
                "stage": s,
                "measured_per_param_total": total,
                "ours_formula_per_param_total": total,
                "paper_per_param": paper,
            }
            for dp, s, total, paper in [
                (2, 1, 14.0, 10.0),
                (4, 1, 10.0, 7.0),
                (4, 2, 5.5, 5.5),
                (4, 3, 4.4, 4.0),
            ]
        ],
        "step_time": {
            "runs": [
                {
                    "batch_per_rank": [2, 32],
                    "variants": {"ours stage 1": {"paired_ratio_vs_torch_zero": 9.0}},
                },
                {
                    "batch_per_rank": [8, 128],
                    "variants": {
                        "ours stage 1": {"paired_ratio_vs_torch_zero": 0.9, "paired_ratio_vs_ddp_adamw": 1.1},
                        "ours stage 2": {"paired_ratio_vs_ddp_adamw": 1.2},
                        "ours stage 3": {"paired_ratio_vs_ddp_adamw": "slow"},  # not a number: n/a
                    },
                },
            ]
        },
    },  # fmt: skip
    "bench_adam8bit": {
        "step_time": [
            {"threads": 2, "variants": {"ours AdamW8bit": {"ratio_to_fused_paired": 90.0}}},
            {"threads": 2, "busy": True, "variants": {"ours AdamW8bit": {"ratio_to_fused_paired": 180.0}}},
            {
                "threads": 1,
                "variants": {
                    "ours AdamW8bit": {"ratio_to_fused_paired": 15.0},
                    "torchao AdamW8bit": {"ratio_to_fused_paired": 25.0},
                },
            },
        ],
        "state_memory": {"bytes_per_parameter_ours": 2.03},
    },
    "bench_zero_memory": {
        "ratios": {"ours stage 3": {"peer": "FSDP2", "peak_ratio": 0.98, "between_ratio": 1.02}}
    },
    "bench_qlora": {
        "weight_memory": {
            "rows": [
                {"format": "NF4", "bits_per_param_linear": 4.5},
                {"format": "NF4 + double quant", "bits_per_param_linear": 4.2},
            ]
        },
        "training_step": {"qlora_over_bf16_lora": 1.2},
        "quantize": {"rows": {"ours": {"ours_over_peer": 1.0}, "bitsandbytes": {"ours_over_peer": 0.6}}},
    },
    "bench_async_save": {"blocked_ratio_async_over_sync": 0.05, "cost_ratio_async_over_sync": 0.4},
    "bench_generate": {
        "cache": [{"model": "README default (examples/train_mla.py)", "ratio": 4.0}],
        "speed": {"new_tokens": 64, "modes": {"latent cache": {"speedup_vs_no_cache": 3.0}}},
    },
    "bench_moe": {"cases": [{"case": "8 experts, k 2", "moe_over_dense": 1.5}]},
    "bench_expert_parallel": {"bytes_over_minimum": 1.0, "ep2_over_ep1": 1.3, "memory_ep2_over_ep1": 0.5},
    "bench_context_parallel": {
        "seq": 2048,
        "forward_bytes_over_minimum": 1.0,
        "deepseek_v2_32k_bf16": {"kv_over_latent": 71.1},
        "speedup_paired": 1.8,
        "speedup_over_latent_cp1_paired": 1.7,
        "ring_over_all_gather_paired": 1.02,
        "memory": [{"cp": 1, "measured_over_estimate": 0.9}, {"cp": 2, "measured_over_estimate": 1.01}],
    },
}


def test_every_bench_script_has_a_headline_function():
    assert sorted(run_all.EXTRACTORS) == BENCH_SCRIPTS


def test_headlines_from_synthetic_json():
    rows = {name: run_all.headlines(name, data) for name, data in SYNTHETIC.items()}

    dp = rows["bench_data_parallel"]
    assert dp == [
        {"label": "ours / DDP step time, 25 MB buckets", "value": 0.98, "goal": "<= 1", "met": "yes"}
    ]

    ep = {r["label"]: r for r in rows["bench_expert_parallel"]}
    assert ep["EP all-to-all bytes / derived minimum"]["met"] == "yes"
    assert ep["EP expert weights + state per rank, ep=2 / ep=1"]["met"] == "yes"
    assert ep["EP ep=2 / ep=1 MoE layer step time (gloo)"]["value"] == 1.3

    tp = values(rows["bench_tensor_parallel"])  # only the largest shape
    assert tp == {
        "tp=2 speed-up over tp=1, q_lora_rank=192, input 4x128x256": 1.5,
        "bytes / MLA latent minimum, q_lora_rank=192": 1.1,
    }

    pp = {r["label"]: r for r in rows["bench_pipeline"]}
    assert pp["GPipe idle - theory (formula), points, p=2 m=4"]["value"] == pytest.approx(2.0)
    assert pp["1F1B idle - theory (formula), points, p=2 m=4"]["met"] == "yes"
    assert pp["interleaved 1F1B idle - theory (formula), points, p=2 m=4"]["met"] == "no"  # 10 points
    assert pp["ZB-H1 idle - theory (simulator), points, p=2 m=4"]["value"] == pytest.approx(5.0)
    assert pp["interleaved 1F1B idle / 1F1B idle"]["value"] == pytest.approx(0.8)
    assert pp["ZB-H1 idle / 1F1B idle"]["value"] == pytest.approx(0.4)
    assert pp["ZB-H1 idle / 1F1B idle"]["met"] == "yes"

    zero = {r["label"]: r for r in rows["bench_zero"]}
    assert zero["bytes/param measured / our formula, worst of 4"]["value"] == 1.0
    assert zero["bytes/param measured / our formula, worst of 4"]["met"] == "yes"
    paper = "bytes/param measured / paper (its grads fp16, ours fp32), dp=4"
    assert zero[f"stage 1 {paper}"]["value"] == pytest.approx(10 / 7)
    assert zero[f"stage 1 {paper}"]["met"] == ""  # informational: no goal
    assert zero["stage 1 / torch ZeroRedundancyOptimizer step time, batch 8x128"]["value"] == 0.9
    assert zero["stage 2 / DDP + AdamW step time, batch 8x128"]["value"] == 1.2
    assert zero["stage 3 / DDP + AdamW step time, batch 8x128"]["value"] == "n/a"
    assert zero["stage 3 / DDP + AdamW step time, batch 8x128"]["met"] == "n/a"

    adam = {r["label"]: r for r in rows["bench_adam8bit"]}
    assert {label: r["value"] for label, r in adam.items()} == {
        "AdamW8bit / fused AdamW step time, 2 thread(s)": 90.0,
        "AdamW8bit / fused AdamW step time, 1 thread(s)": 15.0,
        "AdamW8bit / torchao AdamW8bit step time, 1 thread(s)": 0.6,
        "AdamW8bit / fused, busy core / quiet": 2.0,
        "AdamW8bit state bytes/param, small config (fp32 AdamW: 8)": 2.03,
    }
    assert adam["AdamW8bit / fused AdamW step time, 1 thread(s)"]["met"] == "no"  # goal <= 5
    assert adam["AdamW8bit / fused, busy core / quiet"]["met"] == "yes"  # goal <= 2

    memory = {r["label"]: r for r in rows["bench_zero_memory"]}
    assert memory["ours stage 3 / FSDP2 peak memory"]["met"] == "yes"
    assert memory["ours stage 3 / FSDP2 between-step memory"]["value"] == 1.02
    assert memory["ours stage 3 / FSDP2 between-step memory"]["met"] == "no"

    qlora = {r["label"]: r for r in rows["bench_qlora"]}
    assert qlora["QLoRA / bf16 LoRA step time"]["value"] == 1.2
    assert qlora["NF4 quantize / bitsandbytes"]["met"] == "yes"
    assert "NF4 quantize / torchao" not in qlora  # a peer that was not timed gives no row
    assert qlora["NF4 bits/param, decoder linears"]["met"] == "yes"
    assert qlora["NF4 + double quant bits/param, decoder linears"]["met"] == "no"

    saves = {r["label"]: r for r in rows["bench_async_save"]}
    assert saves["async / sync save, training blocked"]["value"] == 0.05
    assert saves["async / sync save, blocked + overlapped-step slowdown"]["met"] == "yes"

    assert values(rows["bench_generate"]) == {
        "latent cache speed-up over no cache, 64 tokens": 3.0,
        "absorbed speed-up over no cache, 64 tokens": "n/a",
        "KV cache bytes MHA / MLA, README default": 4.0,
    }
    assert values(rows["bench_moe"]) == {"MoE / dense MLP step time, 8 experts, k 2": 1.5}
    assert values(rows["bench_context_parallel"]) == {
        "latent all-gather bytes / derived minimum": 1.0,
        "K/V / latent bytes per token, DeepSeek-V2": 71.1,
        "cp=2 attention speed-up over cp=1, 2048 tokens": 1.8,
        "cp=2 speed-up over cp=1, same latent attention": 1.7,
        "cp=2 ring / all-gather step time": 1.02,
        "cp=2 saved activations / estimate": 1.01,
    }


@pytest.mark.parametrize("data", [{}, {"variants": "x", "runs": [1, None], "rows": {}, "memory": [[]]}, []])
def test_missing_or_malformed_json_gives_na_never_an_exception(data):
    for name in BENCH_SCRIPTS:
        rows = run_all.headlines(name, data)
        assert rows, name
        assert all(r["value"] == "n/a" for r in rows), (name, rows)
        assert all(r["met"] in ("", "n/a") for r in rows), (name, rows)


# ---------------------------------------------------------------------------- running, with stand-ins


def write_script(directory: Path, name: str, body: str) -> Path:
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


GOOD = """
    import json, sys
    out = sys.argv[sys.argv.index("--json") + 1]
    assert "--quick" in sys.argv
    json.dump({"speed": {"new_tokens": 8, "modes": {"latent cache": {"speedup_vs_no_cache": 2.5}}}},
              open(out, "w"))
    print("a table")
"""


def test_main_reports_failures_and_still_runs_the_rest(tmp_path, monkeypatch, capsys):
    bench = tmp_path / "bench"
    bench.mkdir()
    write_script(bench, "bench_generate", GOOD)
    write_script(bench, "bench_broken", "import sys\nprint('boom')\nsys.exit(3)\n")
    write_script(bench, "bench_silent", "print('forgot the JSON')\n")
    monkeypatch.setattr(run_all, "BENCH_DIR", bench)
    out = tmp_path / "out"

    assert run_all.main(["--quick", "--out", str(out), "--timeout", "60"]) == 1

    summary = json.loads((out / "summary.json").read_text())
    status = {b["name"]: b["status"] for b in summary["benchmarks"]}
    assert status == {
        "bench_broken": "FAILED (exit 3)",
        "bench_generate": "ok",
        "bench_silent": "FAILED (no JSON written)",
    }
    assert summary["failed"] == ["bench_broken", "bench_silent"]
    ok = next(b for b in summary["benchmarks"] if b["name"] == "bench_generate")
    assert values(ok["headlines"])["latent cache speed-up over no cache, 8 tokens"] == 2.5
    printed = capsys.readouterr().out
    assert "boom" in printed  # the end of a failed script's log is shown
    assert "| generate" in printed and "| broken" in printed
    assert (out / "summary.md").read_text().startswith("| benchmark")

    assert run_all.main(["--quick", "--out", str(out), "--only", "generate"]) == 0
    with pytest.raises(SystemExit, match="unknown benchmark 'nope'"):
        run_all.main(["--out", str(out), "--only", "nope"])


def test_a_script_past_its_time_limit_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = write_script(
        tmp_path,
        "bench_hang",
        f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(120)
        """,
    )
    run = run_all.run_script(script, tmp_path, quick=False, timeout=3)
    assert run["status"] == "TIMED OUT after 3 s"
    assert run["wall_s"] < 30
    assert wait_until_dead(int(pid_file.read_text()), "time.sleep(120)"), "the script's child survived"


def wait_until_dead(pid: int, marker: str, seconds: float = 10.0) -> bool:
    """True once process `pid` (running a command containing `marker`) is gone or a zombie; SIGKILL is
    delivered asynchronously, so it may still be exiting right after the kill."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z" or marker not in cmdline:  # a zombie, or the pid reused by another process
            return True
        time.sleep(0.1)
    return False


# ---------------------------------------------------------------------------- the real quick suite


@pytest.fixture(scope="module")
def quick_suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("run_all_quick")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=QUICK_SUITE_TIMEOUT_S,
    )
    return proc, json.loads((out / "summary.json").read_text())


def test_quick_suite_runs_every_benchmark(quick_suite):
    proc, summary = quick_suite
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert [b["name"] for b in summary["benchmarks"]] == BENCH_SCRIPTS
    for bench in summary["benchmarks"]:
        assert bench["status"] == "ok", bench
        assert Path(bench["json"]).exists()
        assert f"| {bench['name'].removeprefix('bench_')} " in proc.stdout  # a row in the printed table


def test_quick_suite_headlines_are_numbers(quick_suite):
    _, summary = quick_suite
    for bench in summary["benchmarks"]:
        assert bench["headlines"], bench["name"]
        for row in bench["headlines"]:
            assert is_number(row["value"]), (bench["name"], row)
