"""Per-op knowledge: the one table of handlers (`HANDLERS`, in `compute.py`, with the layout ops
of `layout.py`), the edit vocabulary (`edits.py`) and the graph surgery every rewrite uses
(`surgery.py`)."""
from .compute import HANDLERS

__all__ = ["HANDLERS"]
