"""bench/overhead.py --study: each training cell of a study is measured as the study trains it
(its regime, precision and overrides; repair cells have no training), and the meta names the
study so that its report matches the entries by cell name."""

from __future__ import annotations

import json

from conftest import load_bench
from test_study import study_config


def test_study_mode_trains_each_cell_as_the_study_does(tmp_path, tiny_model_dir):
    import yaml

    from stayaligned.config import to_dict

    cfg = study_config(tmp_path, tiny_model_dir, "study", "model.precision=bf16",
                       "cells=[{name: sft}, {name: safe, train: {template: 'native:safe'}}, "
                       "{name: fix, repair: {of: sft, method: merge}}, "
                       "{name: mix, methods: [str, safety_mix], options: {safety_mix: {n: 4}}}]")
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    overhead = load_bench("overhead")
    files = overhead.study_configs(str(config), tmp_path)
    assert list(files) == ["sft", "safe", "mix"]  # no training in a repair cell
    cells = {name: json.loads(path.read_text()) for name, path in files.items()}
    # the study has not aligned its seed here: the seed model, same shapes
    assert {c["model"]["name"] for c in cells.values()} == {str(tiny_model_dir)}
    assert all(c["model"]["precision"] == "bf16" and c["lora"]["r"] == 2 for c in cells.values())
    assert all(c["optim"]["lr"] == 1.0e-2 and c["save_steps"] >= 10**6 for c in cells.values())
    assert cells["safe"]["template"] == "native:safe" and cells["sft"]["template"] != "native:safe"
    assert cells["mix"]["methods"] == ["str", "safety_mix"]
    assert cells["mix"]["options"]["safety_mix"]["n"] == 4
    meta = overhead.study_meta(str(config))
    assert meta["study"] == cfg.name and meta["model"].endswith("(bf16), LoRA")
