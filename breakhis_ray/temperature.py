"""Temperature scaling (Guo et al. 2017): one scalar ``T`` that divides a classifier's logits, fitted on the
validation split by minimising the negative log-likelihood. Pure numpy, no torch, no Ray.

``softmax(z / T)`` keeps every prediction's class (argmax) and only sharpens (``T < 1``) or softens (``T > 1``)
the probabilities. The NLL is convex in ``1 / T`` (a log-sum-exp minus a linear term), hence unimodal in
``log T``: a golden-section search on ``log T`` within ``bounds`` finds its minimum to ``tol`` without
derivatives. An optimum outside ``bounds`` (e.g. a perfectly separated validation set, whose NLL keeps falling
as ``T -> 0``) ends at the nearest bound.
"""

from __future__ import annotations

import math

import numpy as np

#: Search range of T: wide enough for any real classifier, bounded so a separable val set stays finite.
DEFAULT_BOUNDS = (0.05, 20.0)
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _check(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must be (N, C) with C >= 2, got shape {z.shape}")
    if len(z) != len(y):
        raise ValueError(f"{len(z)} logit rows for {len(y)} labels")
    if not len(y):
        raise ValueError("temperature scaling needs at least one validation example")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"labels must lie in 0..{z.shape[1] - 1}")
    if not np.isfinite(z).all():
        raise ValueError("logits must be finite")
    return z, y


def _nll(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
    s = z / temperature
    top = s.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(s - top).sum(axis=1))
    return float(np.mean(log_norm - s[np.arange(len(y)), y]))


def nll(logits, labels, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)`` for integer ``labels``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z, y = _check(logits, labels)
    return _nll(z, y, float(temperature))


def fit_temperature(logits, labels, bounds: tuple[float, float] = DEFAULT_BOUNDS, tol: float = 1e-7) -> float:
    """The ``T`` in ``bounds`` minimising :func:`nll` of ``logits`` (N, C) against ``labels`` (N,)."""
    lo, hi = (float(b) for b in bounds)
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    z, y = _check(logits, labels)
    a, b = math.log(lo), math.log(hi)
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = _nll(z, y, math.exp(c)), _nll(z, y, math.exp(d))
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = _nll(z, y, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = _nll(z, y, math.exp(d))
    best = math.exp((a + b) / 2.0)
    # the bounds themselves are candidates (an optimum at or beyond a bound)
    return min((lo, best, hi), key=lambda t: _nll(z, y, t))


def scale_logits(logits, temperature: float):
    """``logits / temperature`` (numpy arrays and torch tensors alike)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits / float(temperature)


__all__ = ["DEFAULT_BOUNDS", "fit_temperature", "nll", "scale_logits"]
