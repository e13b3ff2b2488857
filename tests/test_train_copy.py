"""The copy fine-tune's batches (scripts/train_models.py): what each kind of row holds."""

import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from train_models import CopyMix, copy_batch

NEWLINE, BLANK = 10, 11


def _stream(n: int = 3000) -> torch.Tensor:
    # Distinct tokens (12..) with a line end every 7: a repeat is found by value, not by chance.
    ids = torch.arange(12, 12 + n)
    ids[::7] = NEWLINE
    return ids


def _mix(**fractions) -> CopyMix:
    return CopyMix(frozenset({NEWLINE}), (BLANK,), vocab_size=4096, **fractions)


def _periodic_from(row: list[int], start: int, period: int) -> bool:
    return all(row[i] == row[i - period] for i in range(start + period, len(row)))


def test_copy_rows_repeat_their_window_after_a_blank_line_from_a_line_start():
    rows = copy_batch(_stream(), 32, 96, torch.Generator().manual_seed(0), _mix(copy_frac=1.0, random_frac=0.0))
    assert rows.shape == (32, 96)
    for row in rows.tolist():
        blank = row.index(BLANK)
        window, rest = row[:blank], row[blank + 1:]
        assert 24 <= len(window) <= 96 // 2 + 10
        start = window.index(rest[0])  # where the repeat starts in the window
        assert start == 0 or window[start - 1] == NEWLINE
        again = window[start:]
        assert rest == (again * (len(rest) // len(again) + 1))[:len(rest)]


def test_random_rows_repeat_a_random_string_and_plain_rows_are_corpus_windows():
    gen = torch.Generator().manual_seed(1)
    random_rows = copy_batch(_stream(), 16, 90, gen, _mix(copy_frac=0.0, random_frac=1.0)).tolist()
    for row in random_rows:
        period = next(p for p in range(8, 31) if _periodic_from(row, 0, p))
        assert len(set(row[:period])) > 1 and all(0 < t < 4096 for t in row)
    stream = _stream()
    plain = copy_batch(stream, 16, 90, gen, _mix(copy_frac=0.0, random_frac=0.0))
    for row in plain:
        j = next(j for j, t in enumerate(row.tolist()) if t != NEWLINE)  # distinct but for the line ends
        start = int(torch.nonzero(stream == row[j])[0]) - j
        assert torch.equal(stream[start:start + 90], row)


def test_batches_are_deterministic_for_a_seed_and_mix_the_kinds():
    mix = _mix()
    a = copy_batch(_stream(), 64, 80, torch.Generator().manual_seed(2), mix)
    b = copy_batch(_stream(), 64, 80, torch.Generator().manual_seed(2), mix)
    assert torch.equal(a, b)
    assert not torch.equal(a, copy_batch(_stream(), 64, 80, torch.Generator().manual_seed(3), mix))
    copies = sum(BLANK in row for row in a.tolist())  # half the rows, by copy_frac
    assert 16 <= copies <= 48
