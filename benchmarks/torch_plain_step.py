"""torch's plain training step of the paper's CIFAR-100 MLP alone: the other half of the JAX
comparison (`benchmarks/jax_mlp_step.py`), without the rest of `flatness bench overhead`.

    taskset -c 0 .venv/bin/python benchmarks/torch_plain_step.py        # prints one JSON line
    taskset -c 0 /tmp/jaxenv/bin/python benchmarks/jax_mlp_step.py --json

The case is `flatness bench overhead`'s ``plain``: 3072-512-256-100 MLP, ReLU, dropout 0.3,
B = 128, fused Adam (`training_adam`), one thread; the median over 10 interleaved rounds of
20 steps (``time_interleaved``). Run the two scripts alternately and compare pair by pair.
"""

from __future__ import annotations

import copy
import json

import torch

from flatness.experiments.running.bench import paper_mlp_setup, platform_facts, time_interleaved, training_adam
from flatness.methods import make_method


def main() -> None:
    base, loss_fn, x, y = paper_mlp_setup(128, 0, False, 1)
    model = copy.deepcopy(base).train()
    opt = training_adam(model, 1e-3)
    method = make_method("none", model, loss_fn)
    ms = time_interleaved({"plain": lambda: method.step(x, y, opt) and None}, rounds=10, reps_per_round=20)
    print(json.dumps({"plain_ms": ms["plain"], "threads": torch.get_num_threads(), **platform_facts()}))


if __name__ == "__main__":
    main()
