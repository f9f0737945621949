"""Every notebook in notebooks/ executes top to bottom (in a scratch copy)."""

import shutil
from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.slow  # trains models
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    nb = nbformat.read(copy, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert (tmp_path / "quickstart_session" / "flags.sqlite").exists() or path.stem != "quickstart"
    if path.stem == "your_own_model":  # the flag set in code, exported beside the store
        flags = (tmp_path / "own_resnet_session" / "flags.csv").read_text().splitlines()
        assert len(flags) == 2 and flags[0].startswith("train_id,flag")
