"""Post-hoc repairs of a finished fine-tune: restore the aligned model's safety without
retraining. One module per method behind one protocol (`base.Repair`: `prepare(inputs) ->
state`, `apply(state, strength) -> weights`); `sweep` evaluates a knob sweep on a validation
split and picks the weakest strength that meets a safety target; `run.run_repair` is
`stayaligned repair`."""

from __future__ import annotations


def repairs() -> dict:
    """name -> Repair class (imported on use: no import-time work)."""
    from stayaligned.repair.merge import Merge
    from stayaligned.repair.resta import Resta
    from stayaligned.repair.safe_delta import SafeDelta
    from stayaligned.repair.safelora import SafeLora

    return {cls.name: cls for cls in (Merge, Resta, SafeLora, SafeDelta)}


METHOD_NAMES = ("merge", "resta", "safelora", "safe_delta")
