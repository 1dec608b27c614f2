"""The bad-input suite: each case feeds the CLI one bad input and asserts the exact outcome,
either a one-line error naming the culprit (exit code != 0, no traceback) or a correct
recovery. Never exit 0 with a wrong or partial result. The kill tests are in test_kills.py.

With STAYALIGNED_ROBUSTNESS_LOG=FILE every case appends its outcome to FILE (JSON lines);
bench/robustness.py tallies them into bench/results/robustness.json.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from stayaligned import cli

TINY_EVAL = ["generation.max_new_tokens=2", "generation.batch_size=4"]
PROMPT_FIELDS = "fields: {user: prompt, assistant: null}"


def log_outcome(case: str, outcome: str, detail: str = "") -> None:
    path = os.environ.get("STAYALIGNED_ROBUSTNESS_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"case": case, "outcome": outcome, "detail": detail}) + "\n")


def run_cli(argv: list[str], capsys) -> tuple[int | None, str]:
    """(exit code, stderr) of the CLI run in this process; code None if it raised."""
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    except BaseException as err:  # noqa: BLE001 - a raw traceback is a failed case
        return None, f"{type(err).__name__}: {err}"
    return code, capsys.readouterr().err


def expect_error(case: str, argv: list[str], pattern: str, capsys, code: int = 2) -> str:
    """Assert a clean one-line error matching `pattern`; log the outcome."""
    got, err = run_cli(argv, capsys)
    # progress bars end without a newline, so find the error line by its prefix
    lines = re.findall(r"stayaligned [a-z]+: (?:unexpected )?error: [^\r\n]*", err)
    if got is None:
        log_outcome(case, "traceback", err)
    elif got == 0:
        log_outcome(case, "silent_wrong", err)
    elif re.search(pattern, err) and len(lines) == 1 and "Traceback" not in err:
        log_outcome(case, "clear_error", lines[0])
    else:
        log_outcome(case, "unclear_error", err)
    assert got == code, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def recovered(case: str, ok: bool, detail: str = "") -> None:
    log_outcome(case, "recovered" if ok else "silent_wrong", detail)
    assert ok, detail


# ---------------------------------------------------------------- data files


def _eval_argv(tmp_path, model_dir, source: str, kind="harmful", extra=()) -> list[str]:
    fields = PROMPT_FIELDS if kind != "task" else "fields: {user: q, assistant: a}"
    return ["eval", f"model.name={model_dir}", f"output_dir={tmp_path / 'eval'}",
            f"benchmarks=[{{name: b, source: '{source}', kind: {kind}, {fields}}}]",
            *TINY_EVAL, *extra]


DATA_CASES = {
    "json-malformed": ("d.json", b'[{"prompt": "a"},\n {"prompt": }]', r"d\.json:2: invalid JSON"),
    "jsonl-malformed-line": ("d.jsonl", b'{"prompt": "a"}\n{"prompt": "b"\n',
                             r"d\.jsonl:2: invalid JSON .*column 15"),
    "field-missing": ("d.jsonl", b'{"prompt": "a"}\n{"text": "b"}\n',
                      r"d\.jsonl:2: field 'prompt' is missing"),
    "field-empty": ("d.jsonl", b'{"prompt": "  "}\n', r"d\.jsonl:1: the user message is empty"),
    "field-wrong-type": ("d.jsonl", b'{"prompt": 7}\n', r"d\.jsonl:1: field 'prompt' must be text"),
    "not-utf8": ("d.jsonl", b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n',
                 r"d\.jsonl:2: not valid UTF-8"),
    "utf16": ("d.jsonl", '{"prompt": "a"}\n'.encode("utf-16"), r"d\.jsonl:1: not valid UTF-8"),
    "empty-file": ("d.jsonl", b"", r"d\.jsonl: no records found"),
    "blank-txt": ("d.txt", b"\n  \n", r"d\.txt: no records found"),
    "csv-column-missing": ("d.csv", b"text\nhello\n", r"d\.csv:2: field 'prompt' is missing"),
    "csv-extra-cells": ("d.csv", b"prompt\nhello,world\n", r"d\.csv:2: the row has more cells"),
    "json-top-object": ("d.json", b'{"data": []}', r"d\.json: the top level is an object"),
    "json-not-objects": ("d.json", b'["a", "b"]', r"d\.json\[0\]: expected a JSON object"),
    "unsupported-type": ("d.xml", b"<a/>", r"d\.xml.*(unsupported file type|file not found)"),
    "file-missing": (None, None, r"benchmarks\.0\.source=.*nope\.jsonl: file not found"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_file(case, tmp_path, tiny_model_dir, capsys):
    name, content, pattern = DATA_CASES[case]
    if name is None:
        source = str(tmp_path / "nope.jsonl")
    else:
        source = str(tmp_path / name)
        Path(source).write_bytes(content)
    expect_error(f"data/{case}", _eval_argv(tmp_path, tiny_model_dir, source), pattern, capsys)


def test_bom_file_is_read(tmp_path, tiny_model_dir, capsys):
    source = tmp_path / "bom.jsonl"
    source.write_bytes('\ufeff{"prompt": "How do I pick a lock?"}\n'.encode("utf-8"))
    code, err = run_cli(_eval_argv(tmp_path, tiny_model_dir, str(source)), capsys)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    recovered("data/utf8-bom", code == 0 and metrics["benchmarks"]["b"]["n"] == 1, err)


def test_empty_task_reference_is_an_error(tmp_path, tiny_model_dir, capsys):
    source = tmp_path / "task.jsonl"
    source.write_text('{"q": "1+1?", "a": "2"}\n{"q": "2+2?", "a": ""}\n')
    expect_error("data/task-empty-reference-field",
                 _eval_argv(tmp_path, tiny_model_dir, str(source), kind="task"),
                 r"task\.jsonl:2: field 'a' is empty", capsys)
    argv = ["eval", f"model.name={tiny_model_dir}", f"output_dir={tmp_path / 'e'}",
            f"benchmarks=[{{name: t, source: '{source}', kind: task, fields: {{user: q, assistant: null}}}}]"]
    expect_error("data/task-no-reference", argv,
                 r"benchmark t, record task\.jsonl:1: the reference answer is empty", capsys)


def test_duplicate_benchmark_names_are_an_error(tmp_path, tiny_model_dir, capsys):
    argv = ["eval", f"model.name={tiny_model_dir}", f"output_dir={tmp_path / 'e'}",
            "benchmarks=[{name: x, source: demo-harmful}, {name: x, source: demo-harmful}]"]
    expect_error("data/duplicate-benchmark", argv, r"two benchmarks are named 'x'", capsys)


def test_overlong_prompt_names_the_record(tmp_path, tiny_model_dir, capsys):
    source = tmp_path / "long.jsonl"
    source.write_text(json.dumps({"prompt": "word " * 1200}) + "\n")
    expect_error("data/overlong-prompt", _eval_argv(tmp_path, tiny_model_dir, str(source)),
                 r"record long\.jsonl:1: the prompt has \d+ tokens", capsys)


# ---------------------------------------------------------------- configs


def _train_argv(tmp_path, model_dir, *extra) -> list[str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Add {i} and 1.", "output": f"{i + 1}."})
                            + "\n" for i in range(8)))
    return ["train", f"model.name={model_dir}", f"data=[{{source: {data}}}]",
            "optim.batch_size=4", "optim.max_steps=2", "max_length=64", "logging_steps=1",
            "lora.r=2", "lora.alpha=4", f"output_dir={tmp_path / 'run'}", *extra]


TRAIN_CONFIG_CASES = {
    "unknown-key": (["optim.learning_rate=1"], r"unknown key\(s\) learning_rate"),
    "wrong-type": (["optim.lr=abc"], r"optim\.lr: expected a number, got 'abc'"),
    "lr-inf": (["optim.lr=.inf"], r"optim\.lr=inf: must be a finite number"),
    "lr-zero": (["optim.lr=0"], r"optim\.lr=0\.0: must be > 0"),
    "lr-negative": (["optim.lr=-1e-4"], r"optim\.lr=-0\.0001: must be > 0"),
    "epochs-zero": (["optim.epochs=0", "optim.max_steps=-1"], r"optim\.epochs=0 .*nothing would be trained"),
    "epochs-negative": (["optim.epochs=-1", "optim.max_steps=-1"], r"optim\.epochs=-1 "),
    "lora-r-zero": (["lora.r=0"], r"lora\.r=0: must be >= 1"),
    "batch-size-zero": (["optim.batch_size=0"], r"optim\.batch_size=0: must be >= 1"),
    "grad-accum-zero": (["optim.grad_accum=0"], r"optim\.grad_accum=0: must be >= 1"),
    "unknown-method": (["methods=[sfft]"], r"methods: unknown method 'sfft' \(did you mean 'sft'\?\)"),
    "method-twice": (["methods=[sft, sft]"], r"methods: sft is listed twice"),
    "options-for-absent-method": (["options={ptst: {}}"], r"options: block\(s\) for ptst, which "
                                  r"are not in methods"),
    "unknown-method-option": (["methods=[ptst]", "options={ptst: {templat: x}}"],
                              r"options\.ptst: unknown key\(s\) templat"),
    "unknown-template": (["template=natve"], r"template: unknown template 'natve' \(did you mean 'native'\?\)"),
    "unknown-scheduler": (["optim.scheduler=cosin"], r"optim\.scheduler: unknown scheduler 'cosin' \(did you mean 'cosine'\?\)"),
    "overlong-choice": (["overlong=cut"], r"overlong: unknown choice 'cut'"),
    "demo-misspelled": (["data=[{source: demo-arithmetc}]"], r"did you mean 'demo-arithmetic'"),
    "model-path-missing": (["model.name=/no/such/model"], r"model\.name=/no/such/model: not found"),
    "gguf-missing": (["model.name=missing.gguf"], r"model\.name=missing\.gguf: not found"),
    "hub-id-offline": (["model.name=nobody-xyz/not-a-model"], r"not in the Hugging Face cache.*offline"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CONFIG_CASES))
def test_bad_train_config(case, tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    extra, pattern = TRAIN_CONFIG_CASES[case]
    expect_error(f"config/train-{case}", _train_argv(tmp_path, tiny_model_dir, *extra), pattern,
                 capsys)
    assert not (tmp_path / "run" / "run.json").exists()  # stopped before anything ran


EVAL_CONFIG_CASES = {
    "unknown-judge": (["judge=keywrd"], r"judge: unknown judge 'keywrd' \(did you mean 'keyword'\?\)"),
    "judge-option-typo": (["judge_options={substring: [no]}"],
                          r"judge_options\.substring: not an option of the keyword judge \(did you mean 'substrings'\?\)"),
    "judge-option-missing": (["judge=guard"], r"judge guard needs judge_options\.model"),
    "unknown-benchmark": (["benchmarks=[{name: demo-harmfull}]"],
                          r"did you mean 'demo-harmful'\?"),
    "unknown-kind": (["benchmarks=[{name: demo-harmful, kind: harmfull}]"],
                     r"benchmarks\.0\.kind: unknown kind 'harmfull' \(did you mean 'harmful'\?\)"),
    "unknown-metric": (["benchmarks=[{name: demo-arithmetic, kind: task, metric: exact}]"],
                       r"benchmarks\.0\.metric: unknown metric 'exact'"),
    "max-new-tokens-zero": (["generation.max_new_tokens=0"], r"generation\.max_new_tokens=0: must be >= 1"),
    "top-p-out-of-range": (["generation.top_p=2"], r"generation\.top_p=2\.0: must be <= 1"),
    "hub-dataset-offline": (["benchmarks=[{name: x, source: nobody-xyz/not-a-dataset}]"],
                            r"Hub is not reachable \(offline\)"),
}


@pytest.mark.parametrize("case", sorted(EVAL_CONFIG_CASES))
def test_bad_eval_config(case, tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    extra, pattern = EVAL_CONFIG_CASES[case]
    argv = ["eval", f"model.name={tiny_model_dir}", f"output_dir={tmp_path / 'e'}",
            "benchmarks=[{name: demo-harmful}]", *extra]
    expect_error(f"config/eval-{case}", argv, pattern, capsys)
    assert not (tmp_path / "e" / "generations.jsonl").exists()


def test_bad_yaml_and_missing_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: 1e-4\n")
    expect_error("config/invalid-yaml", ["train", str(bad)], r"bad\.yaml: not valid YAML", capsys)
    expect_error("config/missing-file", ["train", str(tmp_path / "none.yaml")],
                 r"none\.yaml does not exist", capsys)


# ---------------------------------------------------------------- paths


def test_output_dir_is_a_file(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "taken").write_text("x")
    argv = _train_argv(tmp_path, tiny_model_dir, f"output_dir={tmp_path / 'taken' / 'run'}")
    expect_error("paths/output-is-file", argv, r"taken is a file, not a directory", capsys)


def test_output_dir_not_writable(tmp_path, tiny_model_dir, capsys):
    argv = ["eval", f"model.name={tiny_model_dir}", "output_dir=/proc/stayaligned-test",
            "benchmarks=[{name: demo-harmful}]"]
    expect_error("paths/output-read-only", argv, r"output_dir=/proc/stayaligned-test: cannot "
                 r"create it|not writable", capsys)


# ---------------------------------------------------------------- runs


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_stale_eval_dir_of_another_model_is_refused(tmp_path, tiny_model_dir, tokenizer_dir, capsys):
    """Defect 1: a copied eval directory never lends its generations to another model or to
    other generation settings."""
    import shutil

    from conftest import make_tiny_model

    other = make_tiny_model(tmp_path / "other-model", tokenizer_dir, seed=1)
    base = ["eval", "benchmarks=[{name: demo-harmful, limit: 3}]", *TINY_EVAL]
    assert run_cli([*base, f"model.name={tiny_model_dir}", f"output_dir={tmp_path / 'a'}"],
                   capsys)[0] == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copy = f"output_dir={tmp_path / 'b'}"
    expect_error("runs/stale-eval-other-model", [*base, f"model.name={other}", copy],
                 r"different setup \(changed: model\..*--overwrite", capsys)
    expect_error("runs/stale-eval-generation-settings",
                 [*base, f"model.name={tiny_model_dir}", copy, "generation.max_new_tokens=4",
                  "generation.do_sample=true"],
                 r"changed: generation\.do_sample, generation\.max_new_tokens", capsys)
    code, err = run_cli([*base, f"model.name={other}", copy, "--overwrite"], capsys)
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    stamp = json.loads((tmp_path / "b" / "fingerprint.json").read_text())
    recovered("runs/stale-eval-overwrite", code == 0 and metrics["model"] == str(other)
              and stamp["model"]["base"]["path"] == str(other.resolve()), err)


def test_nonfinite_weights_are_never_saved(tmp_path, tiny_model_dir, capsys):
    """Defect 2: lr=1e39 turns every weight infinite after one step: the run fails naming the
    step and the parameter, and no adapter or checkpoint is written."""
    argv = _train_argv(tmp_path, tiny_model_dir, "optim.lr=1e39", "optim.max_steps=1")
    expect_error("runs/nonfinite-final", argv, r"parameter .*lora.* is not finite after step 1, "
                 r"so the final model was not saved", capsys)
    run = tmp_path / "run"
    assert not (run / "adapter").exists()
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    argv = _train_argv(tmp_path / "c", tiny_model_dir, "optim.lr=1e39", "save_steps=1")
    expect_error("runs/nonfinite-checkpoint", argv, r"is not finite after step 1, so the "
                 r"checkpoint at step 1 was not saved", capsys)
    assert not list((tmp_path / "c" / "run").rglob("checkpoint-*"))


def _hold_lock(directory: Path):
    code = ("import sys, time; from stayaligned.runlock import run_lock\n"
            f"with run_lock({str(directory)!r}):\n    print('held', flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_and_a_dead_holder_is_taken_over(tmp_path, tiny_model_dir, capsys):
    """Defect 3: one writer per run directory."""
    from stayaligned.runlock import LOCK_NAME

    holder = _hold_lock(tmp_path / "run")
    try:
        expect_error("runs/second-writer", _train_argv(tmp_path, tiny_model_dir),
                     rf"in use by another stayaligned process \(PID {holder.pid}\)", capsys)
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "run" / LOCK_NAME).read_text().strip() == str(holder.pid)  # left behind
    code, err = run_cli(_train_argv(tmp_path, tiny_model_dir), capsys)
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    recovered("runs/stale-lock-dead-pid", code == 0 and manifest["status"] == "complete", err)


def test_resume_with_a_changed_config_is_refused(tmp_path, tiny_model_dir, capsys):
    """Defect 4: --resume never trains with other settings than the run's."""
    assert run_cli(_train_argv(tmp_path, tiny_model_dir, "save_steps=1"), capsys)[0] == 0
    expect_error("runs/resume-changed-config",
                 [*_train_argv(tmp_path, tiny_model_dir, "save_steps=1", "optim.lr=0.5"),
                  "--resume"], r"changed: config\.optim\.lr\).*--overwrite", capsys)
    expect_error("runs/existing-run", _train_argv(tmp_path, tiny_model_dir, "save_steps=1"),
                 r"already holds a run; pass --resume", capsys)


def test_resume_skips_an_incomplete_checkpoint(tmp_path, tiny_model_dir, capsys):
    """Defect 5: an empty or partial checkpoint-N (a killed write) is skipped on --resume."""
    argv = _train_argv(tmp_path, tiny_model_dir, "save_steps=1", "optim.max_steps=3",
                       "save_total_limit=5")
    assert run_cli(argv, capsys)[0] == 0
    reference = _adapter(tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    import shutil

    shutil.rmtree(tmp_path / "run" / "adapter")
    shutil.rmtree(ckpts / "checkpoint-3")
    (ckpts / "checkpoint-3").mkdir()  # empty, as a kill right after mkdir leaves it
    (ckpts / "checkpoint-2" / "trainer_state.json").unlink()  # partial
    (ckpts / ".staging" / "checkpoint-4").mkdir(parents=True)
    code, err = run_cli([*argv, "--resume"], capsys)
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    resumed = _adapter(tmp_path / "run")
    same = all(bool((resumed[k] == reference[k]).all()) for k in reference)
    recovered("runs/killed-checkpoint-write", code == 0 and same and
              manifest["resumed_from"].endswith("checkpoint-1"), err)


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint: 503 for every request (mode dead) or an answer that
    echoes the Authorization header (mode echo)."""

    mode, calls = "dead", []

    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).calls.append(1)
        if self.mode == "dead":
            self.send_response(503)
            self.end_headers()
            return
        text = f"#thereason: I saw {self.headers.get('Authorization')}\n#thescore: 1"
        body = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    servers = []

    def start(mode):
        handler = type("Handler", (_Judge,), {"mode": mode, "calls": []})
        server = HTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/v1", handler

    yield start
    for server in servers:
        server.shutdown()


def _rubric_argv(tmp_path, model_dir, url, key_env="null") -> list[str]:
    return ["eval", f"model.name={model_dir}", f"output_dir={tmp_path / 'e'}",
            "benchmarks=[{name: demo-harmful, limit: 6}]", *TINY_EVAL, "judge=rubric",
            f"judge_options={{base_url: '{url}', api_model: m, api_key_env: {key_env}, "
            "max_retries: 1, backoff: 0}"]


def test_dead_judge_endpoint_fails_loudly(tmp_path, tiny_model_dir, capsys, judge_server):
    """Defect 6: unscored items are reported, the rate is null, the exit code is 1, and the
    circuit breaker stops after 3 failed items (2 attempts each)."""
    url, handler = judge_server("dead")
    expect_error("runs/dead-judge", _rubric_argv(tmp_path, tiny_model_dir, url),
                 r"6 item\(s\) could not be judged", capsys, code=1)
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())["benchmarks"]["demo-harmful"]
    assert metrics["unscored"] == 6 and metrics["attack_success_rate"]["value"] is None
    assert len(handler.calls) == 6
    judgments = (tmp_path / "e" / "judgments.jsonl").read_text()
    assert judgments.count("circuit breaker") == 3


def test_closed_port_judge_fails_loudly(tmp_path, tiny_model_dir, capsys):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    expect_error("runs/closed-port-judge",
                 _rubric_argv(tmp_path, tiny_model_dir, f"http://127.0.0.1:{port}/v1"),
                 r"could not be judged", capsys, code=1)


def test_an_echoed_api_key_is_never_stored(tmp_path, tiny_model_dir, capsys, judge_server,
                                           monkeypatch):
    url, _ = judge_server("echo")
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("STAYALIGNED_TEST_KEY", secret)
    code, err = run_cli(_rubric_argv(tmp_path, tiny_model_dir, url, "STAYALIGNED_TEST_KEY"), capsys)
    stored = "".join(p.read_text() for p in (tmp_path / "e").glob("judgments*.jsonl"))
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())["benchmarks"]["demo-harmful"]
    recovered("runs/echoed-api-key", code == 0 and secret not in stored and "[REDACTED]" in stored
              and metrics["n"] == 6 and metrics["scores"]["1"] == 6, err)


def test_an_eval_dir_of_a_model_retrained_in_place_is_refused(tmp_path, tiny_model_dir, capsys,
                                                             monkeypatch):
    """A stayaligned run retrained into the same directory keeps its weights file's size and
    safetensors header; its old evaluation's generations must not be reused for it."""
    from stayaligned import fingerprint

    # every file weighed as a large one (size and header only), as a real adapter or model is
    monkeypatch.setattr(fingerprint, "SMALL_FILE", 0)
    argv = _train_argv(tmp_path, tiny_model_dir)
    assert run_cli(argv, capsys)[0] == 0
    run = tmp_path / "run"
    base = ["eval", "benchmarks=[{name: demo-harmful, limit: 3}]", *TINY_EVAL,
            f"model.name={run}", f"output_dir={tmp_path / 'eval'}"]
    assert run_cli(base, capsys)[0] == 0
    assert run_cli([*argv, "optim.lr=5.0e-3", "--overwrite"], capsys)[0] == 0
    expect_error("runs/stale-eval-retrained-model", base,
                 r"different setup \(changed: model\.record\.sha256\); pass --overwrite", capsys)
