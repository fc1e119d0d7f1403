"""File helpers shared by the loaders: checksums, opt-in downloads and safe archive extraction.

Every failure becomes one ``DataError`` line that names the file. Nothing here touches the
network unless a loader was called with ``download=True``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from hpc_asgd.errors import ConfigError, DataError

NO_VERIFY_HINT = "use --no-verify for your own files in this format"


def md5sum(path: Path) -> str:
    """MD5 of a file in 1 MiB blocks; MD5 because the official checksums are MD5."""
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return digest.hexdigest()


def verify_md5(path: Path, expected: str, hint: str = NO_VERIFY_HINT) -> None:
    """Raise ``DataError`` unless ``path`` has the official checksum."""
    got = md5sum(path)
    if got != expected:
        raise DataError(f"{path}: checksum mismatch (md5 {got}, expected {expected}; {hint})")


def download(urls: Sequence[str], dest: Path, md5: str) -> Path:
    """Fetch ``dest`` from the first mirror that answers and check its MD5.

    The file is written under a temporary name and renamed at the end, so an interrupted
    download (or a second rank doing the same) never leaves a half-written ``dest`` behind.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        part = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, open(part, "wb") as out:
                shutil.copyfileobj(resp, out, 1 << 20)
            got = md5sum(part)
            if got != md5:
                errors.append(f"{url}: md5 {got}, expected {md5}")
                continue
            os.replace(part, dest)
            return dest
        except OSError as exc:  # URLError, timeouts and disk errors are all OSErrors
            errors.append(f"{url}: {getattr(exc, 'reason', None) or exc}")
        finally:
            part.unlink(missing_ok=True)
    raise DataError(
        f"{dest}: download failed ({'; '.join(errors)}); without network, copy the file there"
    )


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse anything but plain files and directories inside ``dest`` (no traversal)."""
    name = Path(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise DataError(f"{archive}: unsafe path in archive: {member.name!r}")
    if not (member.isfile() or member.isdir()):
        raise DataError(
            f"{archive}: unsupported member in archive (link or device): {member.name!r}"
        )


def safe_extract(archive: Path, dest: Path, folder: str) -> Path:
    """Extract ``folder`` from a .tar.gz into ``dest`` and return ``dest / folder``.

    Extraction goes to a temporary directory first and ``folder`` is renamed into place, so
    a killed extraction leaves no half-filled folder and concurrent ranks do not collide.
    """
    target = dest / folder
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, archive)
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: belt and braces
                tar.extractall(tmp, members=members, filter="data")
            else:  # pragma: no cover - older Pythons; members were checked above
                tar.extractall(tmp, members=members)
        if not (tmp / folder).is_dir():
            raise DataError(f"{archive}: archive has no top-level folder {folder!r}")
        if not target.exists():
            try:
                os.rename(tmp / folder, target)
            except OSError:
                if not target.is_dir():  # not just another rank winning the race
                    raise
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{archive}: cannot extract ({exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def require_data_dir(data_dir: str | os.PathLike[str] | None, dataset: str) -> Path:
    """``data_dir`` as a Path; the file-backed datasets cannot guess where their files are."""
    if data_dir is None or str(data_dir) == "":
        raise ConfigError(f"data_dir: required for dataset {dataset!r} (the folder with its files)")
    return Path(data_dir).expanduser()
