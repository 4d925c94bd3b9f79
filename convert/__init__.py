"""Converting Wan and LTX-Video checkpoints (diffusers layout, Wan-AI original layout, Lightricks single
file) into MLX model directories.

::

    from mlx_i2v.convert import convert_model, quantize_model, model_info

    convert_model("Wan-AI/Wan2.2-TI2V-5B", "wan-ti2v-mlx", quantize=4)
    convert_model("ltxv-2b-0.9.8-distilled.safetensors", "ltx-2b-mlx", text_encoder="LTX-Video-0.9.7-distilled")
    quantize_model("wan-i2v-mlx", "wan-i2v-mlx-8bit", bits=8)
    model_info("wan-ti2v-mlx")["components"]["transformer"]["parameters"]

The output holds the diffusers component folders (``transformer/``, ``text_encoder/``, ``vae/``, ...) with
MLX-layout safetensors and configs, and a ``model_index.json`` whose ``_mlx_i2v`` entry records the
family (with the Wan variant and its default generation settings, or the LTX-Video generation), dtype,
quantization and source. Modules: ``families`` (what differs between Wan and LTX-Video), ``source``
(layouts, Hub ids), ``original`` and ``infer`` (Wan-AI original-layout repos), ``ltx`` and ``ltx_infer``
(LTX-Video single files), ``plan`` (what is written), ``writer`` (atomic output), ``api`` (the two
conversions), ``info``.
"""

from .api import convert_model, quantize_model
from .info import model_info
from .source import MLX_KEY

__all__ = ["convert_model", "quantize_model", "model_info", "MLX_KEY"]
