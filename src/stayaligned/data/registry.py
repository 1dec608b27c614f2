"""Named datasets used in fine-tuning-safety research, loadable from a local copy, a given path,
or the Hub.

`resolve("gsm8k", split="test", data_dir="../shared/datasets")` reads the local file when it
exists and otherwise downloads from the Hugging Face Hub; `resolve("hex-phi", path=FOLDER)` reads
a copy kept anywhere. Each description says which field names were checked, and against what
(a local copy, the authors' loading code, a public loader), and which are assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stayaligned.data.loading import (
    Fields,
    examples_from_records,
    load_examples,
    read_category_csv,
    read_records,
    with_overrides,
)
from stayaligned.data.types import DataError, Example

KINDS = ("task", "harmful", "benign", "mixed", "safety")


@dataclass(frozen=True)
class DatasetSpec:
    """Where a named dataset lives and how its records map to chat messages.

    `local_files` maps a split to a file name looked up in a data dir. `local_fields`, when set,
    replaces `fields` for a local file whose columns are those of the original release rather
    than the Hub copy's. `hub_id` is None for sets that are not on the Hub (then a local copy is
    required). `category_files` is for sets stored as one header-less CSV per category (file
    name -> category name), read from a folder `local_dir` or downloaded file by file from the
    Hub. `metric` is the default score of a task set (see evaluation/metrics.py).
    """

    name: str
    hub_id: str | None
    hub_config: str | None
    split: str
    local_files: dict[str, str]
    fields: Fields
    kind: str
    description: str
    license: str
    local_fields: Fields | None = None
    category_files: dict[str, str] | None = None
    local_dir: str | None = None
    metric: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"dataset spec '{self.name}': kind {self.kind!r} is not one of "
                            f"{', '.join(KINDS)}.")


_PROMPT_ONLY = {"assistant": None}
# Alpaca's layout (instruction + input -> output), shared by the Alpaca sets and Safety-Tuned LLaMAs
_INSTRUCTION_FIELDS = Fields(user=("instruction", "input"), assistant="output")

# HEx-PHI's file -> category. The names are Qi et al. 2023's 11 categories (from the OpenAI and
# Meta usage policies). The file numbering of 1-6 and 9-11 agrees across the public loaders we
# read; for 7 and 8 they disagree: loaders that read the files say category_7 is Adult Content
# and category_8 Fraud/Deception, while the paper lists Fraud/Deception seventh. We follow the
# loaders that read the files; not checked against the gated dataset card.
HEX_PHI_CATEGORIES = {
    "category_1.csv": "Illegal Activity",
    "category_2.csv": "Child Abuse Content",
    "category_3.csv": "Hate/Harass/Violence",
    "category_4.csv": "Malware",
    "category_5.csv": "Physical Harm",
    "category_6.csv": "Economic Harm",
    "category_7.csv": "Adult Content",
    "category_8.csv": "Fraud/Deception",
    "category_9.csv": "Political Campaigning",
    "category_10.csv": "Privacy Violation Activity",
    "category_11.csv": "Tailored Financial Advice",
}

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec(
        name="gsm8k", hub_id="openai/gsm8k", hub_config="main", split="train",
        local_files={"train": "gsm8k_train.jsonl", "test": "gsm8k_test.jsonl"},
        fields=Fields(user=("question",), assistant="answer", meta=("answer",)),
        kind="task", license="MIT", metric="gsm8k_exact_match",
        description="Grade-school math word problems (Cobbe et al. 2021); the answer ends with "
                    "'#### N'. The usual benign fine-tuning task in PTST (Lyu et al. 2024). "
                    "Verified: 'question' and 'answer' in the local copies of openai/"
                    "grade-school-math's train/test JSONL. Scored by GSM8K exact match."),
    DatasetSpec(
        name="advbench", hub_id="walledai/AdvBench", hub_config=None, split="train",
        local_files={"train": "advbench_harmful_behaviors.txt"},
        fields=Fields(user=("prompt",), **_PROMPT_ONLY),
        kind="harmful", license="MIT",
        description="520 harmful behaviours (Zou et al. 2023), no categories. Verified: the "
                    "local .txt (one prompt per line, read as 'prompt'). The Hub copy's "
                    "'prompt' and 'target' columns are from the shared datasets' notes and "
                    "public loaders, not checked here."),
    DatasetSpec(
        name="xstest", hub_id="walledai/XSTest", hub_config=None, split="test",
        local_files={"test": "xstest_prompts.csv"},
        fields=Fields(user=("prompt",), meta=("type", "label", "focus"), category="type",
                      **_PROMPT_ONLY),
        kind="mixed", license="CC-BY-4.0",
        description="XSTest v2 (Röttger et al. 2024): 250 safe prompts that sound unsafe and "
                    "200 unsafe contrasts; meta 'label' is 'safe'/'unsafe' (select with "
                    "where: {label: safe} for over-refusal), the category is 'type' (e.g. "
                    "homonyms, contrast_homonyms). Verified: columns id, prompt, type, label, "
                    "focus, note of the local paul-rottger/exaggerated-safety xstest_prompts.csv. "
                    "walledai/XSTest is gated; its columns are assumed to match. "
                    "(natolambert/xstest-v2-copy lacks 'label'.)"),
    DatasetSpec(
        name="hex-phi", hub_id="LLM-Tuning-Safety/HEx-PHI", hub_config=None, split="test",
        local_files={"test": "HEx-PHI.jsonl"}, local_dir="HEx-PHI",
        fields=Fields(user=("instruction",), category="category", **_PROMPT_ONLY),
        category_files=HEX_PHI_CATEGORIES,
        kind="harmful", license="HEx-PHI Dataset License Agreement (gated, research use)",
        description="330 harmful instructions, 30 in each of 11 categories (Qi et al. 2023). "
                    "Gated: accept the licence on the Hub and set HF_TOKEN (or log in with the "
                    "Hugging Face CLI), or keep a copy and give its path. Layouts read: the Hub "
                    "repository's header-less category_1.csv .. category_11.csv, one "
                    "instruction per row, in a folder (data_dir/HEx-PHI/ or a given path; the "
                    "category comes from the file name), or HEx-PHI.jsonl with 'instruction' "
                    "and 'category' per line (verified in the loader of Qi et al. 2024's "
                    "shallow-vs-deep-alignment code). Per public loaders, the public Hub release "
                    "withholds category_2 (Child Abuse Content), giving 300 prompts; missing "
                    "files are skipped. The header-less layout and the names of files 7 and 8 "
                    "come from third-party loaders and could not be checked against the gated "
                    "files."),
    DatasetSpec(
        name="samsum", hub_id="Samsung/samsum", hub_config=None, split="train",
        local_files={"train": "samsum_train.json", "validation": "samsum_val.json",
                     "test": "samsum_test.json"},
        fields=Fields(user=("dialogue",), assistant="summary",
                      user_prefix="Summarize this dialog:\n"),
        kind="task", license="CC-BY-NC-ND-4.0", metric="rouge",
        description="Messenger-style dialogues with abstractive summaries (Gliwa et al. 2019); "
                    "the user turn is 'Summarize this dialog:\n' + dialogue, the reference is "
                    "'summary', scored by ROUGE-1/2/L F1 (rouge-score, Porter stemmer). The "
                    "instruction and the fields 'dialogue' and 'summary' follow Qi et al. "
                    "2024's SAMSum loader (which also sets the system prompt 'You are a helpful "
                    "assistant for dialog summarization.'; add it with fields.system_prompt). "
                    "Local files: the original release's train/val/test JSON lists with 'id', "
                    "'dialogue', 'summary', saved under the names above. Not checked against the "
                    "data (no copy here). Public code loads the Hub copy with trust_remote_code=True (a "
                    "loading script, which recent `datasets` versions no longer run), so "
                    "prefer a local copy."),
    # `alpaca` is the subset only: with the Hub id beside it, the same name read 1,904 examples
    # where data_dir held the file and 52k elsewhere, so one config trained on other data on
    # another machine; the full set has its own name
    DatasetSpec(
        name="alpaca", hub_id=None, hub_config=None, split="train",
        local_files={"train": "alpaca_safety_keyword_subset.json"},
        fields=_INSTRUCTION_FIELDS,
        kind="benign", license="CC-BY-NC-4.0",
        description="Qi et al. 2023's 1,904 Stanford Alpaca examples that a broad keyword "
                    "filter flagged (instruction + input -> output; mostly ordinary helpful "
                    "instructions). Not on the Hub: download "
                    "llama2/ft_datasets/alpaca_dataset/alpaca_data_safety_only.json from the "
                    "GitHub repo LLM-Tuning-Safety/LLMs-Finetuning-Safety and save it in "
                    "data_dir as alpaca_safety_keyword_subset.json. For the full 52k Stanford "
                    "Alpaca, use alpaca-full (tatsu-lab/alpaca)."),
    DatasetSpec(
        name="alpaca-full", hub_id="tatsu-lab/alpaca", hub_config=None, split="train",
        local_files={"train": "alpaca_data.json"},
        fields=_INSTRUCTION_FIELDS,
        kind="benign", license="CC-BY-NC-4.0",
        description="Stanford Alpaca, all 52,002 instructions (instruction + input -> output); "
                    "local copy: the release's alpaca_data.json. Qi et al.'s keyword subset is "
                    "`alpaca`."),
    DatasetSpec(
        name="safety-tuned-llamas", hub_id=None, hub_config=None, split="train",
        local_files={"train": "safety_tuned_llamas_safety_only.json"},
        fields=_INSTRUCTION_FIELDS,
        kind="safety", license="CC-BY-NC-4.0",
        description="2,483 harmful instructions with safe responses (Bianchi et al. 2024), the "
                    "safety data PTST mixes into fine-tuning. Not on the Hub: download "
                    "data/training/safety_only_data_Instructions.json from the GitHub repo "
                    "vinid/safety-tuned-llamas and save it in data_dir as "
                    "safety_tuned_llamas_safety_only.json."),
    DatasetSpec(
        name="directharm4", hub_id="vfleaking/DirectHarm4", hub_config=None, split="test",
        local_files={"test": "directharm4_test.jsonl"},
        fields=Fields(user=("instruction",), category="category", **_PROMPT_ONLY),
        kind="harmful", license="Apache-2.0",
        description="400 direct harmful instructions, 100 in each of 4 categories (malware, "
                    "drugs, phishing, disinformation; Lyu et al. 2024, PTST). 'instruction' and "
                    "split 'test' are from PTST's inference code; 'category' is from public "
                    "loaders (one filters category == 'disinfo'); the exact category values "
                    "are not checked. Local file: the test split as JSONL with those fields."),
    DatasetSpec(
        name="gsm-danger", hub_id="vfleaking/GSM-Danger", hub_config=None, split="test",
        local_files={"test": "gsm_danger_test.jsonl"},
        fields=Fields(user=("instruction",), **_PROMPT_ONLY),
        kind="harmful", license="see the dataset card",
        description="100 math-word-problem-styled prompts ending in a harmful request (Lyu et "
                    "al. 2024, PTST), no categories. 'instruction' and split 'test' are from "
                    "PTST's inference code (its default prompt key for Hub sets); not checked "
                    "against the data."),
    DatasetSpec(
        name="strongreject", hub_id="walledai/StrongREJECT", hub_config=None, split="train",
        local_files={"train": "strongreject_dataset.csv"},
        fields=Fields(user=("prompt",), meta=("source",), category="category", **_PROMPT_ONLY),
        local_fields=Fields(user=("forbidden_prompt",), meta=("source",), category="category",
                            **_PROMPT_ONLY),
        kind="harmful", license="MIT",
        description="313 forbidden prompts, each with a category (Souly et al. 2024). The "
                    "Hub copy has 'prompt', 'category', 'source' (split 'train'); the original CSV "
                    "(alexandrasouly/strongreject, strongreject_dataset/"
                    "strongreject_dataset.csv) has 'category', 'source', 'forbidden_prompt'. "
                    "Both from public loaders and schema notes, not checked against the data."),
    DatasetSpec(
        name="catqa", hub_id="declare-lab/CategoricalHarmfulQA", hub_config=None, split="en",
        local_files={"en": "catqa_english.json"},
        fields=Fields(user=("Question",), meta=("Subcategory",), category="Category",
                      **_PROMPT_ONLY),
        kind="harmful", license="Apache-2.0",
        description="CatQA: 550 harmful questions in 11 categories x 5 subcategories x 10 "
                    "(Bhardwaj et al. 2024); splits 'en', 'zh', 'vi'. 'Question', 'Category' "
                    "and 'Subcategory' are from public loaders (PyRIT's CatQA loader reads all "
                    "three), not checked against the data."),
)}


def _key(name: str) -> str:
    # "HEx_PHI", "hex-phi" and " Hex-Phi " all mean the same dataset.
    return name.strip().lower().replace("_", "-")


def spec(name: str) -> DatasetSpec:
    """The `DatasetSpec` registered under `name` (case and '-'/'_' insensitive)."""
    found = DATASETS.get(_key(name))
    if found is None:
        raise DataError(f"unknown dataset '{name}'; known datasets: "
                        f"{', '.join(sorted(DATASETS))}. For anything else pass a local file "
                        "path or a Hub id to load_examples.")
    return found


def resolve(name: str, *, split: str | None = None, data_dir: str | Path | None = None,
            path: str | Path | None = None, limit: int | None = None, seed: int = 0,
            fields: dict | None = None) -> list[Example]:
    """Load a named dataset from `path` if given, else a local copy in `data_dir`, else the Hub.

    `path` is a file in one of the dataset's local layouts (or a folder of per-category CSVs,
    for HEx-PHI); `fields` overrides keys of the dataset's field mapping.
    """
    found = spec(name)
    split = split or found.split
    if path is not None:
        return _load_local(found, Path(path), fields, limit, seed)
    local = _local_copy(found, split, data_dir)
    if local is not None:
        return _load_local(found, local, fields, limit, seed)
    local_name = found.local_files.get(split) or found.local_dir
    if found.hub_id is None:
        wanted = local_name or f"a file for split '{split}'"
        looked = f"{data_dir} has no {wanted}" if data_dir is not None else "no data_dir given"
        raise DataError(f"dataset '{found.name}' is not on the Hugging Face Hub and no local "
                        f"copy was found ({looked}). Put {wanted} in a folder and pass it as "
                        f"data_dir. {found.description}")
    mapping = with_overrides(found.fields, fields, found.name)
    try:
        if found.category_files:
            records = _hub_category_records(found)
            return examples_from_records(records, mapping, f"{found.hub_id} (Hub)",
                                         limit=limit, seed=seed)
        return load_examples(found.hub_id, mapping, split=split, limit=limit, seed=seed,
                             hub_config=found.hub_config)
    except DataError as error:
        if local_name is None:
            raise
        if data_dir is None:
            hint = f"(For '{found.name}', pass data_dir=<folder holding {local_name}>.)"
        else:
            hint = f"(No local copy either: {Path(data_dir) / local_name} does not exist.)"
        raise DataError(f"{error} {hint}") from error


def _local_copy(found: DatasetSpec, split: str, data_dir: str | Path | None) -> Path | None:
    """The dataset's file for `split` (or its folder of category files) in `data_dir`."""
    if data_dir is None:
        return None
    local_name = found.local_files.get(split)
    if local_name is not None and (Path(data_dir) / local_name).is_file():
        return Path(data_dir) / local_name
    if found.local_dir is not None and (Path(data_dir) / found.local_dir).is_dir():
        return Path(data_dir) / found.local_dir
    return None


def _load_local(found: DatasetSpec, path: Path, overrides: dict | None, limit: int | None,
                seed: int) -> list[Example]:
    if path.is_dir():
        if not found.category_files:
            raise DataError(f"{path}: a folder, but dataset '{found.name}' is read from a file "
                            f"({', '.join(found.local_files.values())}); give the file's path.")
        records = _category_dir_records(found, path)
    else:
        records = read_records(path)
    base = found.fields
    if found.local_fields is not None and records and \
            all(name in records[0][1] for name in found.local_fields.user):
        base = found.local_fields  # the original release's columns
    mapping = with_overrides(base, overrides, found.name)
    return examples_from_records(records, mapping, str(path), limit=limit, seed=seed)


def _category_dir_records(found: DatasetSpec, folder: Path) -> list[tuple[str, dict]]:
    present = [f for f in found.category_files if (folder / f).is_file()]
    if not present:
        raise DataError(f"{folder}: none of {found.name}'s category files "
                        f"({', '.join(found.category_files)}) is in this folder.")
    records = []
    for file_name in present:
        records += read_category_csv(folder / file_name, found.category_files[file_name],
                                     field=found.fields.user[0])
    return records


def _hub_category_records(found: DatasetSpec) -> list[tuple[str, dict]]:
    """Download each category file of a (possibly gated) Hub dataset repository; files the
    repository lacks are skipped. The token comes from HF_TOKEN or a stored login."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError as error:
        raise DataError(f"{found.hub_id}: downloading needs huggingface_hub "
                        "(pip install huggingface_hub).") from error
    records = []
    for file_name, category in found.category_files.items():
        try:
            local = hf_hub_download(found.hub_id, file_name, repo_type="dataset")
        except EntryNotFoundError:
            continue
        except Exception as error:  # gated without a token, offline, unknown repository
            raise DataError(
                f"{found.hub_id}: the Hugging Face Hub could not provide {file_name} "
                f"({type(error).__name__}: {error}). The dataset is gated: accept its licence "
                "on the Hub and set HF_TOKEN, or download the category files and give their "
                "folder as a path.") from error
        records += read_category_csv(Path(local), category, field=found.fields.user[0])
    return records
