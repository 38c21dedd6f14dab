"""train.config: YAML + dotted overrides -> a checked Config; every mistake is a one-line ConfigError."""

import re

import pytest
import yaml

import train.config as config_module
from train.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def assert_error(overrides, *fragments, path=None):
    """Loading fails with a single-line ConfigError containing every fragment, in order."""
    pattern = ".*".join(re.escape(f) for f in fragments)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(path, overrides)
    assert "\n" not in str(info.value)


# --- loading ------------------------------------------------------------------------------------------


def test_no_file_and_no_overrides_gives_the_defaults():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model == {}
    assert cfg.train.steps == 200
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.lora.targets == ["q_proj", "q_b_proj", "kv_b_proj", "o_proj"]


def test_yaml_file_sets_keys_and_leaves_the_rest_at_defaults(tmp_path):
    path = write_yaml(
        tmp_path / "run.yaml",
        {"model": {"hidden_size": 64}, "train": {"steps": 7}, "distributed": {"tp": 2, "zero_stage": 1}},
    )
    cfg = load_config(path)
    assert cfg.model == {"hidden_size": 64}
    assert cfg.train.steps == 7
    assert (cfg.distributed.tp, cfg.distributed.zero_stage) == (2, 1)
    assert cfg.train.global_batch_size == 16


def test_empty_file_and_empty_section_give_the_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "section.yaml").write_text("train:\n")
    assert load_config(tmp_path / "empty.yaml") == Config()
    assert load_config(tmp_path / "section.yaml") == Config()


def test_override_values_are_read_as_yaml():
    cfg = load_config(
        overrides=["train.steps=10", "optim.betas=[0.9,0.99]", "model.q_lora_rank=null", "data.corpus=/x/y"]
    )
    assert cfg.train.steps == 10
    assert cfg.optim.betas == (0.9, 0.99)
    assert cfg.model == {"q_lora_rank": None}
    assert cfg.data.corpus == "/x/y"


def test_override_beats_file(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"train": {"steps": 7, "seed": 1}})
    cfg = load_config(path, ["train.steps=3"])
    assert (cfg.train.steps, cfg.train.seed) == (3, 1)


def test_later_override_beats_earlier():
    assert load_config(overrides=["train.steps=3", "train.steps=4"]).train.steps == 4


def test_nested_model_override_creates_the_mapping():
    cfg = load_config(
        overrides=[
            "model.rope_scaling.type=yarn",
            "model.rope_scaling.factor=4",
            "model.rope_scaling.original_max_position_embeddings=128",
        ]
    )
    assert cfg.model == {
        "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 128}
    }


def test_nested_model_override_keeps_the_other_keys_of_the_file(tmp_path):
    scaling = {"type": "yarn", "factor": 2, "original_max_position_embeddings": 128}
    path = write_yaml(tmp_path / "run.yaml", {"model": {"rope_scaling": scaling}})
    cfg = load_config(path, ["model.rope_scaling.factor=4"])
    assert cfg.model["rope_scaling"] == {**scaling, "factor": 4}


def test_model_pretrained_is_kept():
    assert load_config(overrides=["model.pretrained=/ckpt/v2-lite"]).model == {"pretrained": "/ckpt/v2-lite"}


def test_exponent_without_a_dot_is_a_float():
    # PyYAML (YAML 1.1) reads `1e-8` as a string; a config must read it as YAML 1.2 does.
    cfg = load_config(overrides=["optim.eps=1e-8", "optim.lr=3e-4"])
    assert cfg.optim.eps == 1e-8 and cfg.optim.lr == 3e-4


def test_integer_for_a_float_field_becomes_a_float():
    cfg = load_config(overrides=["optim.lr=1", "optim.min_lr=0"])
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float


def test_targets_accept_a_comma_separated_string():
    assert load_config(overrides=["lora.targets=q_proj, o_proj"]).lora.targets == ["q_proj", "o_proj"]


def test_config_from_dict_does_not_modify_its_input():
    raw = {"model": {"rope_scaling": {"type": "yarn", "factor": 2, "original_max_position_embeddings": 64}}}
    cfg = config_from_dict(raw)
    cfg.model["rope_scaling"]["factor"] = 8
    assert raw["model"]["rope_scaling"]["factor"] == 2


# --- round trip -----------------------------------------------------------------------------------------


def test_config_to_dict_uses_plain_yaml_types():
    data = config_to_dict(Config())
    assert data["optim"]["betas"] == [0.9, 0.95]
    assert list(data) == ["model", "data", "distributed", "optim", "train", "lora"]
    assert yaml.safe_load(yaml.safe_dump(data)) == data


def test_dump_config_then_load_config_gives_an_equal_config(tmp_path):
    cfg = load_config(
        overrides=[
            "model.rope_scaling={type: yarn, factor: 4.0, original_max_position_embeddings: 128}",
            "model.q_lora_rank=32",
            "optim.betas=[0.8,0.9]",
            "optim.eps=1e-12",
            "train.out_dir='1e3'",  # a string that looks like a float must stay a string
            "train.sample_prompt='def '",
            "lora.quantize_base=nf4",
            "data.tokenizer=tok.json",
        ]
    )
    path = tmp_path / "out" / "config.yaml"
    dump_config(cfg, path)
    assert load_config(path) == cfg


# --- errors ---------------------------------------------------------------------------------------------


def test_unknown_section_is_named_with_a_suggestion():
    assert_error(
        ["trian.steps=1"], "unknown section 'trian'", "did you mean 'train'?", "valid sections: model"
    )


def test_unknown_key_is_named_with_a_suggestion():
    assert_error(["train.stpes=1"], "unknown key 'train.stpes'", "did you mean 'train.steps'?", "train.seed")


def test_unknown_key_without_a_close_match_has_no_suggestion():
    with pytest.raises(ConfigError, match="unknown key 'optim.zzzzzz'; valid keys: optim.name"):
        load_config(overrides=["optim.zzzzzz=1"])


def test_unknown_model_key_is_named():
    assert_error(
        ["model.hiden_size=64"], "unknown key 'model.hiden_size'", "did you mean 'model.hidden_size'?"
    )


@pytest.mark.parametrize(
    "override, fragment, expected",
    [
        ("train.steps='10'", "train.steps='10'", "expected an integer"),
        ("train.steps=true", "train.steps=True", "expected an integer"),
        ("train.steps=10.0", "train.steps=10.0", "expected an integer"),
        ("train.steps=null", "train.steps=None", "expected an integer"),
        ("train.micro_batch_size=2.5", "train.micro_batch_size=2.5", "expected an integer or null"),
        ("optim.lr=fast", "optim.lr='fast'", "expected a number"),
        ("optim.lr=false", "optim.lr=False", "expected a number"),
        ("optim.betas=[0.9]", "optim.betas=[0.9]", "expected a list of 2 numbers"),
        ("optim.betas=0.9", "optim.betas=0.9", "expected a list of 2 numbers"),
        ("distributed.sequence_parallel=1", "distributed.sequence_parallel=1", "expected true or false"),
        ("data.corpus=[a]", "data.corpus=['a']", "expected a string"),
        ("lora.targets=[1, 2]", "lora.targets=[1, 2]", "expected a list of strings"),
        ("model.hidden_size=big", "model.hidden_size='big'", "expected an integer"),
        ("model.rope_scaling=5", "model.rope_scaling=5", "expected a mapping or null"),
        ("model.pretrained=3", "model.pretrained=3", "expected a string or null"),
    ],
)
def test_wrong_type_names_key_value_and_expected_type(override, fragment, expected):
    assert_error([override], fragment, expected)


def test_wrong_type_in_the_file_is_named(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"train": {"steps": "10"}})
    assert_error([], "train.steps='10'", "expected an integer", path=path)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("distributed.backend=mpi", "one of auto, gloo, nccl"),
        ("distributed.zero_stage=4", "one of 0, 1, 2, 3"),
        ("distributed.pp_schedule=zigzag", "one of gpipe, 1f1b, interleaved_1f1b, zb1p"),
        ("optim.name=sgd", "one of adamw, adamw8bit"),
        ("optim.schedule=step", "one of cosine, linear, constant"),
        ("train.precision=fp8", "one of fp32, bf16, fp16"),
        ("lora.quantize_base=int4", "one of nf4"),
    ],
)
def test_bad_enum_value_lists_the_allowed_values(override, expected):
    key, value = override.split("=")
    assert_error([override], f"{key}={yaml.safe_load(value)!r}: expected {expected}")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.steps=0", "a value >= 1"),
        ("train.global_batch_size=-4", "a value >= 1"),
        ("train.micro_batch_size=0", "a value >= 1"),
        ("train.eval_every=-1", "a value >= 0"),
        ("train.grad_clip=-1.0", "a value >= 0"),
        ("data.seq_len=0", "a value >= 1"),
        ("data.val_fraction=0.0", "a value in (0, 0.5]"),
        ("data.val_fraction=0.6", "a value in (0, 0.5]"),
        ("distributed.tp=0", "a value >= 1"),
        ("distributed.bucket_cap_mb=0", "a value > 0"),
        ("optim.lr=0", "a value > 0"),
        ("optim.eps=-1e-8", "a value > 0"),
        ("optim.weight_decay=-0.1", "a value >= 0"),
        ("optim.betas=[0.9, 1.0]", "two numbers in [0, 1)"),
        ("lora.r=0", "a value >= 1"),
        ("lora.dropout=1.0", "a value in [0, 1)"),
        ("lora.targets=[]", "at least one module name"),
    ],
)
def test_out_of_range_value_names_key_value_and_range(override, expected):
    key = override.split("=")[0]
    assert_error([override], f"{key}=", f": expected {expected}")


def test_min_lr_above_lr_is_rejected():
    assert_error(["optim.lr=0.001", "optim.min_lr=0.01"], "optim.min_lr=0.01", "<= optim.lr (0.001)")


def test_micro_batch_larger_than_global_batch_is_rejected():
    assert_error(
        ["train.global_batch_size=8", "train.micro_batch_size=16"],
        "train.micro_batch_size=16",
        "<= train.global_batch_size (8)",
    )


@pytest.mark.parametrize("override", ["train.steps", "steps=10", ".steps=10", "train.=10", "=10"])
def test_malformed_override_shows_the_expected_form(override):
    assert_error([override], f"override {override!r}", "expected section.key=value")


def test_nested_override_outside_model_is_rejected():
    assert_error(["train.steps.max=3"], "override 'train.steps.max=3'", "only in the model section")


def test_nested_override_into_a_non_mapping_is_rejected():
    assert_error(
        ["model.hidden_size=64", "model.hidden_size.x=1"], "model.hidden_size=64", "expected a mapping"
    )


def test_override_with_invalid_yaml_is_rejected():
    assert_error(["optim.betas=[0.9,"], "override 'optim.betas=[0.9,'", "not valid YAML")


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert_error([], f"config file '{missing}'", "no such file", path=missing)


def test_file_that_is_not_a_mapping_is_rejected(tmp_path):
    path = write_yaml(tmp_path / "list.yaml", [1, 2])
    assert_error([], "expected a mapping of sections", "got list", path=path)


def test_section_that_is_not_a_mapping_is_rejected(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"train": 5})
    assert_error([], "train=5: expected a mapping of keys", path=path)


def test_invalid_yaml_file_gives_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: [1,\n")
    assert_error([], f"config file '{path}': invalid YAML", path=path)


def test_mla_config_error_is_a_config_error():
    assert_error(["model.qk_rope_head_dim=15"], "model.qk_rope_head_dim=15", "even")


def test_malformed_value_inside_rope_scaling_names_the_key():
    overrides = [
        "model.rope_scaling.type=yarn",
        "model.rope_scaling.original_max_position_embeddings=128",
        "model.rope_scaling.factor=[4]",
    ]
    assert_error(overrides, "model.rope_scaling={", "'factor': [4]")


def test_deprecated_activation_checkpointing_key_still_works_and_says_so():
    with pytest.warns(FutureWarning, match="distributed.recompute"):
        config_module._warned_deprecated.clear()
        cfg = load_config(overrides=["distributed.activation_checkpointing=selective"])
    assert cfg.distributed.recompute == "selective"
    assert (
        load_config(overrides=["distributed.activation_checkpointing=true"]).distributed.recompute == "full"
    )


def test_deprecated_key_and_its_new_name_together_are_an_error():
    with pytest.raises(
        ConfigError, match="distributed.activation_checkpointing.*give only distributed.recompute"
    ):
        load_config(overrides=["distributed.activation_checkpointing=full", "distributed.recompute=full"])
