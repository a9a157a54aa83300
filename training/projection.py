"""Keep an update from moving a function's outputs: project it onto the null space of the Jacobian.

The NER steps of pre-finetuning change the shared encoder, and with it the sentence embeddings
the TC view gives (docs/results.md, "The NER–TC trade-off"). A penalty on that drift
(``ner_anchor_weight``) is met by ``pf_tc`` learning to undo it. This module removes the drift
from the update instead: given the parameters ``theta``, an update ``delta`` and a function
``f(theta) -> (B, H)`` (the TC view's pooled embeddings of the step's batch), it returns the
update closest to ``delta`` that leaves ``f`` unchanged to first order::

    delta' = delta - J^T lam,    (J J^T) lam = J delta,    J = df/dtheta at theta

``J`` has B x H rows (thousands), so ``lam`` comes from a few conjugate-gradient iterations on
the normal equations, each one vector-Jacobian product (a backward pass) and one
Jacobian-vector product. The first iteration alone is the orthogonal projection of ``delta``
off ``J^T J delta``, the direction in parameter space along which ``delta`` moves ``f`` most.

The Jacobian-vector products are central finite differences of ``f`` (two forward passes with
no graph), not forward-mode autodiff: PyTorch has no forward-mode rule for the fused CPU
attention kernel (``_scaled_dot_product_flash_attention_for_cpu``), and differences work for
every architecture and attention implementation. They are taken at the update's own scale
(the perturbation's norm is ``delta``'s), where its linearisation is the one that matters: at
a step of 1e-3 x the norm of MiniLM's weights (about 4x a NER update's norm) the directions
CG picks bend enough that more iterations made the real change of ``f`` larger, not smaller
(docs/pretraining.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

Params = Mapping[str, torch.Tensor]


def _norm(tensors: Params) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors.values())))


def _axpy(a: float, x: Params, y: Params) -> dict[str, torch.Tensor]:
    """a * x + y, name by name."""
    return {n: a * x[n] + y[n] for n in y}


def jvp_fd(f: Callable[[Params], torch.Tensor], theta: Params, v: Params, step: float) -> torch.Tensor:
    """J v at ``theta`` by central differences: (f(theta + h v) - f(theta - h v)) / 2h, with
    ``h`` such that the perturbation's norm is ``step``. A zero ``v`` gives zeros."""
    if step <= 0:
        raise ValueError(f"step must be > 0, got {step}")
    vn = _norm(v)
    if vn == 0.0:
        with torch.no_grad():
            return torch.zeros_like(f(theta))
    h = step / vn
    with torch.no_grad():
        plus = f(_axpy(h, v, theta)).double()
        minus = f(_axpy(-h, v, theta)).double()
    return ((plus - minus) / (2 * h)).float()


def project_update(f: Callable[[Params], torch.Tensor], theta: Params, delta: Params, iterations: int,
                   reduce: Callable[[dict[str, torch.Tensor]], None] | None = None, fd_step: float | None = None,
                   ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``delta`` less its component that moves ``f``'s outputs at ``theta`` to first order.

    ``iterations`` conjugate-gradient steps on (J J^T) lam = J delta, from lam = 0; the result
    is ``delta - J^T lam``. ``reduce`` (optional) is applied in place to the correction
    J^T lam before it is subtracted: under data parallelism each process projects against its
    own batch and ``reduce`` averages the corrections, so every process applies the same update.
    ``fd_step``: the finite differences' step norm (default: the norm of ``delta``).

    Returns the projected update and ``{"drift_before": |J delta|, "drift_after": |J delta'|}``
    (both first order; the latter from the same JVPs, measured on this process's batch before
    ``reduce``).
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if set(delta) != set(theta):
        raise ValueError(f"delta and theta name different tensors: {sorted(set(delta) ^ set(theta))[:5]}")
    names = list(theta)
    size = _norm(delta)
    if size == 0.0:  # the same on every process: delta comes from averaged gradients
        return {n: delta[n].clone() for n in names}, {"drift_before": 0.0, "drift_after": 0.0}
    leaves = {n: theta[n].detach().requires_grad_(True) for n in names}
    out = f(leaves)  # (B, H), with a graph for the vector-Jacobian products
    step = fd_step if fd_step is not None else size  # the update's own scale, where its linearisation matters
    r = jvp_fd(f, theta, delta, step).to(out.dtype)  # J delta
    before = float(r.norm())
    correction = {n: torch.zeros_like(theta[n]) for n in names}  # J^T lam
    p = r.clone()
    rr = float((r.double() ** 2).sum())
    for i in range(iterations):
        if rr == 0.0:
            break
        grads = torch.autograd.grad(out, [leaves[n] for n in names], grad_outputs=p,
                                    retain_graph=i + 1 < iterations, allow_unused=True)
        q = {n: (g if g is not None else torch.zeros_like(theta[n])) for n, g in zip(names, grads)}  # J^T p
        qq = _norm(q) ** 2  # p . J J^T p
        if qq == 0.0:
            break
        alpha = rr / qq
        correction = _axpy(alpha, q, correction)
        r = r - alpha * jvp_fd(f, theta, q, step)  # J delta - J J^T lam
        rr_next = float((r.double() ** 2).sum())
        p = r + (rr_next / rr) * p
        rr = rr_next
    after = float(r.norm())
    if reduce is not None:
        reduce(correction)
    projected = {n: delta[n] - correction[n] for n in names}
    return projected, {"drift_before": before, "drift_after": after}
