"""Atomic output directories: everything a command writes (engines, exports, model repositories) is built in a
temp dir beside the output and renamed into place at the end, so a failure or Ctrl-C leaves nothing half-written
and an existing output is replaced only by a complete one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from jetspec_trt.errors import JetSpecError


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an existing output unless `overwrite` (call it before any slow work)."""
    if Path(output).exists() and not overwrite:
        raise JetSpecError(f"{output} already exists (pass --overwrite to replace it)")


@contextlib.contextmanager
def staged_directory(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temp dir beside `output`; on success it replaces `output`, on any error it is removed."""
    output = Path(output)
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.building-", dir=output.parent))
    # mkdtemp makes the dir 0700; the output should get the mode any new directory gets (others may serve it).
    staging.chmod(0o777 & ~_umask())
    try:
        yield staging
        _move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _move_into_place(staging: Path, output: Path) -> None:
    if output.exists():
        retired = output.with_name(f".{output.name}.old-{staging.name.rsplit('-', 1)[-1]}")
        output.rename(retired)
        staging.rename(output)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(output)
