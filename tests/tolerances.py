"""Tolerances for comparisons with independent float64 references.

Shared by the reference tests of every normalizer: each number is argued once.
"""

# Tolerances for comparisons with a float64 reference, by dtype of `x`.
TOL = {
    # Everything in float64: only the roundings of sums over <= ~1e3 entries,
    # ~1e-13 relative at worst.
    "float64": {"rtol": 1e-12, "atol": 1e-12},
    # float32, values O(1): a reduction over up to ~1e3 entries per channel
    # (BatchNorm) or per example (LayerNorm) errs by ~log2(n) * eps32 ~ 1e-6,
    # and the shifted one-pass variance may lose another factor ~10 when its
    # shift lies a few std from the mean.
    # 1e-5 is about 100 ulps.
    "float32": {"rtol": 1e-5, "atol": 1e-5},
    # bfloat16: statistics and arithmetic in float32 (errors ~1e-6), then one
    # rounding of the output to bfloat16, at most half an ulp (unit roundoff
    # u = 2^-8 relative). rtol = 2u leaves room for the float32 part; atol
    # covers outputs near 0.
    "bfloat16": {"rtol": 2 * 2**-8, "atol": 1e-5},
    # float16: the same argument with u = 2^-11.
    "float16": {"rtol": 2 * 2**-11, "atol": 1e-5},
}
# Gradients in float32 against numpy-ml's float64 backward: dx is a sum of
# three terms of size up to ~|scale| |dy| / sigma ~ 5 that cancel to O(1),
# each a float32 sum over n <= 60 entries, so its error is ~log2(n) * eps32 * 5
# ~ 4e-6 (observed: <= 1.4e-6). dscale and dbias are plain sums of the same
# size. 2e-5 leaves a margin of 5 over that estimate.
GRAD_TOL = {"float32": {"rtol": 2e-5, "atol": 2e-5}}
# SPEC's bound for the large-mean case: std within 1e-3 of 1.
LARGE_MEAN_TOL = 1e-3
# float64 gradients against central differences of a float64 numpy function
# with step h = 1e-6: truncation error ~h^2 |f'''| ~ 1e-11, rounding error
# ~eps64 |f| / h ~ 2e-16 * 10 / 1e-6 = 2e-9 for losses |f| ~ 10. 1e-6 leaves
# a margin of ~500 over that, and is still far below the O(1) differences a
# wrong gradient (e.g. one taken through Batch Renorm's r and d) makes.
FINITE_DIFFERENCE_TOL = {"rtol": 1e-6, "atol": 1e-6}
# `jax.test_util.check_grads` in float64 (to second order, forward and
# reverse mode) on smooth O(1) losses: its central differences of step 1e-3
# (its default) agree with the exact derivatives to ~h^2 |f'''| ~ 1e-6, and
# 1e-5, check_grads' own default for float64, leaves a margin of 10.
CHECK_GRADS_TOL = {"rtol": 1e-5, "atol": 1e-5}
REAL_SIZE_TOL = {"float32": {"rtol": 1e-5, "atol": 1e-5}, "bfloat16": TOL["bfloat16"]}
REAL_SIZE_GRAD_TOL = {
    "float32": {"dx": 1e-5, "dparams": 1e-5},
    "bfloat16": {"dx": 1e-2, "dparams": 1e-5},
}
REAL_SIZE_CHECK_GRADS_TOL = {"atol": 1e-5, "rtol": 1e-5}
# Synchronized BatchNorm in float32 across up to 8 devices against float64
# numpy, values of order 1-10 (each device's shard offset differently, by up
# to +-7), statistics over <= 256 entries per feature: the reductions err by
# ~log2(n) * eps32 ~ 1e-6 relative, and pooling across devices (each
# device's mean taken relative to the pooled one, the spread of the device
# means added back) loses at most another factor ~10. 2e-5 keeps a margin of
# 2 over that. (test_sync.py, test_multihost.py)
SYNC_TOL = {"rtol": 2e-5, "atol": 2e-5}
# Gradients of sum(y * dy) through synchronized statistics over n <= 256
# entries per feature: dx is a difference of terms of size ~n |dy| / sigma
# that cancel to O(|dy|), and dscale, dbias sum n products, so float32
# rounding shows at ~n * eps32 ~ 3e-5 relative to the terms; 1e-4 keeps a
# margin of 3. (test_sync.py, test_multihost.py)
SYNC_GRAD_TOL = {"rtol": 1e-4, "atol": 1e-4}
LARGE_MEAN_OFFSET_TOL = 4 * 2**-10
