"""run.py around the trainer: each data-parallel process loads onto its own GPU, --resume
refuses changed data, and the output directory is cleared by one process."""

from __future__ import annotations

import shutil

import pytest
import torch

from stayaligned.training import run


def test_each_data_parallel_process_loads_onto_its_own_gpu(monkeypatch):
    import torch

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    run.bind_local_device("cuda")
    assert chosen == [3]
    run.bind_local_device("cpu")  # CPU runs (gloo) have no CUDA device to pick
    monkeypatch.delenv("LOCAL_RANK")
    run.bind_local_device("cuda")  # one process: the default device
    assert chosen == [3]


def test_the_device_is_bound_before_the_model_is_loaded(tmp_path, tiny_model_dir, monkeypatch):
    from test_training_scaling import config

    order = []

    class Loaded(Exception):
        pass

    def load(*args, **kwargs):
        order.append("load")
        raise Loaded

    monkeypatch.setattr(run, "bind_local_device", lambda device: order.append(("bind", device)))
    monkeypatch.setattr(run, "load_model", load)
    with pytest.raises(Loaded):
        run.train(config(tmp_path, tiny_model_dir))
    assert order == [("bind", "cpu"), "load"]


def test_resume_refuses_a_changed_data_file_naming_it_and_the_fix(tmp_path, tiny_model_dir):
    from test_training_scaling import config

    from stayaligned.fingerprint import StaleError

    cfg = config(tmp_path, tiny_model_dir, "save_steps=1")
    run.train(cfg)
    data = tmp_path / "task.jsonl"
    data.write_text(data.read_text().replace("Add 0 and 1.", "Add 0 and 2."))
    with pytest.raises(StaleError, match=r"data\.0\.files_sha256\.task\.jsonl.*--overwrite"):
        run.train(cfg, resume=True)
    # the data the run started on resumes (a moved file of the same name and content too)
    data.write_text(data.read_text().replace("Add 0 and 2.", "Add 0 and 1."))
    run.train(cfg, resume=True)


def test_only_the_main_process_clears_the_output_dir_and_staging(tmp_path, monkeypatch):
    out = tmp_path / "run"
    staging = out / "checkpoints" / ".staging"
    (staging / "checkpoint-4").mkdir(parents=True)
    done = out / "checkpoints" / "checkpoint-2"
    done.mkdir()
    (done / "trainer_state.json").write_text("{}")
    (out / "run.json").write_text("{}")
    monkeypatch.setenv("RANK", "1")  # another data-parallel process: it leaves both alone
    assert run.last_complete_checkpoint(out / "checkpoints") == str(done)
    assert staging.is_dir()
    assert run._check_output_dir(out, resume=False, overwrite=True) is None
    assert (out / "run.json").is_file()
    monkeypatch.setenv("RANK", "0")
    assert run.last_complete_checkpoint(out / "checkpoints") == str(done)
    assert not staging.exists()
    run._check_output_dir(out, resume=False, overwrite=True)
    assert not (out / "run.json").exists()


def test_checkpoint_staging_waits_for_every_process(tmp_path, tiny_model_dir, monkeypatch):
    # rank 0 clears staging, then all ranks write, then rank 0 renames: a barrier between each
    from transformers import Trainer

    from test_training_scaling import build, config

    cfg = config(tmp_path, tiny_model_dir, "save_steps=1")
    trainer, model, tok = build(cfg, tmp_path)
    events = []
    monkeypatch.setattr(trainer.accelerator, "wait_for_everyone", lambda: events.append("barrier"))
    real_save = Trainer._save_checkpoint

    def save(self, *args, **kwargs):
        events.append("write")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_save_checkpoint", save)
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    trainer.state.global_step = 1
    trainer._save_checkpoint(model, None)
    assert events == ["barrier", "write", "barrier"]
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-1" / "trainer_state.json").is_file()


def test_a_run_from_a_base_remade_in_place_is_stale(tmp_path):
    """A fine-tune of a stayaligned run (a study's aligned seed) deleted and retrained in
    place: the new base keeps its weights' size and header, all a large file's identity
    holds, so its run.json is what tells that the fine-tune was made from the old one (a
    study reused such cells silently); runs recorded before `model_record` pass."""
    from stayaligned.config import ModelConfig, TrainConfig, to_dict
    from stayaligned.fingerprint import StaleError, model_identity, run_record
    from stayaligned.runfiles import write_json
    from stayaligned.training.run import check_same_run

    base = tmp_path / "aligned"
    (base / "model").mkdir(parents=True)
    (base / "model" / "config.json").write_text('{"model_type": "llama"}')
    (base / "model" / "model.safetensors").write_bytes(b"weights")
    (base / "run.json").write_text('{"status": "complete", "train_seconds": 10.0}')
    cfg = TrainConfig(model=ModelConfig(name=str(base)), output_dir=str(tmp_path / "sft"))
    fingerprint = {"model": model_identity(str(base)), "model_record": run_record(str(base))}
    write_json(tmp_path / "sft" / "run.json", {"config": to_dict(cfg), "fingerprint": fingerprint})
    check_same_run(cfg, "fix")
    (base / "run.json").write_text('{"status": "complete", "train_seconds": 12.0}')  # retrained
    with pytest.raises(StaleError, match=r"sft/run.json was made with a different setup "
                       r"\(changed: model_record.sha256\); fix"):
        check_same_run(cfg, "fix")
    check_same_run(cfg, "fix", model=False)  # a run whose own weights are archived
    del fingerprint["model_record"]
    write_json(tmp_path / "sft" / "run.json", {"config": to_dict(cfg), "fingerprint": fingerprint})
    check_same_run(cfg, "fix")


def test_keep_checkpoints_false_deletes_them_once_complete_without_making_runs_stale(
        tmp_path, tiny_model_dir, capsys):
    import json

    from test_training_scaling import config

    from stayaligned.runfiles import file_sha256

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # the default keeps them (the final step is saved too)
    kept = run.train(config(tmp_path / "a", tiny_model_dir, "save_steps=1", "optim.max_steps=3"))
    assert sorted(p.name for p in (kept / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-2", "checkpoint-3"]
    # a run made before the key existed (its run.json lacks it), later configured to drop
    # its checkpoints: the same run, so --resume neither trains nor rewrites run.json; it
    # deletes the checkpoints and writes nothing else
    manifest = json.loads((kept / "run.json").read_text())
    del manifest["config"]["keep_checkpoints"]
    (kept / "run.json").write_text(json.dumps(manifest))
    before = {p.name: file_sha256(p) for p in kept.rglob("*") if p.is_file()
              and "checkpoints" not in p.parts}
    capsys.readouterr()
    lean = config(tmp_path / "a", tiny_model_dir, "save_steps=1", "optim.max_steps=3",
                  "keep_checkpoints=false")
    run.check_same_run(lean, "fix")  # not stale
    assert run.train(lean, resume=True) == kept
    assert "holds a complete run (3 steps); nothing to resume" in capsys.readouterr().out
    assert not list((kept / "checkpoints").glob("checkpoint-*"))
    assert before == {p.name: file_sha256(p) for p in kept.rglob("*") if p.is_file()
                      and "checkpoints" not in p.parts}

    # a new run with keep_checkpoints false ends with its weights and no checkpoint
    out = run.train(config(tmp_path / "b", tiny_model_dir, "save_steps=1", "optim.max_steps=3",
                           "keep_checkpoints=false"))
    assert run.is_complete(out) and (out / "model" / "model.safetensors").is_file()
    assert (out / "checkpoints").is_dir() and not list((out / "checkpoints").iterdir())
    assert json.loads((out / "run.json").read_text())["config"]["keep_checkpoints"] is False

    # its weights deleted too: run.json's "complete" no longer stands for a finished run, so
    # --resume trains it again (from step 0: no checkpoint is left) to the same weights
    from safetensors.torch import load_file

    reference = load_file(out / "model" / "model.safetensors")
    shutil.rmtree(out / "model")
    capsys.readouterr()
    assert run.train(config(tmp_path / "b", tiny_model_dir, "save_steps=1", "optim.max_steps=3",
                            "keep_checkpoints=false"), resume=True) == out
    said = capsys.readouterr().out
    assert "run.json says complete but model/ (its weights) is missing; training it again" in said
    again = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(again[k], reference[k]) for k in reference) and run.is_complete(out)


def test_an_unfinished_run_keeps_its_checkpoints(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (out / "run.json").write_text('{"status": "running"}')
    assert run.prune_checkpoints(out) == [] and (out / "checkpoints" / "checkpoint-2").is_dir()
    (out / "run.json").write_text('{"status": "complete"}')
    (out / "checkpoints" / "runs").mkdir()  # tensorboard logs stay
    assert run.prune_checkpoints(out) == [out / "checkpoints" / "checkpoint-2"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["runs"]
