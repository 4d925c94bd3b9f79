"""Tiny LTX-Video checkpoints for the converter tests: a diffusers-layout directory as the Lightricks repos
ship it, and the Lightricks single file of the same weights.

The directory holds diffusers' and transformers' own ``save_pretrained`` output for each component
(``ref_ltx_transformer``, ``ref_ltx_vae``, ``ref_t5``) and the scheduler and ``model_index.json`` that
diffusers' ``scripts/convert_ltx_to_diffusers.py`` writes for the generation, with the pipeline class the
generation runs with. The single file is built by inverting diffusers' single-file conversion
(``ref_ltx_transformer.to_original_layout``, ``ref_ltx_vae.to_single_file``) and carries a ``config`` in
its metadata in LTX's own format, as the released ``ltxv-*.safetensors`` do.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel
from ref_ltx_transformer import TINY, build_transformer, to_original_layout
from ref_ltx_vae import build_tiny_ltx_vae, to_single_file
from ref_t5 import TINY_T5_CONFIG, build_t5_encoder, build_t5_tokenizer
from safetensors.torch import save_file

# The tiny transformer reads the tiny VAE's 16 latent channels and the tiny T5's 64-wide states.
TINY_TRANSFORMER = dict(TINY, in_channels=16, out_channels=16, caption_channels=TINY_T5_CONFIG["d_model"])

PIPELINES = {"0.9.0": "LTXImageToVideoPipeline", "0.9.1": "LTXImageToVideoPipeline", "0.9.5": "LTXConditionPipeline"}
GENERATIONS = tuple(PIPELINES)


def reference_scheduler(generation: str) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler diffusers' ``convert_ltx_to_diffusers.py`` builds for ``generation``."""
    if generation == "0.9.5":
        return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False)
    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
        max_image_seq_len=4096, shift_terminal=0.1,
    )  # fmt: skip


def build_ltx_dir(root: Path, generation: str, *, seed: int = 0) -> Path:
    """A diffusers-layout LTX-Video directory of ``generation`` ("0.9.0", "0.9.1" or "0.9.5") at ``root``."""
    build_transformer(root / "transformer", TINY_TRANSFORMER, seed=seed)
    build_tiny_ltx_vae(root / "vae", generation, seed=seed)
    build_t5_encoder(root / "text_encoder", TINY_T5_CONFIG, seed=seed)
    build_t5_tokenizer(root / "tokenizer")
    reference_scheduler(generation).save_pretrained(root / "scheduler")
    index = {
        "_class_name": PIPELINES[generation],
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "LTXVideoTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLLTXVideo"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


def ltx_metadata(reference: Path) -> dict[str, str]:
    """The safetensors metadata of a released single file for a diffusers directory's transformer: the
    components' configs in LTX's format (``ltx_video/utils/diffusers_config_mapping.py`` ``OURS_*_CONFIG``);
    the VAE's and scheduler's are not read by the converter and are abridged."""
    c = json.loads((reference / "transformer" / "config.json").read_text())
    config = {
        "transformer": {
            "_class_name": "Transformer3DModel", "activation_fn": "gelu-approximate", "attention_bias": True,
            "attention_head_dim": c["attention_head_dim"], "caption_channels": c["caption_channels"],
            "cross_attention_dim": c["cross_attention_dim"], "in_channels": c["in_channels"], "norm_eps": 1e-6,
            "num_attention_heads": c["num_attention_heads"], "num_layers": c["num_layers"],
            "out_channels": c["out_channels"], "qk_norm": "rms_norm", "positional_embedding_type": "rope",
        },
        "vae": {"_class_name": "CausalVideoAutoencoder", "dims": 3, "latent_channels": 16},
        "scheduler": {"_class_name": "RectifiedFlowScheduler", "num_train_timesteps": 1000},
    }  # fmt: skip
    return {"config": json.dumps(config)}


def single_file_tensors(reference: Path, generation: str) -> dict[str, torch.Tensor]:
    """The transformer and VAE of a diffusers directory in the single-file layout."""
    transformer = LTXVideoTransformer3DModel.from_pretrained(reference / "transformer")
    vae = AutoencoderKLLTXVideo.from_pretrained(reference / "vae")
    tensors = {**to_original_layout(transformer.state_dict()), **to_single_file(vae.state_dict(), generation)}
    return {k: v.contiguous() for k, v in tensors.items()}


def write_single_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> Path:
    """Save ``tensors`` as a safetensors file with ``metadata``; returns ``path``."""
    save_file(tensors, path, metadata=metadata)
    return path
