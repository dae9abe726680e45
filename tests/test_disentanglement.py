import numpy as np
import pytest

from step_ray.eval.disentanglement import dci_scores, dci_within_domains


def _factors(n=400, k=4, seed=0):
    return np.random.default_rng(seed).uniform(size=(n, k))


def test_one_code_per_factor_scores_one_and_a_rotation_scores_less():
    f = _factors()
    rng = np.random.default_rng(1)
    axis = dci_scores(np.c_[f, 0.01 * rng.standard_normal((len(f), 3))], f)
    assert axis["disentanglement"] > 0.95 and axis["completeness"] > 0.95 and axis["informativeness"] > 0.95
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    mixed = dci_scores(f @ q, f)
    # the rotated codes hold the factors just as well, but each code now serves every factor
    assert mixed["informativeness"] > 0.8
    assert mixed["disentanglement"] < axis["disentanglement"] - 0.3 and mixed["completeness"] < 0.7


def test_codes_without_the_factors_are_not_informative():
    f = _factors()
    noise = dci_scores(np.random.default_rng(2).standard_normal((len(f), 8)), f)
    assert noise["informativeness"] < 0.1


def test_within_domains_scores_each_domain_on_the_factors_that_vary_there():
    f = _factors(600, 3)
    domains = np.repeat([0, 1, 2], 200)
    factors = {"a": f[:, 0], "b": f[:, 1], "c": f[:, 2], "constant": np.ones(600)}
    codes = np.c_[f, np.zeros((600, 1))]
    scores = dci_within_domains(codes, domains, factors, ("a", "b", "c", "constant"))
    assert scores["disentanglement"] > 0.9 and scores["informativeness"] > 0.9
    with pytest.raises(ValueError, match="2 varying factors"):
        dci_within_domains(codes, domains, factors, ("a", "constant"))
    with pytest.raises(ValueError, match="do not vary"):
        dci_scores(codes, np.c_[f[:, :2], np.ones(600)])
