"""Config loading: YAML + dotted overrides, unknown keys rejected with the valid ones listed."""

from __future__ import annotations

from pathlib import Path

import pytest

from stayaligned.config import AlignConfig, ConfigError, EvalConfig, TrainConfig, load, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 2.0e-4\n  batch_size: 4\ndata:\n  - source: gsm8k\n    limit: 10\n")
    cfg = load(TrainConfig, path, ["optim.lr=5e-5", "data.0.limit=20", "lora.target_modules=[q_proj]"])
    assert cfg.optim.lr == 5e-5 and cfg.optim.batch_size == 4 and cfg.optim.epochs == 1.0
    assert cfg.data[0].source == "gsm8k" and cfg.data[0].limit == 20
    assert cfg.lora.target_modules == ("q_proj",)


def test_unknown_key_lists_valid_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 1e-4\n")
    with pytest.raises(ConfigError) as err:
        load(TrainConfig, path)
    message = str(err.value)
    assert "bad.yaml" in message and "optim" in message and "learning_rate" in message
    assert "lr" in message and "batch_size" in message


def test_wrong_types_and_bad_overrides():
    with pytest.raises(ConfigError, match="optim.batch_size: expected int"):
        load(TrainConfig, None, ["optim.batch_size=big"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load(TrainConfig, None, ["optim.lr"])
    with pytest.raises(ConfigError, match="not an index"):
        load(TrainConfig, None, ["data.3.limit=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load(TrainConfig, "nowhere.yaml")


def test_align_defaults_differ_from_train_and_round_trip():
    align = AlignConfig()
    assert [d.source for d in align.data] == ["demo-safety", "demo-helpful"] and align.merge
    assert load(AlignConfig, None, []) == align
    assert load(EvalConfig, None, [f"{k}={v}" for k, v in [("seed", 3)]]).seed == 3
    assert isinstance(to_dict(align)["data"], list)


RUN_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_example_configs_load_and_open_with_their_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# stayaligned "), first
    if path.parent.name == "study":  # every stage's config builds and every cell's methods stack
        from stayaligned.config import StudyConfig
        from stayaligned.methods import METHODS
        from stayaligned.methods.base import build_methods
        from stayaligned.study import plan

        study = load(StudyConfig, path)
        align = (study.align or {}).get("config")
        if align and not (CONFIGS.parent / align).is_file():  # a config another branch adds
            pytest.skip(f"{path.name} aligns with {align}, which is not in this checkout yet")
        assert plan(study)
        for cell in study.cells:
            assert build_methods(cell.methods, cell.options, 0, METHODS)
        return
    kind = {"align": AlignConfig, "train": TrainConfig, "eval": EvalConfig}[path.parent.name]
    cfg = load(kind, path)
    if kind is not EvalConfig:  # methods and their option blocks are valid and stack
        from stayaligned.methods import METHODS
        from stayaligned.methods.base import build_methods

        assert build_methods(cfg.methods, cfg.options, cfg.seed, METHODS)


@pytest.mark.parametrize("path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_name_their_launch_command(path):
    import yaml

    text = path.read_text()
    assert text.startswith(f"# accelerate launch --config_file configs/accelerate/{path.name}")
    assert yaml.safe_load(text)["distributed_type"] in {"MULTI_GPU", "DEEPSPEED", "FSDP"}


def test_a_config_recorded_before_new_keys_existed_compares_equal():
    from stayaligned.config import EvalConfig, TrainConfig, load, to_dict
    from stayaligned.fingerprint import differences

    cfg = load(TrainConfig, None, ["optim.lr=3e-4", "methods=[sft,ptst]"])
    defaults = to_dict(TrainConfig())
    recorded = to_dict(cfg)
    for key in ("loss_on", "report_to", "trainer_args", "push_to_hub"):
        del recorded[key]  # as in a run.json written before these keys were added
    del recorded["optim"]["warmup_ratio"], recorded["model"]["attn_implementation"]
    assert recorded != to_dict(cfg) and differences(recorded, to_dict(cfg), defaults) == []
    changed = {**recorded, "loss_on": "last_turn"}
    assert differences(changed, to_dict(cfg), defaults) == ["loss_on"]
    evaluation = to_dict(EvalConfig())
    del evaluation["model"]["attn_implementation"]
    assert differences(evaluation, to_dict(EvalConfig()), to_dict(EvalConfig())) == []
