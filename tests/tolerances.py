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
# reverse mode) on smooth O(1) losses: its central differences of step 1e-4
# (its default) agree with the exact derivatives to ~h^2 |f'''| ~ 1e-8, and
# 1e-5, check_grads' own default for float64, leaves a wide margin.
CHECK_GRADS_TOL = {"rtol": 1e-5, "atol": 1e-5}
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
# float32 against float64 at the sizes users have (test_real_sizes.py):
# statistics over n = 1024 to 32768 entries, values O(1)-O(10). XLA:CPU's
# reductions behave like blocked, tree-like sums, whose error grows like
# log2(n) * eps32 ~ 1e-6 relative at n = 32768 (not like n * eps32), and the
# shifted or two-pass variance adds no cancellation (its shift lies within
# the data). Observed over every case: <= 7e-7. 1e-5 (TOL["float32"]'s
# number) keeps a margin of 10 over the estimate. For bfloat16 TOL's
# argument holds whatever n: one rounding of the output dominates.
REAL_SIZE_TOL = {"float32": {"rtol": 1e-5, "atol": 1e-5}, "bfloat16": TOL["bfloat16"]}
# Gradients of sum(y * cotangent) at real sizes, relative to the largest
# entry of the float64 gradient: dx = (c - w * (mean(c) + xhat * mean(c *
# xhat))) / sigma with c = cotangent * scale, so an entry near 0 carries the
# absolute error of the large terms it is the difference of.
# float32: the two means over n entries and dscale, dbias (sums over up to
# 4096 entries per parameter) err by ~log2(n) * eps32 ~ 1e-6 of the largest
# entry; observed <= 7.4e-7; 1e-5 keeps a margin of 10.
# bfloat16: dx is bfloat16, and autodiff adds two bfloat16 cotangents of x
# (the normalization's, c / sigma, and the statistics' terms), each rounded
# before their sum is rounded again: three roundings of u = 2^-9 of values
# up to ~3 max|dx| each, <= ~10 u = 2e-2 of max|dx|; observed 6.7e-3.
# dscale and dbias are float32 sums, as above.
REAL_SIZE_GRAD_TOL = {
    "float32": {"dx": 1e-5, "dparams": 1e-5},
    "bfloat16": {"dx": 2e-2, "dparams": 1e-5},
}
# The output mean of the large-mean case (mean 1e4, std 1, float32) is 0 up
# to the error of the computed mean, whose ulp at 1e4 is 2^-10 ~ 1e-3: half
# an ulp when correctly rounded, a few more roundings of values that size
# when device means are pooled (count times mean, summed, divided).
# Observed: <= 1.8 ulps synchronized with a mask, <= 0.9 on one device. 4 ulps.
LARGE_MEAN_OFFSET_TOL = 4 * 2**-10
# Forward mode along one entry in float32 at n = 8192 entries per statistic,
# against float64 central differences (step 1e-4: truncation ~h^2 |y'''| and
# rounding ~eps64 / h, both < 1e-8 relative). The off-diagonal entries are
# O(1 / n) and come from tangents of the mean and variance that are one-hot
# sums divided by n, exact up to a few roundings: their error is a few eps32
# of the largest of them (observed <= 5.5e-7). 1e-5 keeps a margin of 18; a
# shift that carried a derivative would leave an error of ~n eps32 ~ 5e-4.
ONE_ENTRY_JVP_TOL = 1e-5
# bfloat16 output computed in float32 and rounded once, against the float64
# result rounded once: the two differ only where the float32 error (~1e-6
# relative) carries the value across a rounding boundary, a share of about
# 2 * 1e-6 / 2^-8 ~ 5e-4 of the entries (observed 8e-5 on 16384 LayerNorm
# outputs), and then by one ulp. Rounding the normalized output to
# bfloat16 before modulating it misses on 25-45% of the entries.
BF16_ROUNDED_ONCE_MISMATCHES = 2e-3
# Weight normalizations in float64 against PyTorch's float64 parametrizations
# and float64 numpy: norms, power iterations and sigma are sums over <= 100
# entries, and each iteration renormalizes (errors do not grow); the
# differences are the order of the roundings, ~1e-15. TOL["float64"] applies.
# sigma after the power iteration has converged, against a float64 SVD: the
# iteration's error shrinks like (s2 / s1)^(2k) (here (2/3)^(2k), below 1e-30
# after 100 steps), so what is left is rounding, ~1e-15 relative.
SPECTRAL_SIGMA_TOL = {"rtol": 1e-12, "atol": 0.0}
