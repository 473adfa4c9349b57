"""What does synchronizing BatchNorm across devices cost per training step, and what does it send?

For each number of simulated CPU devices (default 2, 4 and 8, each in a
process of its own: the count is fixed when JAX starts), times a jitted
`shard_map` training step of BatchNorm (forward and backward of a scalar
loss, the parameter gradients summed over the devices as data parallelism
does) with the statistics synchronized (`axis_name="data"`) and per device
(no `axis_name`), interleaved, with the same batch per device at every
count. It also reads the all-reduces of each compiled step from its
optimized HLO: how many, and their payload per device in bytes. The
synchronized step's extra payload is BatchNorm's own, and it should not
grow with the number of devices. Prints the table and writes it, with the
CPU and versions, to JSON.

    .venv/bin/python benchmarks/sync_overhead.py [--devices 2,4,8] [--repeats 50]
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

# Per device: 4 images of 16 x 16 x 64, or 64 rows of 256 features.
PER_DEVICE_SHAPES = {"(N,16,16,64)": (4, 16, 16, 64), "(N,256)": (64, 256)}
_DTYPE_BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1}


def all_reduce_payload(hlo_text: str) -> tuple[int, int]:
    """(number of all-reduces, bytes they carry per device) in an optimized HLO module."""
    count = payload = 0
    for line in hlo_text.splitlines():
        match = re.search(r"=\s*(.*?)\s+all-reduce(?:-start)?\(", line)
        if match is None:
            continue
        count += 1
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)):
            size = 1
            for d in filter(None, dims.split(",")):
                size *= int(d)
            payload += size * _DTYPE_BYTES[dtype]
    return count, payload


def measure(devices: int, repeats: int) -> list[dict]:
    """The rows of one device count; JAX must not have started yet."""
    flag = f"--xla_force_host_platform_device_count={devices}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from timing import interleaved_medians

    import bnjax

    assert jax.device_count() == devices, jax.devices()
    mesh = jax.make_mesh((devices,), ("data",))

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
    for shape_name, per_device_shape in PER_DEVICE_SHAPES.items():
        shape = (devices * per_device_shape[0], *per_device_shape[1:])
        params, state = bnjax.batchnorm_init(shape[-1])
        split = NamedSharding(mesh, P("data"))
        x = jax.device_put(jax.random.normal(jax.random.key(0), shape), split)
        dy = jax.device_put(jax.random.normal(jax.random.key(1), shape), split)
        args = (params, state, x, dy)

        steps = {"per-device": make_step(None), "synchronized": make_step("data")}
        medians = interleaved_medians(steps, args, repeats)
        for name, step in steps.items():
            all_reduces, payload = all_reduce_payload(step.lower(*args).compile().as_text())
            rows.append(
                {
                    "devices": devices,
                    "shape": shape_name,
                    "global_shape": list(shape),
                    "statistics": name,
                    "median_ms": 1e3 * medians[name],
                    "ratio_to_per_device": medians[name] / medians["per-device"],
                    "all_reduces": all_reduces,
                    "payload_bytes": payload,
                }
            )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="2,4,8", help="simulated CPU device counts")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default="results/sync_overhead.json")
    parser.add_argument("--rows-to", help=argparse.SUPPRESS)  # one count, in a child process
    args = parser.parse_args(argv)
    if "jax" in sys.modules:
        raise RuntimeError("run as a script: the device count must be set before JAX starts")
    counts = [int(n) for n in args.devices.split(",")]
    if args.rows_to:
        (devices,) = counts
        with open(args.rows_to, "w") as f:
            json.dump(measure(devices, args.repeats), f)
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for devices in counts:
            rows_file = os.path.join(tmp, f"{devices}.json")
            command = [sys.executable, __file__, "--devices", str(devices)]
            command += ["--repeats", str(args.repeats), "--rows-to", rows_file]
            subprocess.run(command, check=True)
            with open(rows_file) as f:
                rows += json.load(f)

    from timing import cpu_model, write_results

    print(
        f"{'devices':>7}  {'shape':<14} {'statistics':<13} {'ms/step':>8} {'ratio':>6} "
        f"{'all-reduces':>11} {'bytes/device':>12}"
    )
    for r in rows:
        print(
            f"{r['devices']:>7}  {r['shape']:<14} {r['statistics']:<13} {r['median_ms']:>8.3f} "
            f"{r['ratio_to_per_device']:>6.2f} {r['all_reduces']:>11} {r['payload_bytes']:>12}"
        )
    write_results(args.out, rows, repeats=args.repeats, cpu=cpu_model(), devices=counts)


if __name__ == "__main__":
    main()
