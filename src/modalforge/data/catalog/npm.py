"""Fetch a package tarball from the npm registry and check its integrity.

With Node installed, ``npm pack`` fetches it (npm's own cache, proxy and registry settings apply).
Without Node, the tarball is downloaded over HTTPS from the registry named by
``$MODALFORGE_NPM_REGISTRY`` / ``$npm_config_registry`` (default: the public registry). Either
way the file's SHA-512 must equal both the integrity the registry publishes for that version and
the one pinned in modalforge, or it is discarded.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

DEFAULT_REGISTRY = "https://registry.npmjs.org"


class IntegrityError(RuntimeError):
    """A downloaded file whose hash is not the published / pinned one."""


def sri_sha512(path: Path) -> str:
    """Subresource-integrity string (``sha512-<base64>``), the form npm publishes."""
    digest = hashlib.sha512()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def registry_url() -> str:
    return (
        os.environ.get("MODALFORGE_NPM_REGISTRY")
        or os.environ.get("npm_config_registry")  # noqa: SIM112 (npm's own spelling)
        or DEFAULT_REGISTRY
    ).rstrip("/")


def _via_npm(spec: str, workdir: Path) -> Path:
    proc = subprocess.run(
        ["npm", "pack", spec, "--pack-destination", str(workdir), "--silent"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"npm pack {spec} failed: {proc.stderr.strip()[-500:]}")
    tarballs = list(workdir.glob("*.tgz"))
    if len(tarballs) != 1:
        raise RuntimeError(f"npm pack {spec} produced {len(tarballs)} tarballs")
    return tarballs[0]


def _via_https(package: str, version: str, expected: str, workdir: Path) -> Path:
    import httpx
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    base = registry_url()
    meta = httpx.get(f"{base}/{package}/{version}", timeout=60, follow_redirects=True)
    meta.raise_for_status()
    dist = meta.json().get("dist", {})
    published, url = dist.get("integrity"), dist.get("tarball")
    if published != expected:
        raise IntegrityError(
            f"{package}@{version}: the registry publishes integrity {published}, "
            f"modalforge pins {expected}; refusing to use it"
        )
    dest = workdir / f"{package}-{version}.tgz"
    with (
        httpx.stream("GET", url, timeout=60, follow_redirects=True) as resp,
        dest.open("wb") as f,
        Progress(
            *Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(), transient=True
        ) as progress,  # fmt: skip
    ):
        resp.raise_for_status()
        total = int(resp.headers.get("content-length", 0)) or None
        task = progress.add_task(f"downloading {package}@{version}", total=total)
        for chunk in resp.iter_bytes(1 << 20):
            f.write(chunk)
            progress.advance(task, len(chunk))
    return dest


def fetch_tarball(
    package: str, version: str, integrity: str, cache: Path, use_npm: bool | None = None
) -> Path:
    """Path of ``package@version``'s tarball in ``cache``, fetched and verified if not there yet."""
    dest = cache / f"{package}-{version}.tgz"
    if dest.is_file():
        if sri_sha512(dest) == integrity:
            return dest
        dest.unlink()  # a partial or tampered file: fetch again
    if use_npm is None:
        use_npm = shutil.which("npm") is not None
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        if use_npm:
            got = _via_npm(f"{package}@{version}", Path(tmp))
        else:
            got = _via_https(package, version, integrity, Path(tmp))
        actual = sri_sha512(got)
        if actual != integrity:
            raise IntegrityError(f"{package}@{version}: got {actual}, expected {integrity}")
        got.replace(dest)
    return dest
