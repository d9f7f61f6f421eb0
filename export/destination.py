"""Where a package goes. `--out` may name a missing folder, an empty one, or a package of ours
(its manifest says so, and the folder holds nothing the manifest does not list); anything else
is refused before any work, and nothing is touched. A finished package is copied to a staging
folder beside the target (same file system) and renamed into place, so that an export killed
part-way leaves the previous package as it was. Light on purpose: the entry point checks `--out`
before importing torch."""

import json
import os
import shutil
import tempfile
from pathlib import Path

from runtime.manifest import FORMAT, MANIFEST

from .check import ExportError


class UsageError(ExportError):
    """A request that cannot be carried out as given (exit 2); nothing was done."""


def check_out(out: Path) -> None:
    """Raise UsageError unless replacing `out` can destroy nothing but a package of ours."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder; give a new or empty folder, or a model package")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        listed = set(manifest["files"]) if manifest.get("format") == FORMAT else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        listed = None
    if listed is None:
        raise UsageError(f"--out {out}: a folder that is not a model package ({len(entries)} entries, e.g. "
                         f"{entries[0]}); it would be replaced. Give a new or empty folder")
    unlisted = [e for e in entries if e != MANIFEST and e not in listed]
    if unlisted:
        raise UsageError(f"--out {out}: the package folder also holds {', '.join(unlisted[:3])}, which its manifest "
                         "does not list; move it out or give another folder")


def install(folder: Path, out: Path) -> None:
    """Put the finished package in `folder` at `out` (checked again: the folder may have changed
    during a long export). The old package stays whole until the new one is complete beside it."""
    out = Path(out)
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    try:
        for path in sorted(folder.iterdir()):
            shutil.copyfile(path, staging / path.name)
        staging.chmod(0o755)  # mkdtemp makes it private
        if out.is_dir() and any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "package")
            os.rename(staging, out)
            shutil.rmtree(old)
        else:
            os.rename(staging, out)  # POSIX replaces an empty folder in one step
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
