"""Guidance- and sequence-parallel generation over MLX's ring backend with local processes.

Each parallel run starts its ranks as separate processes on 127.0.0.1 (``parallel_ranks``) and compares
rank 0's frames with the same generation in this process, which is alone (every ``mx.distributed`` call
a no-op). Tensors are tiny: the local ring moves ~0.1-0.2 GB/s on this machine.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_i2v import load_pipeline
from mlx_i2v.errors import InvalidInputError
from mlx_i2v.models.wan.transformer import WanTransformerConfig
from mlx_i2v.parallel import Layout, choose_layout
from mlx_i2v.parallel.comm import partition
from mlx_i2v.parallel.handshake import digest
from mlx_i2v.parallel.sequence import TokenShard
from mlx_i2v.parallel.traffic import step_bytes
from mlx_i2v.families.wan.planner import latent_grid
from parallel_ranks import free_ports, python, run_ranks, start_ranks, wait_ranks
from parallel_worker import photo

pytestmark = pytest.mark.skipif(not mx.distributed.is_available("ring"), reason="MLX built without the ring backend")

WORKER = str(Path(__file__).parent / "parallel_worker.py")
# 96x96 with 9 frames is a 3x3x3 token grid for TI2V: 27 tokens, which 2 and 4 ranks do not divide.
ODD = dict(height=96, width=96, num_frames=9)
SMALL = dict(height=64, width=96, num_frames=5)


# --- layouts, shards, digests: no processes ---------------------------------------------------------


@pytest.mark.parametrize(
    "mode, ranks, guided, expected",
    [
        ("auto", 2, True, Layout(2, 1)),
        ("auto", 2, False, Layout(1, 2)),
        ("auto", 4, True, Layout(2, 2)),
        ("auto", 3, True, Layout(1, 3)),
        ("cfg", 2, True, Layout(2, 1)),
        ("cfg", 2, False, Layout(1, 2)),  # guidance off falls through to sequence parallel
        ("sequence", 4, True, Layout(1, 4)),
        ("auto", 1, True, Layout(1, 1)),
    ],
)
def test_layout_choice(mode, ranks, guided, expected):
    assert choose_layout(mode, ranks, guided) == expected


def test_layout_places_every_rank_once_and_keeps_pairs_on_ring_neighbours():
    layout = Layout(2, 2)
    assert [layout.place(r) for r in range(4)] == [(0, 0), (0, 1), (1, 1), (1, 0)]
    assert all(layout.rank_of(*layout.place(r)) == r for r in range(4))
    assert layout.guidance_groups() == [(0, 3), (1, 2)]  # same shard, both branches
    assert layout.sequence_groups() == [(0, 1), (3, 2)]  # same branch, shards in order
    assert Layout(2, 3).guidance_groups() == [(0, 5), (1, 4), (2, 3)]
    with pytest.raises(InvalidInputError, match="cfg splits the two guidance branches over 2 ranks, not 4"):
        choose_layout("cfg", 4, True)
    with pytest.raises(InvalidInputError, match="parallel must be one of"):
        choose_layout("tensor", 2, True)


class _World:
    """A stand-in for an ``mx.distributed.Group`` that records splits instead of making them."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size, self.splits = rank, size, []

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    def split(self, color: int, key: int):
        self.splits.append((color, key))


def test_partition_chooses_one_transport_for_every_rank():
    # 4 ranks, no split (ring, JACCL): every pair is made of ring neighbours -> send/recv, 1 piece received
    for rank in range(4):
        for groups in (Layout(2, 2).guidance_groups(), Layout(2, 2).sequence_groups()):
            sub = partition(_World(rank, 4), groups, split=False)
            assert sub.received == 1 and sub.members[sub.index] == rank
    # 6 ranks: pair (1, 4) is not adjacent, so every rank gathers the whole group and keeps its pair's pieces
    assert {partition(_World(r, 6), Layout(2, 3).guidance_groups(), split=False).received for r in range(6)} == {5}
    # a backend that splits: the split is made at the first gather, not when the layout is built
    world = _World(2, 4)
    sub = partition(world, Layout(2, 2).sequence_groups(), split=True)
    assert sub.received == 1 and sub.members == (3, 2) and sub.index == 1 and world.splits == []
    assert partition(_World(1, 2), [(0, 1)], split=True).received == 1  # the whole group: no split at all


@pytest.mark.parametrize("length, count", [(27, 2), (27, 4), (12, 4), (5, 8)])
def test_token_shards_cover_the_sequence_in_order(length, count):
    x = mx.arange(2 * length).reshape(2, length)
    shards = [TokenShard(length, count, i).take(x, 1, pad=-1) for i in range(count)]
    assert all(s.shape == (2, -(-length // count)) for s in shards)
    joined = np.concatenate([np.array(s) for s in shards], axis=1)
    np.testing.assert_array_equal(joined[:, :length], np.array(x))
    assert (joined[:, length:] == -1).all()  # padding only at the end


def test_digest_is_stable_and_sees_every_difference():
    assert digest({"a": 1, "b": [2, 3]}) == digest({"b": [2, 3], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})
    assert digest(b"\x00" * 8) != digest(b"\x00" * 9)
    assert 0 <= digest("x") < 2**63


def test_watchdog_kills_a_stuck_process_with_one_line():
    start = "import time; from mlx_i2v.parallel.watchdog import Watchdog; w = Watchdog(); "
    stuck = start + "w.arm(5, 'rank 0: quick'); w.disarm(); w.arm(1, 'rank 0: stuck in step 3'); time.sleep(60)"
    tic = time.monotonic()
    result = subprocess.run([sys.executable, "-c", stuck], capture_output=True, text=True, timeout=60)
    assert result.returncode == -9  # SIGKILL: it could not have run a signal handler while blocked in MLX
    assert result.stderr == "error: rank 0: stuck in step 3\n"
    assert time.monotonic() - tic < 15
    in_time = start + "w.arm(1, 'rank 0: late'); time.sleep(0.2); w.disarm(); time.sleep(1.5)"
    result = subprocess.run([sys.executable, "-c", in_time], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == ""


# --- parity with one process --------------------------------------------------------------------------


def _run(tmp_path: Path, n: int, model: Path, kwargs: dict, *, parallel: str = "auto", env: dict | None = None,
         timeout: float = 240, **job) -> list:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"model": str(model), "parallel": parallel, "out": str(out), "kwargs": kwargs, **job}))
    return run_ranks(n, python(WORKER, str(spec)), tmp_path, env, timeout)


def _rank_stats(tmp_path: Path, rank: int) -> dict:
    return json.loads((tmp_path / "out" / f"stats-{rank}.json").read_text())


def _assert_matches_one_process(tmp_path: Path, results: list, model: Path, kwargs: dict, image=True) -> None:
    for r in results:
        assert r.returncode == 0, f"rank {r.rank}: {r.stderr[-2000:]}"
        assert r.stdout == ""  # the library never prints
    seeds = {_rank_stats(tmp_path, r.rank)["metadata"]["seed"] for r in results}
    assert len(seeds) == 1  # a random seed is rank 0's on every rank
    pipe = load_pipeline(model, dtype="float32")
    expected = pipe(photo() if image else None, "a fox", **{**kwargs, "seed": seeds.pop()}).frames
    frames = np.load(tmp_path / "out" / "frames.npy")
    assert frames.shape == expected.shape
    assert np.abs(frames - expected).max() < 1e-5
    assert all(_rank_stats(tmp_path, r.rank)["frames"] == 0 for r in results[1:])  # rank 0 alone decodes


def _assert_traffic(tmp_path: Path, ranks: int, model: Path, kwargs: dict, layout: Layout, guided_steps: int,
                    unguided_steps: int = 0) -> None:
    """Every rank received exactly what mlx_i2v.parallel.traffic counts for these steps."""
    pipe = load_pipeline(model, dtype="float32")
    grid = latent_grid(pipe.dims.vae, kwargs["height"], kwargs["width"], kwargs["num_frames"])
    config: WanTransformerConfig = pipe.dims.transformer
    guided = step_bytes(config, grid, layout, True, mx.float32)
    unguided = step_bytes(config, grid, layout, False, mx.float32)
    for rank in range(ranks):
        stats = _rank_stats(tmp_path, rank)["stats"]["parallel"]
        assert stats["mode"] == layout.name and stats["ranks"] == ranks
        counted = {k: v for k, v in stats["bytes_received"].items() if k != "start-up"}
        expected = {k: guided_steps * guided[k] + unguided_steps * unguided[k] for k in guided}
        assert counted == {k: v for k, v in expected.items() if v}


def test_guidance_parallel_ti2v_matches_one_process(tiny_ti2v_dir, tmp_path):
    kwargs = dict(**SMALL, num_inference_steps=2, guidance_scale=5.0, seed=3)
    results = _run(tmp_path, 2, tiny_ti2v_dir, kwargs)
    _assert_matches_one_process(tmp_path, results, tiny_ti2v_dir, kwargs)
    _assert_traffic(tmp_path, 2, tiny_ti2v_dir, kwargs, Layout(2, 1), guided_steps=2)
    meta = _rank_stats(tmp_path, 0)["metadata"]
    assert meta["parallel"] == {"ranks": 2, "mode": "cfg", "guidance_ranks": 2, "sequence_ranks": 1}
    assert meta["seed"] == 3


def test_sequence_parallel_ti2v_pads_an_odd_token_count(tiny_ti2v_dir, tmp_path):
    # 27 tokens over 2 ranks, per-token timesteps (photo frame at t=0), both guidance branches batched;
    # a random seed, which the ranks must agree on to draw the same noise.
    kwargs = dict(**ODD, num_inference_steps=2, guidance_scale=5.0, seed=None)
    results = _run(tmp_path, 2, tiny_ti2v_dir, kwargs, parallel="sequence")
    _assert_matches_one_process(tmp_path, results, tiny_ti2v_dir, kwargs)
    _assert_traffic(tmp_path, 2, tiny_ti2v_dir, kwargs, Layout(1, 2), guided_steps=2)


def test_a14b_guidance_parallel_switches_experts_together(tiny_i2v_dirs, tmp_path):
    # The high-noise expert guided, the low-noise one not: the pair swaps predictions only while guided.
    model = tiny_i2v_dirs["a14b"]
    kwargs = dict(**SMALL, num_inference_steps=4, guidance_scale=5.0, guidance_scale_2=1.0, seed=5)
    results = _run(tmp_path, 2, model, kwargs)
    _assert_matches_one_process(tmp_path, results, model, kwargs)
    pipe = load_pipeline(model, dtype="float32")
    photo = np.zeros((SMALL["height"], SMALL["width"], 3), np.uint8)
    sampler = pipe.sampler(pipe.resolve_settings(photo, num_inference_steps=4))
    high = sum(pipe.experts.index_for(float(t)) == 0 for t in np.asarray(sampler.timesteps))
    assert 0 < high < 4
    _assert_traffic(tmp_path, 2, model, kwargs, Layout(2, 1), guided_steps=high)


def test_a14b_without_guidance_falls_through_to_sequence_parallel(tiny_i2v_dirs, tmp_path):
    model = tiny_i2v_dirs["a14b"]
    kwargs = dict(**SMALL, num_inference_steps=3, guidance_scale=1.0, guidance_scale_2=1.0, seed=6)
    results = _run(tmp_path, 2, model, kwargs, parallel="cfg")
    _assert_matches_one_process(tmp_path, results, model, kwargs)
    _assert_traffic(tmp_path, 2, model, kwargs, Layout(1, 2), guided_steps=0, unguided_steps=3)


def test_four_ranks_cfg_times_sequence_matches_one_process(tiny_ti2v_dir, tmp_path):
    # CFG pairs (0,3), (1,2) and shard pairs (0,1), (3,2): every exchange between ring neighbours.
    kwargs = dict(**ODD, num_inference_steps=2, guidance_scale=5.0, seed=7)
    results = _run(tmp_path, 4, tiny_ti2v_dir, kwargs)
    _assert_matches_one_process(tmp_path, results, tiny_ti2v_dir, kwargs)
    _assert_traffic(tmp_path, 4, tiny_ti2v_dir, kwargs, Layout(2, 2), guided_steps=2)


@pytest.mark.slow
def test_four_ranks_sequence_text_to_video_matches_one_process(tiny_ti2v_dir, tmp_path):
    """SP-4 over the whole group (27 tokens in 4 shards of 7), no photo. The all_gather path it uses is
    the one the 2-rank sequence test covers; this adds the 4-way split and text-to-video."""
    kwargs = dict(**ODD, num_inference_steps=2, guidance_scale=5.0, seed=8)
    results = _run(tmp_path, 4, tiny_ti2v_dir, kwargs, parallel="sequence", photo=False)
    _assert_matches_one_process(tmp_path, results, tiny_ti2v_dir, kwargs, image=False)
    _assert_traffic(tmp_path, 4, tiny_ti2v_dir, kwargs, Layout(1, 4), guided_steps=2)


def test_restyle_and_extend_under_parallel_ranks_match_one_process(tiny_ti2v_dir, tmp_path):
    """A restyle split over sequence shards with a random seed (the clip noised with rank 0's), and an
    extension split over the guidance branches, whose stitched clip rank 0 alone writes."""
    from mlx_i2v import Video

    clip = tmp_path / "clip"
    Video(frames=np.random.default_rng(0).random((9, 64, 96, 3), np.float32), fps=8.0).save(clip)
    restyle = dict(**SMALL, video=str(clip), strength=0.5, num_inference_steps=4, guidance_scale=5.0, seed=None)
    results = _run(tmp_path, 2, tiny_ti2v_dir, restyle, parallel="sequence", photo=False)
    _assert_matches_one_process(tmp_path, results, tiny_ti2v_dir, restyle, image=False)
    assert _rank_stats(tmp_path, 1)["metadata"]["mode"] == "restyle"

    extend = dict(num_frames=4, num_inference_steps=2, guidance_scale=5.0, seed=9)
    results = _run(tmp_path, 2, tiny_ti2v_dir, extend, extend=str(clip))
    assert [r.returncode for r in results] == [0, 0], results[1].stderr[-2000:]
    expected = load_pipeline(tiny_ti2v_dir, dtype="float32").extend(str(clip), "a fox", **extend).frames
    frames = np.load(tmp_path / "out" / "frames.npy")
    # Split over the guidance branches, each rank encodes its own prompt, and the UMT5 runs over the longest
    # prompt of its batch (encode_prompts): those embeddings differ from one process's by rounding (1.4e-6
    # for a 7- and a 20-token prompt), which two steps and the decode carry to 7.7e-6 in the frames at
    # 995bdb6, 1.1e-5 since the CPU attention's sums come from a matmul (fc309a6). A wrong branch would be
    # far above 2e-5.
    assert frames.shape == expected.shape == (13, 64, 96, 3) and np.abs(frames - expected).max() < 2e-5
    assert _rank_stats(tmp_path, 0)["metadata"]["parallel"]["mode"] == "cfg"
    assert _rank_stats(tmp_path, 1)["frames"] == 0


def test_ranks_restyling_differently_stop_naming_the_mode(tiny_ti2v_dir, tmp_path):
    from mlx_i2v import Video

    clip = tmp_path / "clip"
    Video(frames=np.random.default_rng(1).random((5, 64, 96, 3), np.float32), fps=8.0).save(clip)
    kwargs = dict(**SMALL, video=str(clip), strength=0.5, num_inference_steps=4, guidance_scale=5.0, seed=3)
    results = _run(tmp_path, 2, tiny_ti2v_dir, kwargs, env={"MLX_I2V_PARALLEL_TIMEOUT": str(TIMEOUT)},
                   rank_kwargs={"1": {"strength": 0.75}})  # fmt: skip
    for r in results:
        assert r.returncode == 1
        assert r.stderr.strip() == (f"error: rank {r.rank}: the ranks were not started the same way: rank 1 "
                                    "differs from rank 0 in mode")  # fmt: skip


# --- faults ----------------------------------------------------------------------------------------------

TIMEOUT = 8  # seconds; the default is 300


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def test_a_rank_that_dies_ends_the_other_with_one_line(tiny_ti2v_dir, tmp_path):
    kwargs = dict(**ODD, num_inference_steps=4, guidance_scale=5.0, seed=3)
    tic = time.monotonic()
    results = _run(tmp_path, 2, tiny_ti2v_dir, kwargs, parallel="sequence", timeout=120, fault_rank=1, die_at_step=2,
                   env={"MLX_I2V_PARALLEL_TIMEOUT": str(TIMEOUT)})  # fmt: skip
    assert results[1].returncode == 3
    assert results[0].returncode == 1
    assert _last_line(results[0].stderr) == (
        "error: rank 0: lost the connection to rank 1 during step 3/4 (keys/values); "
        "it exited (see its error) or its host is unreachable"
    )
    assert time.monotonic() - tic < 60
    assert not (tmp_path / "out" / "frames.npy").exists()


def test_a_rank_that_hangs_is_caught_by_the_watchdog(tiny_ti2v_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    spec = tmp_path / "job.json"
    kwargs = dict(**SMALL, num_inference_steps=4, guidance_scale=5.0, seed=3)
    spec.write_text(json.dumps({"model": str(tiny_ti2v_dir), "parallel": "cfg", "out": str(out), "kwargs": kwargs,
                                "fault_rank": 1, "stop_at_step": 2}))  # fmt: skip
    procs = start_ranks(2, python(WORKER, str(spec)), tmp_path, {"MLX_I2V_PARALLEL_TIMEOUT": str(TIMEOUT)})
    try:
        tic = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
        waited = time.monotonic() - tic
    finally:
        procs[1].kill()  # it is stopped (SIGSTOP), as a frozen host would be
        procs[1].communicate()
    assert procs[0].returncode == -9
    line = _last_line(err)
    assert re.fullmatch(r"error: rank 0: no answer from rank 1 within \d+ s during step 3/4 \(guidance\); it stopped, "
                        r"hangs, or its host is unreachable", line), err
    assert waited < 90
    assert not (out / "frames.npy").exists()


def test_a_rank_that_never_connects_ends_the_start_with_one_line(tiny_ti2v_dir, tmp_path):
    # Rank 0 of two, with rank 1 never started (a host that cannot be reached): MLX waits in
    # mx.distributed.init forever, holding the GIL; the watchdog process ends it.
    out = tmp_path / "out"
    out.mkdir()
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"model": str(tiny_ti2v_dir), "out": str(out), "kwargs": SMALL}))
    procs = start_ranks(2, python(WORKER, str(spec)), tmp_path, {"MLX_I2V_PARALLEL_TIMEOUT": "3"})
    procs[1].kill()
    tic = time.monotonic()
    result = wait_ranks(procs[:1], timeout=120)[0]
    procs[1].communicate()
    assert result.returncode == -9 and time.monotonic() - tic < 60
    assert result.stderr == ("error: rank 0: the other ranks did not connect within 3 s; check that every host "
                             "runs the same command and that the hosts can reach each other\n")  # fmt: skip


def test_ranks_started_differently_stop_naming_the_rank(tiny_ti2v_dir, tmp_path):
    kwargs = dict(**SMALL, num_inference_steps=2, guidance_scale=5.0, seed=3)
    results = _run(tmp_path, 2, tiny_ti2v_dir, kwargs, env={"MLX_I2V_PARALLEL_TIMEOUT": str(TIMEOUT)},
                   rank_kwargs={"1": {"num_frames": 9, "seed": None}})  # fmt: skip
    for r in results:
        assert r.returncode == 1
        assert r.stderr.strip() == (f"error: rank {r.rank}: the ranks were not started the same way: rank 1 "
                                    "differs from rank 0 in seed, settings")  # fmt: skip


# --- the command line -----------------------------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "mlx-i2v"), *args]


def test_cli_two_ranks_write_one_clip_equal_to_one_process(tiny_ti2v_dir, tmp_path):
    from PIL import Image

    image = tmp_path / "photo.png"
    photo().save(image)
    args = ["generate", str(image), "-p", "a fox", "--model", str(tiny_ti2v_dir), "--frames", "5", "--height", "64",
            "--width", "96", "--steps", "2", "--seed", "3"]  # fmt: skip
    alone = subprocess.run(_cli(*args, "-o", str(tmp_path / "alone")), capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr
    # As users start it: mlx.launch (which exits 0 whatever the ranks do, so its output is what counts).
    launcher = Path(sys.executable).parent / "mlx.launch"
    launched = subprocess.run([str(launcher), "-n", "2", "--starting-port", str(free_ports(1)[0]), "--",
                               *_cli(*args, "-o", str(tmp_path / "ranks"))],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = launched.stdout.splitlines()  # both ranks' output: only rank 0's lines
    assert len(lines) == 5 and lines[0].startswith(f"wrote {tmp_path / 'ranks'}"), launched
    assert lines[2].startswith("of which loading models: ")
    assert lines[4].startswith("parallel: 2 ranks (cfg), rank 0 received")
    assert "error" not in launched.stderr
    for i in range(5):
        a = np.asarray(Image.open(tmp_path / "alone" / f"frame_{i:05d}.png"), np.int16)
        b = np.asarray(Image.open(tmp_path / "ranks" / f"frame_{i:05d}.png"), np.int16)
        assert np.abs(a - b).max() <= 1  # frames within 1e-5 before rounding to 8 bits
    meta = json.loads((tmp_path / "ranks" / "metadata.json").read_text())
    assert meta["parallel"]["mode"] == "cfg" and meta["seed"] == 3

    dry = run_ranks(2, _cli(*args, "--dry-run", "--parallel", "sequence"), tmp_path)
    assert [r.returncode for r in dry] == [0, 0]
    assert dry[1].stdout == "" and dry[1].stderr == ""  # the other ranks print only errors
    assert "parallel: 2 ranks, sequence; each rank computes every guidance branch on 1/2 of the tokens" in dry[0].stdout


def test_cli_rank_killed_at_any_moment_ends_the_other_with_one_line(tiny_ti2v_dir, tmp_path):
    image = tmp_path / "photo.png"
    photo().save(image)
    args = ["generate", str(image), "-p", "a fox", "--model", str(tiny_ti2v_dir), "--frames", "9", "--height", "96",
            "--width", "96", "--steps", "2000", "--seed", "3", "-o", str(tmp_path / "clip.mp4"), "--parallel-timeout",
            str(TIMEOUT)]  # fmt: skip
    procs = start_ranks(2, _cli(*args), tmp_path)
    # Kill rank 1 once rank 0 has started its steps (the tiny model runs 300 of them in about a second, so
    # a fixed delay could miss them on an idle machine); a later moment in the steps is not chosen.
    for line in procs[0].stderr:
        if line.strip() == "denoising":
            break
    procs[1].kill()
    tic = time.monotonic()
    results = wait_ranks(procs, timeout=120)
    assert time.monotonic() - tic < 60
    assert results[0].returncode != 0
    # Killed during the steps, the progress bar has printed its label (once: stderr is not a terminal).
    lines = [line for line in results[0].stderr.strip().splitlines() if line != "denoising"]
    assert len(lines) == 1 and lines[0].startswith("error: rank 0: ") and "rank" in lines[0][15:], results[0].stderr
    assert not any(p.name.startswith((".clip", "clip")) for p in tmp_path.iterdir())  # nothing half-written
