"""How many times does BatchNorm stream its input? Ratios to the memory floor.

Normalization is memory-bound, so its cost is best read as a ratio to the
cheapest op that reads and writes the same array: a per-channel affine
`x * a + b`, jit-compiled (the floor). This script times, in one process on
the same arrays, training-mode BatchNorm forward and forward+backward:

* `bnjax`: `batchnorm_apply`, one-pass variance on shifted data;
* `two-pass`: the textbook `mean`, then `mean((x - mean)**2)` (`jnp.var`);
* `one-pass`: `E[x^2] - E[x]^2`, fast but unstable for large means;

and prints the median time of each as a multiple of the floor's, then writes
the table with device and versions to JSON.

    .venv/bin/python benchmarks/batchnorm_passes.py [--repeats 30] [--out FILE]
"""

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from timing import interleaved_medians, write_results

import bnjax

SHAPES = {"NHWC (32,56,56,64)": (32, 56, 56, 64), "NC (4096,1024)": (4096, 1024)}
EPSILON = 1e-5


def _affine(params, x):
    return x * params.scale + params.bias


def _bnjax(params, x):
    state = bnjax.batchnorm_init(x.shape[-1])[1]
    return bnjax.batchnorm_apply(params, state, x, True)[0]


def _two_pass(params, x):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    var = jnp.var(x, axes)
    return (x - mean) * jax.lax.rsqrt(var + EPSILON) * params.scale + params.bias


def _one_pass(params, x):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    var = jnp.mean(x * x, axes) - mean * mean
    return (x - mean) * jax.lax.rsqrt(var + EPSILON) * params.scale + params.bias


CANDIDATES = {"bnjax": _bnjax, "two-pass": _two_pass, "one-pass": _one_pass}


def _forward_and_backward(apply: Callable) -> Callable:
    def loss(params, x, dy):
        return jnp.vdot(apply(params, x), dy)

    return jax.grad(loss, argnums=(0, 1))


def _compile(fn: Callable, *args) -> tuple[Callable, float, float]:
    start = time.perf_counter()
    lowered = jax.jit(fn).trace(*args).lower()
    traced = time.perf_counter()
    compiled = lowered.compile()
    return compiled, traced - start, time.perf_counter() - traced


def run(repeats: int) -> list[dict]:
    rows = []
    for shape_name, shape in SHAPES.items():
        x = jax.random.normal(jax.random.key(0), shape)
        dy = jax.random.normal(jax.random.key(1), shape)
        params = bnjax.batchnorm_init(shape[-1])[0]
        for mode in ("fwd", "fwd+bwd"):
            fns, args = {"floor": _affine, **CANDIDATES}, (params, x)
            if mode == "fwd+bwd":
                fns = {name: _forward_and_backward(fn) for name, fn in fns.items()}
                args = (params, x, dy)
            compiled = {name: _compile(fn, *args) for name, fn in fns.items()}
            times = interleaved_medians({n: c[0] for n, c in compiled.items()}, args, repeats)
            for name, seconds in times.items():
                rows.append(
                    {
                        "shape": shape_name,
                        "mode": mode,
                        "impl": name,
                        "median_ms": 1e3 * seconds,
                        "ratio_to_floor": seconds / times["floor"],
                        "compile_s": compiled[name][2],
                    }
                )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default="results/batchnorm_passes.json")
    args = parser.parse_args(argv)
    rows = run(args.repeats)
    print(f"{'shape':<20} {'mode':<8} {'impl':<9} {'ms':>8} {'x floor':>8}")
    for r in rows:
        print(
            f"{r['shape']:<20} {r['mode']:<8} {r['impl']:<9} "
            f"{r['median_ms']:>8.2f} {r['ratio_to_floor']:>8.2f}"
        )
    write_results(args.out, rows, repeats=args.repeats)


if __name__ == "__main__":
    main()
