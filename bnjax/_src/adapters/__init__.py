"""Modules for Flax NNX and Equinox over bnjax's functions (`bnjax.nnx`, `bnjax.equinox`)."""
