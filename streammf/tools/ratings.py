"""Reading rating logs (MovieLens `u.data`, `ratings.dat`, `ratings.csv`) into time-ordered columns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


class RatingsFormatError(ValueError):
    """The file is not one of the supported rating-log formats; the message says where it broke."""


@dataclass(frozen=True)
class RatingsLog:
    users: np.ndarray  # (n,) str ids
    items: np.ndarray  # (n,) str ids
    values: np.ndarray  # (n,) float64
    timestamps: np.ndarray  # (n,) float64 unix seconds

    def __len__(self) -> int:
        return len(self.values)


def load_ratings(path: str | Path) -> RatingsLog:
    """Read a rating log and order it by timestamp (stable: ties keep file order).

    Formats, recognised from the content: tab-separated `user item rating time` (ML-100k `u.data`),
    `user::item::rating::time` (ML-1M/10M `ratings.dat`), CSV with a `userId,movieId,rating,timestamp`
    header (ML-20M/25M/latest `ratings.csv`).
    """
    path = Path(path)
    with path.open("r", encoding="latin-1") as handle:
        first = handle.readline()
    if not first:
        raise RatingsFormatError(f"{path}: empty file")
    if "::" in first:
        raw = _read_columns(path, separator="::", skip_header=False)
    elif "\t" in first:
        raw = _read_columns(path, separator="\t", skip_header=False)
    elif "," in first:
        header = first.strip().lower().split(",")
        raw = _read_columns(path, separator=",", skip_header=not _is_number(header[0]))
    else:
        raise RatingsFormatError(f"{path}: line 1 is neither tab-, '::'- nor comma-separated: {first[:80]!r}")
    users, items, values, times = raw
    order = np.argsort(times, kind="stable")
    return RatingsLog(users[order], items[order], values[order], times[order])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_columns(
    path: Path, separator: str, skip_header: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    users: list[str] = []
    items: list[str] = []
    values: list[float] = []
    times: list[float] = []
    with path.open("r", encoding="latin-1") as handle:
        for number, line in enumerate(handle, start=1):
            if skip_header and number == 1:
                continue
            line = line.strip()
            if not line:
                continue
            fields = line.split(separator)
            if len(fields) < 4:
                raise RatingsFormatError(
                    f"{path}:{number}: expected 4 fields, got {len(fields)}: {line[:80]!r}"
                )
            try:
                value, stamp = float(fields[2]), float(fields[3])
            except ValueError as exc:
                raise RatingsFormatError(f"{path}:{number}: rating/time not numeric: {line[:80]!r}") from exc
            if not (np.isfinite(value) and np.isfinite(stamp)):
                raise RatingsFormatError(f"{path}:{number}: rating/time not finite: {line[:80]!r}")
            users.append(fields[0])
            items.append(fields[1])
            values.append(value)
            times.append(stamp)
    return np.array(users), np.array(items), np.array(values), np.array(times)
