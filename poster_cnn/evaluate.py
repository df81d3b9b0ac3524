"""Checkpoint-based evaluation, in a separate process from training.

Everything comes from the workdir: the config and vocabulary training wrote
to run_info.json, and the checkpoint. Per-genre thresholds are calibrated on
the validation split (maximising each genre's F1) and stored beside the
run, for `predict` to use.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging

from poster_cnn import checkpoint, metrics, train
from poster_cnn.data import records

THRESHOLDS_FILE = "thresholds_step_{step}.json"


def resolve_step(manager, step: str | int) -> int:
  """'best', 'latest' or a step number -> an existing step."""
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoints in {manager.directory}")
  if step == "best":
    return manager.best_step()
  if step == "latest":
    return manager.latest_step()
  if int(step) not in steps:
    raise ValueError(f"no checkpoint at step {step} in {manager.directory}; "
                     f"steps: {sorted(steps)}")
  return int(step)


def load_for_inference(workdir: str, step: str | int = "best"):
  """Restores a checkpoint for inference.

  Returns (config, vocabulary, state, eval_fn, mesh, step).
  """
  config, vocabulary = train.read_run_info(workdir)
  mesh = train.create_mesh()
  _, abstract, _ = train.state_factory(config, len(vocabulary), 1, mesh)
  manager = checkpoint.create_manager(workdir, read_only=True)
  step = resolve_step(manager, step)
  state = checkpoint.restore(manager, step, abstract)
  manager.close()
  _, eval_fn = train.jit_steps(state, mesh, image=train.image_options(config))
  return config, vocabulary, state, eval_fn, mesh, step


def label_prior(data_dir: str, train_split: str, n: int) -> np.ndarray:
  """The baseline a model must beat: each genre's training frequency, float32 (n, K)."""
  info = records.read_metadata(data_dir).splits[train_split]
  rates = np.asarray(info.positives, np.float32) / max(info.num_examples, 1)
  return np.broadcast_to(rates, (n, len(rates)))


def thresholds_path(workdir: str, step: int) -> str:
  return os.path.join(workdir, THRESHOLDS_FILE.format(step=step))


def read_thresholds(workdir: str, step: int, vocabulary) -> np.ndarray | None:
  path = thresholds_path(workdir, step)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    saved = json.load(f)
  return np.asarray([saved[g] for g in vocabulary], dtype=np.float32)


def eval_paths(workdir: str, split: str, step: int) -> tuple[str, str]:
  """The evaluation's files: (`eval_<split>_step<N>.json`, `eval_<split>_step<N>.npz`)."""
  stem = os.path.join(workdir, f"eval_{split}_step{step}")
  return stem + ".json", stem + ".npz"


def read_eval(workdir: str, split: str, step: int) -> tuple[dict, dict[str, np.ndarray]]:
  """What `evaluate_checkpoint` saved: (summary, predictions), no model needed.

  Predictions are {'scores': float32 (N, K), 'labels': uint8 (N, K),
  'index': int64 (N,)}, rows ordered by record index.
  """
  json_path, npz_path = eval_paths(workdir, split, step)
  with open(json_path) as f:
    summary = json.load(f)
  with np.load(npz_path) as saved:
    preds = {k: saved[k] for k in ("scores", "labels", "index")}
  return summary, preds


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


def evaluate_checkpoint(workdir: str, *, step: str | int = "best", split: str | None = None,
                        data_dir: str | None = None, calibrate: bool = True) -> dict:
  """Scores a checkpoint on a split; writes `eval_<split>_step<N>.json` and `.npz`.

  The JSON holds the summary below; the NPZ the raw predictions
  (scores float32 (N, K), labels uint8 (N, K), index int64 (N,)), so reports
  can be redrawn without the model (`read_eval`).

  Args:
    workdir: a training workdir.
    step: 'best' (by validation macro mAP), 'latest', or a step number.
    split: defaults to the config's test split.
    data_dir: defaults to the dataset the run trained on.
    calibrate: choose per-genre thresholds on the config's eval split first.

  Returns:
    The metrics summary (see `metrics.summarize`) plus 'step', 'split',
    'vocabulary', 'calibration_split' (None if uncalibrated), the label-prior
    baselines 'prior_macro_map' and 'prior_micro_map', and the
    `per_class_details` lists.
  """
  config, vocabulary, state, eval_fn, mesh, step = load_for_inference(workdir, step)
  data_dir = data_dir or config.data_dir
  split = split or config.test_split
  thresholds = None
  if calibrate and config.eval_split:
    _, val = train.evaluate_split(config, state, eval_fn, mesh, data_dir, config.eval_split)
    thresholds = metrics.calibrate_thresholds(val["scores"], val["labels"])
    if jax.process_index() == 0:
      with open(thresholds_path(workdir, step), "w") as f:
        json.dump({g: float(t) for g, t in zip(vocabulary, thresholds)}, f, indent=2)
  summary, preds = train.evaluate_split(config, state, eval_fn, mesh, data_dir, split,
                                        thresholds=thresholds)
  prior = label_prior(data_dir, config.train_split, len(preds["labels"]))
  summary = {"step": step, "split": split, "vocabulary": list(vocabulary),
             "calibration_split": config.eval_split if thresholds is not None else None,
             **summary,
             "prior_macro_map": metrics.mean_average_precision(prior, preds["labels"]),
             "prior_micro_map": metrics.mean_average_precision(prior, preds["labels"],
                                                               average="micro"),
             **per_class_details(preds, thresholds, prior)}
  if jax.process_index() == 0:
    json_path, npz_path = eval_paths(workdir, split, step)
    with open(json_path, "w") as f:
      json.dump(summary, f, indent=2)
    np.savez(npz_path, scores=preds["scores"], labels=preds["labels"], index=preds["index"])
    logging.info("wrote %s and %s", json_path, npz_path)
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


def headline_table(summary: dict) -> tuple[list[str], list[list[str]]]:
  """(header, rows of strings): metric, value, label-prior baseline and its value.

  Metrics missing from the summary (e.g. calibrated F1 without a validation
  split) are left out.
  """
  header = ["metric", "value", "label-prior baseline", "value"]
  rows = []
  for key, prior in HEADLINE_METRICS:
    if key in summary:
      rows.append([key, _cell(summary[key], 4), prior or "",
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
