"""The trace format's constants and table layouts (``docs/trace-format.md``), the string and
probe encodings, and the one error type of unreadable traces. h5py, hdf5plugin and numpy only."""

from __future__ import annotations

from typing import Any, Iterable

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc2 HDF5 filter; C plugins only, no torch)
import numpy as np

from .sketch import SKETCH_DTYPE

FORMAT_NAME = "vlmscope-trace"
#: Version 3: every chunk carries a Fletcher-32 checksum (a flipped bit is an error, never a
#: value), and a recording in progress is a journal (``trace/journal.py``) until it is closed.
#: Version 2: tables compressed with Blosc2 (lz4, byte shuffle) in ~1 MiB chunks.
#: Version 1 (lzf, 64 KiB chunks) is still read, as is version 2.
FORMAT_VERSION = 3
MAX_DIMS = 8
CHUNK_BYTES = 1 << 20     # per chunk: a per-step flush re-compresses the last, partly filled
                          # chunk (~1 ms), and whole-table reads pay a per-chunk cost
#: Blosc2 with lz4 over byte-shuffled rows: the shuffle groups byte k of every row of a chunk,
#: so the mostly-constant columns of a structured row compress away, and it decompresses
#: at ~2.5 GB/s (lzf: ~0.6 GB/s) -- whole-table reads by check / diff are bound by this.
COMPRESSION = hdf5plugin.Blosc2(cname="lz4", clevel=5, filters=hdf5plugin.Blosc2.SHUFFLE)
#: ``/sketch_data`` is stored uncompressed (still checksummed): float16 cosines of random
#: projections are close to incompressible (lz4 keeps 74-88 % of them on the embedded models),
#: and compressing them cost ~0.8 ms per MB when a recording is closed (the file is 12 % larger
#: for the README's example recording)
SKETCH_COMPRESSION: dict = {}
_CACHE_BYTES = 4 << 20    # HDF5 chunk cache per dataset: holds a few whole chunks

STATUS_RECORDING = "recording"
STATUS_COMPLETE = "complete"
STATUS_INCOMPLETE = "incomplete"
STATUS_FAILED = "failed"

# Roles of a tensor row.
ROLE_INPUT, ROLE_KWARG, ROLE_OUTPUT = 0, 1, 2
ROLE_NAMES = {ROLE_INPUT: "input", ROLE_KWARG: "kwarg", ROLE_OUTPUT: "output"}

# Step kinds.
KIND_PREFILL, KIND_DECODE = 0, 1

# Probe payload encodings.
ENC_NONE, ENC_INT64, ENC_BITS, ENC_FLOAT64 = 0, 1, 2, 3

_shape = (np.int64, (MAX_DIMS,))

MODULE_DTYPE = np.dtype([
    ("path", np.int32),     # string id; "" is the root module
    ("cls", np.int32),      # string id of the class name
    ("depth", np.int16),
    ("parent", np.int32),   # row in /modules, -1 for the root
])

EVENT_DTYPE = np.dtype([
    ("step", np.int32),
    ("seq", np.int32),       # execution order within the step (shared with reshapes, probes)
    ("end_seq", np.int32),   # seq counter when the call returned (children lie in (seq, end_seq))
    ("module", np.int32),    # row in /modules
    ("nth", np.int32),       # nth call of this module within the step
    ("depth", np.int16),     # depth in the call stack (root call = 0)
    ("parent", np.int64),    # row in /events of the calling module, -1 for the root call
    ("tensor_start", np.int64),  # first row in /tensors
    ("tensor_count", np.int32),
    ("status", np.int8),     # 0 returned, 1 raised
    ("dur_us", np.float32),  # host wall time of the call
])

TENSOR_DTYPE = np.dtype([
    ("step", np.int32),
    ("event", np.int64),     # row in /events
    ("role", np.int8),       # ROLE_INPUT / ROLE_KWARG / ROLE_OUTPUT
    ("name", np.int32),      # string id: "args[0]", "hidden_states", "out", "out.logits", "out[0][1]"
    ("ndim", np.int8),
    ("shape", *_shape),      # padded with -1
    ("dtype", np.int32),     # string id: "float32", "bfloat16", "int64", "bool", ...
    ("device", np.int32),    # string id: "cpu", "cuda:0"
    ("numel", np.int64),
    ("min", np.float64),
    ("max", np.float64),
    ("mean", np.float64),
    ("std", np.float64),
    ("absmax", np.float64),
    ("nan", np.int64),
    ("inf", np.int64),
    ("payload", np.int32),   # dataset /payloads/<n>, -1 when not saved
])

RESHAPE_DTYPE = np.dtype([
    ("step", np.int32),
    ("seq", np.int32),
    ("event", np.int64),     # row in /events of the innermost running module, -1 if none
    ("module", np.int32),    # row in /modules, -1 if none
    ("op", np.int32),        # string id: "view", "cat", "masked_scatter", ...
    ("nth", np.int32),       # occurrence of this op within the module call
    ("n_in", np.int16),      # number of tensor inputs
    ("in_ndim", np.int8),
    ("in_shape", *_shape),   # first tensor input
    ("in_shapes", np.int32), # string id, every tensor input: "[1, 3, 4] [1, 5, 4]"
    ("in_dtypes", np.int32), # string id: "float32 bfloat16"
    ("args", np.int32),      # string id, the non-tensor arguments: "(-1, 256)", "dim=1"
    ("n_out", np.int16),     # number of tensor outputs (split/chunk give several)
    ("out_ndim", np.int8),
    ("out_shape", *_shape),  # first tensor output
    ("out_dtype", np.int32),
    ("site_file", np.int32), # user-code call site outside torch and vlmscope
    ("site_line", np.int32),
    ("site_func", np.int32),
    ("status", np.int8),     # 0 ok, 1 raised
])

PROBE_DTYPE = np.dtype([
    ("step", np.int32),
    ("seq", np.int32),
    ("event", np.int64),     # row in /events of the module that received it
    ("module", np.int32),
    ("kind", np.int32),      # string id: position_ids, cache_position, rope_deltas, attention_mask,
                             # cache, input_ids, image_grid_thw, mm_token_type_ids, merger_rows
    ("name", np.int32),      # string id: the argument name it came in under
    ("ndim", np.int8),
    ("shape", *_shape),
    ("dtype", np.int32),
    ("enc", np.int8),        # ENC_NONE / ENC_INT64 / ENC_BITS / ENC_FLOAT64
    ("data_off", np.int64),  # byte offset into /probe_data
    ("data_len", np.int64),  # byte length
    ("info", np.int32),      # string id of a small JSON object (ranges, cache layout, fill value)
])

STEP_DTYPE = np.dtype([
    ("step", np.int32),
    ("kind", np.int8),           # KIND_PREFILL / KIND_DECODE
    ("status", np.int8),         # 0 ok, 1 raised
    ("input_len", np.int32),     # token-space length of the step's input_ids / inputs_embeds
    ("q_len", np.int32),         # embedding-space length seen by the first decoder layer (-1 unknown)
    ("cache_before", np.int32),  # cache length before the step (-1 unknown / no cache)
    ("cache_after", np.int32),
    ("pos_rows", np.int8),       # 0 none, 1 for 1-D RoPE, 3 for M-RoPE
    ("pos_min", np.int64, (3,)),
    ("pos_max", np.int64, (3,)),
    ("mask_ndim", np.int8),      # 0 when no mask reached the decoder layers
    ("mask_shape", np.int64, (4,)),
    ("image_tokens", np.int32),  # image placeholder tokens in input_ids (-1 unknown)
    ("event_start", np.int64), ("event_count", np.int32),
    ("tensor_start", np.int64), ("tensor_count", np.int32),
    ("reshape_start", np.int64), ("reshape_count", np.int32),
    ("probe_start", np.int64), ("probe_count", np.int32),
    ("wall_ms", np.float64),
])

TABLES = {
    "modules": MODULE_DTYPE,
    "steps": STEP_DTYPE,
    "events": EVENT_DTYPE,
    "tensors": TENSOR_DTYPE,
    "reshapes": RESHAPE_DTYPE,
    "probes": PROBE_DTYPE,
}

#: Tables a trace may lack (older traces, synthetic ones): readers accept their absence.
#: ``sketches`` indexes the float16 ``/sketch_data`` (value sketches, :mod:`.sketch`).
OPTIONAL_TABLES = {"sketches": SKETCH_DTYPE}


class TraceError(Exception):
    """A trace file cannot be read. The message is one line, fit for a user."""


def pad_shape(shape: Iterable[int]) -> tuple[int, ...]:
    """Shape padded with -1 to MAX_DIMS entries (longer shapes are cut)."""
    s = tuple(int(d) for d in shape)[:MAX_DIMS]
    return s + (-1,) * (MAX_DIMS - len(s))


def shape_of(row: np.void, field: str = "shape", ndim_field: str = "ndim") -> tuple[int, ...]:
    """The real shape of a table row (undoing the -1 padding; an ``ndim`` outside
    ``0..MAX_DIMS`` is clamped, and the readers refuse such rows before they get here)."""
    n = int(row[ndim_field])
    return tuple(int(d) for d in row[field][: max(0, min(n, MAX_DIMS))])


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)



def _decode(s: Any) -> str:
    """A stored string as ``str``: bytes that are not UTF-8 are shown escaped (``\\xff``)."""
    if isinstance(s, bytes):
        try:
            return s.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return s.decode("utf-8", "backslashreplace")
    return str(s)



def _encode_strings(strings: list[str], start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Format-2 string storage: the UTF-8 bytes back to back, and each string's end offset
    (counted from byte ``start`` of the whole array)."""
    enc = [x.encode("utf-8", "surrogatepass") for x in strings]
    ends = start + np.cumsum([len(b) for b in enc], dtype=np.int64)
    return np.frombuffer(b"".join(enc), dtype=np.uint8), ends


def read_strings(f: h5py.File, label: Any = "", strict: bool = False) -> np.ndarray:
    """The interned strings of an open trace file, as an object array of ``str`` (index = id).
    Format 2 keeps UTF-8 bytes and end offsets; format 1 a variable-length string dataset.

    The file is untrusted: end offsets must never go back (:class:`TraceError` naming ``label``
    otherwise); offsets past the bytes are a lost tail (a crash between the two writes) and are
    dropped, unless ``strict`` (a closed trace): then the offsets must cover the bytes exactly
    and string 0 be empty. Bytes that are not UTF-8 are shown escaped (``\\xff``), never dropped."""
    ds = f["strings"]
    if "string_ends" not in f:                                  # format 1
        return np.array([_decode(x) for x in ds[:]], dtype=object)
    blob = np.empty(ds.shape, np.uint8)
    if ds.shape[0]:
        ds.read_direct(blob)
    ends = f["string_ends"][:]
    if ends.ndim != 1 or ends.dtype.kind not in "iu":
        raise TraceError(f"trace is truncated or corrupt: {label} (/string_ends is not a list of offsets)")
    ends = ends.astype(np.int64, copy=False)
    if len(ends) and (ends[0] < 0 or (np.diff(ends) < 0).any()):
        at = int(np.argmax(np.r_[ends[0] < 0, np.diff(ends) < 0]))
        raise TraceError(f"trace is truncated or corrupt: {label} (/string_ends goes backwards at string {at})")
    if strict and ((len(ends) and (ends[0] != 0 or ends[-1] != len(blob))) or (not len(ends) and len(blob))):
        raise TraceError(f"trace is truncated or corrupt: {label} (/string_ends does not cover /strings: "
                         f"{int(ends[-1]) if len(ends) else 0:,} of {len(blob):,} bytes, first string "
                         f"{int(ends[0]) if len(ends) else 0} bytes)")
    ends = ends[ends <= len(blob)]            # a crash between the two writes loses a tail only
    if len(ends) and not (blob[:ends[-1]] == 0).any():
        # no NUL byte: one NUL between strings, one decode and one split (no per-string decode);
        # a string that is not UTF-8 fails the decode and takes the per-string path below
        joined = np.insert(blob[:ends[-1]], ends[:-1], 0).tobytes()
        try:
            out = joined.decode("utf-8", "surrogatepass").split("\x00")
        except UnicodeDecodeError:
            out = None
        if out is not None and len(out) == len(ends):
            return np.array(out, dtype=object)
    raw = blob.tobytes()
    starts = np.concatenate([[0], ends[:-1]]).tolist()
    pairs = list(zip(starts, ends.tolist()))
    try:
        out = [raw[a:b].decode("utf-8", "surrogatepass") for a, b in pairs]
    except UnicodeDecodeError:                # some bytes are not UTF-8: those strings escaped
        out = [_decode(raw[a:b]) for a, b in pairs]
    return np.array(out, dtype=object)


def write_strings(f: h5py.File, strings: Iterable[str]) -> None:
    """Replace the interned strings of a trace file opened for writing (tools and tests that
    rewrite names; ids keep their positions)."""
    strings = list(strings)
    if "string_ends" not in f:                                  # format 1
        f["strings"][:] = strings
        return
    blob, ends = _encode_strings(strings)
    f["strings"].resize((len(blob),))
    if len(blob):
        f["strings"][:] = blob
    f["string_ends"].resize((len(ends),))
    f["string_ends"][:] = ends


def decode_probe(raw: np.ndarray, enc: int, shape: tuple[int, ...]) -> np.ndarray | None:
    """Probe values from their stored bytes (``ENC_INT64``, ``ENC_FLOAT64``, ``ENC_BITS``).
    Raises ``ValueError`` when the bytes do not hold exactly ``shape``'s values (a damaged row)."""
    if enc not in (ENC_INT64, ENC_FLOAT64, ENC_BITS):
        return None
    count = 1
    for d in shape:
        if d < 0:
            raise ValueError(f"invalid probe shape {tuple(shape)}")
        count *= int(d)                       # exact: Python ints do not wrap
    if len(shape) > MAX_DIMS:
        raise ValueError(f"invalid probe shape {tuple(shape)}")
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError("probe bytes are not a 1-D uint8 array")
    want = (count + 7) // 8 if enc == ENC_BITS else count * 8
    if want != len(raw):
        raise ValueError(f"probe shape {tuple(shape)} does not match its {len(raw)} bytes (encoding {enc})")
    if enc == ENC_INT64:
        return raw.view(np.int64).reshape(shape)
    if enc == ENC_FLOAT64:
        return raw.view(np.float64).reshape(shape)
    return np.unpackbits(raw, count=count).astype(bool).reshape(shape)


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return msg[0] if msg else type(e).__name__
