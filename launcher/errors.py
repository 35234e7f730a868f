"""Errors a user can fix. The CLI turns UserError into exit code 2 and one line each, and
RunError (the machine failed the run: a full disk) into exit code 1 and one line."""


class UserError(Exception):
    """Bad config or bad input: the message names the field or file:line."""

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass


class RunError(Exception):
    """The environment failed a run that was going well (no space left for a checkpoint):
    the message says what happened and what was kept."""

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))
