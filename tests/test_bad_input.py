"""A corpus of hostile input: each kind must end in a clear message (a ConversionError,
which the command line prints without a traceback) or a reported skip naming the row,
and must leave every existing output as it was.

Converter inputs are tens of 32x32 posters converted in-process; checkpoint damage is
done to checkpoints saved from a tiny initialised state (tests/test_checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from poster_cnn import checkpoint
from poster_cnn.data import convert as conv
from poster_cnn.data import records

from test_checkpoint import DAMAGE, _iterator, _save_steps, setup  # noqa: F401 (fixture)
from test_convert import KAGGLE_HEADER, VOCAB, kaggle_row, make_kaggle, read_split, write_csv

REPO = Path(__file__).resolve().parents[1]


def snapshot(directory: Path) -> dict[str, str]:
  """sha256 of every file under `directory` but conversion reports (rewritten by design,
  to say why a run failed) and dot-named leftovers (removed by design)."""
  out = {}
  for root, dirs, files in os.walk(directory):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    for name in files:
      if name.endswith(".report.json") or name.startswith("."):
        continue
      path = Path(root, name)
      out[str(path.relative_to(directory))] = hashlib.sha256(path.read_bytes()).hexdigest()
  return out


@dataclasses.dataclass
class Case:
  """A bad input: `build(dir)` writes it and returns convert()'s arguments; the run
  must raise ConversionError matching `error`, or report `skips` {reason: [(id, line)]}
  and convert `converted` rows of the `rows` read."""

  build: Callable[[Path], dict]
  error: str | None = None
  skips: dict | None = None
  rows: int | None = None
  converted: int | None = None
  check: Callable[[Path, dict], None] | None = None


def _kaggle(d: Path, n=30, **kwargs) -> tuple[Path, dict]:
  return make_kaggle(d, n=n, **kwargs)


def _csv_with_line(d: Path, line: int, replace: Callable[[str], str], n=30) -> dict:
  csv_path, _ = _kaggle(d, n)
  lines = csv_path.read_text().splitlines(keepends=True)
  lines[line - 1] = replace(lines[line - 1])
  csv_path.write_text("".join(lines))
  return dict(csv_path=csv_path, output_dir=d / "out")


def _unbalanced(line: int):
  # "Movie 1000NN" -> "Movie 1000NN (an opening quote, never closed)
  return lambda d: _csv_with_line(d, line, lambda s: s.replace(",Movie", ',"Movie', 1))


def _quoted_newline_in_title(d: Path) -> dict:
  return _csv_with_line(d, 5, lambda s: s.replace(",Movie 100003,", ',"Movie\n100003",', 1))


def _check_title(out: Path, report: dict) -> None:
  titles = {e["id"]: e["title"] for s in ("train", "validation", "test")
            for e in read_split(out, s)}
  assert titles["100003"] == "Movie 100003"


def _quoted_newline_in_genre(d: Path) -> dict:
  return _csv_with_line(d, 5, lambda s: s.replace(",7.1,", ',7.1,"Drama\n', 1).replace(
      ",https", '",https', 1))


def _id_is_a_path(d: Path) -> dict:
  csv_path, _ = _kaggle(d, 20, extra_rows=[kaggle_row("../outside", "Drama"),
                                           kaggle_row("/etc/hostname", "Drama")])
  (d / "outside.jpg").write_bytes((d / "posters" / "100000.jpg").read_bytes())
  return dict(csv_path=csv_path, output_dir=d / "out")


def _utf8_with_a_latin1_byte(d: Path) -> dict:
  csv_path, _ = _kaggle(d, 30)
  text = csv_path.read_text().replace("Movie 100001,", "Amélie,").replace(
      "Movie 100002,", "CAFE_MARK,")
  csv_path.write_bytes(text.encode("utf-8").replace(b"CAFE_MARK", b"Caf\xe9"))
  return dict(csv_path=csv_path, output_dir=d / "out")


def _check_utf8(out: Path, report: dict) -> None:
  assert report["encoding"] == "utf-8"
  titles = {e["id"]: e["title"] for s in ("train", "validation", "test")
            for e in read_split(out, s)}
  assert titles["100001"] == "Amélie"


def _output_is_a_file(d: Path) -> dict:
  csv_path, _ = _kaggle(d, 10)
  (d / "out").write_text("not a dataset")
  return dict(csv_path=csv_path, output_dir=d / "out", overwrite=True)


def _output_is_another_folder(d: Path) -> dict:
  csv_path, _ = _kaggle(d, 10)
  (d / "out" / "sub").mkdir(parents=True)
  (d / "out" / "notes.txt").write_text("keep me")
  (d / "out" / "sub" / "metadata.json").write_text("{}")
  return dict(csv_path=csv_path, output_dir=d / "out", overwrite=True)


def _parent_is_a_file(d: Path) -> dict:
  csv_path, _ = _kaggle(d, 10)
  (d / "parent").write_text("a file")
  return dict(csv_path=csv_path, output_dir=d / "parent" / "out")


def _output_in_proc(d: Path) -> dict:
  csv_path, _ = _kaggle(d, 10)
  return dict(csv_path=csv_path, output_dir=Path("/proc/poster_cnn_test_output"))


_DEAD_PID = 2**22 + 1  # above Linux's largest pid_max: never a live process


def _leftover_staging(d: Path) -> dict:
  csv_path, _ = _kaggle(d, 10)
  junk = d / f".out.tmp-{_DEAD_PID}-0123abcd"
  junk.mkdir()
  (junk / "movie_posters-train.partial-00000").write_bytes(b"partial")
  return dict(csv_path=csv_path, output_dir=d / "out")


def _check_no_leftovers(out: Path, report: dict) -> None:
  assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]


def _interrupted_swap(d: Path) -> dict:
  # Killed between moving the old dataset aside and renaming the new one into place.
  csv_path, _ = _kaggle(d, 10)
  aside = d / f".out.old-{_DEAD_PID}-0123abcd"
  aside.mkdir()
  conv.convert(csv_path, aside / "out", vocabulary=VOCAB, num_workers=0)
  return dict(csv_path=csv_path, output_dir=d / "out")


def _check_restored(out: Path, report: dict) -> None:
  assert conv.is_converted_dataset(out)
  _check_no_leftovers(out, report)


CASES = {
    "unbalanced_quote_early": Case(_unbalanced(3), rows=30, converted=29,
                                   skips={"malformed_row": [("100001", 3)]}),
    "unbalanced_quote_late": Case(_unbalanced(29), rows=30, converted=29,
                                  skips={"malformed_row": [("100027", 29)]}),
    "quoted_newline_in_title": Case(_quoted_newline_in_title, rows=30, converted=30, skips={},
                                    check=_check_title),
    "quoted_newline_in_genre": Case(_quoted_newline_in_genre, rows=30, converted=29,
                                    skips={"malformed_row": [("100003", 5)]}),
    "id_is_a_path": Case(_id_is_a_path, rows=22, converted=20,
                         skips={"invalid_id": [("../outside", 22), ("/etc/hostname", 23)]}),
    "utf8_with_a_latin1_byte": Case(_utf8_with_a_latin1_byte, rows=30, converted=29,
                                    skips={"undecodable_text": [("100002", 4)]},
                                    check=_check_utf8),
    "overwrite_a_file": Case(_output_is_a_file, error="is a file, not a dataset"),
    "overwrite_another_folder": Case(_output_is_another_folder, error="holds no dataset"),
    "output_parent_is_a_file": Case(_parent_is_a_file, error="cannot write there"),
    "output_in_proc": Case(_output_in_proc, error="cannot write there"),
    "leftover_staging_directory": Case(_leftover_staging, rows=10, converted=10, skips={},
                                       check=_check_no_leftovers),
    "interrupted_overwrite_swap": Case(_interrupted_swap, error="pass --overwrite",
                                       check=_check_restored),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_converter_bad_input(tmp_path, kind):
  case = CASES[kind]
  args = {"vocabulary": VOCAB, "num_workers": 0, "max_skipped_fraction": 0.2,
          **case.build(tmp_path)}
  before = snapshot(tmp_path)
  if case.error:
    with pytest.raises(conv.ConversionError, match=case.error):
      conv.convert(**args)
    report = None
  else:
    report = conv.convert(**args)
    assert report["summary"]["rows"] == case.rows
    assert report["summary"]["converted"] == case.converted
    found = {r: [(e["id"], e["line"]) for e in v["rows"]] for r, v in report["reasons"].items()
             if r not in ("duplicate", "unlabeled")}
    assert found == case.skips
    for rows in report["reasons"].values():
      assert all(e.get("detail") or e["id"] for e in rows["rows"])
  after = snapshot(tmp_path)
  # Nothing that existed changed; only the new output (and its report) appeared.
  assert {k: v for k, v in after.items() if k in before} == before
  if case.check:
    case.check(Path(args["output_dir"]), report)


def _cli(csv_path, output_dir, *extra, **kwargs):
  return subprocess.Popen(
      [sys.executable, "-m", "poster_cnn.data.convert", f"--csv={csv_path}",
       f"--output_dir={output_dir}", f"--vocabulary={VOCAB}", *extra],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.parametrize("kind", ["overwrite_a_file", "output_parent_is_a_file"])
def test_command_line_prints_the_error_without_a_traceback(tmp_path, kind):
  args = CASES[kind].build(tmp_path)
  proc = _cli(args["csv_path"], args["output_dir"], "--overwrite", "--num_workers=0")
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 1 and CASES[kind].error in err
  assert "Traceback" not in out + err


def test_sigterm_during_overwrite_leaves_the_old_dataset_and_nothing_else(tmp_path):
  csv_path, _ = make_kaggle(tmp_path, n=1000)  # a conversion long enough to be caught in flight
  out = tmp_path / "out"
  conv.convert(csv_path, out, vocabulary=VOCAB, num_workers=0)
  before = snapshot(tmp_path)
  proc = _cli(csv_path, out, "--overwrite", "--num_workers=1", "--seed=5")
  deadline = time.monotonic() + 120
  # The staging directory exists from the CSV's reading to the swap; the worker's start
  # alone (a spawned interpreter importing PIL) keeps it there for a while.
  while not list(tmp_path.glob(".out.tmp-*")) and time.monotonic() < deadline:
    time.sleep(0.005)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-2000:]
  assert "terminated" in err and "Traceback" not in err
  assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
  assert {k: v for k, v in snapshot(tmp_path).items() if k in before} == before


# ------------------------------------------------------------------ checkpoints


def _all_damaged(step_dir: str) -> None:
  for step in ("1", "2"):
    DAMAGE["truncated"](os.path.join(os.path.dirname(step_dir), step))


def _directory_deleted(step_dir: str) -> None:
  shutil.rmtree(os.path.dirname(step_dir))


def _directory_deleted_then_recreated_by_a_write(step_dir: str) -> None:
  # tensorstore makes the directories of the array it writes: a save in flight while
  # checkpoints/ is deleted brings it back, holding only the remains of that save.
  shutil.rmtree(os.path.dirname(step_dir))
  leftover = os.path.join(os.path.dirname(step_dir), "3.orbax-checkpoint-tmp", "state")
  os.makedirs(leftover)
  open(os.path.join(leftover, "manifest.ocdbt"), "wb").close()


CHECKPOINT_DAMAGE = {**DAMAGE, "every_checkpoint": _all_damaged,
                     "checkpoints_deleted": _directory_deleted,
                     "checkpoints_deleted_and_recreated": _directory_deleted_then_recreated_by_a_write}


@pytest.mark.parametrize("damage", sorted(CHECKPOINT_DAMAGE))
def test_damaged_checkpoints_are_reported_and_fallen_back_from(  # noqa: F811 (setup)
    setup, tmp_path, caplog, capfd, damage):
  c, state, abstract = setup
  manager = _save_steps(tmp_path, c, state)
  sound = snapshot(tmp_path / "checkpoints" / "1")
  CHECKPOINT_DAMAGE[damage](str(tmp_path / "checkpoints" / "2"))
  with caplog.at_level(logging.WARNING):
    step, _ = checkpoint.restore_latest(manager, abstract, _iterator(c))
  messages = "\n".join(r.getMessage() for r in caplog.records)
  printed = capfd.readouterr()
  assert "Traceback" not in printed.err + printed.out
  assert "Event loop is closed" not in printed.err + printed.out + messages
  if damage.startswith("checkpoints_deleted"):
    assert step is None and "was deleted during the run: recreating it" in messages
    checkpoint.save(manager, 3, state, None)  # the run goes on saving
    manager.wait_until_finished()
    assert manager.all_steps() == [3]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [".poster_cnn", "3"]
    return
  assert str(tmp_path / "checkpoints" / "2") in messages
  if damage == "every_checkpoint":
    assert step is None and str(tmp_path / "checkpoints" / "1") in messages
    return
  assert step == 1
  # The sound checkpoint is neither moved nor changed.
  assert snapshot(tmp_path / "checkpoints" / "1") == sound
  assert [d.split("-")[0] for d in os.listdir(tmp_path / "checkpoints_broken")] == ["2"]


def test_checkpoints_deleted_mid_run_are_recreated_without_a_traceback(tiny_dataset, tmp_path):
  proc = subprocess.Popen(
      [sys.executable, "-m", "poster_cnn.main", f"--config={REPO}/configs/tiny.py",
       f"--config.data_dir={tiny_dataset}", f"--workdir={tmp_path}",
       "--config.num_train_steps=24", "--config.checkpoint_every_steps=2",
       "--config.eval_every_steps=100", "--config.log_every_steps=100"],
      cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 240
  while not (tmp_path / "checkpoints" / "4").exists() and time.monotonic() < deadline:
    time.sleep(0.01)
  # As `rm -rf` does it, but at once: the run keeps writing into the directory.
  os.rename(tmp_path / "checkpoints", tmp_path / "gone")
  shutil.rmtree(tmp_path / "gone")
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0 and "Traceback" not in err, "\n".join(
      line for line in err.splitlines() if "poster_cnn" in line or "Error" in line)
  assert checkpoint.create_manager(tmp_path, read_only=True).latest_step() == 24
