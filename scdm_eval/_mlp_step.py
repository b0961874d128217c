"""Training steps of a Linear/ReLU stack in buffers allocated once per fit (torch, no autograd).

An autograd step of a d-512-512-2 network allocates a dozen activation and gradient tensors
of 0.25-1 MB and frees them again, and the C heap keeps what they fragment: one fit on 18k x
512 cells (1 thread) grew to 27 MB resident over three epochs for the 10.5 MB it holds
(parameters, gradients, AdamW moments, the best epoch). Here every activation, gradient and
input batch lives in a buffer made when the fit starts and a step allocates only the
``batch x 2`` loss gradient: the same fit stays at 17 MB, and the 20k-cell pooled MLP grid
(two fits at once) peaks at 1.97x its slice instead of 2.82x (bench/bench_eval.py). The
gradients are autograd's (a contract test compares them) and :class:`torch.optim.AdamW`
steps on them as before.
"""

from __future__ import annotations

import numpy as np


class StackStep:
    """Forward/backward of ``net`` (``nn.Sequential`` of ``Linear``, ``ReLU``, ..., ``Linear``) on batches of
    at most ``rows`` cells, into buffers allocated here; gradients land in the parameters' ``.grad``.

    ``loss``: ``"ce"`` (softmax cross-entropy, mean over cells) or ``"bce"`` (BCE-with-logits on
    one-hot targets, mean over the ``2 x cells`` terms), as :meth:`MLPClassifier._loss`.
    ``train=False``: forward buffers only (prediction), the parameters' ``.grad`` untouched.
    The forward is ``net``'s own (``addmm`` + ``clamp_min``, as ``F.linear`` + ``relu``): the same numbers.
    """

    def __init__(self, net, rows: int, loss: str, device, *, train: bool = True) -> None:
        import torch
        from torch import nn

        mods = list(net)
        self.lin = [m for m in mods if isinstance(m, nn.Linear)]
        want = [nn.Linear if i % 2 == 0 else nn.ReLU for i in range(2 * len(self.lin) - 1)]
        if [type(m) for m in mods] != want:
            raise TypeError("StackStep takes Linear, ReLU, ..., Linear")
        self.loss = loss
        dims = [self.lin[0].in_features] + [m.out_features for m in self.lin]
        self.x = torch.empty(rows, dims[0], device=device)  # the (scaled) input batch
        self.x_host = self.x.numpy() if device.type == "cpu" else np.empty((rows, dims[0]), np.float32)
        self.out = [torch.empty(rows, d, device=device) for d in dims[1:]]  # each layer's output (after ReLU)
        self.hidden = len(dims) - 2
        if not train:
            return
        self.grad = [torch.empty(rows, d, device=device) for d in dims[1:-1]]  # d loss / d hidden pre-activation
        self.dead = [torch.empty(rows, d, dtype=torch.bool, device=device) for d in dims[1:-1]]  # ReLU off
        for m in self.lin:
            m.weight.grad, m.bias.grad = torch.zeros_like(m.weight), torch.zeros_like(m.bias)

    def load(self, X: np.ndarray, rows: np.ndarray, mean, scale) -> int:
        """Gather rows ``rows`` of ``X`` into the input buffer (scaled by ``mean``/``scale`` unless None); their count."""
        import torch

        n = len(rows)
        host = self.x_host[:n]
        if isinstance(X, np.ndarray) and X.dtype == np.float32:
            # mode="clip": numpy buffers ``out`` under the default "raise" (a temporary per batch);
            # the rows were checked against X once (``_check_xy``) and predictions pass ranges
            np.take(X, rows, axis=0, out=host, mode="clip")
        else:
            host[:] = X[rows]
        x = self.x[:n]
        if self.x.device.type != "cpu":  # on the CPU ``x_host`` is ``x`` itself
            x.copy_(torch.from_numpy(host))
        if mean is not None:
            x.sub_(mean).div_(scale)
        return n

    def forward(self, n: int):
        """Logits of the ``n`` loaded cells (a view of a buffer: valid until the next call)."""
        import torch

        h = self.x[:n]
        for i, m in enumerate(self.lin):
            out = self.out[i][:n]
            torch.addmm(m.bias, h, m.weight.t(), out=out)
            if i < self.hidden:
                out.clamp_min_(0.0)
            h = out
        return h

    def backward(self, n: int, target) -> None:
        """Gradients of the loss of the ``n`` cells just forwarded (labels ``target``) into each ``.grad``."""
        import torch

        z = self.out[-1][:n]
        if self.loss == "bce":
            g = (torch.sigmoid(z) - torch.nn.functional.one_hot(target, 2).to(z.dtype)) / (2 * n)
        else:
            g = torch.softmax(z, dim=1)
            g[torch.arange(n, device=z.device), target] -= 1.0
            g /= n
        for i in range(len(self.lin) - 1, -1, -1):
            m = self.lin[i]
            h = self.out[i - 1][:n] if i else self.x[:n]
            torch.mm(g.t(), h, out=m.weight.grad)
            torch.sum(g, dim=0, out=m.bias.grad)
            if i:
                below = self.grad[i - 1][:n]
                torch.mm(g, m.weight, out=below)
                torch.le(h, 0.0, out=self.dead[i - 1][:n])  # ReLU output 0: no gradient through it
                below.masked_fill_(self.dead[i - 1][:n], 0.0)
                g = below
