"""vlmscope: a shape debugger for multimodal (vision-language) Qwen models.

The public API. Importing this package is cheap: torch is imported only when a
recording function is first used, textual only by the viewer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vlmscope._version import __version__

from vlmscope.trace import Trace, TraceError, TraceWriteError, open_trace  # noqa: E402  (h5py, hdf5plugin, numpy only)

__all__ = ["__version__", "Trace", "TraceError", "TraceWriteError", "open_trace", "record", "Recorder", "expect",
           "plot"]

if TYPE_CHECKING:  # pragma: no cover
    from vlmscope.analyze import plot
    from vlmscope.analyze.expect import expect
    from vlmscope.recorder import Recorder, record


def __getattr__(name: str) -> Any:
    # Lazy: the recorder imports torch; the analysis engine is loaded only when used.
    if name in ("record", "Recorder"):
        from vlmscope import recorder

        return getattr(recorder, name)
    if name == "expect":
        from vlmscope.analyze.expect import expect

        return expect
    if name == "plot":   # figures of a step (matplotlib, optional, imported when one is drawn)
        from vlmscope.analyze import plot

        return plot
    raise AttributeError(f"module 'vlmscope' has no attribute {name!r}")
