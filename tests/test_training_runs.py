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
