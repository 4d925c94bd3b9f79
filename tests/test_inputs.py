"""The Python API's input checks, its limits, high step counts, image options, prompts and threads, on
the tiny pipelines."""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mlx_i2v import load_pipeline
from mlx_i2v.errors import InvalidInputError, WeightLoadError

SMALL = dict(height=32, width=32, num_frames=1, num_inference_steps=1, seed=0)


def _photo(width: int = 48, height: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 5 % 256, y * 7 % 256, (x + y) % 256], axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def ti2v(tiny_ti2v_dir):
    return load_pipeline(tiny_ti2v_dir, dtype="float32")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height="64"), "height must be an integer"),
        (dict(width=64.0), "width must be an integer"),
        (dict(num_frames="abc"), "num_frames must be an integer"),
        (dict(num_frames=5.7), "num_frames must be an integer"),
        (dict(num_frames=True), "num_frames must be an integer"),
        (dict(num_inference_steps=2.0), "num_inference_steps must be an integer"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(seed=True), "seed must be an integer"),
        (dict(seed="7"), "seed must be an integer"),
        (dict(seed=-1), "seed must be >= 0"),
        (dict(seed=2**64), "seed must be <= 18446744073709551615"),
        (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number >= 0, got inf"),
        (dict(guidance_scale="5"), "guidance_scale must be a number"),
        (dict(guidance_scale=float("nan")), "finite"),
        (dict(flow_shift=float("inf")), "flow_shift must be a finite number > 0, got inf"),
        (dict(negative_prompt=b"blurry"), "negative_prompt must be a string"),
        (dict(negative_prompt="caf\udce9"), "negative_prompt is not valid UTF-8"),
        (dict(latents=[[0.0]]), "latents must be a float numpy array"),
        (dict(latents=np.full((1, 48, 1, 2, 2), np.nan, np.float32)), "NaN"),
        (dict(on_step="print"), "on_step must be callable"),
        (dict(rotate=45), "rotate"),
        (dict(crop=(0, 0, 100, 100)), "does not fit inside the 48x32 photo"),
        (dict(fit="fill"), "fit"),
    ],
)
def test_every_wrong_argument_is_an_invalid_input_error(ti2v, kwargs, message):
    arguments = {**SMALL, **kwargs}
    with pytest.raises(InvalidInputError, match=message):
        ti2v(_photo(), "x", **arguments)
    with pytest.raises(InvalidInputError, match=message):
        ti2v.resolve_settings(_photo(), **arguments)
    assert not ti2v.text_encoder.loaded and ti2v.experts.resident() == []


@pytest.mark.parametrize(
    "image, prompt, message",
    [
        (np.zeros((0, 4, 3), np.uint8), "x", "empty"),
        (np.zeros((4, 4, 3), np.float32), "x", "uint8"),
        (b"photo.png", "x", "unsupported image type bytes"),
        (_photo(), b"a fox", "prompt must be a string"),
        (_photo(), "caf\udce9", "prompt is not valid UTF-8"),
    ],
)
def test_bad_images_and_prompts(ti2v, image, prompt, message):
    with pytest.raises(InvalidInputError, match=message):
        ti2v(image, prompt, **SMALL)


def test_seed_range_is_accepted_whole(ti2v):
    assert ti2v.resolve_settings(_photo(), **{**SMALL, "seed": 2**64 - 1}).seed == 2**64 - 1
    assert ti2v.resolve_settings(_photo(), **{**SMALL, "seed": np.uint64(5)}).seed == 5


def test_frame_and_size_limits_are_known_before_loading(ti2v):
    limits = ti2v.dims.limits()
    assert limits.num_frames == (1024 - 1) * 4 + 1 and limits.height == 1024 * 2 * 16  # rope_max_seq_len 1024
    for kwargs, name in ((dict(num_frames=10000), "num_frames 10001"), (dict(height=40000), "height 40000")):
        with pytest.raises(InvalidInputError, match=f"{name} is more than this model can take: at most"):
            ti2v.resolve_settings(_photo(), **{**SMALL, **kwargs})
    with pytest.raises(InvalidInputError, match="at most 4093"):
        ti2v.plan(height=32, width=32, num_frames=10001)  # what --dry-run prints refuses it too
    assert ti2v.resolve_settings(_photo(), **{**SMALL, "num_frames": limits.num_frames}).num_frames == 4093


def test_high_step_counts_run_to_the_end(ti2v, tiny_i2v_dirs):
    # These failed on their last step: the schedules repeat timestep 999 (see test_schedulers).
    steps = []
    video = ti2v(_photo(), "x", **{**SMALL, "num_inference_steps": 201, "guidance_scale": 1.0},
                 on_step=lambda step, total, t: steps.append(step))
    assert steps == list(range(1, 202)) and np.isfinite(video.frames).all()
    flf2v = load_pipeline(tiny_i2v_dirs["flf2v"], dtype="float32")
    video = flf2v(_photo(), "x", last_image=_photo(), height=32, width=32, num_frames=5, num_inference_steps=64,
                  guidance_scale=1.0, seed=0)
    assert np.isfinite(video.frames).all()


def test_steps_the_scheduler_cannot_run_are_refused_with_the_limit(ti2v):
    with pytest.raises(InvalidInputError, match="at most 9578 steps"):
        ti2v.resolve_settings(_photo(), **{**SMALL, "num_inference_steps": 10000, "flow_shift": 100.0})


def test_hand_edited_defaults_are_a_load_error(tiny_ti2v_dir, tmp_path):
    from mlx_i2v.families.wan.variants import load_variant

    model = tmp_path / "edited"
    shutil.copytree(tiny_ti2v_dir, model)
    index = json.loads((model / "model_index.json").read_text())
    defaults = dict(num_inference_steps=50, guidance_scale=5.0, flow_shift=5.0, fps=24.0, num_frames=121,
                    sizes=[[704, 1280]])
    for change, message in ((dict(sizes=[[0, 0]]), "default height"), (dict(fps=0), "fps"),
                            (dict(num_frames=2.5), "num_frames"), (dict(sizes=[]), "sizes")):
        index["_mlx_i2v"] = {"variant": "wan2.2-ti2v-5b", "defaults": {**defaults, **change}}
        (model / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(WeightLoadError, match=message):
            load_variant(model)
    index["_mlx_i2v"]["defaults"] = defaults
    (model / "model_index.json").write_text(json.dumps(index))
    assert load_variant(model).defaults.sizes == ((704, 1280),)


def test_exif_portrait_picks_the_portrait_size(ti2v, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone portrait stored sideways
    path = tmp_path / "portrait.jpg"
    Image.fromarray(_photo(120, 80)).save(path, exif=exif)
    settings = ti2v.resolve_settings(path)
    assert (settings.height, settings.width) == (1280, 704)
    assert ti2v.resolve_settings(path, rotate=90).height == 704  # turned back to landscape
    assert ti2v.resolve_settings(path, crop=(0, 0, 80, 40)).height == 704  # a landscape part of the portrait


def test_image_options_reach_the_frames_and_the_metadata(ti2v):
    photo = np.zeros((32, 64, 3), np.uint8)
    photo[:, :32] = 255  # left half white, right half black
    kwargs = dict(SMALL, guidance_scale=1.0)
    video = ti2v(photo, "x", crop=(32, 0, 32, 32), rotate=0, fit="contain", background="#ff0000", **kwargs)
    m = video.metadata
    assert (m["crop"], m["rotate"], m["fit"], m["background"]) == ([32, 0, 32, 32], 0, "contain", [255, 0, 0])
    json.dumps(m)
    # The first frame reproduces the photo through the tiny VAE: the cropped photo differs from the whole.
    whole = ti2v(photo, "x", **kwargs)
    assert "crop" in whole.metadata and whole.metadata["crop"] is None
    assert np.abs(video.frames[0] - whole.frames[0]).max() > 0.05


def test_peak_memory_counts_image_loading(ti2v):
    big = np.random.default_rng(0).integers(0, 255, (3000, 4000, 3), dtype=np.uint8)
    video = ti2v(big, "x", **{**SMALL, "guidance_scale": 1.0})
    decoded = 4000 * 3000 * 4  # Pillow holds RGB in 4 bytes per pixel
    assert mx.get_peak_memory() < decoded  # MLX alone never saw the photo's buffers
    assert video.stats["peak_memory_gb"] * 1e9 >= decoded


def test_long_prompt_is_cut_with_a_notice(ti2v, caplog):
    prompt = " ".join(f"word{i}" for i in range(600))
    with caplog.at_level(logging.WARNING, logger="mlx_i2v"):
        ti2v.encode_text([prompt, "short"], names=("prompt", "negative prompt"))
    assert re.search(r"the prompt is \d+ tokens, more than the 511 the model reads: the last \d+ tokens", caplog.text)
    assert "negative prompt" not in caplog.text


def test_usable_from_any_thread_one_call_at_a_time(tiny_ti2v_dir):
    pipe = load_pipeline(tiny_ti2v_dir, dtype="float32")
    kwargs = dict(SMALL, num_inference_steps=2, guidance_scale=1.0)
    on_main = pipe(_photo(), "x", **kwargs).frames

    results, errors = {}, {}

    def work(name: str, **extra) -> None:
        try:
            results[name] = pipe(_photo(), "x", **{**kwargs, **extra}).frames
        except Exception as e:  # noqa: BLE001 - checked below
            errors[name] = e

    worker = threading.Thread(target=work, args=("worker",))
    worker.start()
    worker.join()
    assert errors == {}
    np.testing.assert_array_equal(results["worker"], on_main)

    # Two at once: while "a" is inside its call, "b" waits. "b" has a bad seed, so it would fail within
    # milliseconds if it were not waiting; it fails only once "a" is done.
    b = threading.Thread(target=work, args=("b",), kwargs=dict(seed=-1))
    b_waited = []

    def a_step(step: int, total: int, t: int) -> None:
        if step == 1:
            b.start()
            b.join(timeout=1.0)
            b_waited.append(b.is_alive())

    a = threading.Thread(target=work, args=("a",), kwargs=dict(on_step=a_step))
    a.start()
    a.join()
    b.join()
    assert b_waited == [True]
    np.testing.assert_array_equal(results["a"], on_main)
    assert isinstance(errors.pop("b"), InvalidInputError) and errors == {}
