"""The Wan family's components: transformer, VAE (Wan2.1 and Wan2.2), CLIP image encoder (Wan2.1 I2V/FLF2V).
The UMT5 text encoder, attention and convolutions are shared with other families (``mlx_i2v.models``)."""
