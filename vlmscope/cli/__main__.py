"""``python -m vlmscope.cli``: the same as the ``vlmscope`` command."""

from vlmscope.cli import main

main()
