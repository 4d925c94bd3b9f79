"""Converting Wan checkpoints (diffusers or Wan-AI original layout) into MLX model directories.

::

    from mlx_i2v.convert import convert_model, quantize_model, model_info

    convert_model("Wan-AI/Wan2.2-TI2V-5B", "wan-ti2v-mlx", quantize=4)
    quantize_model("wan-i2v-mlx", "wan-i2v-mlx-8bit", bits=8)
    model_info("wan-ti2v-mlx")["components"]["transformer"]["parameters"]

The output holds the diffusers component folders (``transformer/``, ``text_encoder/``, ``vae/``, ...) with
MLX-layout safetensors and configs, and a ``model_index.json`` whose ``_mlx_i2v`` entry records the
variant, dtype, quantization, default generation settings and source. Modules: ``source`` (layouts, Hub
ids), ``original`` and ``infer`` (original-layout repos), ``plan`` (what is written), ``writer`` (atomic
output), ``api`` (the two conversions), ``info``.
"""

from .api import convert_model, quantize_model
from .info import model_info
from .source import MLX_KEY

__all__ = ["convert_model", "quantize_model", "model_info", "MLX_KEY"]
