"""Reference LTX-Video transformers built with diffusers 0.42.1, for the LTX transformer tests and later
pipeline tests.

The tiny config keeps the real channel plumbing (``caption_channels != cross_attention_dim == inner_dim``,
in/out channels equal) with an inner width of 32 (32 % 6 = 2: one unrotated RoPE channel pair, like 2B's
2048). ``LTX_2B_1LAYER`` is one block at the real 2B widths.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import LTXVideoTransformer3DModel

TINY = dict(
    in_channels=8,
    out_channels=8,
    patch_size=1,
    patch_size_t=1,
    num_attention_heads=2,
    attention_head_dim=16,
    cross_attention_dim=32,
    num_layers=2,
    caption_channels=24,
)

# LTX-Video 2B (0.9.x) widths with a single block (diffusers' defaults are the 2B config).
LTX_2B_1LAYER = dict(num_layers=1)

# LTX-Video 13B (0.9.7 / 0.9.8), from diffusers' scripts/convert_ltx_to_diffusers.py get_transformer_config.
LTX_13B = dict(num_attention_heads=32, attention_head_dim=128, cross_attention_dim=4096, num_layers=48)

# The rename table of diffusers' ``convert_ltx_transformer_checkpoint_to_diffusers`` (single-file ->
# diffusers names), without its prefix entry; the tests invert it to write an original-layout checkpoint.
ORIGINAL_RENAMES = {
    "patchify_proj": "proj_in",
    "adaln_single": "time_embed",
    "q_norm": "norm_q",
    "k_norm": "norm_k",
}
ORIGINAL_PREFIX = "model.diffusion_model."


@torch.no_grad()
def _perturb_default_init(model: torch.nn.Module, generator: torch.Generator) -> None:
    """diffusers initialises the q/k norms to 1 and zero biases; add seeded noise to norms and the
    modulation tables so a mis-wired one shows."""
    for name, p in model.named_parameters():
        if "norm" in name or "scale_shift_table" in name:
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def build_transformer(path: str | Path | None, config: dict, *, seed: int = 0) -> LTXVideoTransformer3DModel:
    """A seeded, randomly initialised ``LTXVideoTransformer3DModel`` (float32, eval mode), saved to ``path``
    with ``save_pretrained`` unless ``path`` is None."""
    torch.manual_seed(seed)
    model = LTXVideoTransformer3DModel(**config).eval()
    _perturb_default_init(model, torch.Generator().manual_seed(seed + 1))
    if path is not None:
        model.save_pretrained(path)
    return model


def to_original_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers transformer state dict in the Lightricks single-file layout: diffusers' renames inverted
    and every key prefixed ``model.diffusion_model.``."""
    out = {}
    for key, value in state.items():
        for original, renamed in ORIGINAL_RENAMES.items():
            key = key.replace(renamed, original)
        out[ORIGINAL_PREFIX + key] = value
    return out


@torch.no_grad()
def reference_forward(model: LTXVideoTransformer3DModel, **kwargs) -> torch.Tensor:
    """diffusers forward on packed tokens (B, L, C) -> (B, L, C_out)."""
    return model(**kwargs, return_dict=False)[0]
