"""The vlmscope trace format: writer and lazy reader.

This package is the contract between recording and everything else (check, diff, snapshot,
view). It depends on h5py, hdf5plugin (the Blosc2 filter) and numpy only: importing it never
pulls in torch, textual or the analysis code. The layout is documented in
``docs/trace-format.md``.

- :mod:`.format`: version, table dtypes, encodings, string storage, :class:`TraceError`;
- :mod:`.writer`: :class:`TraceWriter` (and :class:`TraceWriteError`);
- :mod:`.journal`: the append-only journal a recording writes until it is closed;
- :mod:`.reader`: :func:`open_trace`, :class:`Trace`;
- :mod:`.notebook`: the readable reprs of a trace, a step and ``Trace.view(...)`` (pandas optional);
- :mod:`.validate`: the checks that let the reader take a trace file as untrusted input, and
  :func:`preflight` (a killable walk of the file's metadata, for files that hang HDF5).
"""

from __future__ import annotations

from .format import (
    CHUNK_BYTES, COMPRESSION, ENC_BITS, ENC_FLOAT64, ENC_INT64, ENC_NONE, EVENT_DTYPE, FORMAT_NAME, FORMAT_VERSION,
    KIND_DECODE, KIND_PREFILL, MAX_DIMS, MODULE_DTYPE, PROBE_DTYPE, RESHAPE_DTYPE, ROLE_INPUT, ROLE_KWARG,
    OPTIONAL_TABLES, ROLE_NAMES, ROLE_OUTPUT, STATUS_COMPLETE, STATUS_FAILED, STATUS_INCOMPLETE, STATUS_RECORDING, STEP_DTYPE,
    TABLES, TENSOR_DTYPE, TraceError, decode_probe, pad_shape, read_strings, shape_of, write_strings,
)
from .reader import StepView, Trace, open_same_file, open_trace
from .validate import preflight
from .writer import TraceWriteError, TraceWriter

__all__ = [
    "CHUNK_BYTES", "COMPRESSION", "ENC_BITS", "ENC_FLOAT64", "ENC_INT64", "ENC_NONE", "EVENT_DTYPE", "FORMAT_NAME",
    "FORMAT_VERSION", "KIND_DECODE", "KIND_PREFILL", "MAX_DIMS", "MODULE_DTYPE", "OPTIONAL_TABLES", "PROBE_DTYPE", "RESHAPE_DTYPE",
    "ROLE_INPUT", "ROLE_KWARG", "ROLE_NAMES", "ROLE_OUTPUT", "STATUS_COMPLETE", "STATUS_FAILED", "STATUS_INCOMPLETE",
    "STATUS_RECORDING", "STEP_DTYPE", "TABLES", "TENSOR_DTYPE", "StepView", "Trace", "TraceError", "TraceWriteError", "TraceWriter",
    "decode_probe", "open_same_file", "open_trace", "pad_shape", "preflight", "read_strings", "shape_of",
    "write_strings",
]
