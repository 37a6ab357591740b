"""The README's code runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lightning_mtl.data.shapes import ShapesDataset

README = Path(__file__).resolve().parents[1] / "README.md"


def test_plain_pytorch_loop_snippet_trains() -> None:
    text = README.read_text()
    section = text[text.index("#### A balancer in a plain PyTorch loop") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    data = ShapesDataset(16, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    namespace: dict = {"loader": loader}
    exec(compile(code, str(README), "exec"), namespace)
    balancer = namespace["balancer"]
    # two steps ran: the learned log-variances moved from 0 in the direction of their losses
    assert namespace["step"] == 1
    assert not torch.equal(balancer.log_vars.detach(), torch.zeros(2))
    assert set(namespace["combined"].weights) == {"seg", "count"}
