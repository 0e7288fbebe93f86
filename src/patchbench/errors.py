"""One exception type for bad user input: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (unknown name, bad flag value, missing file, ...).

    The message names the offending value and says how to fix it, on one line.
    """
