"""A training workdir as an object: its layout, run info, step resolution, atomic writes.

    WORKDIR/
      run_info.json                   config, vocabulary, dataset, label prior, history
      checkpoints/<step>/             orbax (poster_cnn/checkpoint.py)
      thresholds_step_<N>.json        per-genre thresholds of the checkpoint of step N,
                                      calibrated on the run's own validation split
      evaluations/<dataset>/<split>_step<N>.json, .npz
                                      one evaluation: summary + raw predictions
      reports/<dataset>/<split>_step<N>/   report.html, report.md, plots
      metrics.jsonl, tensorboard/     logs (poster_cnn/logs.py)

`<dataset>` is the dataset directory's name and a fingerprint of its metadata
files, so scoring a checkpoint on another collection, or on a re-converted one
under the same name, never replaces the files of another evaluation.

Paths are `etils.epath` paths, so the workdir can live on gs:// as well as on a
local disk. Every JSON and NPZ is written to a temporary file and renamed, so a
killed process leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
import uuid
from typing import Any

import ml_collections
import numpy as np
from etils import epath

RUN_INFO_FILE = "run_info.json"
# 1: {'config', 'vocabulary'}; 2 adds 'format_version', 'dataset', 'label_prior', 'history'.
FORMAT_VERSION = 2
# Files of a converted dataset whose bytes identify it (poster_cnn/data/records.py).
_DATASET_FILES = ("dataset_info.json", "metadata.json", "features.json")


def atomic_write_bytes(path: epath.PathLike, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file in the same folder and a rename."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.write_bytes(data)
  tmp.replace(path)


def atomic_write_json(path: epath.PathLike, obj: Any) -> None:
  atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def read_json(path: epath.PathLike) -> Any:
  return json.loads(epath.Path(path).read_text())


def dataset_fingerprint(data_dir: epath.PathLike) -> str:
  """sha256 (hex, first 16 digits) of a converted dataset's metadata files."""
  digest = hashlib.sha256()
  for name in _DATASET_FILES:
    path = epath.Path(data_dir) / name
    if path.exists():
      digest.update(name.encode() + b"\0" + path.read_bytes())
  return digest.hexdigest()[:16]


def dataset_key(data_dir: epath.PathLike) -> str:
  """'<name>-<fingerprint>': the folder evaluations of this dataset go in."""
  name = re.sub(r"[^A-Za-z0-9_.-]+", "_", epath.Path(data_dir).name) or "dataset"
  return f"{name}-{dataset_fingerprint(data_dir)[:8]}"


def parse_step(step: str | int) -> str | int:
  """'best', 'latest' or a non-negative step number; anything else is a clear ValueError."""
  if isinstance(step, int) and step >= 0:
    return step
  text = str(step).strip()
  if text in ("best", "latest"):
    return text
  if text.isdigit():
    return int(text)
  raise ValueError(f"--step={step!r}: must be 'best', 'latest' or a step number")


class RunDir:
  """One training run's directory. Cheap to create; reads nothing until asked."""

  def __init__(self, path: epath.PathLike):
    path = epath.Path(path)
    # Local paths are made absolute (orbax needs that); gs:// and the like already are.
    self.path = path if "://" in os.fspath(path) else epath.Path(os.path.abspath(path))

  def __repr__(self) -> str:
    return f"RunDir({os.fspath(self.path)!r})"

  def __fspath__(self) -> str:
    return os.fspath(self.path)

  # ------------------------------------------------------------ layout

  @property
  def run_info_file(self) -> epath.Path:
    return self.path / RUN_INFO_FILE

  @property
  def checkpoints(self) -> epath.Path:
    return self.path / "checkpoints"

  def checkpoint(self, step: int) -> epath.Path:
    return self.checkpoints / str(step)

  def thresholds_file(self, step: int) -> epath.Path:
    """The run's own thresholds for the checkpoint of `step` (its validation split)."""
    return self.path / f"thresholds_step_{step}.json"

  def evaluation(self, data_dir: epath.PathLike, split: str, step: int,
                 calibration: str | None = None) -> epath.Path:
    """Stem of an evaluation's files (add '.json' / '.npz').

    `calibration` names thresholds calibrated on the evaluated dataset itself
    ('--calibrate=SPLIT'), which make another evaluation than the default one.
    """
    suffix = f"_calibrated_{calibration}" if calibration else ""
    return self.path / "evaluations" / dataset_key(data_dir) / f"{split}_step{step}{suffix}"

  def report(self, evaluation: epath.PathLike) -> epath.Path:
    """The report folder of an evaluation (a stem from `evaluation`)."""
    evaluation = epath.Path(evaluation)
    try:
      relative = os.path.relpath(os.fspath(evaluation), os.fspath(self.path / "evaluations"))
    except ValueError:
      relative = evaluation.name
    if relative.startswith(".."):  # an --output outside the workdir
      relative = evaluation.name
    return self.path / "reports" / relative

  @property
  def metrics_file(self) -> epath.Path:
    return self.path / "metrics.jsonl"

  @property
  def tensorboard(self) -> epath.Path:
    return self.path / "tensorboard"

  # ------------------------------------------------------------ finding a run

  @classmethod
  def locate(cls, path: epath.PathLike, step: str | int = "best") -> tuple["RunDir", str | int]:
    """(run, step) from a training workdir or one of its checkpoint directories.

    `WORKDIR/checkpoints/N` means step N of WORKDIR (then `step` must be left at
    'best' or name N too); `WORKDIR` and `WORKDIR/checkpoints` keep `step`.
    Raises ValueError naming what is wrong.
    """
    step = parse_step(step)
    path = cls(path).path
    if path.name.isdigit() and path.parent.name == "checkpoints":
      run, found = cls(path.parent.parent), int(path.name)
      if step not in ("best", found):
        raise ValueError(f"{path} is the checkpoint of step {found}, but step {step!r} was "
                         "asked for: pass the workdir with a step, or the checkpoint alone")
      step = found
    elif path.name == "checkpoints":
      run = cls(path.parent)
    else:
      run = cls(path)
    if not run.run_info_file.exists():
      raise ValueError(f"{path} is neither a training workdir (no {RUN_INFO_FILE} in "
                       f"{run.path}) nor one of its checkpoints (WORKDIR/checkpoints/STEP)")
    return run, step

  def steps(self) -> list[int]:
    """Steps with a checkpoint directory, ascending (no checkpoint is opened)."""
    if not self.checkpoints.exists():
      return []
    return sorted(int(p.name) for p in self.checkpoints.iterdir() if p.name.isdigit())

  def resolve_step(self, step: str | int, *, require_checkpoint: bool = True) -> int:
    """'best' (by validation macro mAP), 'latest' or a step number -> a step number.

    A number is checked against the checkpoints unless `require_checkpoint` is
    False (a report redrawn from saved evaluations needs no model).
    """
    step = parse_step(step)
    if isinstance(step, int):
      steps = self.steps()
      if require_checkpoint and step not in steps:
        raise ValueError(f"no checkpoint at step {step} in {self.checkpoints}; "
                         f"steps: {steps or 'none'}")
      return step
    if not self.steps():
      raise ValueError(f"no checkpoints in {self.checkpoints}")
    from poster_cnn import checkpoint  # orbax, only to read the checkpoints' metrics
    manager = checkpoint.create_manager(os.fspath(self.path), read_only=True)
    try:
      found = manager.best_step() if step == "best" else manager.latest_step()
    finally:
      manager.close()
    if found is None:  # no checkpoint carries metrics yet: fall back on the newest
      found = self.steps()[-1]
    return int(found)

  # ------------------------------------------------------------ run info

  def read_info(self) -> dict:
    """run_info.json, upgraded to the current format in memory."""
    if not self.run_info_file.exists():
      raise FileNotFoundError(f"{self.run_info_file} not found: is {self.path} a poster-cnn "
                              "training workdir?")
    info = read_json(self.run_info_file)
    version = info.get("format_version", 1)
    if version > FORMAT_VERSION:
      raise ValueError(f"{self.run_info_file} has format version {version}; this poster_cnn "
                       f"reads up to {FORMAT_VERSION}: upgrade poster_cnn")
    info.setdefault("format_version", 1)
    info.setdefault("history", [])
    return info

  def config(self) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(self.read_info()["config"])

  def vocabulary(self) -> tuple[str, ...]:
    return tuple(self.read_info()["vocabulary"])

  def write_info(self, config, meta, *, history_entry: dict | None = None) -> None:
    """Writes the run info: what evaluation and prediction need besides a checkpoint.

    Args:
      config: the run's ConfigDict.
      meta: the training dataset's `records.DatasetMetadata`.
      history_entry: appended to the history kept from an earlier run info.
    """
    history = self.read_info()["history"] if self.run_info_file.exists() else []
    if history_entry is not None:
      history = [*history, {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            **history_entry}]
    train = meta.splits[config.train_split]
    info = {
        "format_version": FORMAT_VERSION,
        "config": json.loads(config.to_json_best_effort()),
        "vocabulary": list(meta.vocabulary),
        "dataset": {"path": os.fspath(config.data_dir),
                    "fingerprint": dataset_fingerprint(config.data_dir),
                    "splits": {name: s.num_examples for name, s in meta.splits.items()}},
        # Each genre's training frequency: the baseline every evaluation reports, kept
        # here so that scoring another dataset does not need the training one.
        "label_prior": {g: p / max(train.num_examples, 1)
                        for g, p in zip(meta.vocabulary, train.positives)},
        "history": history,
    }
    atomic_write_json(self.run_info_file, info)

  # ------------------------------------------------------------ thresholds

  def read_thresholds(self, step: int, vocabulary, path: epath.PathLike | None = None
                      ) -> np.ndarray | None:
    """float32 (K,) thresholds in `vocabulary` order, or None if none were saved."""
    path = epath.Path(path) if path is not None else self.thresholds_file(step)
    if not path.exists():
      return None
    saved = read_json(path)
    missing = [g for g in vocabulary if g not in saved]
    if missing:
      raise ValueError(f"{path} has no threshold for {missing}")
    return np.asarray([saved[g] for g in vocabulary], dtype=np.float32)

  def write_thresholds(self, path: epath.PathLike, vocabulary, thresholds) -> None:
    atomic_write_json(path, {g: float(t) for g, t in zip(vocabulary, thresholds)})


# ---------------------------------------------------------------- evaluations


def write_evaluation(stem: epath.PathLike, summary: dict, preds: dict[str, np.ndarray]) -> None:
  """`stem`.json (the summary) and `stem`.npz (scores, labels, index), each atomically."""
  stem = epath.Path(stem)
  buf = io.BytesIO()
  np.savez(buf, scores=preds["scores"], labels=preds["labels"], index=preds["index"])
  atomic_write_bytes(stem.parent / (stem.name + ".npz"), buf.getvalue())
  atomic_write_json(stem.parent / (stem.name + ".json"), summary)


def evaluation_exists(stem: epath.PathLike) -> bool:
  stem = epath.Path(stem)
  return all((stem.parent / (stem.name + ext)).exists() for ext in (".json", ".npz"))


def read_evaluation(stem: epath.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
  """What `write_evaluation` saved: (summary, {'scores', 'labels', 'index'})."""
  stem = epath.Path(stem)
  summary = read_json(stem.parent / (stem.name + ".json"))
  with np.load(io.BytesIO((stem.parent / (stem.name + ".npz")).read_bytes())) as saved:
    preds = {k: saved[k] for k in ("scores", "labels", "index")}
  return summary, preds


def evaluation_stem(output: str) -> epath.Path:
  """An --output path (with or without '.json') -> the stem its two files share."""
  path = epath.Path(output)
  return path.parent / path.name[:-5] if path.name.endswith(".json") else path


# ---------------------------------------------------------------- resume


# Fields whose change makes the saved state unusable (other shapes or structure), or its
# labels mean something else. Everything else may change between a run and its resume.
_STRUCTURAL = ("model.", "image.height", "image.width", "optimizer.name",
               "optimizer.accumulate_steps", "optimizer.grad_clip_norm",
               "optimizer.weight_decay", "optimizer.momentum", "ema_decay", "vocabulary")
# Inside `model.`: how the same parameters are computed or regularised.
_NOT_STRUCTURAL = ("model.conv_impl", "model.conv_dropout", "model.dense_dropout",
                   "model.head_dropout", "model.bn_momentum", "model.bn_epsilon")


def _flatten(tree, prefix: str = "") -> dict:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def config_changes(saved: dict, new: dict) -> dict[str, tuple[Any, Any]]:
  """{dotted field: (saved value, new value)} for every field that differs.

  Args:
    saved, new: JSON-like config dicts (`ConfigDict.to_json_best_effort`), with
      'vocabulary' added by the caller where the dataset's genres matter.
  """
  a, b = _flatten(saved), _flatten(new)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def structural(field: str) -> bool:
  """True where a change of `field` makes the checkpointed state unusable."""
  if field.startswith(_NOT_STRUCTURAL):
    return False
  return any(field == s or (s.endswith(".") and field.startswith(s)) for s in _STRUCTURAL)
