"""Reshape capture: a ``TorchFunctionMode`` that writes a row for every shape-changing torch
call (and for any torch op that raises), with the user-code line that made it.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from vlmscope.recorder.buffer import CallSite, ReshapeRow
from vlmscope.recorder.stats import dtype_name
from vlmscope.semantics import fmt_shape

if TYPE_CHECKING:  # pragma: no cover
    from vlmscope.recorder.hooks import Recorder

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
# Call sites skip frames in torch and in the whole vlmscope package (this file is one level down).
_VLMSCOPE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_NO_SITE = CallSite(0, -1, 0, "?")
# A row's frame depth below the op's caller: site() <- begin() <- __torch_function__ <- caller.
_SITE_DEPTH = 3

_TENSOR_METHODS = (
    "view", "reshape", "view_as", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
    "permute", "transpose", "t", "movedim", "moveaxis", "swapaxes", "swapdims", "expand",
    "expand_as", "repeat", "repeat_interleave", "split", "split_with_sizes", "tensor_split",
    "chunk", "unbind", "narrow", "masked_scatter", "index_select", "unfold",
)
_TORCH_FUNCS = (
    "cat", "concat", "concatenate", "stack", "hstack", "vstack", "split", "chunk", "tensor_split",
    "unbind", "narrow", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "permute",
    "transpose", "movedim", "swapaxes", "repeat_interleave", "masked_scatter", "index_select",
    "broadcast_to",
)
# keyword arguments that are tensor inputs of an op (others are formatted into ``args``)
_TENSOR_KWARGS = ("input", "other", "source", "mask")


def _reshape_ops() -> dict[Any, str]:
    """The shape-changing torch callables we log, mapped to their op names."""
    ops: dict[Any, str] = {}
    for name in _TENSOR_METHODS:
        m = getattr(Tensor, name, None)
        if m is not None:
            ops[m] = name
    for name in _TORCH_FUNCS:
        f = getattr(torch, name, None)
        if f is not None:
            ops[f] = "cat" if name in ("concat", "concatenate") else name
    ops[torch.nn.functional.pad] = "pad"
    return ops


RESHAPE_OPS = _reshape_ops()
_GETITEM = Tensor.__getitem__


def fmt_arg(a: Any) -> str:
    """A non-tensor argument as the ``args`` column writes it."""
    if isinstance(a, torch.Size):
        return fmt_shape(a)
    if isinstance(a, (list, tuple)):
        inner = ", ".join(fmt_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, Tensor):
        return "tensor" + fmt_shape(a.shape)
    if isinstance(a, torch.dtype):
        return dtype_name(a)
    return repr(a)


def op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    return name.strip("_") if name.startswith("__") else name


def has_tensor_index(idx: Any) -> bool:
    """Advanced indexing: a tensor (index or boolean mask) anywhere in the index."""
    if isinstance(idx, Tensor):
        return True
    return isinstance(idx, tuple) and any(isinstance(i, Tensor) for i in idx)


def split_args(args: tuple, kwargs: dict) -> tuple[list[Tensor], list[str]]:
    """An op's tensor inputs, and its other arguments formatted."""
    tensors: list[Tensor] = []
    other: list[str] = []
    for a in args:
        if isinstance(a, Tensor):
            tensors.append(a)
        elif isinstance(a, (list, tuple)) and a and isinstance(a[0], Tensor):
            tensors.extend(x for x in a if isinstance(x, Tensor))
        else:
            other.append(fmt_arg(a))
    for k, a in kwargs.items():
        if isinstance(a, Tensor) and k in _TENSOR_KWARGS:
            tensors.append(a)
        else:
            other.append(f"{k}={fmt_arg(a)}")
    return tensors, other


class ReshapeCapture(TorchFunctionMode):
    """Entered by ``Recorder.start``: rows go into the recorder's current step."""

    def __init__(self, rec: "Recorder"):
        super().__init__()
        self.rec = rec
        self.w = rec._writer
        self.paths = rec._paths
        self._internal_code: dict[Any, bool] = {}          # code object -> inside torch or vlmscope
        self._site_cache: dict[tuple, CallSite] = {}       # (code, line) -> site

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        rec = self.rec
        op = RESHAPE_OPS.get(func)
        if rec._paused or rec._step is None:
            return func(*args, **kwargs)
        if op is None:
            if func is _GETITEM and len(args) > 1 and has_tensor_index(args[1]):
                op = "index"  # advanced (tensor / boolean-mask) indexing changes shapes
            else:
                try:
                    return func(*args, **kwargs)
                except Exception:  # re-raised: the user's op failed, and the trace names it
                    # Any other torch op that raises (a broadcasting add, a matmul) gets a row
                    # with status 1, so the trace names the op that failed and its inputs.
                    try:
                        self.begin(op_name(func), args, kwargs)
                    except Exception as bug:  # noqa: BLE001 - a recorder bug must not mask the user's error
                        rec._internal_error(bug)
                    raise
        # begin/end are called from here, not from a helper: site() counts the frames above it.
        try:
            row = self.begin(op, args, kwargs)
        except Exception as bug:  # noqa: BLE001 - a recorder bug must never break the user's model
            rec._internal_error(bug)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)  # if this raises, the row stays marked as raised
        try:
            self.end(row, out)
        except Exception as bug:  # noqa: BLE001 - a recorder bug must never break the user's model
            rec._internal_error(bug)
        return out

    def site(self) -> CallSite:
        """The innermost frame of the op's caller outside torch and vlmscope."""
        f = sys._getframe(_SITE_DEPTH)
        internal = self._internal_code
        while f is not None:
            code = f.f_code
            flag = internal.get(code)
            if flag is None:
                fn = code.co_filename
                flag = internal[code] = fn.startswith(_TORCH_DIR) or fn.startswith(_VLMSCOPE_DIR)
            if not flag:
                break
            f = f.f_back
        if f is None:
            return _NO_SITE
        key = (f.f_code, f.f_lineno)
        site = self._site_cache.get(key)
        if site is None:
            w, code = self.w, f.f_code
            site = self._site_cache[key] = CallSite(
                w.intern(code.co_filename), f.f_lineno,
                w.intern(code.co_qualname if hasattr(code, "co_qualname") else code.co_name),
                f"{code.co_filename}:{f.f_lineno}")
        return site

    def begin(self, op: str, args: tuple, kwargs: dict) -> ReshapeRow:
        """The op's row, marked as raised until ``end`` sees its output."""
        rec = self.rec
        rec._paused = True
        try:
            st = rec._step
            w = self.w
            tensors, other = split_args(args, kwargs)
            in_shapes = " ".join(fmt_shape(t.shape) for t in tensors)
            in_dtypes = " ".join(dtype_name(t.dtype) for t in tensors)
            ev = rec._stack[-1] if rec._stack else -1
            mod = rec._stack_mod[-1] if rec._stack_mod else -1
            op_id = w.intern(op)
            nth = st.op_nth.get((ev, op_id), 0)
            st.op_nth[(ev, op_id)] = nth + 1
            site = self.site()
            args_text = "(" + ", ".join(other) + ")" if other else ""
            row = ReshapeRow(st.seq, ev, mod, op_id, nth, len(tensors),
                             tuple(tensors[0].shape) if tensors else (),
                             w.intern(in_shapes), w.intern(in_dtypes), w.intern(args_text), site)
            st.seq += 1
            st.reshapes.append(row)
            rec._last_reshape = {"op": op, "in_shapes": in_shapes, "in_dtypes": in_dtypes, "args": args_text,
                                 "module": self.paths[mod] if mod >= 0 else None, "site": site.text,
                                 "step": st.index}
            return row
        finally:
            rec._paused = rec.broken is not None

    def end(self, row: ReshapeRow, out: Any) -> None:
        if isinstance(out, Tensor):
            row.n_out, row.out_shape, row.out_dtype = 1, tuple(out.shape), self.w.intern(dtype_name(out.dtype))
        elif isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
            row.n_out, row.out_shape = len(out), tuple(out[0].shape)
            row.out_dtype = self.w.intern(dtype_name(out[0].dtype))
        row.status = 0
