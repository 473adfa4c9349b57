"""Data-parallel training with synchronized BatchNorm over every device.

The batch is split over a 1-D device mesh; inside `jax.shard_map` each device
normalizes its shard with the statistics of the whole batch
(`axis_name="data"`), and the gradients are averaged across devices. After
training, the script gathers every device's copy of the running statistics
and checks they are identical.

    .venv/bin/python examples/data_parallel.py --devices 8 [--steps 400]
    .venv/bin/python examples/data_parallel.py --processes 2 --devices 4

`--devices N` simulates N CPU devices per process (it must come before JAX
starts, so the script sets `XLA_FLAGS` itself); on a machine with
accelerators leave it out. `--processes P` starts P processes on this
machine that join one `jax.distributed` runtime on 127.0.0.1 (CPU
collectives through gloo), as P hosts would; each feeds its part of every
global batch.
"""

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=None, help="simulated CPU devices")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--per-device-batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1, help="processes, as hosts")
    parser.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def launch(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Runs this script once per process, on a free port of 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, *argv, "--process-id", str(i), "--port", str(port)]
        )
        for i in range(args.processes)
    ]
    try:
        codes = [w.wait(timeout=600) for w in workers]
    finally:
        for w in workers:
            w.kill()
    if any(codes):
        raise SystemExit(f"a process failed: exit codes {codes}")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.processes > 1 and args.process_id is None:
        return launch(args, argv)
    if args.devices is not None:
        if "jax" in sys.modules:
            raise RuntimeError("--devices must be set before JAX is imported")
        flag = f"--xla_force_host_platform_device_count={args.devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from digits import conv3x3, load_data
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import bnjax

    if args.process_id is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            f"127.0.0.1:{args.port}", args.processes, args.process_id, heartbeat_timeout_seconds=10
        )
    leader = jax.process_index() == 0
    num_devices = jax.device_count()
    mesh = jax.make_mesh((num_devices,), ("data",))
    batch_size = args.per_device_batch * num_devices
    train, test = load_data()
    norm = bnjax.batchnorm(axis_name="data")

    key = jax.random.key(args.seed)
    kernel = jax.nn.initializers.he_normal()(key, (3, 3, 1, 32))
    bn_params, bn_state = norm.init((batch_size, 8, 8, 32))
    params = {"kernel": kernel, "bn": bn_params, "head": jnp.zeros((32, 10))}
    optimizer = optax.adam(3e-2)
    opt_state = optimizer.init(params)

    def forward(params, state, images, train_mode):
        h = conv3x3(images, params["kernel"])
        h, state = norm.apply(params["bn"], state, h, train_mode)
        return jnp.mean(jax.nn.relu(h), axis=(1, 2)) @ params["head"], state

    def loss_fn(params, state, images, labels):
        logits, state = forward(params, state, images, True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        # The mean over devices of per-device means is the global mean here:
        # every device holds the same number of examples.
        return jax.lax.pmean(loss, "data"), state

    @jax.jit
    @jax.shard_map(
        mesh=mesh,
        in_specs=(P(), P(), P(), P("data"), P("data")),
        out_specs=(P(), P(), P(), P(), P("data")),
    )
    def train_step(params, state, opt_state, images, labels):
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, state, images, labels
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # Each device's own copy of the running mean, to show they agree.
        return params, state, opt_state, loss, state.mean[None]

    shard = NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(args.seed)
    if leader:
        print(f"{jax.process_count()} processes, {num_devices} devices, global batch {batch_size}")
    # This process's part of each global batch: the rows its devices hold.
    rows = batch_size // jax.process_count()
    mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
    times = []
    for step in range(args.steps):
        index = rng.choice(len(train.labels), batch_size, replace=False)
        images = jax.make_array_from_process_local_data(
            shard, train.images[index][mine], (batch_size, 8, 8, 1)
        )
        labels = jax.make_array_from_process_local_data(
            shard, train.labels[index][mine], (batch_size,)
        )
        start = time.perf_counter()
        params, bn_state, opt_state, loss, copies = train_step(
            params, bn_state, opt_state, images, labels
        )
        loss.block_until_ready()
        times.append(time.perf_counter() - start)
        if leader and (step == 0 or (step + 1) % 50 == 0):
            rate = batch_size / np.median(times[1:] or times)
            print(f"step {step + 1:4d}  loss {float(loss):.4f}  {rate:8.0f} examples/s")

    copies = np.asarray(multihost_utils.process_allgather(copies, tiled=True))
    identical = bool(np.all(copies == copies[0]))
    logits, _ = jax.jit(forward, static_argnums=3)(params, bn_state, test.images, False)
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == test.labels))
    if leader:
        print(f"running mean identical on all {len(copies)} devices: {identical}")
        print(f"test accuracy (eval mode, running statistics): {accuracy:.2%}")
    if args.process_id is not None:
        jax.distributed.shutdown()
    if not identical:
        raise SystemExit("running statistics differ across devices")


if __name__ == "__main__":
    main()
