"""Endpoints files: servers started by a Slurm job (slurm/templates/serve_vllm.sbatch.j2) append their
base URL, one per line, once they answer; clients wait for them here."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sandlab.config import BackendConfig
from sandlab.errors import BackendUnavailableError

log = logging.getLogger(__name__)


def read_endpoints(path: str | Path) -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    return list(dict.fromkeys(line.strip() for line in lines if line.strip().startswith(("http://", "https://"))))


def wait_for_endpoints(
    path: str | Path, count: int = BackendConfig.endpoints_count, wait_s: float = BackendConfig.endpoints_wait_s, poll_s: float = 2.0
) -> list[str]:
    """The URLs in ``path`` once it lists ``count`` of them; raise after ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        urls = read_endpoints(path)
        if len(urls) >= count:
            return urls
        if time.monotonic() >= deadline:
            raise BackendUnavailableError(f"{len(urls)} of {count} teacher endpoint(s) in {path} after {wait_s:.0f} s; "
                                          "is the serve job running? (its log is in <run>/slurm/logs/)")
        if not announced:
            log.info("waiting up to %.0f s for %d teacher endpoint(s) in %s", wait_s, count, path)
            announced = True
        time.sleep(poll_s)
