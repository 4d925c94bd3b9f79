"""Wan-AI ORIGINAL-layout checkpoints built from the tiny diffusers/transformers reference models.

The Wan-AI repos ship ``WanModel`` safetensors with a WanModel ``config.json`` (the A14B experts in
``high_noise_model/`` and ``low_noise_model/``), ``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth``,
``models_t5_umt5-xxl-enc-bf16.pth`` (+ ``google/umt5-xxl/`` tokenizer) and, for Wan2.1 I2V/FLF2V,
``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` (wan.md §4.0). The builders here write the
same files from the tiny reference models by *inverting* the diffusers conversion: the tables below are
the inverse of wan.md §4.1-4.4 (diffusers' ``TRANSFORMER_KEYS_RENAME_DICT``, ``convert_vae``,
``convert_vae_22``, and the umt5/CLIP tables), written out explicitly rather than derived from our own
maps, so the tests compare two independent statements of the layout. The transformer and Wan2.1 VAE
inversions are checked against diffusers' own single-file converters in ``test_original_layout.py``.

Every builder also saves the diffusers-layout reference of the same weights, so the two layouts can be
loaded side by side.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable, Mapping

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from ref_clip import TINY_CLIP_CONFIG, build_clip
from ref_text import TINY_UMT5_CONFIG, build_text_encoder, build_tiny_tokenizer
from ref_transformer import build_tiny_transformer
from ref_vae import TINY_VAE_CONFIGS, build_tiny_vae
from safetensors.torch import save_file
from transformers import CLIPVisionModelWithProjection, UMT5EncoderModel

StateDict = dict[str, torch.Tensor]
# (full-match regex on a diffusers key, ``re`` template or function of the match giving the original key)
Renames = tuple[tuple[str, str | Callable[[re.Match[str]], str]], ...]

VAE_FILES = {"2.1": "Wan2.1_VAE.pth", "2.2": "Wan2.2_VAE.pth"}
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
TOKENIZER_DIR = "google/umt5-xxl"
COMFYUI_PREFIX = "model.diffusion_model."
A14B_EXPERTS = {"high_noise_model": "transformer", "low_noise_model": "transformer_2"}  # -> diffusers


def _rename(state_dict: Mapping[str, torch.Tensor], renames: Renames, what: str) -> StateDict:
    """Apply the first matching rename to every key; a key no rename covers is a bug in the table."""
    out: StateDict = {}
    for key, value in state_dict.items():
        for pattern, target in renames:
            m = re.fullmatch(pattern, key)
            if m:
                new = target(m) if callable(target) else m.expand(target)
                break
        else:
            raise KeyError(f"{what}: no inverse rename for {key}")
        if new in out:
            raise KeyError(f"{what}: two keys become {new}")
        out[new] = value.detach().clone()
    return out


# --- transformer: inverse of TRANSFORMER_KEYS_RENAME_DICT (wan.md §4.1, §4.1a) ---------------------------

TRANSFORMER_TO_ORIGINAL: Renames = (
    (r"patch_embedding\.(weight|bias)", r"patch_embedding.\1"),
    (r"condition_embedder\.time_embedder\.linear_1\.(weight|bias)", r"time_embedding.0.\1"),
    (r"condition_embedder\.time_embedder\.linear_2\.(weight|bias)", r"time_embedding.2.\1"),
    (r"condition_embedder\.text_embedder\.linear_1\.(weight|bias)", r"text_embedding.0.\1"),
    (r"condition_embedder\.text_embedder\.linear_2\.(weight|bias)", r"text_embedding.2.\1"),
    (r"condition_embedder\.time_proj\.(weight|bias)", r"time_projection.1.\1"),
    (r"condition_embedder\.image_embedder\.norm1\.(weight|bias)", r"img_emb.proj.0.\1"),
    (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj\.(weight|bias)", r"img_emb.proj.1.\1"),
    (r"condition_embedder\.image_embedder\.ff\.net\.2\.(weight|bias)", r"img_emb.proj.3.\1"),
    (r"condition_embedder\.image_embedder\.norm2\.(weight|bias)", r"img_emb.proj.4.\1"),
    (r"condition_embedder\.image_embedder\.pos_embed", "img_emb.emb_pos"),
    (r"blocks\.(\d+)\.scale_shift_table", r"blocks.\1.modulation"),
    (r"blocks\.(\d+)\.attn1\.to_([qkv])\.(weight|bias)", r"blocks.\1.self_attn.\2.\3"),
    (r"blocks\.(\d+)\.attn1\.to_out\.0\.(weight|bias)", r"blocks.\1.self_attn.o.\2"),
    (r"blocks\.(\d+)\.attn1\.norm_([qk])\.weight", r"blocks.\1.self_attn.norm_\2.weight"),
    (r"blocks\.(\d+)\.attn2\.to_([qkv])\.(weight|bias)", r"blocks.\1.cross_attn.\2.\3"),
    (r"blocks\.(\d+)\.attn2\.to_out\.0\.(weight|bias)", r"blocks.\1.cross_attn.o.\2"),
    (r"blocks\.(\d+)\.attn2\.norm_([qk])\.weight", r"blocks.\1.cross_attn.norm_\2.weight"),
    (r"blocks\.(\d+)\.attn2\.add_([kv])_proj\.(weight|bias)", r"blocks.\1.cross_attn.\2_img.\3"),
    (r"blocks\.(\d+)\.attn2\.norm_added_k\.weight", r"blocks.\1.cross_attn.norm_k_img.weight"),
    # diffusers' affine norm2 (before cross-attention) is the original's norm3 (wan.md §0.9)
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"blocks.\1.norm3.\2"),
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj\.(weight|bias)", r"blocks.\1.ffn.0.\2"),
    (r"blocks\.(\d+)\.ffn\.net\.2\.(weight|bias)", r"blocks.\1.ffn.2.\2"),
    (r"scale_shift_table", "head.modulation"),
    (r"proj_out\.(weight|bias)", r"head.head.\1"),
)

# WanModel ``model_type`` of each tiny variant (Wan2.2 A14B experts record "i2v").
MODEL_TYPES = {"ti2v": "ti2v", "i2v": "i2v", "flf2v": "flf2v", "a14b": "i2v"}


def transformer_to_original(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    return _rename(state_dict, TRANSFORMER_TO_ORIGINAL, "transformer")


def original_transformer_config(config: Mapping, model_type: str) -> dict:
    """The WanModel ``config.json`` the Wan-AI repos ship. Like the real ones it omits what WanModel
    hard-codes or keeps out of its config (``text_dim`` 4096, CLIP width 1280, ``patch_size``,
    ``qk_norm``, ``cross_attn_norm``): a loader has to read those widths off the tensors."""
    return {
        "_class_name": "WanModel",
        "_diffusers_version": "0.30.0",
        "model_type": model_type,
        "dim": config["num_attention_heads"] * config["attention_head_dim"],
        "eps": config["eps"],
        "ffn_dim": config["ffn_dim"],
        "freq_dim": config["freq_dim"],
        "in_dim": config["in_channels"],
        "num_heads": config["num_attention_heads"],
        "num_layers": config["num_layers"],
        "out_dim": config["out_channels"],
        "text_len": 512,
    }


def _save_sharded(folder: Path, tensors: StateDict, shards: int) -> None:
    """``diffusion_pytorch_model.safetensors``, or ``-0000i-of-0000n`` shards plus the index json."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        return
    keys = sorted(tensors)
    per_shard = math.ceil(len(keys) / shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i * per_shard : (i + 1) * per_shard]}
        save_file(part, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_original_transformer(
    folder: str | Path, model: WanTransformer3DModel, model_type: str, *, shards: int = 1
) -> None:
    """Write ``model`` as a Wan-AI ``WanModel`` folder: config.json + (sharded) safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = original_transformer_config(model.config, model_type)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _save_sharded(folder, transformer_to_original(model.state_dict()), shards)


def write_comfyui_transformer(path: str | Path, model: WanTransformer3DModel) -> None:
    """A ComfyUI single-file repack: the original keys prefixed with ``model.diffusion_model.``."""
    tensors = transformer_to_original(model.state_dict())
    save_file({COMFYUI_PREFIX + k: v.contiguous() for k, v in tensors.items()}, str(path))


def build_original_transformer(
    folder: str | Path, reference: str | Path, variant: str, *, seed: int = 0, shards: int = 1
) -> WanTransformer3DModel:
    """Tiny transformer ``variant`` in the original layout at ``folder`` and the diffusers layout at
    ``reference``; returns the diffusers model."""
    model = build_tiny_transformer(reference, variant, seed=seed)
    write_original_transformer(folder, model, MODEL_TYPES[variant], shards=shards)
    return model


# --- VAE: inverse of convert_vae / convert_vae_22 (wan.md §4.2, §4.3) -----------------------------------

# diffusers WanResidualBlock member -> the original ResidualBlock's (``residual`` is Sequential(RMS_norm,
# SiLU, CausalConv3d, RMS_norm, SiLU, Dropout, CausalConv3d); ``shortcut`` the 1x1x1 conv)
RESNET_MEMBERS = {
    "norm1": "residual.0",
    "conv1": "residual.2",
    "norm2": "residual.3",
    "conv2": "residual.6",
    "conv_shortcut": "shortcut",
}
_RESNET = r"(norm1|conv1|norm2|conv2|conv_shortcut)\.(gamma|weight|bias)"


def _resnet(original_block: str, m: re.Match[str]) -> str:
    """Original key of a resnet tensor whose member and leaf are the match's last two groups."""
    return f"{original_block}.{RESNET_MEMBERS[m[m.re.groups - 1]]}.{m[m.re.groups]}"


_VAE_SHARED: Renames = (
    (r"(encoder|decoder)\.conv_in\.(weight|bias)", r"\1.conv1.\2"),
    (
        rf"(encoder|decoder)\.mid_block\.resnets\.([01])\.{_RESNET}",
        lambda m: _resnet(f"{m[1]}.middle.{2 * int(m[2])}", m),  # middle = [resnet, attention, resnet]
    ),
    (
        r"(encoder|decoder)\.mid_block\.attentions\.0\.(norm\.gamma|(to_qkv|proj)\.(weight|bias))",
        r"\1.middle.1.\2",
    ),
    (r"(encoder|decoder)\.norm_out\.gamma", r"\1.head.0.gamma"),
    (r"(encoder|decoder)\.conv_out\.(weight|bias)", r"\1.head.2.\2"),
    (r"quant_conv\.(weight|bias)", r"conv1.\1"),
    (r"post_quant_conv\.(weight|bias)", r"conv2.\1"),
)

# Wan2.1: encoder down_blocks are the flat ``downsamples`` index for index; decoder stage s, resnet j
# is flat entry 4*s + j, its upsampler entry 4*s + 3 (num_res_blocks = 2: 3 resnets per stage).
VAE21_TO_ORIGINAL: Renames = (
    *_VAE_SHARED,
    (rf"encoder\.down_blocks\.(\d+)\.{_RESNET}", lambda m: _resnet(f"encoder.downsamples.{m[1]}", m)),
    (r"encoder\.down_blocks\.(\d+)\.(resample\.1|time_conv)\.(weight|bias)", r"encoder.downsamples.\1.\2.\3"),
    (
        rf"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.{_RESNET}",
        lambda m: _resnet(f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}", m),
    ),
    (
        r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.((resample\.1|time_conv)\.(weight|bias))",
        lambda m: f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}",
    ),
)

# Wan2.2: nested stages; the resampler is entry num_res_blocks (encoder) / num_res_blocks + 1 (decoder).
VAE22_TO_ORIGINAL: Renames = (
    *_VAE_SHARED,
    (
        rf"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.{_RESNET}",
        lambda m: _resnet(f"encoder.downsamples.{m[1]}.downsamples.{m[2]}", m),
    ),
    (r"encoder\.down_blocks\.(\d+)\.downsampler\.(.+)", r"encoder.downsamples.\1.downsamples.2.\2"),
    (
        rf"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.{_RESNET}",
        lambda m: _resnet(f"decoder.upsamples.{m[1]}.upsamples.{m[2]}", m),
    ),
    (r"decoder\.up_blocks\.(\d+)\.upsampler\.(.+)", r"decoder.upsamples.\1.upsamples.3.\2"),
)


def vae_to_original(state_dict: Mapping[str, torch.Tensor], version: str) -> StateDict:
    assert TINY_VAE_CONFIGS[version]["num_res_blocks"] == 2, "the tables hard-code num_res_blocks=2"
    renames = VAE21_TO_ORIGINAL if version == "2.1" else VAE22_TO_ORIGINAL
    return _rename(state_dict, renames, f"vae {version}")


def build_original_vae(
    path: str | Path, reference: str | Path, version: str, *, seed: int = 0
) -> AutoencoderKLWan:
    """``Wan2.x_VAE.pth`` (float32, as released) at ``path``; diffusers layout at ``reference``."""
    model = build_tiny_vae(reference, version, seed=seed)
    torch.save(vae_to_original(model.state_dict(), version), path)
    return model


# --- UMT5: inverse of wan.md §4.4 (wan/modules/t5.py T5Encoder) ----------------------------------------

UMT5_TO_ORIGINAL: Renames = (
    (r"shared\.weight", "token_embedding.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight", r"blocks.\1.norm1.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.weight", r"blocks.\1.attn.\2.weight"),
    (
        r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
        r"blocks.\1.pos_embedding.embedding.weight",
    ),
    (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight", r"blocks.\1.norm2.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight", r"blocks.\1.ffn.gate.0.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight", r"blocks.\1.ffn.fc1.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight", r"blocks.\1.ffn.fc2.weight"),
    (r"encoder\.final_layer_norm\.weight", "norm.weight"),
)


def umt5_to_original(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    # ``encoder.embed_tokens`` is tied to ``shared``; T5Encoder has one token_embedding.
    return _rename(
        {k: v for k, v in state_dict.items() if k != "encoder.embed_tokens.weight"}, UMT5_TO_ORIGINAL, "umt5"
    )


@torch.no_grad()
def _round_and_perturb_norms(model: torch.nn.Module, dtype: torch.dtype, seed: int) -> None:
    """Give norm weights seeded noise (initialised to ones/zeros they would hide a swapped mapping), then
    round every parameter to ``dtype`` so the float32 reference holds exactly what the half-precision
    original file holds."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
        p.copy_(p.to(dtype).float())


def build_original_umt5(path: str | Path, reference: str | Path, *, seed: int = 0) -> UMT5EncoderModel:
    """``models_t5_umt5-xxl-enc-bf16.pth`` (bfloat16, as released) at ``path``; the same values as a
    float32 transformers ``UMT5EncoderModel`` at ``reference``."""
    model = build_text_encoder(None, TINY_UMT5_CONFIG, seed=seed)
    _round_and_perturb_norms(model, torch.bfloat16, seed + 1)
    model.save_pretrained(reference)
    original = umt5_to_original(model.state_dict())
    torch.save({k: v.to(torch.bfloat16) for k, v in original.items()}, path)
    return model


# --- CLIP: inverse of wan.md §4.4 (wan/modules/clip.py XLMRobertaCLIP.visual) ---------------------------

_LAYER = r"vision_model\.encoder\.layers\.(\d+)"
CLIP_TO_ORIGINAL: Renames = (
    (r"vision_model\.embeddings\.patch_embedding\.weight", "visual.patch_embedding.weight"),
    (r"vision_model\.embeddings\.class_embedding", "visual.cls_embedding"),
    (r"vision_model\.embeddings\.position_embedding\.weight", "visual.pos_embedding"),
    (r"vision_model\.pre_layrnorm\.(weight|bias)", r"visual.pre_norm.\1"),
    (rf"{_LAYER}\.layer_norm1\.(weight|bias)", r"visual.transformer.\1.norm1.\2"),
    # q/k/v are fused into to_qkv afterwards (see clip_to_original)
    (rf"{_LAYER}\.self_attn\.([qkv])_proj\.(weight|bias)", r"visual.transformer.\1.attn.\2.\3"),
    (rf"{_LAYER}\.self_attn\.out_proj\.(weight|bias)", r"visual.transformer.\1.attn.proj.\2"),
    (rf"{_LAYER}\.layer_norm2\.(weight|bias)", r"visual.transformer.\1.norm2.\2"),
    (rf"{_LAYER}\.mlp\.fc1\.(weight|bias)", r"visual.transformer.\1.mlp.0.\2"),
    (rf"{_LAYER}\.mlp\.fc2\.(weight|bias)", r"visual.transformer.\1.mlp.2.\2"),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"visual.post_norm.\1"),
    (r"visual_projection\.weight", "visual.head"),
)

# A few XLM-RoBERTa text-tower tensors (wan/modules/xlm_roberta.py names, tiny widths) and the logit
# scale, which the original file carries and I2V never uses: loaders must ignore them, not choke.
TEXT_TOWER_SHAPES = {
    "textual.token_embedding.weight": (32, 8),
    "textual.type_embedding.weight": (1, 8),
    "textual.pos_embedding.weight": (16, 8),
    "textual.norm.weight": (8,),
    "textual.norm.bias": (8,),
    "textual.blocks.0.attn.q.weight": (8, 8),
    "textual.blocks.0.attn.q.bias": (8,),
    "textual.blocks.0.attn.o.weight": (8, 8),
    "textual.blocks.0.norm1.weight": (8,),
    "textual.blocks.0.ffn.0.weight": (16, 8),
    "textual.blocks.0.ffn.2.weight": (8, 16),
    "textual.blocks.0.norm2.weight": (8,),
    "textual.head.0.weight": (12, 8),
    "textual.head.2.weight": (16, 12),
    "log_scale": (),
}


def clip_to_original(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename, fuse q/k/v into ``to_qkv`` (q rows first), and restore the original's shapes:
    ``cls_embedding`` (1, 1, D), ``pos_embedding`` (1, N, D), ``head`` = visual_projection.T (D, P)."""
    sd = _rename(state_dict, CLIP_TO_ORIGINAL, "clip")
    for key in [k for k in sd if re.fullmatch(r"visual\.transformer\.\d+\.attn\.q\.(weight|bias)", k)]:
        prefix, leaf = key.rsplit(".q.", 1)
        sd[f"{prefix}.to_qkv.{leaf}"] = torch.cat([sd.pop(f"{prefix}.{n}.{leaf}") for n in "qkv"], dim=0)
    sd["visual.cls_embedding"] = sd["visual.cls_embedding"].reshape(1, 1, -1)
    sd["visual.pos_embedding"] = sd["visual.pos_embedding"][None]
    sd["visual.head"] = sd["visual.head"].T.contiguous()
    return sd


def build_original_clip(
    path: str | Path, reference: str | Path, *, seed: int = 0
) -> CLIPVisionModelWithProjection:
    """``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` (float16, as released, with text-tower
    tensors) at ``path``; the same values as a float32 ``CLIPVisionModelWithProjection`` at ``reference``."""
    model = build_clip(reference, TINY_CLIP_CONFIG, seed=seed)
    _round_and_perturb_norms(model, torch.float16, seed + 1)
    model.save_pretrained(reference)
    original = clip_to_original(model.state_dict())
    generator = torch.Generator().manual_seed(seed + 2)
    original.update({k: torch.randn(shape, generator=generator) for k, shape in TEXT_TOWER_SHAPES.items()})
    torch.save({k: v.to(torch.float16) for k, v in original.items()}, path)
    return model


# --- whole repos -------------------------------------------------------------------------------------------

# Wan-AI repo kind -> (transformer variant, VAE version, has CLIP)
REPO_KINDS = {
    "i2v": ("i2v", "2.1", True),  # Wan2.1-I2V-14B-480P/720P
    "flf2v": ("flf2v", "2.1", True),  # Wan2.1-FLF2V-14B-720P
    "ti2v": ("ti2v", "2.2", False),  # Wan2.2-TI2V-5B
    "a14b": ("a14b", "2.1", False),  # Wan2.2-I2V-A14B (two experts, the Wan2.1 VAE)
}


def build_original_repo(root: str | Path, reference: str | Path, kind: str, *, shards: int = 1) -> None:
    """A Wan-AI repo of ``kind`` (see :data:`REPO_KINDS`) at ``root``, and the diffusers layout of the same
    weights at ``reference`` (``transformer/`` [+ ``transformer_2/``], ``vae/``, ``text_encoder/``
    [+ ``image_encoder/``])."""
    root, reference = Path(root), Path(reference)
    root.mkdir(parents=True, exist_ok=True)
    variant, vae_version, has_clip = REPO_KINDS[kind]
    if kind == "a14b":
        for seed, (expert, component) in enumerate(A14B_EXPERTS.items()):
            build_original_transformer(
                root / expert, reference / component, variant, seed=seed, shards=shards
            )
    else:
        build_original_transformer(root, reference / "transformer", variant, shards=shards)
    build_original_vae(root / VAE_FILES[vae_version], reference / "vae", vae_version)
    build_original_umt5(root / T5_FILE, reference / "text_encoder")
    build_tiny_tokenizer(root / TOKENIZER_DIR)
    if has_clip:
        build_original_clip(root / CLIP_FILE, reference / "image_encoder")
