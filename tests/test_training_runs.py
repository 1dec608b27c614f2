"""run.py around the trainer: each data-parallel process loads onto its own GPU, --resume
refuses changed data, and the output directory is cleared by one process."""

from __future__ import annotations

import pytest

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
