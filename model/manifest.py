"""Load and validate a dataset manifest before any compute is spent on it.

A manifest is a CSV with ``path,label,split`` plus demographic columns (DESIGN.md, "Data").
Every problem is reported at once, naming the file and the 1-based CSV line numbers (header =
line 1), so a researcher fixes a broken manifest in one pass instead of one GPU job per typo.

The community annotations (Xu et al., as distributed with the public fairness benchmarks) are
accepted too: ``img_path`` instead of ``path`` and ``ismale,isasian,iswhite,isblack`` flags (+1/-1)
instead of ``gender,race`` columns, with an optional ``intersec_label`` id. The id convention was
checked against the reference code of Lin et al., "Preserving Fairness Generalization in Deepfake
Detection" (CVPR 2024, github.com/Purdue-M2/Fairness-Generalization, README.md and
training/dataset/datasets_train.py): id = gender_index * n_races + race_index with gender order
(male, female) and race order (asian, white, black, others) when the CSV has an ``isasian`` column
(FF++, DFDC: 8 ids), (white, black, others) when it has none (Celeb-DF, DFD: 6 ids).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import itertools
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

__all__ = ["Manifest", "ManifestError", "load_manifest", "reuse_loaded"]

_MAX_SHOWN = 10
_FLAG_GENDER = "ismale"
_FLAG_RACES = (("isasian", "asian"), ("iswhite", "white"), ("isblack", "black"))
_PATH_COLUMNS = ("path", "img_path")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and the offending rows."""

    def __init__(self, path: Path | str, problems: Sequence[str]) -> None:
        self.path = Path(path)
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid manifest {self.path}:\n{lines}")


@dataclass(frozen=True, eq=False)
class Manifest:
    """A validated manifest. ``frame`` columns: path (absolute), label (0/1, 1 = fake), split,
    group (index into ``group_names``), group_name, line (1-based, in the CSV: for messages), and
    the attribute columns."""

    path: Path
    frame: pd.DataFrame
    group_names: tuple[str, ...]
    sha256: str

    def split(self, name: str) -> pd.DataFrame:
        """Rows of split ``name`` in file order, index reset."""
        rows = self.frame[self.frame["split"] == name]
        if rows.empty:
            present = ", ".join(sorted(self.frame["split"].unique()))
            raise KeyError(f"manifest {self.path} has no split {name!r} (splits: {present})")
        return rows.reset_index(drop=True)


def _lines(lines: Sequence[int]) -> str:
    lines = list(lines)
    shown = ", ".join(str(n) for n in lines[:_MAX_SHOWN])
    more = f" ... and {len(lines) - _MAX_SHOWN} more" if len(lines) > _MAX_SHOWN else ""
    return f"{'line' if len(lines) == 1 else 'lines'} {shown}{more}"


def _values(values: Sequence[str]) -> str:
    uniq = list(dict.fromkeys(values))
    shown = ", ".join(repr(v) for v in uniq[:_MAX_SHOWN])
    return shown + (f" ... and {len(uniq) - _MAX_SHOWN} more" if len(uniq) > _MAX_SHOWN else "")


def _check_codes(frame: pd.DataFrame, line: pd.Series, column: str, codes: Sequence[str],
                 what: str, problems: list[str], *, skip: pd.Series | None = None) -> pd.Series:
    """Report empty and unknown values of ``column`` (rows in ``skip`` were already reported);
    return the mask of good rows."""
    values = frame[column]
    empty = values == ""
    bad = ~empty & ~values.isin(list(codes))
    if skip is not None:
        empty &= ~skip
    if empty.any():
        problems.append(f"{what} missing at {_lines(line[empty])}")
    if bad.any():
        problems.append(f"{what} has unknown value(s) {_values(values[bad].tolist())} at "
                        f"{_lines(line[bad])} (known: {', '.join(codes)})")
    return ~(values == "") & ~bad


def _flag(frame: pd.DataFrame, line: pd.Series, col: str, problems: list[str]) -> pd.Series:
    """A +1/-1 flag column as True/False, NaN where invalid (reported)."""
    ok = _check_codes(frame, line, col, ("1", "+1", "-1"), f"column {col!r} (+1/-1 flag)", problems)
    return frame[col].isin(["1", "+1"]).where(ok)


def _derive_from_flags(frame: pd.DataFrame, line: pd.Series, problems: list[str]) -> set[str]:
    """Turn community +1/-1 flags into ``gender``/``race`` columns where those are absent.

    Rows whose flags are invalid get "" (already reported). Returns the derived column names.
    """
    derived = set()
    if "gender" not in frame and _FLAG_GENDER in frame:
        male = _flag(frame, line, _FLAG_GENDER, problems)
        frame["gender"] = male.map({True: "male", False: "female"}).fillna("")
        derived.add("gender")
    race_flags = [(f, r) for f, r in _FLAG_RACES if f in frame]
    if "race" not in frame and {"iswhite", "isblack"} <= set(frame.columns):
        signs = {r: _flag(frame, line, f, problems) for f, r in race_flags}
        hits = pd.DataFrame({r: s == True for r, s in signs.items()})  # noqa: E712 (NaN -> False)
        several = hits.sum(axis=1) > 1
        if several.any():
            problems.append(f"more than one of {', '.join(f for f, _ in race_flags)} is +1 at "
                            f"{_lines(line[several])}")
        race = pd.Series("others", index=frame.index)
        for r in hits.columns:
            race[hits[r]] = r
        invalid = pd.concat([s.isna() for s in signs.values()], axis=1).any(axis=1) | several
        frame["race"] = race.where(~invalid, "")
        derived.add("race")
    if "intersec_label" in frame:
        races = [r for _, r in race_flags] + ["others"]
        _check_intersec_label(frame, line, races, derived == {"gender", "race"}, problems)
    return derived


def _check_intersec_label(frame: pd.DataFrame, line: pd.Series, races: list[str],
                          from_flags: bool, problems: list[str]) -> None:
    ids = pd.to_numeric(frame["intersec_label"], errors="coerce")
    not_int = ids.isna() | (ids != ids.round())
    if not_int.any():
        problems.append(f"intersec_label is not an integer at {_lines(line[not_int])}")
    if not from_flags:
        return  # the id convention is tied to the flag columns; nothing to check it against
    g = frame["gender"].map({"male": 0, "female": 1})
    r = frame["race"].map({name: i for i, name in enumerate(races)})
    expected = g * len(races) + r
    wrong = ~not_int & expected.notna() & (ids != expected)
    if wrong.any():
        names = ", ".join(f"{i}={gn}-{rn}" for i, (gn, rn) in
                          enumerate(itertools.product(("male", "female"), races)))
        problems.append(f"intersec_label disagrees with the ismale/is<race> flags at "
                        f"{_lines(line[wrong])} (convention for these columns: {names})")


def _read(path: Path) -> tuple[pd.DataFrame, pd.Series, str]:
    """The CSV as an all-text frame, the 1-based line of each row, and the sha256 of the bytes.

    Parsed with the csv module rather than ``pd.read_csv``: pandas silently turns extra fields
    into an index or drops them, and loses line numbers on blank lines and quoted newlines.
    Everything stays text (no NA conversion): "NA", "" and "nan" are judged by the checks.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(path, ["file not found"]) from None
    except OSError as e:
        raise ManifestError(path, [f"cannot read file: {e}"]) from None
    try:
        reader = csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline=""))
        header = [c.strip() for c in next(reader, [])]
        rows, lines, ragged, end = [], [], [], reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            if not row or all(not f.strip() for f in row):
                continue  # blank line
            if len(row) == len(header):
                rows.append([f.strip() for f in row])
                lines.append(start)
            else:
                ragged.append(start)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ManifestError(path, [f"not UTF-8 text at line {line} (byte {raw[e.start]:#04x}); save the CSV as UTF-8"]) from None
    except csv.Error as e:
        raise ManifestError(path, [f"cannot parse CSV: {e}"]) from None
    if not header or header == [""]:
        raise ManifestError(path, ["cannot parse CSV: the file is empty (no header line)"])
    dup = sorted({c for c in header if header.count(c) > 1})
    if dup:
        raise ManifestError(path, [f"duplicate column name(s) in the header: {', '.join(dup)}"])
    if ragged:
        raise ManifestError(path, [f"wrong number of fields (the header has {len(header)}) at "
                                   f"{_lines(ragged)}"])
    frame = pd.DataFrame(rows, columns=header, dtype=str)
    return frame, pd.Series(lines, dtype=int), hashlib.sha256(raw).hexdigest()


_reused: dict[tuple, Manifest] | None = None  # inside reuse_loaded(): what was loaded, by file state and arguments


@contextlib.contextmanager
def reuse_loaded() -> Iterator[None]:
    """Within the block, loading a manifest whose file is unchanged, with the same arguments, again
    gives the first result instead of a second read and check. A worker's start reads the train/val
    manifest for the study's identity and again to prepare: for FF++'s ~100k rows ~1.4 s and 100k
    file checks each (bench: local disk), more on a network filesystem. Scoped, not a global cache:
    elsewhere every load sees the files as they are now."""
    global _reused
    outer = _reused
    _reused = {} if outer is None else outer
    try:
        yield
    finally:
        _reused = outer


def _reuse_key(path: Path, arguments: tuple) -> tuple | None:
    try:
        stat = path.stat()
    except OSError:
        return None  # _read names the problem
    return (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, *arguments)


def load_manifest(path: Path | str, *, attributes: Mapping[str, Sequence[str]],
                  required_splits: Sequence[str] = ("train", "val"),
                  allowed_splits: Sequence[str] = ("train", "val", "test"),
                  default_split: str | None = None, image_root: Path | None = None,
                  check_files: bool = True) -> Manifest:
    """Read ``path`` and validate it; raise :class:`ManifestError` listing every problem.

    ``attributes`` maps each demographic column to its known codes; groups are all their
    intersections (``itertools.product`` order), so group ids agree across datasets even when a
    dataset lacks a group. Relative image paths resolve against ``image_root`` (default: the
    CSV's directory).
    """
    if not attributes or any(len(codes) == 0 for codes in attributes.values()):
        raise ValueError(f"attributes must map each column to at least one code, got {attributes!r}")
    for col, codes in attributes.items():
        if len(set(codes)) != len(codes) or any("/" in c or not c for c in codes):
            raise ValueError(f"codes of {col!r} must be unique, non-empty, without '/': {codes!r}")
    if not set(required_splits) <= set(allowed_splits):
        raise ValueError(f"required_splits {required_splits!r} not within allowed {allowed_splits!r}")
    if default_split is not None and default_split not in allowed_splits:
        raise ValueError(f"default_split {default_split!r} not in allowed {allowed_splits!r}")

    path = Path(path).absolute()
    key = None
    if _reused is not None:
        arguments = (tuple((c, tuple(v)) for c, v in attributes.items()), tuple(required_splits), tuple(allowed_splits),
                     default_split, None if image_root is None else str(Path(image_root).absolute()), check_files)
        key = _reuse_key(path, arguments)
        if key in _reused:
            earlier = _reused[key]
            return dataclasses.replace(earlier, frame=earlier.frame.copy())
    manifest = _load(path, attributes, required_splits, allowed_splits, default_split, image_root, check_files)
    if key is not None and _reused is not None:
        _reused[key] = dataclasses.replace(manifest, frame=manifest.frame.copy())
    return manifest


def _load(path: Path, attributes: Mapping[str, Sequence[str]], required_splits: Sequence[str], allowed_splits: Sequence[str],
          default_split: str | None, image_root: Path | None, check_files: bool) -> Manifest:
    frame, line, digest = _read(path)
    found = list(frame.columns)
    problems: list[str] = []

    path_col = next((c for c in _PATH_COLUMNS if c in frame), None)
    missing = [] if path_col else ["path (or img_path)"]
    missing += [c for c in ("label",) if c not in frame]
    if "split" not in frame:
        if default_split is None:
            missing.append("split")
        else:
            frame["split"] = default_split
    derived = _derive_from_flags(frame, line, problems)
    missing += [c for c in attributes if c not in frame]
    if missing:
        hint = " (or community flags ismale, iswhite, isblack[, isasian])" if \
            {"gender", "race"} & set(missing) else ""
        raise ManifestError(path, [f"missing required column(s) {', '.join(missing)}{hint}; "
                                   f"columns found: {', '.join(found) or '(none)'}"] + problems)

    label_ok = _check_codes(frame, line, "label", ("0", "1"), "label (0 = real, 1 = fake)", problems)
    split_ok = _check_codes(frame, line, "split", tuple(allowed_splits), "split", problems)
    for col, codes in attributes.items():
        _check_codes(frame, line, col, tuple(codes), f"column {col!r}", problems,
                     skip=(frame[col] == "") if col in derived else None)

    root = Path(image_root).absolute() if image_root is not None else path.parent
    rel = frame[path_col]
    no_path = rel == ""
    if no_path.any():
        problems.append(f"image path missing at {_lines(line[no_path])}")
    abs_path = rel.map(lambda p: os.path.normpath(root / p) if p else "")
    dup = abs_path.duplicated(keep=False) & ~no_path
    if dup.any():
        problems.append(f"duplicate image path(s) {_values(rel[dup].tolist())} at {_lines(line[dup])}")
    if check_files:
        absent = ~no_path & ~abs_path.map(os.path.isfile)
        if absent.any():
            problems.append(f"image file(s) not found (resolved against {root}): "
                            f"{_values(rel[absent].tolist())} at {_lines(line[absent])}")

    if label_ok.all() and split_ok.all():  # class checks only make sense on clean columns
        for name in required_splits:
            labels = set(frame.loc[frame["split"] == name, "label"])
            if not labels:
                problems.append(f"required split {name!r} has no rows")
            elif len(labels) == 1:
                only = "real (label 0)" if labels == {"0"} else "fake (label 1)"
                problems.append(f"required split {name!r} has only one class: every row is {only}")
    if problems:
        raise ManifestError(path, problems)

    group_names = tuple("/".join(t) for t in itertools.product(*attributes.values()))
    cols = list(attributes)
    group_name = frame[cols[0]]
    for col in cols[1:]:
        group_name = group_name + "/" + frame[col]
    out = pd.DataFrame({
        "path": abs_path, "label": frame["label"].astype(int), "split": frame["split"],
        "group": group_name.map({g: i for i, g in enumerate(group_names)}).astype(int),
        "group_name": group_name, "line": line.to_numpy(),
    })
    for col in attributes:
        out[col] = frame[col]
    return Manifest(path=path, frame=out, group_names=group_names, sha256=digest)
