"""gcp-storage-emulator as the tests run it: `python tests/gcs_emulator.py HOST PORT`.

The emulator (2026.7.19) answers object downloads without the `x-goog-generation`
header that real GCS sends. tensorstore's OCDBT driver, which orbax writes
checkpoints through, reads its manifest back during a save and then fails with
"Malformed StorageGeneration" (a save of more than one batch of arrays, so it
happens at random). This adds the header; nothing else changes.
"""

import sys
import time

from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.server import create_server

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # not found: the status is already set
    return
  response["x-goog-generation"] = obj["generation"]
  response["x-goog-metageneration"] = obj.get("metageneration", "1")


objects.download = _download_with_generation  # `objects.get` looks it up at each call

if __name__ == "__main__":
  server = create_server(sys.argv[1], int(sys.argv[2]), in_memory=True)
  server.start()
  try:
    while True:
      time.sleep(3600)
  except KeyboardInterrupt:
    server.stop()
