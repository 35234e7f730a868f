"""Errors a user can fix. The CLI turns them into exit code 2 and one line each."""


class UserError(Exception):
    """Bad config or bad input: the message names the field or file:line."""

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass
