"""Optional packages: each is installed by one extra of mmfm (setup.py's `extras_require`).

`require_extra` imports one, or raises a LaunchError naming the extra that installs it, so a
command that needs it is refused in one line (and, called before any work, before anything is
fetched or written) rather than ending in an ImportError traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mmfm.core.errors import LaunchError


def require_extra(module: str, extra: str, purpose: str) -> ModuleType:
    """`module`, imported; a LaunchError naming `pip install 'mmfm[extra]'` when it is not
    installed or does not load (cairosvg raises OSError without the cairo library)."""
    try:
        return importlib.import_module(module)
    except (ImportError, OSError) as e:
        raise LaunchError(
            f"{purpose} needs {module.split('.')[0]}, which does not import here ({e}): "
            f"pip install 'mmfm[{extra}]' (in a checkout: pip install -e '.[{extra}]')"
        ) from None
