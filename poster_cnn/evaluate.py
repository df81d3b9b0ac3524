"""Checkpoint-based evaluation, in a separate process from training.

Everything comes from the workdir (`run_dir.RunDir`): the config, vocabulary and
label prior training wrote to run_info.json, and the checkpoint. Any converted
dataset can be scored, the training one or another collection:

- Thresholds: by default those saved beside the checkpoint, calibrated on the
  training run's own validation split (each genre's F1 maximised); computed
  there once if missing. `calibrate=SPLIT` calibrates on a split of the scored
  dataset instead, and makes it another evaluation with its own files.
- Vocabularies are matched by name: a dataset with the genres in another order
  is remapped; one with fewer or other genres is scored on the shared ones.
- The label-prior baseline is the training dataset's genre frequencies.
- Outputs go in WORKDIR/evaluations/<dataset name>-<fingerprint>/ (or an
  `output` path), and name the dataset, its fingerprint and the checkpoint.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import logging

from poster_cnn import inference, metrics, options, run_dir as run_dir_lib
from poster_cnn.data import records
from poster_cnn.run_dir import RunDir


def match_vocabularies(model: tuple[str, ...], data: tuple[str, ...], data_dir: str
                       ) -> tuple[list[str], np.ndarray, np.ndarray]:
  """The genres both know, and where each sits in the model's and the dataset's columns.

  Returns:
    (shared genres in model order, int (S,) model columns, int (S,) dataset columns).
  Raises:
    ValueError naming both vocabularies when no genre is shared.
  """
  shared = [g for g in model if g in data]
  if not shared:
    raise ValueError(f"{data_dir} shares no genre with the model: its genres are "
                     f"{list(data)}, the model predicts {list(model)}")
  if list(data) != list(model):
    if set(data) == set(model):
      logging.info("%s lists the model's genres in another order: labels remapped by name",
                   data_dir)
    else:
      logging.warning(
          "%s: scoring the %d genres it shares with the model (%s); not in the dataset: %s; "
          "not predicted by the model: %s", data_dir, len(shared), ", ".join(shared),
          ", ".join(g for g in model if g not in data) or "-",
          ", ".join(g for g in data if g not in model) or "-")
  return (shared, np.asarray([model.index(g) for g in shared], np.int64),
          np.asarray([data.index(g) for g in shared], np.int64))


def label_prior(run: RunDir, config, vocabulary, n: int) -> np.ndarray:
  """Each genre's training frequency (the baseline a model must beat), float32 (n, K).

  From the run info; runs written before it kept one read the training dataset.
  """
  rates = run.read_info().get("label_prior")
  if rates is None:
    meta = records.read_metadata(config.data_dir)
    train = meta.splits[config.train_split]
    rates = {g: p / max(train.num_examples, 1) for g, p in zip(meta.vocabulary, train.positives)}
  return np.broadcast_to(np.asarray([rates[g] for g in vocabulary], np.float32),
                         (n, len(vocabulary)))


def _own_thresholds(run: RunDir, predictor: inference.Predictor) -> np.ndarray | None:
  """The checkpoint's thresholds on the run's validation split, calibrated once if missing."""
  config, vocabulary, step = predictor.config, predictor.vocabulary, predictor.step
  saved = run.read_thresholds(step, vocabulary)
  if saved is not None or not config.eval_split:
    return saved
  try:
    meta = records.read_metadata(config.data_dir)
    options.validate(config, meta, mode="evaluate", splits=[config.eval_split])
  except (OSError, ValueError) as e:
    logging.warning("no thresholds for step %d and the training dataset cannot give them "
                    "(%s): precision/recall/F1 at thresholds are left out", step, e)
    return None
  preds = inference.predict_dataset(config, predictor.eval_fn, predictor.variables,
                                    predictor.mesh, config.data_dir, config.eval_split)
  thresholds = metrics.calibrate_thresholds(preds["scores"], preds["labels"])
  if jax.process_index() == 0:
    run.write_thresholds(run.thresholds_file(step), vocabulary, thresholds)
  return thresholds


def output_stem(run: RunDir, config, *, step: int, split: str, data_dir: str,
                calibrate: str | None = None, output: str | None = None):
  """Where an evaluation's .json and .npz go (see `run_dir.RunDir.evaluation`)."""
  if output:
    return run_dir_lib.evaluation_stem(output)
  return run.evaluation(data_dir or config.data_dir, split, step, calibration=calibrate)


def read_eval(workdir, split: str, step: int, data_dir: str | None = None):
  """A saved evaluation of the run's dataset (or `data_dir`): (summary, predictions).

  Predictions are {'scores': float32 (N, K), 'labels': uint8 (N, K),
  'index': int64 (N,)}, rows ordered by record index, columns in the
  summary's 'vocabulary' order.
  """
  run = RunDir(workdir)
  stem = output_stem(run, run.config(), step=step, split=split, data_dir=data_dir)
  return run_dir_lib.read_evaluation(stem)


def _nones(values) -> list:
  return [None if v is None or np.isnan(v) else float(v) for v in values]


def per_class_details(preds: dict, thresholds: np.ndarray | None, prior: np.ndarray) -> dict:
  """Per-genre fields beyond `metrics.summarize`, as JSON lists in vocabulary order.

  Args:
    preds: {'scores': float (N, K), 'labels': {0, 1} (N, K)}.
    thresholds: float (K,) calibrated thresholds, or None.
    prior: float (N, K) label-prior scores.

  Returns:
    {'per_class_positives': K ints,
     'per_class_prior_ap': K floats, AP of the label prior (the split's
       positive rate; None without positives),
     'per_class_threshold', 'per_class_precision_calibrated',
     'per_class_recall_calibrated', 'per_class_f1_calibrated': K floats or
       None, all None without thresholds. A threshold above 1 means the genre
       had no validation positive and is never predicted. None also marks
       what is undefined: precision when the genre is never predicted, recall
       without positives, F1 with neither. ('macro_f1_calibrated' counts
       those F1s as 0, as sklearn's zero_division=0 does.)}
  """
  scores, labels = np.asarray(preds["scores"]), np.asarray(preds["labels"])
  k = labels.shape[1]
  out = {"per_class_positives": [int(v) for v in labels.sum(0)],
         "per_class_prior_ap": _nones(metrics.average_precision(prior, labels))}
  if thresholds is None:
    for name in ("threshold", "precision_calibrated", "recall_calibrated", "f1_calibrated"):
      out[f"per_class_{name}"] = [None] * k
    return out
  prf = metrics.f1_at_thresholds(scores, labels, thresholds)
  predicted = (scores >= np.asarray(thresholds)).sum(0)
  positives = prf["support"]
  defined = {"precision": predicted > 0, "recall": positives > 0,
             "f1": (predicted > 0) | (positives > 0)}
  out["per_class_threshold"] = _nones(thresholds)
  for name, ok in defined.items():
    out[f"per_class_{name}_calibrated"] = _nones(np.where(ok, prf[name], np.nan))
  return out


def evaluate_checkpoint(workdir, *, step: str | int = "best", split: str | None = None,
                        data_dir: str | None = None, calibrate: str | None = None,
                        output: str | None = None) -> dict:
  """Scores a checkpoint on a split; writes the summary (.json) and predictions (.npz).

  The NPZ holds the raw predictions (scores float32 (N, K), labels uint8 (N, K),
  index int64 (N,)), so reports can be redrawn without the model.

  Args:
    workdir: a training workdir (path or RunDir).
    step: 'best' (by validation macro mAP), 'latest', or a step number.
    split: defaults to the config's test split.
    data_dir: defaults to the dataset the run trained on.
    calibrate: a split of `data_dir` to calibrate thresholds on, instead of the
      thresholds saved beside the checkpoint.
    output: path of the summary JSON (the NPZ goes beside it), instead of
      WORKDIR/evaluations/<dataset>/<split>_step<N>.json.

  Returns:
    The metrics summary (see `metrics.summarize`) plus 'step', 'split',
    'vocabulary' (the genres scored), 'checkpoint', 'dataset' {'path',
    'fingerprint'}, 'calibration_split' and 'calibration_dataset' (None if
    uncalibrated), the label-prior baselines 'prior_macro_map' and
    'prior_micro_map', the `per_class_details` lists and 'output' (the stem of
    the files written).
  """
  run = workdir if isinstance(workdir, RunDir) else RunDir(workdir)
  config = run.config()
  step = run.resolve_step(step)
  data_dir = data_dir or config.data_dir
  split = split or config.test_split
  meta = records.read_metadata(data_dir)
  options.validate(config, meta, mode="evaluate",
                   splits=[split] + ([calibrate] if calibrate else []))
  stem = output_stem(run, config, step=step, split=split, data_dir=data_dir,
                     calibrate=calibrate, output=output)
  predictor = inference.Predictor(run, step)
  genres, model_cols, data_cols = match_vocabularies(predictor.vocabulary, meta.vocabulary,
                                                     data_dir)

  def predict(on_split):
    preds = inference.predict_dataset(config, predictor.eval_fn, predictor.variables,
                                      predictor.mesh, data_dir, on_split)
    return {**preds, "scores": preds["scores"][:, model_cols],
            "labels": preds["labels"][:, data_cols]}

  if calibrate:
    cal = predict(calibrate)
    thresholds = metrics.calibrate_thresholds(cal["scores"], cal["labels"])
    calibration = {"calibration_split": calibrate, "calibration_dataset": str(data_dir)}
  else:
    own = _own_thresholds(run, predictor)
    thresholds = own[model_cols] if own is not None else None
    calibration = {"calibration_split": config.eval_split if own is not None else None,
                   "calibration_dataset": str(config.data_dir) if own is not None else None}
  preds = predict(split)
  summary = metrics.summarize(preds["scores"], preds["labels"], thresholds=thresholds)
  prior = label_prior(run, config, genres, len(preds["labels"]))
  summary = {"step": step, "split": split, "vocabulary": genres,
             "checkpoint": predictor.checkpoint,
             "dataset": {"path": str(data_dir),
                         "fingerprint": run_dir_lib.dataset_fingerprint(data_dir),
                         "vocabulary": list(meta.vocabulary)},
             **calibration, **summary,
             "prior_macro_map": metrics.mean_average_precision(prior, preds["labels"]),
             "prior_micro_map": metrics.mean_average_precision(prior, preds["labels"],
                                                               average="micro"),
             **per_class_details(preds, thresholds, prior), "output": str(stem)}
  if jax.process_index() == 0:
    run_dir_lib.write_evaluation(stem, summary, preds)
    logging.info("wrote %s.json and %s.npz", stem, stem)
  return summary


# ---------------------------------------------------------------- tables

# (summary key, its label-prior baseline key or None), in the order shown.
HEADLINE_METRICS = (
    ("macro_map", "prior_macro_map"), ("micro_map", "prior_micro_map"), ("weighted_map", None),
    ("macro_auc", None),
    ("f1_top1", None), ("f1_top2", None), ("f1_top3", None),
    ("precision_top1", None), ("precision_top2", None), ("precision_top3", None),
    ("macro_f1_calibrated", None), ("micro_f1_calibrated", None),
    ("hamming_loss", None), ("subset_accuracy", None), ("label_cardinality", None),
    ("num_examples", None),
)


def _cell(value, digits: int = 3) -> str:
  if value is None or isinstance(value, float) and np.isnan(value):
    return "-"
  if isinstance(value, int):
    return str(value)
  return f"{value:.{digits}f}"


def _threshold_cell(value) -> str:
  # Probabilities never reach a threshold above 1: see calibrate_thresholds.
  return "never" if value is not None and value > 1 else _cell(value)


def per_class_table(summary: dict) -> tuple[list[str], list[list[str]]]:
  """(header, rows of strings): one row per genre, in vocabulary order.

  Summaries written before the per-class fields existed show '-' there.
  """
  k = len(summary["vocabulary"])
  col = lambda key: summary.get(key) or [None] * k
  header = ["genre", "positives", "AP", "ROC-AUC", "threshold", "precision", "recall", "F1"]
  rows = [[genre, _cell(pos), _cell(ap), _cell(auc), _threshold_cell(t), _cell(p), _cell(r),
           _cell(f1)]
          for genre, pos, ap, auc, t, p, r, f1 in zip(
              summary["vocabulary"], col("per_class_positives"), col("per_class_ap"),
              col("per_class_auc"), col("per_class_threshold"),
              col("per_class_precision_calibrated"), col("per_class_recall_calibrated"),
              col("per_class_f1_calibrated"))]
  return header, rows


# Readable names of the summary's keys, as tables and reports show them.
METRIC_NAMES = {
    "macro_map": "macro mAP", "micro_map": "micro mAP", "weighted_map": "weighted mAP",
    "macro_auc": "macro ROC-AUC",
    **{f"f1_top{k}": f"F1, top {k}" for k in (1, 2, 3)},
    **{f"precision_top{k}": f"precision, top {k}" for k in (1, 2, 3)},
    "macro_f1_calibrated": "macro F1, per-genre thresholds",
    "micro_f1_calibrated": "micro F1, per-genre thresholds",
    "hamming_loss": "Hamming loss", "subset_accuracy": "exact-match accuracy",
    "label_cardinality": "true genres per poster", "num_examples": "posters",
    "prior_macro_map": "label prior macro mAP", "prior_micro_map": "label prior micro mAP",
}


def metric_name(key: str) -> str:
  """A summary key's readable name (the key itself where none is known)."""
  return METRIC_NAMES.get(key, key)


def headline_table(summary: dict) -> tuple[list[str], list[list[str]]]:
  """(header, rows of strings): metric, value, label-prior baseline and its value.

  Metrics missing from the summary (e.g. calibrated F1 without a validation
  split) are left out.
  """
  header = ["metric", "value", "label-prior baseline", "value"]
  rows = []
  for key, prior in HEADLINE_METRICS:
    if key in summary:
      rows.append([metric_name(key), _cell(summary[key], 4), metric_name(prior) if prior else "",
                   _cell(summary.get(prior), 4) if prior else ""])
  return header, rows


def _fixed_width(header: list[str], rows: list[list[str]], align: str) -> list[str]:
  """Text table lines; `align` has one 'l' or 'r' per column."""
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  def line(cells):
    return "  ".join(c.ljust(w) if a == "l" else c.rjust(w)
                     for c, w, a in zip(cells, widths, align)).rstrip()
  return [line(header), *(line(r) for r in rows)]


def describe(summary: dict) -> str:
  """One line saying what was evaluated and where the thresholds come from."""
  calibrated = summary.get("calibration_split")
  return (f"{summary.get('split', '?')} split, step {summary.get('step', '?')}, "
          f"{summary['num_examples']} examples; "
          + (f"precision/recall/F1 at per-genre thresholds calibrated on {calibrated}"
             if calibrated else "no calibrated thresholds"))


def format_report(summary: dict) -> str:
  """The console table: per-genre metrics at the calibrated thresholds, then headlines."""
  lines = [describe(summary), ""]
  lines += _fixed_width(*per_class_table(summary), align="lrrrrrrr")
  lines.append("")
  lines += _fixed_width(*headline_table(summary), align="lrlr")
  return "\n".join(lines)
