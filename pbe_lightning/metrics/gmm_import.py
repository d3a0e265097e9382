"""Import the authors' QS mixture, a pickled scikit-learn ``GaussianMixture``, without running
anything from the file (``python -m pbe_lightning.metrics import-gmm FILE --out qs_gmm.npz``).

A pickle is a program: its ``GLOBAL`` opcodes name callables that loading then calls. This
unpickler resolves only the names such a file needs, each to OUR stand-in, never to the named
object: numpy arrays, dtypes and scalars become plain arrays through inert records, and
``sklearn.mixture...GaussianMixture`` becomes an attribute holder (scikit-learn need not be
installed and is never imported). Any other name (``os.system``, ``builtins.eval``,
``subprocess.Popen``, ...) stops the load at that opcode, before anything it names can run.

joblib files are refused: ``joblib.dump`` stores arrays after the pickle as
``NumpyArrayWrapper`` records (and often compresses the whole file), and the authors' file is a
plain pickle (their scorer reads it with ``pickle.load``).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from pbe_lightning.metrics.gmm import GaussianMixture

SKLEARN_MODULES = ("sklearn.mixture._gaussian_mixture", "sklearn.mixture.gaussian_mixture")
NUMPY_CORE = ("numpy.core", "numpy._core")  # numpy 1.x and 2.x spell the module differently
NUMERIC_KINDS = "biufc"  # bool, int, unsigned, float, complex: plain bytes, no objects
COMPRESSED = {  # magic numbers of the compressors joblib.dump may use
    b"\x1f\x8b": "gzip",
    b"BZh": "bz2",
    b"\xfd7zXZ": "xz",
    b"\x5d\x00\x00": "lzma",
    b"\x04\x22\x4d\x18": "lz4",
    b"\x78\x01": "zlib",
    b"\x78\x9c": "zlib",
    b"\x78\xda": "zlib",
    b"ZF": "zlib (old joblib)",
}
JOBLIB = (
    "joblib files are not supported (joblib.dump stores numpy arrays outside the pickle); "
    "the authors' QS mixture is a plain pickle, which their scorer reads with pickle.load"
)


class RefusedPickle(ValueError):
    """The file is not a plain pickle of a scikit-learn GaussianMixture; nothing in it ran."""


class _Dtype:
    """Stand-in for ``numpy.dtype(spec, align, copy)`` + its pickled state (the byte order)."""

    def __init__(self, spec: object, align: object = False, copy: object = False) -> None:
        if not isinstance(spec, str) or len(spec) > 8:
            raise RefusedPickle(f"refused a numpy dtype {spec!r}: only numeric dtypes")
        self.spec, self.byteorder = spec, "="

    def __setstate__(self, state: object) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags): plain
        # numeric dtypes only, so no subarray, no fields.
        if not isinstance(state, tuple) or len(state) < 5 or state[2:5] != (None, None, None):
            raise RefusedPickle("refused a structured or sub-array numpy dtype")
        if state[1] not in ("<", ">", "|", "="):
            raise RefusedPickle(f"refused a numpy dtype byte order {state[1]!r}")
        self.byteorder = state[1]

    def resolve(self) -> np.dtype:
        if not isinstance(getattr(self, "spec", None), str):
            raise RefusedPickle("refused a numpy dtype record without its type")
        dtype = np.dtype(self.spec)
        if dtype.kind not in NUMERIC_KINDS or dtype.fields is not None or dtype.hasobject:
            raise RefusedPickle(f"refused numpy dtype {self.spec!r}: only numeric dtypes")
        return dtype.newbyteorder(self.byteorder) if self.byteorder in "<>" else dtype


def _as_dtype(value: object) -> np.dtype:
    if not isinstance(value, _Dtype):
        raise RefusedPickle(f"refused: expected a numpy dtype, found {type(value).__name__}")
    return value.resolve()


def _shape(value: object) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(isinstance(n, int) and n >= 0 for n in value):
        raise RefusedPickle(f"refused an array shape {value!r}")
    return value


class _NdarrayName:
    """What ``numpy.ndarray`` resolves to: only accepted as ``_reconstruct``'s first argument."""


class _Array:
    """Stand-in for ``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')``; its pickled
    state ``(version, shape, dtype, is_fortran, raw bytes)`` makes the array."""

    array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise RefusedPickle("refused a numpy array state that is not (version, shape, ...)")
        _, shape, dtype, fortran, data = state
        if not isinstance(data, (bytes, bytearray)):
            raise RefusedPickle("refused a numpy array of Python objects")
        self.array = _from_bytes(data, _as_dtype(dtype), _shape(shape), "F" if fortran else "C")


def _from_bytes(data: bytes | bytearray, dtype: np.dtype, shape: tuple, order: str) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) != count * dtype.itemsize:
        raise RefusedPickle(f"refused an array of shape {shape}: {len(data)} bytes of data")
    return np.frombuffer(bytes(data), dtype=dtype).reshape(shape, order=order).copy()


def _reconstruct(cls: object, shape: object, typecode: object) -> _Array:
    if cls is not _NdarrayName:
        raise RefusedPickle("refused numpy _reconstruct of something other than ndarray")
    return _Array()


def _frombuffer(
    buffer: object, dtype: object, shape: object, order: object, axis_order: object = None
) -> np.ndarray:
    """Protocol 5's array record (buffer in-band); order ``K`` comes with the axis permutation
    of a non-contiguous array (numpy 2)."""
    if isinstance(buffer, pickle.PickleBuffer):
        buffer = bytes(buffer.raw())
    if not isinstance(buffer, (bytes, bytearray)) or order not in ("C", "F", "K"):
        raise RefusedPickle("refused a numpy buffer record")
    shape = _shape(shape)
    if order != "K" or axis_order is None:
        return _from_bytes(buffer, _as_dtype(dtype), shape, "F" if order == "F" else "C")
    if not isinstance(axis_order, tuple) or sorted(axis_order) != list(range(len(shape))):
        raise RefusedPickle(f"refused a numpy axis order {axis_order!r}")
    return _from_bytes(buffer, _as_dtype(dtype), shape, "C").transpose(axis_order).copy()


def _scalar(dtype: object, data: object) -> Any:
    """``numpy.core.multiarray.scalar(dtype, bytes)``: one numeric value."""
    resolved = _as_dtype(dtype)
    if not isinstance(data, (bytes, bytearray)) or len(data) != resolved.itemsize:
        raise RefusedPickle("refused a numpy scalar record")
    return np.frombuffer(bytes(data), dtype=resolved)[0].item()


def _latin1(text: object, encoding: object = "latin1") -> bytes:
    """``_codecs.encode``, which protocols 0-2 use to store bytes: text -> bytes only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise RefusedPickle("refused _codecs.encode other than str -> latin-1 bytes")
    return text.encode("latin-1")


class SklearnGaussianMixture:
    """Attribute holder for ``sklearn.mixture.GaussianMixture``'s pickled ``__dict__``."""

    attributes: dict[str, Any]

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise RefusedPickle("refused a GaussianMixture whose state is not an attribute dict")
        self.attributes = {key: _resolve(value) for key, value in state.items()}


def _resolve(value: object) -> object:
    """Array records -> arrays, inside the containers a scikit-learn estimator's state holds."""
    if isinstance(value, _Array):
        if value.array is None:
            raise RefusedPickle("refused a numpy array record without its data")
        return value.array
    if isinstance(value, (_Dtype, _NdarrayName, _ObjectName)):
        raise RefusedPickle(f"refused a bare {type(value).__name__} in the mixture's state")
    if isinstance(value, dict):
        return {key: _resolve(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(item) for item in value)
    return value


class _ObjectName:
    """What ``builtins.object`` resolves to: only accepted by ``copyreg._reconstructor``."""


def _reconstructor(cls: object, base: object, state: object) -> SklearnGaussianMixture:
    """Protocols 0-1 make plain objects with ``copyreg._reconstructor(cls, object, None)``."""
    if cls is not SklearnGaussianMixture or base is not _ObjectName or state is not None:
        raise RefusedPickle("refused copyreg._reconstructor of anything but the GaussianMixture")
    return SklearnGaussianMixture()


ALLOWED: dict[tuple[str, str], object] = {
    ("numpy", "ndarray"): _NdarrayName,
    ("numpy", "dtype"): _Dtype,
    ("_codecs", "encode"): _latin1,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): _ObjectName,
    ("__builtin__", "object"): _ObjectName,
}
for _core in NUMPY_CORE:
    ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = _reconstruct
    ALLOWED[(f"{_core}.multiarray", "scalar")] = _scalar
    ALLOWED[(f"{_core}.numeric", "_frombuffer")] = _frombuffer
for _module in SKLEARN_MODULES:
    ALLOWED[(_module, "GaussianMixture")] = SklearnGaussianMixture


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :data:`ALLOWED` names, each to our stand-in; refuses every other."""

    def find_class(self, module: str, name: str) -> object:
        allowed = ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module.startswith(("joblib", "sklearn.externals.joblib")):
            raise RefusedPickle(f"{JOBLIB} (found {module}.{name})")
        raise RefusedPickle(
            f"refused {module}.{name}: not part of a pickled scikit-learn GaussianMixture "
            "(allowed: numpy arrays, dtypes and scalars, sklearn.mixture GaussianMixture); "
            "nothing in the file was run"
        )

    def persistent_load(self, pid: object) -> object:
        raise RefusedPickle("refused a persistent id: not part of a plain pickle")


def read_sklearn_gmm(path: str | Path) -> dict[str, Any]:
    """The pickled GaussianMixture's attributes (``weights_``, ``means_``, ...) as plain
    values; :class:`RefusedPickle` (one line) for anything else."""
    data = Path(path).read_bytes()
    for magic, compressor in COMPRESSED.items():
        if data.startswith(magic):
            raise RefusedPickle(f"{JOBLIB} (this file is {compressor}-compressed)")
    try:
        loaded = RestrictedUnpickler(io.BytesIO(data)).load()
    except RefusedPickle:
        raise
    except Exception as error:  # truncated or garbage streams: say so, in one line
        message = " ".join(str(error).split()) or type(error).__name__
        raise RefusedPickle(f"not a readable pickle ({message})") from None
    if not isinstance(loaded, SklearnGaussianMixture) or not hasattr(loaded, "attributes"):
        raise RefusedPickle(
            f"the pickle holds a {type(loaded).__name__}, not a scikit-learn GaussianMixture"
        )
    return loaded.attributes


def mixture_from_sklearn(attributes: dict[str, Any], clip: str) -> GaussianMixture:
    """Our mixture from a fitted GaussianMixture's attributes (``score_samples`` uses
    ``weights_``, ``means_``, ``precisions_cholesky_`` and ``covariance_type``)."""
    needed = ("weights_", "means_", "precisions_cholesky_", "covariance_type")
    missing = [name for name in needed if name not in attributes]
    if missing:
        raise RefusedPickle(f"the GaussianMixture lacks {missing}: was it fitted?")
    arrays = [np.asarray(attributes[name], dtype=np.float64) for name in needed[:3]]
    try:
        return GaussianMixture(
            *arrays, covariance_type=attributes["covariance_type"], features="raw", clip=clip
        )
    except ValueError as error:
        raise RefusedPickle(
            f"the GaussianMixture's parameters do not fit together: {error}"
        ) from None
