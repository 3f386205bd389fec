"""star.eval.answers on folders written by hand: a pack interrupted before it deleted the loose files packs again
to the same file, and a setting.json rewritten by a resumed run replaces the packed one."""

import json
import shutil

from star.eval import answers


def write_run(out, setting: str, definition: dict, rows: list[dict]) -> None:
    folder = out / "runs" / setting
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "setting.json").write_text(json.dumps(definition))
    (folder / "rank0.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_a_pack_interrupted_before_deleting_the_loose_files_packs_again_to_the_same_file(tmp_path):
    out = tmp_path / "out"
    write_run(out, "star-20", {"method": "star", "keep": 20}, [{"id": f"q{i}", "correct": i % 2 == 0} for i in range(3)])
    write_run(out, "none-1.0", {"method": "none", "keep": 1.0}, [{"id": "q0", "correct": True}])
    loose = shutil.copytree(out / "runs", tmp_path / "loose")
    answers.pack(out)
    packed = (out / answers.PACK).read_bytes()
    shutil.copytree(loose, out / "runs")  # the pack was written, the loose files not yet deleted
    answers.pack(out)
    assert (out / answers.PACK).read_bytes() == packed and not (out / "runs").exists()


def test_a_resumed_settings_definition_replaces_the_packed_one(tmp_path):
    write_run(tmp_path, "fastv-flops0.3", {"method": "fastv", "picked": {"keep": 30}}, [{"id": "q0", "correct": True}])
    answers.pack(tmp_path)
    write_run(tmp_path, "fastv-flops0.3", {"method": "fastv", "picked": {"keep": 31}}, [{"id": "q1", "correct": False}])
    answers.pack(tmp_path)
    done = answers.read(tmp_path)
    assert done.definitions == {"fastv-flops0.3": {"method": "fastv", "picked": {"keep": 31}}}
    assert done.rows == {"fastv-flops0.3": {"q0": {"id": "q0", "correct": True}, "q1": {"id": "q1", "correct": False}}}
