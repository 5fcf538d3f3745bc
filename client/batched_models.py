"""K copies of one model, each with its own weights, computed as one batched model.

A round's clients train the same architecture from the same global weights on different
data. Stacking each parameter along a new leading axis (client k's weights at index k) turns
their K forward and backward passes into single batched operations: a Linear layer becomes
one ``baddbmm`` over [K, batch, features]; a Conv2d one grouped convolution, the clients' channels
side by side. Layers without weights (ReLU, max-pooling, flattening) run on all clients'
activations at once.

Layout: a Linear weight is stored transposed, [K, in, out], so that the forward product and
the fused SGD step (``fused_sgd_step``) read contiguous memory; a Linear bias as [K, 1, out],
to broadcast over the batch; a Conv2d weight and bias as they are, with K in front.
``stack`` and ``unstack`` convert; anything stacked alongside the weights (EWC's anchors and
coefficients) uses the same layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Layer = tuple[str, nn.Module]  # (qualified name, module)


def batched_layers(model: nn.Module) -> list[Layer] | None:
    """The model as a chain of layers this module can batch (``features`` then ``head``, as
    fedtide's MLP and SmallCNN are built), or None when it is anything else."""
    features, head = getattr(model, "features", None), getattr(model, "head", None)
    if not isinstance(features, nn.Sequential) or not isinstance(head, nn.Linear):
        return None
    layers = [(f"features.{i}", m) for i, m in enumerate(features)] + [("head", head)]
    for _, module in layers:
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
            return None
        if not isinstance(module, (nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten)):
            return None
        if isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) != (1, -1):
            return None
    kinds = [type(m) for _, m in layers]
    convs = [i for i, k in enumerate(kinds) if k is nn.Conv2d]
    linears = [i for i, k in enumerate(kinds) if k is nn.Linear]
    if convs and not (nn.Flatten in kinds[convs[-1]:linears[0]] and max(convs) < min(linears)):
        return None  # the convolution stage must end in a Flatten before the first Linear
    if nn.MaxPool2d in kinds and (not convs or kinds.index(nn.MaxPool2d) < convs[0]):
        return None  # pooling only inside the convolution stage
    expected = {f"{name}.{p}" for name, m in layers if isinstance(m, (nn.Linear, nn.Conv2d)) for p in ("weight", "bias")}
    if {n for n, _ in model.named_parameters()} != expected:
        return None  # a layer without bias, or parameters outside the chain
    return layers


def linear_names(layers: list[Layer]) -> set[str]:
    return {name for name, module in layers if isinstance(module, nn.Linear)}


def stack(name: str, tensors: list[torch.Tensor], linear: set[str]) -> torch.Tensor:
    """Clients' values of parameter ``name`` (or of anything shaped like it) in the stacked
    layout, a new contiguous tensor."""
    stacked = torch.stack(tensors)
    layer, kind = name.rsplit(".", 1)
    if layer in linear:
        stacked = stacked.transpose(1, 2) if kind == "weight" else stacked.unsqueeze(1)
    return stacked.contiguous()


def unstack(name: str, stacked: torch.Tensor, linear: set[str]) -> torch.Tensor:
    """One client's entry of a stacked parameter, back in the model's own layout, on the CPU."""
    layer, kind = name.rsplit(".", 1)
    if layer in linear:
        stacked = stacked.t() if kind == "weight" else stacked.squeeze(0)
    return stacked.cpu().clone(memory_format=torch.contiguous_format)  # never a view of the whole stack


def forward(layers: list[Layer], params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits [K, B, classes] of K models on their own batches x [K, B, *input shape]."""
    clients, batch = x.shape[:2]
    h = x
    grouped = False  # convolution stage: activations as [B, K * channels, H, W]
    for name, module in layers:
        if isinstance(module, nn.Conv2d):
            if not grouped:
                h = h.transpose(0, 1).reshape(batch, clients * h.shape[2], *h.shape[3:])
                grouped = True
            weight, bias = params[f"{name}.weight"], params[f"{name}.bias"]
            h = F.conv2d(h, weight.reshape(-1, *weight.shape[2:]), bias.reshape(-1), module.stride, module.padding,
                         module.dilation, groups=clients)
        elif isinstance(module, nn.Linear):
            if grouped:
                h, grouped = _ungroup(h, clients), False
            h = torch.baddbmm(params[f"{name}.bias"], h, params[f"{name}.weight"])
        elif isinstance(module, nn.ReLU):
            h = torch.relu(h)
        elif isinstance(module, nn.MaxPool2d):
            h = F.max_pool2d(h, module.kernel_size, module.stride, module.padding, module.dilation,
                             ceil_mode=module.ceil_mode)
        elif isinstance(module, nn.Flatten):
            h = _ungroup(h, clients) if grouped else h.flatten(2)
            grouped = False
    return h


def _ungroup(h: torch.Tensor, clients: int) -> torch.Tensor:
    """[B, K * C, H, W] -> [K, B, C * H * W]."""
    return h.reshape(h.shape[0], clients, -1).transpose(0, 1)


def fusable(layers: list[Layer]) -> bool:
    """Flatten, then Linear layers with a ReLU after each but the last: ``fused_sgd_step``'s model."""
    kinds = [type(m) for _, m in layers]
    if not kinds or kinds[0] is not nn.Flatten or kinds[-1] is not nn.Linear:
        return False
    body = kinds[1:-1]
    return len(body) % 2 == 0 and all(
        (a, b) == (nn.Linear, nn.ReLU) for a, b in zip(body[::2], body[1::2])
    )


def fused_sgd_step(
    weights: list[torch.Tensor], biases: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
    row_weight: torch.Tensor, lr: float, logit_terms=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step of K MLPs (``fusable``) on the cross-entropy of their own batches
    x [K, B, features], y [K, B], each sample weighted by ``row_weight`` [K, B] (1 / the
    client's batch size for its samples, 0 for padding), plus the terms on the logits alone
    (``client.batched_loss.LogitTerms``: ER-ACE's masked classes, DER's matched logits);
    returns (logits, per-client loss).

    The backward pass is written out, because it can update each weight in the same
    product that computes its gradient: ``W.baddbmm_(a^T, g, alpha=-lr)`` reads and writes
    W once, where autograd writes a gradient, reads it back and then updates W (the step
    is ~25% faster). The maths is that of autograd: for logits z = a W + b and
    L = sum_i w_i CE(z_i, y_i), dL/dz = w (softmax(z) - onehot(y)); dL/dW = a^T dL/dz;
    dL/db = sum_B dL/dz; dL/da = dL/dz W^T, masked where the ReLU was off. A class masked
    out of a row's cross-entropy (ER-ACE) has softmax 0 there, so no gradient; DER's
    s * (z - t)^2 adds 2 s (z - t) to dL/dz."""
    inputs = [x]
    h = x
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = torch.baddbmm(b, h, w)
        if i < len(weights) - 1:
            h.clamp_(min=0)
            inputs.append(h)
    logits = h
    log_p = torch.log_softmax(logits if logit_terms is None else logit_terms.masked(logits), dim=-1)
    loss = -(log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1) * row_weight).sum(1)
    grad = log_p.exp_()
    grad.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(grad[..., :1], -1.0))
    grad.mul_(row_weight.unsqueeze(-1))
    difference = None if logit_terms is None else logit_terms.difference(logits)
    if difference is not None:
        scale = logit_terms.scale.unsqueeze(-1)
        loss = loss + (scale * difference**2).sum((1, 2))
        grad.add_(difference.mul_(scale), alpha=2.0)
    for i in reversed(range(len(weights))):
        a = inputs[i]
        below = torch.bmm(grad, weights[i].transpose(1, 2)).mul_(a > 0) if i > 0 else None  # with W before its step
        weights[i].baddbmm_(a.transpose(1, 2), grad, alpha=-lr)
        biases[i].sub_(grad.sum(1, keepdim=True), alpha=lr)
        grad = below
    return logits, loss
