"""Probes: measurements of a model beyond its loss, in the loop (as callbacks) and offline
(`ablate probe`)."""
