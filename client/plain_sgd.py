"""Plain stochastic gradient descent without ``torch.optim``.

Building any ``torch.optim`` optimizer, and every ``SGD.step``, imports torch's compiler
stack (``torch._dynamo``): about 2 s and 77 MB on first use. An edge client runs each round
in a fresh process, so it would pay that every round, for an update that is one ``add_`` per
parameter. ``PlainSGD`` makes exactly the update ``torch.optim.SGD(params, lr=lr)`` makes on
CPU (its single-tensor path, no momentum, no weight decay), bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class PlainSGD:
    """``param -= lr * grad`` for each parameter that has a gradient; parameters whose
    gradient is None are left alone, as ``torch.optim.SGD`` leaves them.

    Offers the part of the optimizer interface the learner uses: ``zero_grad`` and ``step``.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float) -> None:
        if lr < 0.0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        self.params = list(params)
        self.lr = float(lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients (``set_to_none``) or zero them in place, as ``torch.optim`` does."""
        for param in self.params:
            if param.grad is None:
                continue
            if set_to_none:
                param.grad = None
                continue
            if param.grad.grad_fn is not None:
                param.grad.detach_()
            else:
                param.grad.requires_grad_(False)
            param.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for param in self.params:
            if param.grad is not None:
                param.add_(param.grad, alpha=-self.lr)
