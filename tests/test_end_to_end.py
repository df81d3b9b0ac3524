"""The README's path in miniature: synthesize -> convert -> train -> evaluate -> predict."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args):
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, f"{module} {args}\n{proc.stdout}\n{proc.stderr[-3000:]}"
  return proc


def test_synthetic_posters_to_predictions(tmp_path):
  src, data, run = tmp_path / "src", tmp_path / "data", tmp_path / "run"
  _run("poster_cnn.data.synthetic", f"--out_dir={src}", "--num_posters=160", "--width=32",
       "--num_workers=1")
  _run("poster_cnn.data.convert", f"--csv={src}/MovieGenre.csv", f"--image_dir={src}/posters",
       f"--output_dir={data}", "--vocabulary=paper", "--num_workers=1",
       "--splits=train:0.6,validation:0.2,test:0.2")
  _run("poster_cnn.main", "--config=configs/tiny.py", f"--config.data_dir={data}",
       f"--workdir={run}")
  out = _run("poster_cnn.main", "--mode=evaluate", f"--workdir={run}").stdout
  assert "macro mAP" in out
  [folder] = os.listdir(run / "evaluations")
  [result] = [f for f in os.listdir(run / "evaluations" / folder)
              if f.startswith("test_step") and f.endswith(".json")]
  summary = json.loads((run / "evaluations" / folder / result).read_text())
  assert summary["vocabulary"][:2] == ["action", "adventure"]
  assert 25 <= summary["num_examples"] <= 40
  first = sorted(os.listdir(src / "posters"))[0]
  out = _run("poster_cnn.main", "--mode=predict", f"--workdir={run}",
             f"--images={src}/posters/{first}", "--format=json").stdout
  [prediction] = json.loads(out)
  assert len(prediction["top_k"]) == 2 and prediction["path"].endswith(first)
