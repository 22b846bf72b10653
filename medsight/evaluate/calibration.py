"""Temperature scaling (Guo et al., 2017): one scalar T fitted on validation logits.

It is fitted here by minimising the validation negative log-likelihood with
LBFGS over log T. A single parameter cannot overfit a small validation split and
it never changes which class ranks first, so accuracy and AUC are untouched.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _nll(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, y.float())
    return F.cross_entropy(logits, y.long())


def fit_temperature(logits: np.ndarray, y: np.ndarray, multilabel: bool = False) -> tuple[float, float, float]:
    """Returns ``(temperature, nll_before, nll_after)``."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    t = torch.as_tensor(y)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _nll(z / log_t.exp(), t, multilabel)
        loss.backward()
        return loss

    with torch.no_grad():
        before = float(_nll(z, t, multilabel))
    opt.step(closure)
    temp = float(log_t.detach().exp().clamp(0.05, 20.0))
    with torch.no_grad():
        after = float(_nll(z / temp, t, multilabel))
    if after > before:  # never make calibration worse than leaving logits alone
        return 1.0, before, before
    return temp, before, after


def probabilities(logits: np.ndarray, temperature: float = 1.0, multilabel: bool = False) -> np.ndarray:
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64) / temperature
    p = torch.sigmoid(z) if multilabel else torch.softmax(z, dim=1)
    return p.numpy()
