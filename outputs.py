"""Result files written into a folder the user chose (demo.py's --dir, evaluate.py's --out): each
is written over, or removed, only while it still holds what this project wrote there.

The rule for every writer in this project: a command deletes or overwrites only files it can prove
it wrote, checked before anything is touched; never an input of the same run; never a folder it
did not create. For these files the proof is a record beside them, `outputs_record.json`, holding
the SHA-256 of each file as it was written; a file of that name that is not in the record, or no
longer matches it (the user's own results.md, or one edited by hand), is a one-line refusal
naming it. A refusal is an OutputError, a ValueError, so each command prints it as one line.
"""

import hashlib
import json
from pathlib import Path

RECORD = "outputs_record.json"


class OutputError(ValueError):
    pass


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _record(folder):
    path = Path(folder) / RECORD
    if not path.exists() and not path.is_symlink():
        return {}
    if path.is_symlink() or not path.is_file():
        raise OutputError(f"{path}: expected this project's record of the files it wrote, a plain file; move it away")
    try:
        record = json.loads(path.read_text())
    except ValueError as e:
        raise OutputError(f"{path}: not readable JSON ({e}); move it away or choose another folder") from None
    if not isinstance(record, dict):
        raise OutputError(f"{path}: expected this project's record of the files it wrote (a JSON object)")
    return record


def check(folder, names, who):
    """Each of `names` in `folder` is absent, or exactly what `who` (e.g. "the demo") wrote there."""
    record = _record(folder)
    for name in names:
        path = Path(folder) / name
        if path.is_symlink() or (path.exists() and (not path.is_file() or record.get(name) != _sha256(path))):
            raise OutputError(f"{path} was not written by {who} (or was changed since); move it away or choose "
                              f"another folder")


def write(folder, name, write_fn, who):
    """write_fn(path) the file `name` in `folder` (made if needed), then record its fingerprint."""
    folder = Path(folder)
    check(folder, [name], who)
    folder.mkdir(parents=True, exist_ok=True)
    write_fn(folder / name)
    record = {**_record(folder), name: _sha256(folder / name)}
    (folder / RECORD).write_text(json.dumps(record, indent=1) + "\n")


def remove(folder, names, who):
    """Delete those of `names` that exist, after checking that every one is `who`'s own."""
    check(folder, names, who)
    record = _record(folder)
    for name in names:
        (Path(folder) / name).unlink(missing_ok=True)
        record.pop(name, None)
    if record or (Path(folder) / RECORD).exists():
        (Path(folder) / RECORD).write_text(json.dumps(record, indent=1) + "\n")
