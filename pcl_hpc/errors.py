"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user (a file, a key, a folder): the message names it and says what to do."""
