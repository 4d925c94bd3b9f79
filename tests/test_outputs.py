"""Outputs never cost the user a file: where a save goes (folders, odd names, the inputs), when an existing
output may be replaced, saves and conversions racing each other, SIGTERM/SIGHUP mid-write, partials left by
killed processes, and broken inputs on the way there (a corrupt safetensors header, a symlink loop in a
conversion source). The CLI cases run the installed console script on the tiny TI2V model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from mlx_i2v.convert import convert_model, writer
from mlx_i2v.errors import InvalidInputError, WeightLoadError
from mlx_i2v.outputs import is_frames_folder, resolve_output
from mlx_i2v.video import Video
from mlx_i2v.weights import check_safetensors

GOOD = ["--frames", "5", "--height", "64", "--width", "96", "--steps", "2", "--seed", "3"]
EXE = Path(sys.executable).parent / "mlx-i2v"


def _video(frames: int = 3, **metadata) -> Video:
    rng = np.random.default_rng(frames)
    return Video(rng.random((frames, 16, 16, 3), dtype=np.float32), 8.0, {"prompt": "x", **metadata})


def _mp4_frames(path: Path) -> int:
    with av.open(str(path)) as c:
        return len(list(c.decode(video=0)))


def _pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".png")


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.docx").write_text("years of work")
    return path


# --- where a save goes ----------------------------------------------------------------------------------


def test_existing_folders_get_an_mp4_inside_and_keep_their_files(tmp_path, monkeypatch):
    docs = _user_folder(tmp_path / "Documents")
    assert _video().save(docs) == docs / "video.mp4"
    assert (docs / "thesis.docx").read_text() == "years of work"
    assert _video(image_name="cat.jpg").save(docs) == docs / "cat.mp4"  # the photo's stem, when recorded
    assert _video(image_name="cat.jpg").save(str(docs) + "/") == docs / "cat-2.mp4"  # taken: the next free name
    assert _video().save(str(tmp_path / "Videos") + "/") == tmp_path / "Videos" / "video.mp4"  # created
    monkeypatch.chdir(docs)
    assert _video().save(".") == Path("video-2.mp4")
    assert _video().save("..") == Path("..") / "video.mp4"
    link = tmp_path / "link"
    link.symlink_to(docs, target_is_directory=True)
    assert _video().save(link) == link / "video-3.mp4"
    assert link.is_symlink() and (docs / "video-3.mp4").is_file() and (docs / "thesis.docx").is_file()


@pytest.mark.parametrize("name, expected", [
    ("notes", "existing file without a suffix"),
    (".mp4", "hidden name without a suffix"),
    ("clip.avi", "unsupported output format"),
])
def test_bad_output_names_are_one_line_errors(name, expected, tmp_path):
    (tmp_path / "notes").write_text("my notes")
    with pytest.raises(InvalidInputError, match=expected):
        _video().save(tmp_path / name, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["notes"] and (tmp_path / "notes").read_text() == "my notes"


@pytest.mark.parametrize("name", ["clip.mp4", "clip.gif"])
def test_an_existing_output_is_replaced_only_with_overwrite_and_only_by_its_kind(name, tmp_path):
    target = tmp_path / name
    _video(3).save(target)
    with pytest.raises(InvalidInputError, match="already exists; pass --overwrite"):
        _video(5).save(target)
    _video(5).save(target, overwrite=True)
    count = _mp4_frames(target) if name.endswith(".mp4") else Image.open(target).n_frames
    assert count == 5
    impostor = tmp_path / f"impostor{target.suffix}"
    impostor.write_text("not a video")
    with pytest.raises(InvalidInputError, match="is not an? (MP4|GIF) file"):
        _video().save(impostor, overwrite=True)
    assert impostor.read_text() == "not a video"
    assert sorted(os.listdir(tmp_path)) == sorted([name, impostor.name])


def test_a_frames_folder_is_ours_only_while_it_holds_nothing_else(tmp_path):
    frames = tmp_path / "frames"
    _video(4).save(frames)
    assert is_frames_folder(frames) and json.loads((frames / "metadata.json").read_text())["encoder"] == "mlx-i2v"
    with pytest.raises(InvalidInputError, match="already exists"):
        _video(2).save(frames)
    _video(2).save(frames, overwrite=True)
    assert _pngs(frames) == ["frame_00000.png", "frame_00001.png"]  # replaced whole, no stale frame 3
    (frames / "notes.txt").write_text("mine now")
    assert _video(2).save(frames, overwrite=True) == frames / "video.mp4"  # not ours any more: written inside
    assert (frames / "notes.txt").read_text() == "mine now" and len(_pngs(frames)) == 2


def test_the_output_is_never_an_input(tmp_path):
    photo = tmp_path / "photo.gif"
    _video().save(photo)
    before = photo.read_bytes()
    for asked in (photo, tmp_path / "." / "photo.gif", tmp_path / "PHOTO-link.gif"):
        if asked.name == "PHOTO-link.gif":
            asked.symlink_to(photo)
        with pytest.raises(InvalidInputError, match=f"would overwrite the input {photo}"):
            resolve_output(asked, default_stem="photo", protected=[photo], overwrite=True)
    frames = tmp_path / "frames"
    _video().save(frames)
    first = frames / "frame_00000.png"
    with pytest.raises(InvalidInputError, match="would overwrite the input"):
        resolve_output(frames, default_stem="x", protected=[first], overwrite=True)
    assert photo.read_bytes() == before and first.is_file()


# --- races ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, method", [("clip.mp4", "_write_mp4"), ("frames", "_write_pngs")])
def test_a_save_finishing_second_never_replaces_the_first(name, method, tmp_path, monkeypatch):
    """Another save of the same name finishes while ours is writing: ours must fail at its final step
    (existence is checked again there, atomically), and theirs stays."""
    target = tmp_path / name
    real = getattr(Video, method)
    overwrite = False

    def write_then_let_another_finish(self, path):
        real(self, path)
        if self.num_frames == 3:
            _video(5).save(target, overwrite=overwrite)

    monkeypatch.setattr(Video, method, write_then_let_another_finish)
    with pytest.raises(InvalidInputError, match="created by another process"):
        _video(3).save(target)
    assert (_mp4_frames(target) if name.endswith(".mp4") else len(_pngs(target))) == 5
    assert _leftovers(tmp_path) == []
    overwrite = True
    _video(3).save(target, overwrite=True)  # with overwrite the last to finish wins
    assert (_mp4_frames(target) if name.endswith(".mp4") else len(_pngs(target))) == 3
    assert _leftovers(tmp_path) == []


def test_concurrent_saves_of_one_frames_folder_with_overwrite(tmp_path):
    target = tmp_path / "frames"
    errors: list[BaseException] = []

    def save(n: int) -> None:
        try:
            for _ in range(3):
                _video(n, n=n).save(target, overwrite=True)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=save, args=(n,)) for n in range(2, 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    marker = json.loads((target / "metadata.json").read_text())
    assert _pngs(target) == [f"frame_{i:05d}.png" for i in range(marker["n"])]  # one whole save, not a mix
    assert _leftovers(tmp_path) == []


# --- partials of killed processes -------------------------------------------------------------------------


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_partials_of_dead_processes_are_removed_and_nothing_else(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    stale = [f".clip.mp4.partial-{dead}.mp4", f".clip.mp4.partial-{dead}-0badcafe.mp4"]
    kept = [f".clip.mp4.partial-{alive}-0badcafe.mp4", ".clip.mp4.partial-notes", f"clip.mp4.partial-{dead}",
            f".other.mp4.partial-{dead}.mp4", f".clip.mp4.partial-{dead}.mp4.txt"]
    for name in stale + kept:
        (tmp_path / name).write_text("x")
    (tmp_path / f".frames.partial-{dead}-0123abcd").mkdir()
    (tmp_path / f".frames.partial-{dead}-0123abcd" / "frame_00000.png").write_text("x")
    _video().save(tmp_path / "clip.mp4")
    _video().save(tmp_path / "frames")
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["clip.mp4", "frames"])


def test_an_output_a_killed_process_was_replacing_is_put_back(tmp_path):
    frames, dead = tmp_path / "frames", _dead_pid()
    _video(4).save(frames)
    frames.rename(tmp_path / f".frames.old-{dead}-0123abcd")  # moved aside, then killed before publishing
    with pytest.raises(InvalidInputError, match="already exists"):
        _video(2).save(frames)
    assert len(_pngs(frames)) == 4 and _leftovers(tmp_path) == []
    _video(2).save(frames, overwrite=True)
    assert len(_pngs(frames)) == 2


# --- SIGTERM and SIGHUP -----------------------------------------------------------------------------------

# Runs the CLI with its writer (Video's or the converter's) pausing once the partial output is on disk.
PAUSED_CLI = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from mlx_i2v.video import Video
    from mlx_i2v.convert import writer
    from mlx_i2v.cli.main import main

    ready = Path(sys.argv[1])

    def paused(real):
        def write(*args, **kwargs):
            result = real(*args, **kwargs)
            ready.touch()
            time.sleep(120)
            return result
        return write

    Video._write_mp4 = paused(Video._write_mp4)
    Video._write_pngs = paused(Video._write_pngs)
    writer.save_component = paused(writer.save_component)
    main(sys.argv[2:], prog_name="mlx-i2v")
    """
)


def _signal_mid_write(args: list[str], signum: int, cwd: Path) -> subprocess.CompletedProcess:
    ready = cwd / "ready"
    process = subprocess.Popen([sys.executable, "-c", PAUSED_CLI, str(ready), *args], cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), process.communicate()[1]
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    ready.unlink()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.parametrize("signum, output", [(signal.SIGTERM, "clip.mp4"), (signal.SIGHUP, "frames")])
def test_a_signal_during_save_leaves_no_partial(signum, output, tiny_ti2v_dir, photo, tmp_path):
    args = ["generate", str(photo), "-p", "x", "--model", str(tiny_ti2v_dir), *GOOD, "-o", output]
    result = _signal_mid_write(args, signum, tmp_path)
    assert result.returncode == 128 + signum
    assert result.stderr.strip().splitlines()[-1] == f"error: terminated by {signal.Signals(signum).name}"
    assert "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_convert_leaves_no_partial(signum, tiny_ti2v_dir, tmp_path):
    result = _signal_mid_write(["convert", str(tiny_ti2v_dir), "out", "--dtype", "float32"], signum, tmp_path)
    assert result.returncode == 128 + signum
    assert result.stderr.strip() == f"error: terminated by {signal.Signals(signum).name}"
    assert os.listdir(tmp_path) == []


# --- conversions ----------------------------------------------------------------------------------------


def test_a_conversion_finishing_second_never_replaces_the_first(tiny_ti2v_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = writer.save_component
    calls: list[Path] = []

    def save_then_let_another_finish(model, folder, config, **kwargs):
        calls.append(folder)
        if len(calls) == 1:
            convert_model(tiny_ti2v_dir, out, dtype="float32")  # the faster conversion, started later
            (out / "theirs").write_text("finished first")
        return real(model, folder, config, **kwargs)

    monkeypatch.setattr(writer, "save_component", save_then_let_another_finish)
    with pytest.raises(InvalidInputError, match="created by another process"):
        convert_model(tiny_ti2v_dir, out, dtype="float32")
    assert (out / "theirs").read_text() == "finished first" and (out / "model_index.json").is_file()
    assert _leftovers(tmp_path) == []


def test_a_cache_conversion_finishing_second_uses_the_first(tiny_ti2v_dir, tmp_path, monkeypatch):
    from mlx_i2v.cache import cached_conversion

    monkeypatch.setenv("MLX_I2V_CACHE", str(tmp_path / "cache"))
    snapshot = tmp_path / "snapshots" / "0123456789abcdef"
    shutil.copytree(tiny_ti2v_dir, snapshot)
    real = writer.save_component
    calls: list[Path] = []

    def save_then_let_another_finish(model, folder, config, **kwargs):
        calls.append(folder)
        if len(calls) == 1:
            cached_conversion("org/model", snapshot, "float32", None)
        return real(model, folder, config, **kwargs)

    monkeypatch.setattr(writer, "save_component", save_then_let_another_finish)
    path = cached_conversion("org/model", snapshot, "float32", None)
    assert (path / "model_index.json").is_file() and path.parent == tmp_path / "cache"
    assert os.listdir(tmp_path / "cache") == [path.name]


@pytest.mark.parametrize("loop", ["ancestor", "itself", "dangling"])
def test_a_symlink_loop_in_the_source_is_named_before_converting(loop, tiny_ti2v_dir, tmp_path, monkeypatch):
    source = tmp_path / "source"
    shutil.copytree(tiny_ti2v_dir, source, symlinks=True)
    link = source / "tokenizer" / "loop"
    link.symlink_to({"ancestor": source, "itself": link, "dangling": tmp_path / "nowhere"}[loop])
    monkeypatch.setattr(writer, "save_component", lambda *a, **k: pytest.fail("converted despite the loop"))
    expected = "symlink loop at" if loop == "ancestor" else "cannot read"
    with pytest.raises(InvalidInputError, match=f"{expected} {link}"):
        convert_model(source, tmp_path / "out", dtype="float32")
    assert sorted(os.listdir(tmp_path)) == ["source"]


def test_a_symlinked_file_in_the_source_is_copied(tiny_ti2v_dir, tmp_path):
    """The Hub cache links every file to a blob: those links are followed, only loops are refused."""
    source = tmp_path / "source"
    shutil.copytree(tiny_ti2v_dir, source, symlinks=True)
    config = source / "scheduler" / "scheduler_config.json"
    blob = tmp_path / "blob"
    shutil.move(config, blob)
    config.symlink_to(blob)
    out = convert_model(source, tmp_path / "out", dtype="float32")
    copied = out / "scheduler" / "scheduler_config.json"
    assert not copied.is_symlink() and copied.read_text() == blob.read_text()


# --- a corrupt safetensors header -------------------------------------------------------------------------


def _corrupt_header(model: Path, destination: Path) -> Path:
    shutil.copytree(model, destination)
    weights = destination / "transformer" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", 2**60) + data[8:])
    return weights


def test_a_corrupt_safetensors_header_is_named_not_out_of_memory(tiny_ti2v_dir, photo, tmp_path):
    weights = _corrupt_header(tiny_ti2v_dir, tmp_path / "model")
    with pytest.raises(WeightLoadError, match=f"corrupt safetensors header in {weights}"):
        check_safetensors(weights.parent)
    result = _run("generate", str(photo), "-p", "x", "--model", str(tmp_path / "model"), *GOOD, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: transformer: corrupt safetensors header in ")
    assert len(result.stderr.strip().splitlines()) == 1 and "memory" not in result.stderr


# --- the CLI ----------------------------------------------------------------------------------------------


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(EXE), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def _generate(photo: Path, model: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return _run("generate", str(photo), "-p", "x", "--model", str(model), *GOOD, *args, cwd=cwd)


def test_cli_writes_into_an_existing_folder_and_replaces_only_with_overwrite(tiny_ti2v_dir, photo, tmp_path):
    videos = _user_folder(tmp_path / "Videos")
    result = _generate(photo, tiny_ti2v_dir, "-o", "Videos/", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote Videos/photo.mp4 (5 frames" in result.stdout and "replaced" not in result.stdout
    assert sorted(os.listdir(videos)) == ["photo.mp4", "thesis.docx"]
    before = (videos / "photo.mp4").read_bytes()
    result = _generate(photo, tiny_ti2v_dir, "-o", "Videos/photo.mp4", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr == (
        "error: Videos/photo.mp4 already exists; pass --overwrite (overwrite=True) to replace it\n")
    result = _generate(photo, tiny_ti2v_dir, "-o", "Videos/photo.mp4", "--overwrite", "--seed", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "replaced Videos/photo.mp4" in result.stdout and (videos / "photo.mp4").read_bytes() != before
    assert sorted(os.listdir(videos)) == ["photo.mp4", "thesis.docx"]


@pytest.mark.parametrize("asked, expected", [
    (".", "photo-2.mp4"), ("..", "../photo.mp4"), ("here", "here/photo.mp4"), ("link", "link/photo.mp4"),
    ("new/", "new/photo.mp4"), ("frames", "frames"),
])
def test_cli_output_names_resolve_before_loading(asked, expected, tiny_ti2v_dir, photo, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "photo.mp4").write_bytes(b"\0\0\0\x18ftypisom")
    (work / "here").mkdir()
    (work / "link").symlink_to(work / "here", target_is_directory=True)
    result = _generate(photo, tiny_ti2v_dir, "-o", asked, "--dry-run", cwd=work)
    assert result.returncode == 0, result.stderr
    assert f"output: {expected}\n" in result.stdout


def _write_gif(path: Path) -> Path:
    Image.fromarray(np.full((80, 120, 3), 90, np.uint8)).save(path)
    return path


BAD_OUTPUTS = {
    "the input image": (lambda d: [str(_write_gif(d / "in.gif")), "-o", "in.gif"], "would overwrite the input"),
    "the last image": (lambda d: [str(_write_gif(d / "in.gif")), "--last-image", str(_write_gif(d / "last.gif")),
                                  "-o", str(d / "last.gif"), "--overwrite"], "would overwrite the input"),
    "an extensionless file": (lambda d: ["-o", str(_text(d / "notes"))], "existing file without a suffix"),
    "a hidden name": (lambda d: ["-o", ".mp4"], "hidden name without a suffix"),
    "an unknown suffix": (lambda d: ["-o", "clip.avi"], "unsupported output format '.avi'"),
    "an existing mp4": (lambda d: ["-o", str(_text(d / "clip.mp4"))], "already exists; pass --overwrite"),
    "a text file as mp4": (lambda d: ["-o", str(_text(d / "clip.mp4")), "--overwrite"], "is not an MP4 file"),
}


def _text(path: Path) -> Path:
    path.write_text("precious")
    return path


@pytest.mark.parametrize("case", list(BAD_OUTPUTS))
def test_cli_refuses_bad_outputs_in_one_line_and_touches_nothing(case, tiny_ti2v_dir, photo, tmp_path):
    make_args, expected = BAD_OUTPUTS[case]
    args = make_args(tmp_path)
    if not args[0].endswith(".gif"):
        args = [str(photo), *args]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = _run("generate", *args, "-p", "x", "--model", str(tiny_ti2v_dir), *GOOD, cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
