"""The curvature method's step by each route, in one process (a diagnostic, not a `flatness bench` figure).

    python benchmarks/curvature_paths.py [ROUNDS_OF_ROUNDS]   # default 4

On the paper's MLP (3072-512-256-100, ReLU, dropout 0.3, B = 128, fused Adam, one thread), the
median CPU time per step relative to a plain step, timed interleaved (`time_interleaved`), of:

- ``fast``: the curvature method as it runs (``alpha=0.01``, closed form): the ReLU stack's
  explicit closed form, `flatness._relu_stack_sq_norms`;
- ``generic``: the same method with that fast path turned off, i.e. the generic per-example
  engine (`flatness.per_example.ClosedForm`: autograd δ-pass and double backward);
- ``autograd``: the same step written by hand in plain autograd (`bench methods`'
  ``curvature_autograd`` case).

Each line is one set of interleaved rounds; the plain step's wall milliseconds close it.
"""

import copy
import sys

from flatness.experiments.running.bench import paper_mlp_setup, time_interleaved, training_adam
from flatness.experiments.running.bench.methods import curvature_autograd_objective
from flatness.methods import make_method


def main(repeats: int) -> None:
    base, loss_fn, x, y = paper_mlp_setup(128, 0, False, 1)

    def method_case(name, hp, generic=False):
        model = copy.deepcopy(base).train()
        opt = training_adam(model, 1e-4)
        method = make_method(name, model, loss_fn, **hp)
        if generic:
            method.term._relu_stack = lambda *args: None  # the fast path declines: the engine runs
        return lambda: method.step(x, y, opt) and None

    def autograd_case():
        model = copy.deepcopy(base).train()
        opt = training_adam(model, 1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            curvature_autograd_objective(model, x, y, 0.01).backward()
            opt.step()

        return step

    hp = {"alpha": 0.01, "impl": "closed-form"}
    cases = {
        "plain": method_case("none", {}),
        "fast": method_case("curvature", hp),
        "generic": method_case("curvature", hp, generic=True),
        "autograd": autograd_case(),
    }
    for _ in range(repeats):
        cpu: dict[str, float] = {}
        ms = time_interleaved(cases, rounds=6, reps_per_round=8, cpu_ms=cpu)
        ratios = {k: round(v / cpu["plain"], 3) for k, v in cpu.items() if k != "plain"}
        print("cpu ratio", ratios, f"plain {ms['plain']:.2f} ms")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
