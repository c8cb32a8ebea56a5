"""A genre probe: multinomial logistic regression (softmax, L2 on the weights) on standardised features.

Fitted by L-BFGS (scipy) or, without scipy, full-batch gradient descent. ``fit_probe`` picks the L2
strength on the validation split (log-loss), then refits on train + val; test clips never reach it.

With a ``mask`` per row (1 for the genres the clip's own set labels), each row's softmax runs over its
set's genres only: a GTZAN "metal" clip then does not teach the head that emotify's "rock" clips are
not metal (emotify has no metal; its rock includes it). Served, the head is one softmax over all.

The anchor benchmark's floor ("frozen + linear probe") and the frozen MSD CRNN's shipped genre head
(``finetune --unfreeze none``) are both this probe.
"""

from __future__ import annotations

import numpy as np

L2_GRID = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
DEFAULT_L2 = 1e-2


# ---- the probe ----


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Probe:
    """Softmax regression over ``labels`` on standardised features."""

    def __init__(self, labels, l2: float = DEFAULT_L2):
        self.labels = list(labels)
        self.l2 = float(l2)
        self.mean = self.scale = self.W = self.b = None
        self.method = None

    def _standardise(self, X):
        return (np.asarray(X, np.float64) - self.mean) / self.scale

    def fit(self, X, y, max_iter: int = 500, mask=None) -> "Probe":
        X = np.asarray(X, np.float64)
        y = np.asarray(y, np.int64)
        n, d = X.shape
        g = len(self.labels)
        self.mean = X.mean(axis=0)
        self.scale = np.maximum(X.std(axis=0), 1e-6)
        Z = self._standardise(X)
        Y = np.zeros((n, g))
        Y[np.arange(n), y] = 1.0
        lam = self.l2
        closed = _closed(mask, n, g)

        def loss_grad(theta):
            W = theta[: d * g].reshape(d, g)
            b = theta[d * g :]
            logits = Z @ W + b + closed
            logits -= logits.max(axis=1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            loss = -np.sum(Y * logp) / n + 0.5 * lam * np.sum(W * W)
            R = (np.exp(logp) - Y) / n
            gW = Z.T @ R + lam * W
            gb = R.sum(axis=0)
            return loss, np.concatenate([gW.ravel(), gb])

        theta = np.zeros(d * g + g)
        try:
            from scipy.optimize import minimize
        except ImportError:
            minimize = None
        if minimize is not None:
            res = minimize(loss_grad, theta, jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
            theta, self.method = res.x, f"L-BFGS ({res.nit} iterations)"
        else:  # full-batch gradient descent with a backtracking step
            step, (loss, grad) = 1.0, loss_grad(theta)
            for it in range(max_iter * 10):
                new = theta - step * grad
                new_loss, new_grad = loss_grad(new)
                if new_loss <= loss - 0.5 * step * np.dot(grad, grad):
                    theta, loss, grad, step = new, new_loss, new_grad, step * 1.5
                    if np.linalg.norm(grad) < 1e-6:
                        break
                else:
                    step *= 0.5
            self.method = f"gradient descent ({it + 1} steps)"
        self.W = theta[: d * g].reshape(d, g)
        self.b = theta[d * g :]
        return self

    def predict_proba(self, X) -> np.ndarray:
        return _softmax(self._standardise(X) @ self.W + self.b)

    def log_loss(self, X, y, mask=None) -> float:
        y = np.asarray(y)
        P = _softmax(self._standardise(X) @ self.W + self.b + _closed(mask, len(y), len(self.labels)))
        return float(-np.mean(np.log(np.maximum(P[np.arange(len(y)), y], 1e-12))))


def _closed(mask, n: int, g: int):
    """Logit offsets that shut the genres a row's mask excludes out of its softmax (0 without a mask)."""
    if mask is None:
        return 0.0
    mask = np.asarray(mask)
    if mask.shape != (n, g):
        raise ValueError(f"mask must be ({n}, {g}), not {mask.shape}")
    return np.where(mask > 0, 0.0, -1e9)


def one_blas_thread():
    """A context with BLAS on one thread: on a busy machine OpenBLAS's spinning threads make these
    small products ~50x slower (threadpoolctl when installed, else no change)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def fit_probe(labels, X_train, y_train, X_val, y_val, grid=L2_GRID, mask_train=None,
              mask_val=None) -> tuple[Probe, dict]:
    """L2 strength with the lowest validation log-loss (a fit on train), then a refit on train + val.

    Without validation clips the default strength is used. Masks (per row, see ``Probe``) are given for
    both splits or neither. Returns the probe and how it was chosen.
    """
    with one_blas_thread():
        return _fit_probe(labels, X_train, y_train, X_val, y_val, grid, mask_train, mask_val)


def _fit_probe(labels, X_train, y_train, X_val, y_val, grid, mask_train=None, mask_val=None):
    X_train, X_val = np.asarray(X_train, np.float64), np.asarray(X_val, np.float64).reshape(-1, np.shape(X_train)[1])
    y_train, y_val = np.asarray(y_train, np.int64), np.asarray(y_val, np.int64)
    info = {"train": int(len(y_train)), "val": int(len(y_val)), "labels": list(labels)}
    if len(y_val) and len(y_train):
        losses = {lam: Probe(labels, lam).fit(X_train, y_train, mask=mask_train).log_loss(X_val, y_val, mask_val)
                  for lam in grid}
        l2 = min(losses, key=lambda lam: (losses[lam], -lam))
        info["val_log_loss"] = {str(k): v for k, v in losses.items()}
    else:
        l2 = DEFAULT_L2
    both = mask_train if mask_train is None or mask_val is None else \
        np.concatenate([mask_train, np.asarray(mask_val).reshape(-1, len(labels))])
    probe = Probe(labels, l2).fit(np.concatenate([X_train, X_val]), np.concatenate([y_train, y_val]), mask=both)
    info.update(l2=l2, method=probe.method)
    return probe, info
