"""The poster-cnn entry point: train, evaluate, predict or report.

    poster-cnn --config=configs/synthetic.py --config.data_dir=DATA --workdir=RUN
    poster-cnn --mode=evaluate --workdir=RUN [--step=best] [--split=test]
    poster-cnn --mode=predict --workdir=RUN --images='posters/*.jpg' [--format=json]
    poster-cnn --mode=report --workdir=RUN [--step=best] [--split=test]   # needs matplotlib

Evaluation, prediction and reports read the config the run saved in its workdir.
"""

from __future__ import annotations

import csv
import io
import json
import logging as pylogging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from poster_cnn import distributed

# Variant configs import `configs.default`; make the repository root importable
# when running from a checkout.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPO, "configs")) and _REPO not in sys.path:
  sys.path.append(_REPO)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py); not needed to evaluate or predict.",
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
    "data_dir", None, "evaluate/report: dataset to score (default: the training dataset).")
_IMAGES = flags.DEFINE_list("images", [], "predict: image files, folders or globs.")
_TOP_K = flags.DEFINE_integer("top_k", None, "predict: genres to list (default: config.top_k).")
_FORMAT = flags.DEFINE_enum("format", "table", ["table", "json", "csv"], "predict: output format.")
_OUTPUT = flags.DEFINE_string("output", None, "predict: write here instead of stdout.")


def _write_predictions(predictions: list[dict]) -> str:
  from poster_cnn import predict
  if _FORMAT.value == "json":
    return json.dumps(predictions, indent=2)
  if _FORMAT.value == "csv":
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["path", "top_k", "above_threshold"])
    for p in predictions:
      writer.writerow([p["path"], "|".join(f"{g}:{v:.4f}" for g, v in p["top_k"]),
                       "|".join(p["above_threshold"])])
    return out.getvalue()
  return predict.format_table(predictions)


class _QuietLibraries:
  """Drops orbax's and grain's INFO chatter (several lines per checkpoint), and
  orbax's warning that a manager opened read-only (as evaluation means it to be)."""

  def filter(self, record) -> bool:
    if not any(f"{os.sep}{lib}{os.sep}" in record.pathname for lib in ("orbax", "grain")):
      return True
    return (record.levelno >= pylogging.WARNING
            and not str(record.msg).startswith("Given directory is read only"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  distributed.initialize()
  logging.info("JAX process %d/%d, %d local devices: %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.local_devices())
  workdir, step = _WORKDIR.value, _STEP.value
  if _MODE.value != "train":
    from poster_cnn import checkpoint
    try:
      workdir, step = checkpoint.locate(workdir, step)
    except ValueError as e:
      raise app.UsageError(f"--workdir: {e}") from None

  if _MODE.value == "train":
    from poster_cnn import train
    if _CONFIG.value is None:
      raise app.UsageError("--config is required to train")
    train.train_and_evaluate(_CONFIG.value, workdir)
  elif _MODE.value == "evaluate":
    from poster_cnn import evaluate
    summary = evaluate.evaluate_checkpoint(workdir, step=step, split=_SPLIT.value,
                                           data_dir=_DATA_DIR.value)
    if jax.process_index() == 0:
      print(evaluate.format_report(summary))
  elif _MODE.value == "report":
    from poster_cnn import report
    try:
      out_dir = report.write_report(workdir, step=step, split=_SPLIT.value,
                                    data_dir=_DATA_DIR.value)
    except report.MatplotlibMissing as e:
      sys.exit(f"error: {e}")
    if out_dir is not None:
      print(f"report: {os.path.join(out_dir, 'report.html')}\n"
            f"        {os.path.join(out_dir, 'report.md')}")
  else:
    from poster_cnn import predict
    if not _IMAGES.value:
      raise app.UsageError("--images is required to predict")
    predictions, errors = predict.predict_files(workdir, _IMAGES.value, step=step,
                                                top_k=_TOP_K.value)
    text = _write_predictions(predictions)
    if _OUTPUT.value:
      with open(_OUTPUT.value, "w") as f:
        f.write(text)
    else:
      print(text)
    if errors:
      logging.warning("%d file(s) could not be read: %s", len(errors),
                      ", ".join(e["path"] for e in errors))


def run():
  app.run(main)


if __name__ == "__main__":
  run()
