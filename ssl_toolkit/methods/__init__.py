"""Self-supervised methods: each wraps already-built backbone / heads and returns a loss.

A method's ``forward(view_a, view_b)`` returns the scalar training loss, ``embed(x)`` returns
backbone features for evaluation, and ``trainable_module()`` returns the module whose
``named_parameters()`` are exactly the parameters the optimizer must update.
"""

from ssl_toolkit.methods.byol import BYOL, cosine_tau
from ssl_toolkit.methods.simclr import SimCLR

__all__ = ["BYOL", "SimCLR", "cosine_tau"]
