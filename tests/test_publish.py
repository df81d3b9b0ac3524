"""Staging and publishing a converted dataset: interrupts at the worst instants."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from poster_cnn import interrupts
from poster_cnn.data import convert as conv
from poster_cnn.data import publish

from test_convert import VOCAB, make_kaggle


@pytest.fixture
def sigterm_raises():
  """SIGTERM raises the converter's Terminated here, as poster-cnn-convert installs it,
  and SIGINT KeyboardInterrupt, as in any Python started from a shell (a pytest-xdist
  worker ignores SIGINT)."""
  previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  signal.signal(signal.SIGTERM, conv._raise_terminated)
  signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  for s, handler in previous.items():
    signal.signal(s, handler)


def _beside(path: Path) -> list[str]:
  return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def test_deferred_interrupts_deliver_after_the_block(sigterm_raises):
  done = []
  with pytest.raises(conv.Terminated):
    with interrupts.deferred_interrupts():
      signal.raise_signal(signal.SIGTERM)
      signal.raise_signal(signal.SIGTERM)  # delivered once
      done.append("after the signal")
  assert done == ["after the signal"]
  assert signal.getsignal(signal.SIGTERM) is conv._raise_terminated
  with pytest.raises(KeyboardInterrupt):
    with interrupts.deferred_interrupts():
      signal.raise_signal(signal.SIGINT)
      done.append("after Ctrl-C")
  assert done[-1] == "after Ctrl-C"


def test_an_interrupt_just_after_the_staging_mkdir_leaves_nothing(tmp_path, monkeypatch,
                                                                  sigterm_raises):
  made = publish.sibling

  def mkdir_then_signal(path, kind):
    made_path = made(path, kind)
    signal.raise_signal(signal.SIGTERM)  # before sibling() has even returned the name
    return made_path

  monkeypatch.setattr(publish, "sibling", mkdir_then_signal)
  out = tmp_path / "out"
  with pytest.raises(conv.Terminated):
    with publish.staging(out):
      pytest.fail("the block must not start")
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("between", ["renames", "rename_and_removal"])
def test_an_interrupt_in_the_swap_is_delivered_after_it(tmp_path, monkeypatch, sigterm_raises,
                                                        between):
  out = tmp_path / "out"
  out.mkdir()
  (out / "old.txt").write_text("old")
  rename, renames = os.rename, []

  def rename_then_signal(src, dst):
    rename(src, dst)
    renames.append(dst)
    if between == "renames" or len(renames) == 2:
      signal.raise_signal(signal.SIGTERM)

  with pytest.raises(conv.Terminated):
    with publish.staging(out) as stage:
      (stage.path / "new.txt").write_text("new")
      monkeypatch.setattr(os, "rename", rename_then_signal)
      stage.publish()
  monkeypatch.undo()
  assert stage.published and [p.name for p in out.iterdir()] == ["new.txt"]
  assert _beside(out) == []


def test_a_failed_block_removes_the_staging_directory_and_keeps_the_old_output(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "old.txt").write_text("old")
  with pytest.raises(RuntimeError):
    with publish.staging(out) as stage:
      (stage.path / "new.txt").write_text("partial")
      raise RuntimeError("stopped")
  assert [p.name for p in out.iterdir()] == ["old.txt"] and _beside(out) == []


def test_a_conversion_interrupted_after_publishing_keeps_it_and_says_so(
    tmp_path, monkeypatch, sigterm_raises):
  csv_path, _ = make_kaggle(tmp_path, n=12)
  out = tmp_path / "out"
  real_publish = publish.Staging.publish

  def publish_then_signal(stage):
    real_publish(stage)
    signal.raise_signal(signal.SIGTERM)  # held until the report beside says ok too

  monkeypatch.setattr(publish.Staging, "publish", publish_then_signal)
  with pytest.raises(conv.Terminated) as raised:
    conv.convert(csv_path, out, vocabulary=VOCAB, num_workers=0)
  assert raised.value.published
  assert conv.is_converted_dataset(out) and _beside(out) == []
  report = json.loads(Path(f"{out}.report.json").read_text())
  assert report["status"] == "ok" and report["summary"]["converted"] == 12
  assert conv._outcome(raised.value, str(out)) == f"{out} had been written in full"
