"""bfloat16 as a Mac runs it: mlx-i2v's default half-precision path against diffusers' own.

diffusers' Wan docs run the transformer and the text encoder in bfloat16 and load the VAE and the CLIP
image encoder in float32 (``AutoencoderKLWan.from_pretrained(..., torch_dtype=torch.float32)`` and the
same for ``image_encoder``, then ``WanImageToVideoPipeline.from_pretrained(..., vae=vae,
image_encoder=image_encoder, torch_dtype=torch.bfloat16)``). Both bfloat16 paths are compared with
diffusers' float32 output for the same photo, prompts and noise, on the tiny random-weight pipelines.

One noise sample's PSNR moves by about 1 dB with the rounding of the moment, either way, so the squared
errors are pooled over a few noise seeds before comparing.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mlx_i2v import load_pipeline
from mlx_i2v.errors import InvalidInputError

HEIGHT, WIDTH, FRAMES = 64, 96, 5
SEEDS = (0, 1, 2)
SHIFT = {"ti2v": 5.0, "i2v": 3.0, "flf2v": 16.0, "a14b": 5.0}  # each tiny repo's shipped flow shift


def _photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([x * 255 / WIDTH, y * 255 / HEIGHT, np.full_like(x, 128)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def _noise(variant: str, seed: int) -> np.ndarray:
    channels, stride = (48, 16) if variant == "ti2v" else (16, 8)
    shape = (1, channels, (FRAMES - 1) // 4 + 1, HEIGHT // stride, WIDTH // stride)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _request(variant: str) -> dict:
    request = dict(prompt="a boat on a lake", negative_prompt="low quality", height=HEIGHT, width=WIDTH,
                   num_frames=FRAMES, num_inference_steps=2, guidance_scale=5.0, image=_photo(1))  # fmt: skip
    if variant == "flf2v":
        request["last_image"] = _photo(7)
    if variant == "a14b":
        request["guidance_scale_2"] = 3.0  # 2 steps at shift 5 are t = 999 and 833: both experts run
    return request


def _psnr(squared_errors: list[float]) -> float:
    """PSNR of frames in [0, 1] from the mean squared errors of several runs, pooled."""
    return float(-10 * np.log10(np.mean(squared_errors)))


def _mse(frames: np.ndarray, reference: np.ndarray) -> float:
    return float(np.mean((frames.astype(np.float64) - reference) ** 2))


@pytest.fixture(scope="module")
def model_dirs(tiny_ti2v_dir, tiny_i2v_dirs):
    return {"ti2v": tiny_ti2v_dir, **tiny_i2v_dirs}


@pytest.fixture(scope="module")
def expected(model_dirs):
    """diffusers' float32 frames of (variant, seed), computed once for the tests of this module."""
    frames: dict[tuple[str, int], np.ndarray] = {}

    def get(variant: str, seed: int) -> np.ndarray:
        if (variant, seed) not in frames:
            reference, _ = _diffusers_pipelines(model_dirs[variant], half=False)
            frames.update({(variant, s): _diffusers_frames(reference, variant, s) for s in SEEDS})
        return frames[variant, seed]

    return get


def _diffusers_pipelines(model_dir, half: bool = True):
    """diffusers in float32 (the reference) and, unless not ``half``, in bfloat16 as its Wan docs run it:
    the same float32 VAE and CLIP modules, everything else loaded in bfloat16."""
    from diffusers import WanImageToVideoPipeline

    reference = WanImageToVideoPipeline.from_pretrained(model_dir, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    if not half:
        return reference, None
    image_side = {"vae": reference.vae}
    if reference.image_encoder is not None:
        image_side["image_encoder"] = reference.image_encoder
    half = WanImageToVideoPipeline.from_pretrained(model_dir, dtype=torch.bfloat16, **image_side)
    assert half.transformer.dtype == half.text_encoder.dtype == torch.bfloat16 and half.vae.dtype == torch.float32
    half.set_progress_bar_config(disable=True)
    return reference, half


def _diffusers_frames(pipe, variant: str, seed: int) -> np.ndarray:
    with torch.no_grad():
        out = pipe(output_type="np", max_sequence_length=512, latents=torch.from_numpy(_noise(variant, seed)),
                   **_request(variant)).frames  # fmt: skip
    return np.asarray(out[0], np.float32)


def _ours_frames(pipe, variant: str, seed: int) -> np.ndarray:
    request = _request(variant)
    image, prompt = request.pop("image"), request.pop("prompt")
    return pipe(image, prompt, latents=_noise(variant, seed), flow_shift=SHIFT[variant], **request).frames


@pytest.mark.parametrize("variant", list(SHIFT))
def test_default_bfloat16_is_within_1db_of_diffusers_bfloat16(variant, model_dirs, expected):
    _, half = _diffusers_pipelines(model_dirs[variant])
    ours = load_pipeline(model_dirs[variant], dtype="bfloat16")
    assert ours.vae_dtype == mx.float32  # the default, as diffusers' docs
    errors: dict[str, list[float]] = {"diffusers": [], "ours": []}
    for seed in SEEDS:
        errors["diffusers"].append(_mse(_diffusers_frames(half, variant, seed), expected(variant, seed)))
        errors["ours"].append(_mse(_ours_frames(ours, variant, seed), expected(variant, seed)))
    psnr = {k: _psnr(v) for k, v in errors.items()}
    # Both really ran in half precision (float32 would be ~120 dB), and ours is no worse than 1 dB below.
    assert psnr["diffusers"] < 80 and psnr["ours"] < 80, psnr
    assert psnr["ours"] >= psnr["diffusers"] - 1.0, psnr


def test_bfloat16_vae_is_within_1db_of_diffusers_bfloat16_vae(model_dirs, expected):
    """``vae_dtype="bfloat16"`` (everything in bfloat16) against diffusers with every component in
    bfloat16: its convolutions compute in float32 as PyTorch's do, so it loses no more than diffusers.
    On the Wan2.2 VAE, whose stages use every convolution path of the Wan2.1 VAE too."""
    from diffusers import WanImageToVideoPipeline

    variant = "ti2v"
    half = WanImageToVideoPipeline.from_pretrained(model_dirs[variant], dtype=torch.bfloat16)
    half.set_progress_bar_config(disable=True)
    assert half.vae.dtype == torch.bfloat16
    ours = load_pipeline(model_dirs[variant], dtype="bfloat16", vae_dtype="bfloat16")
    errors: dict[str, list[float]] = {"diffusers": [], "ours": []}
    for seed in SEEDS:
        errors["diffusers"].append(_mse(_diffusers_frames(half, variant, seed), expected(variant, seed)))
        errors["ours"].append(_mse(_ours_frames(ours, variant, seed), expected(variant, seed)))
    psnr = {k: _psnr(v) for k, v in errors.items()}
    assert psnr["ours"] >= psnr["diffusers"] - 1.0, psnr


def test_vae_dtype_is_validated_loaded_recorded_and_planned(model_dirs):
    with pytest.raises(InvalidInputError, match=r"^unsupported vae_dtype 'float8'; use one of float32, bfloat16"):
        load_pipeline(model_dirs["i2v"], vae_dtype="float8")
    pipe = load_pipeline(model_dirs["i2v"], dtype="float32", vae_dtype="bfloat16")
    assert pipe.vae_encoder.get().quant_conv.weight.dtype == mx.bfloat16
    assert pipe.vae_decoder.get().post_quant_conv.weight.dtype == mx.bfloat16
    tower = pipe.image_encoder.get().tower  # CLIP runs in the VAE's dtype
    assert tower.vision_model.embeddings.patch_embedding.weight.dtype == mx.bfloat16
    video = pipe(_photo(1), "x", height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=1, seed=0)
    assert (video.metadata["dtype"], video.metadata["vae_dtype"]) == ("float32", "bfloat16")

    # The planner counts the VAE in its dtype: float32 weights are twice bfloat16's, activations more.
    kwargs = dict(height=HEIGHT, width=WIDTH, num_frames=FRAMES, budget=10**10)
    full = load_pipeline(model_dirs["i2v"], dtype="bfloat16").plan(**kwargs)
    halved = pipe.plan(**kwargs)
    for stage in ("vae_encode", "vae_decode"):
        assert full.stage(stage).weights == 2 * halved.stage(stage).weights
        assert full.stage(stage).activations > halved.stage(stage).activations  # (float32 conv workspaces)
    assert "VAE float32" in full.summary() and "VAE bfloat16" in halved.summary()


def test_planner_suggests_a_bfloat16_vae_when_that_alone_fits():
    from mlx_i2v import planner
    from mlx_i2v.families.wan import planner as wan_planner
    from mlx_i2v.memory import GB

    # Wan2.2-TI2V-5B at 4 bits, 1280x704, 121 frames: the float32 VAE's decode (~15.4 GB) is the peak.
    request = dict(height=704, width=1280, num_frames=121, dtype=mx.bfloat16, quantize=4, backend="metal",
                   budget=14 * GB)  # fmt: skip
    plan = planner.plan_generation(wan_planner.TI2V_5B, **request)
    assert plan.vae_dtype == mx.float32 and not plan.fits()
    assert planner.plan_generation(wan_planner.TI2V_5B, vae_dtype=mx.bfloat16, **request).fits()
    assert "--vae-dtype bfloat16" in plan.suggestions


def test_conversion_keeps_the_vae_and_clip_in_float32(model_dirs, tmp_path):
    from mlx_i2v.convert import convert_model
    from mlx_i2v.weights import read_safetensors

    out = convert_model(model_dirs["i2v"], tmp_path / "mlx", dtype="bfloat16")
    dtypes = {name: {v.dtype for v in read_safetensors(out / name).values()}
              for name in ("vae", "image_encoder", "text_encoder")}  # fmt: skip
    assert dtypes == {"vae": {mx.float32}, "image_encoder": {mx.float32}, "text_encoder": {mx.bfloat16}}
    pipe = load_pipeline(out)  # loads as converted: bfloat16 compute, the float32 VAE by default
    assert pipe.vae_decoder.get().post_quant_conv.weight.dtype == mx.float32


def test_half_precision_attention_is_as_precise_as_pytorchs():
    """At head dim 128 (every Wan transformer) with large scores: MLX's unfused fallback in bfloat16
    rounds the scores (4-6x PyTorch's error); computed in float32 it is at least as close to float64."""
    from mlx_i2v.models.attention import attention

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 4, 256, 128)) * s for s in (2.0, 2.0, 1.0))
    q, k, v = (torch.from_numpy(a).bfloat16() for a in (q, k, v))  # inputs exact in bfloat16
    truth = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).numpy()

    def error(out: np.ndarray) -> float:
        return float(np.linalg.norm(out - truth) / np.linalg.norm(truth))

    theirs = error(F.scaled_dot_product_attention(q, k, v).float().numpy())
    ours_in = [mx.array(a.float().numpy()).astype(mx.bfloat16) for a in (q, k, v)]
    out = attention(*ours_in)
    assert out.dtype == mx.bfloat16
    assert error(np.array(out.astype(mx.float32))) <= theirs * 1.05, theirs


def test_cli_takes_vae_dtype(tiny_ti2v_dir, tmp_path):
    from test_cli import GOOD, _run

    photo = tmp_path / "photo.png"
    _photo(1).save(photo)
    result = _run("generate", str(photo), "-p", "x", "--model", str(tiny_ti2v_dir), *GOOD, "--dtype", "bfloat16",
                  "--vae-dtype", "bfloat16", "--dry-run", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "bfloat16, VAE bfloat16" in result.stdout
    result = _run("generate", str(photo), "-p", "x", "--model", str(tiny_ti2v_dir), "--vae-dtype", "float8", cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: ") and "--vae-dtype" in result.stderr
