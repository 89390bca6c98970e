"""The step buffer: one step's rows, typed, from the first hook of a step until it is written.

Rows are built on the hot path (a row per module call, tensor, reshape and probe), so they
are slotted dataclasses constructed positionally, in field order; everything else reads them
by field name. String fields hold ids already interned in the trace writer.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, NamedTuple, Sequence

import numpy as np


#: Where a tensor's stats wait in the step's device blob: ``(byte offset, width)``, the width
#: being 4 float64 values (min, max, sum, L2 norm) or 6 (and the NaN and Inf counts), or, for a
#: sketched tensor whose stats come from its sketch chunk, -2 (``(-2, -2)``: no bytes of its own)
#: or -4 (the NaN and Inf counts, int64, at the offset); the offset is -1 when no stats were queued. A plain pair, unpacked where it is read: one is
#: built per tensor on the hot path, where a NamedTuple costs several times more.
StatSlot = tuple[int, int]
NO_STATS: StatSlot = (-1, 0)


class CallSite(NamedTuple):
    """The user-code frame a reshape was called from (one per code object and line)."""

    file: int   # string id
    line: int
    func: int   # string id
    text: str   # "file:line", for the error record


class QueuedValues(NamedTuple):
    """A probe tensor's values already queued in this step (stored once, referenced by rows)."""

    off: int
    nbytes: int
    ref: weakref.ref
    stat_off: int  # masks: byte offset of the mask's stats (its minimum is the fill value); float
                   # values: bytes per queued value (4 or 8); else -1


@dataclass(slots=True)
class EventRow:
    """A module call."""

    seq: int
    module: int
    nth: int
    depth: int
    parent: int          # step-local event index of the calling module, -1 for the root call
    t0: float            # perf_counter() at entry
    pending: list        # this call's TensorRows until it returns (then moved into the step)
    end_seq: int = -1    # -1 while the call runs
    tensor_start: int = 0
    tensor_count: int = 0
    status: int = 0      # 0 returned, 1 raised
    dur_us: float = 0.0  # set when the call returns


@dataclass(slots=True)
class TensorRow:
    """A tensor a module call received or returned."""

    event: int       # step-local event index
    role: int        # T.ROLE_*
    name: int
    ndim: int
    shape: tuple
    dtype: int
    device: int
    numel: int
    stats: StatSlot  # (byte offset, width) in the device blob
    payload: int     # step-local payload request index, -1 when not saved
    sketch: int = -1  # index in the step's ``sketch_rows``, -1 when not sketched


@dataclass(slots=True)
class ReshapeRow:
    """A shape-changing torch call (or any op that raised)."""

    seq: int
    event: int       # step-local event index of the innermost running module, -1 for none
    module: int
    op: int
    nth: int
    n_in: int
    in_shape: tuple  # the first tensor input's
    in_shapes: int
    in_dtypes: int
    args: int
    site: CallSite
    n_out: int = 0
    out_shape: tuple = ()
    out_dtype: int = 0
    status: int = 1  # stays 1 when the op raised


@dataclass(slots=True)
class ProbeRow:
    """A semantic value a module received; its derived info is completed at the end of the step."""

    seq: int
    event: int
    module: int
    kind: int
    name: int
    shape: tuple
    dtype: int
    enc: int                  # T.ENC_*
    off: int                  # byte offset of the values in the step's device blob, -1 if not there
    nbytes: int
    info: dict | None
    derive: str | None = None  # which end-of-step derivation applies: the kind of an int or mask
                               # probe ("position_ids", "input_ids", "attention_mask", ...) or "rope"
    host: np.ndarray | None = None  # values known on the host already (a cache's per-layer lengths)
    stat_off: int = -1         # masks: where the mask's stats are in the device blob
    width: int = 8             # ENC_FLOAT64 values: bytes per value as queued (4: float32, widened on the host)


@dataclass(slots=True)
class PayloadRequest:
    """A full tensor to store under /payloads once the step's bytes are on the host."""

    off: int
    nbytes: int
    dtype: str          # numpy dtype name of the queued bytes
    shape: tuple
    module: str         # module path
    name: str
    orig_dtype: str     # the tensor's own dtype (bfloat16 is queued as float32)


@dataclass(slots=True)
class StepBuffer:
    """Everything recorded in one step: host rows, and device tensors awaiting the one copy."""

    index: int
    events: list[EventRow] = field(default_factory=list)
    tensors: list[TensorRow] = field(default_factory=list)
    reshapes: list[ReshapeRow] = field(default_factory=list)
    probes: list[ProbeRow] = field(default_factory=list)
    payloads: list[PayloadRequest] = field(default_factory=list)
    device_chunks: list = field(default_factory=list)  # uint8 tensors, concatenated once per step
    device_bytes: int = 0
    # the identity cache: (id, version) -> (weak reference to the tensor, its StatSlot)
    stat_dedupe: dict[tuple, tuple[weakref.ref, StatSlot]] = field(default_factory=dict)
    probe_cache: dict[tuple, QueuedValues] = field(default_factory=dict)
    # value sketches, kept apart from device_chunks and joined once per step (copy_to_host):
    # each sketch's [N, K + 1] float32 projections and sums, [N, 1] norms, min and max (0-d
    # float32 tensors; Python floats for a CPU tensor, whose values are on the host), its token
    # count, and the identity cache (id, version) -> (weak reference, index in sketch_rows, the
    # values per token asked for: 0 for the default)
    sketch_proj: list = field(default_factory=list)
    sketch_norms: list = field(default_factory=list)
    sketch_min: list = field(default_factory=list)
    sketch_max: list = field(default_factory=list)
    sketch_rows: list[int] = field(default_factory=list)
    sketch_dedupe: dict[tuple, tuple[weakref.ref, int, int]] = field(default_factory=dict)
    nth: dict[int, int] = field(default_factory=dict)              # module id -> calls so far
    op_nth: dict[tuple[int, int], int] = field(default_factory=dict)  # (event, op) -> calls so far
    seq: int = 0             # execution-order counter shared by events, reshapes and probes
    t0: float = field(default_factory=time.perf_counter)
    input_len: int = -1
    cache_before: int = -1
    cache_after: int = -1
    root_cache: Any = None   # the cache object the root forward received
    failed: bool = False
    first_layer_q: int = -1  # sequence length of the hidden states entering decoder layer 0
    mask_shape: tuple | None = None  # the first attention mask seen inside the decoder layers
    image_tokens: int = -1
    root_ev: int = -1
    kind: int = -1           # T.KIND_PREFILL / T.KIND_DECODE, decided when the step ends
    text_ev: int = -1        # the text model's (first) call in this step
    owner_ev: int = -1       # the call of the module that keeps ``rope_deltas`` (its last one)
    embeds_seen: bool = False  # the text model's input embeddings got their token norms
    padding_side: str | None = None  # "left"/"right" from the root's 2-D mask (None: no padding seen)
    batch_size: int = -1     # rows of the root's input_ids / inputs_embeds
    root_ids: tuple[int, int] | None = None   # (offset, nbytes) of the root's input_ids in the blob
    root_mask: tuple[int, int, tuple] | None = None  # (offset, nbytes, shape) of the root's 2-D mask bits
    merger_out: Any = None   # weak reference to the merger's last output
    video_grids: dict = field(default_factory=dict)  # (id, version) -> weakref: video_grid_thw tensors

    def flush_tensors(self, row: EventRow) -> None:
        """Move a call's tensor rows (inputs, kwargs, outputs) into the step, contiguously."""
        row.tensor_start = len(self.tensors)
        row.tensor_count = len(row.pending)
        self.tensors.extend(row.pending)
        row.pending = []


def columns(rows: Sequence[Any], *names: str) -> tuple[tuple, ...]:
    """The named fields of ``rows``, one tuple per name (empty tuples when there are no rows)."""
    if len(names) == 1:  # attrgetter of one name yields bare values, not 1-tuples
        return (tuple(map(attrgetter(names[0]), rows)),)
    cols = tuple(zip(*map(attrgetter(*names), rows)))
    return cols if cols else tuple(() for _ in names)
