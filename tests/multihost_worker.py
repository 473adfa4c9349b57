"""One process of the two-process synchronized BatchNorm test (`test_multihost.py`).

Run as `python multihost_worker.py PORT PROCESS_ID OUT_DIR`, with
`XLA_FLAGS=--xla_force_host_platform_device_count=4` and `JAX_PLATFORMS=cpu`
in the environment. Both processes join a coordinator on 127.0.0.1:PORT and
form one mesh of 8 CPU devices (4 each) whose collectives cross the process
boundary through gloo. Each process builds the same global batch from a fixed
seed, contributes its half, runs one synchronized BatchNorm training step
(forward, new running statistics, gradients, an optax SGD update) and writes
what it sees to OUT_DIR/process_{PROCESS_ID}.npz.

The data and hyperparameters are module constants so that the test can
rebuild them with `make_batch` and compare.
"""

import os
import sys

import numpy as np

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 4
SHAPE = (16, 4, 4, 3)
SEED = 0
LEARNING_RATE = 0.1
MOMENTUM = 0.9
# Per-feature affine parameters and running statistics away from their
# initial values, so that every part of the step shows in the results.
SCALE = [1.5, -0.5, 2.0]
BIAS = [0.3, -1.0, 0.0]
RUNNING_MEAN = [0.5, -0.25, 1.0]
RUNNING_VAR = [2.0, 0.5, 1.5]
RUNNING_COUNT = 3
# A peer that dies is noticed within this many seconds, not the default 100.
HEARTBEAT_TIMEOUT_S = 10
INITIALIZATION_TIMEOUT_S = 60
SHUTDOWN_TIMEOUT_S = 30


def make_batch():
    """The global batch `x` and the loss weights `dy`, float32, of shape SHAPE.

    Each quarter of the batch is offset differently, so each process's half
    (and each device's share) has statistics clearly unlike the whole
    batch's.
    """
    rng = np.random.default_rng(SEED)
    x = rng.normal(size=SHAPE) * rng.uniform(0.5, 2.0, size=SHAPE[-1])
    offsets = np.repeat(np.linspace(-6.0, 6.0, 4), SHAPE[0] // 4)
    x = x + offsets.reshape((-1, 1, 1, 1))
    dy = rng.normal(size=SHAPE)
    return x.astype(np.float32), dy.astype(np.float32)


def main(port, process_id, out_dir):
    import jax
    import jax.numpy as jnp
    import optax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import bnjax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=NUM_PROCESSES,
        process_id=process_id,
        initialization_timeout=INITIALIZATION_TIMEOUT_S,
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
        shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
    )
    assert jax.process_count() == NUM_PROCESSES, jax.process_count()
    assert jax.local_device_count() == DEVICES_PER_PROCESS, jax.local_devices()
    num_devices = NUM_PROCESSES * DEVICES_PER_PROCESS
    assert jax.device_count() == num_devices, jax.devices()

    # make_mesh orders the devices by process, so that each process's half of
    # the batch lies on its own devices.
    mesh = jax.make_mesh((num_devices,), ("data",))
    split = NamedSharding(mesh, P("data"))
    x, dy = make_batch()
    half = SHAPE[0] // NUM_PROCESSES
    mine = slice(process_id * half, (process_id + 1) * half)
    x_global = jax.make_array_from_process_local_data(split, x[mine], SHAPE)
    dy_global = jax.make_array_from_process_local_data(split, dy[mine], SHAPE)

    params = bnjax.NormParams(jnp.asarray(SCALE, jnp.float32), jnp.asarray(BIAS, jnp.float32))
    state = bnjax.BatchStats(
        mean=jnp.asarray(RUNNING_MEAN, jnp.float32),
        var=jnp.asarray(RUNNING_VAR, jnp.float32),
        count=jnp.asarray(RUNNING_COUNT, jnp.int32),
    )
    optimizer = optax.sgd(LEARNING_RATE)
    opt_state = optimizer.init(params)

    def per_device(params, state, x, dy):
        def loss(params):
            y, new_state = bnjax.batchnorm_apply(
                params, state, x, True, momentum=MOMENTUM, axis_name="data"
            )
            return jnp.sum(y * dy), (y, new_state)

        # With shard_map's checks on, the gradient w.r.t. the replicated
        # params is summed over the devices by autodiff.
        (local_loss, (y, new_state)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return y, new_state, grads, jax.lax.psum(local_loss, "data")

    @jax.jit
    def train_step(params, state, opt_state, x, dy):
        y, new_state, grads, loss = jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(P(), P(), P("data"), P("data")),
            out_specs=(P("data"), P(), P(), P()),
        )(params, state, x, dy)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return y, new_state, grads, optax.apply_updates(params, updates), loss

    y, new_state, grads, new_params, loss = train_step(
        params, state, opt_state, x_global, dy_global
    )

    def replicated(a):
        """A replicated global array as numpy, read from a local copy."""
        assert a.sharding.is_fully_replicated, a.sharding
        return np.asarray(a.addressable_data(0))

    results = {
        # This process's half of y, from its own devices, and the whole y
        # gathered from both processes.
        "y_local": np.asarray(multihost_utils.global_array_to_host_local_array(y, mesh, P("data"))),
        "y": np.asarray(multihost_utils.process_allgather(y, tiled=True)),
        "mean": replicated(new_state.mean),
        "var": replicated(new_state.var),
        "count": replicated(new_state.count),
        "grad_scale": replicated(grads.scale),
        "grad_bias": replicated(grads.bias),
        "new_scale": replicated(new_params.scale),
        "new_bias": replicated(new_params.bias),
        "loss": replicated(loss),
        "process_index": np.asarray(jax.process_index()),
        "num_devices": np.asarray(jax.device_count()),
        "num_local_devices": np.asarray(jax.local_device_count()),
    }
    path = os.path.join(out_dir, f"process_{process_id}.npz")
    np.savez(path + ".tmp.npz", **results)
    os.replace(path + ".tmp.npz", path)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
