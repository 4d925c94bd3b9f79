"""mlx-i2v: image-to-video diffusion (the Wan and LTX-Video families) in MLX.

Public API::

    from mlx_i2v import load_pipeline
    pipe = load_pipeline("Wan-AI/Wan2.2-TI2V-5B-Diffusers")
    video = pipe("photo.jpg", "a cat surfing a wave")
    video.save("cat.mp4")
    longer = pipe.extend(video, "the wave breaks", num_frames=48)   # see the README's creative loop
"""

import logging

from .clips import Clip, load_clip
from .errors import GenerationCancelled, InvalidInputError, MlxI2VError, ModelNotFoundError, WeightLoadError
from .loading import load_pipeline
from .lora import LoRA
from .pipeline import Pipeline, WanPipeline
from .families.ltx.upscale import Upscale
from .video import Video

__version__ = "0.1.0"

__all__ = [
    "load_pipeline",
    "LoRA",
    "Pipeline",
    "WanPipeline",
    "Upscale",
    "Video",
    "Clip",
    "load_clip",
    "MlxI2VError",
    "InvalidInputError",
    "ModelNotFoundError",
    "WeightLoadError",
    "GenerationCancelled",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
