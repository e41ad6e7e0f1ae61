"""What pyarrow's S3 filesystem cannot do, done with boto3 on the same endpoint and credentials: create an object
only if it does not exist (a conditional PUT, ``If-None-Match: *``; S3 and S3-compatible servers that implement
it, moto's too). pyarrow stays the filesystem of everything else."""

from __future__ import annotations

import functools
from typing import Any

import pyarrow.fs as pafs


def _settings(fs: pafs.S3FileSystem) -> dict[str, Any]:
    """The options ``fs`` was made with (pyarrow's own pickling record of them)."""
    return dict(fs.__reduce__()[1][0])


@functools.lru_cache(maxsize=8)
def _client(endpoint: str | None, region: str | None, key: str | None, secret: str | None, token: str | None,
            anonymous: bool, virtual: bool, timeout: float | None) -> Any:
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    config = Config(signature_version=UNSIGNED if anonymous else None, retries={"max_attempts": 3},
                    s3={"addressing_style": "virtual" if virtual else "auto"},
                    connect_timeout=timeout or 60, read_timeout=timeout or 60)
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, aws_access_key_id=key,
                                          aws_secret_access_key=secret, aws_session_token=token, config=config)


def client(fs: pafs.S3FileSystem) -> Any:
    """A boto3 S3 client for the endpoint, region and credentials of ``fs`` (the environment's where ``fs`` has
    none, as pyarrow reads them: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...)."""
    opts = _settings(fs)
    endpoint = opts.get("endpoint_override") or None
    if endpoint and "://" not in endpoint:
        endpoint = f"{opts.get('scheme') or 'https'}://{endpoint}"
    timeout = opts.get("connect_timeout")
    return _client(endpoint, fs.region or None, opts.get("access_key") or None, opts.get("secret_key") or None,
                   opts.get("session_token") or None, bool(opts.get("anonymous")),
                   bool(opts.get("force_virtual_addressing")), timeout if timeout and timeout > 0 else None)


def put_if_absent(fs: pafs.S3FileSystem, path: str, data: bytes, where: str) -> bool:
    """PUT ``data`` at ``bucket/key`` ``path`` unless an object is there (False then), atomically on the server;
    a ``ValueError`` of one line naming the storage ``where`` for a missing bucket, no permission or an
    unreachable endpoint."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = path.partition("/")
    try:
        client(fs).put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in {"PreconditionFailed", "ConditionalRequestConflict"} or status in {409, 412}:
            return False  # there already, or being written by another request: the caller looks again
        raise ValueError(storage_error(where, code, str(err))) from None
    except BotoCoreError as err:
        raise ValueError(f"storage {where} cannot be written: {err}") from None
    return True


def storage_error(where: str, code: str, detail: str) -> str:
    """One line for an S3 error ``code``: the cause a user can act on first."""
    code = {"ACCESS_DENIED": "AccessDenied", "NO_SUCH_BUCKET": "NoSuchBucket"}.get(code, code)  # pyarrow's names
    if code == "NoSuchBucket":
        return f"storage {where}: there is no such bucket (create it, or check the endpoint and region)"
    if code in {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}:
        return f"storage {where}: no permission there ({code}); check the credentials and the bucket policy"
    return f"storage {where} cannot be written: {detail.splitlines()[0] if detail else code}"
