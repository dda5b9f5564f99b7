"""Write the run's results: a standard PEFT adapter folder and ``summary.json``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from common.arrays import to_state
from common.config import RunConfig
from common.fsutil import atomic_write_text
from common.modeling import load_adapter_state, load_base_model, make_peft_model


def write_adapter(cfg: RunConfig, arrays: ArrayRecord, out: Path) -> Path:
    """Save ``arrays`` as a PEFT adapter directory loadable by ``PeftModel.from_pretrained``.

    Written to a temporary sibling and renamed, so ``out`` is never half-written.
    """
    model = make_peft_model(load_base_model(cfg.model_dir), cfg.lora)
    load_adapter_state(model, to_state(arrays))
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """Atomically write the run summary as pretty JSON."""
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
