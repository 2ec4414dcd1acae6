"""mergekit-sdxl: merge Stable Diffusion XL checkpoints with mergekit.

Importing this package is cheap (no torch, no mergekit). ``register()`` adds the
merge methods, the SDXL architecture and single-file inputs to mergekit.
"""

from mergekit_sdxl.version import __version__

__all__ = ["__version__", "register"]


def register() -> None:
    """Register methods, architecture and single-file support in mergekit (idempotent)."""
    from mergekit_sdxl.host.plugin import register_all

    register_all()
