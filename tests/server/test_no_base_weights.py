"""The coordinator builds the first adapter and exports the last without the base model's weights."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

LIMIT = 6 * 2**30  # address space the coordinator's process may use: far below the base model

# a 7B Llama's shape, stored in bfloat16: 13.5 GB of weights (27 GB in float32) -- and no weight file at all
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16",
}  # fmt: skip

SCRIPT = """
import json, resource, sys
from pathlib import Path
from common.config import RunConfig, default_run_config
from server.coordinator import initial_adapter
from server.export import write_adapter
root = Path(sys.argv[1])
keys = {"model-dir": str(root / "model"), "out-dir": str(root / "run")}
cfg = RunConfig.from_flower(default_run_config() | keys)
arrays, size = initial_adapter(cfg)
write_adapter(cfg, arrays, root / "adapter")
usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"base_bytes": size, "tensors": len(arrays), "peak": usage}))
"""


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def test_a_7b_coordinator_fits_in_far_less_memory_than_its_base_model(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(CONFIG))
    repo = Path(__file__).resolve().parents[2]
    env = os.environ | {"PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        env=env, capture_output=True, text=True, preexec_fn=_limit, timeout=600, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["base_bytes"] == 6_738_415_616 * 2 > LIMIT  # the weights could not even be mapped
    assert result["peak"] < 2 * 2**30
    assert result["tensors"] == 32 * 2 * 2  # q_proj and v_proj, A and B, in every layer
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(adapter) == 128 and all(not t.is_meta for t in adapter.values())
    b = [t for k, t in adapter.items() if "lora_B" in k]
    a = [t for k, t in adapter.items() if "lora_A" in k]
    assert all(float(t.abs().max()) == 0 for t in b) and all(float(t.abs().max()) > 0 for t in a)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "model") and config["r"] == 16
