"""Hostile input read safely and outputs written whole: the helpers ``report`` and
``predict`` share. A run folder's files are anyone's: every value read is checked for its type
and range (:func:`number`, :func:`text`, ...), files are read bounded (:func:`read_text`,
:func:`parse_json`), outputs go to temporary names moved into place once all are written
(:class:`Outputs`), and :func:`run_tool` turns whatever went wrong into one line and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, NoReturn

from hpc_asgd.errors import HpcAsgdError

BIG = 1e15  # no figure of a run comes near it in size (and the plots scale up to it)
MAX_RANKS = 1 << 16  # per-rank lists and world sizes
MAX_BINS = 256  # histograms' bins
MAX_BYTES = 1 << 28  # a file read: 256 MiB (a metrics.jsonl of over a million rows)
MAX_TEXT = 200  # a name (algorithm, model, ...): printable, at most this long


class BadValue(ValueError):
    """A JSON value of the wrong type or out of range; the message names it and says why."""


def shown(path: os.PathLike | str) -> str:
    """``path`` printable whatever its bytes: those that are not UTF-8 as ``\\xff``."""
    try:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    except UnicodeError:  # a lone surrogate that no file name decodes to
        return os.fspath(path).encode("utf-8", "backslashreplace").decode()


def why(e: BaseException) -> str:
    """An exception in a few words (an OSError: its strerror)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e).split(";")[0] or type(e).__name__  # the int-digits limit: its first clause


def brief(v: Any) -> str:
    """A JSON value as a short text for a message."""
    if isinstance(v, (dict, list)):
        return "an object" if isinstance(v, dict) else "a list"
    text = json.dumps(v)  # ASCII: lone surrogates and control characters escaped
    return text if len(text) <= 40 else text[:37] + "..."


def number(
    v: Any,
    what: str,
    lo: float = -BIG,
    hi: float = BIG,
    *,
    integer: bool = False,
    null: bool = False,
) -> Any:
    """``v`` if it is a finite number (an int for ``integer``; never a bool) in [lo, hi], or
    None where ``null``; else :class:`BadValue`."""
    if v is None and null:
        return v
    if isinstance(v, int if integer else (int, float)) and not isinstance(v, bool):
        try:
            if lo <= float(v) <= hi:  # NaN fails the comparison; a huge int overflows
                return v
        except OverflowError:
            pass
    kind, bound = ("an integer", "{:,}") if integer else ("a number", "{:g}")
    span = f"[{bound.format(lo)}, {bound.format(hi)}]"
    raise BadValue(f"{what} is {brief(v)}, not {kind} in {span}{' or null' if null else ''}")


def numbers(
    v: Any,
    what: str,
    lo: float = 0,
    hi: float = BIG,
    *,
    integer: bool = False,
    null_items: bool = False,
    most: int = MAX_RANKS,
) -> list:
    """A list (null: empty) of at most ``most`` such numbers (null ones where ``null_items``)."""
    if v is None:
        return []
    if not isinstance(v, list) or len(v) > most:
        raise BadValue(f"{what} is {brief(v)}, not a list of up to {most:,} numbers")
    for i, x in enumerate(v):
        number(x, f"{what}[{i}]", lo, hi, integer=integer, null=null_items)
    return v


def text(v: Any, what: str, null: bool = False) -> Any:
    """``v`` if it is a printable string of at most MAX_TEXT characters (or None where ``null``)."""
    if (v is None and null) or (isinstance(v, str) and len(v) <= MAX_TEXT and v.isprintable()):
        return v
    end = " or null" if null else ""
    raise BadValue(f"{what} is {brief(v)}, not a printable string of <= {MAX_TEXT} chars{end}")


def mapping(v: Any, what: str) -> dict:
    """A JSON object (null: empty)."""
    if v is None or isinstance(v, dict):
        return v or {}
    raise BadValue(f"{what} is {brief(v)}, not an object")


def read_text(path: Path, error: type[HpcAsgdError]) -> str:
    """A regular file of at most MAX_BYTES, UTF-8; else ``error`` naming it (and the line)."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block, a device not end
            raise error(f"{shown(path)}: not a regular file")
        if info.st_size <= MAX_BYTES:
            with open(path, "rb") as f:
                data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise error(f"{shown(path)}: cannot read ({why(e)})") from None
    if info.st_size > MAX_BYTES or len(data) > MAX_BYTES:
        raise error(f"{shown(path)}: over {MAX_BYTES >> 20} MiB, no run's")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise error(
            f"{shown(path)}: line {line} is not UTF-8 text (byte 0x{data[e.start]:02x})"
        ) from None


def parse_json(doc: str, head: str, error: type[HpcAsgdError], lines: bool = True) -> Any:
    """JSON ``doc``, or ``error`` saying ``head`` and why (``lines``: the line too)."""
    try:
        return json.loads(doc)
    except json.JSONDecodeError as e:
        raise error(f"{head} ({f'line {e.lineno}: ' if lines else ''}{e.msg})") from None
    except (ValueError, RecursionError) as e:  # an integer of over 4,300 digits; nesting
        raise error(f"{head} ({why(e)})") from None


class Outputs:
    """Files written under temporary names in ``folder`` (made if need be) and moved into place
    together by :meth:`commit`: an error leaves none half-written, and removes the folder if
    this made it."""

    def __init__(self, folder: Path, error: type[HpcAsgdError]) -> None:
        self.folder, self.error = Path(folder), error
        self.staged: list[tuple[Path, Path]] = []
        self.made = False

    def __enter__(self) -> Outputs:
        try:
            self.folder.mkdir(parents=True)
            self.made = True
        except FileExistsError:
            if not self.folder.is_dir():
                raise self.error(f"{shown(self.folder)}: exists and is not a folder") from None
        except OSError as e:
            raise self.error(f"{shown(self.folder)}: cannot make the folder ({why(e)})") from None
        return self

    def write(self, name: str, fill: Callable[[IO[bytes]], object]) -> None:
        """Stage ``name``: ``fill`` writes it to a temporary file beside it."""
        final = self.folder / name
        tmp = self.folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as e:
            raise self.error(f"{shown(final)}: cannot write ({why(e)})") from None
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise self.error(f"{shown(final)}: cannot write ({why(e)})") from None
            raise
        self.staged.append((tmp, final))

    def commit(self) -> None:
        while self.staged:
            tmp, final = self.staged[0]
            try:
                os.replace(tmp, final)
            except OSError as e:
                raise self.error(f"{shown(final)}: cannot write ({why(e)})") from None
            self.staged.pop(0)

    def __exit__(self, kind: object, *_: object) -> None:
        for tmp, _final in self.staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if kind is not None and self.made:
            with contextlib.suppress(OSError):
                self.folder.rmdir()


def say(message: str, error: type[HpcAsgdError]) -> None:
    """Print ``message`` whatever the stream's encoding can show; a closed or full standard
    output is ``error`` (and no more writes to it: none at exit)."""
    out = sys.stdout
    enc = getattr(out, "encoding", None) or "utf-8"
    try:
        out.write(message.encode(enc, "backslashreplace").decode(enc, "replace") + "\n")
        out.flush()
    except OSError as e:
        with contextlib.suppress(OSError, ValueError):  # pytest's capture has no descriptor
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        raise error(f"cannot write to the standard output ({why(e)})") from None


def run_tool(tool: str, body: Callable[[], int]) -> int:
    """``body``'s exit status, or 2 after one line on stderr whatever it raised (a case no
    check foresaw included: ``HPC_ASGD_TRACEBACK=1`` prints where)."""
    try:
        return body()
    except HpcAsgdError as e:
        what = str(e)
    except Exception as e:
        what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if os.environ.get("HPC_ASGD_TRACEBACK"):
            import traceback

            traceback.print_exc()
    line = " ".join(f"hpc-asgd {tool}: error: {what}".split())
    try:
        sys.stderr.write(line.encode("utf-8", "backslashreplace").decode() + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # no stderr left to say it on
        pass
    return 2


def one_line_errors(p: argparse.ArgumentParser) -> None:
    """``p``'s errors (a value that is no number, an unknown flag): one line, exit 2, no usage."""

    def error(message: str) -> NoReturn:
        line = " ".join(f"{p.prog}: error: {message}".split())
        sys.stderr.write(line.encode("utf-8", "backslashreplace").decode() + "\n")
        sys.exit(2)

    parse = p.parse_known_args

    def parse_known_args(args=None, namespace=None):
        namespace, extra = parse(args, namespace)
        if extra:  # else the top-level parser would say so, with its usage
            error(f"unrecognized arguments: {' '.join(extra)}")
        return namespace, extra

    p.error = error  # type: ignore[method-assign]
    p.parse_known_args = parse_known_args  # type: ignore[method-assign]
