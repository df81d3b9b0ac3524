"""The poster-cnn entry point: train, evaluate, predict or report.

    poster-cnn --config=synthetic --config.data_dir=DATA --workdir=RUN
    poster-cnn --mode=evaluate --workdir=RUN [--step=best] [--split=test] [--data_dir=OTHER]
    poster-cnn --mode=predict --workdir=RUN --images='posters/*.jpg' [--format=json]
    poster-cnn --mode=report --workdir=RUN [--step=best] [--split=test]   # needs matplotlib

`--config` takes a config shipped with the package by name (`paper`, `synthetic`,
...) or a file (`configs/paper.py`, or a config of your own, which can start with
`from poster_cnn.configs import default`). Evaluation, prediction and reports read
the config the run saved in its workdir.
"""

from __future__ import annotations

import importlib.util
import logging as pylogging
import os
import sys
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

import poster_cnn.configs as shipped_configs
from poster_cnn import distributed

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config: a shipped one by name (" + ", ".join(
        sorted(n[:-3] for n in os.listdir(shipped_configs.__path__[0])
               if n.endswith(".py") and not n.startswith("_"))) + ") or a config file; "
    "override any field with --config.FIELD=VALUE. Not needed to evaluate or predict.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, logs and results; for evaluate/predict/report "
    "also one of its checkpoints, WORKDIR/checkpoints/STEP.", required=True)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate", "predict", "report"],
                          "What to do.")
_STEP = flags.DEFINE_string("step", "best",
                            "evaluate/predict/report: 'best', 'latest' or a step.")
_SPLIT = flags.DEFINE_string("split", None,
                             "evaluate/report: split to score (default: the test split).")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "evaluate/report: dataset to score (default: the training dataset); "
    "its genres are matched to the model's by name.")
_CALIBRATE = flags.DEFINE_string(
    "calibrate", None, "evaluate: a split of the scored dataset to calibrate per-genre "
    "thresholds on (default: the thresholds saved beside the checkpoint, from the training "
    "run's validation split). Written with the evaluation, never over the run's own.")
_IMAGES = flags.DEFINE_list("images", [], "predict: image files, folders or globs.")
_TOP_K = flags.DEFINE_integer("top_k", None, "predict: genres to list (default: config.top_k).")
_FORMAT = flags.DEFINE_enum("format", "table", ["table", "json", "csv"], "predict: output format.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "predict: write here instead of stdout; evaluate: the summary JSON "
    "(predictions .npz beside it) instead of WORKDIR/evaluations/DATASET/SPLIT_stepN.json.")
# --help lists the cluster flags with the others.
flags.adopt_module_key_flags(distributed)


class _QuietLibraries:
  """Drops orbax's and grain's INFO chatter (several lines per checkpoint), and
  orbax's warning that a manager opened read-only (as evaluation means it to be)."""

  def filter(self, record) -> bool:
    if not any(f"{os.sep}{lib}{os.sep}" in record.pathname for lib in ("orbax", "grain")):
      return True
    return (record.levelno >= pylogging.WARNING
            and not str(record.msg).startswith("Given directory is read only"))


def _fail(error: Exception) -> None:
  """A clear one-line error and exit status 1; the traceback only at --verbosity=1."""
  logging.debug("".join(traceback.format_exception(error)))
  sys.exit(f"error: {error}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  from poster_cnn import run_dir
  try:
    step = run_dir.parse_step(_STEP.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if _TOP_K.value is not None and _TOP_K.value <= 0:
    raise app.UsageError(f"--top_k={_TOP_K.value} must be a positive number of genres")
  distributed.initialize()
  logging.info("JAX process %d/%d, %d local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.local_devices())
  try:
    _run_mode(step)
  except (ValueError, FileNotFoundError, NotADirectoryError) as e:
    _fail(e)


def _run_mode(step) -> None:
  from poster_cnn import run_dir
  if _MODE.value == "train":
    from poster_cnn import train
    if _CONFIG.value is None:
      raise app.UsageError("--config is required to train")
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    return
  try:
    run, step = run_dir.RunDir.locate(_WORKDIR.value, step)
  except ValueError as e:
    raise app.UsageError(f"--workdir: {e}") from None
  if _MODE.value == "evaluate":
    from poster_cnn import evaluate
    summary = evaluate.evaluate_checkpoint(run, step=step, split=_SPLIT.value,
                                           data_dir=_DATA_DIR.value, calibrate=_CALIBRATE.value,
                                           output=_OUTPUT.value)
    if jax.process_index() == 0:
      print(evaluate.format_report(summary))
  elif _MODE.value == "report":
    from poster_cnn import report
    try:
      out_dir = report.write_report(run, step=step, split=_SPLIT.value, data_dir=_DATA_DIR.value)
    except report.MatplotlibMissing as e:
      sys.exit(f"error: {e}")
    if out_dir is not None:
      print(f"report: {os.path.join(out_dir, 'report.html')}\n"
            f"        {os.path.join(out_dir, 'report.md')}")
  else:
    from poster_cnn import predict
    if not _IMAGES.value:
      raise app.UsageError("--images is required to predict")
    if _OUTPUT.value:
      predict.check_output(_OUTPUT.value)
    predictions, errors = predict.predict_files(run, _IMAGES.value, step=step,
                                                top_k=_TOP_K.value)
    text = predict.format_predictions(predictions, _FORMAT.value)
    if _OUTPUT.value:
      predict.write_output(_OUTPUT.value, text)
    else:
      print(text)
    if errors:
      logging.warning("%d file(s) could not be read: %s", len(errors),
                      ", ".join(e["path"] for e in errors))


# ---------------------------------------------------------------- flags


def _alias_configs_package() -> None:
  """Lets config files written for a checkout (`from configs import default`) run from an
  installed package, where the shipped configs are `poster_cnn.configs`."""
  if "configs" not in sys.modules and importlib.util.find_spec("configs") is None:
    sys.modules["configs"] = shipped_configs


def resolve_config_path(value: str) -> str:
  """A --config value -> a file: a shipped config's name, or a path.

  `configs/NAME.py` that does not exist here (run outside a checkout) falls back on
  the shipped config of that name. A `:args` suffix (config_flags') is kept.
  """
  path, sep, args = value.partition(":")
  shipped = os.path.join(shipped_configs.__path__[0], os.path.basename(path))
  if os.sep not in path and not path.endswith(".py"):
    shipped += ".py"
    if os.path.isfile(shipped):
      return shipped + sep + args
  elif (not os.path.exists(path) and os.path.basename(os.path.dirname(path)) == "configs"
        and os.path.isfile(shipped)):
    return shipped + sep + args
  return value


def _config_overrides_error(argv: list[str], error: Exception) -> str:
  """The message for an unknown --config.FIELD, naming the flag and the fields there are."""
  key = str(error).strip("\"'")
  bad = [a for a in argv if a.startswith("--config.") and
         key in a.split("=", 1)[0][len("--config."):].split(".")]
  flag = bad[0].split("=", 1)[0] if bad else f"--config.{key}"
  fields = ""
  config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if config_arg:
    try:
      spec = importlib.util.spec_from_file_location("_config", config_arg.partition(":")[0])
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      node = module.get_config()
      for part in flag[len("--config."):].split(".")[:-1]:
        node = node[part]
      fields = f"; fields there: {', '.join(sorted(node.keys()))}"
    except Exception:  # the listing is a courtesy; the flag is named either way
      pass
  return f"{flag}: the config has no field {key!r}{fields}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with --config resolved by name and config errors as one line."""
  _alias_configs_package()
  argv = list(argv)
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      argv[i] = "--config=" + resolve_config_path(arg[len("--config="):])
    elif arg == "--config" and i + 1 < len(argv):
      argv[i + 1] = resolve_config_path(argv[i + 1])
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help "
             "on flags.")
  except (AttributeError, KeyError) as e:  # ml_collections: an override of no field
    sys.exit(f"error: {_config_overrides_error(argv, e)}")


def run():
  # `--help` describes the main module's flags, which absl takes to be sys.argv[0]'s
  # (the console script); make this module's flags that script's.
  for flag in flags.FLAGS.get_key_flags_for_module(__name__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
