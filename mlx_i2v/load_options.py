"""What every family's loader (:mod:`mlx_i2v.families`) is given and shares: the resolved arguments of
:func:`~mlx_i2v.loading.load_pipeline` and the checks and state each family builds from them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx

from .lora.manager import TransformerLoras
from .lora.spec import LoRA
from .parallel import Parallel
from .quantize import Quantization, QuantizationConfig
from .resident import Resident
from .weights import check_safetensors, read_config


@dataclass(frozen=True)
class LoadOptions:
    """``load_pipeline``'s arguments, resolved (see its docstring): the model directory (diffusers or
    converted layout) and the name it was asked by, the dtypes, quantization, sampler, residency,
    parallel group and LoRAs."""

    model_dir: Path
    name: str
    dtype: mx.Dtype
    vae_dtype: mx.Dtype
    quantization: QuantizationConfig | None
    scheduler: str | None
    keep_resident: bool
    keep_experts_resident: bool
    parallel: Parallel
    loras: Sequence[LoRA | tuple] | None

    @property
    def transformer_quantization(self) -> Quantization | None:
        return self.quantization.transformer if self.quantization is not None else None

    @property
    def text_quantization(self) -> Quantization | None:
        return self.quantization.text_encoder if self.quantization is not None else None

    def index(self) -> dict[str, Any]:
        """The checkpoint's ``model_index.json``."""
        return read_config(self.model_dir, "model_index.json")

    def check_components(self, names: Sequence[str]) -> None:
        """Every named component folder has its config and complete safetensors (nothing large is read)."""
        for name in names:
            read_config(self.model_dir / name)
            check_safetensors(self.model_dir / name)

    def transformer_loras(self, folders: Sequence[Path]) -> TransformerLoras:
        """The LoRA state of the transformer(s) in ``folders`` (experts in order), the requested LoRAs set
        (checked against their shapes now), on top of those a converted directory has baked in."""
        from .convert.source import MLX_KEY

        baked = self.index().get(MLX_KEY, {}).get("loras", [])
        state = TransformerLoras([read_config(f) for f in folders], self.dtype, list(folders), baked=baked)
        state.set(self.loras, {})
        return state

    def quantized_bits(self) -> int | None:
        """The transformer's bits for planning: as stored in a converted directory, else as requested
        (a mismatch between the two is reported when the transformer loads)."""
        stored = read_config(self.model_dir / "transformer").get("quantization")
        requested = self.quantization
        return stored.get("bits") if isinstance(stored, dict) else (requested.bits if requested else None)

    def resident(self, name: str, load: Callable[[], Any]) -> Resident[Any]:
        """A component loaded when its stage starts, kept between stages when ``keep_resident``."""
        return Resident(name, load, self.keep_resident)
