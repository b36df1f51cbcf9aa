"""The main command, `python -m blip_export.demo`, on the shipped models (fp32 here; the int8 forms
are the same code path over other bundles): it exports BLIP's and BLIP-2's checkpoints and prints
BLIP's and BLIP-2's (OPT and T5) captions and answers side by side, with timings, and both families'
retrieval."""

from __future__ import annotations

import re

from blip_export.defaults import default_models, sample_images

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")


def section(out: str, head: str) -> list[str]:
    """The lines of the block that starts with `head` (up to the next blank line)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(head))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start: end]


def test_demo_shows_blip_and_blip2(tmp_path, capsys):
    from blip_export.demo import main

    assert main(["--precision", "fp32", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    print(out)
    samples = sample_images()
    for name in default_models():
        assert re.search(rf"^exported {name} +-> {tmp_path / (name + '-fp32')} +\(\d+\.\d s, worst graph error",
                         out, re.M), f"no export line for {name}"

    captions = section(out, "captions (")
    assert re.search(r"ms/image: BLIP [\d.]+, BLIP-2 OPT [\d.]+, BLIP-2 T5 [\d.]+\):", captions[0]), captions[0]
    rows = [re.match(r"^  (\S*) +(BLIP|BLIP-2 OPT|BLIP-2 T5)  (.+)$", line) for line in captions[1:]]
    assert all(rows) and len(rows) == 3 * len(samples), captions
    for k, s in enumerate(samples):  # each model's caption names a colour and a shape
        assert rows[3 * k].group(1) == s["file"] and [r.group(2) for r in rows[3 * k: 3 * k + 3]] == \
            ["BLIP", "BLIP-2 OPT", "BLIP-2 T5"], captions
        for r in rows[3 * k: 3 * k + 3]:
            words = r.group(3).split()
            assert any(w in COLORS for w in words) and any(w in SHAPES for w in words), r.group(0)

    vqa = section(out, "VQA (")
    right = re.search(r"BLIP (\d+)/(\d+) [\d.]+, BLIP-2 OPT (\d+)/\d+ [\d.]+, BLIP-2 T5 (\d+)/\d+ [\d.]+\):", vqa[0])
    assert right, vqa[0]
    assert int(right.group(2)) == len(samples), vqa[0]
    assert min(int(right.group(i)) for i in (1, 3, 4)) >= len(samples) - 1, vqa[0]
    for line, s in zip(vqa[1:], samples):
        assert line.split()[0] == s["file"] and "| BLIP-2 OPT " in line and "| BLIP-2 T5 " in line, line
        assert line.endswith(f"(expected {s['answer']})"), line

    for family in ("BLIP", "BLIP-2"):
        block = section(out, f"retrieval, {family}: ")
        assert re.search(r"\(ITC \d+ ms, ITM [\d.]+ ms/pair\):", block[0]), block[0]
        assert len(block) == 1 + len(samples) and all("ITM p(match)" in line for line in block[1:]), block
