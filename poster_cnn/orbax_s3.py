"""s3:// checkpoint directories for orbax 0.12, through tensorstore's own s3 driver.

orbax writes a checkpoint's metadata through etils.epath (s3fs: works as is) and its
arrays through tensorstore key-value stores whose specs
`orbax.checkpoint._src.serialization.tensorstore_utils` builds. That module knows two
kinds of path: gs:// (tensorstore's gcs driver) and everything else, which goes to the
local file driver after `os.path.normpath` has turned 's3://b/x' into 's3:/b/x'. orbax
has no public hook for the kvstore spec, so `install()` wraps the three private
functions that decide it, for s3:// paths only:

  _normalize_path        keeps 's3://' whole, as it already does for 'gs://'
  _use_gcs_driver        true for s3:// too: "an object store, not a local path"
  get_kvstore_for_gcs    an s3 spec for s3:// paths (`kvstore_spec`: driver 's3', bucket,
                         path, endpoint, aws_region, aws_credentials); gs:// as before

Every other path orbax sees is untouched. `install()` checks that the three functions
exist before it wraps anything, and `checkpoint.checkpoint_dir` refuses s3:// before a
write when they do not (a newer orbax that moved them), so the failure is one clear line
instead of arrays written to a local './s3:' folder.

S3 has no rename, so s3:// managers commit a step the way orbax does on GCS: written in
place, then `commit_success.txt` (`ocp.options.AtomicityMode.COMMIT_FILE`, public).

The endpoint, region and credentials come from the variables botocore (and so s3fs)
reads: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, AWS_REGION or AWS_DEFAULT_REGION,
AWS_ACCESS_KEY_ID (+ secret, session token). Without an endpoint tensorstore talks to
AWS and finds the bucket's region itself; without keys, its default credential chain
(~/.aws, instance metadata).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable
from urllib import parse

try:  # private modules: a newer orbax may move them; then s3:// is refused, not a crash
  from orbax.checkpoint._src.path import gcs_utils
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
except ImportError:
  gcs_utils = ts_utils = None

_PATCHED = ("_normalize_path", "_use_gcs_driver")
_installed = False


def missing() -> str | None:
  """None when `install()` can work with this orbax; else what is missing, in words."""
  if ts_utils is None or gcs_utils is None:
    return ("this orbax-checkpoint has no _src.serialization.tensorstore_utils or "
            "_src.path.gcs_utils (written against 0.12.8)")
  absent = [f"tensorstore_utils.{name}" for name in _PATCHED
            if not callable(getattr(ts_utils, name, None))]
  if not callable(getattr(gcs_utils, "get_kvstore_for_gcs", None)):
    absent.append("gcs_utils.get_kvstore_for_gcs")
  if absent:
    return f"this orbax-checkpoint has no {', '.join(absent)} (written against 0.12.8)"
  return None


def kvstore_spec(url: str) -> dict[str, Any]:
  """tensorstore's s3 kvstore spec for 's3://bucket/some/prefix'.

  The path keeps no leading slash; the endpoint and region come from the AWS variables
  (see the module docstring), so the spec points where s3fs points.
  """
  parsed = parse.urlparse(url)
  if parsed.scheme != "s3" or not parsed.netloc:
    raise ValueError(f"{url}: not an s3://bucket/path URL")
  spec: dict[str, Any] = {"driver": "s3", "bucket": parsed.netloc,
                          "path": parsed.path.lstrip("/")}
  endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
  if endpoint:
    spec["endpoint"] = endpoint
  region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
  if region:
    spec["aws_region"] = region
  if os.environ.get("AWS_ACCESS_KEY_ID"):
    # Straight to the variables: the default chain first looks for ~/.aws files and logs
    # an error line per missing file on every open.
    spec["aws_credentials"] = {"type": "environment"}
  return spec


def _is_s3(path: Any) -> bool:
  return str(path).startswith("s3://")


def _normalize_path(original: Callable[[str], str], path: str) -> str:
  if _is_s3(path):
    return "s3://" + os.path.normpath(str(path)[len("s3://"):])
  return original(path)


def _use_gcs_driver(original: Callable[[str], bool], directory: str) -> bool:
  return _is_s3(directory) or original(directory)


def _kvstore_for(original: Callable[[str], dict], path: str) -> dict:
  return kvstore_spec(path) if _is_s3(path) else original(path)


def install() -> None:
  """Teaches orbax's tensorstore specs s3:// paths (once per process; idempotent).

  Raises RuntimeError naming what is missing when this orbax lacks the functions.
  """
  global _installed
  if _installed:
    return
  problem = missing()
  if problem:
    raise RuntimeError(problem)
  for name, wrapper in (("_normalize_path", _normalize_path),
                        ("_use_gcs_driver", _use_gcs_driver)):
    setattr(ts_utils, name, functools.partial(wrapper, getattr(ts_utils, name)))
  gcs_utils.get_kvstore_for_gcs = functools.partial(_kvstore_for,
                                                    gcs_utils.get_kvstore_for_gcs)
  _installed = True
