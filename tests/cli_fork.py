"""Runs many `python -m experiment ...` command lines from one interpreter.

  python tests/cli_fork.py CASES.json  ->  prints [{returncode, stdout, stderr}]

The launcher is imported once; each command line then runs in a forked child, a
process of its own (fresh absl flags, its own exit status, stdout and stderr),
without paying the ~2 s of imports again. Forking is safe here because nothing
has started a jax backend or a thread before the fork. For command lines that end
before any device work: config errors, --help, unknown commands.
"""

import json
import os
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402

import experiment.__main__ as launcher  # noqa: E402


def _child(args: list[str]) -> int:
  """Runs the launcher on `args` as `python -m experiment` would -> exit status."""
  sys.argv = [launcher.__file__, *args]
  try:
    app.run(launcher.main, flags_parser=launcher.parse)
    return 0
  except SystemExit as exit_:
    if exit_.code is None or isinstance(exit_.code, int):
      return exit_.code or 0
    print(exit_.code, file=sys.stderr)  # sys.exit("message"), as Python does
    return 1
  except BaseException:  # noqa: BLE001 - an uncaught error, as Python reports it
    traceback.print_exc()
    return 1


def run(args: list[str]) -> dict:
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    pid = os.fork()
    if pid == 0:
      os.dup2(out.fileno(), 1)
      os.dup2(err.fileno(), 2)
      code = 1
      try:
        code = _child(args)
      finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    out.seek(0)
    err.seek(0)
    return {"returncode": os.waitstatus_to_exitcode(status),
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace")}


if __name__ == "__main__":
  with open(sys.argv[1]) as f:
    cases = json.load(f)
  print(json.dumps([run(args) for args in cases]))
