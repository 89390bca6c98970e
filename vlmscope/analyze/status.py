"""The status of an aligned node (a module call, tensor, reshape or probe) in a diff of two traces.

One vocabulary for ``vlmscope diff``, its JSON and the viewer's diff mode. The values are the
int8 codes stored in the alignment arrays.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Status(IntEnum):
    SAME = 0        # both sides agree
    SHAPE = 1       # shape or dtype differs
    DRIFT = 2       # values drift beyond tolerance (probes: the semantic values differ)
    MISSING_A = 3   # only in B
    MISSING_B = 4   # only in A

    @property
    def label(self) -> str:
        """The name used in reports and ``--json``: ``same``, ``shape``, ``drift``,
        ``missing_in_a``, ``missing_in_b``."""
        return _LABELS[self]


_LABELS = {Status.SAME: "same", Status.SHAPE: "shape", Status.DRIFT: "drift",
           Status.MISSING_A: "missing_in_a", Status.MISSING_B: "missing_in_b"}

SAME, SHAPE, DRIFT, MISSING_A, MISSING_B = (Status.SAME, Status.SHAPE, Status.DRIFT,
                                            Status.MISSING_A, Status.MISSING_B)
STATUS_NAMES = {int(s): s.label for s in Status}
#: Severity rank of each status (missing > shape > drift > same), for "worst of" reductions.
STATUS_RANK = np.array([0, 2, 1, 3, 3], np.int8)
