"""The ``check`` rules, one module per family.

Each rule is a function ``rule(ix: TraceIndex) -> list[Violation]`` registered in
:data:`RULES` under an id ``group.name`` (``mask.length``, ``positions.continuity``, ...).
Rules read only the trace: the steps table, probes, tensors, reshapes and ``meta``
(``decoder_layers``, ``text_model``, ``num_key_value_heads``, ``image_token_id``...). They
are vectorised over table rows; Python loops run over steps or distinct values only.

Importing this package registers every rule. The family modules are imported in a fixed
order, which is the order of :data:`RULES` (what ``check`` runs, ``--list-rules`` prints,
and how violations of equal step and position are ordered): keep it.

- :mod:`.registry`: ``Rule``, the ``@rule`` decorator, ``RULES``, ``select_rules``
- :mod:`.report`: ``Violation``, ``CheckReport``
- :mod:`._common`, :mod:`._positions`, :mod:`._mrope`: helpers shared by the families
- families: :mod:`.mask`, :mod:`.positions` (and :mod:`.oracle`, ``positions.oracle``), :mod:`.cache`, :mod:`.image`, :mod:`.numbers`,
  :mod:`.dtype`, :mod:`.sequence` (sequence length and trace status)
"""

from __future__ import annotations

from .registry import RULES, Rule, rule, select_rules
from .report import ERROR, INFO, WARNING, CheckReport, Violation

# Registration order = the order of RULES. Do not sort.
from . import mask  # noqa: F401  isort: skip
from . import positions  # noqa: F401  isort: skip
from . import oracle  # noqa: F401  isort: skip
from . import cache  # noqa: F401  isort: skip
from . import image  # noqa: F401  isort: skip
from . import numbers  # noqa: F401  isort: skip
from . import dtype  # noqa: F401  isort: skip
from . import sequence  # noqa: F401  isort: skip

__all__ = ["RULES", "Rule", "rule", "select_rules", "Violation", "CheckReport", "ERROR", "WARNING", "INFO"]
