"""Build hook: puts the generated `threadline` package (gen/python/threadline) into the SDK's
sdist and wheel.

The generated code lives outside this project, at the repository's gen/python. Built from the
repository, the hook copies it in (as `threadline/`); built from the sdist, which carries that
copy, there is nothing to do. A static `force-include` of `../../gen/...` could do only the
first: pip builds the wheel of a downloaded sdist where no `../../gen` exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.config import BuilderConfig
from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class GeneratedCodeHook(BuildHookInterface[BuilderConfig]):
    PLUGIN_NAME = "generated-code"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        generated = Path(self.root, "..", "..", "gen", "python", "threadline").resolve()
        if generated.is_dir():
            build_data["force_include"][str(generated)] = "threadline"
        elif not Path(self.root, "threadline", "v1").is_dir():
            raise RuntimeError(
                f"no generated code: neither {generated} (a repository checkout) nor "
                "threadline/v1 (an sdist) exists; run .ci/gen in the repository"
            )
