"""`stayaligned repair`: resolve and check the inputs, prepare the method once, sweep its knob
on the validation config, keep the weakest strength that meets the target, and write

  OUT/model/ or OUT/adapter/   the repaired model (safetensors; an adapter for a LoRA SafeLoRA)
  OUT/run.json                 the templates of the fine-tune, so `eval` uses the same ones,
                               and made_from: the inputs' sha256 and the method's options
  OUT/repair.json              inputs with hashes, method, options, the curve, the choice;
                               seconds (this attempt) and seconds_total (with the time
                               earlier attempts spent on the evaluations it reused)
  OUT/curve.png                refusal and task loss against the knob
  OUT/sweep/<strength>/eval/   each candidate's validation evaluation (and the aligned model's)
  OUT/sweep/<strength>/candidate/  while sweeping: a candidate (run.json with made_from, so
                               a rebuilt one is evaluated again); only one kept by this run
                               is ever moved into OUT

OUT is then a model name for `eval`, `check` and `study` like any run directory.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from stayaligned.config import RepairConfig, to_dict
from stayaligned.repair import METHOD_NAMES, repairs
from stayaligned.repair.base import RepairInputs, save, templates
from stayaligned.repair.sweep import (
    TargetNotMet,
    best,
    evaluate_model,
    pick,
    plot_curve,
    point,
    task_holdout,
    validation_config,
)
from stayaligned.repair.weights import (
    ModelInput,
    RepairError,
    TensorSource,
    check_compatible,
    open_model,
)
from stayaligned.runfiles import machine_info, package_versions, read_json, write_json


def open_inputs(cfg: RepairConfig, work_dir: Path) -> RepairInputs:
    """Resolve every model and check each against the aligned one, tensor by tensor."""
    if not cfg.model or not cfg.aligned:
        raise RepairError("repair needs the fine-tune (--model) and the aligned model it came "
                          "from (--aligned)")
    aligned = open_model(cfg.aligned)
    if aligned.kind != "full":
        raise RepairError(f"aligned model {cfg.aligned}: expected full weights, got a LoRA "
                          "adapter; merge it first (stayaligned align writes merged/)")
    source = aligned.source if isinstance(aligned.source, TensorSource) else None
    inputs = RepairInputs(open_model(cfg.model, source), aligned, config=cfg, work_dir=work_dir)
    inputs.warnings += adapter_base_warnings(inputs.finetune, cfg.aligned, aligned)
    check_compatible(aligned, inputs.finetune, "fine-tune", "aligned model")
    for role in ("base", "unaligned"):
        name = getattr(cfg, role)
        if name:
            other = open_model(name, source)
            check_compatible(aligned, other, f"{role} model", "aligned model")
            setattr(inputs, role, other)
    return inputs


def adapter_base_warnings(ft: ModelInput, aligned_name: str, aligned: ModelInput) -> list[str]:
    """A LoRA fine-tune whose adapter_config.json names another base model than --aligned
    (trained on the pre-alignment base, say) is read over --aligned all the same; say so.
    Names are compared as given and, for local directories, as resolved paths (a Hub id and a
    local copy of it cannot be told apart, hence a warning, not an error)."""
    if ft.kind != "lora":
        return []
    named = ft.source.config.get("base_model_name_or_path")
    if not named:
        return []

    def local(name: str) -> Path | None:
        path = Path(name).expanduser()
        return path.resolve() if path.exists() else None

    same = {aligned_name, str(local(aligned_name) or aligned_name)}
    for path in (aligned.config_dir, aligned.config_dir.parent):
        same.add(str(path.resolve()))
    if named in same or str(local(named) or named) in same:
        return []
    return [f"{ft.adapter_dir / 'adapter_config.json'}: base_model_name_or_path is {named!r}, "
            f"but the adapter is read over the aligned model {aligned_name!r}; if it was trained "
            "on another model (the pre-alignment base, say) the repair is meaningless: pass that "
            "model's aligned counterpart as --aligned (ignore this if both name the same model)"]


def made_from(cfg: RepairConfig, record: dict) -> dict:
    """What a candidate's weights depend on besides its strength: the inputs' file hashes and
    the method's options (written into each candidate's run.json, see `save`)."""
    options = ("method", "reference", "dare_p", "select", "calibration", "calibration_split",
               "calibration_limit", "data_dir", "seed")
    return {"inputs": {role: entry.get("sha256") for role, entry in record["inputs"].items()},
            "options": {key: getattr(cfg, key) for key in options}}


def _label(strength: float) -> str:
    return f"{strength:g}"


def run_repair(cfg: RepairConfig, log=print) -> dict:
    """The whole repair; returns the repair.json dict. Raises TargetNotMet (after writing
    repair.json and the curve) when a target is given and no strength meets it."""
    if cfg.method not in METHOD_NAMES:
        raise RepairError(f"method={cfg.method!r}: use one of {', '.join(METHOD_NAMES)}")
    if cfg.target_refusal is not None and cfg.target_kept is not None:
        raise RepairError("give --target-refusal or --target-kept, not both")
    targeted = cfg.target_refusal is not None or cfg.target_kept is not None
    if cfg.on_miss not in ("fail", "best"):
        raise RepairError(f"on_miss={cfg.on_miss!r}: use fail (save nothing when no strength "
                          "meets the target) or best (save the best strength, marked)")
    started = time.time()
    out = Path(cfg.output_dir)
    method = repairs()[cfg.method](cfg)
    inputs = open_inputs(cfg, out / ".work")
    log(f"[repair] {cfg.method}: preparing ({inputs.finetune.kind} fine-tune {cfg.model})")
    for warning in inputs.warnings:
        log(f"[repair] warning: {warning}")
    state = method.prepare(inputs)
    strength = cfg.strength if cfg.strength is not None else method.default
    sweep = method.order(cfg.strengths or method.defaults) if (targeted or cfg.strengths) else []
    record = {"method": cfg.method, "knob": method.knob, "stronger": "larger" if method.stronger > 0
              else "smaller", "config": to_dict(cfg), "versions": package_versions(),
              "machine": machine_info(),
              "inputs": {role: m.describe() for role, m in _roles(inputs).items()}}
    if inputs.warnings:
        record["warnings"] = list(inputs.warnings)
    provenance = made_from(cfg, record)
    kept = None
    if sweep:
        swept, kept = _sweep(cfg, method, state, inputs, sweep, out, log, provenance)
        record.update(swept)
        chosen = record["choice"]
        if targeted:
            record["target_met"] = chosen is not None
        if targeted and chosen is None:
            b = record["best"]
            miss = (f"no {method.knob} in {', '.join(map(_label, sweep))} met the target refusal "
                    f"{100 * record['target']['refusal']:.1f}% on the validation set; the best "
                    f"was {method.knob}={_label(b['strength'])} with "
                    f"{100 * b['refusal_rate']['value']:.1f}%")
            if cfg.on_miss != "best":
                _finish(record, out, started)
                raise TargetNotMet(f"{miss}; nothing saved; the curve is in {out / 'repair.json'}")
            log(f"[repair] {miss}; on_miss=best: saving that one, marked target_met: false")
            chosen = b
        strength = chosen["strength"] if targeted else strength
    _place(method, state, inputs, strength, out, log, provenance, kept)
    record["strength"] = strength
    record["reverted"] = method.reverts_at is not None and strength == method.reverts_at
    if record["reverted"]:
        log(f"[repair] warning: {method.knob}={_label(strength)} is the aligned model itself: "
            "the saved model keeps nothing of the fine-tune (no weaker strength met the "
            "target; a finer grid near this end, or a lower target, may find one)")
    _finish(record, out, started)
    log(f"[repair] saved {cfg.method} with {method.knob}={_label(strength)} in {out}")
    return record


def _roles(inputs: RepairInputs) -> dict:
    roles = {"finetune": inputs.finetune, "aligned": inputs.aligned}
    for role in ("base", "unaligned"):
        if getattr(inputs, role) is not None:
            roles[role] = getattr(inputs, role)
    return roles


def _sweep(cfg, method, state, inputs, sweep, out: Path, log, provenance: dict
           ) -> tuple[dict, float | None]:
    """(the curve and choice for repair.json, the strength whose candidate this run kept on
    disk, if any)."""
    holdout = None
    if cfg.task_holdout:
        run = inputs.finetune.run_dir
        train_cfg = (read_json(run / "run.json") or {}).get("config", {}) if run else {}
        holdout = task_holdout(train_cfg, cfg.task_holdout, out / "sweep", cfg.data_dir)
    recorded = templates(inputs) or {}
    template, chat_kwargs = recorded.get("eval"), recorded.get("chat_template_kwargs")
    aligned_cfg = validation_config(cfg, str(inputs.aligned.config_dir),
                                    out / "sweep" / "aligned" / "eval", holdout, template,
                                    chat_kwargs)
    if (cfg.target_refusal is not None or cfg.target_kept is not None) and not any(
            b.kind == "harmful" for b in aligned_cfg.benchmarks):
        key = "target_kept" if cfg.target_kept is not None else "target_refusal"
        raise RepairError(f"{key}: the validation config has no harmful benchmark, so there is "
                          "no refusal rate to meet a target with; add one (kind: harmful) to "
                          "validation, or drop the target")
    warnings = calibration_overlap(cfg, aligned_cfg)
    for warning in warnings:
        log(f"[repair] warning: {warning}")
    log("[repair] evaluating the aligned model on the validation config")
    timing = {}  # evaluation -> its seconds in this run and in total (timing only)
    aligned = point(_timed(evaluate_model(aligned_cfg), timing, "aligned"))
    target = cfg.target_refusal
    if cfg.target_kept is not None:
        target = cfg.target_kept * (aligned["refusal_rate"]["value"] or 0)
    curve, kept, kept_fixed = [], None, None
    for s in sweep:
        started = time.time()
        cand = out / "sweep" / _label(s)
        shutil.rmtree(cand / "candidate", ignore_errors=True)  # a killed run's leftover
        save(method.apply(state, s), cand / "candidate", str(inputs.aligned.config_dir.resolve()),
             provenance)
        seconds = round(time.time() - started, 1)
        log(f"[repair] {method.knob}={_label(s)}: evaluating")
        ecfg = validation_config(cfg, str(cand / "candidate"), cand / "eval", holdout, template,
                                 chat_kwargs)
        p = {"strength": s, **point(_timed(evaluate_model(ecfg), timing, _label(s))),
             "apply_seconds": seconds}
        curve.append(p)
        if kept is None and target is not None and (p["refusal_rate"]["value"] or 0) >= target:
            kept = s  # the weakest passing candidate: keep its weights, drop the others
        elif cfg.target_refusal is None and cfg.target_kept is None and s == cfg.strength:
            kept_fixed = s  # no target: the strength to save was given
        else:
            shutil.rmtree(cand / "candidate", ignore_errors=True)
    chosen = pick(curve, target)
    plot_curve(curve, out / "curve.png", method.knob, cfg.method, target,
               chosen["strength"] if chosen else None, aligned)
    return {"aligned": aligned, "curve": curve, "choice": chosen, "best": best(curve),
            "target": {"refusal": target, "refusal_given": cfg.target_refusal,
                       "kept": cfg.target_kept, "met": chosen is not None if target is not None else None},
            "validation": to_dict(aligned_cfg)["benchmarks"], "evaluation_seconds": timing,
            **({"validation_warnings": warnings} if warnings else {})}, (
                kept if kept is not None else kept_fixed)


def calibration_overlap(cfg: RepairConfig, ecfg) -> list[str]:
    """Safe Delta fits its compensation to harmful calibration prompts; a validation that asks
    the same prompts picks the strength on them (optimistic). The defaults do: both are the
    demo requests' align split. Said, not refused: a study keeps its protocol."""
    if cfg.method != "safe_delta":
        return []
    from stayaligned.evaluation.run import benchmark_examples
    from stayaligned.repair.safe_delta import calibration_examples

    calibration = {(ex.content("user") or "").strip() for ex in calibration_examples(cfg)}
    asked = [(ex.content("user") or "").strip() for b in ecfg.benchmarks if b.kind == "harmful"
             for ex in benchmark_examples(b, ecfg.data_dir)]
    shared = sum(1 for prompt in asked if prompt in calibration)
    if not shared:
        return []
    return [f"safe_delta: {shared} of the validation's {len(asked)} harmful prompts are also "
            f"calibration prompts (calibration={cfg.calibration}, split "
            f"{cfg.calibration_split}): the strength is chosen on prompts the repair was fitted "
            "to, an optimistic choice; validate on other requests (e.g. validation: {benchmarks: "
            "[{name: held-out, source: demo-harmful, split: validation, kind: harmful}]}) or "
            "calibrate on another set (calibration: safety-tuned-llamas with data_dir)"]


def _place(method, state, inputs, strength: float, out: Path, log, provenance: dict,
           kept: float | None) -> None:
    """The final model into OUT: the candidate this run's sweep kept for `strength`, else
    computed now (a candidate left by an earlier, killed run is never used)."""
    for sub in ("model", "adapter"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for name in ("repair.json", "run.json"):  # until the new ones are written, OUT is unfinished
        (out / name).unlink(missing_ok=True)
    cand = out / "sweep" / _label(strength) / "candidate"
    if cand.is_dir() and kept != strength:
        shutil.rmtree(cand, ignore_errors=True)
    if cand.is_dir():
        for sub in ("model", "adapter"):
            if (cand / sub).is_dir():
                (cand / sub).rename(out / sub)
        (cand / "run.json").replace(out / "run.json")
        shutil.rmtree(cand, ignore_errors=True)
        return
    log(f"[repair] applying {method.knob}={_label(strength)}")
    save(method.apply(state, strength), out, str(inputs.aligned.config_dir.resolve()), provenance)


def _timed(metrics: dict, timing: dict, name: str) -> dict:
    """`metrics` unchanged; its evaluation's seconds in this call and in total (with the
    earlier calls whose stage files it reused) noted in `timing[name]`."""
    this = metrics.get("seconds")
    timing[name] = {"seconds": this, "seconds_total": metrics.get("seconds_total", this)}
    return metrics


def _finish(record: dict, out: Path, started: float) -> None:
    record["seconds"] = round(time.time() - started, 1)  # this attempt only
    # with the time earlier attempts spent on the validation evaluations this one reused: a
    # resumed repair's total does not shrink to its last attempt
    earlier = sum(max(0.0, (t.get("seconds_total") or 0.0) - (t.get("seconds") or 0.0))
                  for t in (record.get("evaluation_seconds") or {}).values())
    record["seconds_total"] = round(record["seconds"] + earlier, 1)
    shutil.rmtree(out / ".work", ignore_errors=True)
    write_json(out / "repair.json", record)
