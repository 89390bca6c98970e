"""vlmscope: a shape debugger for multimodal (vision-language) Qwen models.

The public API. Importing this package is cheap: torch is imported only when a
recording function is first used, textual only by the viewer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from vlmscope.trace import Trace, TraceError, open_trace  # noqa: E402  (h5py, hdf5plugin, numpy only)

__all__ = ["__version__", "Trace", "TraceError", "open_trace", "record", "Recorder"]

if TYPE_CHECKING:  # pragma: no cover
    from vlmscope.recorder import Recorder, record


def __getattr__(name: str) -> Any:
    # Lazy: the recorder imports torch.
    if name in ("record", "Recorder"):
        from vlmscope import recorder

        return getattr(recorder, name)
    raise AttributeError(f"module 'vlmscope' has no attribute {name!r}")
