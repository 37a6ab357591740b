"""The README's and the docs pages' code runs as written, and their links lead somewhere."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import torch

from lightning_mtl.data.shapes import ShapesDataset

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
WEIGHTING_DOC = ROOT / "docs" / "weighting.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"(?<!!)\[(?:[^\]\\]|\\.)*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`[^`]*`")


def test_plain_pytorch_loop_snippet_trains() -> None:
    text = WEIGHTING_DOC.read_text()
    section = text[text.index("## A balancer in a plain PyTorch loop") :]
    code, gradient_code = re.findall(r"```python\n(.*?)```", section, re.S)[:2]
    data = ShapesDataset(16, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    namespace: dict = {"loader": loader}
    exec(compile(code, str(WEIGHTING_DOC), "exec"), namespace)
    balancer = namespace["balancer"]
    # two steps ran: the learned log-variances moved from 0 in the direction of their losses
    assert namespace["step"] == 1
    assert not torch.equal(balancer.log_vars.detach(), torch.zeros(2))
    assert set(namespace["combined"].weights) == {"seg", "count"}

    # the gradient-method snippet continues it: UPGrad weights, a moving backbone
    backbone = namespace["net"].architecture.backbone
    before = [p.detach().clone() for p in backbone.parameters()]
    exec(compile(gradient_code, str(WEIGHTING_DOC), "exec"), namespace)
    assert set(namespace["combined"].weights) == {"seg", "count"}
    assert all(w > 0 for w in namespace["combined"].weights.values())
    after = list(backbone.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert namespace["balancer"].last_gram.shape == (2, 2)


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (links and headings there are not Markdown)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (letters, digits, ``_``,
    ``-`` and spaces kept), spaces turned into hyphens."""
    text = unicodedata.normalize("NFC", heading.strip().lower())
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor on ``page``, repeated headings numbered as GitHub does."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose_lines(page.read_text()):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def test_slug_follows_github() -> None:
    assert slug("Results: did sharing help?") == "results-did-sharing-help"
    assert slug("NYUv2 and Cityscapes (MTAN's preprocessed `.npy` layout)") == (
        "nyuv2-and-cityscapes-mtans-preprocessed-npy-layout"
    )
    assert slug("Sweeps, clusters, Weights & Biases and using the model") == (
        "sweeps-clusters-weights--biases-and-using-the-model"
    )
    assert slug("Δm") == "δm"


def test_every_relative_link_and_anchor_resolves() -> None:
    """Every relative link in README.md and docs/*.md names an existing file or folder, and
    every ``#anchor`` (on the same page or another Markdown page) matches one of its headings."""
    problems: list[str] = []
    checked = 0
    for page in PAGES:
        for line in prose_lines(page.read_text()):
            for target in LINK.findall(INLINE_CODE.sub("", line)):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                path, _, anchor = target.partition("#")
                resolved = (page.parent / path).resolve() if path else page
                where = f"{page.relative_to(ROOT)}: ({target})"
                checked += 1
                if not resolved.exists():
                    problems.append(f"{where}: {path} does not exist")
                elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                    problems.append(f"{where}: no heading with anchor #{anchor}")
    assert not problems, "\n".join(problems)
    assert checked > 50  # the README and the docs pages link to each other throughout


def test_readme_sections_a_newcomer_needs() -> None:
    """The README stays short, in its order, and keeps the command CI runs."""
    text = README.read_text()
    assert len(text.splitlines()) < 300
    headings = [line[3:] for line in prose_lines(text) if line.startswith("## ")]
    order = [
        "Contents",
        "Quickstart",
        "Train on your own data",
        "Which method should I start with",
        "Where outputs go",
        "A tour of the code",
        "Features",
        "Development and testing",
    ]
    assert [h for h in headings if h in order] == order
    assert "Sweeps, clusters, Weights & Biases and using the model" in headings
    assert "make test " in text and "make test-slow" in text
