"""The reference model's weight files against the digests recorded beside them (`sha256.json`).

Training writes the record with the weights (and the probe's training with the probe), `--publish` carries it into
the package, and every load checks the files it reads first: a missing, truncated or edited file is a
`CorruptBundleError` naming it, where safetensors failed with a traceback or, for a changed byte, loaded another
model that draws other images than the name promises.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from catrt import atomic_files
from catrt.checks import path_is
from catrt.errors import CorruptBundleError, echo_path
from catrt.manifest import file_digest  # the sha256 a bundle's manifest records its files by

CHECKSUM_FILE = "sha256.json"  # the pipeline's files (config, transformer, text encoder), as training writes them
PROBE_CHECKSUM_FILE = "probe.sha256.json"  # the probe's, trained and published on its own


def read_checksums(folder: Path, record_file: str = CHECKSUM_FILE) -> dict[str, dict[str, object]]:
    """The record `record_file` of `folder` by file name ({} where there is none yet); a damaged record is refused."""
    path = folder / record_file
    if not path_is(path):
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CorruptBundleError(f"the reference weights' record {echo_path(path)} cannot be read ({type(error).__name__}); "
                                 "reinstall catrt or retrain the weights", field=record_file) from None
    if not isinstance(record, dict) or not all(isinstance(entry, dict) for entry in record.values()):
        raise CorruptBundleError(f"the reference weights' record {echo_path(path)} is not a JSON object of file records; "
                                 "reinstall catrt or retrain the weights", field=record_file)
    return record


def write_checksums(folder: Path, names: Iterable[str], record_file: str = CHECKSUM_FILE) -> None:
    """Record the size and sha256 of `names` in `folder`'s `record_file` (other files' records kept), replaced
    atomically. A damaged record is written anew: refusing it here failed training at its save, after the run, and
    retraining (its refusal's fix) failed the same way; files only it recorded are then refused at load, unrecorded."""
    try:
        record = read_checksums(folder, record_file)
    except CorruptBundleError:
        record = {}
    for name in names:
        record[name] = {"size": (folder / name).stat().st_size, "sha256": file_digest(folder / name)}
    atomic_files.write_text(folder / record_file, json.dumps(dict(sorted(record.items())), indent=1) + "\n")


def verify_files(
    folder: Path, names: Iterable[str], record_file: str = CHECKSUM_FILE, retrain: str = "python -m catrt.reference.train"
) -> None:
    """Refuse, naming the file, any of `names` that is missing from `folder`, unrecorded in `record_file`, or of
    another size or sha256 than its record says (`retrain`: the command that writes them with their record)."""
    if not path_is(folder, "folder"):
        raise CorruptBundleError(f"the reference weights folder {echo_path(folder)} does not exist; give the folder "
                                 "training wrote (OUT/weights) or reinstall catrt", field="weights")
    if not path_is(folder / record_file, "file"):
        raise CorruptBundleError(
            f"the reference weights in {echo_path(folder)} have no {record_file} (the digests training records beside "
            f"them); reinstall catrt, or retrain ({retrain}) to write weights with it",
            field=record_file)
    record = read_checksums(folder, record_file)
    for name in names:
        path, expected = folder / name, record.get(name)
        if not path_is(path, "file"):
            raise CorruptBundleError(f"the reference weight file {echo_path(path)} is missing; reinstall catrt or "
                                     "retrain the weights", field=name)
        if expected is None:
            raise CorruptBundleError(f"the reference weight file {echo_path(path)} is not in {record_file}; "
                                     "reinstall catrt or retrain the weights", field=name)
        try:
            matches = path.stat().st_size == expected.get("size") and file_digest(path) == expected.get("sha256")
        except OSError as error:  # another user's weights (safetensors writes them owner-only): a traceback in hashlib
            raise CorruptBundleError(f"the reference weight file {echo_path(path)} cannot be read "
                                     f"({error.strerror or type(error).__name__}); make it readable to this user "
                                     "(chmod a+r) or give weights you can read", field=name) from None
        if not matches:
            raise CorruptBundleError(f"the reference weight file {echo_path(path)} does not match its size and sha256 in "
                                     f"{record_file} (damaged or edited); reinstall catrt or retrain the weights", field=name)
