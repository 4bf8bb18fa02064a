"""The README's quick starts run as written and print what they promise."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_starts_run_and_print_the_promised_state(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 3, "the README has three quick starts (M2KD, its regularizer in a plain loop, then ED)"
    namespace: dict = {}
    for block in blocks:  # later blocks reuse the first block's imports, as a reader's session would
        exec(compile(block, str(README), "exec"), namespace)
    printed = capsys.readouterr().out.split("\n")
    lines = [line for line in printed if re.fullmatch(r"\d+ \d+", line.strip())]
    snapshots, nbytes = map(int, lines[0].split())
    depth, head = map(int, lines[1].split())
    store = namespace["m2kd"].snapshots
    # bytes counted from the saved snapshots, not from the store's own accounting; less than the
    # teachers rebuilt from them, whose heads hold rows for classes they do not teach
    held = sum(t.nelement() * t.element_size() for s in store.state_dict()["snapshots"] for t in s.values())
    teacher_bytes = sum(t.nelement() * t.element_size() for k in range(5) for t in store.teacher(k).state_dict().values())
    assert snapshots == 5 and nbytes == held < teacher_bytes
    assert (depth, head) == (3, 10)
    assert "3 ['aux_bce', 'classification']" in printed  # the plain loop: three snapshots' groups, the sigmoid form's terms
    reg = namespace["reg"]
    assert len(reg.snapshots) == 3 and reg.aux_layers == ["stage1", "stage2"]
