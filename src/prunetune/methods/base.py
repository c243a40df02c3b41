"""The lifecycle every training-time method shares: `Method` and `MethodContext`.

Defined in `prunetune.tuning.lifecycle` (the layer that drives them; see its docstring for the hooks and
their order) and re-exported here, where methods look for their base class.
"""

from prunetune.tuning.lifecycle import Method, MethodContext

__all__ = ["Method", "MethodContext"]
