"""csmf: the contract shared by the trainer, the index builder and the service.

Feature spec and encoding, the owned two-tower model (forward only), objective weights → slice
scale, and the checkpoint/bundle formats. Nothing here trains or serves.
"""

__version__ = "0.1.0"
