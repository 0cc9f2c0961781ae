import hashlib
import itertools
import re
from pathlib import Path

import pytest

from model.manifest import Manifest, ManifestError, load_manifest

ATTRS = {"gender": ["male", "female"], "race": ["asian", "white", "black", "others"]}
GROUPS = tuple(f"{g}/{r}" for g, r in itertools.product(ATTRS["gender"], ATTRS["race"]))
HEADER = "path,label,split,gender,race"
VALID = [
    "a.png,0,train,male,white",
    "b.png,1,train,female,asian",
    "c.png,0,val,female,black",
    "d.png,1,val,male,others",
]


def write(tmp_path: Path, lines, header=HEADER, name="m.csv", images=True) -> Path:
    """Write a manifest (header + lines) and an empty file for every image path in it."""
    csv = tmp_path / name
    csv.write_text("\n".join([header, *lines]) + "\n")
    if images:
        for line in lines:
            first = line.split(",")[0]
            if first and not Path(first).is_absolute():
                (tmp_path / first).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / first).write_bytes(b"png")
    return csv


def load(csv, **kw) -> Manifest:
    return load_manifest(csv, attributes=kw.pop("attributes", ATTRS), **kw)


def error(csv, **kw) -> str:
    with pytest.raises(ManifestError) as info:
        load(csv, **kw)
    message = str(info.value)
    assert str(Path(csv).absolute()) in message  # every error names the file
    return message


# ---- valid manifests -----------------------------------------------------------------------


def test_valid_manifest_loads_with_stable_group_ids(tmp_path):
    csv = write(tmp_path, VALID)
    m = load(csv)
    assert m.group_names == GROUPS
    assert list(m.frame.columns) == ["path", "label", "split", "group", "group_name", "line", "gender", "race"]
    assert m.frame["group_name"].tolist() == ["male/white", "female/asian", "female/black", "male/others"]
    assert m.frame["group"].tolist() == [GROUPS.index(g) for g in m.frame["group_name"]] == [1, 4, 6, 3]
    assert m.frame["label"].tolist() == [0, 1, 0, 1]
    assert m.sha256 == hashlib.sha256(csv.read_bytes()).hexdigest()
    val = m.split("val")
    assert val.index.tolist() == [0, 1] and val["path"].tolist() == [str(tmp_path / "c.png"),
                                                                     str(tmp_path / "d.png")]
    with pytest.raises(KeyError, match="test"):
        m.split("test")


def test_dataset_lacking_a_group_keeps_the_same_ids(tmp_path):
    lines = ["a.png,0,train,male,white", "b.png,1,train,female,black",
             "c.png,0,val,female,white", "d.png,1,val,male,others"]  # no asian at all
    m = load(write(tmp_path, lines))
    assert m.group_names == GROUPS
    assert m.frame["group"].tolist() == [1, 6, 5, 3]


@pytest.mark.parametrize("root", [None, "imgs"])
def test_relative_paths_resolve(tmp_path, root):
    base = tmp_path if root is None else tmp_path / root
    (base / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png"):
        (base / "sub" / name).write_bytes(b"x")
    absolute = tmp_path / "abs.png"
    absolute.write_bytes(b"x")
    lines = ["sub/a.png,0,train,male,white", "./sub/b.png,1,train,male,white",
             "sub/../sub/c.png,0,val,male,white", f"{absolute},1,val,male,white"]
    csv = write(tmp_path, lines, images=False)
    m = load(csv, image_root=None if root is None else base)
    assert m.frame["path"].tolist() == [str(base / "sub" / "a.png"), str(base / "sub" / "b.png"),
                                        str(base / "sub" / "c.png"), str(absolute)]


def test_default_split_fills_a_missing_split_column(tmp_path):
    csv = write(tmp_path, ["a.png,0,male,white", "b.png,1,female,asian"],
                header="path,label,gender,race")
    m = load(csv, default_split="test", required_splits=("test",))
    assert m.frame["split"].tolist() == ["test", "test"]


def test_single_attribute_groups(tmp_path):
    m = load(write(tmp_path, VALID), attributes={"gender": ["male", "female"]})
    assert m.group_names == ("male", "female")
    assert m.frame["group"].tolist() == [0, 1, 1, 0]
    assert "race" not in m.frame


# ---- community (Xu et al. / Lin et al.) format ------------------------------------------------

# ids: with isasian 0..7 = male-{asian,white,black,others}, female-{...}; without, 0..5 (no asian)
COMMUNITY_8 = ("img_path,label,ismale,isasian,iswhite,isblack,intersec_label", [
    ("a.png,1,1,1,-1,-1,0", "male/asian"),
    ("b.png,0,1,-1,1,-1,1", "male/white"),
    ("c.png,1,1,-1,-1,1,2", "male/black"),
    ("d.png,0,1,-1,-1,-1,3", "male/others"),
    ("e.png,1,-1,1,-1,-1,4", "female/asian"),
    ("f.png,0,-1,-1,1,-1,5", "female/white"),
    ("g.png,1,-1,-1,-1,1,6", "female/black"),
    ("h.png,0,-1,-1,-1,-1,7", "female/others"),
])
COMMUNITY_6 = ("img_path,label,ismale,iswhite,isblack,intersec_label", [
    ("a.png,1,1,1,-1,0", "male/white"),
    ("b.png,0,1,-1,1,1", "male/black"),
    ("c.png,1,1,-1,-1,2", "male/others"),
    ("d.png,0,-1,1,-1,3", "female/white"),
    ("e.png,1,-1,-1,1,4", "female/black"),
    ("f.png,0,+1,-1,-1,2", "male/others"),
])


@pytest.mark.parametrize("header,rows", [COMMUNITY_8, COMMUNITY_6], ids=["ffpp-8", "celebdf-6"])
def test_community_format_derives_groups(tmp_path, header, rows):
    csv = write(tmp_path, [r for r, _ in rows], header=header)
    m = load(csv, default_split="test", required_splits=("test",))
    assert m.frame["group_name"].tolist() == [g for _, g in rows]
    assert m.frame["group"].tolist() == [GROUPS.index(g) for _, g in rows]
    assert m.frame["path"].tolist() == [str(tmp_path / r.split(",")[0]) for r, _ in rows]


@pytest.mark.parametrize("header,lines,expected", [
    (COMMUNITY_8[0], ["a.png,1,0,1,-1,-1,0", "b.png,0,1,-1,1,-1,1", "c.png,1,yes,-1,1,-1,1"],
     [r"column 'ismale' \(\+1/-1 flag\) has unknown value\(s\) '0', 'yes' at lines 2, 4"]),
    (COMMUNITY_8[0], ["a.png,1,1,1,1,-1,0", "b.png,0,1,-1,1,-1,1", "c.png,1,1,-1,1,1,1"],
     [r"more than one of isasian, iswhite, isblack is \+1 at lines 2, 4"]),
    (COMMUNITY_8[0], ["a.png,1,1,1,-1,-1,4", "b.png,0,1,-1,1,-1,1", "c.png,1,-1,-1,-1,-1,3"],
     [r"intersec_label disagrees .* at lines 2, 4 .*0=male-asian.*7=female-others"]),
    (COMMUNITY_6[0], ["a.png,1,1,1,-1,1", "b.png,0,1,-1,1,1"],  # 8-group id in a 6-group CSV
     [r"intersec_label disagrees .* at line 2 .*0=male-white.*5=female-others"]),
    (COMMUNITY_8[0], ["a.png,1,1,1,-1,-1,x", "b.png,0,1,-1,1,-1,1.5", "c.png,1,1,-1,1,-1,1"],
     [r"intersec_label is not an integer at lines 2, 3"]),
], ids=["flag-value", "two-races", "intersec-8", "intersec-6", "intersec-not-int"])
def test_community_format_errors(tmp_path, header, lines, expected):
    message = error(write(tmp_path, lines, header=header), default_split="train",
                    required_splits=())
    for pattern in expected:
        assert re.search(pattern, message), message
    assert "column 'gender'" not in message and "column 'race'" not in message  # no cascades


def test_intersec_label_alongside_explicit_columns_only_needs_integers(tmp_path):
    csv = write(tmp_path, [v + ",99" for v in VALID], header=HEADER + ",intersec_label")
    load(csv)  # no flags to check 99 against: accepted
    csv = write(tmp_path, [v + ",x" for v in VALID], header=HEADER + ",intersec_label")
    assert "intersec_label is not an integer at lines 2, 3, 4, 5" in error(csv)


# ---- one test per error ------------------------------------------------------------------------


def test_missing_file(tmp_path):
    assert "file not found" in error(tmp_path / "nope.csv")


@pytest.mark.parametrize("content,expected", [
    (None, "cannot read file"),  # a directory where the CSV should be
    ("", "cannot parse CSV"),
    (b"\xff\xfe\x00garbage", "not UTF-8 text at line 1 (byte 0xff)"),
    ((HEADER + "\na.png,0,train,male,white\nb\xe9.png,0,val,male,white\n").encode("latin-1"), "not UTF-8 text at line 3 (byte 0xe9)"),
    (HEADER + "\na.png,0,train,male,white,extra\nb.png,0,train,male,white\nc.png,0,val\n",
     "wrong number of fields (the header has 5) at lines 2, 4"),
    ("path,label,path\na.png,0,b.png\n", "duplicate column name(s) in the header: path"),
])
def test_unreadable_file(tmp_path, content, expected):
    csv = tmp_path / "m.csv"
    if content is None:
        csv.mkdir()
    else:
        csv.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert expected in error(csv)


@pytest.mark.parametrize("drop", ["path", "label", "split", "gender", "race"])
def test_missing_column(tmp_path, drop):
    columns = HEADER.split(",")
    keep = [i for i, c in enumerate(columns) if c != drop]
    lines = [",".join(v.split(",")[i] for i in keep) for v in VALID]
    message = error(write(tmp_path, lines, header=",".join(columns[i] for i in keep), images=False))
    assert re.search(rf"missing required column\(s\) {drop}\b", message), message
    assert "columns found: " + ", ".join(columns[i] for i in keep) in message


def test_missing_columns_are_all_named(tmp_path):
    message = error(write(tmp_path, ["a.png"], header="file", images=False))
    assert "missing required column(s) path (or img_path), label, split, gender, race" in message
    assert "columns found: file" in message


@pytest.mark.parametrize("bad,expected", [
    (["", "NA"], r"label \(0 = real, 1 = fake\) missing at line 3\b"),
    (["2", "fake"], r"label .* unknown value\(s\) '2', 'fake' at lines 3, 5"),
    (["NA", "-1"], r"unknown value\(s\) 'NA', '-1' at lines 3, 5"),
])
def test_bad_label(tmp_path, bad, expected):
    lines = list(VALID)
    lines[1] = lines[1].replace(",1,", f",{bad[0]},", 1)
    lines[3] = lines[3].replace(",1,", f",{bad[1]},", 1)
    assert re.search(expected, error(write(tmp_path, lines)))


def test_bad_split(tmp_path):
    lines = list(VALID) + ["e.png,0,,male,white", "f.png,0,holdout,male,white",
                           "g.png,1,Train,male,white"]
    message = error(write(tmp_path, lines))
    assert "split missing at line 6" in message
    assert "split has unknown value(s) 'holdout', 'Train' at lines 7, 8 (known: train, val, test)" \
        in message


@pytest.mark.parametrize("split", ["train", "val"])
def test_required_split_absent(tmp_path, split):
    lines = [v for v in VALID if f",{split}," not in v]
    assert f"required split '{split}' has no rows" in error(write(tmp_path, lines))


@pytest.mark.parametrize("label,name", [("0", "real (label 0)"), ("1", "fake (label 1)")])
def test_required_split_with_one_class(tmp_path, label, name):
    lines = VALID[:2] + [f"c.png,{label},val,female,black", f"d.png,{label},val,male,others"]
    message = error(write(tmp_path, lines))
    assert f"required split 'val' has only one class: every row is {name}" in message


def test_bad_demographic_values(tmp_path):
    lines = list(VALID) + ["e.png,0,train,martian,white", "f.png,0,train,male,",
                           "g.png,1,train,male,latino", "h.png,1,train,M,latino"]
    message = error(write(tmp_path, lines))
    assert "column 'gender' has unknown value(s) 'martian', 'M' at lines 6, 9 (known: male, female)" \
        in message
    assert "column 'race' missing at line 7" in message
    assert "column 'race' has unknown value(s) 'latino' at lines 8, 9" in message


def test_missing_image_file(tmp_path):
    csv = write(tmp_path, VALID)
    (tmp_path / "b.png").unlink()
    (tmp_path / "d.png").unlink()
    message = error(csv)
    assert "image file(s) not found" in message and "'b.png', 'd.png' at lines 3, 5" in message
    assert len(load(csv, check_files=False).frame) == 4


def test_missing_image_path_value(tmp_path):
    lines = list(VALID) + [",0,train,male,white"]
    assert "image path missing at line 6" in error(write(tmp_path, lines))


def test_duplicate_paths(tmp_path):
    lines = list(VALID) + ["a.png,1,val,male,white", "./c.png,1,val,male,white"]
    message = error(write(tmp_path, lines))
    assert "duplicate image path(s) 'a.png', 'c.png', './c.png' at lines 2, 4, 6, 7" in message


def test_many_bad_rows_are_truncated(tmp_path):
    lines = list(VALID) + [f"x{i}.png,7,train,male,white" for i in range(15)]
    message = error(write(tmp_path, lines))
    assert "at lines 6, 7, 8, 9, 10, 11, 12, 13, 14, 15 ... and 5 more" in message


def test_all_problems_are_reported_at_once(tmp_path):
    lines = list(VALID) + ["e.png,9,train,male,white", "f.png,0,nope,male,white",
                           "g.png,0,train,male,martian"]
    with pytest.raises(ManifestError) as info:
        load(write(tmp_path, lines))
    assert len(info.value.problems) == 3
    assert info.value.path == (tmp_path / "m.csv").absolute()


def test_line_numbers_count_blank_lines_and_quoted_newlines(tmp_path):
    for name in ("a.png", "b\nc.png", "d.png"):
        (tmp_path / name).write_bytes(b"x")
    text = (HEADER + "\na.png,0,train,male,white\n\n\"b\nc.png\",1,train,male,white\n"
            "d.png,0,val,male,white\ne.png,5,val,male,white\n")
    (tmp_path / "m.csv").write_text(text)
    assert re.search(r"'5' at line 7\b", error(tmp_path / "m.csv"))


@pytest.mark.parametrize("kwargs", [
    dict(attributes={}),
    dict(attributes={"gender": []}),
    dict(attributes={"gender": ["male", "male"]}),
    dict(attributes={"race": ["a/b"]}),
    dict(attributes=ATTRS, required_splits=("test",), allowed_splits=("train",)),
    dict(attributes=ATTRS, default_split="holdout"),
])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError) as info:
        load_manifest(write(tmp_path, VALID), **kwargs)
    assert not isinstance(info.value, ManifestError)


# ---- reuse within a worker's start ---------------------------------------------------------


def _counting_reads(monkeypatch) -> list[Path]:
    import model.manifest as manifest_module

    reads, real_read = [], manifest_module._read

    def read(path):
        reads.append(path)
        return real_read(path)

    monkeypatch.setattr(manifest_module, "_read", read)
    return reads


def test_inside_reuse_loaded_an_unchanged_manifest_is_read_once_and_each_caller_gets_its_own_frame(tmp_path, monkeypatch):
    from model.manifest import reuse_loaded

    csv, reads = write(tmp_path, VALID), _counting_reads(monkeypatch)
    with reuse_loaded():
        first = load(csv)
        first.frame.loc[0, "label"] = 1  # a caller's change stays its own
        second = load(csv)
        assert len(reads) == 1 and second.frame.loc[0, "label"] == 0 and second.sha256 == first.sha256
        load(csv, required_splits=("train",))  # other arguments: checked again
        assert len(reads) == 2
        csv.write_text("\n".join([HEADER, *VALID[:1], "b.png,1,train,female,others", *VALID[2:]]) + "\n")  # edited meanwhile
        assert load(csv).frame.loc[1, "group_name"] == "female/others" and len(reads) == 3
    load(csv)
    assert len(reads) == 4  # outside the block every load reads the file as it is now


def test_outside_reuse_loaded_a_removed_image_is_found_by_the_next_load(tmp_path):
    csv = write(tmp_path, VALID)
    load(csv)
    (tmp_path / "a.png").unlink()
    assert "a.png" in error(csv)
