"""Finding (and, where missing, installing) the programs some tests need besides Python:
the headless Chromium the page test drives, and the Java runtime pycocoevalcap's METEOR
scorer runs on (tests/test_evaluate.py and tests/test_finetune.py check METEOR values).

`python -m tests` calls `ensure_chromium()` and `ensure_java()` before pytest;
`tests/test_page.py` calls `find_chromium()`. Kept apart from conftest so that finding a
browser costs nothing when no page test runs.
"""

import functools
import os
import shutil
import subprocess
import sys

ENVIRONMENT_VARIABLE = "CAPTIONER_CHROMIUM"  # a browser of the user's choice wins
COMMAND_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
APT_PACKAGE = "chromium"
JAVA_APT_PACKAGE = "default-jre-headless"
_APT_ENVIRONMENT = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}  # no questions asked


def find_chromium():
    """The path (str) of a Chromium-family browser on this machine, or None.

    Looks at $CAPTIONER_CHROMIUM, then the PATH (Debian's `chromium` and its cousins),
    then the build `python -m playwright install chromium` keeps in its own cache.
    """
    chosen = os.environ.get(ENVIRONMENT_VARIABLE)
    if chosen:
        return chosen if os.access(chosen, os.X_OK) else None
    for name in COMMAND_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return _playwright_chromium()


def _playwright_chromium():
    try:
        from playwright import sync_api
    except ImportError:
        return None
    try:
        with sync_api.sync_playwright() as playwright:
            path = playwright.chromium.executable_path
    except Exception:  # noqa: BLE001 (no driver, no cache: simply no browser here)
        return None
    return path if path and os.access(path, os.X_OK) else None


def _run(command, env=None):
    print(f"tests: {' '.join(command)}", file=sys.stderr, flush=True)
    try:
        return subprocess.run(command, stdout=subprocess.DEVNULL, check=False, env=env).returncode == 0
    except OSError:
        return False


@functools.cache
def _apt_get():
    """[prefix..., apt-get] as root or through password-less sudo, after one `apt-get update`
    (once per process, whichever packages follow); None where that cannot run."""
    apt_get = shutil.which("apt-get")
    if not apt_get:
        return None
    prefix = [] if os.geteuid() == 0 else (["sudo", "-n"] if _run(["sudo", "-n", "true"]) else None)
    if prefix is None or not _run([*prefix, apt_get, "update", "-qq"], env=_APT_ENVIRONMENT):
        return None
    return [*prefix, apt_get]


def _apt_install(package):
    """Installs a Debian package where apt-get and root (or password-less sudo) are there.
    Returns whether apt-get reported success."""
    apt_get = _apt_get()
    return apt_get is not None and _run([*apt_get, "install", "-y", "-qq", package], env=_APT_ENVIRONMENT)


def install_chromium():
    """Installs Chromium: Debian's package where apt-get and root (or password-less sudo)
    are there, else Playwright's own build. Returns the browser's path, or None."""
    if _apt_install(APT_PACKAGE):
        found = find_chromium()
        if found:
            return found
    if _run([sys.executable, "-m", "playwright", "install", "chromium"]):
        return find_chromium()
    return None


def ensure_chromium():
    """A browser's path, installing one if there is none; None (with a message) if that fails."""
    found = find_chromium()
    if found:
        return found
    print("tests: no headless Chromium on this machine; installing one for tests/test_page.py", file=sys.stderr)
    found = install_chromium()
    if found is None:
        print(f"tests: could not install Chromium (tried apt-get install {APT_PACKAGE} and "
              "`python -m playwright install chromium`); tests/test_page.py will fail. "
              f"Set {ENVIRONMENT_VARIABLE}=/path/to/chromium to use one you have.", file=sys.stderr)
    return found


def ensure_java():
    """The `java` on the PATH, installing Debian's default headless runtime if there is none;
    None (with a message) if that fails."""
    found = shutil.which("java")
    if found:
        return found
    print("tests: no `java` on this machine; installing one for METEOR (pycocoevalcap)", file=sys.stderr)
    if _apt_install(JAVA_APT_PACKAGE) and shutil.which("java"):
        return shutil.which("java")
    print(f"tests: could not install Java (tried apt-get install {JAVA_APT_PACKAGE}); the METEOR checks "
          "of tests/test_evaluate.py and tests/test_finetune.py will fail. Install a Java runtime.",
          file=sys.stderr)
    return None
