"""The README's tour runs as written and does what it says."""

import pathlib
import re

import torch


def test_readme_tour_runs():
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has no python block"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert scope["out"].shape == (14, 8, 64)
    assert scope["dec"].shape == (4, 8, 64)
    assert torch.equal(scope["dec"][2:], torch.zeros(2, 8, 64))  # padded rows
    assert not torch.isnan(scope["out"]).any()
