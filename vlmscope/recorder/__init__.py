"""Record a model's forward passes into a vlmscope trace.

``Recorder`` attaches forward pre/post hooks to every module and enters a
``TorchFunctionMode`` that logs shape-changing ops with their call sites. Each
top-level forward call of the model is a *step*. Tensor stats and probe values are
computed on the tensor's device, kept there, and copied to the host once per step
(written into one device byte array, one ``.cpu()``), so recording adds no host
synchronisation inside the forward.

The hot path is written for speed: per-class caches for argument names, per-code
caches for call sites, a per-step identity cache so a tensor passed from one module
to the next gets its stats computed once.

Modules:

- :mod:`~vlmscope.recorder.hooks`: the ``Recorder`` (hooks, step lifecycle, internal errors) and ``record()``;
- :mod:`~vlmscope.recorder.buffer`: the step buffer and its typed rows;
- :mod:`~vlmscope.recorder.stats`: stats and values queued on the device, the one copy per step;
- :mod:`~vlmscope.recorder.probes`: position ids, masks, caches, rotary, merger, root inputs/outputs;
- :mod:`~vlmscope.recorder.reshapes`: the reshape mode and call sites;
- :mod:`~vlmscope.recorder.assemble`: a finished step -> the trace's table blocks;
- :mod:`~vlmscope.recorder.structure`: the model's module table, structure and run metadata;
- :mod:`~vlmscope.recorder.inputs`, :mod:`~vlmscope.recorder.loader`: prompt/image -> inputs, ``--model`` -> model.
"""

from __future__ import annotations

from vlmscope.recorder.hooks import DEFAULT_MAX_TENSOR_BYTES, Recorder, record
from vlmscope.recorder.probes import CACHE_ARG_NAMES, INT_PROBE_NAMES, MASK_NAMES, PROBE_KIND
from vlmscope.recorder.reshapes import RESHAPE_OPS
from vlmscope.recorder.stats import dtype_name

__all__ = ["Recorder", "record", "DEFAULT_MAX_TENSOR_BYTES", "RESHAPE_OPS", "CACHE_ARG_NAMES",
           "INT_PROBE_NAMES", "MASK_NAMES", "PROBE_KIND", "dtype_name"]
