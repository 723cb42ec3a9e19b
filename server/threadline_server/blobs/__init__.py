"""Blob stores: the domain's `BlobStore` port on local disk (`local`) and Google Cloud Storage
(`gcs`). This package is the only one that imports google.cloud.storage; it never imports the
storage (SQL) or transport layers. The HTTP side of the local backend (aiohttp handlers) lives in
`transport.blob_http`, which imports `blobs.local`.

`gcs` is imported lazily by `create_blob_store`, so a local-disk server never loads the Google
client libraries.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from threadline_server.domain.uploads import BlobStore


def create_blob_store(
    backend: Literal["local", "gcs"],
    *,
    data_dir: Path,
    public_url: str | Callable[[], str],
    bucket: str = "",
    gcs_endpoint: str = "",
    gcs_credentials_file: str = "",
    gcs_anonymous: bool = False,
    gcs_project: str = "",
) -> BlobStore:
    """The configured backend. `public_url` (local only) is the base URL of the side HTTP
    listener as clients reach it; a callable is read at signing time, since the listener's port
    may be known only after it started."""
    if backend == "local":
        from threadline_server.blobs.local import LocalBlobStore

        return LocalBlobStore.open(data_dir, public_url)
    from threadline_server.blobs.gcs import GcsBlobStore

    return GcsBlobStore.from_settings(
        bucket,
        endpoint=gcs_endpoint,
        credentials_file=gcs_credentials_file,
        anonymous=gcs_anonymous,
        project=gcs_project,
    )
