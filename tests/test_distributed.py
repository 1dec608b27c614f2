"""Data parallel through accelerate: 2 CPU processes (gloo) reach the same parameters as one
process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ACCELERATE_CPU = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "ddp_cpu.yaml"


# sap's own two-process check (identical δ and probe on both ranks) is in tests/test_sap.py.
# str covers plain sft's data parallel path too (its loss is the same cross-entropy plus λ·STR:
# a wrong gradient sync or data split fails it); sft alone was dropped to keep the suite < 15 min
@pytest.mark.xdist_group("ddp-port")  # torchrun's default port: with test_sap's, in turn
@pytest.mark.parametrize("method", ["str"])
def test_two_process_ddp_matches_single_process(tmp_path, tiny_model_dir, method):
    rows = [{"instruction": f"Add {i} and {i + 1}.", "output": f"{i} + {i + 1} = {2 * i + 1}."}
            for i in range(4)]  # global batch = the whole set: same batch on every step
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    options = {
        "sft": [],
        "str": ["options={str: {n_prompts: 4, max_new_tokens: 8, k_tokens: 8, lam: 1.0, "
                "min_refusal_share: 0}}"],
    }[method]
    common = [f"model.name={tiny_model_dir}", f"data=[{{source: {data}}}]", "optim.lr=1e-2",
              "optim.max_steps=4", "max_length=64", "logging_steps=1",
              "lora.target_modules=[q_proj,v_proj,down_proj]", f"methods=[{method}]", *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "stayaligned.cli", "train", *common,
                    "optim.batch_size=4", f"output_dir={single}"], check=True, env=env)
    ddp = tmp_path / "ddp"
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(ACCELERATE_CPU), "-m", "stayaligned.cli", "train", *common,
                    "optim.batch_size=2", f"output_dir={ddp}"], check=True, env=env)
    a = load_file(str(single / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(ddp / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    moved = [k for k in a if "lora_B" in k and a[k].abs().sum() > 0]
    assert moved, "training did not move the adapters"
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    log = [json.loads(l) for l in (ddp / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 4
    manifest = json.loads((ddp / "run.json").read_text())
    assert manifest["world_size"] == 2
    if method == "str":  # mined once on the main process and shared: same set as one process
        tokens = [json.loads((d / "str_tokens.json").read_text())["token_ids"] for d in (single, ddp)]
        assert tokens[0] == tokens[1] and len(tokens[0]) == 8
        assert any(r.get("loss/str", 0) > 0 for r in log)
