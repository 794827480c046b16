"""README's "Using a result", run as written on a run directory the real CLI trained and
that was then moved away from where it trained."""

import json
import re
import shutil

import pytest
import torch

from tests.conftest import REPO, run_dirs, train_cli
from tests.unit.test_load import held_out_digits
from trainyard.tasks import Classifier

pytestmark = pytest.mark.slow


def readme_snippet() -> str:
    """The first Python block of README's "Using a result" section."""
    text = (REPO / "README.md").read_text()
    section = re.search(r"^#+ Using a result\n(.*?)(?=^#+ )", text, re.M | re.S)
    assert section, "README has no 'Using a result' section"
    block = re.search(r"```python\n(.*?)```", section.group(1), re.S)
    assert block, "'Using a result' has no python block"
    return block.group(1)


def test_the_readme_prediction_works_on_a_moved_run_directory(tmp_path, monkeypatch):
    (tmp_path / "trained").mkdir()
    out = train_cli(["trainer.max_epochs=1"], tmp_path / "trained")
    assert out.returncode == 0, out.stderr
    [run] = run_dirs(tmp_path / "trained")
    # where the README's snippet looks, on another machine (or out of a container)
    moved = tmp_path / "elsewhere" / "outputs" / "default" / "runs" / "default"
    moved.parent.mkdir(parents=True)
    shutil.move(run, moved)
    monkeypatch.chdir(tmp_path / "elsewhere")

    scope: dict = {}
    exec(readme_snippet(), scope)  # exactly what README shows
    model = scope["model"]
    raw, labels = held_out_digits()
    accuracy = float((model.predict(raw) == labels).float().mean())
    assert accuracy > 0.6  # chance is 0.1
    tested = json.loads((moved / "result.json").read_text())["metrics"]["test/acc"]
    assert accuracy == pytest.approx(tested, abs=1e-6)  # the very checkpoint that was tested

    task = Classifier.load_from_checkpoint(moved / "checkpoints" / "best.ckpt")
    task.eval()
    with torch.no_grad():
        logits = task(task.preprocess(raw))
    assert torch.equal(logits.argmax(1), model.predict(raw))
