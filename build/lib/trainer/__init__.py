"""csmf trainer: data adapters, the cascaded CSMF training loop, baselines and evaluation."""
