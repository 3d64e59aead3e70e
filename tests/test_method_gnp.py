"""Gradient-norm penalty: the exact form matches g + ρHg/‖g‖ from a dense Hessian, and the
finite-difference form converges to it as the step r shrinks.
"""

import pytest
import torch
from torch import nn

from flatness.methods import make_method
from helpers import dense_hessian, flat_params, tiny_batch, tiny_mlp

CE = nn.CrossEntropyLoss()


def _update_direction(model, x, y, **hp):
    """The gradient the method hands to the optimizer (SGD with lr=0 leaves the weights)."""
    make_method("gnp", model, CE, **hp).step(x, y, torch.optim.SGD(model.parameters(), lr=0.0))
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _flat_grad(model, x, y):
    model.zero_grad()
    CE(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("squared", [False, True])
def test_exact_form_is_gradient_plus_rho_hessian_times_gradient(squared):
    model = tiny_mlp()
    x, y = tiny_batch()
    g = _flat_grad(model, x, y)
    hg = dense_hessian(model, x, y) @ g
    rho = 0.3
    expected = g + (2 * rho * hg if squared else rho * hg / g.norm())
    got = _update_direction(model, x, y, rho=rho, form="exact", squared=squared)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(flat_params(model), flat_params(tiny_mlp()))  # lr=0: unchanged


@pytest.mark.parametrize("squared", [False, True])
def test_finite_difference_converges_to_exact_as_the_step_shrinks(squared):
    x, y = tiny_batch()
    exact = _update_direction(tiny_mlp(), x, y, rho=0.3, form="exact", squared=squared)
    errors = []
    for r in (1e-1, 1e-2, 1e-3, 1e-4):
        fd = _update_direction(tiny_mlp(), x, y, rho=0.3, form="fd", fd_radius=r, squared=squared)
        errors.append(float((fd - exact).norm() / exact.norm()))
    assert all(b < 0.3 * a for a, b in zip(errors, errors[1:], strict=False)), errors  # O(r) convergence
    assert errors[-1] < 1e-4, errors


def test_finite_difference_replays_the_dropout_mask():
    """With dropout, fd (r → 0) still matches the exact form under the same mask."""
    x, y = tiny_batch(n=8)
    directions = []
    for form, r in (("exact", 0.1), ("fd", 1e-5)):
        model = tiny_mlp(dropout=0.5)
        torch.manual_seed(5)
        directions.append(_update_direction(model, x, y, rho=0.2, form=form, fd_radius=r))
    exact, fd = directions
    assert float((fd - exact).norm() / exact.norm()) < 1e-3


def test_finite_difference_with_rho_equal_to_r_is_sam():
    x, y = tiny_batch()
    a, b = tiny_mlp(), tiny_mlp()
    make_method("gnp", a, CE, rho=0.05, fd_radius=0.05).step(
        x, y, torch.optim.SGD(a.parameters(), lr=0.1)
    )
    make_method("sam", b, CE, rho=0.05).step(x, y, torch.optim.SGD(b.parameters(), lr=0.1))
    torch.testing.assert_close(flat_params(a), flat_params(b), rtol=1e-12, atol=1e-14)


def test_rho_zero_is_the_plain_gradient():
    x, y = tiny_batch()
    plain = _flat_grad(tiny_mlp(), x, y)
    for form in ("fd", "exact"):
        got = _update_direction(tiny_mlp(), x, y, rho=0.0, form=form)
        torch.testing.assert_close(got, plain, rtol=1e-12, atol=1e-14)
