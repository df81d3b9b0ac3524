"""poster_cnn.metrics against scikit-learn, plus hand-computed top-k and calibration cases.

Random cases use several seeds, scores with and without ties (rounded to one
decimal), a class with no positives (column 0) and one with only positives
(column 1), so the edge cases sklearn and we must agree on always occur.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from poster_cnn import metrics

SEEDS = (0, 1, 2, 3)


def _case(seed: int, tied: bool, n: int = 120, k: int = 6):
  rng = np.random.default_rng(seed)
  rates = np.r_[0.0, 1.0, rng.uniform(0.05, 0.6, k - 2)]
  labels = (rng.random((n, k)) < rates).astype(np.int64)
  # Scores that carry some signal, so the metrics are not all near chance.
  scores = np.clip(rng.random((n, k)) * 0.7 + 0.3 * labels, 0, 1).astype(np.float32)
  if tied:
    scores = np.round(scores, 1)
  return scores, labels


CASES = [(s, t) for s in SEEDS for t in (False, True)]
case_ids = [f"seed{s}-{'tied' if t else 'distinct'}" for s, t in CASES]


@pytest.fixture(params=CASES, ids=case_ids)
def case(request):
  return _case(*request.param)


def _has_pos(labels):
  return labels.sum(0) > 0


# ---------------------------------------------------------------- ranking


def test_average_precision_matches_sklearn(case):
  scores, labels = case
  ap = metrics.average_precision(scores, labels)
  assert ap.shape == (labels.shape[1],)
  for c in range(labels.shape[1]):
    if labels[:, c].any():
      want = skm.average_precision_score(labels[:, c], scores[:, c])
      np.testing.assert_allclose(ap[c], want, rtol=1e-12)
    else:
      assert np.isnan(ap[c])
  assert ap[1] == 1.0  # every example positive


def test_roc_auc_matches_sklearn(case):
  scores, labels = case
  auc = metrics.roc_auc(scores, labels)
  for c in range(labels.shape[1]):
    if 0 < labels[:, c].sum() < len(labels):
      np.testing.assert_allclose(auc[c], skm.roc_auc_score(labels[:, c], scores[:, c]),
                                 rtol=1e-12)
    else:
      assert np.isnan(auc[c])
  assert np.isnan(auc[0]) and np.isnan(auc[1])


def test_roc_auc_counts_ties_as_half():
  # positives {0.5, 0.5}, negatives {0.5, 0.1}: pairs (win, win, tie, tie) -> 3/4
  auc = metrics.roc_auc([[0.5], [0.5], [0.5], [0.1]], [[1], [1], [0], [0]])
  assert auc[0] == 0.75


def test_mean_average_precision_matches_sklearn(case):
  scores, labels = case
  has = _has_pos(labels)
  # sklearn's macro/weighted would include the class without positives (with a
  # warning); ours skips it, so compare on the classes with positives.
  for average in ("macro", "weighted"):
    want = skm.average_precision_score(labels[:, has], scores[:, has], average=average)
    got = metrics.mean_average_precision(scores, labels, average=average)
    assert isinstance(got, float)
    np.testing.assert_allclose(got, want, rtol=1e-12)
  want = skm.average_precision_score(labels, scores, average="micro")
  np.testing.assert_allclose(metrics.mean_average_precision(scores, labels, average="micro"),
                             want, rtol=1e-12)
  np.testing.assert_allclose(metrics.mean_average_precision(scores, labels),
                             np.nanmean(metrics.average_precision(scores, labels)))


def test_mean_average_precision_without_positives_is_nan():
  scores = np.random.default_rng(0).random((5, 3))
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no RuntimeWarning from empty means
    for average in ("macro", "micro", "weighted"):
      assert np.isnan(metrics.mean_average_precision(scores, np.zeros((5, 3)), average=average))


def test_ap_of_hand_case():
  # ranking: + - + (0.9, 0.8, 0.7): AP = 1/2 * (1 + 2/3)
  ap = metrics.average_precision([[0.9], [0.8], [0.7]], [[1], [0], [1]])
  np.testing.assert_allclose(ap, [(1 + 2 / 3) / 2])
  # a tie between a positive and a negative at the top is one point: P = 1/2
  ap = metrics.average_precision([[0.9], [0.9], [0.1]], [[1], [0], [0]])
  np.testing.assert_allclose(ap, [0.5])


def test_precision_recall_curve_matches_sklearn(case):
  scores, labels = case
  curves = metrics.precision_recall_curve(scores, labels)
  assert len(curves) == labels.shape[1] and curves[0] is None  # column 0: no positives
  for c in range(1, labels.shape[1]):
    want = skm.precision_recall_curve(labels[:, c], scores[:, c])
    for got, expected in zip(curves[c], want):
      np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_precision_recall_curve_hand_case():
  # ranking: + (0.9), - and + tied (0.5), - (0.2); 2 positives
  (p, r, t), = metrics.precision_recall_curve([[0.9], [0.5], [0.5], [0.2]],
                                              [[1], [0], [1], [0]])
  np.testing.assert_allclose(t, [0.2, 0.5, 0.9])
  np.testing.assert_allclose(p, [2 / 4, 2 / 3, 1, 1])
  np.testing.assert_allclose(r, [1, 1, 1 / 2, 0])
  # padding rows are dropped first
  (p, r, t), = metrics.precision_recall_curve([[0.9], [0.1], [0.3]], [[1], [1], [0]],
                                              mask=[1, 0, 1])
  np.testing.assert_allclose(t, [0.3, 0.9])
  np.testing.assert_allclose(p, [1 / 2, 1, 1])
  np.testing.assert_allclose(r, [1, 1, 0])


# ---------------------------------------------------------------- thresholds


def test_f1_at_thresholds_matches_sklearn(case):
  scores, labels = case
  rng = np.random.default_rng(len(scores))
  for thresholds in (0.5, rng.uniform(0.2, 0.8, labels.shape[1]).round(1)):
    pred = (scores >= thresholds).astype(int)
    got = metrics.f1_at_thresholds(scores, labels, thresholds)
    kw = dict(zero_division=0)
    np.testing.assert_allclose(got["precision"], skm.precision_score(labels, pred, average=None, **kw))
    np.testing.assert_allclose(got["recall"], skm.recall_score(labels, pred, average=None, **kw))
    np.testing.assert_allclose(got["f1"], skm.f1_score(labels, pred, average=None, **kw))
    np.testing.assert_allclose(got["macro_f1"], skm.f1_score(labels, pred, average="macro", **kw))
    np.testing.assert_allclose(got["micro_f1"], skm.f1_score(labels, pred, average="micro", **kw))
    np.testing.assert_allclose(got["micro_precision"],
                               skm.precision_score(labels, pred, average="micro", **kw))
    np.testing.assert_array_equal(got["support"], labels.sum(0))


def _brute_force_thresholds(scores, labels):
  """Highest threshold among the distinct scores that maximises F1, by enumeration."""
  out = []
  for c in range(labels.shape[1]):
    y = labels[:, c].astype(bool)
    cands = np.unique(scores[:, c])[::-1]
    pred = scores[None, :, c] >= cands[:, None]           # (candidates, N)
    tp = (pred & y).sum(1)
    f1 = 2 * tp / (pred.sum(1) + y.sum())
    best = f1.max()
    out.append(cands[np.flatnonzero(f1 == best)[0]] if y.any() else None)
  return out


def test_calibrate_thresholds_maximises_f1(case):
  scores, labels = case
  t = metrics.calibrate_thresholds(scores, labels)
  assert t.shape == (labels.shape[1],) and t.dtype == np.float64
  want = _brute_force_thresholds(scores, labels)
  for c, w in enumerate(want):
    if w is not None:
      assert t[c] == w
  # the no-positive class is never predicted: probabilities -> 2.0
  assert t[0] == 2.0 and not (scores[:, 0] >= t[0]).any()
  # the all-positive class predicts everything (F1 = 1)
  assert t[1] == scores[:, 1].min()
  # the chosen thresholds are exact float32 scores: the same F1 on float32
  pred = scores >= t.astype(np.float32)
  f1 = skm.f1_score(labels, pred.astype(int), average=None, zero_division=0)
  best = [max(skm.f1_score(labels[:, c], scores[:, c] >= v, zero_division=0)
              for v in np.unique(scores[:, c])) for c in (2, 3)]
  np.testing.assert_allclose(f1[2:4], best)
  json.dumps([float(x) for x in t], allow_nan=False)


def test_calibrate_thresholds_hand_cases():
  # one class per column
  scores = np.array([[0.9, 0.9, 0.8], [0.8, 0.6, 0.8], [0.7, 0.5, 0.3], [0.6, 0.4, 0.3]])
  labels = np.array([[1, 1, 1], [0, 0, 0], [1, 0, 1], [0, 1, 0]])
  # col 0: t=.9 F1 2/3, t=.8 1/2, t=.7 4/5, t=.6 2/3          -> 0.7
  # col 1: t=.9 F1 2/3, t=.6 1/2, t=.5 2/5, t=.4 2/3 (a tie)  -> the higher, 0.9
  # col 2: tied scores stay together: t=.8 F1 1/2, t=.3 4/5   -> 0.3
  np.testing.assert_array_equal(metrics.calibrate_thresholds(scores, labels), [0.7, 0.9, 0.3])


def test_calibrate_thresholds_without_positives_with_logits():
  scores = np.array([[5.0, 0.5], [-2.0, -1.0]])
  t = metrics.calibrate_thresholds(scores, [[0, 1], [0, 0]])
  np.testing.assert_array_equal(t, [6.0, 0.5])  # max(1, max score) + 1
  assert metrics.f1_at_thresholds(scores, [[0, 1], [0, 0]], t)["f1"].tolist() == [0.0, 1.0]


def test_calibrate_thresholds_scales():
  # one sort per class: 200k rows must not take anywhere near quadratic time
  rng = np.random.default_rng(0)
  scores = rng.random((200_000, 2)).astype(np.float32)
  labels = rng.random((200_000, 2)) < scores
  t = metrics.calibrate_thresholds(scores, labels)
  assert np.all((t > 0) & (t < 1))


# ---------------------------------------------------------------- top-k


def test_top_k_predictions_hand_cases():
  s = np.array([[0.1, 0.5, 0.5, 0.2], [0.3, 0.3, 0.3, 0.3], [0.0, -1.0, 2.0, 1.0]])
  np.testing.assert_array_equal(metrics.top_k_predictions(s, 1),
                                [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]])
  np.testing.assert_array_equal(metrics.top_k_predictions(s, 2),
                                [[0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 1, 1]])
  assert metrics.top_k_predictions(s, 9).all()  # k >= K: every class
  assert metrics.top_k_predictions(s, 2).dtype == bool
  for bad in (0, -1, 1.5):
    with pytest.raises(ValueError, match="k must be"):
      metrics.top_k_predictions(s, bad)


def test_top_k_predicts_exactly_k_with_ties(case):
  scores, _ = case
  for k in (1, 2, 3):
    pred = metrics.top_k_predictions(scores, k)
    assert (pred.sum(1) == k).all()
    # every chosen score is >= every unchosen one in its row
    chosen_min = np.where(pred, scores, np.inf).min(1)
    other_max = np.where(pred, -np.inf, scores).max(1)
    assert (chosen_min >= other_max).all()


def test_f1_at_top_k_hand_case():
  scores = [[0.9, 0.8, 0.1], [0.2, 0.7, 0.6], [0.5, 0.4, 0.3]]
  labels = [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
  got = metrics.f1_at_top_k(scores, labels, 2)
  # hits 1, 2, 0 of 2 predictions each; recall skips the label-less row
  assert got["precision"] == pytest.approx(0.5)
  assert got["micro_precision"] == pytest.approx(0.5)
  assert got["recall"] == pytest.approx(1.0)
  assert got["micro_recall"] == pytest.approx(1.0)
  assert got["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 3 + 0))


def test_f1_at_top_k_matches_sklearn(case):
  scores, labels = case
  for k in (1, 2, 3):
    pred = metrics.top_k_predictions(scores, k).astype(int)
    got = metrics.f1_at_top_k(scores, labels, k)
    kw = dict(zero_division=0)
    np.testing.assert_allclose(got["micro_f1"], skm.f1_score(labels, pred, average="micro", **kw))
    np.testing.assert_allclose(got["macro_f1"], skm.f1_score(labels, pred, average="macro", **kw))
    np.testing.assert_allclose(got["precision"],
                               skm.precision_score(labels, pred, average="samples", **kw))
    np.testing.assert_allclose(got["micro_precision"],
                               skm.precision_score(labels, pred, average="micro", **kw))
    rows = labels.sum(1) > 0
    np.testing.assert_allclose(got["recall"], skm.recall_score(labels[rows], pred[rows],
                                                               average="samples", **kw))


# ---------------------------------------------------------------- decisions


def test_decision_metrics_match_sklearn(case):
  scores, labels = case
  pred = scores >= 0.5
  np.testing.assert_allclose(metrics.hamming_loss(pred, labels), skm.hamming_loss(labels, pred))
  np.testing.assert_allclose(metrics.hamming_accuracy(pred, labels),
                             1 - skm.hamming_loss(labels, pred))
  np.testing.assert_allclose(metrics.subset_accuracy(pred, labels),
                             skm.accuracy_score(labels, pred))
  np.testing.assert_allclose(metrics.label_cardinality(labels), labels.sum(1).mean())


def test_decision_metrics_hand_case():
  pred = [[1, 0, 1], [0, 1, 0]]
  labels = [[1, 0, 0], [0, 1, 0]]
  assert metrics.hamming_loss(pred, labels) == pytest.approx(1 / 6)
  assert metrics.hamming_accuracy(pred, labels) == pytest.approx(5 / 6)
  assert metrics.subset_accuracy(pred, labels) == 0.5
  assert metrics.label_cardinality(labels) == 1.0


# ---------------------------------------------------------------- baseline


def test_label_prior_scores_and_its_map(case):
  scores, labels = case
  train = np.random.default_rng(7).random((50, labels.shape[1])) < [0.1, 0.9, .2, .3, .4, .5]
  prior = metrics.label_prior_scores(train, len(labels))
  assert prior.shape == labels.shape
  np.testing.assert_allclose(prior, np.broadcast_to(train.mean(0), labels.shape))
  # constant scores: macro mAP is the mean positive rate of the evaluated classes
  has = _has_pos(labels)
  np.testing.assert_allclose(metrics.mean_average_precision(prior, labels),
                             labels.mean(0)[has].mean())
  np.testing.assert_allclose(metrics.mean_average_precision(prior, labels, average="micro"),
                             skm.average_precision_score(labels, prior, average="micro"))
  # a read-only broadcast view (as evaluation builds it) is accepted
  view = np.broadcast_to(train.mean(0).astype(np.float32), labels.shape)
  assert metrics.mean_average_precision(view, labels) == pytest.approx(
      metrics.mean_average_precision(prior, labels))
  with pytest.raises(ValueError, match="train_labels"):
    metrics.label_prior_scores(np.zeros((0, 3)), 4)


# ---------------------------------------------------------------- masking


@pytest.mark.parametrize("seed", SEEDS)
def test_mask_equals_unpadded(seed):
  scores, labels = _case(seed, tied=seed % 2 == 1)
  n, k = labels.shape
  rng = np.random.default_rng(seed + 100)
  pad = 17
  # padding rows full of plausible garbage, scattered among the real rows
  all_scores = np.concatenate([scores, rng.random((pad, k)).astype(np.float32)])
  all_labels = np.concatenate([labels, np.ones((pad, k), np.int64)])
  mask = np.r_[np.ones(n), np.zeros(pad)]
  perm = rng.permutation(n + pad)
  all_scores, all_labels, mask = all_scores[perm], all_labels[perm], mask[perm]
  # the kept rows, in their padded order
  ref_scores, ref_labels = all_scores[mask == 1], all_labels[mask == 1]
  thresholds = metrics.calibrate_thresholds(ref_scores, ref_labels)

  for m in (mask, mask.astype(bool), mask.astype(np.float32)):
    np.testing.assert_array_equal(metrics.average_precision(all_scores, all_labels, m),
                                  metrics.average_precision(ref_scores, ref_labels))
    np.testing.assert_array_equal(metrics.roc_auc(all_scores, all_labels, m),
                                  metrics.roc_auc(ref_scores, ref_labels))
    for average in ("macro", "micro", "weighted"):
      assert (metrics.mean_average_precision(all_scores, all_labels, m, average=average)
              == metrics.mean_average_precision(ref_scores, ref_labels, average=average))
    np.testing.assert_array_equal(metrics.calibrate_thresholds(all_scores, all_labels, m),
                                  thresholds)
    got = metrics.f1_at_thresholds(all_scores, all_labels, thresholds, mask=m)
    want = metrics.f1_at_thresholds(ref_scores, ref_labels, thresholds)
    np.testing.assert_array_equal(got["f1"], want["f1"])
    assert got["micro_f1"] == want["micro_f1"]
    assert (metrics.f1_at_top_k(all_scores, all_labels, 2, mask=m)
            == metrics.f1_at_top_k(ref_scores, ref_labels, 2))
    pred = all_scores >= 0.5
    for fn in (metrics.hamming_loss, metrics.hamming_accuracy, metrics.subset_accuracy):
      assert fn(pred, all_labels, m) == fn(pred[mask == 1], ref_labels)
    assert (metrics.label_cardinality(all_labels, m)
            == metrics.label_cardinality(ref_labels))
    got = metrics.summarize(all_scores, all_labels, m, thresholds=thresholds)
    want = metrics.summarize(ref_scores, ref_labels, thresholds=thresholds)
    assert json.dumps(got) == json.dumps(want)
    assert got["num_examples"] == n


# ---------------------------------------------------------------- summary


SUMMARY_KEYS = {
    "num_examples", "num_classes", "num_scored_classes", "label_cardinality",
    "macro_map", "micro_map", "weighted_map", "macro_auc",
    "f1_top1", "f1_top2", "f1_top3", "precision_top1", "precision_top2", "precision_top3",
    "recall_top1", "recall_top2", "recall_top3", "macro_f1", "micro_f1",
    "hamming_loss", "hamming_accuracy", "subset_accuracy", "per_class_ap", "per_class_auc",
    "binary_accuracy", "all_negative_accuracy",
}


def test_summarize(case):
  scores, labels = case
  s = metrics.summarize(scores, labels)
  assert set(s) == SUMMARY_KEYS
  json.dumps(s, allow_nan=False)  # strict JSON: per-class NaN became None
  assert s["num_examples"] == len(labels) and s["num_classes"] == labels.shape[1]
  assert s["num_scored_classes"] == labels.shape[1] - 1
  assert s["per_class_ap"][0] is None and s["per_class_auc"][:2] == [None, None]
  assert s["macro_map"] == metrics.mean_average_precision(scores, labels)
  assert s["micro_map"] == metrics.mean_average_precision(scores, labels, average="micro")
  assert s["f1_top2"] == metrics.f1_at_top_k(scores, labels, 2)["micro_f1"]
  assert s["precision_top3"] == metrics.f1_at_top_k(scores, labels, 3)["precision"]
  pred = scores >= 0.5
  assert s["macro_f1"] == metrics.f1_at_thresholds(scores, labels, 0.5)["macro_f1"]
  assert s["hamming_accuracy"] == metrics.hamming_accuracy(pred, labels)
  assert s["subset_accuracy"] == metrics.subset_accuracy(pred, labels)
  assert s["binary_accuracy"] == pytest.approx(np.mean(pred == labels.astype(bool)))
  assert s["all_negative_accuracy"] == pytest.approx(1 - labels.mean())
  for key, value in s.items():
    if key.startswith("per_class"):
      assert isinstance(value, list) and len(value) == labels.shape[1]
    else:
      assert type(value) in (int, float), key

  t = metrics.calibrate_thresholds(scores, labels)
  c = metrics.summarize(scores, labels, thresholds=t, ks=(2,))
  assert set(c) == (SUMMARY_KEYS - {"f1_top1", "f1_top3", "precision_top1", "precision_top3",
                                    "recall_top1", "recall_top3"}
                    | {"macro_f1_calibrated", "micro_f1_calibrated"})
  assert c["macro_f1"] == s["macro_f1"]  # still at 0.5
  assert c["binary_accuracy"] == s["binary_accuracy"]  # the paper's rule, never calibrated
  assert c["macro_f1_calibrated"] == metrics.f1_at_thresholds(scores, labels, t)["macro_f1"]
  assert c["macro_f1_calibrated"] >= s["macro_f1"]  # calibrated on this very data
  assert c["subset_accuracy"] == metrics.subset_accuracy(scores >= t, labels)


# ---------------------------------------------------------------- validation


def test_invalid_inputs_raise():
  s, y = np.random.default_rng(0).random((4, 3)), np.zeros((4, 3), int)
  with pytest.raises(ValueError, match="does not match"):
    metrics.average_precision(s, y[:, :2])
  with pytest.raises(ValueError, match="labels must be 0/1"):
    metrics.roc_auc(s, y + 2)
  with pytest.raises(ValueError, match="labels must be 0/1"):
    metrics.average_precision(s, np.full((4, 3), 0.5))
  with pytest.raises(ValueError, match="2-D"):
    metrics.average_precision(s[:, 0], y[:, 0])
  with pytest.raises(ValueError, match="NaN"):
    metrics.average_precision(np.where(s > 0.5, np.nan, s), y)
  with pytest.raises(ValueError, match=r"mask must have shape \(4,\)"):
    metrics.summarize(s, y, np.ones(3))
  with pytest.raises(ValueError, match="mask must be 0/1"):
    metrics.mean_average_precision(s, y, np.full(4, 0.5))
  with pytest.raises(ValueError, match="thresholds"):
    metrics.f1_at_thresholds(s, y, [0.5, 0.5])
  with pytest.raises(ValueError, match="average"):
    metrics.mean_average_precision(s, y, average="samples")
  with pytest.raises(ValueError, match="pred must be 0/1"):
    metrics.hamming_loss(s, y)
  with pytest.raises(ValueError, match="does not match"):
    metrics.subset_accuracy(y[:2], y)
