"""``vlmscope import``: turn a folder of named tensors dumped by another implementation (MLX, JAX,
llama.cpp, a hand-written port) into a trace that ``summary``, ``diff`` and ``view`` read.

The layout is documented in ``docs/import-format.md``. The folder is untrusted input: every file
is checked before a byte of the trace is written (names, symlinks, declared shapes against the
bytes stored, dtypes), and any problem is one :class:`~vlmscope.errors.UserError` line naming the
file. numpy, h5py (through :class:`vlmscope.trace.TraceWriter`) and ``safetensors`` only.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vlmscope.errors import UserError
from vlmscope.trace import (
    ENC_INT64, EVENT_DTYPE, KIND_DECODE, KIND_PREFILL, MAX_DIMS, MODULE_DTYPE, PROBE_DTYPE, ROLE_INPUT, ROLE_KWARG,
    ROLE_OUTPUT, STEP_DTYPE, TENSOR_DTYPE, TraceWriter, pad_shape,
)
from vlmscope.trace.sketch import SKETCH_DTYPE, digests, sketch_of

MANIFEST = "manifest.json"
SUFFIXES = (".safetensors", ".npy", ".npz")
MAX_FILES = 100_000
MAX_NAME = 1000
MAX_MANIFEST_BYTES = 16 << 20
MAX_HEADER_BYTES = 64 << 20          # a safetensors JSON header
#: a compressed member may declare at most this many times its stored bytes (or this floor),
#: as the trace reader bounds HDF5 chunks: a 1 KB zip member declaring 1 TB is refused unread
MAX_RATIO, RATIO_FLOOR = 1024, 64 << 20

_STEP = re.compile(r"step(0|[1-9][0-9]{0,8})\Z")
_DIGITS = re.compile(r"(\d+)")
_BAD_CHAR = re.compile(r"[\x00-\x1f\x7f\\]")
_OUT = re.compile(r"out(\Z|\[|\.)")
_IN = re.compile(r"(in|args)(\Z|\[\d+\]\Z)")

#: dtypes a dump may hold: numpy's real numbers and bool (kind: b, i, u, f)
_KINDS = "biuf"
#: safetensors dtype codes -> numpy (BF16 is read as float32 and recorded as bfloat16)
_ST_DTYPES = {"BOOL": "|b1", "U8": "|u1", "I8": "|i1", "U16": "<u2", "I16": "<i2", "U32": "<u4", "I32": "<i4",
              "U64": "<u8", "I64": "<i8", "F16": "<f2", "F32": "<f4", "F64": "<f8", "BF16": "<u2"}
#: original dtypes a manifest may declare (a port that saved bfloat16 as float32 says so)
DTYPE_NAMES = ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
               "float16", "bfloat16", "float32", "float64")
_MANIFEST_KEYS = {"model", "family", "prompt", "device", "order", "dtypes", "steps"}
_STEP_KEYS = {"kind", "input_ids", "position_ids"}


def _err(path: Any, what: str) -> UserError:
    return UserError(f"{path}: {what}")


# ============================================================================ names


@dataclass
class Entry:
    """One tensor of the dump: where it is, what it is called, how to read it."""

    name: str             # as written: step0/blocks.3.attn.out
    file: Path
    step: int
    module: str
    tensor: str
    shape: tuple[int, ...]
    dtype: np.dtype       # as read (BF16 is read as float32)
    source_dtype: str     # as recorded: bfloat16 for a safetensors BF16, or the manifest's
    load: Callable[[], np.ndarray] = field(repr=False)
    order: int = 0        # file order, then name order


def parse_name(name: str, where: Any) -> tuple[int, str, str]:
    """(step, module, tensor) of ``step0/blocks.3.attn.out`` or ``step0/blocks.3.attn/out``.

    With a slash after the module, the last component is the tensor name (it may hold dots:
    ``step0/model/out.logits``) and the components before it are joined by dots; without one,
    the tensor name is the last dotted component (``step0/out`` is the root module's output).
    """
    if not name or len(name) > MAX_NAME:
        raise _err(where, f"tensor name of {len(name)} characters (at most {MAX_NAME})")
    if _BAD_CHAR.search(name):
        raise _err(where, f"tensor name {name!r} holds a control character or a backslash")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts) or any(".." in p for p in parts):
        raise _err(where, f"tensor name {name!r} has an empty, '.' or '..' component")
    m = _STEP.match(parts[0])
    if m is None or len(parts) < 2:
        raise _err(where, f"tensor name {name!r} does not start with stepN/ (e.g. step0/blocks.3.attn.out)")
    rest = parts[1:]
    if len(rest) == 1:
        module, _, tensor = rest[0].rpartition(".")
    else:
        module, tensor = ".".join(rest[:-1]), rest[-1]
    if any(p == "" for p in module.split(".")) and module:
        raise _err(where, f"tensor name {name!r} has an empty module path component")
    if not tensor:
        raise _err(where, f"tensor name {name!r} has no tensor name after the module")
    return int(m.group(1)), module, tensor


def role_of(tensor: str) -> int:
    """``out``, ``out[0]``, ``out.logits``: an output; ``in``, ``in[0]``, ``args[1]``: a
    positional input; any other name (``hidden_states``): a keyword argument."""
    if _OUT.match(tensor):
        return ROLE_OUTPUT
    return ROLE_INPUT if _IN.match(tensor) else ROLE_KWARG


def natural_key(s: str) -> tuple:
    """``blocks.2`` before ``blocks.10``."""
    return tuple(int(p) if p.isdigit() else p for p in _DIGITS.split(s))


# ============================================================================ reading files


def _check_dtype(dt: np.dtype, where: Any, name: str) -> np.dtype:
    if dt.kind not in _KINDS or dt.fields is not None or dt.subdtype is not None:
        raise _err(where, f"{name}: dtype {dt} is not a real number or bool")
    return dt


def _check_shape(shape: Any, where: Any, name: str) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                       for d in shape):
        raise _err(where, f"{name}: shape {shape!r} is not a list of integers")
    if len(shape) > MAX_DIMS:
        raise _err(where, f"{name}: {len(shape)} dimensions (at most {MAX_DIMS})")
    if any(d < 0 or d >= 1 << 40 for d in shape):
        raise _err(where, f"{name}: shape {list(shape)} has a negative or huge dimension")
    return tuple(shape)


def _nbytes(shape: tuple[int, ...], itemsize: int) -> int:
    n = itemsize
    for d in shape:
        n *= d
    return n


def _npy_header(fh: Any, where: Any, name: str) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran order, header bytes) of an open .npy stream, without its data."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dt = fmt.read_array_header_1_0(fh, max_header_size=1 << 16)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dt = fmt.read_array_header_2_0(fh, max_header_size=1 << 16)
        else:
            raise ValueError(f"npy version {version}")
    except Exception as e:  # noqa: BLE001 - numpy raises ValueError, EOFError, SyntaxError... on junk
        raise _err(where, f"{name}: not a .npy array ({' '.join(str(e).split())[:200]})") from None
    dt = _check_dtype(np.dtype(dt), where, name)
    return _check_shape(tuple(shape), where, name), dt, bool(fortran), fh.tell()


def _read_npy(fh: Any, shape: tuple[int, ...], dt: np.dtype, fortran: bool, where: Any, name: str) -> np.ndarray:
    n = _nbytes(shape, dt.itemsize)
    data = fh.read(n)
    if len(data) != n:
        raise _err(where, f"{name}: {len(data)} data bytes where shape {list(shape)} needs {n}")
    a = np.frombuffer(data, dtype=dt)
    return a.reshape(shape[::-1]).T if fortran else a.reshape(shape)


def _npy_entries(path: Path, rel: str, where: Any) -> list[tuple[str, tuple, np.dtype, str, Callable]]:
    name = rel[: -len(".npy")]
    size = path.stat().st_size
    with open(path, "rb") as fh:
        shape, dt, fortran, hdr = _npy_header(fh, where, name)
    need = hdr + _nbytes(shape, dt.itemsize)
    if need != size:
        raise _err(where, f"{name}: shape {list(shape)} {dt} needs {need} bytes, the file has {size}")

    def load() -> np.ndarray:
        with open(path, "rb") as fh:
            _npy_header(fh, where, name)
            return _read_npy(fh, shape, dt, fortran, where, name)
    return [(name, shape, dt, dt.name, load)]


def _npz_entries(path: Path, where: Any) -> list[tuple[str, tuple, np.dtype, str, Callable]]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise _err(where, f"not a .npz archive ({e})") from None
    out = []
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_FILES:
            raise _err(where, f"{len(infos)} members (at most {MAX_FILES})")
        for info in infos:
            if info.is_dir():
                continue
            if not info.filename.endswith(".npy"):
                raise _err(where, f"member {info.filename!r} is not a .npy array")
            name = info.filename[: -len(".npy")]
            if info.file_size > max(RATIO_FLOOR, MAX_RATIO * max(info.compress_size, 1)):
                raise _err(where, f"{name}: declares {info.file_size} bytes stored in {info.compress_size}")
            try:
                with zf.open(info) as fh:
                    shape, dt, fortran, hdr = _npy_header(fh, where, name)
            except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as e:
                raise _err(where, f"{name}: unreadable member ({e})") from None
            need = hdr + _nbytes(shape, dt.itemsize)
            if need != info.file_size:
                raise _err(where, f"{name}: shape {list(shape)} {dt} needs {need} bytes, the member has "
                                  f"{info.file_size}")

            def load(info=info, shape=shape, dt=dt, fortran=fortran, name=name) -> np.ndarray:
                try:
                    with zipfile.ZipFile(path) as z2, z2.open(info) as fh:
                        _npy_header(fh, where, name)
                        return _read_npy(fh, shape, dt, fortran, where, name)
                except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, zlib.error) as e:
                    raise _err(where, f"{name}: unreadable member ({e})") from None
            out.append((name, shape, dt, dt.name, load))
    return out


def _safetensors_entries(path: Path, where: Any) -> list[tuple[str, tuple, np.dtype, str, Callable]]:
    """The header is checked here (offsets inside the file, lengths equal to the shapes) before
    ``safetensors.numpy`` reads anything; BF16, which numpy cannot hold, is widened to float32."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _err(where, "not a .safetensors file (shorter than its 8-byte header length)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise _err(where, f"not a .safetensors file (header of {n} bytes in a file of {size})")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _err(where, "not a .safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise _err(where, "not a .safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    out = []
    for name, spec in header.items():
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise _err(where, f"{name}: not a tensor entry (dtype, shape, data_offsets)")
        code = spec["dtype"]
        if code not in _ST_DTYPES:
            raise _err(where, f"{name}: dtype {str(code)[:40]} is not one numpy can hold")
        shape = _check_shape(spec["shape"], where, name)
        offs = spec["data_offsets"]
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= data_len):
            raise _err(where, f"{name}: data_offsets {offs!r} outside the file's {data_len} data bytes")
        dt = np.dtype(_ST_DTYPES[code])
        if offs[1] - offs[0] != _nbytes(shape, dt.itemsize):
            raise _err(where, f"{name}: shape {list(shape)} {code} needs {_nbytes(shape, dt.itemsize)} bytes, "
                              f"data_offsets give {offs[1] - offs[0]}")
        if code == "BF16":
            def load(offs=offs, shape=shape) -> np.ndarray:
                with open(path, "rb") as fh:
                    fh.seek(8 + n + offs[0])
                    bits = np.frombuffer(fh.read(offs[1] - offs[0]), "<u2")
                return (bits.astype("<u4") << 16).view("<f4").reshape(shape)
            out.append((name, shape, np.dtype("float32"), "bfloat16", load))
        else:
            out.append((name, shape, dt, dt.name, None))
    if any(e[4] is None for e in out):
        cache: dict[str, np.ndarray] = {}

        def load_np(name: str) -> np.ndarray:
            if not cache:
                try:
                    from safetensors import safe_open
                    with safe_open(str(path), framework="numpy") as f:
                        for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                            if header[k]["dtype"] != "BF16":
                                cache[k] = f.get_tensor(k)
                except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                    raise _err(where, f"unreadable .safetensors ({' '.join(str(e).split())[:200]})") from None
            return cache.pop(name)
        out = [(e[0], e[1], e[2], e[3], e[4] or (lambda k=e[0]: load_np(k))) for e in out]
    return out


# ============================================================================ the folder


def scan(root: Path) -> tuple[list[Entry], Path | None]:
    """Every tensor of the dump folder ``root``, in file order then name order; the manifest."""
    if not root.is_dir():
        raise UserError(f"{root}: not a directory")
    real_root = root.resolve()
    files: list[tuple[str, Path]] = []
    manifest = None
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        for sub in list(dirnames):
            p = d / sub
            if sub.startswith("."):
                dirnames.remove(sub)      # hidden folders (.git, .cache) are skipped, as hidden files
            elif p.is_symlink():
                _inside(p, real_root)
                dirnames.remove(sub)      # a link inside the folder is not followed twice
        dirnames.sort()
        for fn in filenames:
            p = d / fn
            rel = p.relative_to(root).as_posix()
            if fn.startswith("."):
                continue
            if p.is_symlink():
                _inside(p, real_root)
            if not p.is_file():
                raise _err(p, "not a regular file")
            if rel == MANIFEST:
                manifest = p
            elif rel.endswith(SUFFIXES):
                files.append((rel, p))
            else:
                raise _err(p, f"not a tensor file ({', '.join(SUFFIXES)}) or the top-level {MANIFEST}")
            if len(files) > MAX_FILES:
                raise UserError(f"{root}: more than {MAX_FILES} files")
    files.sort(key=lambda f: natural_key(f[0]))
    entries: list[Entry] = []
    seen: dict[str, Path] = {}
    for rel, p in files:
        if rel.endswith(".npy"):
            found = _npy_entries(p, rel, p)
        elif rel.endswith(".npz"):
            found = sorted(_npz_entries(p, p), key=lambda e: natural_key(e[0]))
        else:
            found = sorted(_safetensors_entries(p, p), key=lambda e: natural_key(e[0]))
        for name, shape, dt, src, load in found:
            step, module, tensor = parse_name(name, p)
            if name in seen:
                raise _err(p, f"tensor {name!r} is also in {seen[name]}")
            seen[name] = p
            entries.append(Entry(name, p, step, module, tensor, shape, dt, src, load, len(entries)))
    if not entries:
        raise UserError(f"{root}: no tensors (.safetensors, .npy or .npz files)")
    steps = sorted({e.step for e in entries})
    if steps != list(range(len(steps))):
        missing = sorted(set(range(steps[-1] + 1)) - set(steps))
        raise UserError(f"{root}: steps must be numbered 0..N-1; step{missing[0]} has no tensors")
    return entries, manifest


def _inside(p: Path, real_root: Path) -> None:
    target = p.resolve()
    if target != real_root and real_root not in target.parents:
        raise _err(p, "a symlink out of the dump folder")


# ============================================================================ the manifest


def read_manifest(path: Path | None, entries: list[Entry]) -> dict:
    """The validated manifest (``docs/import-format.md``); ``{}`` without one."""
    if path is None:
        return {}
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise _err(path, f"larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        m = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _err(path, f"not valid JSON ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(m, dict):
        raise _err(path, "not a JSON object")
    extra = sorted(set(m) - _MANIFEST_KEYS)
    if extra:
        raise _err(path, f"unknown field {extra[0]!r} (known: {', '.join(sorted(_MANIFEST_KEYS))})")
    for k in ("model", "family", "prompt", "device"):
        if k in m and not isinstance(m[k], str):
            raise _err(path, f"{k!r} must be a string")
    names = {e.name for e in entries}
    n_steps = 1 + max(e.step for e in entries)
    modules = {(e.step, e.module) for e in entries}
    if "order" in m:
        order = m["order"]
        per_step = order if isinstance(order, dict) else {str(s): order for s in range(n_steps)}
        if not isinstance(per_step, dict):
            raise _err(path, "'order' must be a list of module paths, or an object of step -> list")
        for s, lst in per_step.items():
            if not (isinstance(s, str) and s.isdigit() and int(s) < n_steps):
                raise _err(path, f"'order' names step {s!r}, the dump has steps 0..{n_steps - 1}")
            if not isinstance(lst, list) or not all(isinstance(x, str) for x in lst):
                raise _err(path, f"'order' of step {s}: must be a list of module paths")
            if len(set(lst)) != len(lst):
                raise _err(path, f"'order' of step {s}: a module is listed twice")
        m["order"] = {int(s): lst for s, lst in per_step.items()}
        for s, lst in m["order"].items():
            unknown = [x for x in lst if (s, x) not in modules]
            if unknown and not isinstance(order, list):
                raise _err(path, f"'order' of step {s}: module {unknown[0]!r} has no tensors in step {s}")
        if isinstance(order, list):    # one list for every step: each module must be somewhere
            anywhere = {mod for _, mod in modules}
            unknown = [x for x in order if x not in anywhere]
            if unknown:
                raise _err(path, f"'order': module {unknown[0]!r} has no tensors in the dump")
    if "dtypes" in m:
        dts = m["dtypes"]
        if not isinstance(dts, dict):
            raise _err(path, "'dtypes' must be an object of tensor name (or '*') -> dtype")
        for k, v in dts.items():
            if k != "*" and k not in names:
                raise _err(path, f"'dtypes' names tensor {k!r}, which is not in the dump")
            if v not in DTYPE_NAMES:
                raise _err(path, f"'dtypes' {k!r}: {str(v)[:40]!r} is not one of {', '.join(DTYPE_NAMES)}")
    if "steps" in m:
        steps = m["steps"]
        if not isinstance(steps, list) or len(steps) != n_steps:
            raise _err(path, f"'steps' must be a list of {n_steps} objects, one per step of the dump")
        for i, st in enumerate(steps):
            if not isinstance(st, dict):
                raise _err(path, f"'steps'[{i}] is not an object")
            extra = sorted(set(st) - _STEP_KEYS)
            if extra:
                raise _err(path, f"'steps'[{i}]: unknown field {extra[0]!r} (known: {', '.join(sorted(_STEP_KEYS))})")
            if "kind" in st and st["kind"] not in ("prefill", "decode"):
                raise _err(path, f"'steps'[{i}].kind must be 'prefill' or 'decode'")
            for k in ("input_ids", "position_ids"):
                if k in st:
                    if not isinstance(st[k], str) or st[k] not in names:
                        raise _err(path, f"'steps'[{i}].{k} must name a tensor of the dump")
                    if not st[k].startswith(f"step{i}/"):
                        raise _err(path, f"'steps'[{i}].{k}: {st[k]!r} is not a tensor of step {i}")
    return m


def _probe_value(e: Entry, a: np.ndarray, kind: str, where: Path) -> np.ndarray:
    if a.dtype.kind not in "iu" or (a.dtype.kind == "u" and a.size and int(a.max()) > np.iinfo(np.int64).max):
        raise _err(where, f"'steps' {kind} {e.name!r}: dtype {a.dtype} is not an integer type")
    ok = (2,) if kind == "input_ids" else (2, 3)
    if a.ndim not in ok or (a.ndim == 3 and a.shape[0] not in (3, 4)):
        raise _err(where, f"'steps' {kind} {e.name!r}: shape {list(a.shape)} is not "
                          + ("[B, L]" if kind == "input_ids" else "[B, S] or [3, B, S]"))
    return a.astype(np.int64)


# ============================================================================ stats


def tensor_stats(a: np.ndarray) -> tuple[float, float, float, float, float, int, int]:
    """min, max, mean, std, absmax, NaN and Inf counts over every element, as the recorder
    derives them (``recorder/assemble.py``): mean from the sum, std from the L2 norm
    (``sqrt(norm**2 / n - mean**2)``), here in float64, so that integer tensors (input ids,
    positions) get the very stats a recording of the same values has."""
    if a.size == 0:
        return (np.nan,) * 5 + (0, 0)     # type: ignore[return-value]
    x = a.astype(np.float64, copy=False).reshape(-1)
    n = x.size
    with np.errstate(invalid="ignore", over="ignore"):
        mn, mx = float(x.min()), float(x.max())
        total = float(x.sum())
        norm = float(np.sqrt(np.dot(x, x)))
        mean = total / n
        std = float(np.sqrt(max(norm ** 2 / n - mean ** 2, 0.0))) if np.isfinite(norm) else float(norm - norm)
    finite = np.isfinite(mn) and np.isfinite(mx)
    nan = int(np.isnan(x).sum()) if not finite or np.isnan(total) else 0
    inf = int(np.isinf(x).sum()) if not finite else 0
    return mn, mx, mean, std, max(abs(mn), abs(mx)), nan, inf


# ============================================================================ building the trace


def _module_tree(entries: list[Entry]) -> tuple[list[str], dict[str, int]]:
    """Every module path with its ancestors, depth first, children in natural name order."""
    paths = {""}
    for e in entries:
        parts = e.module.split(".") if e.module else []
        for i in range(len(parts) + 1):
            paths.add(".".join(parts[:i]))
    children: dict[str, list[str]] = {}
    for p in paths:
        if p:
            children.setdefault(p.rpartition(".")[0], []).append(p)
    out: list[str] = []

    def walk(p: str) -> None:
        out.append(p)
        for c in sorted(children.get(p, []), key=natural_key):
            walk(c)
    walk("")
    return out, {p: i for i, p in enumerate(out)}


def _calls(step_entries: list[Entry], order: list[str] | None) -> list[str]:
    """The step's module calls in execution order (each with its ancestors), depth first:
    a module is entered at its first place in ``order`` (else its first tensor's place in the
    dump), and every module is entered inside its parent."""
    rank: dict[str, tuple] = {}
    for e in step_entries:
        rank.setdefault(e.module, (1, e.order))
    for i, mod in enumerate(order or []):
        if mod in rank:
            rank[mod] = (0, i)
    first: dict[str, tuple] = {}
    for mod, r in rank.items():
        parts = mod.split(".") if mod else []
        for i in range(len(parts) + 1):
            a = ".".join(parts[:i])
            if a not in first or r < first[a]:
                first[a] = r
    children: dict[str, list[str]] = {}
    for p in first:
        if p:
            children.setdefault(p.rpartition(".")[0], []).append(p)
    out: list[str] = []

    def walk(p: str) -> None:
        out.append(p)
        for c in sorted(children.get(p, []), key=lambda c: first[c]):
            walk(c)
    walk("")
    return out


def _main_dtype(entries: list[Entry]) -> str | None:
    """The most common floating-point dtype of the dump (the model's dtype, as recorded runs say)."""
    counts: dict[str, int] = {}
    for e in entries:
        if e.dtype.kind == "f":
            counts[e.source_dtype] = counts.get(e.source_dtype, 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else None


def import_dump(dump: str | os.PathLike, out: str | os.PathLike, *, max_tensor_bytes: int = 256 << 20,
                overwrite: bool = False) -> dict:
    """Write the trace ``out`` from the dump folder ``dump``; returns counts for the user.

    Everything is checked before anything is written; the trace is written under a temporary
    name next to ``out`` and moved into place, so an error leaves nothing behind.
    """
    root, out = Path(dump), Path(out)
    entries, manifest_path = scan(root)
    m = read_manifest(manifest_path, entries)
    n_steps = 1 + max(e.step for e in entries)
    dtypes = m.get("dtypes", {})
    for e in entries:   # '*' applies to floating-point tensors only (not to input_ids)
        declared = dtypes.get(e.name, dtypes.get("*") if e.dtype.kind == "f" else None)
        if declared:
            e.source_dtype = declared
    step_specs = m.get("steps") or [{} for _ in range(n_steps)]
    probe_names = {v: (i, k) for i, st in enumerate(step_specs) for k, v in st.items() if k != "kind"}

    module_paths, module_row = _module_tree(entries)
    run = {"vlmscope_import": str(root), "model": m.get("model", root.name), "family": m.get("family"),
           "model_class": "imported", "prompt": m.get("prompt", ""), "device": m.get("device", "cpu"),
           "dtype": _main_dtype(entries),
           "decoder_layers": None, "text_model": None, "vision_model": None, "merger": None,
           "warnings": []}
    out.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and (out.exists() or out.is_symlink()):
        raise UserError(f"{out} exists; use --force to replace it, or choose another -o")
    if out.is_dir():
        raise UserError(f"output path is a directory: {out}")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.import.h5")
    w = TraceWriter(tmp, meta=run, overwrite=True)
    ok = False
    try:
        mods = np.zeros(len(module_paths), MODULE_DTYPE)
        for i, p in enumerate(module_paths):
            mods[i]["path"], mods[i]["cls"] = w.intern(p), w.intern("")
            mods[i]["depth"] = 0 if p == "" else p.count(".") + 1
            mods[i]["parent"] = -1 if p == "" else module_row[p.rpartition(".")[0]]
        w.set_modules(mods)
        counts = {"events": 0, "tensors": 0, "probes": 0, "probe_bytes": 0, "payload_bytes": 0}
        capped = False
        for s in range(n_steps):
            st_entries = [e for e in entries if e.step == s]
            calls = _calls(st_entries, m.get("order", {}).get(s))
            own: dict[str, list[Entry]] = {}
            for e in st_entries:
                own.setdefault(e.module, []).append(e)
            ev = np.zeros(len(calls), EVENT_DTYPE)
            trows: list[np.ndarray] = []
            prows: list[tuple] = []
            blobs: list[np.ndarray] = []
            sketches: list[tuple] = []
            step_row = np.zeros(1, STEP_DTYPE)
            sr = step_row[0]
            sr["step"], sr["kind"] = s, KIND_PREFILL if s == 0 else KIND_DECODE
            if "kind" in step_specs[s]:
                sr["kind"] = KIND_PREFILL if step_specs[s]["kind"] == "prefill" else KIND_DECODE
            sr["input_len"] = sr["q_len"] = sr["cache_before"] = sr["cache_after"] = sr["image_tokens"] = -1
            index = {p: i for i, p in enumerate(calls)}
            seq = 0
            stack: list[int] = []
            depth_of = {}
            for i, p in enumerate(calls):
                parent = "" if p == "" else p.rpartition(".")[0]
                while parent not in index and parent:
                    parent = parent.rpartition(".")[0]
                depth_of[p] = 0 if p == "" else depth_of[parent] + 1
                while stack and not (calls[stack[-1]] == "" or p.startswith(calls[stack[-1]] + ".")):
                    ev[stack.pop()]["end_seq"] = seq
                e_row = ev[i]
                e_row["step"], e_row["seq"], e_row["module"] = s, seq, module_row[p]
                e_row["depth"] = depth_of[p]
                e_row["parent"] = -1 if p == "" else counts["events"] + index[parent]
                seq += 1
                mine = sorted(own.get(p, []), key=lambda e: (e.tensor.startswith("out"), role_of(e.tensor), e.order))
                e_row["tensor_start"] = counts["tensors"] + sum(len(t) for t in trows)
                e_row["tensor_count"] = len(mine)
                t = np.zeros(len(mine), TENSOR_DTYPE)
                for j, e in enumerate(mine):
                    a = e.load()
                    if a.shape != e.shape or a.dtype != e.dtype:
                        raise _err(e.file, f"{e.name}: read {a.dtype}{list(a.shape)}, "
                                           f"declared {e.dtype}{list(e.shape)}")
                    r = t[j]
                    r["step"], r["event"], r["role"] = s, counts["events"] + i, role_of(e.tensor)
                    r["name"], r["ndim"], r["shape"] = w.intern(e.tensor), a.ndim, pad_shape(a.shape)
                    r["dtype"], r["device"], r["numel"] = w.intern(e.source_dtype), w.intern(run["device"]), a.size
                    (r["min"], r["max"], r["mean"], r["std"], r["absmax"], r["nan"], r["inf"]) = tensor_stats(a)
                    r["payload"] = -1
                    if np.issubdtype(a.dtype, np.floating) and "mask" not in e.tensor:
                        sk = sketch_of(a)      # the value sketch a recording computes
                        if sk is not None:
                            sketches.append((counts["tensors"] + sum(len(x) for x in trows) + j, sk[0], sk[1],
                                             r["dtype"]))
                    stored = a.astype(np.uint8) if a.dtype == bool else \
                        a.astype(np.float32) if a.dtype == np.float16 else a
                    if counts["payload_bytes"] + stored.nbytes <= max_tensor_bytes:
                        r["payload"] = w.add_payload(np.ascontiguousarray(stored), module=p, step=s, name=e.tensor,
                                                     dtype=e.source_dtype)
                        counts["payload_bytes"] += stored.nbytes
                    elif not capped:
                        capped = True
                        run["warnings"].append(f"--max-tensor-bytes {max_tensor_bytes} reached at step {s} "
                                               f"({p} {e.tensor}); later tensors keep stats only")
                    if e.name in probe_names:
                        kind = probe_names[e.name][1]
                        v = _probe_value(e, a, kind, manifest_path)
                        info: dict[str, Any] = {}
                        if kind == "input_ids":
                            sr["input_len"] = v.shape[-1]
                        else:
                            rows = [v] if v.ndim == 2 else list(v)      # [B, S]: one row; [3, B, S]: 3
                            mm = [[int(x.min()), int(x.max())] if x.size else [0, -1] for x in rows]
                            info["rows"] = mm
                            axes = mm[1:] if len(mm) == 4 else mm     # [text, t, h, w]: the M-RoPE rows
                            sr["pos_rows"] = len(axes)
                            for k, (lo, hi) in enumerate(axes):
                                sr["pos_min"][k], sr["pos_max"][k] = lo, hi
                        raw = np.frombuffer(np.ascontiguousarray(v, dtype="<i8").tobytes(), np.uint8)
                        off = counts["probe_bytes"] + sum(len(b) for b in blobs)
                        blobs.append(raw)
                        prows.append((seq, counts["events"] + i, module_row[p], kind, e.tensor, v.shape, off,
                                      len(raw), json.dumps(info)))
                        seq += 1
                trows.append(t)
                stack.append(i)
            while stack:
                ev[stack.pop()]["end_seq"] = seq
            tensors = np.concatenate(trows) if trows else np.zeros(0, TENSOR_DTYPE)
            pr = np.zeros(len(prows), PROBE_DTYPE)
            for j, (pseq, pev, pmod, kind, name, shape, off, n, info) in enumerate(prows):
                r = pr[j]
                r["step"], r["seq"], r["event"], r["module"] = s, pseq, pev, pmod
                r["kind"], r["name"], r["ndim"], r["shape"] = w.intern(kind), w.intern(name), len(shape), \
                    pad_shape(shape)
                r["dtype"], r["enc"], r["data_off"], r["data_len"] = w.intern("int64"), ENC_INT64, off, n
                r["info"] = w.intern(info)
            sr["event_start"], sr["event_count"] = counts["events"], len(ev)
            sr["tensor_start"], sr["tensor_count"] = counts["tensors"], len(tensors)
            sr["reshape_start"], sr["reshape_count"] = 0, 0
            sr["probe_start"], sr["probe_count"] = counts["probes"], len(pr)
            w.append("events", ev)
            w.append("tensors", tensors)
            w.append("probes", pr)
            if blobs:
                w.append_probe_data(np.concatenate(blobs))
            if sketches:
                srows = np.zeros(len(sketches), SKETCH_DTYPE)
                for k, (trow, scale, data, dt) in enumerate(sketches):
                    srows[k] = (trow, data.shape[0], data.shape[1], scale, dt, digests(data, np.array([data.shape[0]]))[0],
                                w.append_sketch_data(data))
                w.append("sketches", srows)
                sketches.clear()
            w.append("steps", step_row)
            counts["events"] += len(ev)
            counts["tensors"] += len(tensors)
            counts["probes"] += len(pr)
            counts["probe_bytes"] += sum(len(b) for b in blobs)
            w.end_step()
        if run["warnings"]:
            w.update_meta(warnings=run["warnings"])
        w.close()
        if overwrite:
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)
            except FileExistsError:
                raise UserError(f"{out} exists; use --force to replace it, or choose another -o") from None
            tmp.unlink()
        ok = True
    finally:
        if not ok:
            if not w.closed:
                try:
                    w.close("incomplete")
                except OSError:
                    pass
            for p in (tmp, w.partial_path):
                try:
                    p.unlink(missing_ok=True)
                except OSError:
                    pass
    return {"steps": n_steps, "modules": len(module_paths), "events": counts["events"],
            "tensors": counts["tensors"], "probes": counts["probes"], "payload_bytes": counts["payload_bytes"],
            "files": len({e.file for e in entries}), "warnings": run["warnings"]}
