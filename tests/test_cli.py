"""The real commands, end to end on the tiny model: train, eval, data preview, and errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "stayaligned.cli", *args],
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def test_train_then_eval_end_to_end(tmp_path, tiny_model_dir):
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n"
                            for i in range(6)))
    config = tmp_path / "train.yaml"
    config.write_text(f"# stayaligned train {config}\nmodel:\n  name: {tiny_model_dir}\n"
                      f"data:\n  - source: {data}\n    fields: {{user: question, assistant: answer}}\n"
                      "optim:\n  max_steps: 3\n  batch_size: 2\nsave_steps: 2\n")
    run_dir = tmp_path / "run"
    run("train", str(config), f"output_dir={run_dir}")
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "checkpoint-2").is_dir()
    eval_dir = tmp_path / "eval"
    out = run("eval", f"model.name={run_dir}", f"output_dir={eval_dir}",
              f"benchmarks=[{{name: task, source: {data}, kind: task, split: train,"
              " fields: {user: question, assistant: answer, meta: [answer]}}]",
              "generation.max_new_tokens=4")
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["benchmarks"]["task"]["n"] == 6 and "accuracy" in out.stdout
    assert (eval_dir / "generations.jsonl").is_file() and (eval_dir / "judgments.jsonl").is_file()
    # training the same run again without --resume is refused with advice
    again = run("train", str(config), f"output_dir={run_dir}", check=False)
    assert again.returncode == 2 and "--resume" in again.stderr


def test_data_preview_shows_the_mask(tmp_path, tiny_model_dir):
    out = run("data", "preview", f"model.name={tiny_model_dir}",
              "data=[{source: demo-arithmetic, limit: 2}]", "--n", "1")
    assert "⟦" in out.stdout and "⟧" in out.stdout and "generation prompt" in out.stdout
    assert "<|im_start|>assistant" in out.stdout


def test_errors_name_the_problem(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    result = run("data", "preview", f"model.name={tiny_model_dir}", f"data=[{{source: {bad}}}]",
                 check=False)
    assert result.returncode == 2 and "bad.jsonl" in result.stderr and ":2" in result.stderr
    result = run("train", f"model.name={tiny_model_dir}", "optim.learning_rate=1", check=False)
    assert result.returncode == 2 and "learning_rate" in result.stderr and "lr" in result.stderr
    result = run("data", "preview", f"model.name={tiny_model_dir}", "template=chat:nope", check=False)
    assert result.returncode == 2 and "known templates" in result.stderr


def test_listings():
    assert "advbench" in run("data", "list").stdout
    assert "chat:llama" in run("data", "templates").stdout


def test_depth_command_writes_json_and_plot(tmp_path, tiny_model_dir):
    out = tmp_path / "depth"
    result = run("depth", "--seed", str(tiny_model_dir), "--model", str(tiny_model_dir),
                 "--source", "demo-safety", "--limit", "4", "--tokens", "3", "--output", str(out))
    depth = json.loads((out / "depth.json").read_text())
    assert depth["positions"] == [1, 2, 3] and all(abs(k) < 1e-6 for k in depth["kl_mean"])
    assert (out / "depth.png").stat().st_size > 0 and "KL" in result.stdout


def _parsed(*argv):
    from stayaligned.cli import _split_config, build_parser, normalise_argv

    parser = build_parser()
    args = parser.parse_args(normalise_argv(parser, list(argv)))
    return args, _split_config(args)


def test_flags_and_overrides_in_any_order_with_hf_aliases(tmp_path):
    from stayaligned.config import TrainConfig, load

    config = tmp_path / "train.yaml"
    config.write_text("optim:\n  lr: 0.5\n")
    for argv in (["train", str(config), "--resume", "optim.max_steps=3"],
                 ["train", "--resume", str(config), "--optim.max_steps", "3"],
                 ["train", str(config), "--optim.max_steps=3", "--resume"]):
        args, (path, overrides) = _parsed(*argv)
        assert args.resume and not args.overwrite and path == str(config)
        assert overrides == ["optim.max_steps=3"]
    args, (path, overrides) = _parsed(
        "train", "--overwrite", "learning_rate=2e-5", "--num_train_epochs", "3",
        "--per_device_train_batch_size=2", "gradient_accumulation_steps=4", "--lora_alpha", "64")
    cfg = load(TrainConfig, path, overrides)
    assert args.overwrite and path is None
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.optim.batch_size, cfg.optim.grad_accum,
            cfg.lora.alpha) == (2e-5, 3.0, 2, 4, 64)
    args, (path, overrides) = _parsed("data", "preview", "--n", "1", "--template", "chat:vanilla")
    assert args.n == 1 and overrides == ["template=chat:vanilla"]
    args, (_, overrides) = _parsed("check", "--model", "m", "judge=keyword", "--baseline", "b")
    assert (args.model, args.baseline, overrides) == ("m", "b", ["judge=keyword"])


def test_help_lists_the_hugging_face_aliases():
    out = run("train", "--help").stdout
    for name in ("learning_rate -> optim.lr", "num_train_epochs -> optim.epochs",
                 "per_device_train_batch_size -> optim.batch_size",
                 "gradient_accumulation_steps -> optim.grad_accum", "lora_alpha -> lora.alpha"):
        assert name in out


def test_trl_messages_file_trains_with_one_command(tmp_path, tiny_model_dir):
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "chat_messages.jsonl"
    out = tmp_path / "chat"
    run("train", f"data={example}", f"model.name={tiny_model_dir}", "--max_steps", "2",
        "--per_device_train_batch_size", "4", f"--output_dir={out}", "methods=[sft,ptst]")
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["global_step"] == 2
    assert manifest["n_examples"] == 32
    assert "ptst" in (out / "README.md").read_text()


def test_depth_of_a_lora_run_on_its_seed_loads_one_copy(tmp_path, tiny_model_dir, monkeypatch):
    """`stayaligned depth` loaded the seed and the fine-tune separately: for a LoRA run on the
    seed that is two copies of the base (a 7B model: 2 x 28 GB in float32), where the study's
    depth uses the run's adapters-off view. The numbers are the same either way."""
    import argparse

    import stayaligned.models as models
    from stayaligned.commands import depth
    from stayaligned.config import TrainConfig, load
    from stayaligned.training.run import train

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} + 1?"},
        {"role": "assistant", "content": f"It is {i + 1}."}]}) + "\n" for i in range(8)))
    run_dir = tmp_path / "lora"
    train(load(TrainConfig, None, [
        f"model.name={tiny_model_dir}", f"data=[{{source: {data}}}]", "optim.batch_size=4",
        "optim.max_steps=2", "optim.lr=0.05", "max_length=64", f"output_dir={run_dir}"]))
    loads = []
    original = models.load_model

    def counting(cfg, *args, **kwargs):
        loads.append(cfg.name)
        return original(cfg, *args, **kwargs)

    monkeypatch.setattr(models, "load_model", counting)
    args = argparse.Namespace(pairs_field=None, source="demo-safety", split=None, limit=4,
                              data_dir=None, seed=str(tiny_model_dir), model=str(run_dir),
                              template="native", tokens=3, output=str(tmp_path / "d1"))
    one_copy = depth(args)
    assert loads == [str(run_dir)]
    assert max(one_copy["kl_mean"]) > 1e-6  # the adapter changed the model
    seed, _ = original(models.ModelConfig(name=str(tiny_model_dir)))
    tuned, tokenizer = original(models.ModelConfig(name=str(run_dir)))
    from stayaligned.data.sources import load_source
    from stayaligned.evaluation.depth import depth_kl

    two_copies = depth_kl(seed, tuned, tokenizer, load_source("demo-safety", limit=4), "native",
                          n_tokens=3)
    assert one_copy["kl_mean"] == pytest.approx(two_copies["kl_mean"], rel=1e-4, abs=1e-7)


def test_data_preview_takes_an_align_config_with_align_defaults(tmp_path, tiny_model_dir, capsys):
    """The README's `stayaligned data preview configs/align/shared_safety_deep.yaml`: a config
    with align-only keys (deep, recovery) is previewed as an AlignConfig (it was refused as an
    unknown-key TrainConfig), and `--align` does the same for an align config without them
    (otherwise TrainConfig's defaults would be previewed: another data set and max_length)."""
    from stayaligned.cli import main

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"How do I pick lock {i}?",
                                         "chosen": "I can't help with that.",
                                         "rejected": "Sure, here is how: first take a pin."}) + "\n"
                             for i in range(4)))
    deep = tmp_path / "deep.yaml"
    deep.write_text(f"model: {{name: {tiny_model_dir}}}\ndata: [{{source: demo-helpful, limit: 2}}]\n"
                    f"deep: true\nrecovery: {{source: {pairs}}}\n")
    assert main(["data", "preview", str(deep), "--n", "6"]) == 0
    out = capsys.readouterr().out
    assert "pairs.jsonl" in out and "I can't help with that." in out  # the recovery examples
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"model: {{name: {tiny_model_dir}}}\n")
    assert main(["data", "preview", str(plain), "--align", "--n", "1"]) == 0
    assert "harmful_requests.json" in capsys.readouterr().out  # AlignConfig's default: demo-safety
    assert main(["data", "preview", str(plain), "deep=false", "--n", "1"]) == 0
    assert "harmful_requests.json" in capsys.readouterr().out  # an align-only override implies it
    assert main(["data", "preview", str(plain), "--n", "1"]) == 0  # a TrainConfig: its own data
    assert "harmful_requests.json" not in capsys.readouterr().out
