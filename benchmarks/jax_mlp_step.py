"""A jitted JAX training step of the paper's CIFAR-100 MLP, to compare with torch's plain step.

Not part of the package and not a dependency: run it from a scratch environment.

    python3 -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install jax jaxlib
    taskset -c 0 /tmp/jaxenv/bin/python benchmarks/jax_mlp_step.py --json

against torch's plain step with the same thread count (``plain_ms``, fused Adam):

    taskset -c 0 flatness bench overhead --threads 1 --json

The step: 3072-512-256-100 MLP, ReLU, dropout 0.3 after each hidden layer (train mode), mean
cross-entropy, Adam (lr 1e-3, betas 0.9/0.999, eps 1e-8, bias correction as torch's), B = 128,
float32, synthetic N(0, 1) inputs; parameters and optimiser state are donated to the jitted
function, as a training loop would. XLA is restricted to one thread (``--threads 1``, the
default) by its flags. Reported: the median of ``--rounds`` medians of ``--steps`` steps each,
in milliseconds, timed after ``block_until_ready`` (one host synchronisation per timed block,
not per step); ``jax_step_cpu_ms`` is the same for the process's CPU time (all threads), which
moves less than wall time on a machine shared with other work (compare it with the torch
benchmark's ``plain_cpu_ms``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=10, help="timed blocks")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads == 1:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
    import jax
    import jax.numpy as jnp

    sizes = (3072, 512, 256, 100)
    key = jax.random.PRNGKey(0)
    params = []
    for d_in, d_out in zip(sizes[:-1], sizes[1:], strict=False):
        key, kw, kb = jax.random.split(key, 3)
        bound = 1.0 / d_in**0.5  # torch's default Linear initialisation
        params.append((jax.random.uniform(kw, (d_in, d_out), jnp.float32, -bound, bound),
                       jax.random.uniform(kb, (d_out,), jnp.float32, -bound, bound)))
    state = (params, jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params),
             jnp.zeros((), jnp.int32))
    key, kx, ky = jax.random.split(key, 3)
    x = jax.random.normal(kx, (args.batch, sizes[0]), jnp.float32)
    y = jax.random.randint(ky, (args.batch,), 0, sizes[-1])

    def loss_fn(params, x, y, key):
        h = x
        for i, (w, b) in enumerate(params):
            h = h @ w + b
            if i < len(params) - 1:
                h = jax.nn.relu(h)
                key, sub = jax.random.split(key)
                keep = jax.random.bernoulli(sub, 0.7, h.shape)
                h = jnp.where(keep, h / 0.7, 0.0)
        logp = jax.nn.log_softmax(h)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    def step(state, x, y, key):
        params, m, v, t = state
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y, key)
        t = t + 1
        m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, grads)
        v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, v, grads)
        c1, c2 = 1 - 0.9**t, 1 - 0.999**t
        params = jax.tree.map(
            lambda p, m, v: p - 1e-3 * (m / c1) / (jnp.sqrt(v / c2) + 1e-8), params, m, v
        )
        return (params, m, v, t), loss

    step = jax.jit(step, donate_argnums=0)
    keys = jax.random.split(key, args.steps)
    for k in keys[:3]:  # compile and warm up
        state, loss = step(state, x, y, k)
    jax.block_until_ready(state)
    medians, cpu = [], []
    for _ in range(args.rounds):
        start, start_cpu = time.perf_counter(), time.process_time()
        for k in keys:
            state, loss = step(state, x, y, k)
        jax.block_until_ready(state)
        medians.append(1000.0 * (time.perf_counter() - start) / args.steps)
        cpu.append(1000.0 * (time.process_time() - start_cpu) / args.steps)
    result = {
        "jax_step_ms": statistics.median(medians),
        "jax_step_cpu_ms": statistics.median(cpu),
        "jax": jax.__version__,
        "threads": args.threads,
        "batch": args.batch,
        "steps_per_block": args.steps,
        "blocks": args.rounds,
        "final_loss": float(loss),
    }
    print(json.dumps(result, sort_keys=True) if args.json else result)


if __name__ == "__main__":
    main()
