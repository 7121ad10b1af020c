"""A small S3 client over stdlib HTTP: SigV4 signing, PUT, HEAD, multipart upload.

Why not boto3: the vehicle's runtime keeps its dependency list small (botocore alone is
larger than the rest of the uplink), and the uplink needs six requests, a bandwidth cap on
the bytes it sends and a payload hash it already has. Every request signs the SHA-256 of
its payload (``x-amz-content-sha256``, which S3 checks against the bytes it receives) and
sends ``Content-MD5`` (checked by every S3-compatible store): for a whole image the SHA-256
is the sidecar's ``image_sha256``, so the store itself refuses bytes that do not match it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import quote, urlsplit

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
CHUNK = 64 * 1024


class S3Error(Exception):
    """A request the store answered with an error (``code`` from its XML body) or could not be made."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code = status, code

    @property
    def transient(self) -> bool:
        """Worth retrying as is: no connection, a timeout, a 5xx or throttling."""
        return self.status == 0 or self.status >= 500 or self.code in ("SlowDown", "RequestTimeout")


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def sign_v4(
    method: str,
    host: str,
    path: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    payload_sha256: str,
    access_key: str,
    secret_key: str,
    region: str,
    now: datetime,
    service: str = "s3",
) -> dict[str, str]:
    """The headers to add (x-amz-date, x-amz-content-sha256, Authorization) for AWS Signature V4.

    ``path`` is already URI-encoded (S3 encodes the key once, keeping '/').
    """
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    all_headers = {k.lower(): " ".join(str(v).split()) for k, v in headers.items()}
    all_headers.update({"host": host, "x-amz-date": amz_date, "x-amz-content-sha256": payload_sha256})
    signed = sorted(all_headers)
    canonical_query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items()))
    canonical = "\n".join(
        [
            method,
            path,
            canonical_query,
            "".join(f"{k}:{all_headers[k]}\n" for k in signed),
            ";".join(signed),
            payload_sha256,
        ]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(("AWS4" + secret_key).encode(), day), region), service), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return {
        "x-amz-date": amz_date,
        "x-amz-content-sha256": payload_sha256,
        "Authorization": f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={';'.join(signed)}, "
        f"Signature={signature}",
    }


class Throttle:
    """A byte-rate cap shared by every upload (token bucket, one second of burst); 0 = no cap."""

    def __init__(
        self, bytes_per_s: int, stop: threading.Event | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = bytes_per_s
        self._stop = stop or threading.Event()
        self._clock = clock
        self._tokens = float(bytes_per_s)
        self._at = clock()

    def consume(self, n: int) -> None:
        if self.rate <= 0:
            return
        while True:
            now = self._clock()
            self._tokens = min(float(self.rate), self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= min(n, self.rate):
                self._tokens -= n
                return
            if self._stop.wait((min(n, self.rate) - self._tokens) / self.rate):
                raise S3Error(0, "Stopped", "the uplink is stopping")


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class S3Client:
    def __init__(
        self,
        endpoint: str,
        bucket: str,
        region: str,
        access_key: str,
        secret_key: str,
        timeout_s: float = 30.0,
        throttle: Throttle | None = None,
    ) -> None:
        parts = urlsplit(endpoint)
        self.https = parts.scheme == "https"
        self.host = parts.netloc
        self.bucket, self.region = bucket, region
        self._access, self._secret = access_key, secret_key
        self.timeout_s = timeout_s
        self.throttle = throttle or Throttle(0)

    # ------------------------------------------------------------------ requests

    def request(
        self,
        method: str,
        key: str,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        payload_sha256: str | None = None,
    ) -> Response:
        query = dict(query or {})
        path = "/" + quote(self.bucket, safe="") + ("/" + quote(key, safe="/-_.~") if key else "")
        headers = dict(headers or {})
        if body or method in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        sha = payload_sha256 or hashlib.sha256(body).hexdigest()
        headers.update(
            sign_v4(
                method,
                self.host,
                path,
                query,
                headers,
                sha,
                self._access,
                self._secret,
                self.region,
                datetime.now(timezone.utc),
            )
        )
        url = path + (
            "?"
            + "&".join(
                f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" if v else quote(k) for k, v in sorted(query.items())
            )
            if query
            else ""
        )
        conn_cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = conn_cls(self.host, timeout=self.timeout_s)
        try:
            conn.putrequest(method, url, skip_accept_encoding=True)
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders()
            for chunk in self._chunks(body):
                conn.send(chunk)
            resp = conn.getresponse()
            data = resp.read()
            out = Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        except (OSError, http.client.HTTPException) as e:
            raise S3Error(0, type(e).__name__, str(e) or "connection failed") from None
        finally:
            conn.close()
        if out.status >= 300:
            code, message = _error(out.body)
            raise S3Error(out.status, code or http.client.responses.get(out.status, "Error"), message)
        return out

    def _chunks(self, body: bytes) -> Iterator[bytes]:
        view = memoryview(body)
        for i in range(0, len(view), CHUNK):
            chunk = view[i : i + CHUNK]
            self.throttle.consume(len(chunk))
            yield bytes(chunk)

    # ------------------------------------------------------------------ operations

    def put_object(
        self,
        key: str,
        body: bytes,
        sha256_hex: str,
        metadata: Mapping[str, str] | None = None,
        content_type: str = "application/octet-stream",
    ) -> str:
        headers = {"Content-MD5": _md5_b64(body), "Content-Type": content_type}
        headers.update({f"x-amz-meta-{k}": v for k, v in (metadata or {}).items()})
        r = self.request("PUT", key, headers=headers, body=body, payload_sha256=sha256_hex)
        return r.headers.get("etag", "").strip('"')

    def head_object(self, key: str) -> dict[str, str] | None:
        try:
            return self.request("HEAD", key).headers
        except S3Error as e:
            if e.status == 404:
                return None
            raise

    def create_multipart(
        self, key: str, metadata: Mapping[str, str] | None = None, content_type: str = "application/octet-stream"
    ) -> str:
        headers = {"Content-Type": content_type, **{f"x-amz-meta-{k}": v for k, v in (metadata or {}).items()}}
        r = self.request("POST", key, query={"uploads": ""}, headers=headers)
        upload_id = _find(r.body, "UploadId")
        if not upload_id:
            raise S3Error(r.status, "MalformedResponse", "no UploadId in the store's answer")
        return upload_id

    def upload_part(self, key: str, upload_id: str, number: int, body: bytes) -> str:
        r = self.request(
            "PUT",
            key,
            query={"partNumber": str(number), "uploadId": upload_id},
            headers={"Content-MD5": _md5_b64(body)},
            body=body,
        )
        return r.headers.get("etag", "").strip('"')

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]]) -> str:
        xml = (
            "<CompleteMultipartUpload>"
            + "".join(f'<Part><PartNumber>{n}</PartNumber><ETag>"{etag}"</ETag></Part>' for n, etag in sorted(parts))
            + "</CompleteMultipartUpload>"
        )
        r = self.request("POST", key, query={"uploadId": upload_id}, body=xml.encode())
        code, message = _error(r.body)
        if code:  # S3 may answer 200 and put the error in the body
            raise S3Error(r.status, code, message)
        return _find(r.body, "ETag").strip('"')

    def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            self.request("DELETE", key, query={"uploadId": upload_id})
        except S3Error as e:
            if e.status != 404:
                raise

    def list_multipart(self, prefix: str) -> list[tuple[str, str]]:
        """(key, upload id) of unfinished multipart uploads under ``prefix``."""
        r = self.request("GET", "", query={"uploads": "", "prefix": prefix})
        root = ET.fromstring(r.body)
        out = []
        for el in root.iter():
            if el.tag.rsplit("}", 1)[-1] == "Upload":
                fields = {c.tag.rsplit("}", 1)[-1]: (c.text or "") for c in el}
                out.append((fields.get("Key", ""), fields.get("UploadId", "")))
        return out


def _md5_b64(body: bytes) -> str:
    return base64.b64encode(hashlib.md5(body).digest()).decode()  # noqa: S324 - S3's integrity header, not security


def multipart_etag(part_md5s: list[bytes]) -> str:
    """The ETag S3 gives a multipart object: md5 of the parts' binary md5s, '-', the part count."""
    return f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}"  # noqa: S324


def _find(body: bytes, tag: str) -> str:
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return ""
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] == tag:
            return el.text or ""
    return ""


def _error(body: bytes) -> tuple[str, str]:
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return "", body[:200].decode(errors="replace")
    if root.tag.rsplit("}", 1)[-1] != "Error":
        return "", ""
    return _find(body, "Code"), _find(body, "Message")
