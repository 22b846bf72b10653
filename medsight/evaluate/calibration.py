"""Post-hoc calibration: logits -> probabilities whose confidence can be taken at face value.

Several methods are supported, because none is best on every model (measured in
``benchmarks/calibration``):

* ``temperature`` (Guo et al., 2017): one scalar T, ``softmax(z / T)``. It cannot
  overfit a small validation split and never changes which class ranks first, so
  AUC and argmax decisions are untouched.
* ``temperature-bias`` ("bias-corrected temperature scaling", Alexandari et al.,
  ICML 2020): ``softmax(z / T + b)`` with one bias per class (the first fixed at 0).
  The bias absorbs a mismatch between the network's implicit class priors and the
  validation split's; K parameters.
* ``vector`` scaling (Guo et al., 2017): ``softmax(a * z + b)``, one scale and one
  bias per class; 2K - 1 parameters.
* ``isotonic``: one-vs-rest isotonic regression (scikit-learn) of each class's
  temperature-1 probability, renormalised to sum to one (Zadrozny & Elkan, 2002).
  Non-parametric: it can fix any monotone miscalibration, needs more data, and can
  tie and reorder classes.

All are fitted by minimising the validation negative log-likelihood (isotonic:
squared error, as scikit-learn does). :func:`select_calibration` picks the method by
stratified K-fold cross-validation *on the validation split only*: each method is
fitted on K-1 folds and applied to the held-out fold, and the method with the lowest
top-label ECE of the pooled out-of-fold probabilities wins (ties go to the simpler
method). The test split is never looked at.

Label shift. When a site's class mix differs from the validation split's (e.g. more
pneumonia in winter), calibrated probabilities are off by the ratio of the priors.
:func:`em_prior_shift` estimates the site's priors from *unlabelled* images with the
EM algorithm of Saerens, Latinne & Decaestecker (Neural Computation, 2002) and
:func:`adjust_priors` reweights the probabilities accordingly. It corrects label shift
only; a change in how images look (covariate shift) is not label shift, and EM can
then make calibration worse (measured on brain-tumor-mri).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax
from sklearn.isotonic import IsotonicRegression
from sklearn.model_selection import StratifiedKFold

from medsight.errors import DataSetError
from medsight.models.calibration import (  # noqa: F401 (re-exported)
    CalibrationMap,
    adjust_priors,
    calibrated_probabilities,
    calibration_map,
    probabilities,
)

#: methods in order of complexity (a tie in cross-validation goes to the earlier one)
METHODS = ("temperature", "temperature-bias", "vector", "isotonic")
ECE_BINS = 15


def _nll(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, y.float())
    return F.cross_entropy(logits, y.long())


def fit_temperature(logits: np.ndarray, y: np.ndarray, multilabel: bool = False) -> tuple[float, float, float]:
    """Returns ``(temperature, nll_before, nll_after)``; LBFGS over log T on the NLL."""
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


# -- the calibration map ---------------------------------------------------------------
def _fit_affine(z: np.ndarray, y: np.ndarray, method: str) -> CalibrationMap:
    """NLL fit of ``softmax(a * z + b)`` with a = 1/T shared (temperature-bias) or per class (vector)."""
    k = z.shape[1]
    n_scale = 1 if method == "temperature-bias" else k

    def unpack(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a = np.exp(theta[:n_scale])  # log-parametrised: scales stay positive, ranking within a class is kept
        return (np.full(k, a[0]) if n_scale == 1 else a), np.r_[0.0, theta[n_scale:]]

    rows = np.arange(len(y))

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = unpack(theta)
        lp = log_softmax(z * a + b, axis=1)
        g = softmax(z * a + b, axis=1)
        g[rows, y] -= 1.0
        g /= len(y)  # d loss / d (a*z + b)
        ga = (g * z).sum(axis=0) * a  # chain rule through exp(log a)
        grad = np.r_[[ga.sum()] if n_scale == 1 else ga, g.sum(axis=0)[1:]]
        return float(-lp[rows, y].mean()), grad

    res = minimize(loss, np.zeros(n_scale + k - 1), jac=True, method="L-BFGS-B")
    a, b = unpack(res.x)
    if method == "temperature-bias":
        return CalibrationMap(method, temperature=float(1.0 / a[0]), bias=b)
    return CalibrationMap(method, scale=a, bias=b)


def _fit_isotonic(z: np.ndarray, y: np.ndarray) -> CalibrationMap:
    p = softmax(z, axis=1)
    knots = []
    for c in range(z.shape[1]):
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p[:, c], (y == c).astype(float))
        knots.append({"x": [float(v) for v in iso.X_thresholds_], "y": [float(v) for v in iso.y_thresholds_]})
    return CalibrationMap("isotonic", isotonic=knots)


def fit_calibration(logits: np.ndarray, y: np.ndarray, method: str) -> CalibrationMap:
    """Fit one method on labelled logits (binary and multi-class models)."""
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(y).astype(int)
    if z.ndim != 2 or len(z) != len(y):
        raise ValueError(f"logits {z.shape} and labels {y.shape} do not match")
    if len(y) == 0:
        raise DataSetError("cannot fit a calibration on an empty set")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise DataSetError(f"labels must be class indices 0..{z.shape[1] - 1}")
    if method == "temperature":
        return CalibrationMap("temperature", temperature=fit_temperature(z, y)[0])
    if method in ("temperature-bias", "vector"):
        return _fit_affine(z, y, method)
    if method == "isotonic":
        return _fit_isotonic(z, y)
    raise ValueError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")


def top_label_ece(probs: np.ndarray, y: np.ndarray, n_bins: int = ECE_BINS) -> float:
    from medsight.evaluate.metrics import expected_calibration_error

    return expected_calibration_error(probs.max(axis=1), probs.argmax(axis=1) == y, n_bins)


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0))))


def select_calibration(logits: np.ndarray, y: np.ndarray, methods: tuple[str, ...] = METHODS, folds: int = 5,
                       seed: int = 0) -> tuple[CalibrationMap, dict[str, Any]]:
    """Choose a method by stratified K-fold cross-validation on (validation) data; refit it on all of it.

    Criterion: top-label ECE of the pooled out-of-fold probabilities (the quantity the
    calibration target is stated in; pooling over all folds gives it the whole split's
    sample size). Each fold's NLL is reported too. Returns ``(map fitted on all data,
    {"criterion", "folds", "cv": {method: {"ece", "nll"}}, "chosen"})``.
    """
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(y).astype(int)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown calibration method(s) {unknown}; choose from {', '.join(METHODS)}")
    counts = np.bincount(y, minlength=z.shape[1])
    present = counts[counts > 0]
    if len(present) < 2:
        raise DataSetError("choosing a calibration needs cases of at least two classes")
    k = int(min(folds, present.min()))
    cv: dict[str, dict[str, float]] = {}
    if k >= 2:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        for m in methods:
            oof = np.zeros_like(z)
            for tr, te in splitter.split(z, y):
                oof[te] = fit_calibration(z[tr], y[tr], m).apply(z[te])
            cv[m] = {"ece": top_label_ece(oof, y), "nll": nll(oof, y)}
        chosen = min(methods, key=lambda m: (round(cv[m]["ece"], 4), METHODS.index(m)))
    else:  # a class with a single case: no fold split keeps it on both sides; fall back to one parameter
        chosen = "temperature" if "temperature" in methods else methods[0]
    info = {"criterion": f"top-label ECE ({ECE_BINS} bins) of pooled out-of-fold probabilities, stratified {k}-fold",
            "folds": k, "cv": cv, "chosen": chosen}
    return fit_calibration(z, y, chosen), info


# -- label shift -------------------------------------------------------------------------
def em_prior_shift(probs: np.ndarray, source_priors: np.ndarray, max_iter: int = 1000, tol: float = 1e-8) -> tuple[np.ndarray, int]:
    """Saerens et al. (2002) EM: the class priors of an unlabelled set, given calibrated posteriors.

    E-step: adjust each case's posteriors to the current prior estimate; M-step: the new
    priors are the mean adjusted posterior. Converges to the maximum-likelihood priors
    when the posteriors are calibrated for ``source_priors``. Returns (priors, iterations).
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise DataSetError("prior estimation needs the probabilities of at least one unlabelled image")
    s = np.asarray(source_priors, dtype=np.float64)
    w = s.copy()
    for it in range(1, max_iter + 1):
        new = adjust_priors(p, s, w).mean(axis=0)
        if np.abs(new - w).max() < tol:
            return new, it
        w = new
    return w, max_iter
