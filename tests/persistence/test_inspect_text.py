"""``risk-gateway inspect`` as a person reads it: no ``None``, decimals as the wire writes them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gateway.cli import _seq_range, describe_state_dir


def test_inspect_when_no_records_then_says_so_without_none(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "inspect", str(tmp_path)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    text = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    assert "None" not in text
    assert "no records" in text


def test_seq_range_when_empty_or_set_then_readable() -> None:
    assert _seq_range(None, None) == "no records"
    assert _seq_range(5, 4) == "no records"
    assert _seq_range(3, 9) == "seq 3..9"


def test_inspect_gross_exposure_when_empty_then_plain_decimal(tmp_path: Path) -> None:
    report = describe_state_dir(tmp_path)
    assert report["gross_exposure"] == "0"
