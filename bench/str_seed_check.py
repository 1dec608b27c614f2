"""STR's unaligned-seed check on a real model: the share of the mining prompts (demo-harmful,
split align) that the model refuses within 24 greedy tokens (keyword judge), as setup measures
it, and the tokens it would mine. Writes bench/results/str_seed_check_<name>.json.

  PYTHONPATH=src python bench/str_seed_check.py embedded 32
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from stayaligned.config import ModelConfig
from stayaligned.methods.reference import Reference
from stayaligned.methods.str import StrOptions, mine_tokens
from stayaligned.models import load_model
from stayaligned.runfiles import write_json


def main(name: str, n_prompts: int) -> dict:
    model, tokenizer = load_model(ModelConfig(name=name))
    started = time.time()
    options = StrOptions(n_prompts=n_prompts)
    payload = mine_tokens(model, tokenizer, options, Reference(model))
    result = {"model": name, "n_prompts": n_prompts, "mining_source": options.mining_source,
              "seed_refusal_share": payload["seed_refusal_share"],
              "min_refusal_share": options.min_refusal_share,
              "stops": payload["seed_refusal_share"] < options.min_refusal_share,
              "tokens": payload["tokens"][:12], "seconds": round(time.time() - started, 1),
              "command": f"PYTHONPATH=src python bench/str_seed_check.py {name} {n_prompts}"}
    slug = Path(name).name or name
    write_json(Path(__file__).parent / "results" / f"str_seed_check_{slug}.json", result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 100)
