"""The BLAS's thread count (models/blas.py), and the CPU attention that holds it to one thread while each
half of its work runs its matmuls on a core of its own."""

from __future__ import annotations

import threading

import mlx.core as mx
import pytest

from mlx_i2v.models import attention as attn
from mlx_i2v.models import blas


class FakeOpenBLAS:
    """Stands in for OpenBLAS's get / set thread count, recording every count set."""

    def __init__(self, threads: int):
        self.threads = threads
        self.set_to: list[int] = []

    def get(self) -> int:
        return self.threads

    def set(self, n: int) -> None:
        self.threads = n
        self.set_to.append(n)


@pytest.fixture
def fake_blas(monkeypatch):
    fake = FakeOpenBLAS(threads=2)
    monkeypatch.setattr(blas, "_openblas", lambda: (fake.get, fake.set))
    return fake


def test_one_thread_nests_and_restores_the_count_it_found(fake_blas):
    fake_blas.threads = 3
    with blas.one_thread():
        assert fake_blas.threads == 1
        with blas.one_thread():  # a nested hold neither sets nor restores
            assert fake_blas.threads == 1
        assert fake_blas.threads == 1
    assert fake_blas.threads == 3
    assert fake_blas.set_to == [1, 3]


def test_one_thread_restores_after_an_error(fake_blas):
    with pytest.raises(RuntimeError), blas.one_thread():
        raise RuntimeError("stop")
    assert fake_blas.threads == 2


def test_one_thread_held_from_two_threads_restores_once_both_leave(fake_blas):
    inside, leave = threading.Barrier(2), threading.Event()

    def hold() -> None:
        with blas.one_thread():
            inside.wait()
            leave.wait()

    other = threading.Thread(target=hold)
    other.start()
    with blas.one_thread():
        inside.wait()
        leave.set()
        other.join()
        assert fake_blas.threads == 1  # the other thread left; this one still holds
    assert fake_blas.threads == 2
    assert fake_blas.set_to == [1, 2]


def test_one_thread_sets_openblas_where_it_is_loaded():
    """With OpenBLAS preloaded (as CI and the README's Linux notes run), its real count is held and
    restored; elsewhere nothing can be set and the hold changes nothing."""
    real = blas._openblas()
    if real is None:
        assert not blas.can_hold_to_one_thread()
        with blas.one_thread():
            pass
        return
    get, _ = real
    before = get()
    with blas.one_thread():
        assert get() == 1
    assert get() == before


@pytest.mark.parametrize("chunked", [False, True])
def test_attention_on_own_cores_holds_the_blas_to_one_thread_and_equals_sdpa(fake_blas, monkeypatch, chunked):
    """Each chunk's matmuls are evaluated while the BLAS is held to one thread; the projections behind q, k
    and v before it, on every core."""
    monkeypatch.setattr(attn, "halves_on_own_cores", lambda: True)
    if chunked:
        monkeypatch.setattr(attn, "CPU_WORKSPACE", 2 * 3 * 16 * 40 * attn.SCORE_BYTES)  # 16 queries a chunk
    keys = mx.random.split(mx.random.key(1), 4)
    x = mx.random.normal((2, 40, 48), key=keys[0])
    w = mx.random.normal((3, 48, 48), key=keys[1]) * 48**-0.5
    held_during: list[int] = []
    real_eval = mx.eval

    def eval_recording(*arrays):
        held_during.append(fake_blas.threads)
        real_eval(*arrays)

    monkeypatch.setattr(attn.mx, "eval", eval_recording)
    q, k, v = ((x @ w[i]).reshape(2, 40, 3, 16).transpose(0, 2, 1, 3) for i in range(3))
    got = attn.attention(q, k, v)
    monkeypatch.setattr(attn.mx, "eval", real_eval)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=16**-0.5)
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-6).item()
    # q, k, v first with every thread, then the chunks (3 of 16 queries, or 1) with one
    assert held_during == [2] + [1] * (4 if chunked else 2)
    assert fake_blas.threads == 2


def test_halves_on_own_cores_needs_two_cores_at_most_and_a_settable_blas(monkeypatch, fake_blas):
    monkeypatch.setattr(attn, "cpu_cores", lambda: 2)
    assert attn.halves_on_own_cores()
    monkeypatch.setattr(attn, "cpu_cores", lambda: 8)
    assert not attn.halves_on_own_cores()
    monkeypatch.setattr(attn, "cpu_cores", lambda: 2)
    monkeypatch.setattr(blas, "_openblas", lambda: None)
    assert not attn.halves_on_own_cores()
