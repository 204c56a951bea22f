"""The one error type for a bad experiment config.

Every check that runs before compilation raises `ConfigError`; the launcher prints
its message as one paragraph and exits with status 2. It lives in `sharding/` because
every package may import `sharding` and `sharding` imports none of them.
"""


class ConfigError(ValueError):
  """A config value that cannot work, with the field, the numbers and the fix."""

  def __init__(self, field: str, problem: str, fix: str):
    self.field = field
    self.problem = problem
    self.fix = fix
    super().__init__(f"Config error in `{field}`: {problem} Fix: {fix}")
