"""Conditioning the normalization on the noise level: a small denoiser on the digits.

Trains two copies of the same small conv net to remove Gaussian noise from
scikit-learn's 8x8 digits (`digits.py`, pixels scaled to [-1, 1]). Every
noisy image has its own noise level `sigma`, drawn log-uniformly from
[0.05, 1.5], and the net predicts the clean image (mean squared error).

The conditioned model gives each GroupNorm a per-example
`modulation=(scale, shift)` of shape `(N, 1, 1, C)`, applied by bnjax after
the learned affine as `y * (1 + scale) + shift`. It comes from a learned
embedding of `log(sigma)`: sinusoidal features, a two-layer MLP, then one
dense layer per normalizer. Those last dense layers start at zero
(adaLN-Zero), so at initialization every modulation is `(0, 0)` and the
conditioned model computes exactly what its unconditioned twin computes (the
script checks this). The twin has no embedding, passes `modulation=None` and
never sees `sigma`. Everything else is shared: the architecture, the initial
weights, the batches and their noise, the optimizer and the number of steps.

    conv3x3 -> GroupNorm(8 groups, modulation) -> silu     (4 times, 32 channels)
            -> conv3x3 -> the clean image (N, 8, 8, 1)

    .venv/bin/python examples/conditioning.py [--steps 1000] [--seed 0] [--out DIR]

Takes one to two minutes on 2 CPU cores. Prints the test denoising error
(mean squared error per pixel over 8 noisy copies of each of the 360
held-out digits) of both models by noise level and overall, and writes into
`--out` (default `results/conditioning/`): `denoised.png` (test digits at a
growing sigma: noisy, denoised by each model, clean) and `results.json`
(the same numbers, the training losses and the timings).
"""

import argparse
import functools
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from digits import IMAGE_SHAPE, conv3x3, load_data
from tqdm import tqdm

import bnjax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

CHANNELS = (32, 32, 32, 32)
GROUPS = 8
FREQUENCIES = 8  # sinusoidal features of log(sigma): 2 * FREQUENCIES numbers
EMBED_DIM = 64
SIGMA_MIN, SIGMA_MAX = 0.05, 1.5
BATCH_SIZE = 64
LEARNING_RATE = 2e-3
STEPS = 1000
EVAL_DRAWS = 8  # noisy copies of each test digit, each with its own sigma
BUCKET_EDGES = (0.05, 0.1, 0.2, 0.4, 0.8, 1.5)
PICTURE_SIGMAS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5)

NORM = bnjax.groupnorm(num_groups=GROUPS)


class Embedding(NamedTuple):
    """The noise-level embedding: an MLP on sinusoidal features, then per-layer heads.

    Attributes:
      hidden: `(kernel, bias)` of the MLP's two layers, `2 * FREQUENCIES ->
        EMBED_DIM -> EMBED_DIM`.
      modulation: one `(kernel, bias)` per normalizer, `EMBED_DIM -> 2 * C`
        (scale, then shift), all zero at initialization (adaLN-Zero).
    """

    hidden: tuple[tuple[jax.Array, jax.Array], ...]
    modulation: tuple[tuple[jax.Array, jax.Array], ...]


class Params(NamedTuple):
    """The denoiser's parameters.

    Attributes:
      kernels: one `(3, 3, in, out)` kernel per conv layer (no bias: the
        GroupNorm's bias replaces it).
      norms: each conv layer's GroupNorm parameters.
      head_kernel: the last conv, `(3, 3, CHANNELS[-1], 1)`.
      head_bias: its bias, `(1,)`.
      embedding: the noise-level embedding; None in the unconditioned twin.
    """

    kernels: tuple[jax.Array, ...]
    norms: tuple[bnjax.NormParams, ...]
    head_kernel: jax.Array
    head_bias: jax.Array
    embedding: Embedding | None


class TrainingState(NamedTuple):
    """Everything one step reads and writes."""

    params: Params
    opt_state: optax.OptState
    key: jax.Array  # draws the batches and their noise


def normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, gain: float) -> jax.Array:
    """Weights drawn from a normal of variance `gain / fan_in` (He: 2, LeCun: 1).

    Drawn with NumPy: a handful of arrays, not worth compiling a sampler for.
    """
    return jnp.asarray(rng.standard_normal(shape, np.float32) * math.sqrt(gain / fan_in))


def init_params(seed: int) -> Params:
    """The conditioned denoiser's initial parameters, drawn from `seed`.

    Its unconditioned twin is `params._replace(embedding=None)`: the same
    conv weights, no embedding. The embedding's last layers, one per
    normalizer, are zero (adaLN-Zero): every modulation starts as `(0, 0)`,
    so the two models start as the same function.
    """
    rng = np.random.default_rng(seed)
    kernels, norms = [], []
    in_channels = IMAGE_SHAPE[-1]
    for out_channels in CHANNELS:
        shape = (3, 3, in_channels, out_channels)
        kernels.append(normal(rng, shape, 9 * in_channels, 2.0))
        norm_params, _ = NORM.init((1, *IMAGE_SHAPE[:-1], out_channels))
        norms.append(norm_params)
        in_channels = out_channels
    head_kernel = normal(rng, (3, 3, in_channels, 1), 9 * in_channels, 1.0)
    widths = (2 * FREQUENCIES, EMBED_DIM, EMBED_DIM)
    hidden = tuple(
        (normal(rng, (m, n), m, 2.0), jnp.zeros((n,), jnp.float32))
        for m, n in zip(widths[:-1], widths[1:], strict=True)
    )
    modulation = tuple(
        (jnp.zeros((EMBED_DIM, 2 * c), jnp.float32), jnp.zeros((2 * c,), jnp.float32))
        for c in CHANNELS
    )
    return Params(
        kernels=tuple(kernels),
        norms=tuple(norms),
        head_kernel=head_kernel,
        head_bias=jnp.zeros((1,), jnp.float32),
        embedding=Embedding(hidden, modulation),
    )


def sinusoidal_features(sigma: jax.Array) -> jax.Array:
    """`(N,)` noise levels -> `(N, 2 * FREQUENCIES)` sines and cosines of `log(sigma)`."""
    frequencies = 2.0 ** jnp.arange(FREQUENCIES, dtype=jnp.float32) / 2
    angles = jnp.log(sigma)[:, None] * frequencies[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def modulations(embedding: Embedding, sigma: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    """One `(scale, shift)` pair of shape `(N, 1, 1, C)` per normalizer, from `sigma`."""
    h = sinusoidal_features(sigma)
    for kernel, bias in embedding.hidden:
        h = jax.nn.silu(h @ kernel + bias[None, :])
    pairs = []
    for kernel, bias in embedding.modulation:
        out = h @ kernel + bias[None, :]  # (N, 2 * C)
        scale, shift = jnp.split(out[:, None, None, :], 2, axis=-1)
        pairs.append((scale, shift))
    return pairs


def denoise(params: Params, noisy: jax.Array, sigma: jax.Array, train: bool) -> jax.Array:
    """The denoiser: `(N, 8, 8, 1)` noisy images -> the clean images it predicts.

    `sigma` `(N,)` is read only through `params.embedding`: the unconditioned
    twin (`embedding=None`) gives its GroupNorms `modulation=None`. `train`
    is passed on to the normalizers (GroupNorm computes the same in both
    modes; a BatchNorm in its place would not).
    """
    if params.embedding is None:
        mods = [None] * len(params.kernels)
    else:
        mods = modulations(params.embedding, sigma)
    x = noisy
    for kernel, norm_params, modulation in zip(params.kernels, params.norms, mods, strict=True):
        # GroupNorm is stateless: its state is None in and out.
        x, _ = NORM.apply(norm_params, None, conv3x3(x, kernel), train, modulation=modulation)
        x = jax.nn.silu(x)
    return conv3x3(x, params.head_kernel) + params.head_bias[None, None, None, :]


def draw_sigma(key: jax.Array, n: int) -> jax.Array:
    """`n` noise levels, log-uniform in [SIGMA_MIN, SIGMA_MAX]."""
    u = jax.random.uniform(key, (n,))
    return SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** u


def add_noise(key: jax.Array, clean: jax.Array, sigma: jax.Array) -> jax.Array:
    """`clean + sigma * noise`, one sigma per image."""
    return clean + sigma[:, None, None, None] * jax.random.normal(key, clean.shape)


class Batch(NamedTuple):
    """Clean images `(N, 8, 8, 1)`, their noisy copies and each one's noise level `(N,)`."""

    clean: jax.Array
    noisy: jax.Array
    sigma: jax.Array


def noisy_batch(key: jax.Array, clean: jax.Array) -> Batch:
    """Noisy copies of `clean`, each with its own log-uniform sigma."""
    sigma_key, noise_key = jax.random.split(key)
    sigma = draw_sigma(sigma_key, clean.shape[0])
    return Batch(clean, add_noise(noise_key, clean, sigma), sigma)


def per_example_errors(params: Params, batch: Batch, train: bool) -> jax.Array:
    """The mean squared error per pixel of each denoised image, `(N,)`."""
    denoised = denoise(params, batch.noisy, batch.sigma, train)
    return jnp.mean((denoised - batch.clean) ** 2, axis=(1, 2, 3))


def loss_fn(params: Params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """The training loss, the mean squared error per pixel; the per-example errors as aux."""
    errors = per_example_errors(params, batch, True)
    return jnp.mean(errors), errors


# Evaluation mode, `(params, noisy, sigma) -> denoised`: compiled once per model
# (the two have different parameter trees).
evaluate = jax.jit(functools.partial(denoise, train=False))


def make_step(optimizer: optax.GradientTransformation, images: jax.Array):
    """Builds the jitted training step over the training `images` `(M, 8, 8, 1)`.

    The step draws its own batch: `BATCH_SIZE` images, a sigma for each and
    their noise, all from `state.key`, so two models stepped from the same
    key see the same batches and the same noise.
    """

    @jax.jit
    def step(state: TrainingState) -> tuple[TrainingState, jax.Array]:
        key, index_key, noise_key = jax.random.split(state.key, 3)
        clean = images[jax.random.randint(index_key, (BATCH_SIZE,), 0, images.shape[0])]
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, _), grads = grad_fn(state.params, noisy_batch(noise_key, clean))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return TrainingState(optax.apply_updates(state.params, updates), opt_state, key), loss

    return step


def train(
    name: str, params: Params, images: jax.Array, steps: int, key: jax.Array
) -> tuple[Params, list[float]]:
    """Adam with a cosine decay, one jitted step per batch; returns the final parameters.

    Also returns the training loss every 50 steps (the progress bar shows it).
    """
    schedule = optax.warmup_cosine_decay_schedule(0.0, LEARNING_RATE, steps // 20, steps)
    optimizer = optax.adam(schedule)
    step = make_step(optimizer, images)
    state = TrainingState(params, optimizer.init(params), key)
    losses = []
    with tqdm(range(steps), desc=f"{name:>13}", unit="step", leave=True) as bar:
        for i in bar:
            state, loss = step(state)
            if i % 50 == 0 or i == steps - 1:
                losses.append(float(loss))
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return state.params, losses


def psnr(mse: np.ndarray) -> np.ndarray:
    """Peak signal-to-noise ratio in dB, for pixels in [-1, 1] (a peak-to-peak range of 2)."""
    return 10 * np.log10(4 / mse)


def error_table(test: Batch, errors: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Each model's mean error in each sigma bucket, then over all test examples.

    Every row has the bucket, its number of examples, the mean squared error
    per pixel of the noisy input and of each model, and under "psnr" the
    mean PSNR of each.
    """
    sigma = np.asarray(test.sigma)
    noisy = np.mean((np.asarray(test.noisy) - np.asarray(test.clean)) ** 2, axis=(1, 2, 3))
    per_example = {"noisy": noisy, **errors}
    rows = []
    bounds = [*zip(BUCKET_EDGES[:-1], BUCKET_EDGES[1:], strict=True), (SIGMA_MIN, SIGMA_MAX)]
    for lo, hi in bounds:
        inside = (sigma >= lo) & ((sigma < hi) | (hi == SIGMA_MAX))
        row: dict[str, Any] = dict(sigma_min=lo, sigma_max=hi, examples=int(inside.sum()))
        row.update({name: float(e[inside].mean()) for name, e in per_example.items()})
        row["psnr"] = {name: float(psnr(e[inside]).mean()) for name, e in per_example.items()}
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], seed: int, steps: int) -> str:
    """The table as markdown, errors in units of 1e-3, then the overall PSNR.

    "change" is the conditioned model's error relative to the unconditioned one's.
    """
    lines = [
        f"Test denoising error, mean squared error per pixel x 1e-3 (seed {seed}, {steps} steps):",
        "",
        "| sigma | examples | noisy input | unconditioned | conditioned | change |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, row in enumerate(rows):
        label = "all" if i == len(rows) - 1 else f"{row['sigma_min']:g}-{row['sigma_max']:g}"
        change = row["conditioned"] / row["unconditioned"] - 1
        lines.append(
            f"| {label} | {row['examples']} | {1e3 * row['noisy']:.2f} "
            f"| {1e3 * row['unconditioned']:.2f} | {1e3 * row['conditioned']:.2f} "
            f"| {change:+.1%} |"
        )
    db = rows[-1]["psnr"]
    lines += [
        "",
        f"Mean PSNR: noisy input {db['noisy']:.2f} dB, unconditioned {db['unconditioned']:.2f} dB, "
        f"conditioned {db['conditioned']:.2f} dB.",
    ]
    return "\n".join(lines)


def picture_examples(sigma: np.ndarray, num_digits: int) -> list[int]:
    """For each of PICTURE_SIGMAS, the test example whose sigma is nearest, each a new digit.

    Example `i` is a noisy copy of test digit `i % num_digits`.
    """
    digit = np.arange(len(sigma)) % num_digits
    chosen: list[int] = []
    for target in PICTURE_SIGMAS:
        distance = np.abs(np.log(sigma / target))
        distance[np.isin(digit, digit[chosen])] = np.inf
        chosen.append(int(np.argmin(distance)))
    return chosen


def draw_picture(path: Path, test: Batch, denoised: dict[str, np.ndarray], num_digits: int) -> None:
    """Test examples at a growing sigma, one per column: noisy, each model's output, clean.

    Under each image: its mean squared error per pixel against the clean one.
    """
    sigma = np.asarray(test.sigma)
    chosen = picture_examples(sigma, num_digits)
    clean = np.asarray(test.clean)[chosen]
    rows = {"noisy": np.asarray(test.noisy)[chosen]}
    rows.update({name: images[chosen] for name, images in denoised.items()})
    rows["clean"] = clean
    columns = len(chosen)
    figure, axes = plt.subplots(len(rows), columns, figsize=(1.15 * columns, 1.35 * len(rows)))
    for r, (name, images) in enumerate(rows.items()):
        mse = np.mean((images - clean) ** 2, axis=(1, 2, 3))
        for c in range(columns):
            ax = axes[r, c]
            ax.imshow(images[c, :, :, 0], cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"σ = {sigma[chosen[c]]:.2f}", fontsize=9)
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
            if name != "clean":
                ax.set_xlabel(f"{mse[c]:.3f}", fontsize=7, labelpad=2)
    figure.suptitle("Test digits; under each: mean squared error per pixel", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def signed(images: np.ndarray) -> np.ndarray:
    """The digits' pixels from [0, 1] to [-1, 1]."""
    return 2 * images - 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line: `--steps`, `--seed`, `--out`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/conditioning"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains both models from the same seed, prints the table, writes the PNG and JSON."""
    args = parse_args(argv)
    start = time.perf_counter()
    train_split, test_split = load_data()
    images = jnp.asarray(signed(train_split.images))
    data_key, test_key = jax.random.split(jax.random.key(args.seed))

    conditioned = init_params(args.seed)
    initial = {"unconditioned": conditioned._replace(embedding=None), "conditioned": conditioned}
    sizes = {name: sum(x.size for x in jax.tree.leaves(p)) for name, p in initial.items()}
    print(", ".join(f"{name}: {n:,} parameters" for name, n in sizes.items()))
    # EVAL_DRAWS noisy copies of every test digit, the same for both models.
    test_images = jnp.tile(jnp.asarray(signed(test_split.images)), (EVAL_DRAWS, 1, 1, 1))
    test = jax.jit(noisy_batch)(test_key, test_images)
    first = [np.asarray(evaluate(p, test.noisy, test.sigma)) for p in initial.values()]
    print(
        "at initialization the two models agree on every test example: "
        f"{bool(np.array_equal(*first))}"
    )

    trained, losses, seconds = {}, {}, {}
    for name, params in initial.items():
        begin = time.perf_counter()
        trained[name], losses[name] = train(name, params, images, args.steps, data_key)
        seconds[name] = time.perf_counter() - begin

    denoised = {
        name: np.asarray(evaluate(params, test.noisy, test.sigma))
        for name, params in trained.items()
    }
    clean = np.asarray(test.clean)
    errors = {name: np.mean((d - clean) ** 2, axis=(1, 2, 3)) for name, d in denoised.items()}
    rows = error_table(test, errors)
    print(format_table(rows, args.seed, args.steps))

    args.out.mkdir(parents=True, exist_ok=True)
    draw_picture(args.out / "denoised.png", test, denoised, len(test_split.labels))
    total = time.perf_counter() - start
    report = dict(
        seed=args.seed,
        steps=args.steps,
        batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        channels=list(CHANNELS),
        parameters=sizes,
        sigma_range=[SIGMA_MIN, SIGMA_MAX],
        test_examples=int(test.sigma.shape[0]),
        errors=rows,
        train_loss_every_50_steps=losses,
        train_s=seconds,
        total_s=total,
        jax_version=jax.__version__,
        device=jax.devices()[0].device_kind,
    )
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'denoised.png'} and {args.out / 'results.json'}")
    print(f"Total runtime: {total:.1f} s")
    return report


if __name__ == "__main__":
    main()
