"""Building blocks of the Wan VAE (diffusers ``autoencoder_kl_wan.py``), channels-last.

Video tensors are (B, T, H, W, C); per-frame 2D layers see (B*T, H, W, C). Every temporal convolution
is causal: it only looks at the current and the two previous frames. Videos are processed in chunks of
frames (encoder: [0], [1:5], [5:9], ...; decoder: one latent frame at a time), and a
:class:`CausalCache` carries the last input frames of each temporal convolution from one chunk to the
next, mirroring the reference's chunked processing step for step.

Parameter names match diffusers' state-dict keys (``resample.1``, ``time_conv``, ``resnets.N``, ...).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..attention import attention
from ..conv import conv3d, tap_major, upsample2x_conv2d
from ..elementwise import rows_on_two_streams, silu

CACHE_T = 2  # frames of context a kernel-3 causal conv needs from the previous chunk

# Stored in an upsample3d slot after the first decoder chunk. That chunk is not upsampled in time
# (one latent frame becomes one video frame); later chunks treat the missing context as zeros.
REP = "Rep"

Slot = mx.array | str | None


class CausalCache:
    """Per-layer state carried between chunks: one slot per cached layer, visited in a fixed order.

    Call :meth:`begin_chunk` before each chunk; every cached layer then :meth:`read` s its slot and
    :meth:`write` s the new value, which moves on to the next slot.
    """

    def __init__(self) -> None:
        self._slots: list[Slot] = []
        self._next = 0

    def begin_chunk(self) -> None:
        self._next = 0

    def read(self) -> Slot:
        return self._slots[self._next] if self._next < len(self._slots) else None

    def write(self, value: Slot) -> None:
        if self._next == len(self._slots):
            self._slots.append(value)
        else:
            self._slots[self._next] = value
        self._next += 1

    def arrays(self) -> list[mx.array]:
        """The cached tensors, to evaluate with each chunk so no lazy graph spans chunks."""
        return [s for s in self._slots if isinstance(s, mx.array)]


def _tail(x: mx.array, previous: Slot) -> mx.array:
    """The last CACHE_T frames of ``x`` (B, T, H, W, C), topped up from the previous slot (zeros after
    :data:`REP`) when the chunk is shorter than that."""
    tail = x[:, -CACHE_T:]
    if tail.shape[1] < CACHE_T and previous is not None:
        top_up = mx.zeros_like(tail) if previous is REP else previous[:, -1:]
        tail = mx.concatenate([top_up, tail], axis=1)
    # A slice shares its parent's buffer: copy so the cache does not keep the whole chunk alive.
    return mx.contiguous(tail)


class CausalConv3d(nn.Conv3d):
    """Conv3d with symmetric spatial zero padding and 2*p_t frames of left-only time padding.

    When ``context`` (the previous chunk's last input frames) is given, it replaces that many frames of
    the zero time padding.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, ph, pw))
        if self.stride[1:] != (1, 1):
            raise ValueError("CausalConv3d strides only in time")
        self.time_padding = 2 * pt
        self._tap_major = False

    def __call__(self, x: mx.array, context: mx.array | None = None) -> mx.array:
        """x: (B, T, H, W, C_in) -> (B, T', H', W', C_out), evaluated; computed by :func:`~.conv.conv3d`
        (Winograd or per-tap matmuls, a few output frames at a time)."""
        pad = self.time_padding
        if context is not None and pad > 0:
            x = mx.concatenate([context, x], axis=1)
            pad -= context.shape[1]
        if not self._tap_major:  # once, on first use (loading replaces the weight by a standard array)
            self.weight = tap_major(self.weight)
            self._tap_major = True
        weight, stride = self.weight, self.stride[0]
        if pad > 0 and stride == 1:
            # The first taps may read nothing but the zero padding for every output frame (a video's first
            # chunk is one frame): leave them out rather than multiply zeros (3x fewer products there).
            skip = min(pad, pad - (x.shape[1] + pad - weight.shape[1]))
            if skip > 0:
                weight, pad = weight[:, skip:], pad - skip
        if pad > 0:
            x = mx.pad(x, [(0, 0), (pad, 0), (0, 0), (0, 0), (0, 0)])
        taps = weight.shape[1]
        bias = self.bias if "bias" in self else None
        padding = self.padding[1:]
        if stride != 1:
            windows = range(0, x.shape[1] - taps + 1, stride)
            return mx.concatenate([conv3d(x[:, t : t + taps], weight, bias, padding) for t in windows], axis=1)
        return conv3d(x, weight, bias, padding)


def cached_conv(conv: CausalConv3d, x: mx.array, cache: CausalCache) -> mx.array:
    """Run ``conv`` on a chunk, feeding it the previous chunk's frames and saving this chunk's."""
    previous = cache.read()
    cache.write(_tail(x, previous))
    return conv(x, previous)


class RMSNorm(nn.Module):
    """``F.normalize(x, dim=channels) * sqrt(C) * gamma``: L2-normalisation over channels, which is an
    RMS norm without epsilon. The tiny epsilon only keeps all-zero vectors at zero (the reference clamps
    the norm at 1e-12); ``mx.fast.rms_norm`` accumulates in float32 like the reference's upcast."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.gamma, 1e-24)


def norm_silu(norm: RMSNorm, x: mx.array) -> mx.array:
    """``silu(norm(x))`` for (..., C), evaluated; on the CPU by pieces on two streams
    (:func:`~.elementwise.rows_on_two_streams`) with :func:`~.elementwise.silu` (MLX's scalar sigmoid took
    10x PyTorch's time on 2 cores)."""
    return rows_on_two_streams(lambda rows: silu(norm(rows)), x)


class ZeroPadRightBottom(nn.Module):
    """``nn.ZeroPad2d((0, 1, 0, 1))`` on (N, H, W, C): the stride-2 conv that follows sees an even size."""

    def __call__(self, x: mx.array) -> mx.array:
        return mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])


class Upsample2x(nn.Module):
    """The slot of diffusers' nearest(-exact) 2x upsampling (``resample.0``), kept so that the convolution
    after it is ``resample.1`` as in the checkpoints. It has no parameters and is never called:
    :class:`Resample` folds the upsampling into that convolution (:func:`upsample2x_conv2d`)."""


def _per_frame(layers: list[nn.Module], x: mx.array) -> mx.array:
    """Apply 2D ``layers`` to every frame of (B, T, H, W, C)."""
    b, t = x.shape[:2]
    y = x.reshape(b * t, *x.shape[2:])
    for layer in layers:
        y = layer(y)
    return y.reshape(b, t, *y.shape[1:])


class Resample(nn.Module):
    """Spatial (and optionally temporal) down- or upsampling; ``mode`` as in diffusers' ``WanResample``.

    ``downsample3d`` halves time with a stride-2 causal ``time_conv`` (the first chunk's single frame
    passes through); ``upsample3d`` doubles time by a ``time_conv`` to 2*dim channels whose halves are
    interleaved as even/odd frames (the first decoder chunk is not doubled).
    """

    def __init__(self, dim: int, mode: str, upsample_out_dim: int | None = None) -> None:
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            out_dim = dim // 2 if upsample_out_dim is None else upsample_out_dim
            self.resample = [Upsample2x(), nn.Conv2d(dim, out_dim, 3, padding=1)]
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = [ZeroPadRightBottom(), nn.Conv2d(dim, dim, 3, stride=2)]
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def __call__(self, x: mx.array, cache: CausalCache) -> mx.array:
        """(B, T, H, W, C) -> (B, T', 2H, 2W, C') for upsampling, (B, T', H/2, W/2, C) for downsampling."""
        if self.mode == "upsample3d":
            x = self._upsample_time(x, cache)
        if self.mode.startswith("upsample"):
            conv = self.resample[1]
            b, t = x.shape[:2]
            y = upsample2x_conv2d(x.reshape(b * t, *x.shape[2:]), conv.weight, conv.bias)
            x = y.reshape(b, t, *y.shape[1:])
        else:
            x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self._downsample_time(x, cache)
        return x

    def _upsample_time(self, x: mx.array, cache: CausalCache) -> mx.array:
        previous = cache.read()
        if previous is None:
            cache.write(REP)
            return x
        cache.write(_tail(x, previous))
        y = self.time_conv(x, None if previous is REP else previous)
        b, t, h, w, c2 = y.shape
        # Channels [0:C] become frame 2i and [C:2C] frame 2i+1.
        y = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5)
        return y.reshape(b, 2 * t, h, w, c2 // 2)

    def _downsample_time(self, x: mx.array, cache: CausalCache) -> mx.array:
        previous = cache.read()
        cache.write(mx.contiguous(x[:, -1:]))
        if previous is None:
            return x
        return self.time_conv(mx.concatenate([previous, x], axis=1))


class ResidualBlock(nn.Module):
    """RMS -> SiLU -> causal conv3 -> RMS -> SiLU -> causal conv3, plus a 1x1x1 shortcut when the width
    changes. Dropout is omitted: this is inference only."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        if in_dim != out_dim:
            self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1)

    def __call__(self, x: mx.array, cache: CausalCache) -> mx.array:
        h = self.conv_shortcut(x) if "conv_shortcut" in self else x
        x = cached_conv(self.conv1, norm_silu(self.norm1, x), cache)
        x = cached_conv(self.conv2, norm_silu(self.norm2, x), cache)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (1x1 convs for qkv and projection)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def __call__(self, x: mx.array) -> mx.array:
        """x: (B, T, H, W, C) -> same shape."""
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x.reshape(b * t, h, w, c)))
        qkv = qkv.reshape(b * t, 1, h * w, 3 * c)
        q, k, v = mx.split(qkv, 3, axis=-1)
        y = attention(q, k, v).reshape(b * t, h, w, c)
        return x + self.proj(y).reshape(b, t, h, w, c)


class MidBlock(nn.Module):
    """Residual block, attention, residual block."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attentions = [AttentionBlock(dim)]
        self.resnets = [ResidualBlock(dim, dim), ResidualBlock(dim, dim)]

    def __call__(self, x: mx.array, cache: CausalCache) -> mx.array:
        x = self.resnets[0](x, cache)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x), cache)
        return x


class AvgDown3D(nn.Module):
    """Parameter-free shortcut of the Wan2.2 encoder: fold (factor_t, factor_s, factor_s) neighbourhoods
    into channels (c, t, h, w order) and average groups of them down to ``out_channels``. Time is left
    padded with zeros to a multiple of ``factor_t`` (so the first 1-frame chunk yields one frame)."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.factor_t = factor_t
        self.factor_s = factor_s
        self.group_size = in_channels * factor_t * factor_s * factor_s // out_channels

    def __call__(self, x: mx.array) -> mx.array:
        """(B, T, H, W, C) -> (B, ceil(T/ft), H/fs, W/fs, out_channels)."""
        ft, fs = self.factor_t, self.factor_s
        pad_t = (ft - x.shape[1] % ft) % ft
        if pad_t:
            x = mx.pad(x, [(0, 0), (pad_t, 0), (0, 0), (0, 0), (0, 0)])
        b, t, h, w, c = x.shape
        x = x.reshape(b, t // ft, ft, h // fs, fs, w // fs, fs, c).transpose(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, t // ft, h // fs, w // fs, self.out_channels, self.group_size)
        return x.mean(axis=-1)


class DupUp3D(nn.Module):
    """Parameter-free shortcut of the Wan2.2 decoder, the inverse layout of :class:`AvgDown3D`: repeat
    channels, then unfold them into (factor_t, factor_s, factor_s) neighbourhoods. On the first chunk the
    first ``factor_t - 1`` frames are dropped, matching the un-doubled first chunk of ``upsample3d``."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.factor_t = factor_t
        self.factor_s = factor_s
        self.repeats = out_channels * factor_t * factor_s * factor_s // in_channels

    def __call__(self, x: mx.array, first_chunk: bool) -> mx.array:
        """(B, T, H, W, C_in) -> (B, T*ft [- ft + 1], H*fs, W*fs, out_channels)."""
        ft, fs = self.factor_t, self.factor_s
        b, t, h, w, _ = x.shape
        x = mx.repeat(x, self.repeats, axis=-1)
        x = x.reshape(b, t, h, w, self.out_channels, ft, fs, fs).transpose(0, 1, 5, 2, 6, 3, 7, 4)
        x = x.reshape(b, t * ft, h * fs, w * fs, self.out_channels)
        return x[:, ft - 1 :] if first_chunk else x


class ResidualDownBlock(nn.Module):
    """Wan2.2 encoder stage: residual blocks and an optional downsampler, plus an :class:`AvgDown3D`
    shortcut around the whole stage."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool) -> None:
        super().__init__()
        factor_t, factor_s = (2 if temporal else 1), (2 if down else 1)
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, factor_t=factor_t, factor_s=factor_s)
        self.resnets = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks)]
        if down:
            self.downsampler = Resample(out_dim, "downsample3d" if temporal else "downsample2d")

    def __call__(self, x: mx.array, cache: CausalCache) -> mx.array:
        shortcut = self.avg_shortcut(x)
        for resnet in self.resnets:
            x = resnet(x, cache)
        if "downsampler" in self:
            x = self.downsampler(x, cache)
        return x + shortcut


class UpBlock(nn.Module):
    """Wan2.1 decoder stage: ``num_res_blocks + 1`` residual blocks and an optional upsampler that also
    halves the width."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample_mode: str | None) -> None:
        super().__init__()
        self.resnets = [ResidualBlock(d, out_dim) for d in [in_dim] + [out_dim] * num_res_blocks]
        if upsample_mode is not None:
            self.upsamplers = [Resample(out_dim, upsample_mode)]

    def __call__(self, x: mx.array, cache: CausalCache, first_chunk: bool) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x, cache)
        if "upsamplers" in self:
            x = self.upsamplers[0](x, cache)
        return x


class ResidualUpBlock(nn.Module):
    """Wan2.2 decoder stage: residual blocks and an optional upsampler (keeping the width), plus a
    :class:`DupUp3D` shortcut around the stage when it upsamples."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, up: bool) -> None:
        super().__init__()
        self.resnets = [ResidualBlock(d, out_dim) for d in [in_dim] + [out_dim] * num_res_blocks]
        if up:
            self.avg_shortcut = DupUp3D(in_dim, out_dim, factor_t=2 if temporal else 1, factor_s=2)
            mode = "upsample3d" if temporal else "upsample2d"
            self.upsampler = Resample(out_dim, mode, upsample_out_dim=out_dim)

    def __call__(self, x: mx.array, cache: CausalCache, first_chunk: bool) -> mx.array:
        shortcut = self.avg_shortcut(x, first_chunk) if "avg_shortcut" in self else None
        for resnet in self.resnets:
            x = resnet(x, cache)
        if shortcut is None:
            return x
        return self.upsampler(x, cache) + shortcut
