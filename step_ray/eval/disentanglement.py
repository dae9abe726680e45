"""How disentangled style codes are, against known generating factors: the DCI scores of Eastwood &
Williams (ICLR 2018, "A framework for the quantitative evaluation of disentangled representations").

For each factor k a gradient-boosted regression tree ensemble (scikit-learn's, as disentanglement_lib's
DCI uses) predicts the factor from the standardised codes; its feature importances give R[i, k], how much
code dimension i is used for factor k.

    disentanglement = Σ_i ρ_i (1 − H_K(P_i·)),   P_ik = R_ik / Σ_k R_ik,   ρ_i = Σ_k R_ik / Σ_ik R_ik
    completeness    = mean_k (1 − H_D(P_·k)),   P_ik = R_ik / Σ_i R_ik
    informativeness = mean_k R² of the prediction on held-out codes

H_K is the entropy in base K (the number of factors), H_D in base D (the code size): 1 is one code
dimension per factor (disentanglement) and one factor per dimension (completeness), 0 is every dimension
used equally for every factor. Informativeness says whether the codes hold the factors at all: scores of
codes that predict nothing (R² ≈ 0) are noise, and are reported as such.
"""
from __future__ import annotations

import numpy as np
from sklearn.ensemble import GradientBoostingRegressor

DCI_MIN_CODES = 10  # a domain with fewer codes has no held-out half to score


def _entropy(p: np.ndarray, base: int) -> np.ndarray:
    """Entropy of each row of p (rows sum to 1) in base `base`."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(1) / np.log(base)


def importance_matrix(codes: np.ndarray, factors: np.ndarray, seed: int = 0,
                      train_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """R [D, K] (each column: a regressor's feature importances, summing to 1 when it uses any feature) and
    the held-out R² of each factor [K]. Codes and factors are [N, D] and [N, K]; the split is random."""
    codes, factors = np.asarray(codes, np.float64), np.asarray(factors, np.float64)
    if codes.ndim != 2 or factors.ndim != 2 or len(codes) != len(factors):
        raise ValueError(f"codes [N, D] and factors [N, K] expected, got {codes.shape} and {factors.shape}")
    if len(codes) < DCI_MIN_CODES:
        raise ValueError(f"DCI needs at least {DCI_MIN_CODES} codes, got {len(codes)}")
    order = np.random.default_rng(seed).permutation(len(codes))
    cut = int(round(len(codes) * train_fraction))
    train, test = order[:cut], order[cut:]
    mean, std = codes[train].mean(0), codes[train].std(0)
    z = (codes - mean) / np.where(std > 1e-12, std, 1.0)
    importance = np.zeros((codes.shape[1], factors.shape[1]))
    r2 = np.zeros(factors.shape[1])
    for k in range(factors.shape[1]):
        y = factors[:, k]
        model = GradientBoostingRegressor(n_estimators=50, max_depth=3, random_state=seed)
        model.fit(z[train], y[train])
        importance[:, k] = np.abs(model.feature_importances_)
        residual = ((model.predict(z[test]) - y[test]) ** 2).sum()
        total = ((y[test] - y[test].mean()) ** 2).sum()
        r2[k] = 1.0 - residual / total if total > 0 else 0.0
    return importance, r2


def dci_scores(codes: np.ndarray, factors: np.ndarray, seed: int = 0) -> dict[str, float]:
    """{"disentanglement", "completeness", "informativeness"} of codes [N, D] against factors [N, K]
    (K >= 2: with one factor every code is trivially disentangled)."""
    factors = np.asarray(factors, np.float64)
    if factors.ndim != 2 or factors.shape[1] < 2:
        raise ValueError(f"DCI needs at least 2 factors, got shape {factors.shape}")
    varying = factors.std(0) > 0
    if not varying.all():
        raise ValueError(f"factors {np.flatnonzero(~varying).tolist()} do not vary: drop them")
    importance, r2 = importance_matrix(codes, factors, seed)
    dims, count = importance.shape
    row_total = importance.sum(1)
    rho = row_total / max(row_total.sum(), 1e-12)
    p_code = importance / np.where(row_total > 0, row_total, 1.0)[:, None]
    disentanglement = float((rho * (1.0 - _entropy(p_code, count))).sum())
    col_total = importance.sum(0)
    p_factor = (importance / np.where(col_total > 0, col_total, 1.0)[None, :]).T
    completeness = float(np.mean(1.0 - _entropy(p_factor, dims)))
    return {"disentanglement": disentanglement, "completeness": completeness, "informativeness": float(r2.mean())}


def dci_within_domains(codes: np.ndarray, domains: np.ndarray, factors: dict[str, np.ndarray],
                       names: tuple[str, ...], seed: int = 0) -> dict[str, float]:
    """DCI of each domain's codes against the named factors (those that vary within the domain), averaged
    over domains: the style factors a domain's images differ by, not the domain itself."""
    domains = np.asarray(domains)
    per_domain = []
    for u in np.unique(domains):
        rows = np.flatnonzero(domains == u)
        table = np.stack([np.asarray(factors[n], np.float64)[rows] for n in names], 1)
        keep = table.std(0) > 0
        if keep.sum() < 2 or len(rows) < DCI_MIN_CODES:
            continue
        per_domain.append(dci_scores(np.asarray(codes)[rows], table[:, keep], seed))
    if not per_domain:
        raise ValueError(f"no domain has {DCI_MIN_CODES} codes and 2 varying factors")
    return {key: float(np.mean([d[key] for d in per_domain])) for key in per_domain[0]}
