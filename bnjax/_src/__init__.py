"""Implementation of bnjax; import the public names from `bnjax`."""
