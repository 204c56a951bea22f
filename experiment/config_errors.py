"""Turns command-line config mistakes into ConfigErrors (field, problem, fix)."""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import re
import traceback

from absl import flags

from sharding import ConfigError, flag


def from_flag_error(err: Exception, config) -> ConfigError:
  """An absl/ml_collections parsing error -> ConfigError naming the field, its
  declared type and a value that parses."""
  text = str(err).strip()
  launcher = re.search(r"flag --(\w+)=(.*?): (.*)", text)
  if launcher and launcher.group(1) != "config":  # a launcher flag, not a field
    return _launcher_flag_error(*launcher.groups())
  m = re.search(r"--config\.([\w.]+)=(\S*): (.*)", text)
  if isinstance(err, flags.IllegalFlagValueError) or m:
    field, value, why = m.groups() if m else ("config", "?", text)
    kind, current = _declared(config, field)
    if current is None:  # a placeholder: unset means None, which no flag spells
      return ConfigError(
          field, f"{value!r} is not a valid {kind} ({why}); `{field}` is an "
          f"optional {kind}, unset (None) unless given.",
          f"pass a value of type {kind}, e.g. --config.{field}={_EXAMPLES.get(kind, '...')}, or "
          "leave the flag out to keep it unset.")
    if re.fullmatch(r"data\.mixture\.\w+\.weight", field) and kind == "int":
      # a table's entries take their types from the file: weight=3 is an int
      return ConfigError(field, f"{value!r} is not a valid int ({why}): the config "
                         f"file writes this weight as an integer ({current}).",
                         f"write the weights as floats in the config file (weight="
                         f"{float(current)}), then pass --config.{field}={value}.")
    if kind == "bool":  # the spelling meant: `no` -> false
      meant = _BOOL_WORDS.get(value.lower())
      current = current if meant is None else meant
    return ConfigError(field, f"{value!r} is not a valid {kind} ({why}).",
                       f"pass a value of type {kind}, e.g. --config.{field}="
                       f"{current}.")
  early = re.search(r"Found (--config\.[\w.]+=?\S*) in argv before a value for "
                    r"--config was specified", text)
  if early:  # ml_collections applies overrides to the file's config: file first
    return ConfigError("--config", f"the override {early.group(1)} comes before "
                       "--config=FILE, whose config it changes.",
                       "put --config=FILE before every --config.* override.")
  return ConfigError("config", text, "check the flag spelling.")


# Words for a boolean that the flag parser does not take, and the value meant.
_BOOL_WORDS = {**dict.fromkeys(("no", "n", "off", "f", "0", "none", "disable"), "false"),
               **dict.fromkeys(("yes", "y", "on", "t", "1", "enable"), "true")}
# A value of each placeholder type that parses, for the fix of an error.
_EXAMPLES = {"int": "100", "float": "1.0", "str": "VALUE", "bool": "true"}


def unset_field(config, defaults, prefix: str = "") -> ConfigError | None:
  """The ConfigError for the first field a config file (or override) set to None
  whose `defaults` value (experiments/base.py's) is not None: only placeholders
  may be unset. `model.d_model = None` crashed in the first comparison with a
  TypeError, and some (`norm_eps`, `tie_embeddings`) ran on None. Tables of
  named entries (`data.mixture`, `mesh.rules`) are not compared."""
  for name in config.keys():
    value, path = config[name], f"{prefix}{name}"
    default = defaults.get(name) if hasattr(defaults, "get") else None
    if hasattr(value, "keys"):
      if name not in ("mixture", "rules") and hasattr(default, "keys"):
        error = unset_field(value, default, path + ".")
        if error:
          return error
    elif value is None and default is not None:
      return ConfigError(path, "is None, but it is not a field that may be unset "
                         "(experiments/base.py declares those as placeholders).",
                         f"give it a value, e.g. {flag(f'config.{path}', default)}, or "
                         "drop what sets it to None to keep the default.")
  return None


def _launcher_flag_error(name: str, value: str, why: str) -> ConfigError:
  """A launcher flag (`--what`, `--slices`, ...) given a value its parser refuses
  -> ConfigError naming the flag, with a value that parses."""
  flag = flags.FLAGS[name]
  parser = flag.parser
  choices = ""
  kind = {flags.IntegerParser: "an integer", flags.FloatParser: "a number",
          flags.BooleanParser: "true or false"}.get(type(parser), "a valid value")
  if isinstance(parser, flags.EnumParser):
    example, choices = parser.enum_values[0], f" (one of {', '.join(parser.enum_values)})"
  elif isinstance(parser, flags.BooleanParser):
    example = "true"
  elif name in _FIXES:
    return ConfigError(f"--{name}", f"{value!r} is not {kind} ({why}).", _FIXES[name])
  elif flag.default is not None:
    example = flag.serialize().split("=", 1)[1]
  else:
    example = {flags.IntegerParser: "1", flags.FloatParser: "1.0"}.get(
        type(parser), "VALUE")
  return ConfigError(f"--{name}", f"{value!r} is not {kind} ({why}).",
                     f"pass --{name}={example}{choices}.")


# Fixes for launcher flags unset by default whose value no one example gives:
# the saved steps are the run's, a process id must be below the process count.
_FIXES = {
    "step": "leave --step out to read the latest saved step, or pass one that is "
            "saved (`python -m experiment inspect --workdir=DIR` lists them).",
    "process_id": "pass this process's index, from 0 to --num_processes - 1, "
                  "e.g. --process_id=0.",
}


def _declared(config, field) -> tuple[str, object]:
  """(declared type name, current value) of a field; placeholders keep the type
  they were declared with although their value is None."""
  *parents, name = field.split(".")
  try:
    node = config
    for key in parents:
      node = node[key]
    kind = node.get_type(name)
    return getattr(kind, "__name__", str(kind)), node[name]
  except (KeyError, AttributeError):
    return "value", "..."


def unknown_key(argv: list[str], config) -> ConfigError | None:
  """ConfigError for the first --config.a.b=... whose key does not exist."""
  for arg in argv:
    m = re.match(r"--config\.([\w.]+)(=|$)", arg)
    if not m:
      continue
    node, path = config, m.group(1).split(".")
    for i, key in enumerate(path):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if key not in keys:
        field = ".".join(path[:i + 1])
        if not keys and i:  # an empty table, such as data.mixture by default
          table = ".".join(path[:i])
          return ConfigError(field, f"`{table}` is empty in this config, so it has no "
                             f"entry `{key}`; an override can change an entry's "
                             "fields but not add an entry.",
                             f"define `{table}` in a config file (README, "
                             "\"Mixtures\", has an example) and override its fields.")
        if path[:2] == ["data", "mixture"] and i == 3:
          from train.data import MIXTURE_KEYS
          if key in MIXTURE_KEYS:  # an optional key the entry does not set
            table = ".".join(path[:i])
            return ConfigError(
                field, f"the entry `{table}` sets no `{key}` in the config file, and "
                "an override can change an entry's keys but not add one.",
                f"add {key}=... to that entry in the config file" + (
                    f", or pass --config.data.{key}=... (read by every entry that "
                    "sets none)." if key == "text_field" else "."))
        close = difflib.get_close_matches(key, keys, n=1)
        hint = (f"did you mean `{'.'.join(path[:i] + close)}`?" if close
                else f"valid keys here: {', '.join(sorted(keys))}.")
        return ConfigError(field, f"there is no such config field; {hint}",
                           "fix the name; experiments/base.py lists every field.")
      node = node[key]
  return None


def unknown_flag(err: Exception, command: str, own: tuple[str, ...]
                 ) -> ConfigError | None:
  """ConfigError for a flag no command defines, with the command's flags."""
  m = re.search(r"Unknown command line flag '([\w-]+)'", str(err))
  if not m:
    return None
  name = m.group(1)
  close = difflib.get_close_matches(name, own, n=1, cutoff=0.75)
  hint = (f"did you mean --{close[0]}?" if close
          else f"{command} reads {', '.join('--' + f for f in own)}.")
  return ConfigError(f"--{name}", f"there is no such flag; {hint}",
                     f"fix or drop it; `python -m experiment {command} --help` lists "
                     "the flags.")


def config_arg(argv: list[str]) -> tuple[str, str | None] | None:
  """(path, arg) of --config=path[:arg] (arg None without a colon; "" for
  `path:`, which ml_collections passes to get_config as it is), or None without
  --config."""
  for arg in argv:
    if arg.startswith("--config="):
      path, colon, cfg_arg = arg[len("--config="):].partition(":")
      return path, cfg_arg if colon else None
  return None


def missing_config_file(argv: list[str]) -> ConfigError | None:
  """ConfigError when --config=path[:arg] names no file, with the shipped configs."""
  if given := config_arg(argv):
    path = given[0]
    if os.path.isfile(path):
      return None
    import experiments
    shipped = os.path.relpath(os.path.dirname(experiments.__file__))
    names = sorted(n for n in os.listdir(shipped) if n.endswith(".py")
                   and n not in ("__init__.py", "base.py", "saved.py"))
    example = "llama_tiny.py" if "llama_tiny.py" in names else names[0]
    return ConfigError("--config", f"there is no config file at {path}.",
                       f"pass a config file, e.g. --config={shipped}/{example} "
                       f"(shipped: {', '.join(names)}; saved.py:WORKDIR gives a run's "
                       "own config).")
  return None


def load_config(argv: list[str]):
  """The config named by --config=path[:arg], without overrides, or None without
  --config. Raises ConfigError naming the file, and the line in it, when the file
  cannot give a config (a syntax error, no get_config, a misspelt field on the
  locked base config, a value of the wrong type, ...)."""
  if given := config_arg(argv):
    path, cfg_arg = given
    spec = importlib.util.spec_from_file_location("_rung_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
      spec.loader.exec_module(module)
    except SyntaxError as err:
      raise ConfigError("--config", f"{path} line {err.lineno}: {err.msg}.",
                        "fix the file's syntax.") from None
    except Exception as err:  # noqa: BLE001 -- reported with the file's line
      raise _raised_in(path, err) from None
    if not callable(getattr(module, "get_config", None)):
      raise ConfigError(
          "--config", f"{path} defines no get_config function.",
          "define get_config(arg=None) returning the config, e.g. starting from "
          "`from experiments import base; c = base.get_config()`.")
    try:  # called as ml_collections calls it, so its error is the one seen
      return module.get_config() if cfg_arg is None else module.get_config(cfg_arg)
    except ConfigError:
      raise
    except Exception as err:  # noqa: BLE001 -- reported with the file's line
      raise _raised_in(path, err) from None
  return None


def _a(kind: str) -> str:
  return f"a{'n' if kind[0] in 'aeiou' else ''} {kind}"


def _typed_example(text: str, given: str, declared: str) -> str | None:
  """The value a config file meant, written as the declared type (Python source),
  or None where no one reading is clear (`"big"` for an int): `"fsdp"` for a tuple of mesh axes is
  `('fsdp',)`, `[4, 5]` for a str layer list is `'4,5'` (the command line's
  spelling), `"128"` for an int is `128`. `text` is the value as ml_collections
  printed it (str() of it)."""
  if given == "str":
    value = text
  else:
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return None
  try:
    if declared in ("tuple", "list"):
      items = (tuple(v.strip() for v in value.split(",") if v.strip())
               if isinstance(value, str) else tuple(value)
               if isinstance(value, (list, tuple)) else (value,))
      return repr(items if declared == "tuple" else list(items))
    if declared == "str" and isinstance(value, (list, tuple)):
      return repr(",".join(str(v) for v in value))
    if declared == "str" and isinstance(value, (int, float)):
      return repr(str(value))
    if declared == "bool" and isinstance(value, str):
      word = _BOOL_WORDS.get(value.lower(), value.lower())
      return {"true": "True", "false": "False"}.get(word)
    if declared == "int" and (isinstance(value, str) or
                              isinstance(value, float) and value.is_integer()):
      return repr(int(value))
    if declared == "float" and isinstance(value, str):
      return repr(float(value))
  except (ValueError, TypeError):
    return None
  return None


def _raised_in(path: str, err: Exception) -> ConfigError:
  """ConfigError for an exception raised while a config file ran, at the file's
  deepest line in the traceback; a misspelt field gets the field meant."""
  lines = [frame.lineno for frame in traceback.extract_tb(err.__traceback__)
           if os.path.abspath(frame.filename) == os.path.abspath(path)]
  where = f"{path} line {lines[-1]}" if lines else path
  # a KeyError's str() is its key's repr; every other message is kept as written
  text = (err.args[0] if isinstance(err, KeyError) and len(err.args) == 1
          and isinstance(err.args[0], str) else str(err)).strip()
  missing = re.search(r'Key "(\w+)" does not exist and cannot be added', text)
  if missing:
    meant = re.search(r'Did you mean "(\w+)"', text)
    return ConfigError("--config", f"{where}: there is no config field "
                       f"`{missing.group(1)}`"
                       + (f"; did you mean `{meant.group(1)}`?" if meant else "."),
                       "fix the name; experiments/base.py lists every field.")
  wrong_type = re.search(r"Could not override field '(\w+)' \(reference\)\. (.*) is "
                         r"of original type <class '(\w+)'> and cannot be casted to "
                         r"type <class '(\w+)'>", text)
  if wrong_type:
    field, value, given, declared = wrong_type.groups()
    example = _typed_example(value, given, declared)
    e_g = f", e.g. `{field} = {example}`" if example else ""
    return ConfigError("--config", f"{where}: field `{field}` is declared {declared}; "
                       f"it was given {value!r}, {_a(given)}.",
                       f"give `{field}` {_a(declared)}{e_g}.")
  return ConfigError("--config", f"{where}: {type(err).__name__}: {text}",
                     f"fix {where}.")
