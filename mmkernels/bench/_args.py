"""Argument checks shared by every ``mmkernels-bench`` subcommand (and the examples): each returns the parsed value or
raises :class:`UsageError` with one line naming the flag, the value and what is accepted. The CLIs turn that into
``<prog>: error: <line>`` on stderr and exit status 2, before anything is built or timed."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import stat
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

__all__ = ["MAX_MS", "OneLineParser", "UsageError", "check_env", "device", "device_type", "in_file",
           "matplotlib_problem", "milliseconds", "open_log", "out_dir", "out_file", "positive_int", "replace_file",
           "threads"]

MAX_MS = 3_600_000.0  # the longest warm-up or timed time a flag takes: one hour
MAX_THREADS_PER_CPU = 4  # --threads stops at this many per CPU (torch crashes far past the core count)


class UsageError(ValueError):
    """A command-line value that cannot be used (the message is the one line the CLI prints)."""


def check_env() -> None:
    """Every ``MMKERNELS_*`` variable through its parser (``mmkernels._env``); the first bad one is the error."""
    from .._env import check

    problems = check()
    if problems:
        more = f" (and {len(problems) - 1} more bad variable(s))" if len(problems) > 1 else ""
        raise UsageError(f"environment: {problems[0]}{more}")


def device(text: str | None, flag: str = "--device", kinds: Sequence[str] = ("cpu", "cuda")) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` (the kinds allowed), checked against this machine; None: cuda when there is
    one, else cpu."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() and "cuda" in kinds else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"{flag} {text!r} is not a device (expected {' or '.join(kinds)}"
                         f"{', cuda:N' if 'cuda' in kinds else ''})") from None
    if dev.type not in kinds:
        raise UsageError(f"{flag} {text}: this command runs on {' and '.join(kinds)} devices only")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise UsageError(f"{flag} {text}: there is one CPU device (cpu); an index picks a CUDA device (cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {text}: no CUDA device here (torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def device_type(text: str) -> torch.device:
    """:func:`device` as an argparse ``type=``: a bad value becomes the parser's one-line error."""
    try:
        return device(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--device ")) from None


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit status 2, like ``mmkernels-bench`` (the
    examples' command lines)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def out_dir(text: str, flag: str = "--out", files: Sequence[str] = ()) -> Path:
    """A folder results can be written in: created if missing, proven writable with a temporary file; each of
    ``files`` (the names the command will write there) passes :func:`out_file`."""
    if not text:
        raise UsageError(f"{flag} '': an empty path (name a folder)")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {text}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} {text}: cannot write there ({exc.strerror or exc})") from None
    for name in files:
        out_file(path / name, flag, shown=f"{text}: {path / name}")
    return path


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def out_file(path: str | os.PathLike, flag: str, *, shown: str | None = None) -> Path:
    """An output *file* checked before any work: not ``""``, no trailing ``/``, its folder exists and takes a real
    write (a temporary file, removed at once: ``os.access`` says yes to root anywhere), and the path, if it exists
    (after symbolic links), is a regular file we can open for writing -- never a FIFO (opening it blocks until a
    reader comes), a device node (``/dev/full`` fails every write; a device must not be replaced), a socket or a
    folder. Returns the path; raises :class:`UsageError` naming ``flag`` (``shown``: what the line calls the path)."""
    text = os.fspath(path)
    shown = shown if shown is not None else text
    if not text:
        raise UsageError(f"{flag} '': an empty path (name a file)")
    if text.endswith(("/", os.sep)) and not os.path.isdir(text):
        raise UsageError(f"{flag} {shown}: ends with '/', so it names a folder; give a file name")
    real = os.path.realpath(text)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise UsageError(f"{flag} {shown}: cannot look at it ({exc.strerror or exc})") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        what = _kind(st.st_mode)
        via = f" (a link to {real})" if real != os.path.abspath(text) else ""
        raise UsageError(f"{flag} {shown}: is {what}{via}, not a regular file; refusing to write to it")
    folder = os.path.dirname(real)
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {shown}: the folder {folder} does not exist")
    try:  # a real write in the folder (the writers replace the file through a temporary one there)
        with tempfile.TemporaryFile(dir=folder):
            pass
        if st is not None:  # an existing regular file: open it for writing without truncating or writing
            os.close(os.open(real, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK))
    except OSError as exc:
        raise UsageError(f"{flag} {shown}: cannot write there ({exc.strerror or exc})") from None
    return Path(text)


def in_file(path: str, flag: str) -> Path:
    """An input file checked before any work: a regular (after links), non-empty file we can open for reading.
    Raises :class:`UsageError` naming ``flag``."""
    if not path:
        raise UsageError(f"{flag} '': an empty path (name a file)")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot look at it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{flag} {path}: is {_kind(st.st_mode)}, not a regular file")
    if st.st_size == 0:
        raise UsageError(f"{flag} {path}: is empty (0 bytes)")
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    return Path(path)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def replace_file(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Write a file safely: ``write(tmp)`` fills a temporary file in the target's folder, which then replaces the
    target with ``os.replace`` -- only a missing path or a regular file (through symbolic links: the link's target
    is replaced, the link kept). A FIFO, device, socket or folder there is never opened or replaced: ``OSError``
    naming the path. A failed write leaves the old file as it was and no temporary file behind."""
    real = os.path.realpath(os.fspath(path))

    def check() -> int | None:
        try:
            st = os.stat(real)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{os.fspath(path)} is {_kind(st.st_mode)}, not a regular file; not replacing it")
        return stat.S_IMODE(st.st_mode)

    mode = check()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(real), prefix=f".{os.path.basename(real)}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_umask())
        write(tmp)
        check()  # again: something may have appeared there while we wrote
        os.replace(tmp, real)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return Path(path)


def open_log(path: str | os.PathLike, mode: str = "w"):
    """Open a log file for writing (``mode`` ``"w"`` or ``"a"``, text) without ever blocking or writing to a special
    file: a FIFO with no reader fails at once (``O_NONBLOCK``), anything that is not a regular file once opened is
    closed again with ``OSError`` naming the path."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | (os.O_APPEND if mode == "a" else 0)
    fd = os.open(path, flags, 0o666)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{os.fspath(path)} is {_kind(st.st_mode)}, not a regular file; not writing to it")
        if mode == "w":
            os.ftruncate(fd, 0)
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def matplotlib_problem() -> str | None:
    """Why ``matplotlib.pyplot`` cannot be imported for plots (None: it can), checked up front: a run must not time
    or train to the end and then fail to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except ImportError as exc:
        return f"needs matplotlib, which cannot be imported ({exc}); pip install matplotlib"
    except Exception as exc:  # an installed but broken matplotlib raises all sorts
        return f"needs matplotlib, which fails to import ({type(exc).__name__}: {exc})"
    return None


def finite(text: str) -> float | None:
    """``text`` as a finite float, or None (not a number, ``nan``, ``inf``): the first step of every range check."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def milliseconds(text: str) -> float:
    """argparse ``type=``: a finite number of milliseconds >= 0 (``nan``, ``inf`` and negatives are refused)."""
    value = finite(text)
    if value is None or not 0 <= value <= MAX_MS:
        raise argparse.ArgumentTypeError(f"must be a number of milliseconds in 0...{MAX_MS:.0f} (one hour), "
                                         f"got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse ``type=``: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def threads(text: str) -> int:
    """argparse ``type=``: a thread count in 1 ... ``MAX_THREADS_PER_CPU`` x this machine's CPUs."""
    limit = MAX_THREADS_PER_CPU * (os.cpu_count() or 1)
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= limit:
        raise argparse.ArgumentTypeError(f"must be an integer in 1...{limit} ({MAX_THREADS_PER_CPU} per CPU of "
                                         f"this machine), got {text!r}")
    return value
