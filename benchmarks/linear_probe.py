"""How far the fixed features of a pretrained backbone go: heads trained on cached features.

Computes EfficientNet-Lite0's pooled ImageNet features (inference mode, 1,280 per poster,
each poster and its mirror image) once for every poster of a converted dataset's splits,
then trains classifiers on them in seconds each, and prints one machine-readable line per
head with the validation-selected epoch's scores:

  probe head=logistic_std lr=0.0003 epochs=40 best_epoch=3 val_macro_map=0.338 val_auc=0.746

Heads: `logistic_std` (features standardised, batch 256, the mirror's probabilities averaged
at validation), `mlp_std` (the same with a 512-unit ReLU layer, dropout 0.5) and
`logistic_raw`, the head as `configs/posters_best.py` trains it (raw features, batch 32,
head dropout 0.2, AdamW with a warmup epoch then cosine, each poster or its mirror at
random). Validation only: the test split is left to `poster-cnn --mode=evaluate`.

    python benchmarks/linear_probe.py --data_dir=/tmp/movie_posters \\
        --weights=$HOME/weights/efficientnet_lite0 --cache=/tmp/lite0_features.npz
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from poster_cnn import efficientnet, metrics, pretrained  # noqa: E402
from poster_cnn.data import pipeline, records, tfrecord  # noqa: E402

_DATA = flags.DEFINE_string("data_dir", None, "A converted dataset.", required=True)
_WEIGHTS = flags.DEFINE_string("weights", None, "poster-cnn-convert-weights' directory.",
                               required=True)
_CACHE = flags.DEFINE_string("cache", "", "Features are read from / written to this .npz.")
_SIZE = flags.DEFINE_integer("image_size", 224, "Posters are stretched to this square.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Posters per split (0: all); for a quick look.")
_SPLITS = ("train", "validation")


def features(data_dir: str, weights: str, size: int, limit: int) -> dict:
  """{split: {'f', 'f_mirror': float32 (n, 1280), 'y': uint8 (n, genres)}}."""
  model = efficientnet.EfficientNetLite(num_classes=1000, depthwise_impl="taps")
  variables = pretrained.load_variables(weights)

  def pooled(x):
    _, state = model.apply(variables, x, train=False, mutable=["intermediates"],
                           capture_intermediates=lambda m, _: m.name == "head_bn")
    return jax.nn.relu6(state["intermediates"]["head_bn"]["__call__"][0]).mean(axis=(1, 2))

  batch_features = jax.jit(lambda x: (pooled(x), pooled(x[:, :, ::-1])))
  meta = records.read_metadata(data_dir)
  fmt = pipeline.image_format(meta)
  out = {}
  for split in _SPLITS:
    serialised = [r for f in records.split_files(data_dir, meta, split)
                  for r in tfrecord.iter_records(f)]
    serialised = serialised[:limit] if limit else serialised
    parsed = [pipeline.image_and_labels(r) for r in serialised]
    f, f_mirror, start = [], [], time.monotonic()
    for i in range(0, len(parsed), 64):
      chunk = parsed[i:i + 64]
      images = np.zeros((64, size, size, 3), np.uint8)  # padded to one compiled shape
      for j, (data, _) in enumerate(chunk):
        pipeline.decode_stored(data, (size, size), fmt, out=images[j])  # stretched
      a, b = batch_features(images)
      f.append(np.asarray(a)[:len(chunk)])
      f_mirror.append(np.asarray(b)[:len(chunk)])
    print(f"features split={split} posters={len(parsed)} "
          f"img_per_s={len(parsed) / (time.monotonic() - start):.1f}", flush=True)
    out[split] = {"f": np.concatenate(f), "f_mirror": np.concatenate(f_mirror),
                  "y": np.stack([labels for _, labels in parsed])}
  return out


def train_head(feats: dict, *, hidden: int, standardise: bool, lr: float, epochs: int,
               batch: int, dropout: float, schedule: str, seed: int = 0) -> tuple[int, float, float]:
  """Trains one head; returns (best epoch, its validation macro mAP, its macro ROC-AUC)."""
  tr, va = feats["train"], feats["validation"]
  mu, sd = tr["f"].mean(0), tr["f"].std(0) + 1e-6
  norm = (lambda x: (x - mu) / sd) if standardise else (lambda x: x)
  x_tr, x_tr_m = norm(tr["f"]), norm(tr["f_mirror"])
  y_tr = tr["y"].astype(np.float32)
  n, dim, genres = len(y_tr), x_tr.shape[1], y_tr.shape[1]
  key = jax.random.key(seed)
  k1, k2, key = jax.random.split(key, 3)
  prior = np.clip(y_tr.mean(0), 1e-3, 1 - 1e-3)
  params = {"b": jnp.asarray(np.log(prior / (1 - prior)))}
  if hidden:
    params |= {"w1": jax.random.normal(k1, (dim, hidden)) * (2 / dim) ** 0.5,
               "b1": jnp.zeros(hidden), "w": jax.random.normal(k2, (hidden, genres)) * hidden ** -0.5}
  else:
    params["w"] = jnp.zeros((dim, genres))
  steps_per_epoch = max(n // batch, 1)
  rate = (optax.warmup_cosine_decay_schedule(0.0, lr, steps_per_epoch, epochs * steps_per_epoch)
          if schedule == "cosine" else lr)
  opt = optax.adamw(rate, weight_decay=1e-4)

  def logits(p, x, k=None):
    if hidden:
      x = jax.nn.relu(x @ p["w1"] + p["b1"])
    if k is not None and dropout:
      x = x * jax.random.bernoulli(k, 1 - dropout, x.shape) / (1 - dropout)
    return x @ p["w"] + p["b"]

  @jax.jit
  def step(p, state, x, y, k):
    grads = jax.grad(lambda p: optax.sigmoid_binary_cross_entropy(logits(p, x, k), y).mean())(p)
    updates, state = opt.update(grads, state, p)
    return optax.apply_updates(p, updates), state

  probs = jax.jit(lambda p, x: jax.nn.sigmoid(logits(p, x)))
  state, rng, best = opt.init(params), np.random.default_rng(seed), (0, -1.0, 0.0)
  for epoch in range(1, epochs + 1):
    order = rng.permutation(n)
    mirrored = rng.random(n) < 0.5
    x_epoch = np.where(mirrored[:, None], x_tr_m, x_tr)
    for i in range(0, steps_per_epoch * batch, batch):
      key, k = jax.random.split(key)
      params, state = step(params, state, x_epoch[order[i:i + batch]],
                           y_tr[order[i:i + batch]], k)
    scores = np.asarray(probs(params, norm(va["f"])))
    if standardise:  # the mirror's probabilities averaged in
      scores = (scores + np.asarray(probs(params, norm(va["f_mirror"])))) / 2
    score = metrics.mean_average_precision(scores, va["y"])
    if score > best[1]:
      best = (epoch, score, float(np.nanmean(metrics.roc_auc(scores, va["y"]))))
  return best


HEADS = {
    "logistic_std": dict(hidden=0, standardise=True, lr=3e-4, epochs=40, batch=256,
                         dropout=0.0, schedule="constant"),
    "mlp_std": dict(hidden=512, standardise=True, lr=3e-4, epochs=40, batch=256,
                    dropout=0.5, schedule="constant"),
    "logistic_raw": dict(hidden=0, standardise=False, lr=3e-3, epochs=3, batch=32,
                         dropout=0.2, schedule="cosine"),
}


def main(argv):
  del argv
  cache = _CACHE.value
  if cache and os.path.exists(cache):
    saved = np.load(cache)
    feats = {s: {k: saved[f"{s}_{k}"] for k in ("f", "f_mirror", "y")} for s in _SPLITS}
  else:
    feats = features(_DATA.value, _WEIGHTS.value, _SIZE.value, _LIMIT.value)
    if cache:
      np.savez(cache, **{f"{s}_{k}": v for s, d in feats.items() for k, v in d.items()})
  for name, head in HEADS.items():
    epoch, score, auc = train_head(feats, **head)
    print(f"probe head={name} lr={head['lr']} epochs={head['epochs']} best_epoch={epoch} "
          f"val_macro_map={score:.3f} val_auc={auc:.3f}", flush=True)


if __name__ == "__main__":
  app.run(main)
