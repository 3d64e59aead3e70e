"""``flatness bench methods``: runs end to end (tiny model) and reports every ratio; no timing
assertions here (speed targets are checked by running the benchmark itself).
"""

import json

from flatness.cli import main
from flatness.experiments.running.bench.methods import TARGETS


def test_bench_methods_quick_json_has_every_ratio(capsys):
    assert main(["bench", "methods", "--quick", "--json", "--steps", "2", "--rounds", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in (*TARGETS, "gnp_exact_ratio", "rpr_ratio", "nrs_gaussian_ratio", "plain_ms"):
        assert result[key] > 0, key
    assert isinstance(result["targets_met"], bool)


def test_bench_methods_bad_arguments_are_one_line_errors(capsys):
    assert main(["bench", "methods", "--quick", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flatness: error:") and len(err.strip().splitlines()) == 1


def test_curvature_autograd_case_is_the_curvature_methods_objective():
    """The benchmark's hand-written step must be the same computation as the method, else it compares nothing."""
    import copy

    import torch

    from flatness.experiments.running.bench import paper_mlp_setup
    from flatness.experiments.running.bench.methods import curvature_autograd_objective
    from flatness.methods import make_method

    base, loss_fn, x, y = paper_mlp_setup(16, 0, quick=True)
    base = base.double().train()
    x = x.double()
    grads = []
    for by_hand in (True, False):
        model = copy.deepcopy(base)
        torch.manual_seed(3)  # the same dropout masks in both task passes
        if by_hand:
            curvature_autograd_objective(model, x, y, alpha=0.5).backward()
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            make_method("curvature", model, loss_fn, alpha=0.5, impl="closed-form").step(x, y, opt)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    # and the penalty matters: without it the gradients differ
    model = copy.deepcopy(base)
    torch.manual_seed(3)
    curvature_autograd_objective(model, x, y, alpha=0.0).backward()
    assert not torch.allclose(torch.cat([p.grad.flatten() for p in model.parameters()]), grads[1])
