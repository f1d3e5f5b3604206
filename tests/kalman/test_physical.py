"""Physical models from expressions: the safe parser, the unit transform, system identification."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tsssm.errors import ConfigError
from tsssm.kalman.ct import ContinuousLinearSSM, ct_loglik, ct_sample
from tsssm.kalman.ct_fit import Segment, ct_standard_errors, derived_standard_errors, fit_ct_mle
from tsssm.kalman.expressions import parse, parse_matrix
from tsssm.kalman.physical import PhysicalModel, Units, to_standardised

SPRING = dict(A=[[0, 1], ["-k/m", "-b/m"]], B=[[0], ["1/m"]], C=[[1, 0]],
              Qc=[[0, 0], [0, "q"]], R=[["r"]], d=["y0"])


def test_expressions_evaluate_and_differentiate():
    e = parse("-k/m + 2*sqrt(k*m)**2 - exp(log(m)) + pi*0 + abs(-1)", {"k", "m"}, "key")
    assert e.names == {"k", "m"}
    k = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    m = torch.tensor(2.0, dtype=torch.float64)
    value = e({"k": k, "m": m})
    assert math.isclose(float(value.detach()), -1.5 + 12 - 2 + 1)
    (g,) = torch.autograd.grad(value, k)
    assert math.isclose(float(g), -1 / 2 + 2 * 2)  # d/dk (-k/m + 2 k m)
    assert parse(2.5, set(), "key")({}) == 2.5 and parse("3", set(), "key").is_constant


@pytest.mark.parametrize("text, what", [
    ("__import__('os').system('true')", "calling"),
    ("__import__('os')", "calling __import__"),
    ("k.real", "Attribute"),
    ("[k][0]", "Subscript"),
    ("[k, m]", "List"),
    ("lambda: 1", "Lambda"),
    ("'text'", "constant"),
    ("k if m else 1", "IfExp"),
    ("exp(x=k)", "one plain argument"),
    ("z * 2", "unknown name 'z'"),
    ("k >= 1", "Compare"),
    ("(", "cannot parse"),
])
def test_expressions_refuse_anything_but_arithmetic(text, what):
    with pytest.raises(ConfigError, match=r"model\.net\.physical\.A\[0\]\[1\]") as err:
        parse_matrix([[0, text]], {"k", "m"}, "model.net.physical.A")
    assert what in str(err.value)


def test_physical_model_builds_the_hand_written_matrices():
    model = PhysicalModel(**SPRING, params={"k": {"init": 2.0, "positive": True}, "m": 4.0,
                                            "b": {"init": 0.5}, "q": 0.1, "r": 0.01, "y0": 1.5})
    assert model.free_names == ("k", "b") and model.param_names == ("log_k", "b")
    ct = model.to_ct(model.theta0())
    assert torch.allclose(ct.A, torch.tensor([[0, 1], [-0.5, -0.125]], dtype=torch.float64))
    assert torch.allclose(ct.B, torch.tensor([[0], [0.25]], dtype=torch.float64))
    assert float(ct.d[0]) == 1.5 and float(ct.Qc[1, 1]) == 0.1
    assert model.stationary_prior  # stable: the stationary law is the prior


def test_config_mistakes_name_their_key():
    with pytest.raises(ConfigError, match=r"physical\.C has 1 rows; the data have 2 output"):
        PhysicalModel(**SPRING, params={"k": 1.0, "m": 1.0, "b": 1.0, "q": 1.0, "r": 1.0,
                                        "y0": 0.0}, n_obs=2)
    with pytest.raises(ConfigError, match="appear in no matrix"):
        PhysicalModel(**SPRING, params={"k": 1.0, "m": 1.0, "b": 1.0, "q": 1.0, "r": 1.0,
                                        "y0": 0.0, "unused": {"init": 1.0}})
    with pytest.raises(ConfigError, match=r"params\.m: positive, but its init is -1"):
        PhysicalModel(**SPRING, params={"k": 1.0, "m": {"init": -1, "positive": True},
                                        "b": 1.0, "q": 1.0, "r": 1.0, "y0": 0.0})
    with pytest.raises(ConfigError, match=r"physical\.Qc: the matrix is 2x2, expected 3x3"):
        PhysicalModel(**{**SPRING, "A": [[0, 1, 0], [0, 0, 1], [0, 0, 0]], "C": [[1, 0, 0]],
                         "B": [[0], [0], ["1/m"]]},
                      params={"k": 1.0, "m": 1.0, "b": 1.0, "q": 1.0, "r": 1.0, "y0": 0.0})


def test_standardised_model_has_the_same_likelihood_up_to_the_jacobian():
    """The physical model on raw data and its standardised form on standardised data differ
    in log-likelihood by exactly the log-Jacobian of the scaling."""
    rng = np.random.default_rng(0)
    n, p, k, T = 2, 2, 1, 60
    A = torch.tensor([[0.0, 1.0], [-0.5, -0.3]], dtype=torch.float64)
    ct = ContinuousLinearSSM(
        A, torch.tensor(rng.normal(size=(p, n))), torch.diag(torch.tensor([0.01, 0.2])).double(),
        torch.diag(torch.tensor([0.05, 0.1])).double(), torch.zeros(n, dtype=torch.float64),
        torch.eye(n, dtype=torch.float64), B=torch.tensor(rng.normal(size=(n, k))),
        D=torch.tensor(rng.normal(size=(p, k))), a=torch.tensor([0.1, 0.0], dtype=torch.float64),
        d=torch.tensor([3.0, -1.0], dtype=torch.float64))
    dt = torch.tensor(np.concatenate([[0.0], rng.choice([0.5, 1.0, 2.0], size=T - 1)]))
    u = torch.tensor(5.0 + 2.0 * rng.normal(size=(T, k)))
    _, y = ct_sample(ct, dt, u, generator=torch.Generator().manual_seed(0))
    y[7, 0] = float("nan")
    units = Units(torch.tensor([2.0, -0.5]).double(), torch.tensor([3.0, 0.25]).double(),
                  torch.tensor([4.0]).double(), torch.tensor([1.5]).double())
    yn = (y - units.y_mean) / units.y_std
    un = (u - units.u_mean) / units.u_std
    ll_raw = ct_loglik(ct, y, dt, u)
    ll_std = ct_loglik(to_standardised(ct, units), yn, dt, un)
    observed = (~torch.isnan(y)).sum(0).double()
    jacobian = (observed * units.y_std.log()).sum()
    assert abs(float(ll_std - jacobian - ll_raw)) < 1e-9 * abs(float(ll_raw))


def test_system_identification_recovers_the_spring_in_physical_units():
    g = torch.Generator().manual_seed(1)
    T = 1200
    dt = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)[torch.randint(0, 3, (T,),
                                                                           generator=g)]
    steps = torch.repeat_interleave(3 + 2 * torch.randn(T // 30 + 1, generator=g,
                                                        dtype=torch.float64), 30)
    u = steps[:T, None]  # a piecewise-constant force (setpoints)
    true = {"k": 2.0, "m": 5.0, "b": 0.7, "q": 0.01, "r": 0.0025, "y0": 1.5}
    _, y = ct_sample(PhysicalModel(**SPRING, params=true).to_ct(torch.zeros(0).double()), dt, u,
                     generator=g)
    units = Units(y.mean(0), y.std(0), u.mean(0), u.std(0))
    yn, un = (y - units.y_mean) / units.y_std, (u - units.u_mean) / units.u_std
    model = PhysicalModel(**SPRING, params={
        "k": {"init": 1.0, "positive": True}, "m": {"init": 3.0, "positive": True},
        "b": {"init": 0.3, "positive": True}, "q": {"init": 0.1, "positive": True},
        "r": {"init": 0.01, "positive": True}, "y0": {"init": 0.0}},
        derived={"k_over_m": "k/m"})
    segs = [Segment(yn, dt, un)]

    def build(th):
        return model.to_ct(th, units)

    res = fit_ct_mle(build, segs, model.theta0())
    assert res.converged
    _, cov = ct_standard_errors(build, res.theta, segs)
    est = derived_standard_errors(model.derived, res.theta, cov)
    for name in ("k", "m", "b", "y0"):
        z = abs(float(est[name].value) - true[name]) / float(est[name].se)
        assert z < 3, (name, float(est[name].value), true[name], float(est[name].se))
    z = abs(float(est["k_over_m"].value) - 0.4) / float(est["k_over_m"].se)
    assert z < 3
