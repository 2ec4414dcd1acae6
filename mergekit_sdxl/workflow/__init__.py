"""The mergekit-free workflow: inspect, preflight, recipe, and the ``sdxl:`` options."""
