"""The one error type users see: the CLI prints its message on one line and exits with code 2."""


class JetSpecError(Exception):
    """Bad input or an unusable checkpoint/engine. The message is one line and names the offending thing."""

    exit_code = 2

    def __str__(self) -> str:  # one line, whatever the cause carried
        return " ".join(super().__str__().split())
