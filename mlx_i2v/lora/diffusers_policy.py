"""The "diffusers" policy: exactly what diffusers 0.42.1 applies of a LoRA file, and where it fails; one
function per architecture (the file's, :attr:`~mlx_i2v.lora.formats.LoraFile.arch`).

Wan: ``WanLoraLoaderMixin.lora_state_dict`` picks one of three paths (lora.md §1.4):

* any key starts with ``diffusion_model.``: ``_convert_non_diffusers_wan_lora_to_diffusers``. It converts the
  block linears (with ``alpha``), the image K/V branch only when both ``k_img`` and ``v_img`` occur,
  ``time_projection.1``, ``head.head`` (its ``.diff`` as a full delta, which needs ``head.head.diff_b``),
  ``text_embedding``/``time_embedding`` and ``img_emb.proj.{1,3}``; ``diff_b`` becomes PEFT's ``lora_B.bias``.
  It drops norm ``diff``/``diff_b`` keys, ``time_projection`` keys when the file has no ``time_projection``
  weight, and every other leftover key containing ``.diff`` (``diff_m``, patch embedding, ``img_emb.proj.{0,4}``,
  full ``.diff`` on block linears). Any other leftover is a ValueError, a missing partner a KeyError.
* any key starts with ``lora_unet_``: ``_convert_musubi_wan_lora_to_diffusers``, which needs every block's
  self/cross-attention and FFN pairs with their ``alpha`` (KeyError otherwise) and nothing else (ValueError).
* otherwise keys are used as they are: every key must contain "lora" (ValueError), DoRA ``dora_scale`` keys
  are dropped, and ``load_lora_adapter`` keeps only ``transformer.`` keys — a file without any loads nothing
  (diffusers only warns; this policy refuses it).

:func:`diffusers_deltas` keeps the deltas diffusers applies, lists what it drops, and raises
:class:`~mlx_i2v.errors.InvalidInputError` where diffusers raises or would silently load nothing or garbage.
"""

from __future__ import annotations

import re
from typing import Iterable

from ..errors import InvalidInputError
from .formats import Delta, FullDelta, Ignored, LoraFile, LowRank

BLOCK_LINEAR = re.compile(r"blocks\.\d+\.((self|cross)_attn\.[qkvo]|ffn\.[02])")
IMAGE_KV = re.compile(r"blocks\.\d+\.cross_attn\.[kv]_img")
TOP_LINEAR = re.compile(r"time_projection\.1|head\.head|(text|time)_embedding\.[02]|img_emb\.proj\.[13]")
EMBEDDING = re.compile(r"(text|time)_embedding\.[02]")


class _Refused(InvalidInputError):
    pass


def _refuse(lora: LoraFile, what: str, keys: Iterable[str] = ()) -> _Refused:
    keys = sorted(keys)
    named = f": {', '.join(keys[:6])}{f' and {len(keys) - 6} more' if len(keys) > 6 else ''}" if keys else ""
    return _Refused(f"{lora.path}: under the diffusers policy {what}{named}")


def diffusers_deltas(lora: LoraFile) -> tuple[list[Delta], list[Ignored]]:
    """The deltas diffusers 0.42.1 applies from ``lora`` and the keys it drops (with reasons), by the loader
    of the file's architecture.

    Raises:
        InvalidInputError: where diffusers raises (naming its exception), or where it would load nothing.
    """
    return _BY_ARCHITECTURE[lora.arch.name](lora)


def wan_diffusers_deltas(lora: LoraFile) -> tuple[list[Delta], list[Ignored]]:
    """What ``WanLoraLoaderMixin`` applies (see the module docstring)."""
    if any(k.startswith("diffusion_model.") for k in lora.keys):
        return _original(lora)
    if any(k.startswith("lora_unet_") for k in lora.keys):
        return _musubi(lora)
    return _peft(lora)


def _original(lora: LoraFile) -> tuple[list[Delta], list[Ignored]]:
    prefix = "diffusion_model."
    if not all(k.startswith(prefix) for k in lora.keys):
        lacking = [k for k in lora.keys if not k.startswith(prefix)]
        raise _refuse(lora, f"diffusers strips {prefix!r} from keys that lack it", lacking)
    stripped = {k: k[len(prefix) :] for k in lora.keys}
    for a, b in (("lora_A", "lora_down"), ("lora_B", "lora_up")):
        if any(a in k for k in lora.keys) and any(b in k for k in lora.keys):
            raise _refuse(lora, f"diffusers raises ValueError on the {b} keys of a file that also has {a} keys")
    if not any(s.startswith("blocks.") for s in stripped.values()):
        raise _refuse(lora, "diffusers raises ValueError: the file has no blocks.* keys")
    is_i2v = any("k_img" in s for s in stripped.values()) and any("v_img" in s for s in stripped.values())
    has_time_weight = any(s.startswith("time_projection") and s.endswith(".weight") for s in stripped.values())

    dropped: dict[str, str] = {}
    for key, s in stripped.items():
        if s.endswith((".diff", ".diff_b")) and "norm" in s:
            dropped[key] = "diffusers drops norm deltas"
        elif "time_projection" in s and not has_time_weight:
            dropped[key] = "diffusers drops time_projection keys when the file has no time_projection weight"

    full = {(d.module, d.kind): d for d in lora.deltas if isinstance(d, FullDelta)}
    pairs = {d.module: d for d in lora.deltas if isinstance(d, LowRank)}
    consumed: list[Delta] = []
    for d in lora.deltas:
        if any(k in dropped for k in d.keys):
            continue
        if _original_consumes(lora, d, is_i2v, pairs, full):
            consumed.append(d)

    # only the block linears' branches pop an .alpha; any other alpha is left over (a ValueError)
    takes_alpha = [d for d in consumed if BLOCK_LINEAR.fullmatch(d.module) or IMAGE_KV.fullmatch(d.module)]
    used = {k for d in consumed for k in d.keys if not k.endswith(".alpha")} | {k for d in takes_alpha for k in d.keys}
    leftover = [k for k in lora.keys if k not in used and k not in dropped]
    if leftover:
        if not all(".diff" in k for k in leftover):
            others = [k for k in leftover if ".diff" not in k]
            raise _refuse(lora, "diffusers raises ValueError on keys it cannot convert", others)
        if any(k.endswith(".diff") and "lora" in k for k in leftover):
            raise _refuse(lora, "diffusers raises ValueError on .diff keys naming a lora factor", leftover)
        dropped.update(dict.fromkeys(leftover, "diffusers 0.42.1 ignores the .diff keys it does not handle"))
    return consumed, _group(dropped)


def _original_consumes(
    lora: LoraFile, d: Delta, is_i2v: bool, pairs: dict[str, LowRank], full: dict[tuple[str, str], FullDelta]
) -> bool:
    """Whether diffusers' converter pops this delta's keys (True), leaves them over (False), or raises."""
    m = d.module
    if IMAGE_KV.fullmatch(m):
        return is_i2v and (isinstance(d, LowRank) or d.kind == "diff_b")
    if EMBEDDING.fullmatch(m) and m not in pairs:
        raise _refuse(lora, f"diffusers raises KeyError: {m} has keys but no lora pair", d.keys)
    if isinstance(d, LowRank):
        if BLOCK_LINEAR.fullmatch(m):
            return True
        if TOP_LINEAR.fullmatch(m):
            if m == "head.head" and ("head.head", "diff") in full:
                raise _refuse(lora, "diffusers overwrites head.head's lora pair with head.head.diff", d.keys)
            return True  # its .alpha, if any, is left over (a ValueError below)
        return False
    if d.kind == "diff" and m == "head.head":
        if ("head.head", "diff_b") not in full:
            raise _refuse(lora, "diffusers raises KeyError: head.head.diff needs head.head.diff_b", d.keys)
        return True
    if d.kind != "diff_b":
        return False
    if BLOCK_LINEAR.fullmatch(m) or m in ("time_projection.1", "head.head") or EMBEDDING.fullmatch(m):
        return True
    return m in ("img_emb.proj.1", "img_emb.proj.3") and m in pairs


def _musubi(lora: LoraFile) -> tuple[list[Delta], list[Ignored]]:
    if any(k.startswith("lora_unet__") for k in lora.keys):
        raise _refuse(lora, "diffusers raises KeyError on VideoX-Fun (lora_unet__) names")
    try:
        blocks = {k[len("lora_unet_") :].split("blocks_")[1].split("_")[0] for k in lora.keys}
    except IndexError:
        raise _refuse(lora, "diffusers raises IndexError: a lora_unet_ key outside the blocks") from None
    is_i2v = any("k_img" in k for k in lora.keys) and any("v_img" in k for k in lora.keys)
    names = [f"{a}_attn.{o}" for a in ("self", "cross") for o in "qkvo"] + ["ffn.0", "ffn.2"]
    names += ["cross_attn.k_img", "cross_attn.v_img"] * is_i2v
    required = {f"blocks.{i}.{n}" for i in range(len(blocks)) for n in names}
    # musubi's pairs: lora_down, lora_up and alpha (the order LowRank.keys lists them in)
    pairs = {d.module: d for d in lora.deltas if isinstance(d, LowRank) and len(d.keys) == 3 and "lora_down" in d.keys[0]}
    missing = sorted(required - set(pairs))
    if missing:
        raise _refuse(lora, "diffusers raises KeyError: musubi files need every block's pairs and alphas", missing)
    kept = [pairs[m] for m in sorted(required)]
    leftover = set(lora.keys) - {k for d in kept for k in d.keys}
    if leftover:
        raise _refuse(lora, "diffusers raises ValueError on keys it cannot convert", leftover)
    return kept, []


def _peft(lora: LoraFile) -> tuple[list[Delta], list[Ignored]]:
    dropped = {k: "diffusers drops DoRA dora_scale keys" for k in lora.keys if "dora_scale" in k}
    not_lora = [k for k in lora.keys if "lora" not in k and k not in dropped]
    if not_lora:
        raise _refuse(lora, "diffusers raises ValueError ('Invalid LoRA checkpoint'): keys without 'lora'", not_lora)
    elsewhere = [k for k in lora.keys if not k.startswith("transformer.") and k not in dropped]
    dropped.update(dict.fromkeys(elsewhere, "diffusers loads only keys under 'transformer.'"))
    kept = [d for d in lora.deltas if d.keys[0].startswith("transformer.")]
    if not kept:
        raise _refuse(lora, "diffusers would load nothing from this file (no transformer.* LoRA keys)")
    odd = [k for d in kept for k in d.keys if ".default." in k or "lora_down" in k or "lora_up" in k]
    odd += [k for u in lora.unusable if u.kind != "dora" for k in u.keys if k.startswith("transformer.")]
    if odd or lora.style.naming != "diffusers":
        bad = odd or [kept[0].keys[0]]
        raise _refuse(lora, "diffusers would not load these keys into WanTransformer3DModel", bad)
    return kept, _group(dropped)


def _group(dropped: dict[str, str]) -> list[Ignored]:
    by_reason: dict[str, list[str]] = {}
    for key, reason in dropped.items():
        by_reason.setdefault(reason, []).append(key)
    return [Ignored(tuple(keys), reason) for reason, keys in by_reason.items()]


# --- LTX-Video ---------------------------------------------------------------------------------------------
# ``LTXVideoLoraLoaderMixin.lora_state_dict`` drops DoRA scales; a file with any ``diffusion_model.`` key must
# have it on every key (ValueError otherwise) and is re-prefixed ``transformer.`` without renaming
# (``_convert_non_diffusers_ltxv_lora_to_diffusers``); ``load_lora_adapter`` keeps the ``transformer.`` keys and
# PEFT injects only into modules the model has, so LTX's original-only module names (``patchify_proj``,
# ``adaln_single``, ``q_norm``) load nothing.


def ltx_diffusers_deltas(lora: LoraFile) -> tuple[list[Delta], list[Ignored]]:
    """What diffusers 0.42.1 applies of an LTX-Video LoRA file: its ``lora_A``/``lora_B`` pairs (and PEFT
    ``lora_B.bias``) on modules named as diffusers names them.

    Raises:
        InvalidInputError: where diffusers raises, or loads nothing; and for the styles this policy does not
            model for LTX-Video (``lora_down``/``lora_up``, ``alpha`` keys, full deltas).
    """
    original = [k for k in lora.keys if k.startswith("diffusion_model.")]
    if original and len(original) != len(lora.keys):
        lacking = [k for k in lora.keys if not k.startswith("diffusion_model.")]
        raise _refuse(lora, "diffusers raises ValueError (Invalid LoRA state dict for LTX-Video)", lacking)
    if not original and not any(k.startswith("transformer.") for k in lora.keys):
        raise _refuse(lora, "diffusers loads nothing from a file without transformer. keys")
    dropped = {k: "diffusers drops DoRA scales" for u in lora.unusable if u.kind == "dora" for k in u.keys}
    unknown = [k for u in lora.unusable if u.kind != "dora" for k in u.keys]
    other = [k for d in lora.deltas if isinstance(d, FullDelta) and d.kind != "lora_bias" for k in d.keys]
    other += [k for k in lora.keys if k.endswith(".alpha") or ".lora_down." in k or ".lora_up." in k]
    if unknown or other:
        raise _refuse(lora, "this policy reads LTX-Video files of lora_A/lora_B pairs only", unknown + other)
    kept: list[Delta] = []
    for d in lora.deltas:
        if d.target.rsplit(".", 1)[0] == d.module:
            kept.append(d)
        else:
            reason = "diffusers keeps LTX-Video's original module names, which no diffusers module has"
            dropped.update(dict.fromkeys(d.keys, reason))
    if not kept:
        raise _refuse(lora, "diffusers would load nothing of the file")
    return kept, _group(dropped)


_BY_ARCHITECTURE = {"Wan": wan_diffusers_deltas, "LTX-Video": ltx_diffusers_deltas}
