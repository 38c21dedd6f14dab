"""parallel/checkpoint.py: atomic sharded checkpoints, exact resume, resharding, fault detection.

Tolerances:
- save -> load -> continue in the same layout: bit-exact. Loading only moves numbers (fp32 stays fp32;
  8-bit AdamW codes and absmax are restored as saved), and the RNG states are restored.
- resharding fp32 state (weights, fp32 masters, Adam moments) between (dp, tp, pp, zero_stage) layouts:
  bit-exact. Every element is copied from the piece that holds it; nothing is summed.
- resharding 8-bit AdamW moments to other blocks: each value moves by at most half a code step of its new
  block, <= 0.7% of the block's absmax (the dynamic map's widest gap near 1 is 0.9/64); checked as
  |diff| <= 1% of the tensor's largest magnitude.
"""

import json
from pathlib import Path

import pytest
import torch
from dist_harness import grid, run_distributed

from models import MLAConfig, MLATransformer
from models.transformer import split_layers
from parallel import checkpoint
from parallel.data import ZeroOptimizer
from parallel.data.zero3 import default_units
from parallel.lowbit.adamw8bit import AdamW8bit

CONFIG = MLAConfig(
    vocab_size=131,  # odd: the vocabulary shards of tp=2 are padded
    hidden_size=32,
    num_layers=4,
    num_heads=4,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    intermediate_size=64,
    max_seq_len=16,
)
EIGHT_BIT = dict(block_size=64, min_8bit_size=64)  # most tensors 8-bit, blocks not aligned to tensors


def _build(topo, optim: str, stage: int | None):
    """This rank's model chunk and optimizer: plain (stage None) or ZeroOptimizer of `stage`."""
    torch.manual_seed(1)
    pp, pp_rank = (topo.pp_size, topo.pp_rank) if topo is not None else (1, 0)
    model = MLATransformer(CONFIG, topo, split_layers(CONFIG.num_layers, pp)[pp_rank])
    cls, extra = (AdamW8bit, EIGHT_BIT) if optim == "adamw8bit" else (torch.optim.AdamW, {})
    if stage is None:
        return model, cls(model.parameters(), lr=1e-2, **extra)
    units = default_units(model) if stage == 3 else None
    group = topo.dp_group if topo is not None else None
    return model, ZeroOptimizer(model.parameters(), cls, stage, group, False, 0.002, units, lr=1e-2, **extra)


def _train(model, opt, steps: int, dp_rank: int = 0, dp: int = 1) -> None:
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        batch = torch.randint(0, CONFIG.vocab_size, (4, 9), generator=g).chunk(dp)[dp_rank]
        model.loss(batch[:, :-1], batch[:, 1:]).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize(
    "optim,stage", [("adamw", None), ("adamw8bit", None), ("adamw", 1), ("adamw8bit", 2)]
)
def test_resume_in_the_same_layout_continues_bit_for_bit(optim, stage, tmp_path):
    model, opt = _build(None, optim, stage)
    _train(model, opt, 2)
    rng = torch.get_rng_state()
    checkpoint.save(tmp_path / "step-2", model, opt, step=2)
    torch.manual_seed(99)  # the load must restore the RNG state too
    resumed, resumed_opt = _build(None, optim, stage)
    with torch.no_grad():
        for p in resumed.parameters():
            p.mul_(0.5)  # nothing of the fresh model may survive the load
    info = checkpoint.load(tmp_path / "step-2", resumed, resumed_opt)
    assert info["step"] == 2 and info["same_layout"]
    assert torch.equal(torch.get_rng_state(), rng)
    _train(model, opt, 3)
    _train(resumed, resumed_opt, 3)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def _weights_and_state(directory: Path) -> dict[str, torch.Tensor]:
    """Every parameter's weight (the fp32 master where there is one) and optimizer state, in full."""
    manifest = checkpoint.read_manifest(directory)
    names = {n.split("/")[1] for n in manifest["tensors"]}
    out = {}
    for name in names:
        master = f"optim/{name}/master"
        out[name] = checkpoint.read_full(
            directory, master if master in manifest["tensors"] else f"param/{name}"
        )
        for moment in ("exp_avg", "exp_avg_sq"):
            out[f"{name}:{moment}"] = checkpoint.read_full(directory, f"optim/{name}/{moment}")
        out[f"{name}:step"] = torch.tensor(manifest["optimizer_steps"][name])
    return out


def _save_in(layout: dict, optim: str, stage, source: str | None, target: str, train: bool = False) -> None:
    with grid(**layout) as topo:
        model, opt = _build(topo, optim, stage)
        if train:
            _train(model, opt, 2, topo.dp_rank, topo.dp_size)
        if source is not None:
            checkpoint.load(source, model, opt, topology=topo)
        checkpoint.save(target, model, opt, topology=topo, step=2)


def test_fp32_state_reshards_exactly_across_layouts(tmp_path):
    """tp=2 -> dp=2 ZeRO-2 -> pp=2 -> dp=2 ZeRO-3 -> one process: weights, moments, steps unchanged."""
    chain = [({"tp": 2}, None), ({"dp": 2}, 2), ({"pp": 2}, None), ({"dp": 2}, 3)]
    dirs = [str(tmp_path / f"step-{i}") for i in range(len(chain))]
    for i, (layout, stage) in enumerate(chain):
        source = dirs[i - 1] if i else None
        run_distributed(
            2,
            _save_in,
            layout=layout,
            optim="adamw",
            stage=stage,
            source=source,
            target=dirs[i],
            train=i == 0,
        )
    model, opt = _build(None, "adamw", None)
    checkpoint.load(dirs[-1], model, opt)
    checkpoint.save(tmp_path / "single", model, opt, step=2)
    expected = _weights_and_state(Path(dirs[0]))
    assert len(expected) == 4 * len(list(model.parameters()))
    for directory in [*dirs[1:], tmp_path / "single"]:
        got = _weights_and_state(Path(directory))
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value), (directory, key)


def test_8bit_state_is_exact_in_the_same_layout_and_requantized_in_another(tmp_path):
    a, again, other, other_again = (str(tmp_path / n) for n in ("a", "again", "other", "other_again"))
    run_distributed(
        2, _save_in, layout={"dp": 2}, optim="adamw8bit", stage=2, source=None, target=a, train=True
    )
    run_distributed(2, _save_in, layout={"dp": 2}, optim="adamw8bit", stage=2, source=a, target=again)
    run_distributed(2, _save_in, layout={"tp": 2}, optim="adamw8bit", stage=None, source=a, target=other)
    run_distributed(
        2, _save_in, layout={"tp": 2}, optim="adamw8bit", stage=None, source=other, target=other_again
    )
    for first, second in ((a, again), (other, other_again)):  # byte-identical shards in the same layout
        first, second = checkpoint.read_manifest(first), checkpoint.read_manifest(second)
        assert first["units"], "the 8-bit codes must be saved as units"
        shards = [f for f in first["files"] if f.startswith("shard-")]
        assert [first["files"][f]["sha256"] for f in shards] == [second["files"][f]["sha256"] for f in shards]
    expected, got = _weights_and_state(Path(a)), _weights_and_state(Path(other))
    for key, value in expected.items():
        if key.endswith(("exp_avg", "exp_avg_sq")):
            assert (got[key] - value).abs().max() <= 0.01 * value.abs().max(), key
        else:
            assert torch.equal(got[key], value), key


def _consolidated_roundtrip() -> list[float]:
    with grid(dp=2) as topo:
        model, opt = _build(topo, "adamw", 2)
        _train(model, opt, 2, topo.dp_rank, 2)
        full = opt.consolidated_state_dict()
        params = [p for g in opt.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            full[i]["master"] = p.detach().clone()
            full[i]["step"] = torch.tensor(2.0)
        torch.manual_seed(5)
        fresh = MLATransformer(CONFIG)  # one process: one chunk holds every bucket
        single = ZeroOptimizer(fresh.parameters(), torch.optim.AdamW, 1, None, False, 0.002, lr=1e-2)
        single.load_consolidated_state_dict(full)
        again = single.consolidated_state_dict()
        for i, p in enumerate(fresh.parameters()):
            assert torch.equal(p, params[i])
            for name in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(again[i][name], full[i][name]), (i, name)
        return [float(single.inner.state[m]["step"]) for m in single.masters]


def test_zero_load_consolidated_state_dict_inverts_consolidated_state_dict():
    """dp=2 ZeRO-2 chunks, consolidated, re-cut into one rank's chunks: same state, same parameters."""
    for steps in run_distributed(2, _consolidated_roundtrip):
        assert set(steps) == {2.0}


def _tiny_checkpoints(root: Path, steps: list[int]) -> None:
    model, opt = _build(None, "adamw", None)
    _train(model, opt, 1)
    for step in steps:
        checkpoint.save(root / checkpoint.step_name(step), model, opt, step=step)


def test_find_latest_skips_incomplete_truncated_and_corrupted_checkpoints_saying_why(tmp_path):
    _tiny_checkpoints(tmp_path, [1, 2, 3, 4])
    assert (tmp_path / "latest").read_text().strip() == "step-00000004"
    (tmp_path / "step-00000005.tmp").mkdir()  # a save killed before its commit
    shard = tmp_path / "step-00000004" / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    shard = tmp_path / "step-00000003" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, another SHA-256
    shard.write_bytes(bytes(data))
    (tmp_path / "step-00000002" / "manifest.json").unlink()
    found, notes = checkpoint.find_latest(tmp_path)
    assert found == tmp_path / "step-00000001"
    assert len(notes) == 4
    assert "step-00000005.tmp" in notes[0] and "incomplete" in notes[0]
    assert "step-00000004" in notes[1] and "truncated" in notes[1]
    assert "step-00000003" in notes[2] and "SHA-256" in notes[2]
    assert "step-00000002" in notes[3] and "no manifest.json" in notes[3]
    assert checkpoint.verify(found) is None


def test_prune_keeps_the_newest_and_removes_leftovers(tmp_path):
    _tiny_checkpoints(tmp_path, [1, 2, 3])
    (tmp_path / "step-00000004.tmp").mkdir()
    checkpoint.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002", "step-00000003"]


def test_manifest_describes_every_tensor_and_file(tmp_path):
    run_distributed(
        2,
        _save_in,
        layout={"tp": 2},
        optim="adamw8bit",
        stage=None,
        source=None,
        target=str(tmp_path / "c"),
        train=True,
    )
    manifest = checkpoint.read_manifest(tmp_path / "c")
    assert manifest["layout"] == {
        "world_size": 2,
        "dp": 1,
        "cp": 1,
        "tp": 2,
        "pp": 1,
        "ep": 1,
        "model_chunks": 1,
        "zero_stage": None,
        "optimizer": "AdamW8bit",
    }
    embed = manifest["tensors"]["param/model.embed_tokens.weight"]
    assert embed["shape"] == [131, 32] and embed["dtype"] == "float32"
    assert sorted(p["index"] for p in embed["pieces"]) == [[[0, 66], [0, 32]], [[66, 131], [0, 32]]]
    norm = manifest["tensors"]["param/model.norm.weight"]
    assert len(norm["pieces"]) == 1, "replicated tensors are written by one rank"
    on_disk = {p.name for p in (tmp_path / "c").iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk


# ---------------------------------------------------------------------------------------- the trainer

TRAIN = [
    "model.hidden_size=32",
    "model.num_layers=4",
    "model.num_heads=4",
    "model.q_lora_rank=16",
    "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=8",
    "model.qk_rope_head_dim=4",
    "model.v_head_dim=8",
    "model.intermediate_size=64",
    "model.max_seq_len=32",
    "data.vocab_size=300",
    "data.seq_len=16",
    "data.max_corpus_mb=0.2",
    "train.global_batch_size=4",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "optim.lr=1e-3",
    "optim.warmup_steps=0",
    "train.steps=6",
    "train.save_every=3",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    from train.data import prepare_dataset

    cache = tmp_path_factory.mktemp("ckpt-token-cache")
    prepare_dataset(
        "stdlib",
        tokenizer=None,
        vocab_size=300,
        cache_dir=str(cache),
        max_corpus_mb=0.2,
        val_fraction=0.05,
        is_builder=True,
        barrier=lambda: None,
    )
    return str(cache)


def _train_once(args: list[str], nan: dict | None = None) -> dict | str:
    """train_once in this process (a pooled rank, or the test process): its summary, or the message of
    the NonFiniteError it raised. `nan={"step": k, "rank": r}` makes step k NaN on global rank r."""
    import torch.distributed as dist

    from train.config import load_config
    from train.faults import FaultPlan, NonFiniteError
    from train.trainer import train_once

    rank = dist.get_rank() if dist.is_initialized() else 0
    faults = FaultPlan(nan_step=nan["step"]) if nan and nan["rank"] == rank else None
    try:
        return train_once(load_config(None, args), faults=faults)
    except NonFiniteError as error:
        return str(error)


def _losses(out_dir: Path, first: int = 0) -> list[tuple[int, float, float]]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records if "split" not in r and r["step"] > first]


def test_resume_auto_skips_a_corrupted_checkpoint_says_why_and_continues_exactly(cache_dir, tmp_path, capfd):
    """fp16 with loss scaling and ZeRO in one process; the newest checkpoint is corrupted."""
    common = [*TRAIN, f"data.cache_dir={cache_dir}", "train.precision=fp16", "distributed.zero_stage=1"]
    reference = _train_once([*common, f"train.out_dir={tmp_path / 'ref'}"])
    run = tmp_path / "run"
    _train_once([*common, f"train.out_dir={run}", "train.steps=6"])
    shard = run / "checkpoints" / "step-00000006" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    capfd.readouterr()
    resumed = _train_once([*common, f"train.out_dir={run}", "train.resume=auto"])
    out, err = capfd.readouterr()
    assert "skipping checkpoint" in err and "step-00000006" in err and "SHA-256" in err
    assert "resumed from" in out and "step-00000003" in out
    assert _losses(run) == _losses(tmp_path / "ref")
    assert [h["loss_scale"] for h in resumed["history"]] == [h["loss_scale"] for h in reference["history"]]
    assert (run / "final" / "model.safetensors").read_bytes() == (
        tmp_path / "ref" / "final" / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize(
    "layout",
    [
        [
            "distributed.dp=2",
            "distributed.zero_stage=3",
            "train.precision=bf16",
            "distributed.offload_optimizer=true",
        ],
        # v_head_dim=32: o_proj's 128 input columns split into whole NF4 blocks of 64 at tp=2
        [
            "distributed.tp=2",
            "lora.enabled=true",
            "lora.quantize_base=nf4",
            "optim.name=adamw8bit",
            "model.v_head_dim=32",
        ],
        [
            "distributed.pp=2",
            "distributed.pp_schedule=interleaved_1f1b",
            "distributed.virtual_stages=2",
            "train.micro_batch_size=2",
            "model.dropout=0.1",  # the masks after the resume come from the restored RNG states
        ],
    ],
    ids=["zero3-bf16-offload", "tp2-qlora-8bit", "pp2-interleaved-dropout"],
)
def test_resume_through_the_trainer_in_the_same_layout_is_bit_for_bit(layout, cache_dir, tmp_path):
    args = [*TRAIN, f"data.cache_dir={cache_dir}", *layout]
    run_distributed(2, _train_once, [*args, f"train.out_dir={tmp_path / 'ref'}"])
    source = f"train.resume={tmp_path / 'ref' / 'checkpoints' / 'step-00000003'}"
    run_distributed(2, _train_once, [*args, f"train.out_dir={tmp_path / 'run'}", source])
    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref", first=3)
    final = (tmp_path / "run" / "final" / "model.safetensors").read_bytes()
    assert final == (tmp_path / "ref" / "final" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def tp2_reference(cache_dir, tmp_path_factory):
    """Uninterrupted tp=2 runs (checkpoints at steps 3 and 6), by optimizer, made on first use."""
    made = {}

    def get(optim: str) -> Path:
        if optim not in made:
            out = tmp_path_factory.mktemp(f"tp2-{optim}")
            args = [f"data.cache_dir={cache_dir}", f"train.out_dir={out}", "distributed.tp=2"]
            run_distributed(2, _train_once, [*TRAIN, *args, f"optim.name={optim}"])
            made[optim] = out
        return made[optim]

    return get


@pytest.mark.parametrize(
    "layout",
    [
        ["distributed.dp=2"],
        [
            "distributed.pp=2",
            "distributed.pp_schedule=interleaved_1f1b",
            "distributed.virtual_stages=2",
            "train.micro_batch_size=2",
        ],
        ["distributed.dp=2", "distributed.zero_stage=2", "optim.name=adamw8bit"],
    ],
    ids=["dp2", "pp2-interleaved", "dp2-zero2-8bit"],
)
def test_checkpoint_of_tp2_resumes_under_another_layout(layout, cache_dir, tp2_reference, tmp_path):
    """The loss after resuming at step 3 follows the uninterrupted tp=2 run to 1e-5 (fp32 summation
    order; gradient norms to 1e-4). With 8-bit moments, re-quantized in the new layout's blocks, 1e-4
    (1e-3 for gradient norms): measured 5e-6 and 2e-4 two steps later."""
    eight_bit = "optim.name=adamw8bit" in layout
    reference = tp2_reference("adamw8bit" if eight_bit else "adamw")
    source = f"train.resume={reference}/checkpoints/step-00000003"
    args = [*TRAIN, f"data.cache_dir={cache_dir}", f"train.out_dir={tmp_path}", source, *layout]
    run_distributed(2, _train_once, args)
    got, expected = _losses(tmp_path), _losses(reference, first=3)
    assert [s for s, _, _ in got] == [4, 5, 6]
    rel = 1e-4 if eight_bit else 1e-5
    for (_, loss, norm), (_, loss_ref, norm_ref) in zip(got, expected, strict=True):
        assert loss == pytest.approx(loss_ref, rel=rel)
        assert norm == pytest.approx(norm_ref, rel=rel * 10)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_nan_on_one_rank_is_seen_by_every_rank(policy, cache_dir, tmp_path):
    """NaN loss and gradients on rank 1 only, at step 2 of a dp=2 run."""
    args = [*TRAIN, f"data.cache_dir={cache_dir}", f"train.out_dir={tmp_path}", "distributed.dp=2"]
    nan = {"step": 2, "rank": 1}
    results = run_distributed(2, _train_once, [*args, f"train.on_nonfinite={policy}", "train.steps=4"], nan)
    if policy == "raise":
        assert all(isinstance(r, str) and "at step 2" in r for r in results), results
        return
    records = {r["step"]: r for r in results[0]["history"]}
    assert records[2]["skipped_nonfinite"] == 1 and records[4]["skipped_nonfinite"] == 1
    assert all(records[s]["loss"] == records[s]["loss"] for s in (1, 3, 4)), "only step 2 is NaN"


def test_export_writes_a_merged_hugging_face_folder(cache_dir, tmp_path):
    """Exported weights equal the run's own `final/` (LoRA merged at the same step) to 1e-7: the same
    merge W + s B A, computed once per whole tensor instead of per TP shard."""
    from safetensors.torch import load_file

    from models.deepseek import load_pretrained
    from train.export import export

    run = tmp_path / "run"
    args = [*TRAIN, f"data.cache_dir={cache_dir}", f"train.out_dir={run}", "train.steps=2"]
    run_distributed(2, _train_once, [*args, "lora.enabled=true", "optim.lr=1e-2", "distributed.tp=2"])
    out = export(run, tmp_path / "hf")
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    exported, final = load_file(out / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert exported.keys() == final.keys() and not any("lora" in name for name in exported)
    for name, value in final.items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=1e-7, msg=name)
    assert load_pretrained(out).config.vocab_size == 300


def test_a_tp2_qlora_checkpoint_resumes_at_tp1_to_1e5(cache_dir, tmp_path):
    """NF4 bases are rebuilt at load, in blocks of the full weight whatever the layout: the dp=2 resume of
    a tp=2 QLoRA run follows it to 1e-5 (fp32 summation order). init_std=0.3 makes the quantized bases
    matter (with 0.02 the residual stream hides them): per-shard double quantization then moves it by
    more than 1e-5."""
    qlora = ["lora.enabled=true", "lora.quantize_base=nf4", "model.v_head_dim=32", "model.init_std=0.3"]
    qlora += ["optim.lr=1e-2"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    args = [*TRAIN, f"data.cache_dir={cache_dir}", *qlora]
    run_distributed(2, _train_once, [*args, f"train.out_dir={ref}", "distributed.tp=2"])
    source = f"train.resume={ref}/checkpoints/step-00000003"
    run_distributed(2, _train_once, [*args, f"train.out_dir={run}", "distributed.dp=2", source])
    got, expected = _losses(run), _losses(ref, first=3)
    assert [s for s, _, _ in got] == [4, 5, 6]
    for (_, loss, _), (_, loss_ref, _) in zip(got, expected, strict=True):
        assert loss == pytest.approx(loss_ref, rel=1e-5)
