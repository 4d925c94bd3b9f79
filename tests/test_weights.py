"""The strict loading mechanism every model relies on."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_i2v.errors import WeightLoadError
from mlx_i2v.weights import IDENTITY, Rule, WeightMap, conv_weight, flatten, load_strict, read_safetensors


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.conv = nn.Conv2d(2, 5, kernel_size=3)
        self.norm = nn.LayerNorm(4)


def _source():
    return {
        "proj.weight": mx.ones((4, 3)),
        "proj.bias": mx.zeros((4,)),
        "conv.weight": mx.arange(5 * 2 * 3 * 3, dtype=mx.float32).reshape(5, 2, 3, 3),
        "conv.bias": mx.zeros((5,)),
        "norm.weight": mx.ones((4, 1, 1)),
        "norm.bias": mx.zeros((4,)),
        "unused.buffer": mx.zeros((1,)),
    }


MAP = WeightMap(
    "tiny",
    rules=(Rule(r"conv\.weight", transform=conv_weight), Rule(r"norm\.weight", transform=flatten), IDENTITY),
    ignore=(r"unused\..*",),
)


def test_map_applies_layout_transforms_and_ignores_declared_keys():
    mapped = MAP.apply(_source())
    assert "unused.buffer" not in mapped
    assert mapped["conv.weight"].shape == (5, 3, 3, 2)
    np.testing.assert_array_equal(np.array(mapped["conv.weight"])[1, 2, 0, 1], np.array(_source()["conv.weight"])[1, 1, 2, 0])
    model = Tiny()
    load_strict(model, mapped, dtype=mx.bfloat16, keep_float32=(r"^norm\.",))
    assert model.proj.weight.dtype == mx.bfloat16
    assert model.norm.weight.dtype == mx.float32


def test_unclaimed_source_tensor_is_named():
    strict = WeightMap("tiny", rules=(Rule(r"proj\..*"),))
    with pytest.raises(WeightLoadError, match=r"conv\.bias"):
        strict.apply(_source())


def test_missing_unexpected_and_misshaped_are_named():
    mapped = MAP.apply(_source())
    del mapped["proj.bias"]
    mapped["extra.weight"] = mx.zeros((1,))
    mapped["norm.bias"] = mx.zeros((7,))
    with pytest.raises(WeightLoadError) as err:
        load_strict(Tiny(), mapped, dtype=mx.float32)
    message = str(err.value)
    assert "missing 1 tensor (proj.bias)" in message
    assert "unexpected 1 tensor (extra.weight)" in message
    assert "norm.bias (7,) != (4,)" in message
    assert "\n" not in message


def test_sharded_and_truncated_safetensors(tmp_path):
    import json

    mx.save_safetensors(str(tmp_path / "a.safetensors"), {"x": mx.ones((2,))})
    mx.save_safetensors(str(tmp_path / "b.safetensors"), {"y": mx.zeros((3,))})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}})
    )
    assert sorted(read_safetensors(tmp_path)) == ["x", "y"]
    data = (tmp_path / "b.safetensors").read_bytes()
    (tmp_path / "b.safetensors").write_bytes(data[: len(data) - 4])
    with pytest.raises(WeightLoadError, match="b.safetensors"):
        read_safetensors(tmp_path)
    (tmp_path / "b.safetensors").unlink()
    with pytest.raises(WeightLoadError, match="missing"):
        read_safetensors(tmp_path)
