"""What does synchronizing BatchNorm across devices cost per training step?

On N simulated CPU devices (or real ones), times a jitted `shard_map`
training step of BatchNorm (forward and backward of a scalar loss) with the
statistics synchronized (`axis_name="data"`) and per device (no
`axis_name`), interleaved, and prints the median step times and their ratio.
Writes the table with device and versions to JSON.

    .venv/bin/python benchmarks/sync_overhead.py [--devices 8] [--repeats 50]
"""

import argparse
import os
import sys


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default="results/sync_overhead.json")
    args = parser.parse_args(argv)
    if "jax" in sys.modules:
        raise RuntimeError("run as a script: --devices must be set before JAX starts")
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from timing import interleaved_medians, write_results

    import bnjax

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    shapes = {
        "(N,16,16,64)": (4 * jax.device_count(), 16, 16, 64),
        "(N,256)": (64 * jax.device_count(), 256),
    }

    def make_step(axis_name):
        """One training step's BatchNorm work: forward, backward, new state."""

        def per_device(params, state, x, dy):
            def loss(p):
                y, new_state = bnjax.batchnorm_apply(p, state, x, True, axis_name=axis_name)
                return jnp.vdot(y, dy), new_state

            (_, new_state), grads = jax.value_and_grad(loss, has_aux=True)(params)
            # Data parallelism sums the parameter gradients in both variants;
            # per-device statistics leave each device its own running state.
            return jax.lax.psum(grads, "data"), new_state

        return jax.jit(
            jax.shard_map(
                per_device,
                mesh=mesh,
                in_specs=(P(), P(), P("data"), P("data")),
                out_specs=(P(), P()),
                check_vma=False,
            )
        )

    rows = []
    for shape_name, shape in shapes.items():
        params, state = bnjax.batchnorm_init(shape[-1])
        split = NamedSharding(mesh, P("data"))
        x = jax.device_put(jax.random.normal(jax.random.key(0), shape), split)
        dy = jax.device_put(jax.random.normal(jax.random.key(1), shape), split)

        steps = {"per-device": make_step(None), "synchronized": make_step("data")}
        medians = interleaved_medians(steps, (params, state, x, dy), args.repeats)
        for name, seconds in medians.items():
            rows.append(
                {
                    "shape": shape_name,
                    "global_shape": list(shape),
                    "statistics": name,
                    "median_ms": 1e3 * seconds,
                    "ratio_to_per_device": seconds / medians["per-device"],
                }
            )

    print(f"{jax.device_count()} devices ({jax.devices()[0].platform})")
    print(f"{'shape':<14} {'statistics':<13} {'ms/step':>8} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['shape']:<14} {r['statistics']:<13} "
            f"{r['median_ms']:>8.3f} {r['ratio_to_per_device']:>6.2f}"
        )
    write_results(args.out, rows, repeats=args.repeats)


if __name__ == "__main__":
    main()
