"""Multi-label classification metrics over a whole split, in plain numpy.

They run on the host over predictions gathered from every device and
process, so no JAX is needed. Everything agrees with scikit-learn (the tests
check it), but is self-contained, vectorised where it matters and O(N log N)
per class.

Conventions shared by every function:
  scores  float (N, K): probabilities or logits. Ranking metrics (AP, AUC,
          calibration, top-k) only use their order.
  labels  {0, 1} (N, K), any integer, bool or float dtype.
  mask    optional (N,), bool or {0, 1} float/int: rows with 0 are padding
          (evaluation pads the last batch) and are dropped before anything
          is computed, so a padded split gives exactly the unpadded result.
Malformed inputs (mismatched shapes, labels or mask outside {0, 1}, NaN
scores) raise ValueError naming the problem.

`summarize` keys (a flat, JSON-serialisable dict; scalars are Python
floats/ints, NaN only for degenerate data such as a split without positives):
  num_examples         rows after masking (int)
  num_classes          K (int)
  num_scored_classes   classes with at least one positive: those averaged
                       by macro_map (int)
  label_cardinality    mean number of labels per example
  macro_map            mean per-class AP over classes with positives
  micro_map            AP of all (example, class) pairs pooled
  weighted_map         per-class AP weighted by positive count
  macro_auc            mean per-class ROC-AUC over classes where it exists
  f1_top{k}            micro F1 of the top-k rule (each example predicts its
                       k highest-scoring classes), for k in `ks`
  precision_top{k}     precision@k, averaged over examples
  recall_top{k}        recall@k, averaged over examples with a label
  macro_f1, micro_f1   F1 at the fixed threshold 0.5 (scores read as
                       probabilities), comparable across every evaluation
  macro_f1_calibrated, micro_f1_calibrated
                       F1 at the given `thresholds`; only when they are given
  hamming_loss, hamming_accuracy, subset_accuracy
                       at the decision thresholds: `thresholds` if given,
                       otherwise 0.5
  binary_accuracy      fraction of (example, class) decisions right at 0.5:
                       Keras' `binary_accuracy`, the number the seed paper
                       reported (97% on its training set)
  all_negative_accuracy
                       binary_accuracy of predicting no genre at all
                       (1 - label density): what binary_accuracy gets for free
  per_class_ap, per_class_auc
                       lists of K floats, None where undefined
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_THRESHOLD = 0.5

_AVERAGES = ("macro", "micro", "weighted")


# ---------------------------------------------------------------- validation


def _as_binary(x, name: str) -> np.ndarray:
  x = np.asarray(x)
  if x.dtype == bool:
    return x
  if not (np.issubdtype(x.dtype, np.number)):
    raise ValueError(f"{name} must be numeric or bool, got dtype {x.dtype}")
  # NaN fails both comparisons, so it is reported here too.
  bad = ~((x == 0) | (x == 1))
  if bad.any():
    raise ValueError(f"{name} must be 0/1, found value {x[bad].flat[0]!r}")
  return x != 0


def _as_scores(scores) -> np.ndarray:
  scores = np.asarray(scores)
  if not (np.issubdtype(scores.dtype, np.number) or scores.dtype == bool):
    raise ValueError(f"scores must be numeric, got dtype {scores.dtype}")
  if scores.ndim != 2:
    raise ValueError(f"scores must be 2-D (N, K), got shape {scores.shape}")
  if scores.shape[1] == 0:
    raise ValueError("scores must have at least one class (K >= 1)")
  # float64 holds every float32/int score exactly, so thresholds chosen from
  # these values reproduce the same decisions on the original dtype.
  scores = scores.astype(np.float64, copy=False)
  if np.isnan(scores).any():
    raise ValueError("scores contain NaN")
  return scores


def _mask_rows(mask, n: int) -> np.ndarray | None:
  if mask is None:
    return None
  mask = np.asarray(mask)
  if mask.shape != (n,):
    raise ValueError(f"mask must have shape ({n},), got {mask.shape}")
  return _as_binary(mask, "mask")


def _prepare(scores, labels, mask) -> tuple[np.ndarray, np.ndarray]:
  """Validated (float64 scores, bool labels), padding rows removed."""
  scores = _as_scores(scores)
  labels = np.asarray(labels)
  if labels.shape != scores.shape:
    raise ValueError(f"labels shape {labels.shape} does not match scores shape "
                     f"{scores.shape}")
  labels = _as_binary(labels, "labels")
  keep = _mask_rows(mask, scores.shape[0])
  if keep is not None:
    scores, labels = scores[keep], labels[keep]
  return scores, labels


def _prepare_pred(pred, labels, mask) -> tuple[np.ndarray, np.ndarray]:
  pred, labels = np.asarray(pred), np.asarray(labels)
  if pred.ndim != 2:
    raise ValueError(f"pred must be 2-D (N, K), got shape {pred.shape}")
  if labels.shape != pred.shape:
    raise ValueError(f"labels shape {labels.shape} does not match pred shape {pred.shape}")
  pred, labels = _as_binary(pred, "pred"), _as_binary(labels, "labels")
  keep = _mask_rows(mask, pred.shape[0])
  if keep is not None:
    pred, labels = pred[keep], labels[keep]
  return pred, labels


def _nanmean(x: np.ndarray) -> float:
  # np.nanmean warns on all-NaN input; an empty average is simply NaN here.
  x = x[~np.isnan(x)]
  return float(x.mean()) if x.size else float("nan")


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  """num / den with 0 where den == 0 (sklearn's zero_division=0)."""
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


# ---------------------------------------------------------------- ranking


def _curve(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Counts at every distinct score, as sklearn's `_binary_clf_curve`.

  Args:
    s: float64 (n,) scores of one class.
    y: bool (n,) labels.

  Returns:
    (thresholds, tps, fps): the distinct scores in descending order (m,),
    and int64 (m,) true/false positive counts when predicting `s >= t`.
    Tied scores form one point, which is how sklearn handles ties.
  """
  if s.size == 0:
    empty = np.zeros(0, np.int64)
    return np.zeros(0), empty, empty
  order = np.argsort(s, kind="stable")[::-1]
  s, y = s[order], y[order]
  # Last index of each run of equal scores: its cumulative counts include the
  # whole tied group, so a tie is never split between two operating points.
  ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
  tps = np.cumsum(y, dtype=np.int64)[ends]
  fps = ends + 1 - tps
  return s[ends], tps, fps


def _ap_1d(s: np.ndarray, y: np.ndarray) -> float:
  _, tps, fps = _curve(s, y)
  if tps.size == 0 or tps[-1] == 0:
    return float("nan")
  # Step-wise AP: sum of precision at each point times the recall it adds
  # (no interpolation), exactly sklearn's average_precision_score. Dividing
  # by the positive count once at the end keeps a perfect ranking at 1.0.
  positives_gained = np.diff(np.r_[0, tps])
  return float(np.sum(positives_gained * (tps / (tps + fps))) / tps[-1])


def _auc_1d(s: np.ndarray, y: np.ndarray) -> float:
  _, tps, fps = _curve(s, y)
  if tps.size == 0 or tps[-1] == 0 or fps[-1] == 0:
    return float("nan")
  # Trapezoids under the ROC curve, in integer counts: a tied group that holds
  # both classes contributes a diagonal, i.e. each tied pair counts 1/2, the
  # Mann-Whitney statistic.
  tp = np.r_[0, tps]
  area2 = np.sum(np.diff(np.r_[0, fps]) * (tp[1:] + tp[:-1]))
  return float(area2 / (2.0 * tps[-1] * fps[-1]))


def average_precision(scores, labels, mask=None) -> np.ndarray:
  """Per-class average precision, equal to sklearn's `average_precision_score`.

  Args:
    scores: float (N, K).
    labels: {0, 1} (N, K).
    mask: optional (N,); 0 marks padding rows to ignore.

  Returns:
    float64 (K,); NaN for a class with no positives (AP is undefined there;
    sklearn would warn and return a meaningless value).
  """
  scores, labels = _prepare(scores, labels, mask)
  return np.array([_ap_1d(scores[:, c], labels[:, c]) for c in range(scores.shape[1])])


def roc_auc(scores, labels, mask=None) -> np.ndarray:
  """Per-class ROC-AUC, equal to sklearn's `roc_auc_score` on each column.

  Args:
    scores: float (N, K).
    labels: {0, 1} (N, K).
    mask: optional (N,); 0 marks padding rows to ignore.

  Returns:
    float64 (K,); NaN for a class without positives or without negatives.
  """
  scores, labels = _prepare(scores, labels, mask)
  return np.array([_auc_1d(scores[:, c], labels[:, c]) for c in range(scores.shape[1])])


def mean_average_precision(scores, labels, mask=None, average: str = "macro") -> float:
  """Mean average precision over classes.

  Args:
    scores: float (N, K).
    labels: {0, 1} (N, K).
    mask: optional (N,); 0 marks padding rows to ignore.
    average: 'macro': mean of per-class AP over the classes that have at
      least one positive. Classes without positives are skipped (sklearn
      would warn and count them with a meaningless AP): a rare genre absent
      from a small split must not drag the mean down.
      'micro': AP of all (example, class) pairs pooled, sklearn's
      average='micro'; it also ranks classes against each other.
      'weighted': per-class AP weighted by each class's positive count,
      sklearn's average='weighted'.

  Returns:
    A Python float; NaN if no class has a positive.
  """
  if average not in _AVERAGES:
    raise ValueError(f"average must be one of {_AVERAGES}, got {average!r}")
  scores, labels = _prepare(scores, labels, mask)
  if average == "micro":
    return _ap_1d(scores.ravel(), labels.ravel())
  ap = np.array([_ap_1d(scores[:, c], labels[:, c]) for c in range(scores.shape[1])])
  if average == "macro":
    return _nanmean(ap)
  weights = labels.sum(0)
  if weights.sum() == 0:
    return float("nan")
  has = weights > 0
  return float(np.sum(ap[has] * weights[has]) / weights.sum())


def precision_recall_curve(scores, labels, mask=None
                           ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
  """Per-class precision-recall curves, each equal to sklearn's `precision_recall_curve`.

  Args:
    scores: float (N, K).
    labels: {0, 1} (N, K).
    mask: optional (N,); 0 marks padding rows to ignore.

  Returns:
    A list of K entries (precision, recall, thresholds): float64 (m + 1,),
    float64 (m + 1,) and float64 (m,) with m the class's distinct scores;
    thresholds increase, recall decreases, and the last point is
    (precision 1, recall 0), as in sklearn. None for a class without
    positives, where recall is undefined (sklearn warns and sets it to 1).
  """
  scores, labels = _prepare(scores, labels, mask)
  curves = []
  for c in range(scores.shape[1]):
    thr, tps, fps = _curve(scores[:, c], labels[:, c])
    if tps.size == 0 or tps[-1] == 0:
      curves.append(None)
      continue
    # Every point predicts at least one example, so tps + fps > 0.
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    curves.append((np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thr[::-1].copy()))
  return curves


# ---------------------------------------------------------------- thresholds


def _thresholds_for(thresholds, k: int) -> np.ndarray:
  t = np.asarray(thresholds, np.float64)
  if t.ndim == 0:
    t = np.full(k, float(t))
  if t.shape != (k,):
    raise ValueError(f"thresholds must be a scalar or shape ({k},), got {t.shape}")
  if np.isnan(t).any():
    raise ValueError("thresholds contain NaN")
  return t


def _prf(pred: np.ndarray, labels: np.ndarray) -> dict:
  """Per-class and averaged precision/recall/F1 of bool predictions."""
  tp = (pred & labels).sum(0)
  fp = (pred & ~labels).sum(0)
  fn = (~pred & labels).sum(0)
  f1 = _divide(2 * tp, 2 * tp + fp + fn)
  return {
      "precision": _divide(tp, tp + fp),
      "recall": _divide(tp, tp + fn),
      "f1": f1,
      "support": labels.sum(0).astype(np.int64),
      # Every class counts in the macro mean, including ones with neither
      # labels nor predictions (F1 0), as in sklearn with zero_division=0.
      "macro_f1": float(f1.mean()) if f1.size else float("nan"),
      "micro_f1": float(_divide(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())),
      "micro_precision": float(_divide(tp.sum(), tp.sum() + fp.sum())),
      "micro_recall": float(_divide(tp.sum(), tp.sum() + fn.sum())),
  }


def f1_at_thresholds(scores, labels, thresholds, mask=None) -> dict:
  """Precision, recall and F1 of the decisions `scores >= thresholds`.

  Matches sklearn's precision/recall/f1_score with zero_division=0 on the
  binarised predictions.

  Args:
    scores: float (N, K).
    labels: {0, 1} (N, K).
    thresholds: a scalar or float (K,), one per class.
    mask: optional (N,); 0 marks padding rows to ignore.

  Returns:
    {'precision', 'recall', 'f1': float64 (K,), 'support': int64 (K,)
    positives per class, 'macro_f1', 'micro_f1', 'micro_precision',
    'micro_recall': float}.
  """
  scores, labels = _prepare(scores, labels, mask)
  t = _thresholds_for(thresholds, scores.shape[1])
  return _prf(scores >= t, labels)


def calibrate_thresholds(scores, labels, mask=None) -> np.ndarray:
  """Per-class thresholds that maximise each class's F1 on this data.

  Candidates are the distinct scores of the class (predicting `score >= t`);
  among equally good ones the highest wins, so the rule predicts as little
  as it can for the same F1. F1 values are ratios of integer counts, so equal
  F1s compare exactly equal and the tie-break is deterministic. One sort and
  cumulative sums per class: O(N log N).

  A class with no positives here cannot be calibrated; it gets
  max(1, largest score) + 1 (2.0 for probabilities): a finite,
  JSON-serialisable value above every score seen and every probability, so
  the class is never predicted.

  Args:
    scores: float (N, K).
    labels: {0, 1} (N, K).
    mask: optional (N,); 0 marks padding rows to ignore.

  Returns:
    float64 (K,) thresholds, each one of the class's scores (exactly, so
    `scores >= thresholds` reproduces the calibrated F1 on the original
    float32 scores too) or the never-predict value.
  """
  scores, labels = _prepare(scores, labels, mask)
  never = max(1.0, float(scores.max()) if scores.size else 1.0) + 1.0
  out = np.full(scores.shape[1], never)
  for c in range(scores.shape[1]):
    thr, tps, fps = _curve(scores[:, c], labels[:, c])
    if tps.size == 0 or tps[-1] == 0:
      continue
    # F1 = 2 tp / (2 tp + fp + fn) and tp + fn is the positive count.
    f1 = 2.0 * tps / (tps + fps + tps[-1])
    out[c] = thr[np.argmax(f1)]  # first maximum = highest threshold
  return out


# ---------------------------------------------------------------- top-k


def top_k_predictions(scores, k: int) -> np.ndarray:
  """The k highest-scoring classes of each row (the seed paper's rule is k=2).

  Ties are broken towards the lower class index, so every row predicts
  exactly min(k, K) classes, deterministically.

  Args:
    scores: float (N, K).
    k: >= 1; k >= K selects every class.

  Returns:
    bool (N, K).
  """
  scores = _as_scores(scores)
  if isinstance(k, bool) or int(k) != k or k < 1:
    raise ValueError(f"k must be a positive integer, got {k!r}")
  k = min(int(k), scores.shape[1])
  # A stable sort of the negated scores keeps equal scores in class order.
  top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  pred = np.zeros(scores.shape, bool)
  np.put_along_axis(pred, top, True, axis=1)
  return pred


def f1_at_top_k(scores, labels, k: int, mask=None) -> dict:
  """Metrics of the top-k rule: each example predicts its k best classes.

  Args:
    scores: float (N, K).
    labels: {0, 1} (N, K).
    k: classes predicted per example (clipped to K).
    mask: optional (N,); 0 marks padding rows to ignore.

  Returns:
    {'micro_f1', 'macro_f1': F1 of the predictions (as sklearn's f1_score),
     'precision': precision@k, the fraction of an example's k predictions
       that are true, averaged over examples,
     'recall': hits / number of true labels, averaged over the examples that
       have a label (NaN if none has),
     'micro_precision', 'micro_recall': pooled over all examples.}
    Every example predicts exactly k classes, so 'precision' and
    'micro_precision' coincide; both are kept so the keys mirror recall's.
  """
  scores, labels = _prepare(scores, labels, mask)
  pred = top_k_predictions(scores, k)
  prf = _prf(pred, labels)
  hits = (pred & labels).sum(1)
  n_true = labels.sum(1)
  has = n_true > 0
  return {
      "micro_f1": prf["micro_f1"],
      "macro_f1": prf["macro_f1"],
      "precision": float(np.mean(hits / pred.sum(1))) if len(pred) else float("nan"),
      "recall": float(np.mean(hits[has] / n_true[has])) if has.any() else float("nan"),
      "micro_precision": prf["micro_precision"],
      "micro_recall": prf["micro_recall"],
  }


# ---------------------------------------------------------------- decisions


def hamming_loss(pred, labels, mask=None) -> float:
  """Fraction of (example, class) decisions that are wrong; sklearn's hamming_loss.

  Args:
    pred: {0, 1} (N, K) predictions; labels: {0, 1} (N, K); mask: optional (N,).
  """
  pred, labels = _prepare_pred(pred, labels, mask)
  return float(np.mean(pred != labels)) if pred.size else float("nan")


def hamming_accuracy(pred, labels, mask=None) -> float:
  """1 - hamming_loss: fraction of (example, class) decisions that are right."""
  return 1.0 - hamming_loss(pred, labels, mask)


def subset_accuracy(pred, labels, mask=None) -> float:
  """Fraction of examples whose whole label set is predicted exactly.

  sklearn's accuracy_score on multi-label input. Args as `hamming_loss`.
  """
  pred, labels = _prepare_pred(pred, labels, mask)
  return float(np.mean((pred == labels).all(1))) if len(pred) else float("nan")


def label_cardinality(labels, mask=None) -> float:
  """Mean number of labels per example.

  Args:
    labels: {0, 1} (N, K); mask: optional (N,).
  """
  labels = np.asarray(labels)
  if labels.ndim != 2:
    raise ValueError(f"labels must be 2-D (N, K), got shape {labels.shape}")
  labels = _as_binary(labels, "labels")
  keep = _mask_rows(mask, labels.shape[0])
  if keep is not None:
    labels = labels[keep]
  return float(labels.sum(1).mean()) if len(labels) else float("nan")


# ---------------------------------------------------------------- baseline


def label_prior_scores(train_labels, n: int) -> np.ndarray:
  """The label-prior baseline: every example scored with the training frequencies.

  Its mAP is the floor a model must beat. Note what each average measures
  for constant scores: all examples tie within a class, so a class's AP is
  just its positive rate in the evaluated labels, and macro mAP is the mean
  positive rate of the evaluated classes, whatever the training frequencies.
  Micro mAP does use them (it ranks frequent genres above rare ones), so it
  is the more informative prior baseline.

  Args:
    train_labels: {0, 1} (M, K), M >= 1.
    n: number of examples to score.

  Returns:
    float64 (n, K), each row the per-class positive rate of `train_labels`.
  """
  train_labels = np.asarray(train_labels)
  if train_labels.ndim != 2 or train_labels.shape[0] == 0:
    raise ValueError(f"train_labels must be 2-D (M, K) with M >= 1, got shape "
                     f"{train_labels.shape}")
  if int(n) != n or n < 0:
    raise ValueError(f"n must be a non-negative integer, got {n!r}")
  rates = _as_binary(train_labels, "train_labels").mean(0)
  return np.tile(rates, (int(n), 1))


# ---------------------------------------------------------------- summary


def _json_list(x: np.ndarray) -> list:
  return [None if np.isnan(v) else float(v) for v in x]


def summarize(scores, labels, mask=None, *, thresholds=None,
              ks: Sequence[int] = (1, 2, 3)) -> dict:
  """Every metric above in one flat, JSON-serialisable dict.

  Key names are listed in the module docstring and are stable: checkpoints
  select by 'macro_map' and logs are compared across runs.

  Args:
    scores: float (N, K) probabilities (the 0.5 default threshold assumes
      probabilities; for logits pass thresholds=0.0).
    labels: {0, 1} (N, K).
    mask: optional (N,); 0 marks padding rows to ignore.
    thresholds: optional scalar or (K,), e.g. from `calibrate_thresholds` on
      the validation split; adds the '*_calibrated' keys and sets the
      decision rule of the hamming/subset metrics.
    ks: the k of the top-k metrics.

  Returns:
    dict[str, float | int | list].
  """
  scores, labels = _prepare(scores, labels, mask)
  n, k_classes = scores.shape
  ap = np.array([_ap_1d(scores[:, c], labels[:, c]) for c in range(k_classes)])
  auc = np.array([_auc_1d(scores[:, c], labels[:, c]) for c in range(k_classes)])
  out = {
      "num_examples": int(n),
      "num_classes": int(k_classes),
      "num_scored_classes": int(np.sum(~np.isnan(ap))),
      "label_cardinality": label_cardinality(labels),
      "macro_map": _nanmean(ap),
      "micro_map": mean_average_precision(scores, labels, average="micro"),
      "weighted_map": mean_average_precision(scores, labels, average="weighted"),
      "macro_auc": _nanmean(auc),
  }
  for k in ks:
    top = f1_at_top_k(scores, labels, k)
    out[f"f1_top{k}"] = top["micro_f1"]
    out[f"precision_top{k}"] = top["precision"]
    out[f"recall_top{k}"] = top["recall"]
  fixed = _prf(scores >= DEFAULT_THRESHOLD, labels)
  out["macro_f1"] = fixed["macro_f1"]
  out["micro_f1"] = fixed["micro_f1"]
  out["binary_accuracy"] = hamming_accuracy(scores >= DEFAULT_THRESHOLD, labels)
  out["all_negative_accuracy"] = hamming_accuracy(np.zeros_like(labels), labels)
  if thresholds is not None:
    t = _thresholds_for(thresholds, k_classes)
    calibrated = _prf(scores >= t, labels)
    out["macro_f1_calibrated"] = calibrated["macro_f1"]
    out["micro_f1_calibrated"] = calibrated["micro_f1"]
  else:
    t = DEFAULT_THRESHOLD
  pred = scores >= t
  out["hamming_loss"] = hamming_loss(pred, labels)
  out["hamming_accuracy"] = 1.0 - out["hamming_loss"]
  out["subset_accuracy"] = subset_accuracy(pred, labels)
  out["per_class_ap"] = _json_list(ap)
  out["per_class_auc"] = _json_list(auc)
  return out
