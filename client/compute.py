"""The site's compute: device, base precision, quantization, gradient checkpointing, a memory ceiling.

The hardware is the site's decision, so these settings live in the site policy's ``[compute]``
section and no request can change them. Whatever the base model's precision -- float32, bfloat16,
float16, or 4-/8-bit through bitsandbytes (QLoRA) -- the LoRA weights, their per-record gradients,
the clipping and the noise stay in float32 (:func:`prepare_for_dp`), so the DP mechanism the ledger
records is the same on every path. :func:`resolve` turns the section into a :class:`Compute` plan
with clear errors (CUDA asked for and absent, bitsandbytes unable to run, a model that will not fit)
before anything is reserved; :func:`load_base` loads the base model under that plan.

Gradient checkpointing uses torch's *reentrant* checkpoint: with the non-reentrant one, Opacus's
backward hooks on the LoRA layers never fire and no per-record gradient exists
(``tests/client/test_compute.py`` shows both); :class:`client.train.DPStepper` refuses a backward pass
that left a LoRA tensor without per-record gradients, so a future change cannot break this silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.declare import Rule, at_least, one_of, option
from common.errors import ConfigError
from common.modeling import load_base_model, make_peft_model

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from common.config import LoraSpec

__all__ = [
    "Compute",
    "ComputeSection",
    "estimate_bytes",
    "load_base",
    "peft_for_dp",
    "prepare_for_dp",
    "resolve",
]

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "nf4", "int8")
_BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0, "nf4": 0.5625}
_HEADROOM = 1.25  # activations, LoRA state, optimizer and CUDA context on top of the weights (at least)


def _device_ok(value: str) -> bool:
    return value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())


@dataclass(frozen=True)
class ComputeSection:
    """``[compute]``: where and in what precision the site trains (the site's hardware, its decision)."""

    device: str = option(
        "device", "auto", "where training runs", Rule("auto, cpu, cuda or cuda:N", _device_ok)
    )
    dtype: str = option("dtype", "auto", "the base model's weights (LoRA stays float32)", one_of(DTYPES))
    quantization: str = option(
        "quantization", "none", "the base model in 4 bits (NF4, QLoRA) or 8 bits (bitsandbytes)",
        one_of(QUANTIZATIONS),
    )  # fmt: skip
    gradient_checkpointing: bool = option(
        "gradient-checkpointing",
        False,
        "recompute activations in backward (less memory)",
        Rule("true or false"),
    )
    max_memory_gb: float = option(
        "max-memory-gb", 0.0, "the most memory training may use", at_least(0, note="0: the device's own")
    )


@dataclass(frozen=True)
class Compute:
    """A resolved compute plan: the device and dtypes training actually uses."""

    device: str
    dtype: str
    quantization: str
    gradient_checkpointing: bool
    max_memory_bytes: int | None

    @property
    def is_cuda(self) -> bool:
        """Whether training runs on a CUDA device."""
        return self.device.startswith("cuda")

    def torch_dtype(self) -> torch.dtype:
        """The base model's floating-point dtype (the compute dtype of a quantized base)."""
        import torch

        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]

    def describe(self) -> str:
        """One line for logs and the site's round report."""
        quant = "" if self.quantization == "none" else f", {self.quantization} base"
        ckpt = ", gradient checkpointing" if self.gradient_checkpointing else ""
        return f"{self.device}, {self.dtype}{quant}{ckpt}"


def resolve(section: ComputeSection, *, where: str = "[compute]", local_rank: int | None = None) -> Compute:
    """The compute plan of ``section`` on this machine; ``ConfigError`` naming the key and the fix.

    ``local_rank``: this process is one of several ranks on the machine (``client.distributed``);
    ``cuda`` / ``auto`` then mean this rank's own GPU, ``cuda:<local rank>``.
    """
    import torch

    has_cuda = torch.cuda.is_available()
    device = section.device
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
    if device.startswith("cuda"):
        if local_rank is not None and ":" in device:
            raise ConfigError(
                where,
                [f"device = '{device}' names one GPU but torchrun started several ranks on this "
                 "machine: set device = 'cuda' (each rank takes its own GPU)"],
            )  # fmt: skip
        if not has_cuda:
            raise ConfigError(
                where,
                [f"device = '{section.device}' but torch {torch.__version__} sees no CUDA device: "
                 "install a CUDA build of torch and the driver, or set device = 'cpu'"],
            )  # fmt: skip
        index = int(device[5:]) if ":" in device else (local_rank or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(
                where,
                [f"device = '{device}' but only {torch.cuda.device_count()} CUDA device(s) exist: "
                 f"use cuda:0..cuda:{torch.cuda.device_count() - 1}"],
            )  # fmt: skip
        device = f"cuda:{index}"
    dtype = section.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if section.quantization != "none":
        _check_bitsandbytes(device, where)
    limit = int(section.max_memory_gb * 2**30) if section.max_memory_gb > 0 else None
    return Compute(device, dtype, section.quantization, section.gradient_checkpointing, limit)


def _check_bitsandbytes(device: str, where: str) -> None:
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ConfigError(
            where,
            [f"quantization needs bitsandbytes, which does not import ({exc}): "
             "pip install -c constraints.txt bitsandbytes, or set quantization = 'none'"],
        ) from None  # fmt: skip
    backends = getattr(bitsandbytes, "supported_torch_devices", None)
    kind = device.split(":")[0]
    if backends is not None and kind not in backends:
        raise ConfigError(
            where,
            [f"bitsandbytes {bitsandbytes.__version__} cannot run on '{kind}' "
             f"(it supports {', '.join(sorted(backends))}): set quantization = 'none' or another device"],
        )  # fmt: skip


def _parameter_count(path: Path) -> int:
    """Parameters of the model in ``path``, from its safetensors headers (nothing is loaded)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            names = weights.keys()  # a safe_open handle is not iterable
            total += sum(math.prod(weights.get_slice(k).get_shape()) for k in names)
    if total == 0:  # .bin checkpoints: count from the bytes, assuming float32
        total = sum(f.stat().st_size for f in path.glob("*.bin")) // 4
    return total


def estimate_bytes(path: str | Path, compute: Compute) -> int:
    """Memory the base model's weights take under ``compute``, plus headroom (an estimate, not a bound)."""
    per = _BYTES_PER_PARAM[compute.dtype if compute.quantization == "none" else compute.quantization]
    return int(_parameter_count(Path(path)) * per * _HEADROOM)


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_fit(path: str | Path, compute: Compute, *, where: str = "[compute]") -> None:
    """Refuse a base model that will not fit the ceiling (or the CUDA device), before any reservation."""
    need = estimate_bytes(path, compute)
    limit = compute.max_memory_bytes
    if limit is None and compute.is_cuda:
        import torch

        limit = torch.cuda.get_device_properties(compute.device).total_memory
    if limit is not None and need > limit:
        hint = "quantization = 'nf4'" if compute.quantization == "none" else "a smaller base model"
        raise ConfigError(
            where,
            [f"the base model needs about {_size(need)} under {compute.describe()}, more than "
             f"the {_size(limit)} allowed: use {hint}, or raise max-memory-gb"],
        )  # fmt: skip


def load_base(path: str | Path, compute: Compute) -> PreTrainedModel:
    """The base model under ``compute``: on its device, in its dtype, quantized if asked, frozen."""
    import torch

    if compute.quantization == "none":
        model = load_base_model(path, dtype=compute.torch_dtype()).to(compute.device)  # type: ignore[arg-type]
    else:
        from transformers import BitsAndBytesConfig

        if compute.quantization == "nf4":
            quant = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute.torch_dtype(),
            )
        else:
            quant = BitsAndBytesConfig(load_in_8bit=True)
        model = load_base_model(
            path,
            dtype=compute.torch_dtype(),
            quantization_config=quant,
            device_map={"": compute.device},
        )
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # norms in fp32
        if not compute.is_cuda:
            _no_cpu_inference_packing(model)
    if compute.is_cuda and compute.max_memory_bytes is not None:
        total = torch.cuda.get_device_properties(compute.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, compute.max_memory_bytes / total), compute.device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _no_cpu_inference_packing(model: Any) -> None:
    """Keep bitsandbytes' 4-bit CPU layers in their training layout when the model evaluates.

    bitsandbytes 0.50 repacks a ``Linear4bit``'s weight in place the first time it runs in eval mode on
    a CPU with AVX512-BF16, and asserts out when the layer's output size is not a multiple of 32 (the
    embedded model's MLP has 172); the site evaluates and trains the same model, so it keeps one layout.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def prepare_for_dp(model: Any, compute: Compute) -> Any:
    """Make a LoRA-wrapped base trainable under DP: LoRA in float32, checkpointing that Opacus can see.

    On the PEFT model: every trainable tensor is cast to float32, and gradient checkpointing (if
    asked) is switched on in its reentrant form, with inputs that require gradients so that the
    checkpointed blocks are differentiated.
    """
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if compute.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
        model.config.use_cache = False
    return model


def peft_for_dp(base: PreTrainedModel, lora: LoraSpec, compute: Compute) -> Any:
    """``base`` with a fresh ``lora`` adapter, ready for DP-SGD (:func:`prepare_for_dp`).

    The adapter's random initialisation leaves torch's global generators as they were.
    """
    import torch

    with torch.random.fork_rng():
        return prepare_for_dp(make_peft_model(base, lora), compute)
