"""The one exception type users see: the CLI prints it as a single line and exits non-zero."""


class BertforgeError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of a library's exception message (its type name when it has none), for a
    one-line BertforgeError that wraps it."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]
