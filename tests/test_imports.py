"""Training, evaluation and export import without beets (a lent GPU machine has none), and the plugin with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What crnn-train, crnn-eval, crnn-export, crnn-finetune, crnn-wccn and research/gpu import.
WITHOUT_BEETS = [f"beetsplug.crnn.training.{name}" for name in
                 ("train", "evaluate", "export", "finetune", "wccn", "library_train", "robustness")]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_training_and_export_import_without_beets():
    code = "\n".join(["import sys", "sys.modules['beets'] = None  # as if beets were not installed",
                      *(f"import {name}" for name in WITHOUT_BEETS),
                      "import beetsplug.crnn", "assert not hasattr(beetsplug.crnn, 'CrnnPlugin')"])
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_beets_finds_the_plugin_class_in_the_package():
    proc = _python("import beetsplug.crnn as c; from beets.plugins import BeetsPlugin; "
                   "assert issubclass(c.CrnnPlugin, BeetsPlugin); print(c.CrnnPlugin.__module__)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "beetsplug.crnn.plugin"
