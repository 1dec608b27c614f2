"""Resolving model names: plain dirs, run dirs (merged / model / adapter), GGUF files, errors."""

from __future__ import annotations

import json

import pytest
import torch

from stayaligned.config import ConfigError, ModelConfig
from stayaligned.models import ModelError, embedded_gguf_path, pick_device, resolve


def test_plain_directory_and_hub_id(tiny_model_dir):
    assert resolve(ModelConfig(name=str(tiny_model_dir))) == (str(tiny_model_dir), None, None)
    assert resolve(ModelConfig(name="meta-llama/Llama-2-7b-chat-hf")) == (
        "meta-llama/Llama-2-7b-chat-hf", None, None)


def test_run_directories(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(tiny_model_dir)}))
    assert resolve(ModelConfig(name=str(run))) == (str(tiny_model_dir), None, run / "adapter")
    (run / "merged").mkdir()
    (run / "merged" / "config.json").write_text("{}")
    assert resolve(ModelConfig(name=str(run)))[0] == str(run / "merged")  # merged wins


def test_gguf_paths_and_errors(tmp_path):
    gguf = embedded_gguf_path()
    assert resolve(ModelConfig(name=str(gguf))) == (str(gguf.parent), gguf.name, None)
    with pytest.raises(ModelError, match="does not exist"):
        resolve(ModelConfig(name=str(tmp_path / "missing.gguf")))
    with pytest.raises(ModelError, match="holds no model"):
        resolve(ModelConfig(name=str(tmp_path)))


def test_device_choice():
    # float32 weights by default everywhere (CUDA: bf16 autocast on fp32 master weights)
    assert pick_device("auto").dtype == torch.float32
    assert pick_device("float16").dtype == torch.float16
    assert pick_device("auto", "pure_bf16").dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="model.dtype 'float13'"):
        pick_device("float13")


def test_chat_template_kwargs_come_from_the_config_else_the_run_directory(tmp_path,
                                                                         tiny_model_dir):
    """A fine-tune is evaluated (and repaired, and tuned again) with the chat_template_kwargs
    it was trained with: run.json records them and loading the run directory reads them back,
    unless the config sets its own."""
    import shutil

    from stayaligned.models import chat_template_kwargs, load_tokenizer

    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "model")
    assert chat_template_kwargs(ModelConfig(name=str(run))) == {}
    (run / "run.json").write_text(json.dumps(
        {"templates": {"train": "native", "eval": "native",
                       "chat_template_kwargs": {"enable_thinking": False}}}))
    assert load_tokenizer(ModelConfig(name=str(run))).stayaligned_chat_kwargs == {
        "enable_thinking": False}
    assert chat_template_kwargs(ModelConfig(name=str(run), chat_template_kwargs={})) == {}
    assert chat_template_kwargs(ModelConfig(name="org/model",
                                            chat_template_kwargs={"a": 1})) == {"a": 1}
    (run / "run.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"run.json: unreadable.*chat_template_kwargs"):
        chat_template_kwargs(ModelConfig(name=str(run)))


def test_two_processes_converting_one_gguf_convert_it_once(tmp_path, monkeypatch):
    """Two test workers (or two commands on a fresh machine) asking for the embedded model at
    once: the second waits on the lock file and uses the first one's conversion."""
    import threading
    import time

    from stayaligned import models

    calls = []

    def slow_convert(gguf_path, target):
        calls.append(target)
        time.sleep(0.5)
        target.mkdir(parents=True)  # fails if a second conversion reaches the same target
        (target / "config.json").write_text("{}")
        return target

    monkeypatch.setattr(models, "convert_gguf", slow_convert)
    target = tmp_path / "embedded" / "model"
    errors = []

    def convert():
        try:
            models.convert_once(tmp_path / "model.gguf", target)
        except Exception as err:  # noqa: BLE001 - the other thread's failure, reported below
            errors.append(err)

    threads = [threading.Thread(target=convert) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(calls) == 1
    assert (target / "config.json").is_file()
