"""The one exception type for bad user input."""


class PruneInputError(ValueError):
    """A model path, config, weight file, data file, device or option that optimum-prune cannot use.

    The message says what is wrong and what is allowed, in one line; the CLI prints it as `optimum-prune: error: ...`
    and exits with status 2. A `ValueError`, so code that caught the earlier `ValueError`s keeps working.
    """
