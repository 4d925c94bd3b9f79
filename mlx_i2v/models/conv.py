"""Convolutions for the VAEs that avoid MLX's im2col buffer and do fewer multiplications.

MLX's CPU convolution copies its input into an im2col buffer (27x the input for a 3x3x3 kernel) before
one large matmul: hundreds of megabytes per frame for the VAE's wide, high-resolution layers, copied on
one thread. Everything here is built from plain matmuls on views instead, channels-last:

- :func:`conv3d`: stride-1 3D convolutions, by :func:`winograd_conv3d` for (kt, 3, 3) kernels with
  spatial padding 1 (every residual-block conv): Winograd in height and width, F(2x2, 3x3) (16 products
  per 2x2 output block instead of 36) or F(4x4, 3x3) (36 per 4x4 block instead of 144, with more
  element-wise work per product saved); otherwise by :func:`conv3d_by_taps`. The method is chosen where
  a cost model of each (:func:`conv_cost`) says it is fastest: F(4x4) on large frames, F(2x2) for wide
  kernels on small frames (where F(4x4)'s larger kernel transform outweighs the products it saves) and
  on frames whose sides are not multiples of 4, per-tap matmuls where transforming the kernels costs
  more than the multiplications saved (tiny frames with wide channels: the LTX VAE at its latent
  resolution). Output frames are computed in groups whose transient buffers fit :data:`CONV_FRACTION`
  of the memory budget.
- :func:`upsample2x_conv2d`: nearest 2x upsampling followed by a 3x3 conv, as four 2x2 convs of the
  source (2.25x fewer multiplications, no upsampled tensor).
- :func:`conv3d_by_taps`: any stride-1 kernel, one matmul per kernel tap on a shifted view.
- one matmul on gathered rows (im2col) where frames are small and channels wide (the LTX VAE at its
  latent size, an image encoded alone): it wastes no products on padding and reads the weights in
  place, in whichever order they are stored, so a kernel loaded from a PyTorch checkpoint is never
  copied. Winograd and per-tap matmuls read tap-major weights (:func:`tap_major`) and copy others once
  per call; :func:`conv3d`'s ``layout`` says which order a kernel is in.

Results equal the direct convolution to float32 rounding: about 1e-6 relative by F(2x2), whose transforms
only add, subtract and halve, and 1e-5 by F(4x4), whose transforms scale by up to 8 and 1/24. The work
is sums of matmuls plus element-wise passes; the element-wise passes alternate between two streams
because MLX's CPU element-wise kernels use one thread each, and on the CPU run apart from the matmuls,
whose BLAS calls use both cores.

Half-precision inputs are convolved in float32 and the output rounded once, as PyTorch's convolutions
accumulate: rounding every tap's partial sum and every Winograd transform to bfloat16 lost 2-4 dB more
than diffusers' bfloat16 VAE (benchmarks/README.md, "bfloat16 parity"). Only the transient buffers, which
stay within the workspace, are float32; the tensors between layers keep the input's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlx.core as mx

from ..memory import evaluate_on_cpu, memory_budget
from .elementwise import two_streams

# Share of the memory budget one convolution may spend on transient buffers (as attention does): output
# frames are computed in groups that fit, and Winograd is used only where one frame fits.
CONV_FRACTION = 1 / 16

# The cost model behind :func:`conv_plan`, in FLOP-equivalents. A byte moved through memory costs as much
# time as BYTE_FLOPS floating-point operations: measured on the CPU (MLX 0.32 with OpenBLAS, 2 cores),
# large matmuls run at ~150 GFLOP/s and memory-bound passes at ~5 GB/s; Apple GPUs (~14 TFLOP/s against
# ~400 GB/s on an M2 Max) have about the same ratio, so one constant serves every backend.
BYTE_FLOPS = 30
# Another method (per-tap matmuls, gathered rows) replaces Winograd only when estimated at most this
# fraction of its cost: the estimates are good to about 15 %, and at the near-tie measured (the Wan VAE's
# 1024-channel convolutions on one 16x24 frame) per-tap and Winograd traded places between runs, so the
# established method keeps it.
TAPS_MARGIN = 0.85
# How a kernel of MLX's shape (O, kt, kh, kw, C) may be stored (see :func:`conv3d`).
LAYOUTS = ("mlx", "tap-major", "torch")
# Copying weights to tap-major order (:func:`tap_major`), in passes over them: measured on the CPU for a
# 2048-channel 3x3x3 kernel (453 MB), 0.375 s from MLX's order and 0.71 s from PyTorch's (two copies).
RELAYOUT_PASSES = {"tap-major": 0.0, "mlx": 4.0, "torch": 8.0}
# Gathering the unfolded rows, in passes over them: each row is kt*kh*kw runs of C contiguous inputs
# for MLX-ordered weights, C runs of single inputs for PyTorch-ordered ones (measured, 256 channels on
# 17 frames of 32x48: 0.5 s for 722 MB of rows).
UNFOLD_PASSES = {"mlx": 2.0, "torch": 4.0}

@dataclass(frozen=True)
class WinogradTiles:
    """Winograd F(m x m, 3 x 3) (Lavin & Gray, 2015), applied along height and width in turn: B^T
    transforms n-pixel input tiles (n = m + 2, consecutive tiles overlapping by 2), G the 3-tap kernels,
    A^T the n products back into m outputs."""

    method: str  # its name in :func:`conv_plan`
    BT: tuple[tuple[float, ...], ...]  # (n, n)
    G: tuple[tuple[float, ...], ...]  # (n, 3)
    AT: tuple[tuple[float, ...], ...]  # (m, n)
    # Transient buffers alive at once, in input and output sizes (:func:`winograd_workspace`): measured
    # with MLX 0.32 on the CPU from 12 -> 160 channels on 192x320 to 512 -> 512 on 32x48.
    workspace_copies: tuple[float, float]

    @property
    def m(self) -> int:
        """Outputs per tile along an axis."""
        return len(self.AT)

    @property
    def n(self) -> int:
        """Inputs per tile (and products) along an axis."""
        return len(self.BT)

    @property
    def bias_component(self) -> int:
        """The product index every output takes with coefficient 1 (a column of ones in A^T): adding the
        bias to the (j, j) component adds it to every output."""
        return next(j for j in range(self.n) if all(row[j] == 1 for row in self.AT))

    @property
    def kernel_copies(self) -> float:
        """Weight-sized buffers the kernel transform writes: its two products with G."""
        return self.n / 3 + (self.n / 3) ** 2

    def transform_passes(self) -> tuple[float, float]:
        """Memory traffic of the input and output transforms, in passes over the input and over the output
        (each element written once and read once per term it enters): B^T along the width, then the
        height; A^T along the height, then the width, and the stacking of the output blocks (two
        copies). The products' own traffic is counted with the matmuls."""
        r = self.n / self.m
        terms_in = sum(c != 0 for row in self.BT for c in row) / self.n
        terms_out = sum(c != 0 for row in self.AT for c in row) / self.m
        return (r + r * r) * (1 + terms_in), (r + 1) * (1 + terms_out) + 4


# F(2x2, 3x3): the transforms only add, subtract and halve.
F2X2 = WinogradTiles(
    "winograd2x2",
    BT=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    G=((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0)),
    AT=((1, 1, 1, 0), (0, 1, -1, -1)),
    workspace_copies=(4.0, 7.0),
)
# F(4x4, 3x3) with interpolation points 0, +-1, +-2 and infinity (Lavin & Gray's Table 2).
F4X4 = WinogradTiles(
    "winograd4x4",
    BT=(
        (4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
        (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1),
    ),
    G=(
        (1 / 4, 0.0, 0.0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
        (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0.0, 0.0, 1.0),
    ),
    AT=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)),
    workspace_copies=(2.7, 4.5),
)  # fmt: skip
WINOGRAD = {tiles.method: tiles for tiles in (F2X2, F4X4)}


def compute_dtype(dtype: mx.Dtype) -> mx.Dtype:
    """The dtype a convolution of ``dtype`` inputs computes in: float32 for half precision."""
    return mx.float32 if dtype in (mx.float16, mx.bfloat16) else dtype


def conv_workspace(budget: int | None = None) -> int:
    """Bytes one convolution may spend on transient buffers: :data:`CONV_FRACTION` of the budget."""
    return int((memory_budget() if budget is None else budget) * CONV_FRACTION)


def winograd_applies(weight: mx.array, padding: tuple[int, int], height: int, width: int) -> bool:
    """Whether this stride-1 conv has Winograd's shape: a (kt, 3, 3) kernel with spatial padding 1 on
    even-sized frames (F(2x2, 3x3); F(4x4, 3x3) needs both sizes divisible by 4)."""
    return tuple(weight.shape[2:4]) == (3, 3) and tuple(padding) == (1, 1) and height % 2 == 0 and width % 2 == 0


def winograd_tiles(height: int, width: int) -> list[WinogradTiles]:
    """The Winograd tilings that cover (height, width) frames exactly."""
    return [tiles for tiles in WINOGRAD.values() if height % tiles.m == 0 and width % tiles.m == 0]


def conv3d(
    x: mx.array,
    weight: mx.array,
    bias: mx.array | None = None,
    padding: tuple[int, int] = (0, 0),
    workspace: int | None = None,
    layout: str = "tap-major",
) -> mx.array:
    """Stride-1 3D convolution, channels-last, with symmetric zero padding in height and width only:
    Winograd, per-tap matmuls or one gathered matmul, whichever :func:`conv_plan` rates fastest with
    buffers that fit ``workspace``, a group of output frames at a time.

    Args:
        x: (B, T, H, W, C); any time padding is already applied.
        weight: (O, kt, kh, kw, C), MLX's Conv3d layout, its values stored in ``layout`` order.
        bias: (O,) or None.
        padding: (ph, pw) zeros on each side of height and width.
        workspace: bytes of transient buffers allowed (default :func:`conv_workspace`).
        layout: how ``weight``'s values are stored (:data:`LAYOUTS`): "tap-major", by :func:`tap_major`
            (the Wan VAE's kernels after their first call); "mlx", row-major in its shape; "torch", in the
            checkpoints' (O, C, kt, kh, kw) order (a transposed view of a PyTorch kernel, as the LTX VAE
            keeps them). Any layout gives the same result; it decides which methods copy the weights.

    Returns:
        (B, T - kt + 1, H + 2ph - kh + 1, W + 2pw - kw + 1, O) in x's dtype, evaluated (computed in
        :func:`compute_dtype`).
    """
    _, t, h, w, c = x.shape
    o, kt = weight.shape[:2]
    frames = t - kt + 1
    workspace = conv_workspace() if workspace is None else workspace
    shaped = winograd_applies(weight, padding, h, w)
    compute = compute_dtype(x.dtype)
    method, group, _ = conv_plan(frames, kt, h, w, c, o, compute.size, workspace, shaped, layout)
    weight = weight.astype(compute)  # element-wise: keeps the storage order
    bias = None if bias is None else bias.astype(compute)
    if method == "unfold":
        run = lambda frames_in: _unfold_one_video(frames_in, weight, bias, padding, layout)  # noqa: E731
    else:
        weight = weight if layout == "tap-major" else tap_major(weight)
        if method in WINOGRAD:
            tiles = WINOGRAD[method]
            kernel = _winograd_kernel(weight, tiles)
            run = lambda frames_in: _winograd_frames(frames_in, kernel, bias, tiles)  # noqa: E731
        else:
            run = lambda frames_in: _taps_one_video(frames_in, weight, bias, padding)  # noqa: E731
    videos = []
    for video in x:
        parts = []
        for start in range(0, frames, group):
            frames_in = video[start : start + min(group, frames - start) + kt - 1].astype(compute)
            parts.append(run(frames_in).astype(x.dtype))
            mx.eval(parts[-1])
        videos.append(parts[0] if len(parts) == 1 else mx.concatenate(parts))
    y = mx.stack(videos)
    mx.eval(y)
    return y


def conv_plan(
    frames: int,
    kt: int,
    h: int,
    w: int,
    c: int,
    o: int,
    itemsize: int,
    workspace: int,
    winograd: bool = True,
    layout: str = "tap-major",
) -> tuple[str, int, int]:
    """How :func:`conv3d` computes ``frames`` output frames of a (kt, 3, 3)-or-smaller kernel on (h, w)
    frames, C -> O channels, with weights stored in ``layout`` order: ("winograd2x2", "winograd4x4",
    "taps" or "unfold", output frames per group, transient bytes).

    The method :func:`conv_cost` rates fastest among those whose one-frame buffers fit ``workspace``:
    Winograd when ``winograd`` (its kernel and padding condition) holds, by the tilings that cover the
    frame (:func:`winograd_tiles`), the gathered matmul unless the weights are stored tap-major, per-tap
    matmuls always (they are the fallback). Winograd keeps near-ties: another method replaces it only
    when rated below :data:`TAPS_MARGIN` of its cost. Winograd needs its transforms' buffers
    (:func:`winograd_workspace`) and the transformed kernel; per-tap matmuls the padded input and about
    3 outputs on the padded grid; the gathered matmul its rows (kt * 9 input sizes) and 2 outputs."""
    tilings = winograd_tiles(h, w) if winograd else []
    sizes = {
        "taps": lambda n: itemsize * (h + 2) * (w + 2) * ((n + kt - 1) * c + 3 * n * o),
        "unfold": lambda n: itemsize * ((n + kt - 1) * (h + 2) * (w + 2) * c + n * h * w * (kt * 9 * c + 2 * o)),
    }
    for tiles in tilings:
        sizes[tiles.method] = lambda n, tiles=tiles: winograd_workspace(n, kt, h, w, c, o, itemsize, tiles)
    allowed = ["taps"] + [t.method for t in tilings] + (["unfold"] if layout != "tap-major" else [])
    candidates = [m for m in allowed if m == "taps" or sizes[m](1) <= workspace]
    rated = {m: conv_cost(m, frames, kt, h, w, c, o, itemsize, layout) for m in candidates}
    method = min(candidates, key=lambda m: rated[m] * (TAPS_MARGIN if m in WINOGRAD else 1))
    group = max(1, min(frames, workspace // sizes[method](1)))
    return method, group, sizes[method](group)


def conv_cost(
    method: str, frames: int, kt: int, h: int, w: int, c: int, o: int, itemsize: int, layout: str = "tap-major"
) -> float:
    """Estimated time of one stride-1 (kt, 3, 3) convolution of ``frames`` output frames of (h, w), C -> O
    channels, by ``method``, weights stored in ``layout`` order, in FLOP-equivalents (:data:`BYTE_FLOPS`):

    - "taps": kt * 9 matmuls over the padded grid's rows, each added into the output;
    - "winograd2x2", "winograd4x4": kt * n^2 matmuls over the m x m tiles, the input and output
      transforms' memory traffic (:meth:`WinogradTiles.transform_passes`), and the kernel transform,
      paid once per call whatever the frame count: on small frames with wide channels (the LTX VAE's
      latent resolution) that outweighs the products saved. F(4x4) does 1.8x fewer products than
      F(2x2) with about as much transform traffic per pixel, but its kernel transform is 2.25x larger:
      it wins on large frames (1.6x at 256-512 channels, a tie at 32) and loses on small ones with wide
      channels;
    - "unfold": gathering every output pixel's kt * 9 * C inputs into a row (:data:`UNFOLD_PASSES`), then
      one matmul with the weights read in place; on small frames it wastes no products on the padding;
    - both Winograd and per-tap matmuls read tap-major weights: stored otherwise, they are copied once per
      call (:data:`RELAYOUT_PASSES`).
    """
    weights = kt * 9 * c * o
    relayout = 0.0 if method == "unfold" else BYTE_FLOPS * itemsize * RELAYOUT_PASSES[layout] * weights
    if method == "taps":
        return _matmuls_cost(kt * 9, frames * (h + 2) * (w + 2), c, o, itemsize) + relayout
    if method == "unfold":
        gather = BYTE_FLOPS * itemsize * UNFOLD_PASSES[layout] * frames * h * w * kt * 9 * c
        return _matmuls_cost(1, frames * h * w, kt * 9 * c, o, itemsize) + gather
    tiles = WINOGRAD[method]
    n, m = tiles.n, tiles.m
    # read the weights, write both products with G (kernel_copies) and read the first back
    kernel = BYTE_FLOPS * itemsize * (1 + tiles.kernel_copies + n / 3) * weights
    passes_in, passes_out = tiles.transform_passes()
    pixels = frames * h * w
    transforms = BYTE_FLOPS * itemsize * (passes_in * (frames + kt - 1) * h * w * c + passes_out * pixels * o)
    products = _matmuls_cost(kt * n * n, pixels // (m * m), c, o, itemsize)
    return products + transforms + kernel + relayout


def _matmuls_cost(count: int, m: int, k: int, n: int, itemsize: int) -> float:
    """``count`` (m, k) @ (k, n) matmuls, each added into its (m, n) result: FLOPs plus the bytes read and
    written, in FLOP-equivalents."""
    return count * (2 * m * k * n + BYTE_FLOPS * itemsize * (m * k + k * n + 2 * m * n))


def winograd_conv3d(
    x: mx.array, weight: mx.array, bias: mx.array | None = None, tiles: WinogradTiles = F2X2
) -> mx.array:
    """Stride-1 convolution with a (kt, 3, 3) kernel and zero padding 1 in height and width, every frame
    at once (:func:`conv3d` groups frames to a workspace and picks the tiling).

    Args:
        x: (B, T, H, W, C), H and W multiples of ``tiles.m``; any time padding is already applied.
        weight: (O, kt, 3, 3, C), MLX's Conv3d layout.
        bias: (O,) or None.
        tiles: F(2x2, 3x3) or F(4x4, 3x3).

    Returns:
        (B, T - kt + 1, H, W, O), lazily (on the CPU its phases are evaluated as they go).
    """
    kernel = _winograd_kernel(weight, tiles)
    return mx.stack([_winograd_frames(video, kernel, bias, tiles) for video in x])


def winograd_workspace(
    frames: int, kt: int, h: int, w: int, c: int, o: int, itemsize: int, tiles: WinogradTiles = F2X2
) -> int:
    """Bytes of transient buffers Winograd builds for ``frames`` output frames: ``tiles.workspace_copies``
    input and output sizes (the padded input, its transform stages, the products, the output transform
    and the stacked output blocks, as many as are alive at once) and the transformed kernel (n^2/9 of
    the weights)."""
    inputs = (frames + kt - 1) * (h + 2) * (w + 2) * c
    outputs = frames * h * w * o
    per_input, per_output = tiles.workspace_copies
    return int(itemsize * (per_input * inputs + per_output * outputs + tiles.n**2 * kt * c * o))


def _winograd_kernel(weight: mx.array, tiles: WinogradTiles) -> mx.array:
    """G g G^T for each time tap: (O, kt, 3, 3, C) stored tap-major -> (kt, n, n, O, C), contiguous (O, C)
    matrices (the products read them transposed).

    Two small matmuls with G over the weights arranged (kt, 3, 3, O, C), a free view of weights stored
    by :func:`tap_major`. Recomputed per call: keeping the transformed kernels would hold n^2/9 of the
    decoder's 2 GB of weights for the whole decode.
    """
    o, kt, _, _, c = weight.shape
    n = tiles.n
    g = mx.array(tiles.G, dtype=weight.dtype)
    taps = weight.transpose(1, 2, 3, 0, 4).reshape(kt, 3, 3 * o * c)
    rows = (g @ taps).reshape(kt * n, 3, o * c)  # G along the kernel's height
    return (g @ rows).reshape(kt, n, n, o, c)  # and along its width


def tap_major(weight: mx.array) -> mx.array:
    """The same (O, kt, kh, kw, C) weights, stored in (kt, kh, kw, O, C) order: each kernel tap's (O, C)
    matrix contiguous, as the per-tap matmuls (transposed) and the Winograd kernel transform read them.
    The values and shape are unchanged.

    Two plain copies, the first a no-op for weights already row-major in MLX's order: from PyTorch's
    (O, C, kt, kh, kw) order, (O, C, taps) -> (O, taps, C) -> (taps, O, C) took 0.71 s for a 453 MB kernel
    where one copy to (taps, C, O) took 1.96 s (MLX's CPU copies read one input per output in order)."""
    rows = mx.contiguous(weight)
    return mx.contiguous(rows.transpose(1, 2, 3, 0, 4)).transpose(3, 0, 1, 2, 4)


def _winograd_frames(x: mx.array, kernel: mx.array, bias: mx.array | None, tiles: WinogradTiles) -> mx.array:
    """(T, H, W, C) with (kt, n, n, O, C) transformed kernels -> (T - kt + 1, H, W, O): the input transform
    and products two tile columns at a time (one per stream), then the output transform; each phase is
    evaluated before the next on the CPU (:func:`_phase_apart`), else all lazily."""
    h, w = x.shape[1:3]
    padded = mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    # tile j of an axis starts at padded index m * j
    cols = [padded[:, :, i : i + w : tiles.m] for i in range(tiles.n)]
    products = {}
    for first in range(0, tiles.n, 2):
        columns = tuple(range(first, min(first + 2, tiles.n)))
        transformed = _phase_apart(_input_transform(cols, tiles, columns))
        products |= _phase_apart(_products(transformed, kernel, bias, tiles, x.dtype))
    return _output_transform(products, tiles, (h, w))


def _phase_apart(phase: dict[tuple[int, int], mx.array]) -> dict[tuple[int, int], mx.array]:
    """``phase``, evaluated on the CPU. There the transforms run on two streams, a core each, and the
    products' BLAS calls on both cores: queued together they contend for the two cores, and F(4x4) with
    its phases apart was 5-19 % faster at 32-512 channels (median of 12; (6, 128, 192, 32 -> 32): 66
    against 72 ms), F(2x2) no slower (benchmarks/README.md). Two tile columns at a time, the transformed
    input a product consumes is freed before the next columns are transformed, as when MLX interleaved
    the phases."""
    evaluate_on_cpu(*phase.values())
    return phase


def _input_transform(
    cols: list[mx.array], tiles: WinogradTiles, columns: tuple[int, ...]
) -> dict[tuple[int, int], mx.array]:
    """B^T d B, width then height, for the tile columns ``columns`` of B: ``cols[i]`` (T, H + 2, W / m, C)
    is every tile's padded column i of a (T, H, W, C) input; component (ay, bx) -> (T, tiles, C), lazily,
    the columns alternating between two streams."""
    t, h, tiles_across, c = cols[0].shape
    h -= 2
    m = tiles.m
    streams = two_streams()
    transformed = {}
    for bx in columns:
        with mx.stream(streams[bx % 2]):
            u = _combine(cols, tiles.BT[bx])
            rows = [u[:, i : i + h : m] for i in range(tiles.n)]
            for ay, column in enumerate(tiles.BT):
                transformed[ay, bx] = _combine(rows, column).reshape(t, (h // m) * tiles_across, c)
    return transformed


def _products(
    transformed: dict[tuple[int, int], mx.array],
    kernel: mx.array,
    bias: mx.array | None,
    tiles: WinogradTiles,
    dtype: mx.Dtype,
) -> dict[tuple[int, int], mx.array]:
    """One matmul per transform component and time tap, summed over the taps: (T, tiles, C) components
    with (kt, n, n, O, C) kernels -> (frames * tiles, O) each, lazily. The bias starts the sum of the
    component that enters every output with coefficient 1."""
    kt = kernel.shape[0]
    t, tile_count, c = next(iter(transformed.values())).shape
    frames = t - kt + 1
    biased = (tiles.bias_component,) * 2
    products = {}
    for (ay, bx), tile_rows in transformed.items():
        total = bias.astype(dtype) if (ay, bx) == biased and bias is not None else None
        for dt in range(kt):
            rows_dt = tile_rows[dt : dt + frames].reshape(frames * tile_count, c)
            k = kernel[dt, ay, bx].T
            total = rows_dt @ k if total is None else mx.addmm(total, rows_dt, k)
        products[ay, bx] = total
    return products


def _output_transform(
    products: dict[tuple[int, int], mx.array], tiles: WinogradTiles, size: tuple[int, int]
) -> mx.array:
    """A^T M A of the products, output row r, then column q, of each m x m block -> (frames, H, W, O),
    lazily."""
    h, w = size
    m, n = tiles.m, tiles.n
    streams = two_streams()
    half_rows = {}
    for bx in range(n):
        with mx.stream(streams[bx % 2]):
            for r, row in enumerate(tiles.AT):
                half_rows[r, bx] = _combine([products[ay, bx] for ay in range(n)], row)
    out_rows = []
    for r in range(m):
        with mx.stream(streams[r % 2]):
            terms = [half_rows[r, bx] for bx in range(n)]
            out_rows.append(mx.stack([_combine(terms, q) for q in tiles.AT], axis=1))
    y = mx.stack(out_rows, axis=1)  # (frames * th * tw, r, q, O)
    o = y.shape[-1]
    frames = y.shape[0] // ((h // m) * (w // m))
    y = y.reshape(frames, h // m, w // m, m, m, o).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(frames, h, w, o)


# One compiled weighted sum per distinct list of non-zero coefficients: a single pass over memory
# instead of one per term.
_WEIGHTED_SUMS: dict[tuple[float, ...], Callable[..., mx.array]] = {}


def _combine(terms: list[mx.array], coefficients: tuple[float, ...]) -> mx.array:
    """sum(c * term) over the non-zero coefficients, as one fused element-wise pass."""
    used = [(float(k), term) for k, term in zip(coefficients, terms) if k != 0]
    weights = tuple(k for k, _ in used)
    weighted_sum = _WEIGHTED_SUMS.get(weights)
    if weighted_sum is None:

        def unfused(*parts: mx.array) -> mx.array:
            total = None
            for k, part in zip(weights, parts):
                term = part if k == 1 else -part if k == -1 else k * part
                total = term if total is None else total + term
            return total

        weighted_sum = _WEIGHTED_SUMS[weights] = mx.compile(unfused)
    return weighted_sum(*(term for _, term in used))


def conv3d_by_taps(
    x: mx.array,
    weight: mx.array,
    bias: mx.array | None = None,
    padding: tuple[int, int] = (0, 0),
) -> mx.array:
    """Stride-1 3D convolution, channels-last, with symmetric zero padding in height and width only.

    The input is zero padded once and flattened to rows of pixels; the rows that kernel tap (dt, dy, dx)
    reads for consecutive output pixels are then a contiguous slice of it, shifted by
    ``dt * frame + dy * width + dx``, so each tap is a matmul on a view, accumulated with ``addmm``.
    Outputs are computed on the padded grid (``kw - 1`` extra columns per row, ``kh - 1`` extra rows per
    frame) and the extras dropped.

    Args:
        x: (B, T, H, W, C); any time padding is already applied.
        weight: (O, kt, kh, kw, C), MLX's Conv3d layout.
        bias: (O,) or None.
        padding: (ph, pw) zeros on each side of height and width.

    Returns:
        (B, T - kt + 1, H + 2ph - kh + 1, W + 2pw - kw + 1, O).
    """
    return mx.stack([_taps_one_video(video, weight, bias, padding) for video in x])


def _taps_one_video(x: mx.array, weight: mx.array, bias: mx.array | None, padding: tuple[int, int]) -> mx.array:
    """(T, H, W, C) -> (T', H', W', O) for one video."""
    t, h, w, c = x.shape
    o, kt, kh, kw, _ = weight.shape
    ph, pw = padding
    if ph or pw:
        x = mx.pad(x, [(0, 0), (ph, ph), (pw, pw), (0, 0)])
    hp, wp = h + 2 * ph, w + 2 * pw
    to, ho, wo = t - kt + 1, hp - kh + 1, wp - kw + 1
    frame = hp * wp
    # Output (f, i, j) is row f * frame + i * wp + j of the padded grid. The rows up to the last valid
    # output read exactly up to the last input row, so every tap's slice stays inside the input.
    rows = (to - 1) * frame + (ho - 1) * wp + wo
    flat = x.reshape(t * frame, c)
    y = None if bias is None else bias.astype(x.dtype)
    for dt in range(kt):
        for dy in range(kh):
            for dx in range(kw):
                start = dt * frame + dy * wp + dx
                taps = flat[start : start + rows]
                tap_weight = weight[:, dt, dy, dx].T  # (C, O)
                y = taps @ tap_weight if y is None else mx.addmm(y, taps, tap_weight)
    y = mx.as_strided(y, (to, ho, wo, o), (frame * o, wp * o, o, 1))
    return mx.contiguous(y)


def _unfold_one_video(
    x: mx.array, weight: mx.array, bias: mx.array | None, padding: tuple[int, int], layout: str
) -> mx.array:
    """(T, H, W, C) -> (T', H', W', O) for one video by one matmul (im2col): each output pixel's inputs
    gathered into a row in the order ``layout`` stores the weights ("mlx": taps then channels; "torch":
    channels then taps), so the (O, C * taps) weight matrix is a view and is read in place."""
    o, kt, kh, kw, c = weight.shape
    ph, pw = padding
    if ph or pw:
        x = mx.pad(x, [(0, 0), (ph, ph), (pw, pw), (0, 0)])
    t, hp, wp, _ = x.shape
    to, ho, wo = t - kt + 1, hp - kh + 1, wp - kw + 1
    frame, row = hp * wp * c, wp * c  # element strides of x
    if layout == "torch":
        shape, strides = (to, ho, wo, c, kt, kh, kw), (frame, row, c, 1, frame, row, c)
        matrix = weight.transpose(0, 4, 1, 2, 3).reshape(o, -1)
    else:
        shape, strides = (to, ho, wo, kt, kh, kw, c), (frame, row, c, frame, row, c, 1)
        matrix = weight.reshape(o, -1)
    rows = mx.as_strided(x, shape, strides).reshape(to * ho * wo, -1)
    y = rows @ matrix.T if bias is None else mx.addmm(bias.astype(x.dtype), rows, matrix.T)
    return y.reshape(to, ho, wo, o)


def upsample2x_conv2d(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """Nearest 2x upsampling followed by a 3x3, padding-1 convolution, without the upsampled tensor.

    Output pixel (2i + a, 2j + b) sees upsampled rows 2i + a - 1 .. 2i + a + 1, which are source rows
    i - 1, i, i for a = 0 and i, i, i + 1 for a = 1 (likewise for columns): each of the four output
    phases is a 2x2 convolution of the source whose taps are sums of the 3x3 taps. That is 16 source-size
    matmuls instead of 9 at four times the size, equal up to float summation order.

    Args:
        x: (N, H, W, C) source frames.
        weight: (O, 3, 3, C), the convolution that follows the upsampling.
        bias: (O,) or None.

    Returns:
        (N, 2H, 2W, O) in x's dtype (computed in :func:`compute_dtype`).
    """
    n, h, w, _ = x.shape
    o = weight.shape[0]
    out_dtype, compute = x.dtype, compute_dtype(x.dtype)
    x, weight = x.astype(compute), weight.astype(compute)
    bias = None if bias is None else bias.astype(compute)
    phases = []
    for a in range(2):
        for b in range(2):
            kernel = mx.stack(
                [mx.stack([_phase_tap(weight, a, ry, b, rx) for rx in range(2)], axis=1) for ry in range(2)], axis=1
            )  # (O, 2, 2, C)
            # Phase a reads padded source rows i + a and i + a + 1: pad only the side it reads.
            src = mx.pad(x, [(0, 0), (1 - a, a), (1 - b, b), (0, 0)])
            phases.append(_taps_one_video(src, kernel[:, None], bias, (0, 0)))
    y = mx.stack(phases, axis=3).reshape(n, h, w, 2, 2, o)  # (N, H, W, a, b, O)
    return y.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, o).astype(out_dtype)


# The 3x3 taps that fold into 2x2 tap r of output phase a: for a = 0 row offsets -1 | 0, +1; for a = 1
# row offsets -1, 0 | +1 (indices into the 3x3 kernel).
_FOLD = {(0, 0): (0,), (0, 1): (1, 2), (1, 0): (0, 1), (1, 1): (2,)}


def _phase_tap(weight: mx.array, a: int, ry: int, b: int, rx: int) -> mx.array:
    """(O, C): the sum of the 3x3 taps that land on 2x2 tap (ry, rx) of output phase (a, b)."""
    return sum(weight[:, ky, kx] for ky in _FOLD[a, ry] for kx in _FOLD[b, rx])
