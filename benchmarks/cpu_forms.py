"""Does the XLA:CPU form of `bnjax/_src/stats_cpu.py` pay on this machine?

bnjax selects, with `jax.lax.platform_dependent`, XLA:CPU's own form of the
one-pass shifted sums (optimization barriers and a JVP rule); every other
backend gets the plain form. This times the rows that form touches on the
CPU both ways, interleaved, in two rounds (the second in reverse order) to
show the run-to-run spread, and writes the table with the CPU model to
JSON. The plain form is forced by tracing with `platform_dependent`
answering `default` inside bnjax's statistics module only.

    .venv/bin/python benchmarks/cpu_forms.py [--repeats 20] [--out results/cpu_forms.json]
"""

import argparse
import types
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from timing import cpu_model, ensure_steady_malloc, interleaved_medians, write_results

import bnjax
from bnjax._src import stats

NHWC, DENSE = (32, 56, 56, 64), (4096, 1024)


def _cases():
    """(name, shape, dtype, fn(x, scale, bias) -> y, train fwd+bwd?)."""

    def batchnorm(x, scale, bias, axis=-1):
        n = x.shape[axis]
        state = bnjax.BatchStats(jnp.zeros(n), jnp.ones(n), jnp.int32(0))
        return bnjax.batchnorm_apply(bnjax.NormParams(scale, bias), state, x, True, axis=axis)[0]

    def groupnorm(x, scale, bias):
        return bnjax.groupnorm_apply(bnjax.NormParams(scale, bias), x, num_groups=32)

    return [
        ("BN train fwd", NHWC, "float32", batchnorm, False),
        ("BN train fwd+bwd", NHWC, "float32", batchnorm, True),
        ("BN train fwd+bwd", DENSE, "float32", batchnorm, True),
        ("BN NCHW fwd+bwd", (32, 64, 56, 56), "float32", partial(batchnorm, axis=1), True),
        ("GN(32) fwd+bwd", NHWC, "float32", groupnorm, True),
        ("BN train fwd+bwd", NHWC, "bfloat16", batchnorm, True),
        ("GN(32) fwd+bwd", NHWC, "bfloat16", groupnorm, True),
    ]


FORMS = {"cpu": False, "plain": True}


def _compiled(fn, args, plain: bool):
    """`fn` jitted and compiled, with the plain form of the sums forced if `plain`."""
    # A fresh function: JAX would otherwise reuse the trace of the other form.
    jitted = jax.jit(lambda *a: fn(*a))
    if not plain:
        return jitted.lower(*args).compile()

    def platform_dependent(*a, cpu, default):
        return default(*a)

    real = stats.lax
    forced = types.SimpleNamespace(**{k: getattr(lax, k) for k in dir(lax) if k[0] != "_"})
    forced.platform_dependent = platform_dependent
    stats.lax = forced
    try:
        return jitted.lower(*args).compile()
    finally:
        stats.lax = real


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="results/cpu_forms.json")
    args = parser.parse_args(argv)
    ensure_steady_malloc(argv is None)
    rng = np.random.default_rng(0)
    rows = []
    others = ["plain"]
    print(f"{'row':<42}{'cpu forms':>10}" + "".join(f"{f + ' / cpu':>28}" for f in others))
    for name, shape, dtype, fn, backward in _cases():
        channels = shape[1] if "NCHW" in name else shape[-1]
        x = jnp.asarray(rng.normal(size=shape), dtype)
        scale, bias = (jnp.asarray(rng.normal(size=channels), jnp.float32) for _ in range(2))
        call = fn
        inputs = (x, scale, bias)
        if backward:
            g = jnp.asarray(rng.normal(size=shape), dtype)
            call = lambda x, s, b, g, fn=fn: jax.vjp(fn, x, s, b)[1](g)  # noqa: E731
            inputs = (x, scale, bias, g)
        compiled = {form: _compiled(call, inputs, steps) for form, steps in FORMS.items()}
        rounds = [
            interleaved_medians(compiled, inputs, args.repeats),
            interleaved_medians(dict(reversed(compiled.items())), inputs, args.repeats),
        ]
        ratios = {form: [r[form] / r["cpu"] for r in rounds] for form in others}
        label = f"{name} {shape} {dtype}"
        cells = "".join(f"{ratios[f][0]:>22.2f} {ratios[f][1]:>5.2f}" for f in others)
        print(f"{label:<42}{1e3 * rounds[0]['cpu']:>8.2f}ms{cells}")
        rows.append({"row": label, "cpu_ms": [1e3 * r["cpu"] for r in rounds], "over_cpu": ratios})
    write_results(args.out, rows, cpu=cpu_model(), jax=jax.__version__, repeats=args.repeats)
    print(f"wrote {args.out} ({cpu_model()})")


if __name__ == "__main__":
    main()
