"""docs/your_data.md as written: for each data set, the page's join recipe and its commands run on
the tiny invented files of tests/data/ (the official files' names and columns; the images are
written here, where the official layout puts them), and what they print and write compared with
what the page shows.

The three data sets run as three shell processes side by side: each command is a fresh Python
that imports torch, and one after another they would take most of this file's time."""

import csv
import gzip
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "your_data.md"
DATA = Path(__file__).resolve().parent / "data"
DATASETS = {"mimic": "MIMIC-CXR", "padchest": "PadChest", "ham": "HAM10000"}  # --convert name: page section


def section(title):
    """The fenced blocks of one "## title" section of the page, as (language, text) pairs."""
    parts = re.split(r"^## ", DOC.read_text(encoding="utf-8"), flags=re.M)
    (text,) = [p for p in parts if p.startswith(title + "\n")]
    return re.findall(r"^```(\w+)\n(.*?)^```$", text, flags=re.M | re.S)


def block(title, language):
    """The section's first block in `language`; "output": the text block right after its commands."""
    blocks = section(title)
    if language == "output":
        i = [lang for lang, _ in blocks].index("sh")
        assert blocks[i + 1][0] == "text"
        return blocks[i + 1][1]
    return [b for lang, b in blocks if lang == language][0]


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def gzip_to(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(gzip.compress(src.read_bytes()))


def lay_out(name, folder):
    """The downloads of one data set in `folder`, as the page's commands expect them."""
    src = DATA / name
    if name == "mimic":
        for f in ("mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-split.csv"):
            gzip_to(src / f, folder / "mimic-cxr-jpg" / (f + ".gz"))
        for f in ("patients.csv", "admissions.csv"):
            gzip_to(src / f, folder / "mimic-iv" / "hosp" / (f + ".gz"))
        shutil.copy(src / "mimic_cxr_sectioned.csv", folder)
        for r in rows(src / "mimic-cxr-2.0.0-metadata.csv"):  # 8-bit grayscale JPEGs, as MIMIC-CXR-JPG
            s = r["subject_id"]
            path = folder / "mimic-cxr-jpg" / "files" / f"p{s[:2]}" / f"p{s}" / f"s{r['study_id']}" / f"{r['dicom_id']}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8), 128, np.uint8)).save(path)
    elif name == "padchest":
        for f in src.iterdir():
            shutil.copy(f, folder)
        for r in rows(src / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"):  # 16-bit PNGs
            path = folder / "padchest-images" / r["ImageDir"] / r["ImageID"]
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8), 3000, np.uint16)).save(path)
            assert Image.open(path).mode == "I;16"
    else:
        shutil.copy(src / "HAM10000_metadata.csv", folder)
        for i, r in enumerate(rows(src / "HAM10000_metadata.csv")):  # RGB JPEGs in the two parts
            path = folder / f"HAM10000_images_part_{1 + i % 2}" / (r["image_id"] + ".jpg")
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(path)


def script(name):
    """The page's shell block for one data set, with `python3` this interpreter and data.py the
    repository's; the join recipe (the section's Python block) is written beside the data."""
    sh = block(DATASETS[name], "sh")
    sh = sh.replace("python3 data.py", f"{shlex.quote(sys.executable)} {shlex.quote(str(ROOT / 'data.py'))}")
    return sh.replace("python3 join_", f"{shlex.quote(sys.executable)} join_")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each data set's commands, run as the page gives them: {name: (folder, completed process)}."""
    procs = {}
    for name, title in DATASETS.items():
        folder = tmp_path_factory.mktemp(name)
        lay_out(name, folder)
        recipes = [b for lang, b in section(title) if lang == "python"]
        for recipe in recipes:
            (folder / recipe.split(":")[0].lstrip("# ")).write_text(recipe)
        procs[name] = folder, subprocess.Popen(["bash", "-e", "-c", script(name)], cwd=folder, text=True,
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = {}
    for name, (folder, p) in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        out[name] = folder, p.returncode, stdout, stderr
    return out


EXPECTED = {  # what the tiny files hold (see the page): records written, rows dropped and why, the check line
    "mimic": ("mimic_train.csv: wrote 3 of 8 rows to mimic_train.json (dropped: view 2, empty findings 2, demographics 1)",
              "check  n=    3  race: white 1, black 1, unknown 1",
              ["dicom-0001", "dicom-0003", "dicom-0006"]),
    "padchest": ("padchest.csv: wrote 2 of 6 rows to padchest.json (dropped: demographics 2, view 1, empty findings 1)",
                 "check  n=    2  race: n/a 2", ["pc-0001.png", "pc-0003.png"]),
    "ham": ("HAM10000_metadata.csv: wrote 3 of 5 rows to ham.json (dropped: demographics 2)",
            "check  n=    3  race: n/a 3", ["ISIC_0000001", "ISIC_0000002", "ISIC_0000003"]),
}
OUT_JSON = {"mimic": "mimic_train.json", "padchest": "padchest.json", "ham": "ham.json"}


@pytest.mark.parametrize("name", DATASETS)
def test_the_page_commands_run_and_print_what_it_shows(runs, name):
    folder, rc, stdout, stderr = runs[name]
    assert rc == 0 and stderr == "", stderr
    wrote, check, ids = EXPECTED[name]
    lines = stdout.splitlines()
    assert lines[0] == wrote and lines[1].startswith(check) and len(lines) == 2
    assert stdout == block(DATASETS[name], "output")  # the page shows the real output
    items = json.loads((folder / OUT_JSON[name]).read_text())
    assert [it["id"] for it in items] == ids
    assert json.loads(block(DATASETS[name], "json")) == items[0]  # the page's item, exactly as written


def test_the_items_read_back_as_training_reads_them(runs):
    folder = runs["mimic"][0]
    recs = data.read_llava_json(folder / "mimic_train.json", "mimic", folder / "mimic-cxr-jpg", decode_images=True)
    # white F 52; black M 71 (two BLACK admissions and one UNKNOWN); F 30 with no admission -> unknown (7)
    assert [r["attrs"] for r in recs] == [dict(race=0, age=1, gender=1), dict(race=1, age=2, gender=0),
                                         dict(race=7, age=0, gender=1)]
    assert recs[0]["answer"] == ("The lungs are clear without focal consolidation. No pleural effusion or "
                                 "pneumothorax. Heart size is normal.")  # the sectioned file's line break collapsed
    folder = runs["padchest"][0]
    recs = data.read_llava_json(folder / "padchest.json", "padchest", folder / "padchest-images", decode_images=True)
    # 2014 - 1950 = 64 (45-65), 2015 - 1938 = 77 (66+); the indication reaches the question
    assert [r["attrs"] for r in recs] == [dict(race=-1, age=1, gender=1), dict(race=-1, age=2, gender=0)]
    assert recs[0]["question"].endswith("given the following indication: Dyspnea")
    folder = runs["ham"][0]
    recs = data.read_llava_json(folder / "ham.json", "ham", folder / "HAM10000_images", decode_images=True)
    assert [(r["answer"], r["attrs"]) for r in recs] == [
        ("melanocytic nevus", dict(race=-1, age=1, gender=0)), ("melanocytic nevus", dict(race=-1, age=1, gender=0)),
        ("melanoma", dict(race=-1, age=2, gender=1))]


def test_padchest_csv_as_downloaded_is_refused_as_the_page_shows(runs, monkeypatch):
    monkeypatch.chdir(runs["padchest"][0])
    official = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    (shown,) = [b for lang, b in section("PadChest") if lang == "text" and "missing column(s)" in b]
    with pytest.raises(SystemExit) as e:
        data.main(["--convert", "padchest", official, "refused.json"])
    assert str(e.value) + "\n" == shown
    assert not Path("refused.json").exists()


def test_check_needs_the_image_root_the_training_run_gets(runs, capsys):
    folder = runs["mimic"][0]
    with pytest.raises(SystemExit) as e:  # the images are not beside the JSON: the first one is named
        data.main(["--check", str(folder / "mimic_train.json")])
    assert "item 'dicom-0001': field 'image': no such file" in str(e.value)
    with pytest.raises(SystemExit) as e:
        data.main(["--convert", "mimic", str(folder / "mimic_train.csv"), str(folder / "x.json"),
                   "--image-root", str(folder)])
    assert e.value.code == 2 and "--image-root goes with --check" in capsys.readouterr().err
    assert not (folder / "x.json").exists()
