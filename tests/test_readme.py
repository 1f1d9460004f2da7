"""The README's quick start runs as written."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_quick_start_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    exec(compile(blocks[0], str(README), "exec"), {})
    printed = capsys.readouterr().out.split()
    assert printed[0] == "102400"


@pytest.mark.slow
def test_intrinsic_dimension_example_runs(capsys):
    """The README's intrinsic-dimension example (CPU, no downloads) runs and finds a d90."""
    text = README.read_text()
    section = text[text.index("## Intrinsic dimension"):]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    exec(compile(block, str(README), "exec"), {})
    printed = capsys.readouterr().out
    assert "intrinsic dimension d90 = " in printed and "d90 = None" not in printed
