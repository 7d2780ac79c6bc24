"""`python -m tests [PYTEST ARGS]`: set up what the tests need, then run pytest.

The README's test command. A fresh machine may lack two programs the tests use besides
Python: the headless Chromium the upload-page test drives, and the Java runtime METEOR
runs on (`tests/programs.py` finds or installs both); everything else comes from
requirements*.txt. Arguments go to pytest unchanged (default: `-q`).
"""

import os
import sys

from tests import programs


def main(argv):
    found = programs.ensure_chromium()
    if found:
        os.environ[programs.ENVIRONMENT_VARIABLE] = found
    programs.ensure_java()
    arguments = argv or ["-q"]
    os.execv(sys.executable, [sys.executable, "-m", "pytest", *arguments])


if __name__ == "__main__":
    main(sys.argv[1:])
