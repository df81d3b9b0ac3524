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
  _, eval_fn = train.jit_steps(state, mesh)
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


def evaluate_checkpoint(workdir: str, *, step: str | int = "best", split: str | None = None,
                        data_dir: str | None = None, calibrate: bool = True) -> dict:
  """Scores a checkpoint on a split; writes `eval_<split>_step<N>.json` in the workdir.

  Args:
    workdir: a training workdir.
    step: 'best' (by validation macro mAP), 'latest', or a step number.
    split: defaults to the config's test split.
    data_dir: defaults to the dataset the run trained on.
    calibrate: choose per-genre thresholds on the config's eval split first.

  Returns:
    The metrics summary (see `metrics.summarize`) plus 'step' and 'split'.
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
  summary = {"step": step, "split": split, "vocabulary": list(vocabulary), **summary,
             "prior_macro_map": metrics.mean_average_precision(prior, preds["labels"]),
             "prior_micro_map": metrics.mean_average_precision(prior, preds["labels"],
                                                               average="micro")}
  if jax.process_index() == 0:
    path = os.path.join(workdir, f"eval_{split}_step{step}.json")
    with open(path, "w") as f:
      json.dump(summary, f, indent=2)
    logging.info("wrote %s", path)
  return summary


def format_report(summary: dict) -> str:
  """A console table: per-genre AP and AUC, then the headline metrics."""
  lines = [f"{'genre':<14}{'AP':>8}{'AUC':>8}"]
  for g, ap, auc in zip(summary["vocabulary"], summary["per_class_ap"],
                        summary["per_class_auc"]):
    fmt = lambda v: f"{v:8.3f}" if v is not None else f"{'-':>8}"
    lines.append(f"{g:<14}{fmt(ap)}{fmt(auc)}")
  lines.append("")
  for key in ("macro_map", "prior_macro_map", "micro_map", "prior_micro_map", "weighted_map", "f1_top1", "f1_top2", "f1_top3",
              "macro_f1_calibrated", "hamming_accuracy", "subset_accuracy", "num_examples"):
    if key in summary:
      lines.append(f"{key:<22}{summary[key]:.4f}" if isinstance(summary[key], float)
                   else f"{key:<22}{summary[key]}")
  return "\n".join(lines)
