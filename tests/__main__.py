"""`python -m tests [PYTEST ARGS]`: set up what the tests need, then run pytest.

The README's test command. A fresh machine lacks only the headless Chromium that the
upload-page test drives (`tests/browser.py` finds or installs it); everything else comes
from requirements*.txt. Arguments go to pytest unchanged (default: `-q`).
"""

import os
import sys

from tests import browser


def main(argv):
    found = browser.ensure_chromium()
    if found:
        os.environ[browser.ENVIRONMENT_VARIABLE] = found
    arguments = argv or ["-q"]
    os.execv(sys.executable, [sys.executable, "-m", "pytest", *arguments])


if __name__ == "__main__":
    main(sys.argv[1:])
