"""The one error type for a bad experiment config.

Every check that runs before compilation raises `ConfigError`; the launcher prints
its message as one paragraph and exits with status 2. It lives in `sharding/` because
every package may import `sharding` and `sharding` imports none of them.
"""

from __future__ import annotations

import difflib
import shlex
from typing import Any, Callable, Sequence


class ConfigError(ValueError):
  """A config value that cannot work, with the field, the numbers and the fix."""

  def __init__(self, field: str, problem: str, fix: str):
    self.field = field
    self.problem = problem
    self.fix = fix
    # A problem quoted from a library may lack its full stop.
    ended = problem.rstrip()
    ended += "" if ended.endswith((".", "?", "!")) else "."
    super().__init__(f"Config error in `{field}`: {ended} Fix: {fix}")

  @classmethod
  def choice(cls, field: str, value: Any, allowed: Sequence[str],
             flag: str | None = None,
             setting: Callable[[str], str] | None = None) -> "ConfigError":
    """The error for `value` not among `allowed`; the fix names the closest one
    (`closest`), or all of them. `flag`: how to set the field (default
    `--config.<field>`); `setting(meant)`: the flags that set it to `meant`
    (default `flag=meant`), for a value that needs other fields set too."""
    flag = flag or f"--config.{field}"
    meant = closest(value, allowed)
    given = setting(meant) if setting and meant else f"{flag}={meant}"
    fix = (f"set {given} (or another of those)." if meant else
           f"set {flag} to one of them.")
    return cls(field, f"{value!r} is not one of {', '.join(allowed)}.", fix)

  def with_fix(self, fix: str) -> "ConfigError":
    """The same error with another fix."""
    return ConfigError(self.field, self.problem, fix)


class MeshTooLarge(ConfigError):
  """A mesh that asks for more devices than there are. `fix` changes the mesh;
  `hint` says how to get `wanted` devices instead (by default on a CPU host, where
  XLA can split the CPU into that many); `elsewhere` swaps the hint for another
  (a deviceless compile's is a larger topology)."""

  def __init__(self, field: str, problem: str, fix: str, wanted: int,
               hint: str | None = None):
    self.mesh_fix, self.wanted = fix.rstrip("."), wanted
    self.hint = hint if hint is not None else _cpu_hint(wanted)
    super().__init__(field, problem, f"{self.mesh_fix}; {self.hint}.")

  def elsewhere(self, hint: str) -> "MeshTooLarge":
    """The same error with `hint` in place of the CPU host's."""
    return MeshTooLarge(self.field, self.problem, self.mesh_fix, self.wanted, hint)

  def with_fix(self, fix: str) -> "MeshTooLarge":
    """The same error and hint with another fix."""
    return MeshTooLarge(self.field, self.problem, fix, self.wanted, self.hint)


def _cpu_hint(wanted: int) -> str:
  """How to get `wanted` devices on CPU hosts: XLA's flag splits each process's
  CPU, so a run of several processes asks each for its share."""
  import jax
  processes = jax.process_count()
  if processes == 1:
    return (f"on a CPU host, XLA_FLAGS=--xla_force_host_platform_device_count={wanted} "
            f"set before starting splits the CPU into {wanted} devices to try this mesh")
  if wanted % processes:
    return (f"on CPU hosts, {wanted} devices do not split evenly over the run's "
            f"{processes} processes (XLA_FLAGS=--xla_force_host_platform_device_count "
            "gives each process the same number)")
  return (f"on CPU hosts, XLA_FLAGS=--xla_force_host_platform_device_count="
          f"{wanted // processes} set before starting each of the run's {processes} "
          f"processes gives {wanted} devices in all to try this mesh")


def flag(name: str, value: Any) -> str:
  """`--name=value` as a fix gives it to paste into a shell: the value as
  ml_collections' config flags parse it (a string as it is, a tuple or list as a
  tuple literal), quoted where the shell would split or expand it."""
  text = repr(tuple(value)) if isinstance(value, (list, tuple)) else str(value)
  return f"--{name}={shlex.quote(text)}"


def closest(value: Any, allowed: Sequence[str]) -> str | None:
  """The entry of `allowed` that `value` most likely meant: the same letters in
  another case, else difflib's nearest (ratio >= 0.6); None when none is near."""
  lower = {str(a).lower(): a for a in allowed}
  close = difflib.get_close_matches(str(value).lower(), list(lower), n=1, cutoff=0.6)
  return lower[close[0]] if close else None
