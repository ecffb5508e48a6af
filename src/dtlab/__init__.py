"""dtlab: Decision Transformers (Chen et al. 2021) with Lightning, Hydra and W&B."""


class DTLabError(Exception):
    """A problem with the user's input or config. The entry points print its message as one
    line and exit non-zero; the message names the problem and the fix."""
