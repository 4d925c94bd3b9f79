"""diffusers (PyTorch) vs mlx-i2v on the same Wan2.2-TI2V-5B-width (or LTX-Video-2B-width) job, on this
machine, in one run.

Both frameworks get the same random-weight pipeline (saved once with diffusers' ``save_pretrained``), the
same photo, prompts, size, frames, steps, guidance and initial noise. Each runs in its own fresh
subprocess, so the peak resident memory measured (``VmHWM``) is that framework's alone. The parent
compares the frames and writes a JSON file and a results section in ``benchmarks/README.md``.

The default model has the real TI2V-5B widths with fewer blocks, so that it fits a 2-core CPU:
transformer dim 3072 / 24 heads / FFN 14336 / text 4096 with ``--layers`` (2) blocks, the umt5-xxl
encoder widths (4096, 64 heads, FFN 10240) with ``--text-layers`` (1) layer and a ``--text-vocab``
(512) row embedding table (the tokenizer is the tests' tiny one, so no id reaches past 512; the real
256,384-row table would add 4.2 GB of float32 to both runs without changing any compute), and the real
Wan2.2 VAE (base 160, decoder base 256, z 48: all 704.7 M parameters), or with ``--vae small`` a narrow
one of the same architecture (base 20, decoder base 32: 11.4 M parameters), so that the denoise stage
dominates the job. ``--layers 30 --text-layers 24 --text-vocab 256384`` is the full model, for a GPU or
a Mac.

``--family ltx`` runs LTX-Video image-to-video through ``LTXConditionPipeline`` (the 0.9.5+ pipeline) instead:
the 2B transformer widths (32 heads x 64 = 2048, cross-attention 2048, caption channels 4096, FFN 8192,
diffusers' defaults) with ``--layers`` (2 of 28) blocks, T5 v1.1-XXL widths (4096, 64 heads, FFN 10240)
with ``--text-layers`` (1 of 24) layer and a ``--text-vocab`` (512) row table, and the real 0.9.5 VAE
(encoder 694 M + decoder 553 M parameters). Its pipeline draws random numbers of its own besides the
initial noise: the conditioning noise on the held image latents at every step, and the noise mixed into
the latents before the timestep-conditioned decode. Both sides are given the same draws (diffusers'
``randn_tensor`` replaced by one that returns them; mlx-i2v's ``conditioning_noise`` and ``decode_noises``
likewise), as ``tests/test_ltx_pipeline.py`` does. The VAE's posterior is made deterministic as in the
tests (log-variance at the clamp, -30), since diffusers samples it and mlx-i2v takes its mean.

Each side also times its denoise stage's matmuls alone (``matmuls.py``: the same products at the job's
shapes, back to back; Wan only), so the report says how far each framework's denoise stage is from its matmuls,
and how far its last step is from that step's (the steady cost of a pass, with what the stage runs once behind
it: the first block's fresh memory, mlx-i2v's text context).

Usage::

    python benchmarks/compare_diffusers.py                 # 256x384 (HxW), 41 frames, 2 steps, CFG 5
    python benchmarks/compare_diffusers.py --vae small     # the same with a narrow VAE: denoise dominates
    python benchmarks/compare_diffusers.py --cache-dir /tmp/wan-bench --no-readme
    python benchmarks/compare_diffusers.py --family ltx --json benchmarks/results_ltx.json  # 33 frames, CFG 3
    python benchmarks/compare_diffusers.py --vae small --repeat 5  # medians of 5 runs of each side, alternately

``--repeat N`` runs each side N times, diffusers and mlx-i2v alternately, and reports the median of every
figure (the targets' ratios are those of the medians) with each run's own ratios beside them: on a machine
whose speed moves between runs, one run of each side says little.

On Linux, MLX's CPU wheel ships a slow reference BLAS; the MLX subprocess gets Debian's OpenBLAS with
``LD_PRELOAD`` (``--blas``) and ``OPENBLAS_THREAD_TIMEOUT=4``, as the README's Linux notes say to run it,
while PyTorch keeps the MKL it is built with (no preload: it has its own, and OpenMP threads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
README = Path(__file__).resolve().parent / "README.md"
DEFAULT_BLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
# OpenBLAS's idle threads spin (sched_yield) for 2**28 cycles after each call by default; 2**4 lets them
# sleep at once. README.md, "Linux and other notes".
OPENBLAS_SETTINGS = {"OPENBLAS_THREAD_TIMEOUT": "4"}
PROMPT = "a red fox runs through snow, the camera slowly pans"
NEGATIVE_PROMPT = "blurry, static, worst quality"
RESULTS_END = "<!-- results-end -->"

# Wan2.2-TI2V-5B transformer widths (wan.md §1.1); the block count comes from --layers.
TI2V_5B_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48,
    text_dim=4096, freq_dim=256, ffn_dim=14336, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)  # fmt: skip
# umt5-xxl encoder widths (wan.md §1.5); layers and vocabulary come from the command line.
UMT5_XXL = dict(
    d_model=4096, d_kv=64, d_ff=10240, num_heads=64, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6,
    dropout_rate=0.0,
)  # fmt: skip


# Encoder and decoder base widths: the real Wan2.2 VAE, and one with an eighth of its widths (same
# architecture, z 48, the same latent grid) for jobs where the denoise stage should dominate.
VAE_WIDTHS = {"full": (160, 256), "small": (20, 32)}


def wan22_vae_config(size: str = "full") -> dict[str, Any]:
    """The Wan2.2 VAE config (``Wan2.2_VAE.pth`` as converted by diffusers; wan.md §1.2), at the real
    widths or (``"small"``) an eighth of them."""
    sys.path.insert(0, str(ROOT / "tests"))
    from ref_vae import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD

    base_dim, decoder_base_dim = VAE_WIDTHS[size]
    return dict(
        base_dim=base_dim, decoder_base_dim=decoder_base_dim, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
        attn_scales=[], temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
        out_channels=12, patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
        latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD,
    )  # fmt: skip


# LTX-Video 2B transformer widths: diffusers' ``LTXVideoTransformer3DModel`` defaults (ltx.md §1.2), written
# out; the FFN is its default 4 x 2048. The block count (28 in 2B) comes from --layers.
LTX_2B_TRANSFORMER = dict(
    in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32, attention_head_dim=64,
    cross_attention_dim=2048, caption_channels=4096, qk_norm="rms_norm_across_heads",
)  # fmt: skip
# google/t5-v1_1-xxl encoder widths (ltx.md §1.2); layers and vocabulary come from the command line.
T5_XXL = dict(
    d_model=4096, d_kv=64, d_ff=10240, num_heads=64, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
)  # fmt: skip
# The 0.9.5 VAE (also 0.9.6-0.9.8's): diffusers ``scripts/convert_ltx_to_diffusers.py::get_vae_config("0.9.5")``.
LTX095_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=128, block_out_channels=(128, 256, 512, 1024, 2048),
    down_block_types=("LTXVideo095DownBlock3D",) * 4, decoder_block_out_channels=(256, 512, 1024),
    layers_per_block=(4, 6, 6, 2, 2), decoder_layers_per_block=(5, 5, 5, 5),
    spatio_temporal_scaling=(True, True, True, True), decoder_spatio_temporal_scaling=(True, True, True),
    decoder_inject_noise=(False, False, False, False),
    downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"), upsample_residual=(True, True, True),
    upsample_factor=(2, 2, 2), timestep_conditioning=True, patch_size=4, patch_size_t=1, resnet_norm_eps=1e-6,
    scaling_factor=1.0, encoder_causal=True, decoder_causal=False, spatial_compression_ratio=32,
    temporal_compression_ratio=8,
)  # fmt: skip
# LTXConditionPipeline settings of the LTX job: the photo held at frame 0 at full strength with the default
# conditioning noise, and the official configs' decode timestep and noise (README "LTX-Video").
LTX_SETTINGS = dict(fps=25.0, strength=1.0, image_cond_noise_scale=0.15, decode_timestep=0.05, decode_noise_scale=0.025)


# --- workers (each runs in its own process) ----------------------------------------------------------


def build_wan_model(model_dir: Path, layers: int, text_layers: int, text_vocab: int, vae_size: str) -> None:
    """Save the random-weight TI2V-5B-width pipeline as ``WanPipeline(expand_timesteps=True)``, the layout
    of Wan-AI/Wan2.2-TI2V-5B-Diffusers, reusing the tests' seeded builders."""
    import shutil

    import torch
    from diffusers import AutoencoderKLWan, WanPipeline

    sys.path.insert(0, str(ROOT / "tests"))
    from ref_pipeline import tiny_scheduler
    from ref_text import build_text_encoder, build_tiny_tokenizer
    from ref_transformer import build_transformer

    parts = _parts(model_dir)
    shutil.rmtree(parts, ignore_errors=True)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**wan22_vae_config(vae_size)).eval()
    pipe = WanPipeline(
        tokenizer=build_tiny_tokenizer(parts / "tokenizer"),
        text_encoder=build_text_encoder(None, dict(UMT5_XXL, vocab_size=text_vocab, num_layers=text_layers)),
        vae=vae,
        scheduler=tiny_scheduler(5.0),
        transformer=build_transformer(None, dict(TI2V_5B_TRANSFORMER, num_layers=layers)),
        transformer_2=None,
        boundary_ratio=None,
        expand_timesteps=True,
    )
    _save(pipe, model_dir)


def make_posterior_deterministic(vae: Any) -> None:
    """The encoder's log-variance channel (its last output channel) at -30 for every input: the posterior's
    standard deviation becomes exp(-15) ~ 3e-7."""
    import torch

    conv = vae.encoder.conv_out.conv
    with torch.no_grad():
        conv.weight[-1] = 0.0
        conv.bias[-1] = -30.0


def build_ltx_model(model_dir: Path, layers: int, text_layers: int, text_vocab: int, vae_size: str) -> None:
    """Save the random-weight LTX-Video-2B-width pipeline as ``LTXConditionPipeline`` with the 0.9.5 VAE (the
    layout of Lightricks/LTX-Video-0.9.5), reusing the tests' seeded builders; the VAE's posterior is made
    deterministic (:func:`make_posterior_deterministic`), so that both sides' posterior samples, each drawn
    from its own generator, are its mean to within 3e-7."""
    import shutil

    import torch
    from diffusers import AutoencoderKLLTXVideo, LTXConditionPipeline
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    from ref_ltx_pipeline import ltx_scheduler
    from ref_ltx_transformer import build_transformer
    from ref_ltx_vae import randomize_
    from ref_t5 import build_t5_encoder, build_t5_tokenizer

    shutil.rmtree(_parts(model_dir), ignore_errors=True)
    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(**LTX095_VAE).eval()
    randomize_(vae, seed=0)  # latent statistics, norms and biases away from their constant defaults
    make_posterior_deterministic(vae)
    _say(f"VAE: encoder {_millions(vae.encoder)} M, decoder {_millions(vae.decoder)} M parameters")
    pipe = LTXConditionPipeline(
        scheduler=ltx_scheduler("0.9.5"),
        vae=vae,
        text_encoder=build_t5_encoder(None, dict(T5_XXL, vocab_size=text_vocab, num_layers=text_layers)),
        tokenizer=AutoTokenizer.from_pretrained(build_t5_tokenizer(_parts(model_dir) / "tokenizer")),
        transformer=build_transformer(None, dict(LTX_2B_TRANSFORMER, num_layers=layers)),
    )
    _save(pipe, model_dir)


def _millions(module: Any) -> int:
    return round(sum(p.numel() for p in module.parameters()) / 1e6)


def _parts(model_dir: Path) -> Path:
    """Where a build keeps the files its components are made from (tokenizers)."""
    return model_dir.with_name(model_dir.name + ".parts")


def _save(pipe: Any, model_dir: Path) -> None:
    """Save ``pipe`` with ``save_pretrained`` by way of a temporary folder (a half-written model is never
    mistaken for a cached one), and remove the build's parts."""
    import shutil

    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    shutil.rmtree(_parts(model_dir), ignore_errors=True)
    tmp.rename(model_dir)


def _peak_rss_gb() -> float:
    """This process's peak resident set size (VmHWM on Linux, ru_maxrss elsewhere), in GB."""
    status = Path("/proc/self/status")
    if status.exists():
        match = re.search(r"VmHWM:\s+(\d+) kB", status.read_text())
        if match:
            return int(match.group(1)) * 1024 / 1e9
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9


def _cpu_s() -> float:
    """CPU seconds (user + system, all threads) this process has used: unlike wall time, barely changed
    by other processes competing for the cores."""
    t = os.times()
    return t.user + t.system


def _say(message: str) -> None:
    """Progress for the worker's log, so a long run can be followed."""
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def _denoise_matmuls(job: dict[str, Any], context_once: bool, text_tokens: int | None = None) -> list:
    """The job's denoise-stage matmuls (``matmuls.py``) from the saved transformer's config; diffusers
    projects the text context and its cross-attention K/V in every pass (``context_once=False``), over
    512 text rows; mlx-i2v over ``text_tokens`` (:data:`CROSS_ATTENTION_KEYS`)."""
    from matmuls import TEXT_TOKENS, denoise_matmuls

    config = json.loads((Path(job["model_dir"]) / "transformer" / "config.json").read_text())
    latent = ((job["frames"] - 1) // 4 + 1, job["height"] // 16, job["width"] // 16)
    rows = 2 if job["guidance"] > 1 else 1
    return denoise_matmuls(config, latent_shape=latent, rows=rows, steps=job["steps"], context_once=context_once,
                           text_tokens=text_tokens or TEXT_TOKENS)  # fmt: skip


class FixedDraws:
    """Stands in for diffusers' ``randn_tensor`` in a pipeline module: returns the given arrays in order,
    checking each one's shape, so that diffusers' own draws are the ones mlx-i2v is given."""

    def __init__(self, arrays: list[np.ndarray]):
        self.queue = list(arrays)

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        import torch

        array = self.queue.pop(0)
        if tuple(array.shape) != tuple(shape):
            raise RuntimeError(f"diffusers drew {tuple(shape)}, the next given draw is {array.shape}")
        return torch.from_numpy(array.copy()).to(device=device, dtype=dtype or torch.float32)

    def check_used(self) -> None:
        if self.queue:
            raise RuntimeError(f"diffusers left {len(self.queue)} of the given draws unused")


def diffusers_wan(job: dict[str, Any], device: str, dtype: Any) -> tuple[type, dict[str, Any], Callable]:
    """``WanImageToVideoPipeline`` and its call's own arguments: the initial noise as ``latents``."""
    import torch
    from diffusers import WanImageToVideoPipeline

    latents = torch.from_numpy(np.load(job["noise"])).to(device, dtype)
    return WanImageToVideoPipeline, dict(latents=latents, max_sequence_length=512), lambda: None


def diffusers_ltx(job: dict[str, Any], device: str, dtype: Any) -> tuple[type, dict[str, Any], Callable]:
    """``LTXConditionPipeline`` with the photo at frame 0. It ignores ``latents`` at full denoise strength and
    draws its noises with ``randn_tensor``: the initial noise, one conditioning noise per step, the decode's
    noise, in that order; they are replaced by the job's. Its generator only samples the (deterministic)
    posterior."""
    import torch
    from diffusers import LTXConditionPipeline
    from diffusers.pipelines.ltx import pipeline_ltx_condition

    draws = FixedDraws([np.load(job["noise"]), *np.load(job["step_noise"]), np.load(job["decode_noise"])])
    pipeline_ltx_condition.randn_tensor = draws
    kwargs = {k: v for k, v in job["ltx"].items() if k != "fps"}  # diffusers' names but for the frame rate
    kwargs.update(frame_rate=job["ltx"]["fps"], generator=torch.Generator(device).manual_seed(0))
    return LTXConditionPipeline, kwargs, draws.check_used


def _diffusers_vae(model_dir: str, dtype: Any) -> Any:
    from diffusers import AutoModel

    return AutoModel.from_pretrained(model_dir, subfolder="vae", torch_dtype=dtype)


def run_diffusers(job: dict[str, Any], out: Path) -> dict[str, Any]:
    """The family's diffusers pipeline with its components timed: stage boundaries are the end of the last
    text-encoder call, the end of ``vae.encode`` and the start of ``vae.decode``."""
    import torch
    from PIL import Image

    device = job["torch_device"]
    dtype = getattr(torch, job["dtype"])
    pipeline_class, family_kwargs, check = FAMILIES[job["family"]].diffusers(job, device, dtype)
    tic = time.perf_counter()
    vae_dtype = getattr(torch, job.get("vae_dtype", job["dtype"]))
    # A VAE in another dtype is loaded on its own, as diffusers' Wan docs load a float32 one (bf16 jobs).
    own_vae = {} if vae_dtype == dtype else {"vae": _diffusers_vae(job["model_dir"], vae_dtype)}
    pipe = pipeline_class.from_pretrained(job["model_dir"], torch_dtype=dtype, **own_vae).to(device)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - tic
    rss_after_load = _peak_rss_gb()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()
        elif device == "mps":
            torch.mps.synchronize()

    events: list[tuple[str, float, float]] = []

    def timed(name: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            sync()
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            sync()
            events.append((name, start, time.perf_counter()))
            _say(f"{name} {events[-1][2] - start:.1f}s")
            return result

        return wrapper

    # Instance attributes shadow the bound methods; nn.Module.__call__ dispatches to self.forward.
    pipe.text_encoder.forward = timed("text", pipe.text_encoder.forward)
    pipe.transformer.forward = timed("transformer", pipe.transformer.forward)
    pipe.vae.encode = timed("encode", pipe.vae.encode)
    pipe.vae.decode = timed("decode", pipe.vae.decode)
    pipe.vae.decoder.forward = timed("decoder chunk", pipe.vae.decoder.forward)  # one per latent frame

    step_ends: list[float] = []

    def step_end(pipe, step, timestep, callback_kwargs) -> dict:
        sync()
        step_ends.append(time.perf_counter() - start)
        return {}

    def generate() -> np.ndarray:
        with torch.no_grad():
            return pipe(
                image=Image.open(job["photo"]).convert("RGB"), prompt=job["prompt"],
                negative_prompt=job["negative_prompt"], height=job["height"], width=job["width"],
                num_frames=job["frames"], num_inference_steps=job["steps"], guidance_scale=job["guidance"],
                output_type="np", callback_on_step_end=step_end, **family_kwargs,
            ).frames[0]  # fmt: skip

    start = time.perf_counter()  # step_end's origin in the warm-up too
    if job.get("warmup"):
        _say("warm-up run")
        generate()
        sync()
        events.clear()
        step_ends.clear()
        family_kwargs, check = FAMILIES[job["family"]].diffusers(job, device, dtype)[1:]  # fresh draws
    load_before = os.getloadavg()
    start, cpu_start = time.perf_counter(), _cpu_s()
    frames = generate()
    sync()
    end, cpu = time.perf_counter(), _cpu_s() - cpu_start
    check()
    text_end = max(e for n, _, e in events if n == "text")
    encode_end = max(e for n, _, e in events if n == "encode")
    decode_start = min(s for n, s, _ in events if n == "decode")
    np.save(out / "frames_diffusers.npy", np.asarray(frames, dtype=np.float32))
    peak_rss = _peak_rss_gb()  # before the matmul timing below allocates its operands
    cuda = device == "cuda"
    device_peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    device_reserved = torch.cuda.max_memory_reserved() / 1e9 if cuda else None  # the allocator's whole pool
    matmul = None
    if job["matmul_repeats"]:
        from matmuls import time_torch

        _say("timing the denoise matmuls")
        matmul = time_torch(_denoise_matmuls(job, context_once=False), job["matmul_repeats"], device)
    return {
        "load_s": load_s,
        "seconds": {
            "text": text_end - start,
            "image": encode_end - text_end,
            "denoise": decode_start - encode_end,
            "decode": end - decode_start,
        },
        "transformer_calls": sum(n == "transformer" for n, _, _ in events),
        "step_ends_s": step_ends,
        "generate_s": end - start,
        "generate_cpu_s": cpu,
        "loadavg_before_after": [load_before[0], os.getloadavg()[0]],
        "peak_rss_load_gb": rss_after_load,
        "peak_rss_gb": peak_rss,
        "threads": torch.get_num_threads(),
        "device_peak_gb": device_peak,
        "device_reserved_gb": device_reserved,
        "denoise_matmul": matmul,
    }


# The text keys mlx-i2v's Wan cross-attention ran with, per generation (its step_context folds the padding
# after the longest prompt), so that its matmul timing has the products its stage ran.
CROSS_ATTENTION_KEYS: list[int] = []


def mlx_wan(job: dict[str, Any]) -> tuple[dict[str, Any], Callable]:
    """The Wan call's own arguments: the initial noise as ``latents``; records the cross-attention's keys."""
    from mlx_i2v.models.wan.transformer import WanTransformer3DModel

    step_context = WanTransformer3DModel.step_context
    if not hasattr(step_context, "spied"):

        def spy(self, *args):
            kv = step_context(self, *args)
            CROSS_ATTENTION_KEYS.append(kv[0].k.shape[2])
            return kv

        spy.spied = True
        WanTransformer3DModel.step_context = spy
    return dict(latents=np.load(job["noise"])), lambda: None


def mlx_ltx(job: dict[str, Any]) -> tuple[dict[str, Any], Callable]:
    """The LTX call's own arguments, with diffusers' draws given: the initial noise as ``latents``, the
    per-step conditioning noises and the decode's noise in place of those drawn from the seed."""
    import mlx.core as mx

    from mlx_i2v.families.ltx import conditioning as ltx_conditioning
    from mlx_i2v.families.ltx import variants as ltx_family

    noise = np.load(job["noise"])  # (1, C, T, h, w)
    _, channels, frames, h, w = noise.shape
    steps = [mx.array(n.reshape(1, frames, h, w, channels)) for n in np.load(job["step_noise"])]  # from (1, L, C)
    ltx_conditioning.conditioning_noise = lambda seed, t, shape: steps.pop(0)
    mix = mx.array(np.load(job["decode_noise"]).transpose(0, 2, 3, 4, 1))
    seeded = ltx_family.decode_noises
    ltx_family.decode_noises = lambda shape, seed: (mix, seeded(shape, seed)[1])  # (0.9.5 injects no noise)

    def check() -> None:
        if steps:
            raise RuntimeError(f"mlx-i2v left {len(steps)} of the conditioning noises unused")

    return dict(latents=noise, **job["ltx"]), check


def run_mlx(job: dict[str, Any], out: Path) -> dict[str, Any]:
    """mlx-i2v's pipeline with its own per-stage timings (``Video.stats``); fails if anything imported
    torch."""
    import mlx.core as mx
    from PIL import Image

    from mlx_i2v import load_pipeline

    family_kwargs, check = FAMILIES[job["family"]].mlx(job)
    tic = time.perf_counter()
    pipe = load_pipeline(job["model_dir"], dtype=job["dtype"], vae_dtype=job.get("vae_dtype"))
    load_s = time.perf_counter() - tic
    rss_after_load = _peak_rss_gb()
    plan = pipe.plan(height=job["height"], width=job["width"], num_frames=job["frames"], guidance=job["guidance"] > 1)
    step_ends: list[float] = []

    def step_end(step: int, total: int, t: float) -> None:
        step_ends.append(time.perf_counter() - start)
        _say(f"step {step}/{total} at {step_ends[-1]:.1f}s")

    def generate() -> Any:
        return pipe(
            Image.open(job["photo"]).convert("RGB"), job["prompt"], negative_prompt=job["negative_prompt"],
            height=job["height"], width=job["width"], num_frames=job["frames"], num_inference_steps=job["steps"],
            guidance_scale=job["guidance"], on_step=step_end, **family_kwargs,
        )  # fmt: skip

    start = time.perf_counter()  # step_end's origin in the warm-up too
    if job.get("warmup"):
        _say("warm-up run")
        generate()
        step_ends.clear()
        family_kwargs, check = FAMILIES[job["family"]].mlx(job)  # fresh draws
    load_before = os.getloadavg()
    start, cpu_start = time.perf_counter(), _cpu_s()
    video = generate()
    end, cpu = time.perf_counter(), _cpu_s() - cpu_start
    check()
    if "torch" in sys.modules:
        raise RuntimeError("the mlx-i2v worker imported torch")
    np.save(out / "frames_mlx.npy", video.frames)
    peak_rss, mlx_peak = _peak_rss_gb(), mx.get_peak_memory() / 1e9  # before the matmul timing
    matmul = None
    if job["matmul_repeats"]:
        from matmuls import time_mlx

        _say("timing the denoise matmuls")
        keys = CROSS_ATTENTION_KEYS[-1] if CROSS_ATTENTION_KEYS else None
        matmul = time_mlx(_denoise_matmuls(job, context_once=True, text_tokens=keys), job["matmul_repeats"])
    return {
        "load_s": load_s,
        "seconds": video.stats["seconds"],
        "loading_seconds": video.stats["loading_seconds"],
        "step_ends_s": step_ends,
        "generate_s": end - start,
        "generate_cpu_s": cpu,
        "loadavg_before_after": [load_before[0], os.getloadavg()[0]],
        "peak_rss_load_gb": rss_after_load,
        "peak_rss_gb": peak_rss,
        "mlx_peak_memory_gb": mlx_peak,
        "plan_peak_gb": plan.peak / 1e9,
        "device": str(mx.default_device()),
        "cross_attention_keys": CROSS_ATTENTION_KEYS[-1] if CROSS_ATTENTION_KEYS else None,
        "denoise_matmul": matmul,
    }


# --- the parent ------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, RAM, OS, GPU and library versions."""
    info: dict[str, Any] = {"os": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count()}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), flags=re.M)
        info["cpu"] = names[0].strip() if names else platform.processor()
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        info["ram_gb"] = round(mem_kb * 1024 / 1e9, 1)
    elif sys.platform == "darwin":
        sysctl = lambda key: subprocess.run(["sysctl", "-n", key], capture_output=True, text=True).stdout.strip()  # noqa: E731
        info["cpu"] = sysctl("machdep.cpu.brand_string")
        info["ram_gb"] = round(int(sysctl("hw.memsize")) / 1e9, 1)
    versions = subprocess.run(
        [sys.executable, "-c", "import mlx.core, torch, diffusers, transformers, json; print(json.dumps("
         "{'mlx': mlx.core.__version__, 'torch': torch.__version__, 'diffusers': diffusers.__version__,"
         " 'transformers': transformers.__version__, 'cuda': torch.cuda.get_device_name(0) "
         "if torch.cuda.is_available() else None}))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    info.update(json.loads(versions.stdout))
    return info


def _child(args: list[str], env: dict[str, str], log: Path) -> None:
    """Run this script as a worker; its stderr goes to ``log`` (shown if it fails)."""
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, __file__, *args], env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args[:2])} failed ({proc.returncode}):\n" + log.read_text()[-4000:])


def _torch_device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def _inputs(work: Path, family: "BenchFamily", height: int, width: int, frames: int, steps: int) -> dict[str, str]:
    """A smooth synthetic photo at exactly the frame size (so neither side resizes it), the initial noise in
    diffusers' (1, C, T, h, w) latent layout and, for LTX, the pipeline's other draws: one conditioning noise
    per step in its packed (1, T*h*w, C) token layout and the decode's noise, (1, C, T, h, w)."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / width, y * 255 / height, 128 + 127 * np.sin((x + y) / 17)], axis=-1)
    photo = work / "photo.png"
    Image.fromarray(rgb.astype(np.uint8)).save(photo)
    temporal, spatial = family.strides
    c, t, h, w = family.latent_channels, (frames - 1) // temporal + 1, height // spatial, width // spatial
    shapes = {"noise": (1, c, t, h, w)}
    if family.draws_noise:
        shapes.update(step_noise=(steps, 1, t * h * w, c), decode_noise=(1, c, t, h, w))
    paths = {"photo": str(photo)}
    for seed, (name, shape) in enumerate(shapes.items()):
        paths[name] = str(work / f"{name}.npy")
        np.save(paths[name], np.random.default_rng(seed).standard_normal(shape).astype(np.float32))
    return paths


def compare(results: dict[str, Any], work: Path) -> dict[str, Any]:
    """Frame difference and the mlx/diffusers ratios the targets are stated in."""
    ref = np.load(work / "frames_diffusers.npy")
    ours = np.load(work / "frames_mlx.npy")
    if ref.shape != ours.shape:
        sys.exit(f"frame shapes differ: diffusers {ref.shape}, mlx-i2v {ours.shape}")
    diff = np.abs(ours - ref)
    d, m = results["diffusers"], results["mlx"]
    stages = {k: m["seconds"][k] / d["seconds"][k] for k in d["seconds"]}
    stages["denoise_loop"] = denoise_loop(m) / denoise_loop(d)
    return {
        "frames_shape": list(ref.shape),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "frames_std": float(ref.std()),  # a non-trivial clip: the difference is measured on real content
        "ratio_generate_s": m["generate_s"] / d["generate_s"],
        "ratio_generate_cpu_s": m["generate_cpu_s"] / d["generate_cpu_s"],
        "ratio_peak_rss": m["peak_rss_gb"] / d["peak_rss_gb"],
        "ratio_stage_s": stages,
        "ratio_load_s": m["load_s"] / d["load_s"],
        # on a GPU: MLX's peak allocation over PyTorch's (torch.cuda.max_memory_allocated)
        "ratio_device_peak": m["mlx_peak_memory_gb"] / d["device_peak_gb"] if d.get("device_peak_gb") else None,
        # each side's denoise stage over its own matmuls alone (None when a side did not time them)
        "denoise_over_matmuls": {side: _over_matmuls(r) for side, r in results.items()},
        # each side's last step over one step's matmuls: a pass with the stage's first-use costs behind it
        "last_step_over_matmuls": {side: _last_step_over_matmuls(r) for side, r in results.items()},
    }


def denoise_loop(result: dict[str, Any]) -> float:
    """A side's denoise stage less the time it spent loading components: mlx-i2v loads the transformer
    when the stage starts (``Video.stats["loading_seconds"]``), diffusers in ``from_pretrained`` (its
    ``load_s``), so the loops compare like with like. Runs from before it was recorded count it all."""
    return result["seconds"]["denoise"] - result.get("loading_seconds", {}).get("denoise", 0.0)


def median_result(runs: list[Any]) -> Any:
    """One side's runs as one result: every number the median of that number over the runs (lists of
    numbers, such as the step ends, element by element), everything else the first run's."""
    first = runs[0]
    if all(r == first for r in runs[1:]):
        return first
    if isinstance(first, dict):
        return {k: median_result([r[k] for r in runs]) for k in first}
    if isinstance(first, list) and all(isinstance(r, list) and len(r) == len(first) for r in runs):
        return [median_result(list(values)) for values in zip(*runs)]
    if all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in runs):
        return float(np.median(runs))
    return first


# Per-run figures kept in the report (--repeat): the targets' ratios and what moves them.
RUN_FIGURES = {
    "end to end": lambda c: c["ratio_generate_s"],
    "peak RSS": lambda c: c["ratio_peak_rss"],
    "denoise loop": lambda c: c["ratio_stage_s"]["denoise_loop"],
    "loop / its matmuls": lambda c: c["denoise_over_matmuls"]["mlx"],
    "last step / its matmuls": lambda c: c["last_step_over_matmuls"]["mlx"],
    "VAE decode": lambda c: c["ratio_stage_s"]["decode"],
}
RUN_TARGETS = {"end to end": 0.9, "peak RSS": 0.75, "denoise loop": 0.9, "loop / its matmuls": 1.15}


def _run_summary(comparison: dict[str, Any], runs: dict[str, list[dict[str, Any]]], i: int) -> dict[str, Any]:
    """One run's ratios (:data:`RUN_FIGURES`) and each side's end-to-end seconds."""
    figures = {}
    for name, figure in RUN_FIGURES.items():
        try:
            figures[name] = figure(comparison)
        except (KeyError, TypeError):  # not timed (LTX's matmuls)
            figures[name] = None
    seconds = {side: rs[i]["generate_s"] for side, rs in runs.items() if rs}  # none for a side --only skips
    return {"ratios": figures, "generate_s": seconds, "max_abs_diff": comparison["max_abs_diff"]}


def runs_line(report: dict[str, Any]) -> str:
    """How the medians were taken and each run's spread (reports of one run: nothing)."""
    per_run = report.get("per_run")
    if not per_run:
        return ""
    parts = []
    for name in RUN_FIGURES:
        values = [r["ratios"][name] for r in per_run if r["ratios"].get(name) is not None]
        if not values:
            continue
        part = f"{name} {min(values):.2f}-{max(values):.2f}x"
        if name in RUN_TARGETS:
            part += f" (met in {sum(v <= RUN_TARGETS[name] for v in values)} of {len(values)})"
        parts.append(part)
    counts = report["runs"]
    how = (
        f"the median of {counts['mlx']} runs of each side, diffusers and mlx-i2v alternately,"
        if counts["mlx"] == counts["diffusers"]
        else f"the median of mlx-i2v's {counts['mlx']} and diffusers' {counts['diffusers']} run(s),"
    )
    return f"\n- Each figure is {how} and so are the targets' ratios; the runs' own ratios: {'; '.join(parts)}."


def _loading(result: dict[str, Any]) -> float:
    return sum(result.get("loading_seconds", {}).values())


def _over_matmuls(result: dict[str, Any]) -> float | None:
    matmul = result.get("denoise_matmul")
    return denoise_loop(result) / matmul["seconds"] if matmul else None


def _last_step_over_matmuls(result: dict[str, Any]) -> float | None:
    """The last denoising step's wall time over one step's matmuls (``matmuls.seconds_per_step``). The
    stage as a whole also pays what runs once: its first block in fresh memory, the text context's K/V
    (mlx-i2v). None without the matmul timing or a second step."""
    from matmuls import seconds_per_step

    matmul, ends = result.get("denoise_matmul"), result.get("step_ends_s") or []
    if not matmul or len(ends) < 2:
        return None
    return (ends[-1] - ends[-2]) / seconds_per_step(matmul, len(ends))


def markdown(report: dict[str, Any]) -> str:
    """The README section for one run."""
    job, mach, d, m, c = report["job"], report["machine"], report["diffusers"], report["mlx"], report["comparison"]
    rows = [
        ("text encoder (s)", d["seconds"]["text"], m["seconds"]["text"]),
        ("image encode (s)", d["seconds"]["image"], m["seconds"]["image"]),
        ("denoise (s)", d["seconds"]["denoise"], m["seconds"]["denoise"]),
        ("denoise, its loading left out (s)", denoise_loop(d), denoise_loop(m)),
        ("VAE decode (s)", d["seconds"]["decode"], m["seconds"]["decode"]),
        ("**generate, end to end (s)**", d["generate_s"], m["generate_s"]),
        ("generate, CPU time (s)", d["generate_cpu_s"], m["generate_cpu_s"]),
        ("load (s, not in the above)", d["load_s"], m["load_s"]),
        ("components loaded inside the stages above (s)", _loading(d), _loading(m)),
        ("peak RSS after load (GB)", d["peak_rss_load_gb"], m["peak_rss_load_gb"]),
        ("**peak RSS (GB)**", d["peak_rss_gb"], m["peak_rss_gb"]),
    ]
    if d.get("device_peak_gb"):  # a CUDA run: PyTorch's peak allocation against MLX's
        rows.append(("**GPU peak allocation (GB)**", d["device_peak_gb"], m["mlx_peak_memory_gb"]))
    if d.get("denoise_matmul") and m.get("denoise_matmul"):
        rows.insert(4, ("denoise: its matmuls alone (s)", d["denoise_matmul"]["seconds"], m["denoise_matmul"]["seconds"]))
    table = "\n".join(f"| {name} | {a:.2f} | {b:.2f} | {f'{b / a:.2f}x' if a else '-'} |" for name, a, b in rows)
    t = report["targets"]
    verdict = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    load = lambda r: "{:.1f} -> {:.1f}".format(*r["loadavg_before_after"])  # noqa: E731
    return f"""{report['marker']}
### {mach.get('cpu', '?')}, {mach['cores']} cores, {mach.get('ram_gb', '?')} GB RAM ({report['date'][:10]})

- Software: {mach['os']}, Python {mach['python']}; mlx {mach['mlx']} on `{m['device']}` with BLAS
  `{report['mlx_blas'] or 'as shipped'}`{blas_env(report)}; torch {mach['torch']} on `{job['torch_device']}` ({d['threads']} threads{', ' + mach['cuda'] if mach.get('cuda') else ''});
  diffusers {mach['diffusers']}; transformers {mach['transformers']}; {job['dtype']} on both sides{_run_note(job)}.
- Model: {FAMILIES[job.get('family', 'wan')].describe(job)}
- Job: height {job['height']} x width {job['width']}, {job['frames']} frames, {job['steps']} steps, guidance
  {job['guidance']:g} (CFG: batch of 2); {c['frames_shape'][0]} frames out.
- 1-minute load average before -> after each run (other work on the machine inflates wall times, not
  CPU times): diffusers {load(d)}, mlx-i2v {load(m)}.{runs_line(report)}

| stage | diffusers | mlx-i2v | mlx / diffusers |
|---|---:|---:|---:|
{table}

Largest difference between the two runs' frames: **{c['max_abs_diff']:.2e}** (mean {c['mean_abs_diff']:.1e}; frames in
[0, 1] with std {c['frames_std']:.3f}). Targets: wall time ≤ 0.9x: {c['ratio_generate_s']:.2f}x, {verdict(t['wall'])};
peak RSS ≤ 0.75x: {c['ratio_peak_rss']:.2f}x, {verdict(t['rss'])}.{matmul_line(report)}{plan_line(m, t)}
<!-- /{report['marker'][5:-4]} -->
"""


def _run_note(job: dict[str, Any]) -> str:
    """The VAE's dtype where it differs from the compute dtype, and whether each side generated once before
    the timed run."""
    vae = job.get("vae_dtype", job["dtype"])
    note = "" if vae == job["dtype"] else f", the VAE in {vae}"
    return note + (" (each side warmed up by one untimed generation)" if job.get("warmup") else "")


VAE_NAMES = {
    "full": "the real Wan2.2 VAE",
    "small": "a narrow Wan2.2 VAE (base 20, decoder base 32: an eighth of the real widths)",
}


def blas_env(report: dict[str, Any]) -> str:
    """The OpenBLAS settings the MLX side ran with, as shell assignments (none in runs before they were
    recorded)."""
    settings = report.get("mlx_blas_env") or {}
    return "".join(f" (`{k}={v}`)" for k, v in settings.items())


def matmul_line(report: dict[str, Any]) -> str:
    """Each denoise stage over its own matmuls, and the denoise targets (runs from before the matmuls
    were timed have none)."""
    over = report["comparison"].get("denoise_over_matmuls") or {}
    if over.get("mlx") is None:
        return ""
    t = report["targets"]
    verdict = "met" if t["denoise_matmuls"] else "**missed**"
    theirs = f" (diffusers: {over['diffusers']:.2f}x its own)" if over.get("diffusers") else ""
    ratios = report["comparison"]["ratio_stage_s"]
    ratio = ratios.get("denoise_loop", ratios["denoise"])
    last = report["comparison"].get("last_step_over_matmuls") or {}
    last_step = (
        f" Its last step alone: {last['mlx']:.2f}x that step's matmuls"
        + (f" (diffusers: {last['diffusers']:.2f}x)." if last.get("diffusers") else ".")
        if last.get("mlx")
        else ""
    )
    return (
        f"\nDenoise loop (the stage less loading the transformer, which diffusers does in `from_pretrained`):"
        f" {ratio:.2f}x diffusers' (target ≤ 0.9x: {'met' if t['denoise'] else '**missed**'});"
        f" {_near(over['mlx'], 1.15)}x the time of its own matmuls alone{theirs} (target ≤ 1.15x: {verdict})."
        f"{last_step}"
    )


def _near(value: float, target: float) -> str:
    """``value`` to 2 decimals, or 4 where 2 would round it onto the other side of ``target``."""
    shown = f"{value:.2f}"
    return shown if (float(shown) <= target) == (value <= target) else f"{value:.4f}"


def plan_line(m: dict[str, Any], t: dict[str, Any]) -> str:
    """The planner's estimate against MLX's measured peak allocation (results from before it was recorded
    have none)."""
    if "plan_peak_gb" not in m:
        return ""
    verdict = "met" if t["plan"] else "**missed**"
    error = m["plan_peak_gb"] / m["mlx_peak_memory_gb"] - 1
    return (
        f"\nPlanner (`--dry-run`): estimated peak {m['plan_peak_gb']:.2f} GB, MLX's measured peak allocation"
        f" {m['mlx_peak_memory_gb']:.2f} GB ({error:+.0%}); within 15 %: {verdict}."
    )


def write_readme(section: str, marker: str, end: str = RESULTS_END) -> None:
    """Replace this machine + job's section in README.md, or add it before the ``end`` marker (this
    script's results-end by default)."""
    text = README.read_text()
    end_marker = f"<!-- /{marker[5:-4]} -->"
    if marker in text and end_marker in text:
        before, rest = text.split(marker, 1)
        text = before + section.rstrip("\n") + rest.split(end_marker, 1)[1]
    elif end in text:
        text = text.replace(end, section + "\n" + end)
    else:
        text += "\n" + section
    README.write_text(text)


@dataclass(frozen=True)
class BenchFamily:
    """What a model family brings to the comparison; the rest of the script is the same for both."""

    frames: int  # default frame count and guidance
    guidance: float
    latent_channels: int
    strides: tuple[int, int]  # the VAE's (temporal, spatial) compression
    draws_noise: bool  # the pipeline draws noise beyond the initial latents (given to both sides)
    matmuls: bool  # matmuls.py knows its transformer
    build: Callable[..., None]
    diffusers: Callable[..., tuple[type, dict[str, Any], Callable]]
    mlx: Callable[..., tuple[dict[str, Any], Callable]]
    model_name: Callable[[argparse.Namespace], str]  # the cached model folder's name
    tag: Callable[[argparse.Namespace], str]  # appended to run folders and README markers
    describe: Callable[[dict[str, Any]], str]  # the README's "Model:" line


def _vae_tag(args: argparse.Namespace) -> str:
    return "" if args.vae == "full" else f"-vae{args.vae}"


def _describe_wan(job: dict[str, Any]) -> str:
    return f"""TI2V-5B widths with {job['layers']} transformer blocks, {job['text_layers']} UMT5 layer(s) (vocabulary
  {job['text_vocab']}), {VAE_NAMES[job.get('vae', 'full')]}."""


def _describe_ltx(job: dict[str, Any]) -> str:
    s = job["ltx"]
    return f"""LTX-Video 2B widths (32 heads x 64, cross-attention 2048, caption channels 4096, FFN 8192) with
  {job['layers']} transformer blocks (of 28), T5 v1.1-XXL widths with {job['text_layers']} layer(s) (vocabulary
  {job['text_vocab']}), the real 0.9.5 VAE (encoder 694 M + decoder 553 M parameters), image to video through
  `LTXConditionPipeline` on both sides: the photo at frame 0 with strength {s['strength']:g} and conditioning
  noise {s['image_cond_noise_scale']:g}, frame rate {s['fps']:g}, decode timestep {s['decode_timestep']:g} and
  noise {s['decode_noise_scale']:g}; every random draw (initial, per-step conditioning and decode noise) given
  to both sides, the VAE posterior deterministic (log-variance -30)."""


FAMILIES = {
    "wan": BenchFamily(
        frames=41, guidance=5.0, latent_channels=48, strides=(4, 16), draws_noise=False, matmuls=True,
        build=build_wan_model, diffusers=diffusers_wan, mlx=mlx_wan,
        model_name=lambda a: f"ti2v5b-widths-l{a.layers}-t{a.text_layers}-v{a.text_vocab}{_vae_tag(a)}",
        tag=_vae_tag, describe=_describe_wan,
    ),
    "ltx": BenchFamily(
        frames=33, guidance=3.0, latent_channels=128, strides=(8, 32), draws_noise=True, matmuls=False,
        build=build_ltx_model, diffusers=diffusers_ltx, mlx=mlx_ltx,
        model_name=lambda a: f"ltx2b-widths-l{a.layers}-t{a.text_layers}-v{a.text_vocab}-vae095",
        tag=lambda a: "-ltx", describe=_describe_ltx,
    ),
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=list(FAMILIES), default="wan", help="Wan2.2-TI2V-5B or LTX-Video 2B widths")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "mlx-i2v-bench")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--frames", type=int, help="41 (Wan), 33 (LTX)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--guidance", type=float, help="5 (Wan), 3 (LTX)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (30 in TI2V-5B, 28 in LTX 2B)")
    parser.add_argument("--text-layers", type=int, default=1, help="UMT5 / T5 layers (24 in umt5-xxl and t5-v1_1-xxl)")
    parser.add_argument("--text-vocab", type=int, default=512, help="embedding rows (256384 in umt5-xxl, 32128 in T5)")
    parser.add_argument("--vae", choices=list(VAE_WIDTHS), default="full", help="Wan: the real VAE or an eighth of it")
    parser.add_argument("--matmul-repeats", type=int, default=3, help="Wan: timings of each denoise matmul (0: skip)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--vae-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="both sides' VAE (float32: mlx-i2v's default and diffusers' Wan docs)")
    parser.add_argument("--torch-device", default="auto", help="cpu, cuda, mps or auto")
    parser.add_argument("--warmup", action="store_true",
                        help="each side generates once before the timed run (GPUs: kernel compilation, autotuning)")
    parser.add_argument("--blas", default=DEFAULT_BLAS, help="library preloaded for MLX on Linux ('' for none)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each side, alternately; the report gives each figure's median and the spread")
    parser.add_argument("--only", choices=["diffusers", "mlx"], help="rerun one side, reusing the other's result")
    parser.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results.json")
    parser.add_argument("--no-readme", action="store_true", help="do not write benchmarks/README.md")
    parser.add_argument("--worker", choices=["build", "diffusers", "mlx"], help=argparse.SUPPRESS)
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    family = FAMILIES[args.family]
    if args.family != "wan" and args.vae != "full":
        parser.error("--vae applies to the Wan job only")

    if args.worker == "build":
        family.build(args.model_dir, args.layers, args.text_layers, args.text_vocab, args.vae)
        return
    if args.worker is not None:
        job = json.loads(args.job.read_text())
        out = args.job.parent
        result = (run_diffusers if args.worker == "diffusers" else run_mlx)(job, out)
        (out / f"result_{args.worker}.json").write_text(json.dumps(result, indent=2))
        return

    frames = args.frames or family.frames
    guidance = family.guidance if args.guidance is None else args.guidance
    tag = family.tag(args)
    model_dir = args.cache_dir / family.model_name(args)
    work = args.cache_dir / f"run-{args.height}x{args.width}x{frames}-s{args.steps}-{args.dtype}{tag}"
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if not model_dir.exists():
        print(f"building {model_dir.name} ...", flush=True)
        _child(["--worker", "build", "--family", args.family, "--model-dir", str(model_dir), "--layers",
                str(args.layers), "--text-layers", str(args.text_layers), "--text-vocab", str(args.text_vocab),
                "--vae", args.vae], env, work / "build.log")  # fmt: skip
    job = {
        "family": args.family, "model_dir": str(model_dir),
        **_inputs(work, family, args.height, args.width, frames, args.steps), "prompt": PROMPT,
        "negative_prompt": NEGATIVE_PROMPT, "height": args.height, "width": args.width, "frames": frames,
        "steps": args.steps, "guidance": guidance, "dtype": args.dtype, "vae_dtype": args.vae_dtype,
        "torch_device": _torch_device(args.torch_device), "layers": args.layers,
        "text_layers": args.text_layers, "text_vocab": args.text_vocab, "vae": args.vae,
        "matmul_repeats": args.matmul_repeats if family.matmuls else 0, "warmup": args.warmup,
    }  # fmt: skip
    if args.family == "ltx":
        job["ltx"] = LTX_SETTINGS
    job_file = work / "job.json"
    job_file.write_text(json.dumps(job, indent=2))

    blas = args.blas if sys.platform == "linux" and args.blas and Path(args.blas).exists() else None
    mlx_env = dict(OPENBLAS_SETTINGS, **env, LD_PRELOAD=blas) if blas else env  # the caller's settings win
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    runs: dict[str, list[dict[str, Any]]] = {"diffusers": [], "mlx": []}
    per_run = []
    for i in range(args.repeat):
        for side, side_env in (("diffusers", env), ("mlx", mlx_env)):
            if args.only not in (None, side):
                continue
            print(f"running {side}{f' ({i + 1} of {args.repeat})' if args.repeat > 1 else ''} ...", flush=True)
            _child(["--worker", side, "--job", str(job_file)], side_env, work / f"{side}.log")
            runs[side].append(json.loads((work / f"result_{side}.json").read_text()))
        # a side not rerun (--only) keeps its last result
        pair = {side: (runs[side] or [json.loads((work / f"result_{side}.json").read_text())])[-1] for side in runs}
        per_run.append(compare(pair, work))
    results = {side: median_result(side_runs) if side_runs else pair[side] for side, side_runs in runs.items()}
    comparison = compare(results, work)
    if args.repeat > 1:  # the frames of every run, not just the last
        comparison["max_abs_diff"] = max(c["max_abs_diff"] for c in per_run)
        comparison["mean_abs_diff"] = max(c["mean_abs_diff"] for c in per_run)
    mach = machine()
    key = re.sub(r"[^a-z0-9]+", "-", f"{mach.get('cpu', '')}-{mach['cores']}c-{job['torch_device']}-"
                 f"{args.height}x{args.width}x{frames}-s{args.steps}-l{args.layers}-{args.dtype}{tag}".lower())  # fmt: skip
    over_matmuls = comparison["denoise_over_matmuls"]["mlx"]
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "marker": f"<!-- bench:{key} -->",
        "machine": mach,
        "mlx_blas": blas,
        "mlx_blas_env": {k: mlx_env[k] for k in OPENBLAS_SETTINGS if k in mlx_env},
        "job": job,
        **results,
        "comparison": comparison,
        "runs": {side: len(side_runs) or 1 for side, side_runs in runs.items()},  # 1: a result --only reused
        "per_run": [_run_summary(c, runs, i) for i, c in enumerate(per_run)] if args.repeat > 1 else None,
        "targets": {
            "wall": comparison["ratio_generate_s"] <= 0.9,
            "rss": comparison["ratio_peak_rss"] <= 0.75,
            "plan": "plan_peak_gb" in results["mlx"]
            and abs(results["mlx"]["plan_peak_gb"] / results["mlx"]["mlx_peak_memory_gb"] - 1) <= 0.15,
            "denoise": comparison["ratio_stage_s"]["denoise_loop"] <= 0.9,
            "denoise_matmuls": None if over_matmuls is None else over_matmuls <= 1.15,  # None: not timed
        },
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    section = markdown(report)
    if not args.no_readme:
        write_readme(section, report["marker"])
    print(section)


if __name__ == "__main__":
    main()
