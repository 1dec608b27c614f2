"""The `stayaligned` command: each subcommand is a thin call into the modules.

  stayaligned quickstart [--output DIR] [--fresh]
  stayaligned align [CONFIG] [key=value ...] [--resume] [--overwrite]
  stayaligned train CONFIG [key=value ...] [--resume] [--overwrite]
  stayaligned eval CONFIG [key=value ...] [--overwrite]
  stayaligned data preview [CONFIG] [key=value ...] [--n N] [--align]
  stayaligned data list | stayaligned data templates
  stayaligned study CONFIG [key=value ...] [--cells A,B] [--devices 0,1] [--dry-run]
  stayaligned report STUDY_DIR [--output DIR] [--notes FINDINGS.md] [--overhead JSON]
  stayaligned check --model RUN --baseline SEED [CONFIG] [key=value ...] [--max-refusal-drop 5]
  stayaligned depth --seed SEED --model RUN [--source demo-safety] [--tokens 8] --output DIR
  stayaligned judges compare JUDGMENTS_A JUDGMENTS_B [--output FILE]
  stayaligned pairs --model M --harmful SOURCE [--refusals SOURCE] --output FILE [--prefill TEXT]
  stayaligned repair --model FT --aligned A [--base B] --method M [--target-refusal R] --output DIR

Flags and key=value overrides may come in any order; `--key value` and `--key=value` are
overrides too (`--optim.lr 1e-4`), and train/align/data preview accept the Hugging Face names
(`learning_rate=1e-4`, `--num_train_epochs 3`; see `stayaligned train --help`).
Errors print one line naming the file, record or key; STAYALIGNED_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from stayaligned.config import (AlignConfig, ConfigError, EvalConfig, TrainConfig, load,
                                override_key)
from stayaligned.training.hf_args import alias_help, resolve_aliases

ALIAS_COMMANDS = ("align", "train", "data")


def _config_args(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("config", nargs="?" if not required else None, help="a YAML config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4")


def _split_config(args) -> tuple[str | None, list[str]]:
    """A first positional `key=value` is an override, not a config path."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    if args.command in ALIAS_COMMANDS:
        overrides = resolve_aliases(overrides)
    return config, overrides


def _sets_align_keys(path: str | None, overrides: list[str]) -> bool:
    """Whether a config file or its overrides set a key only `align` has (deep, recovery): such
    a config previewed as a TrainConfig would be refused, or, without them, previewed with the
    wrong defaults (the --align flag says it for those)."""
    import dataclasses

    import yaml

    only = ({f.name for f in dataclasses.fields(AlignConfig)}
            - {f.name for f in dataclasses.fields(TrainConfig)})
    keys = {override_key(o).split(".")[0] for o in overrides}
    if path is not None and Path(path).is_file():
        try:
            data = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError:
            data = None  # load() names the error
        keys |= set(data) if isinstance(data, dict) else set()
    return bool(keys & only)


def normalise_argv(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Flags anywhere and `--key value` overrides: for a subcommand that takes overrides,
    `[subcommand, positionals..., flags...]`, where an unknown `--key value` (or `--key=value`)
    has become the override `key=value`."""
    head, p, i = [], parser, 0
    while i < len(argv) and (choices := _subcommands(p)) and argv[i] in choices:
        p = choices[argv[i]]
        head.append(argv[i])
        i += 1
    if not any(a.dest == "overrides" for a in p._actions):
        return argv
    known = p._option_string_actions
    positionals, flags, rest = [], [], argv[i:]
    j = 0
    while j < len(rest):
        token = rest[j]
        name = token.split("=", 1)[0]
        if token == "--":
            positionals += rest[j + 1:]
            break
        if name in known:
            flags.append(token)
            if "=" not in token and known[name].nargs != 0 and j + 1 < len(rest):
                flags.append(rest[j + 1])
                j += 1
        elif token.startswith("--") and len(token) > 2:
            key, eq, value = token[2:].partition("=")
            if not eq and j + 1 < len(rest):
                value, j = rest[j + 1], j + 1
            positionals.append(f"{key}={value}" if eq or value else token)
        else:
            positionals.append(token)
        j += 1
    return head + positionals + flags


def _subcommands(parser: argparse.ArgumentParser) -> dict:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stayaligned", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    quick = sub.add_parser("quickstart", help="offline demo: align, fine-tune, evaluate, table")
    quick.add_argument("--output", default="runs/quickstart", help="where all stages go")
    quick.add_argument("--fresh", action="store_true", help="ignore cached stages")
    quick.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="override the quickstart's study config (resources/quickstart.yaml), "
                            "e.g. model.precision=fp32")

    for name, helptext in [("align", "safety-align an unaligned seed"),
                           ("train", "fine-tune with the configured methods")]:
        p = sub.add_parser(name, help=helptext, epilog=alias_help(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _config_args(p, required=False)
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
        p.add_argument("--overwrite", action="store_true", help="replace an existing run")

    ev = sub.add_parser("eval", help="generate, judge and score on benchmarks")
    _config_args(ev, required=False)
    ev.add_argument("--overwrite", action="store_true",
                    help="delete the output directory's stage files and evaluate from scratch")

    study = sub.add_parser("study", help="run (or resume) a grid of fine-tunes and evaluations")
    _config_args(study, required=True)
    study.add_argument("--cells", help="only these cells (comma-separated run ids)")
    study.add_argument("--devices", help="GPUs to spread cells over, one worker each, e.g. 0,1,2,3")
    study.add_argument("--dry-run", action="store_true", help="list the stages and their status")

    report = sub.add_parser("report", help="report.md and report.html from a study's stage files")
    report.add_argument("study_dir", help="the study's output directory")
    report.add_argument("--output", help="where to write (default: the study directory)")
    report.add_argument("--notes", help="a Markdown file of findings to put after the overview")
    report.add_argument("--overhead", help="bench/overhead.py's JSON: the headline's cost per step")

    check = sub.add_parser("check", help="safety gate: exit 1 if safety fell beyond limits")
    _config_args(check, required=False)
    check.add_argument("--model", required=True, help="the fine-tuned model or run directory")
    check.add_argument("--baseline", required=True, help="the model it must stay as safe as")
    check.add_argument("--max-refusal-drop", type=float, default=5.0, help="points (default 5)")
    check.add_argument("--max-asr-rise", type=float, default=5.0, help="points (default 5)")
    check.add_argument("--output", default="runs/check", help="evaluations and check.json")
    check.add_argument("--junit", help="also write a JUnit XML report here")
    check.add_argument("--overwrite", action="store_true",
                       help="recompute both evaluations under --output instead of reusing them")

    depth = sub.add_parser("depth", help="per-token KL between a seed and a fine-tuned model")
    depth.add_argument("--seed", required=True, help="the seed (reference) model")
    depth.add_argument("--model", required=True, help="the fine-tuned model or run directory")
    depth.add_argument("--source", default="demo-safety",
                       help="harmful prompts with continuations (assistant turn), or a pairs file")
    depth.add_argument("--pairs-field", help="with a pairs file: chosen (refusals) or rejected")
    depth.add_argument("--split", default="train")
    depth.add_argument("--limit", type=int, default=64)
    depth.add_argument("--tokens", type=int, default=8, help="response positions (default 8)")
    depth.add_argument("--template", default="native")
    depth.add_argument("--data-dir")
    depth.add_argument("--output", required=True, help="writes depth.json and depth.png here")

    judges = sub.add_parser("judges", help="compare two judges on the same generations")
    jsub = judges.add_subparsers(dest="judges_command", required=True)
    cmp = jsub.add_parser("compare", help="agreement, Cohen's kappa and the disagreeing items")
    cmp.add_argument("a", help="judgments.jsonl of the first judge (or its eval directory)")
    cmp.add_argument("b", help="judgments.jsonl of the second judge (or its eval directory)")
    cmp.add_argument("--output", help="write the comparison as JSON")

    pairs = sub.add_parser("pairs", help="build SAP contrastive pairs (prompt, refusal, harmful)")
    pairs.add_argument("--model", default="embedded", help="the model that writes the rejected answers")
    pairs.add_argument("--harmful", required=True, help="harmful prompts: a dataset name or file")
    pairs.add_argument("--refusals", help="refusal texts (default: the bundled refusals)")
    pairs.add_argument("--output", required=True, help="JSONL file to write")
    pairs.add_argument("--prefill", help='start of the answer that makes an aligned model comply, e.g. "Sure, here is"')
    pairs.add_argument("--limit", type=int, default=48)
    pairs.add_argument("--data-dir", help="local copies of named datasets")
    pairs.add_argument("--max-new-tokens", type=int, default=64)

    rep = sub.add_parser("repair", help="restore the safety of a finished fine-tune (post hoc)")
    rep.add_argument("--model", required=True, help="the fine-tune: run dir, PEFT adapter, weights or Hub id")
    rep.add_argument("--aligned", required=True, help="the aligned model the fine-tune started from")
    rep.add_argument("--base", help="the pre-alignment base (safelora; resta --reference base)")
    rep.add_argument("--unaligned", help="resta --reference harmful_finetune: the aligned model "
                     "fine-tuned on harmful pairs")
    rep.add_argument("--method", required=True, help="merge | resta | safelora | safe_delta")
    rep.add_argument("--strengths", help="the sweep, e.g. 0,0.25,0.5 (default: the method's)")
    rep.add_argument("--strength", type=float, help="without a target: the strength to save")
    rep.add_argument("--target-refusal", type=float, help="keep the weakest strength with this "
                     "validation refusal rate (0-1)")
    rep.add_argument("--target-kept", type=float, help="... or this share of the aligned model's")
    rep.add_argument("--on-miss", default="fail", choices=("fail", "best"), help="a target no "
                     "strength meets: save nothing (fail) or save the best strength (best); "
                     "exit 1 either way")
    rep.add_argument("--validation", help="an eval YAML of validation benchmarks (not the "
                     "evaluation sets); default: the demo harmful align split")
    rep.add_argument("--task-holdout", type=int, default=0, help="add N task items held out of "
                     "the fine-tune's own training source (stayaligned runs)")
    rep.add_argument("--reference", default="base", help="resta: base | harmful_finetune")
    rep.add_argument("--dare-p", type=float, default=0.0, help="resta: DARE drop probability")
    rep.add_argument("--select", default="threshold", help="safelora: threshold (tau) | number (K)")
    rep.add_argument("--calibration", default="demo-safety", help="safe_delta: harmful prompts "
                     "with refusals")
    rep.add_argument("--calibration-limit", type=int, default=128)
    rep.add_argument("--data-dir", help="local copies of named datasets")
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument("--output", required=True, help="the repaired model's directory")

    data = sub.add_parser("data", help="inspect datasets and rendering")
    dsub = data.add_subparsers(dest="data_command", required=True)
    prev = dsub.add_parser("preview", help="show rendered examples with the loss mask",
                           epilog=alias_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_args(prev, required=False)
    prev.add_argument("--n", type=int, default=2, help="how many examples")
    prev.add_argument("--align", action="store_true",
                      help="CONFIG is an `align` config: its defaults (the bundled demo sets, "
                           "LoRA merged, max_length 256), deep and recovery; implied when the "
                           "config or an override sets deep or recovery")
    dsub.add_parser("list", help="named datasets and demo sets")
    dsub.add_parser("templates", help="named prompt templates")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(normalise_argv(parser, list(sys.argv[1:] if argv is None else argv)))
    try:
        return _dispatch(args)
    except (ConfigError, ValueError, KeyError, RuntimeError, OSError) as err:
        if os.environ.get("STAYALIGNED_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        if isinstance(err, OSError) and err.filename:
            message = f"{err.filename}: {err.strerror or err}"
        print(f"stayaligned {args.command}: error: {one_line(message)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a user sees one line; STAYALIGNED_DEBUG=1 the rest
        if os.environ.get("STAYALIGNED_DEBUG"):
            raise
        print(f"stayaligned {args.command}: unexpected error: {type(err).__name__}: "
              f"{one_line(err)} (rerun with STAYALIGNED_DEBUG=1 for the traceback)", file=sys.stderr)
        return 3


def one_line(message) -> str:
    """An error message on one line (a nested library message may span several)."""
    return " ".join(str(message).split())


def _dispatch(args) -> int:
    from stayaligned import commands

    if args.command == "quickstart":
        commands.quickstart(args.output, fresh=args.fresh, overrides=args.overrides)
        return 0
    if args.command == "data":
        if args.data_command == "list":
            commands.data_list()
        elif args.data_command == "templates":
            commands.data_templates()
        else:
            path, overrides = _split_config(args)
            kind = AlignConfig if args.align or _sets_align_keys(path, overrides) else TrainConfig
            commands.data_preview(load(kind, path, overrides), n=args.n)
        return 0
    if args.command == "check":
        path, overrides = _split_config(args)
        return commands.check(args, load(EvalConfig, path, overrides))
    if args.command == "study":
        from stayaligned.config import StudyConfig
        from stayaligned.study import run_study

        path, overrides = _split_config(args)
        if args.dry_run:
            from stayaligned.study import describe

            describe(load(StudyConfig, path, overrides),
                     only=args.cells.split(",") if args.cells else None)
            return 0
        result = run_study(
            load(StudyConfig, path, overrides),
            only=args.cells.split(",") if args.cells else None,
            devices=args.devices.split(",") if args.devices else None,
            argv=[a for a in [path, *overrides] if a])
        return 1 if result["failed"] else 0
    if args.command == "report":
        from stayaligned.reports.report import write_report

        paths = write_report(args.study_dir, args.output, notes=args.notes,
                             overhead=args.overhead)
        print("[report] wrote " + ", ".join(str(p) for p in paths))
        return 0
    if args.command == "depth":
        commands.depth(args)
        return 0
    if args.command == "judges":
        commands.judges_compare(args.a, args.b, args.output)
        return 0
    if args.command == "pairs":
        from stayaligned.data.pairs import pairs_command

        out = pairs_command(args.model, args.harmful, args.refusals, args.output, args.prefill,
                            args.limit, args.data_dir, args.max_new_tokens)
        print(f"[pairs] wrote {out}")
        return 0
    if args.command == "repair":
        return commands.repair(args)
    path, overrides = _split_config(args)
    if args.command in ("align", "train"):
        cls = AlignConfig if args.command == "align" else TrainConfig
        out = commands.train(load(cls, path, overrides), resume=args.resume,
                             overwrite=args.overwrite)
        print(f"[{args.command}] done: {out}")
        return 0
    metrics = commands.evaluate(load(EvalConfig, path, overrides), overwrite=args.overwrite)
    if metrics.get("unscored"):
        print(f"stayaligned eval: error: {metrics['unscored']} item(s) could not be judged "
              f"(see the errors in {metrics['config']['output_dir']}/judgments.jsonl); their "
              "rates are over the scored items only. Fix the judge and rerun to score them",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
