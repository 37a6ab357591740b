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
    code, gradient_code = re.findall(r"```python\n(.*?)```", section, re.S)[:2]
    data = ShapesDataset(16, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    namespace: dict = {"loader": loader}
    exec(compile(code, str(README), "exec"), namespace)
    balancer = namespace["balancer"]
    # two steps ran: the learned log-variances moved from 0 in the direction of their losses
    assert namespace["step"] == 1
    assert not torch.equal(balancer.log_vars.detach(), torch.zeros(2))
    assert set(namespace["combined"].weights) == {"seg", "count"}

    # the gradient-method snippet continues it: UPGrad weights, a moving backbone
    backbone = namespace["net"].architecture.backbone
    before = [p.detach().clone() for p in backbone.parameters()]
    exec(compile(gradient_code, str(README), "exec"), namespace)
    assert set(namespace["combined"].weights) == {"seg", "count"}
    assert all(w > 0 for w in namespace["combined"].weights.values())
    after = list(backbone.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert namespace["balancer"].last_gram.shape == (2, 2)
