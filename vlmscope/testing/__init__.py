"""Synthetic vlmscope traces, for tests and benchmarks: made up, not recordings.

Nothing here runs a model: the traces are written by a fake forward pass, with made-up
stats, timings and call sites, through the same :class:`vlmscope.trace.TraceWriter` the
recorder uses, so they follow ``docs/trace-format.md`` and read like a recording. Use them
to test code that reads traces without torch (numpy and h5py only):

- :func:`make_trace` / :func:`cached_trace`: Qwen2-VL-shaped generate traces (a prefill
  with an image spliced in, then decode steps) from a few steps up to millions of module
  calls, with injectable faults that each break one invariant (see
  :mod:`vlmscope.testing.synth`);
- :func:`write_demo_trace`: a small tiny-qwen2.5-vl trace whose every number is fixed
  (the viewer's tests and SVG snapshots), with a ``variant="b"`` to diff against.

Same arguments, same tables, probe data, strings and meta (only the ``created`` and
``closed`` timestamps differ).
"""

from vlmscope.testing.demo import write_demo_trace
from vlmscope.testing.synth import cached_trace, make_trace

__all__ = ["make_trace", "cached_trace", "write_demo_trace"]
