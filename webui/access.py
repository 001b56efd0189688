"""Who may do what: the public mode's limits, the upload cap, and whose library a visitor sees.

Locally (the default) the app is its owner's: any path is a source, any file is
calibration text, and there is one library. A public server (a Hugging Face
Space, where SPACE_ID is set, or `python app.py --public`) is open to anyone,
so there:

- sources are the demo, Hub ids and uploaded files, never paths on the server;
- calibration text is an uploaded file or a Hub dataset file (hf:...);
- each signed-in user, or else each browser session, has a library of their own
  (models/users/<who>), and only the demo is shared. What one user made (with
  their token, perhaps of a gated model) is not listed, loaded or zipped for others.

The tabs and api.py ask this module; core enforces the same limits
(`allowed_roots` of core.sources and core.convert.calibration) wherever a path is read.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from gradio.utils import get_upload_folder

from core.convert import calibration
from core.sources import refuse_outside_roots

from .common import on_space

UPLOAD_LIMIT_ENV = "QUANTLAB_MAX_UPLOAD_GB"
# A 7-8B model's Q4 GGUF is 4-5 GB; a Space's disk holds a few of those at most.
PUBLIC_UPLOAD_LIMIT_GB = 6.0
USERS_FOLDER = "users"


@dataclass(frozen=True)
class Access:
    public: bool = False
    max_upload_bytes: int | None = None  # None: no cap (local use)
    upload_roots: tuple[Path, ...] = ()

    @classmethod
    def for_environment(cls, public: bool = False) -> "Access":
        public = public or on_space()
        limit_gb = os.environ.get(UPLOAD_LIMIT_ENV) or (PUBLIC_UPLOAD_LIMIT_GB if public else None)
        max_bytes = int(float(limit_gb) * 1024**3) if limit_gb else None
        return cls(public, max_bytes, (Path(get_upload_folder()),))

    # -- sources and calibration ---------------------------------------------------------------

    @property
    def roots(self) -> tuple[Path, ...] | None:
        """Where a public server reads files a visitor names: its uploads; None locally (anywhere)."""
        return self.upload_roots if self.public else None

    def check_source(self, source: str) -> None:
        """Raises ModelSourceError (one sentence, the same for any server path) for a source not taken here."""
        if self.public:
            refuse_outside_roots(source, self.upload_roots)

    def check_calibration(self, source: str | None) -> None:
        """Raises CalibrationError (one sentence, the same for any server path) for a file not taken here."""
        if self.public and source:
            calibration.refuse_outside_roots(source, self.upload_roots)

    # -- uploads ---------------------------------------------------------------------------------

    def accept_upload(self, path: str | None, check=None) -> None:
        """Refuse an upload over the cap, or one `check(path)` refuses; a refused upload is deleted."""
        if not path:
            return
        try:
            size = Path(path).stat().st_size
            if self.max_upload_bytes is not None and size > self.max_upload_bytes:
                raise ValueError(f"{Path(path).name} is {size / 1e9:.1f} GB, over this server's upload limit of "
                                 f"{self.max_upload_bytes / 1e9:.1f} GB")
            if check is not None:
                check(path)
        except Exception:
            # Only gradio's upload folder is ours to clean; a path typed by a local user is theirs.
            if any(Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root)) for root in self.upload_roots):
                Path(path).unlink(missing_ok=True)
            raise

    def launch_options(self) -> dict:
        """gradio's own cap refuses an upload over it before it is written."""
        return {"max_file_size": self.max_upload_bytes} if self.max_upload_bytes is not None else {}

    # -- libraries ---------------------------------------------------------------------------------

    def library(self, models_root: Path, request=None, profile=None) -> Path:
        """The folder of models this visitor sees besides the demo: the whole models folder locally;
        on a public server their own, by Hub username when signed in, else by browser session."""
        if not self.public:
            return models_root
        username = getattr(profile, "username", None)
        owner = f"user-{username}" if username else f"session-{getattr(request, 'session_hash', None) or 'anonymous'}"
        return models_root / USERS_FOLDER / re.sub(r"[^A-Za-z0-9_-]+", "-", owner)

    def shared_library(self, models_root: Path) -> Path | None:
        """What a visitor sees before the page knows who they are: everything locally, the demo alone in public."""
        return None if self.public else models_root
