"""Kill tests of the bad-input suite: SIGKILL at several points of train, eval and study
(including during a checkpoint write), then the same command again, compared with an
uninterrupted run: the final weights and metrics must be identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from test_bad_inputs import TINY_EVAL, _adapter, _train_argv, log_outcome, run_cli

KILLER = '''
import os, signal, sys
from stayaligned import cli
point, argv = sys.argv[1], sys.argv[2:]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point.startswith("train-step-"):
    from stayaligned.training.trainer import StayTrainer
    step, original = int(point.rsplit("-", 1)[1]), StayTrainer.training_step
    def training_step(self, *a, **k):
        if self.state.global_step == step:
            die()
        return original(self, *a, **k)
    StayTrainer.training_step = training_step
elif point.startswith("checkpoint-write-"):
    from transformers import Trainer
    step, original = int(point.rsplit("-", 1)[1]), Trainer._save_rng_state
    def save_rng_state(self, output_dir):
        if self.state.global_step == step:
            die()  # the model and optimizer of this checkpoint are written, the rest is not
        return original(self, output_dir)
    Trainer._save_rng_state = save_rng_state
elif point == "eval-after-batch":
    from stayaligned.evaluation import run
    original = run.write_jsonl
    def write_jsonl(path, rows):
        original(path, rows)
        if path.name == "generations.jsonl":
            die()
    run.write_jsonl = write_jsonl
sys.exit(cli.main(argv))
'''


def kill_run(point: str, argv: list[str]) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", KILLER, point, *argv], env=env,
                          capture_output=True, text=True, timeout=600).returncode


def _study_argv(tmp_path, model_dir, name) -> list[str]:
    return ["study", f"model.name={model_dir}", f"output_dir={tmp_path / name}", "align=null",
            "evaluate_seed=false", "depth.enabled=false", "cells=[{name: sft}]",
            "train={data: [{source: demo-arithmetic, limit: 8}], optim: {max_steps: 4, "
            "batch_size: 2, lr: 1.0e-2}, lora: {r: 2, alpha: 4}, save_steps: 2, max_length: 128}",
            "eval={benchmarks: [{name: demo-harmful, limit: 4}, {name: demo-arithmetic, "
            "split: test, kind: task, limit: 4}], generation: {max_new_tokens: 3, batch_size: 2}}"]


def _max_diff(a: dict, b: dict) -> float | str:
    if a.keys() != b.keys():
        return f"different tensors: {sorted(set(a) ^ set(b))[:4]}"
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_kill_9_in_training_and_checkpoint_write_then_resume(tmp_path, tiny_model_dir, capsys):
    argv = _train_argv(tmp_path / "ref", tiny_model_dir, "save_steps=2", "optim.max_steps=5")
    assert run_cli(argv, capsys)[0] == 0
    reference = _adapter(tmp_path / "ref" / "run")
    for point in ("train-step-3", "checkpoint-write-4"):
        argv = _train_argv(tmp_path / point, tiny_model_dir, "save_steps=2", "optim.max_steps=5")
        assert kill_run(point, argv) == -9
        assert not (tmp_path / point / "run" / "adapter").exists()
        code, err = run_cli([*argv, "--resume"], capsys)
        manifest = json.loads((tmp_path / point / "run" / "run.json").read_text())
        resumed = _adapter(tmp_path / point / "run")
        ok = (code == 0 and manifest["resumed_from"].endswith("checkpoint-2")
              and _same_weights(reference, resumed))
        log_outcome(f"kill/train-{point}", "kill_identical" if ok else "kill_different", err)
        # what differed, for a failure seen once in a fresh-clone `make test` (not reproduced)
        assert ok, (f"{point}: exit {code}, resumed_from {manifest.get('resumed_from')}, "
                    f"largest weight difference {_max_diff(reference, resumed)}\n{err[-2000:]}")


def test_kill_9_in_evaluation_then_rerun(tmp_path, tiny_model_dir, capsys):
    argv = ["eval", f"model.name={tiny_model_dir}", "benchmarks=[{name: demo-harmful, limit: 6}]",
            *TINY_EVAL]
    assert run_cli([*argv, f"output_dir={tmp_path / 'ref'}"], capsys)[0] == 0
    killed = [*argv, f"output_dir={tmp_path / 'killed'}"]
    assert kill_run("eval-after-batch", killed) == -9
    partial = (tmp_path / "killed" / "generations.jsonl").read_text().splitlines()
    code, err = run_cli(killed, capsys)
    after = (tmp_path / "killed" / "generations.jsonl").read_text().splitlines()
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text())["benchmarks"]
               for d in ("ref", "killed")]
    ok = code == 0 and len(partial) == 4 and after[:4] == partial and metrics[0] == metrics[1]
    log_outcome("kill/eval-after-batch", "kill_identical" if ok else "kill_different", err)
    assert ok, err


def test_kill_9_in_a_study_then_rerun(tmp_path, tiny_model_dir, capsys):
    assert run_cli(_study_argv(tmp_path, tiny_model_dir, "ref"), capsys)[0] == 0
    expected = json.loads((tmp_path / "ref/cells/sft/eval/metrics.json").read_text())["benchmarks"]
    for point in ("train-step-3", "checkpoint-write-2", "eval-after-batch"):
        argv = _study_argv(tmp_path, tiny_model_dir, point)
        assert kill_run(point, argv) == -9
        code, err = run_cli(argv, capsys)
        got = json.loads((tmp_path / point / "cells/sft/eval/metrics.json").read_text())["benchmarks"]
        ok = code == 0 and got == expected
        log_outcome(f"kill/study-{point}", "kill_identical" if ok else "kill_different", err)
        assert ok, err
