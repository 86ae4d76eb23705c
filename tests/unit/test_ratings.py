"""`load_ratings`: the three MovieLens formats, time order (stable for ties), and errors naming file:line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streammf.tools.ratings import RatingsFormatError, load_ratings

# (user, item, rating, time) in file order; times out of order with ties.
ROWS = [
    ("1", "10", 4.0, 300),
    ("2", "20", 3.5, 100),
    ("1", "30", 5.0, 200),
    ("3", "10", 1.0, 100),
    ("2", "30", 2.0, 300),
    ("4", "40", 3.0, 100),
]


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="latin-1")
    return path


def _tab(rows=ROWS) -> str:
    return "".join(f"{u}\t{i}\t{r:g}\t{t}\n" for u, i, r, t in rows)


def _colons(rows=ROWS) -> str:
    return "".join(f"{u}::{i}::{r:g}::{t}\n" for u, i, r, t in rows)


def _csv(rows=ROWS) -> str:
    return "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r:g},{t}\n" for u, i, r, t in rows)


def _expected(rows=ROWS):
    # Stable sort by time: ties keep file order.
    order = sorted(range(len(rows)), key=lambda n: rows[n][3])
    return [rows[n] for n in order]


@pytest.mark.parametrize(
    ("name", "render"),
    [("u.data", _tab), ("ratings.dat", _colons), ("ratings.csv", _csv)],
    ids=["tab", "colons", "csv"],
)
def test_formats_read_in_time_order(tmp_path: Path, name: str, render) -> None:
    log = load_ratings(_write(tmp_path, name, render()))
    expected = _expected()
    assert len(log) == len(ROWS)
    assert log.users.tolist() == [u for u, _, _, _ in expected]
    assert log.items.tolist() == [i for _, i, _, _ in expected]
    np.testing.assert_array_equal(log.values, [r for _, _, r, _ in expected])
    np.testing.assert_array_equal(log.timestamps, [t for _, _, _, t in expected])
    assert log.values.dtype == np.float64 and log.timestamps.dtype == np.float64
    assert all(isinstance(u, str) for u in log.users.tolist())
    assert np.all(np.diff(log.timestamps) >= 0)


def test_all_ties_keep_file_order(tmp_path: Path) -> None:
    rows = [(str(n), str(100 - n), float(n % 5 + 1), 7) for n in range(50)]
    log = load_ratings(_write(tmp_path, "u.data", _tab(rows)))
    assert log.users.tolist() == [u for u, _, _, _ in rows]


def test_large_shuffled_file_is_stably_sorted(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    times = rng.integers(0, 20, 2000)  # many ties
    rows = [(f"u{n}", f"i{n % 37}", float(rng.integers(1, 6)), int(t)) for n, t in enumerate(times)]
    log = load_ratings(_write(tmp_path, "u.data", _tab(rows)))
    assert log.users.tolist() == [u for u, _, _, _ in _expected(rows)]


def test_csv_without_header_and_extra_columns_and_blank_lines(tmp_path: Path) -> None:
    text = "1,2,3.5,10\n\n3,4,4,5\n"
    log = load_ratings(_write(tmp_path, "r.csv", text))
    assert log.users.tolist() == ["3", "1"]
    np.testing.assert_array_equal(log.values, [4.0, 3.5])
    tab = load_ratings(_write(tmp_path, "u.data", "1\t2\t3\t10\textra\n"))
    assert (tab.users.tolist(), tab.items.tolist(), tab.values.tolist()) == (["1"], ["2"], [3.0])


def test_ids_are_kept_as_text(tmp_path: Path) -> None:
    log = load_ratings(_write(tmp_path, "ratings.dat", "007::0042::4::1\nabc::é::2::2\n"))
    assert log.users.tolist() == ["007", "abc"]
    assert log.items.tolist() == ["0042", "é"]


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("name", "text", "line", "words"),
    [
        ("u.data", "1\t2\t3\t4\n1\t2\t3\n", 2, "expected 4 fields"),
        ("u.data", "1\t2\t3\t4\n1\t2\t3\t4\n5\t6\tgood\t7\n", 3, "not numeric"),
        ("u.data", "1\t2\t3\tyesterday\n", 1, "not numeric"),
        ("u.data", "1\t2\t3\t4\n1\t2\tnan\t4\n", 2, "not finite"),
        ("u.data", "1\t2\tinf\t4\n", 1, "not finite"),
        ("ratings.dat", "1::2::3::4\n1::2::3\n", 2, "expected 4 fields"),
        ("ratings.dat", "1::2::x::4\n", 1, "not numeric"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,2\n", 3, "expected 4 fields"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,2,five,4\n", 3, "not numeric"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,-inf,4\n", 2, "not finite"),
    ],
)
def test_malformed_lines_name_file_and_line(
    tmp_path: Path, name: str, text: str, line: int, words: str
) -> None:
    path = _write(tmp_path, name, text)
    with pytest.raises(RatingsFormatError) as info:
        load_ratings(path)
    message = str(info.value)
    assert f"{path}:{line}:" in message
    assert words in message


@pytest.mark.parametrize(
    ("text", "words"), [("", "empty file"), ("1 2 3 4\n", "line 1"), ("hello\n", "line 1")], ids=str
)
def test_unrecognised_files(tmp_path: Path, text: str, words: str) -> None:
    path = _write(tmp_path, "x.txt", text)
    with pytest.raises(RatingsFormatError) as info:
        load_ratings(path)
    assert str(path) in str(info.value)
    assert words in str(info.value)


def test_format_error_is_a_value_error() -> None:
    assert issubclass(RatingsFormatError, ValueError)
