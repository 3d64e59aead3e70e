"""Where the curvature method's extra time goes, in one process (a diagnostic, not a `flatness bench` figure).

    python benchmarks/curvature_parts.py [ROUNDS_OF_ROUNDS]   # default 3

On the paper's MLP (3072-512-256-100, ReLU, dropout 0.3, B = 128, one thread), the median CPU
milliseconds per call, timed interleaved (`time_interleaved`), of:

- ``function``: the explicit closed form as a step runs it, `relu_stack_sq_norms(...).mean()`
  and its backward (autograd's Function node, the engine, gradient accumulation included);
- ``bodies``: the same forward and backward arithmetic called directly, without autograd (the
  Function's static methods with a stand-in context);
- ``products``: the twelve matrix products of those bodies alone, on operands of the same shapes
  (``bench methods``' ``curvature_products`` case: the floor of the formulation).

``bodies - products`` is the elementwise work (softmax, ReLU masks, norms and their adjoints);
``function - bodies`` is what the autograd Function and engine add. Each line is one set of
interleaved rounds; the plain method step's CPU milliseconds close it, to scale the parts.
"""

import copy
import sys

import torch

from flatness._relu_stack_sq_norms import _ReluStackSqNorms, relu_stack_layers, relu_stack_sq_norms
from flatness.experiments.running.bench import paper_mlp_setup, time_interleaved, training_adam
from flatness.experiments.running.bench.methods import _curvature_products
from flatness.methods import make_method


class _Context:
    """The part of autograd's context the Function's static methods use."""

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        self.saved_tensors = tensors


def main(repeats: int) -> None:
    base, loss_fn, x, y = paper_mlp_setup(128, 0, False, 1)
    model = copy.deepcopy(base).train()
    layers = relu_stack_layers(model, 2, loss_fn)
    shared = model[1](model[0](x)).detach().requires_grad_()
    params = [t.detach() for m in layers[1:] for t in (m.weight, m.bias)]
    input_sq = x.square().sum(dim=1) + 1
    mean_grad = torch.full((x.shape[0],), 1.0 / x.shape[0])

    def function() -> None:
        relu_stack_sq_norms(layers, x, shared, y).mean().backward()

    def bodies() -> None:
        ctx = _Context()
        _ReluStackSqNorms.forward(ctx, shared.detach(), input_sq, y, -100, *params)
        _ReluStackSqNorms.backward(ctx, mean_grad)

    plain_model = copy.deepcopy(base).train()
    opt = training_adam(plain_model, 1e-4)
    plain = make_method("none", plain_model, loss_fn)
    cases = {"function": function, "bodies": bodies, "products": _curvature_products(base, 128, 0),
             "plain_step": lambda: plain.step(x, y, opt) and None}
    for _ in range(repeats):
        cpu: dict[str, float] = {}
        time_interleaved(cases, rounds=5, reps_per_round=20, cpu_ms=cpu)
        parts = {
            "products": cpu["products"],
            "elementwise (bodies - products)": cpu["bodies"] - cpu["products"],
            "autograd Function (function - bodies)": cpu["function"] - cpu["bodies"],
        }
        line = ", ".join(f"{k} {v:.2f} ms ({v / cpu['plain_step']:.3f})" for k, v in parts.items())
        print(f"{line}; plain step {cpu['plain_step']:.2f} ms", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
