"""Write completions/ollama-pull.{bash,zsh,fish} from the Typer app; with --check, fail if they are stale.

python scripts/generate_completions.py          # regenerate
python scripts/generate_completions.py --check  # exit 1 if a file differs (run by the tests)
"""

from __future__ import annotations

import sys
from pathlib import Path

from typer.completion import get_completion_script

PROG = "ollama-pull"
COMPLETE_VAR = "_OLLAMA_PULL_COMPLETE"
SHELLS = ("bash", "zsh", "fish")
DIRECTORY = Path(__file__).resolve().parent.parent / "completions"


def expected() -> dict[Path, str]:
    return {
        DIRECTORY / f"{PROG}.{shell}": get_completion_script(
            prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell
        ).rstrip("\n")
        + "\n"
        for shell in SHELLS
    }


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for path, text in expected().items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not check:
            path.write_text(text)
    if check and stale:
        names = ", ".join(path.name for path in stale)
        print(f"stale completion scripts: {names}; run python scripts/generate_completions.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
