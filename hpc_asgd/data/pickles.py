"""A restricted unpickler for the official CIFAR python files.

``pickle.load`` runs whatever callables a file names, so a doctored "CIFAR batch" could run
code. The official files hold only dicts, lists, bytes, ints and numpy arrays; numpy arrays
need exactly three globals to unpickle, and everything else is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from hpc_asgd.errors import DataError

try:  # numpy >= 2 moved the implementation; pickles from numpy 1 still name numpy.core
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy < 2
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals numpy arrays need; anything else raises UnpicklingError."""

    def find_class(self, module: str, name: str) -> Any:
        # Return the objects directly rather than importing ``module``: importing
        # numpy.core under numpy 2 would warn, and importing anything else is the risk.
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def load_pickle(path: Path) -> dict[str, Any]:
    """Load a dataset pickle; keys come back as ``str`` whether stored as bytes or str.

    ``encoding='bytes'`` reads the Python 2 pickles CIFAR ships (keys like ``b'data'``).
    """
    try:
        with open(path, "rb") as fh:
            obj = RestrictedUnpickler(fh, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except pickle.UnpicklingError as exc:
        if not str(exc).startswith("refused global"):
            raise DataError(f"{path}: corrupt or truncated pickle ({exc})") from None
        raise DataError(
            f"{path}: unsafe pickle, {exc} (only numpy arrays, dicts, lists, "
            "strings and ints are allowed)"
        ) from None
    except Exception as exc:  # truncated or garbled files raise a zoo of types
        kind = type(exc).__name__
        raise DataError(f"{path}: corrupt or truncated pickle ({kind}: {exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}
