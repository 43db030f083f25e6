"""make_shards on bad input: one line naming the file, jsonl line and field, exit code 2, no traceback,
and no partial shards left behind."""
import json
import re
import subprocess
import sys

import pytest

from emu_mc.data.make_shards import cli

from tests.data.helpers import encode_image, photo
from tests.torchrun_utils import REPO_ROOT, child_env

GOOD_DOC = {"text_list": ["Morning.", "Coffee."], "images": [{"path": "a.png", "matched_text_index": 1}]}


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "a.png").write_bytes(encode_image(photo("coffee"), "png"))
    (tmp_path / "broken.jpg").write_bytes(encode_image(photo("rocket"))[:200])  # truncated JPEG
    return tmp_path


def write_jsonl(path, *docs):
    path.write_text("".join((d if isinstance(d, str) else json.dumps(d)) + "\n" for d in docs))
    return path


@pytest.mark.parametrize("docs, message", [
    ([GOOD_DOC, {**GOOD_DOC, "images": [{"path": "gone.png", "matched_text_index": 0}]}],
     r"docs.jsonl line 2: images\[0\].path: cannot read .*gone.png \(No such file or directory\)"),
    ([{"frames": [{"path": "a.png", "time": 0.0}]}, {"images": []}], "docs.jsonl line 2: missing field 'frames'"),
    ([{"images": []}], "docs.jsonl line 1: neither 'text_list' .interleaved. nor 'frames'"),
    ([GOOD_DOC, "{not json"], "docs.jsonl line 2: not valid JSON"),
    ([{**GOOD_DOC, "images": [{"path": "broken.jpg", "matched_text_index": 0}]}],
     r"docs.jsonl line 1: images\[0\].path: .*broken.jpg is not a decodable image"),
    ([{**GOOD_DOC, "images": [{"path": "a.png", "matched_text_index": 5}]}],
     r"line 1: images\[0\]: matched_text_index 5 is outside text_list \(length 2\)"),
    ([{"frames": [{"path": "a.png"}]}], r"line 1: frames\[0\]: field 'time' must be a number"),
])
def test_bad_jsonl_is_one_line_exit_2(folder, capsys, docs, message):
    jsonl = write_jsonl(folder / "docs.jsonl", *docs)
    assert cli([str(jsonl), str(folder / "out" / "s-%d.tar"), "--max-samples", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("make_shards: error: "), err
    assert re.search(message, err), err
    assert not list((folder / "out").glob("*.tar"))  # the shard of line 1 was removed: nothing half-made


def test_undecodable_image_in_a_folder_and_a_missing_source(folder, capsys):
    (folder / "broken.txt").write_text("a caption")
    (folder / "a.txt").write_text("a caption")
    assert cli([str(folder), str(folder / "o-%d.tar")]) == 2
    assert "broken.jpg is not a decodable image" in capsys.readouterr().err
    assert cli([str(folder / "nowhere.jsonl"), str(folder / "o-%d.tar")]) == 2
    assert "nowhere.jsonl: cannot read (No such file or directory); expected a folder or a .jsonl" in \
        capsys.readouterr().err


def test_the_module_exits_2_without_a_traceback(folder):
    jsonl = write_jsonl(folder / "docs.jsonl", {"images": []})
    proc = subprocess.run([sys.executable, "-m", "emu_mc.data.make_shards", str(jsonl), str(folder / "o-%d.tar")],
                          cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
