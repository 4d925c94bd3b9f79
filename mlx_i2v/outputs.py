"""Where an output goes, and how it gets there without touching anything the user did not ask us to write.

:func:`resolve_output` applies the output rules once, before any model loads (the CLI and
:meth:`~mlx_i2v.video.Video.save` share it):

* a name ending in ``/``, or an existing directory (symlinks followed) that is not a PNG-frames folder
  mlx-i2v wrote, means "write ``<stem>.mp4`` inside it" (``<stem>-2.mp4``, ... when taken);
* otherwise the name's suffix says what to write: ``.mp4``, ``.gif``, or none for a folder of PNG frames;
  an unknown suffix, a hidden name without one (``.mp4``) or an existing file without one is an error;
* an existing output is replaced only with ``overwrite`` and only by one of the same kind, told by its
  content (an ISO-BMFF ``ftyp`` box, a GIF header, our frames-folder marker);
* the output is never one of the ``protected`` inputs, nor a folder holding one.

:func:`resolve_preview` applies the same rules to the PNG a run keeps rewriting (``--preview``).

:func:`staged_output` is the writing side: everything goes to a temporary name beside the target,
``.NAME.partial-PID-TOKEN[.SUFFIX]``, published by a final step with no check-then-act window (a hard
link or a directory rename, both of which fail if another process published first), and removed on any
exception, KeyboardInterrupt and the CLI's signal exceptions included. Partials left by a killed process
(its pid no longer alive) are removed by the next write to the same target.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import InvalidInputError

log = logging.getLogger(__name__)

ENCODER = "mlx-i2v"  # the tag in an mp4's metadata and in a frames folder's metadata.json
FRAMES_MARKER = "metadata.json"
FRAME_NAME = re.compile(r"frame_\d{5,}\.png")
KINDS = {".mp4": "mp4", ".gif": "gif", "": "frames"}
DESCRIPTIONS = {"mp4": "an MP4 file", "gif": "a GIF file", "frames": "a PNG-frames folder written by mlx-i2v",
                "png": "a PNG image"}
# errno of a rename or link whose target is taken (a non-empty directory, a file where a directory goes)
_TAKEN = {errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR}
_PUBLISH_ATTEMPTS = 10


def output_kind(path: Path) -> str:
    """"mp4", "gif" or "frames" (no suffix), from the name alone."""
    return KINDS[path.suffix.lower()]


def resolve_output(
    path: str | os.PathLike[str] | None,
    *,
    default_stem: str,
    protected: Iterable[str | os.PathLike[str] | None] = (),
    overwrite: bool = False,
) -> Path:
    """Apply the output rules (module docstring) to what the user asked for; returns the file or frames
    folder to write. ``None`` means the current directory. Also checks the parent can be written, and
    clears what killed processes left beside it (:func:`remove_stale_partials`).

    Raises:
        InvalidInputError: an unknown suffix, a hidden or existing file name without a suffix, an existing
            output without ``overwrite`` or of another kind, or an output that is a protected input.
    """
    text = "." if path is None else os.fspath(path)
    if not text:
        raise InvalidInputError("the output name is empty")
    asked = Path(text).expanduser()
    remove_stale_partials(asked)
    found = inspect_output(asked)  # once: other writers may be swapping it while we look
    if text.endswith(("/", os.sep)) or found == "dir":
        target, found = free_name(asked, default_stem), "missing"
    else:
        target = asked
        _check_name(target, found)
    _check_not_protected(target, [Path(p) for p in protected if p is not None])  # first: the clearest message
    if found != "missing":
        _check_replaceable(target, found, overwrite)
    ensure_writable(target)
    return target


def resolve_preview(
    path: str | os.PathLike[str],
    *,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    output: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """The output rules for an image rewritten during a run (``--preview``): a ``.png`` name; never one of
    the ``inputs``, nor inside an input folder (a clip of PNG frames would gain a frame), nor the
    ``output`` or inside it; an existing file replaced only with ``overwrite`` and only if it is a PNG.
    Also checks its folder can be written.

    Raises:
        InvalidInputError: any of these rules is broken.
    """
    target = Path(os.fspath(path)).expanduser()
    if target.suffix.lower() != ".png":
        raise InvalidInputError(f"the preview is a PNG image: give a .png path, not {target}")
    others = [("the input", Path(p)) for p in inputs if p is not None]
    if output is not None:
        others.append(("the output", output))
    for what, other in others:
        if _same(target, other) or _inside(target, other):
            verb = "overwrite" if _same(target, other) else "write into"
            raise InvalidInputError(f"the preview {target} would {verb} {what} {other}; choose another path")
    found = inspect_output(target)
    if found != "missing":
        _check_replaceable(target, found, overwrite, kind="png")
    ensure_writable(target)
    return target


def free_name(folder: Path, stem: str) -> Path:
    """``folder/<stem>.mp4``, or ``<stem>-2.mp4``, ``<stem>-3.mp4``, ... if taken."""
    stem = stem or "video"
    candidate, n = folder / f"{stem}.mp4", 2
    while os.path.lexists(candidate):
        candidate, n = folder / f"{stem}-{n}.mp4", n + 1
    return candidate


def _check_name(target: Path, found: str) -> None:
    name, suffix = target.name, target.suffix.lower()
    if name in ("", ".", ".."):
        raise InvalidInputError(f"{target} is not a valid output name; name a file such as clip.mp4")
    if suffix not in KINDS:
        raise InvalidInputError(f"unsupported output format {target.suffix!r}; use .mp4, .gif or a folder name")
    if suffix == "" and name.startswith("."):
        raise InvalidInputError(f"output {target} is a hidden name without a suffix; name it like clip.mp4, "
                                "clip.gif or a folder")
    if suffix == "" and found not in ("missing", "frames"):
        raise InvalidInputError(f"{target} is an existing file without a suffix; use .mp4, .gif or a folder name")


def _check_replaceable(target: Path, found: str, overwrite: bool, kind: str | None = None) -> None:
    if not overwrite:
        raise InvalidInputError(f"{target} already exists; pass --overwrite (overwrite=True) to replace it")
    kind = kind or output_kind(target)
    if found != kind:
        raise InvalidInputError(f"{target} exists and is not {DESCRIPTIONS[kind]}; not replacing it")


def inspect_output(path: Path) -> str:
    """What is at ``path`` (symlinks followed), by content: "missing", "mp4" (an ISO-BMFF file, ``ftyp``
    box), "gif", "png" (a preview image), "file" (another regular file), "frames" (a folder written by
    :meth:`Video.save`: nothing but ``frame_NNNNN.png`` files and a ``metadata.json`` tagged
    ``"encoder": "mlx-i2v"``), "dir" (another folder) or "other" (a dangling link, a device, ...). A
    folder is read through one open descriptor, and read again if another writer swapped it meanwhile
    (moved aside to be deleted)."""
    found = "other"
    for _ in range(_PUBLISH_ATTEMPTS):
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            try:
                link = stat.S_ISLNK(os.lstat(path).st_mode)
            except (FileNotFoundError, NotADirectoryError):
                return "missing"
            if link and not os.path.exists(path):
                return "other"  # a dangling symlink
            continue  # it appeared meanwhile: look again
        except NotADirectoryError:
            return _inspect_file(path)
        except OSError:
            return "other"
        try:
            found = "frames" if _is_frames_folder(fd) else "dir"
            if _still_at(fd, path):
                return found
        finally:
            os.close(fd)
    return found


def _still_at(fd: int, path: Path) -> bool:
    try:
        now, opened = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino)


def _inspect_file(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return "other"
            head = fh.read(12)
    except (FileNotFoundError, NotADirectoryError):  # gone, or a parent is a file: nothing is there
        return "missing"
    except OSError:
        return "other"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return "gif" if head[:6] in (b"GIF87a", b"GIF89a") else "file"


def _is_frames_folder(fd: int) -> bool:
    try:
        with os.scandir(fd) as it:
            entries = list(it)
        if not all(e.is_file(follow_symlinks=False) and (e.name == FRAMES_MARKER or FRAME_NAME.fullmatch(e.name))
                   for e in entries):
            return False
        marker_fd = os.open(FRAMES_MARKER, os.O_RDONLY, dir_fd=fd)
        with open(marker_fd, "rb") as fh:
            marker = json.loads(fh.read())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("encoder") == ENCODER


def is_frames_folder(path: Path) -> bool:
    """Whether ``path`` is a PNG-frames folder written by :meth:`Video.save` (see :func:`inspect_output`)."""
    return inspect_output(path) == "frames"


def _check_not_protected(target: Path, protected: list[Path]) -> None:
    for p in protected:
        if _same(target, p) or (output_kind(target) == "frames" and _inside(p, target)):
            raise InvalidInputError(f"the output {target} would overwrite the input {p}; choose another output")


def _same(a: Path, b: Path) -> bool:
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _inside(path: Path, folder: Path) -> bool:
    return folder.resolve() in path.resolve().parents


def _exists_unwritable(path: Path) -> bool:
    """Whether ``path`` exists and cannot be written. A concurrent save swaps the old output out and the
    new one in, so a path absent when its access is checked and present just after is looked at again."""
    for _ in range(3):
        if os.access(path, os.W_OK) or not path.exists():
            return False
    return True


def ensure_writable(path: str | Path) -> None:
    """Fail early, with one line, if ``path`` cannot be written (run before a long generation).
    Creates the parent directory if needed."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidInputError(f"cannot create output directory {parent}: {e.strerror or e}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidInputError(f"output directory is not writable: {parent}")
    if _exists_unwritable(path):
        raise InvalidInputError(f"output is not writable: {path}")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".mlx-i2v-probe-"):
            pass
    except OSError as e:
        raise InvalidInputError(f"output directory is not writable: {parent} ({e.strerror or e})") from None


# --- writing -------------------------------------------------------------------------------------------


@dataclass
class Staged:
    """The temporary path to write (nothing exists there yet); ``replaced`` is set on publication."""

    path: Path
    replaced: bool = False


@contextmanager
def staged_output(
    target: Path, *, overwrite: bool, directory: bool = False, replaceable: Callable[[str], bool] | None = None
) -> Iterator[Staged]:
    """Yield a temporary name beside ``target``; when the block completes, publish it as ``target``
    atomically. On any exception the temporary is removed and ``target`` is left as it was.

    Without ``overwrite``, a ``target`` that exists at publication (another process finished first)
    is an :class:`InvalidInputError`. With it, an existing ``target`` is replaced if ``replaceable``
    accepts what :func:`inspect_output` finds there (default: the kind ``target``'s suffix names); two
    writers replacing each other end with one complete output, the last to finish's.
    """
    replaceable = replaceable or (lambda found: found == output_kind(target))
    remove_stale_partials(target)
    staged = Staged(target.parent / f".{target.name}.partial-{os.getpid()}-{secrets.token_hex(4)}{target.suffix}")
    try:
        yield staged
        publish = _publish_directory if directory else _publish_file
        staged.replaced = publish(staged.path, target, overwrite=overwrite, replaceable=replaceable)
    finally:
        if os.path.lexists(staged.path):
            remove(staged.path)


def _taken(target: Path) -> InvalidInputError:
    return InvalidInputError(f"{target} was created by another process while this one was writing; left it as it is")


def _publish_file(tmp: Path, target: Path, *, overwrite: bool, replaceable: Callable[[str], bool]) -> bool:
    """``tmp`` -> ``target``; returns whether an existing file was replaced."""
    for _ in range(_PUBLISH_ATTEMPTS):
        found = inspect_output(target) if overwrite else "missing"
        if found != "missing":
            if not replaceable(found):
                raise _not_replaceable(target)
            os.replace(tmp, target)
            return True
        try:
            _link_no_replace(tmp, target)
            return False
        except FileExistsError:
            if not overwrite:
                raise _taken(target) from None
    raise InvalidInputError(f"{target} keeps being replaced by other processes; gave up")


def _link_no_replace(tmp: Path, target: Path) -> None:
    """Give ``tmp``'s file the name ``target`` unless that name exists (FileExistsError), then drop ``tmp``."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise
    except OSError as e:  # no hard links here (FAT, exFAT, some network shares): a rename after a check
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "exists", str(target)) from None
        os.rename(tmp, target)
        return
    os.unlink(tmp)


def _not_replaceable(target: Path) -> InvalidInputError:
    return InvalidInputError(f"{target} appeared while writing and is not {DESCRIPTIONS[output_kind(target)]}; "
                             "not replacing it")


def _publish_directory(tmp: Path, target: Path, *, overwrite: bool, replaceable: Callable[[str], bool]) -> bool:
    """Rename ``tmp`` to ``target`` (which fails on a non-empty directory or a file: another writer
    finished first); with ``overwrite``, move the existing ``target`` aside and retry, putting it back
    if our rename fails for any other reason. Returns whether something was replaced."""
    replaced = False
    for _ in range(_PUBLISH_ATTEMPTS):
        try:
            os.rename(tmp, target)
            return replaced
        except OSError as e:
            if e.errno not in _TAKEN:
                raise
        if not overwrite:
            raise _taken(target)
        found = inspect_output(target)
        if found == "missing":
            continue  # another writer moved it aside this instant
        if not replaceable(found):
            raise _not_replaceable(target)
        aside = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.rename(target, aside)
        except FileNotFoundError:
            continue  # another writer moved it first
        try:
            os.rename(tmp, target)
        except OSError as e:
            if e.errno not in _TAKEN:
                _put_back(aside, target)
                raise
            remove(aside)  # a third writer published in between; its output is replaced on the next round
            replaced = True
            continue
        except BaseException:
            _put_back(aside, target)
            raise
        remove(aside)
        return True
    raise InvalidInputError(f"{target} keeps being replaced by other processes; gave up")


def _put_back(aside: Path, target: Path) -> None:
    try:
        os.rename(aside, target)
    except OSError:  # someone else published meanwhile: theirs stays, ours was replaced anyway
        remove(aside)


def remove(path: Path) -> None:
    """Delete a file, a symlink (not what it points to) or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


# --- partials left by killed processes ------------------------------------------------------------------


def _leftover_pattern(target: Path) -> re.Pattern[str]:
    """Exactly the temporary names :func:`staged_output` (and earlier versions: no token) give
    ``target``: ``.NAME.partial-PID[-TOKEN][SUFFIX]`` and ``.NAME.old-PID[-TOKEN]``."""
    name = re.escape(f".{target.name}.")
    return re.compile(rf"{name}(?:partial-(?P<pid>\d+)(?:-[0-9a-f]{{8}})?(?:{re.escape(target.suffix)})?"
                      rf"|old-(?P<old>\d+)(?:-[0-9a-f]{{8}})?)")


def remove_stale_partials(target: Path) -> list[Path]:
    """Remove the temporary names of ``target`` left by processes that are no longer alive (never
    anything else, never one of a live process, this one included); returns what was removed. An old
    output such a process had moved aside is put back instead if ``target`` is missing."""
    folder = target.parent if str(target.parent) else Path(".")
    pattern = _leftover_pattern(target)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if not m or pid_alive(int(m["pid"] or m["old"])):
            continue
        if m["old"] and _restore(folder / name, target):
            continue
        log.info("removing %s, left by a process that no longer runs", folder / name)
        remove(folder / name)
        removed.append(folder / name)
    return removed


def _restore(aside: Path, target: Path) -> bool:
    """Put back an output that a killed process had moved aside to replace it, if nothing took its place."""
    if os.path.lexists(target):
        return False
    try:
        os.rename(aside, target)
    except OSError:
        return False
    log.warning("restored %s, which a killed process was replacing", target)
    return True


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (ours, or another user's)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or no such pid at all)
        return False
    except PermissionError:  # another user's
        return True
    return True
