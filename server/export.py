"""Write the run's adapter as a standard PEFT adapter folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from flwr.app import ArrayRecord

from common.arrays import to_state
from common.config import RunConfig
from common.modeling import load_adapter_state, materialize_adapter, meta_peft_model


def write_adapter(cfg: RunConfig, arrays: ArrayRecord, out: Path) -> Path:
    """Save ``arrays`` as a PEFT adapter directory loadable by ``PeftModel.from_pretrained``.

    Written to a temporary sibling and renamed, so ``out`` is never half-written. The base model's
    weights are never loaded: the PEFT model is built on the meta device, its adapter on the CPU.
    """
    model = meta_peft_model(cfg.model_dir, cfg.lora)
    materialize_adapter(model)  # CPU storage for the adapter; its values come from ``arrays`` next
    load_adapter_state(model, to_state(arrays))
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
