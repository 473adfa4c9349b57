"""Lossless conversion of normalization layers to and from other frameworks.

Each pair `from_X_...` / `to_X_...` copies the stored values as they are (no
arithmetic, so a round trip is bit-exact) and maps the names and shapes:

| bnjax | PyTorch | Flax linen | Haiku | Keras |
| --- | --- | --- | --- | --- |
| `params.scale` | `weight` | `params/scale` | `scale` `[1,..,1,C]` | `gamma` |
| `params.bias` | `bias` | `params/bias` | `offset` `[1,..,1,C]` | `beta` |
| `state.mean` | `running_mean` | `batch_stats/mean` | `mean_ema/average` | `moving_mean` |
| `state.var` | `running_var` | `batch_stats/var` | `var_ema/average` | `moving_variance` |
| `state.count` | `num_batches_tracked` | (none) | `mean_ema/counter` | (none) |
| momentum | `1 - momentum` | `momentum` | `decay_rate` | `momentum` |
| epsilon default | 1e-5 | 1e-5 | (required) | 1e-3 |

None of these imports the other framework: arrays go in as anything
`numpy.asarray` takes (torch tensors included, bfloat16 ones too) and come
out as JAX arrays (bnjax, Flax, Haiku) or as writable numpy copies (PyTorch,
Keras). A bfloat16 numpy array goes into torch as
`torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)`.

PyTorch's LayerNorm, RMSNorm and GroupNorm store `weight` and `bias` as
bnjax stores `scale` and `bias`. Transformer Engine's LayerNorm and RMSNorm
have the same keys; with `zero_centered_gamma=True` their `weight` is a
zero-centered scale: apply it with `zero_centered_scale=True`.

One module per framework: `pytorch`, `flax_linen`, `haiku`, `keras`, with
their shared helpers in `_common`; `pytorch_parametrizations` converts the
weight normalizations (`weight_norm`'s `original0`/`original1`,
`spectral_norm`'s `original`, `_u`, `_v`), kernels transposed from
`(out, in, *spatial)` to `(*spatial, in, out)`. The public names are re-exported by
`bnjax.convert`.
"""
