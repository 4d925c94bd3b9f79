"""LoRA files of every Wan style, with random non-zero factors, for a given reference transformer.

The files are written the way their tools write them (lora.md §1.2-1.3):

* :func:`peft_lora`: diffusers/PEFT, saved by diffusers' own ``WanPipeline.save_lora_weights`` (keys
  ``transformer.<module>.lora_A/B.weight``, optional ``lora_B.bias``, the ``lora_adapter_metadata`` JSON);
* :func:`original_lora`: original Wan names under ``diffusion_model.`` (or another prefix, or none: DiffSynth
  and bare files) with ``lora_down/up`` or ``lora_A/B`` and optional ``.alpha`` (Wan2.2-Lightning, diffusion-pipe);
* :func:`kohya_lora`: musubi-tuner's ``lora_unet_blocks_N_self_attn_q.lora_down.weight`` + ``.alpha``;
* :func:`lightx2v_lora`: LightX2V's extractor: SVD pairs (no alpha) for large 2-D weights, full deltas
  ``.diff`` / ``.diff_b`` / ``.diff_m`` for everything else, norms included.

Original names come from ``ref_original.TRANSFORMER_TO_ORIGINAL``, the independent inverse table the
conversion tests already check against diffusers' converter.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch
from ref_original import TRANSFORMER_TO_ORIGINAL
from safetensors.torch import save_file

StateDict = dict[str, torch.Tensor]

BLOCK_LINEARS = r"blocks\.\d+\.(attn[12]\.(to_[qkv]|to_out\.0)|ffn\.net\.(0\.proj|2))"
IMAGE_KV = r"blocks\.\d+\.attn2\.add_[kv]_proj"
TOP_LINEARS = (
    r"condition_embedder\.(time_embedder\.linear_[12]|time_proj|text_embedder\.linear_[12]"
    r"|image_embedder\.ff\.net\.(0\.proj|2))|proj_out"
)


def original_name(param: str) -> str:
    """The original Wan name of a diffusers parameter name."""
    for pattern, target in TRANSFORMER_TO_ORIGINAL:
        m = re.fullmatch(pattern, param)
        if m:
            return m.expand(target)
    raise KeyError(param)


def original_module(module: str) -> str:
    return original_name(f"{module}.weight").removesuffix(".weight")


def linear_modules(state: Mapping[str, torch.Tensor], pattern: str) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear whose diffusers module name full-matches ``pattern``."""
    return {k.removesuffix(".weight"): tuple(v.shape) for k, v in state.items()
            if k.endswith(".weight") and v.ndim == 2 and re.fullmatch(pattern, k.removesuffix(".weight"))}  # fmt: skip


def factors(shape: tuple[int, int], rank: int, gen: torch.Generator, strength: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """down (rank, in), up (out, rank) whose product is about ``strength`` times a default-initialised
    weight's rms."""
    out, inp = shape
    down = torch.randn(rank, inp, generator=gen) / inp**0.5
    up = torch.randn(out, rank, generator=gen) * strength / (3 * rank) ** 0.5
    return down, up


def save(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file, or a ``torch.save`` pickle for a .pth/.pt/.ckpt name."""
    path = Path(path)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        save_file(tensors, path, metadata=dict(metadata or {}))
    else:
        torch.save(tensors, path)
    return path


def peft_lora(
    state: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    rank: int = 4,
    alpha: float | None = 6.0,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    lora_bias: bool = False,
    pattern: str = BLOCK_LINEARS,
    seed: int = 0,
) -> Path:
    """A diffusers/PEFT LoRA saved by ``WanPipeline.save_lora_weights``; ``alpha`` None writes no metadata."""
    from diffusers import WanPipeline

    gen = torch.Generator().manual_seed(seed)
    rank_pattern = dict(rank_pattern or {})
    layers: StateDict = {}
    for module, shape in linear_modules(state, pattern).items():
        r = rank_pattern.get(module, rank)
        layers[f"{module}.lora_A.weight"], layers[f"{module}.lora_B.weight"] = factors(shape, r, gen)
        if lora_bias:
            layers[f"{module}.lora_B.bias"] = 0.1 * torch.randn(shape[0], generator=gen)
    metadata = None
    if alpha is not None:
        metadata = {"r": rank, "lora_alpha": alpha, "rank_pattern": rank_pattern,
                    "alpha_pattern": dict(alpha_pattern or {}), "target_modules": sorted({k.rsplit(".lora_", 1)[0] for k in layers}),
                    "lora_bias": lora_bias}  # fmt: skip
    path = Path(path)
    WanPipeline.save_lora_weights(path.parent, transformer_lora_layers=layers, weight_name=path.name,
                                  transformer_lora_adapter_metadata=metadata)  # fmt: skip
    return path


def original_lora(
    state: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    names: tuple[str, str] = ("lora_down", "lora_up"),
    prefix: str = "diffusion_model.",
    rank: int = 4,
    ranks: Mapping[str, int] | None = None,
    alpha: Mapping[str, float] | float | None = 8.0,
    pattern: str = BLOCK_LINEARS,
    diff_b: bool = False,
    seed: int = 1,
) -> Path:
    """Original Wan names (``<prefix>blocks.0.self_attn.q.lora_down.weight``), ``alpha`` per module or one
    for all (None: no alpha keys), ``diff_b`` bias deltas if asked."""
    gen = torch.Generator().manual_seed(seed)
    tensors: StateDict = {}
    for module, shape in linear_modules(state, pattern).items():
        name = prefix + original_module(module)
        r = (ranks or {}).get(module, rank)
        tensors[f"{name}.{names[0]}.weight"], tensors[f"{name}.{names[1]}.weight"] = factors(shape, r, gen)
        a = alpha.get(module) if isinstance(alpha, Mapping) else alpha
        if a is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(a))
        if diff_b:
            tensors[f"{name}.diff_b"] = 0.1 * torch.randn(shape[0], generator=gen)
    return save(path, tensors)


def kohya_lora(
    state: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    prefix: str = "lora_unet_",
    rank: int = 4,
    alpha: float | None = 2.0,
    pattern: str = BLOCK_LINEARS,
    seed: int = 2,
) -> Path:
    """musubi-tuner names: ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` and ``.alpha``."""
    gen = torch.Generator().manual_seed(seed)
    tensors: StateDict = {}
    for module, shape in linear_modules(state, pattern).items():
        name = prefix + original_module(module).replace(".", "_")
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = factors(shape, rank, gen)
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return save(path, tensors)


def lightx2v_lora(state: Mapping[str, torch.Tensor], path: str | Path, *, rank: int = 4, seed: int = 3) -> Path:
    """As LightX2V's extractor writes a distill LoRA: for every parameter of the model, a pair (no alpha)
    for a linear weight, ``.diff`` for the other weights (norms, ``head.head``, the patch embedding, whose
    real sizes are under its 1M threshold), ``.diff_b`` for biases, ``.diff_m`` for modulation tables; all
    under ``diffusion_model.``."""
    gen = torch.Generator().manual_seed(seed)
    pairs = linear_modules(state, BLOCK_LINEARS + "|" + IMAGE_KV + "|" + TOP_LINEARS)
    pairs.pop("proj_out")
    tensors: StateDict = {}
    for param, value in state.items():
        name = original_name(param)
        module = param.rsplit(".", 1)[0]
        if name.endswith("modulation"):
            tensors[f"diffusion_model.{name.removesuffix('.modulation')}.diff_m"] = 0.1 * torch.randn(value.shape, generator=gen)
        elif param.endswith(".weight") and module in pairs:
            stem = f"diffusion_model.{name.removesuffix('.weight')}"
            tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = factors(pairs[module], rank, gen)
        elif name.endswith(".weight"):
            tensors[f"diffusion_model.{name.removesuffix('.weight')}.diff"] = 0.05 * torch.randn(value.shape, generator=gen)
        elif name.endswith(".bias"):
            tensors[f"diffusion_model.{name.removesuffix('.bias')}.diff_b"] = 0.05 * torch.randn(value.shape, generator=gen)
        else:
            raise KeyError(param)  # pos_embed: not in the models these are built for
    return save(path, tensors)
