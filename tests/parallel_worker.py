"""One rank of a parallel generation for the tests: ``python parallel_worker.py JOB.json``.

The job names the model, the generation's keyword arguments and the parallel mode (and ``extend``, a
clip to continue with ``pipe.extend`` instead of generating from the photo); rank 0 saves the frames to
``frames.npy``, every rank saves its ``stats-<rank>.json``. ``die_at_step`` / ``stop_at_step``
make rank ``fault_rank`` exit or freeze (SIGSTOP) at that step, to test that the others stop cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mlx_i2v import MlxI2VError, load_pipeline


def photo() -> Image.Image:
    y, x = np.mgrid[0:64, 0:96]
    return Image.fromarray(np.stack([x * 2, y * 3, (x + y) % 64 * 4], -1).astype(np.uint8))


def main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    rank = int(os.environ.get("MLX_RANK", 0))
    pipe = load_pipeline(job["model"], dtype="float32", parallel=job.get("parallel", "auto"))
    kwargs = {**job["kwargs"], **job.get("rank_kwargs", {}).get(str(rank), {})}

    def on_step(step, total, t):
        if rank == job.get("fault_rank") and step == job.get("die_at_step"):
            os._exit(3)
        if rank == job.get("fault_rank") and step == job.get("stop_at_step"):
            os.kill(os.getpid(), signal.SIGSTOP)

    prompt = job.get("prompt", "a fox")
    try:
        if "extend" in job:
            video = pipe.extend(job["extend"], prompt, on_step=on_step, **kwargs)
        else:
            video = pipe(photo() if job.get("photo", True) else None, prompt, on_step=on_step, **kwargs)
    except MlxI2VError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(job["out"])
    if rank == 0:
        np.save(out / "frames.npy", video.frames)
    (out / f"stats-{rank}.json").write_text(json.dumps({"stats": video.stats, "metadata": video.metadata,
                                                        "frames": video.frames.shape[0]}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
