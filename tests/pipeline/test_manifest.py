"""subjects.csv validation: every problem is reported at once, each naming the file,
the line and the column; valid rows become SubjectSpecs and jobs."""

from __future__ import annotations

import pytest
from PIL import Image
from pipeline_testkit import copy_photos, write_csv

from pipeline.manifest import (
    DEFAULT_PROMPT,
    Job,
    ManifestError,
    group_jobs,
    load_manifest,
)
from pipeline.store import validate_subject_id


@pytest.fixture
def photos(tmp_path):
    return copy_photos("dog", tmp_path / "dog", 2)


def _problems(path) -> list[str]:
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    return [str(p) for p in info.value.problems]


def test_valid_manifest_resolves_folders_globs_and_relative_paths(tmp_path, photos):
    copy_photos("cat", tmp_path / "cats", 3)
    csv = tmp_path / "subjects.csv"
    csv.write_text(
        "# a comment line\n"
        "subject_id,images,class,token,prompt,steps,lr_scale_out,seed\n"
        "\n"
        f"dog,{photos},dog,,,,,\n"
        'cat-1,cats/*.jpg,cat,zwx,"a {token} {class_noun}, studio",12,1e-4,7\n'
    )
    specs = load_manifest(csv)
    assert [s.subject_id for s in specs] == ["dog", "cat-1"]
    dog, cat = specs
    assert dog.line == 4 and cat.line == 5
    assert len(dog.images) == 2 and dog.images[0].uri.endswith("00.jpg")
    assert dog.images[0].size == (photos / "00.jpg").stat().st_size
    assert dog.token == "sks" and dog.prompt == DEFAULT_PROMPT
    assert dog.instance_prompt == "a photo of sks dog"
    assert len(cat.images) == 3 and str(tmp_path / "cats") in cat.images[0].uri
    assert cat.overrides == {"steps": 12, "lr_scale_out": 1e-4, "seed": 7}
    assert cat.instance_prompt == "a zwx cat, studio"
    jobs = group_jobs(specs)
    assert [j.job_id for j in jobs] == ["dog", "cat-1"]


@pytest.mark.parametrize("bad", ["../x", "Dog", "a b", "-lead", "x" * 65, "a/b", "dög"])
def test_bad_subject_ids_are_refused(tmp_path, photos, bad):
    csv = tmp_path / "s.csv"
    csv.write_text(f'subject_id,images,class\n"{bad}",{photos},dog\n')
    (problem,) = _problems(csv)
    assert problem.startswith(f"{csv}:2: column subject_id: ")
    assert "a-z" in problem
    with pytest.raises(ValueError):
        validate_subject_id(bad)


def test_every_problem_is_reported_with_line_and_column(tmp_path, photos):
    empty = tmp_path / "empty"
    empty.mkdir()
    notes = tmp_path / "mixed"
    copy_photos("dog", notes, 1)
    (notes / "notes.txt").write_text("not a photo")
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    Image.new("RGB", (8, 8)).save(tiny / "t.png")
    csv = tmp_path / "subjects.csv"
    csv.write_text(
        "subject_id,images,class,prompt,steps\n"            # 1
        f"dog,{photos},dog,,\n"                              # 2 fine
        f"dog,{photos},dog,,\n"                              # 3 duplicate
        f",{photos},dog,,\n"                                 # 4 empty id
        f"nofolder,{tmp_path / 'missing'},dog,,\n"           # 5 missing folder
        f"nothing,{empty},dog,,\n"                           # 6 empty folder
        f"withtext,{notes},dog,,\n"                          # 7 non-image file
        f"small,{tiny},dog,,\n"                              # 8 tiny image
        f"prompt,{photos},dog,a photo of {{thing}},\n"       # 9 unknown placeholder
        f"steps,{photos},dog,,zero\n"                        # 10 bad override
        f"short,{photos}\n"                                  # 11 wrong field count
        f"noclass,{photos},,,\n"                             # 12 empty class
    )
    problems = _problems(csv)
    text = "\n".join(problems)
    assert f"{csv}:3: column subject_id: duplicate id 'dog' (first used on line 2)" in text
    assert f"{csv}:4: column subject_id: is empty" in text
    assert f"{csv}:5: column images: cannot list" in text and "does not exist" in text
    assert f"{csv}:6: column images: no image files found" in text
    assert f"{csv}:7: column images: " in text and (
        "notes.txt: a caption with no photo of the same name") in text
    assert f"{csv}:8: column images: " in text and "t.png: too small: 8x8" in text
    assert f"{csv}:9: column prompt: " in text and "unknown placeholder(s) ['thing']" in text
    assert f"{csv}:10: column steps: 'zero' must be an integer" in text
    assert f"{csv}:11: has 2 fields, the header has 5" in text
    assert f"{csv}:12: column class: is empty" in text
    # photos of the rows that are otherwise valid are checked too, in the same pass
    assert len(problems) == 10


def test_captions_beside_photos_are_read_checked_and_hashed(tmp_path):
    """<photo>.txt is that photo's prompt template; photos without one keep the row's
    prompt; a caption-less row hashes as it did before captions existed."""
    folder = copy_photos("dog", tmp_path / "dog", 3)
    first, _, third = sorted(folder.iterdir())
    rows = [{"subject_id": "dog", "images": str(folder), "class": "dog"}]
    before = group_jobs(load_manifest(write_csv(tmp_path / "a.csv", rows)))[0]
    assert before.subjects[0].captions is None
    assert "caption" not in before.to_dict()["subjects"][0]["images"][0]
    first.with_suffix(".txt").write_text("a photo of {token} {class_noun} on a sofa\n")
    third.with_suffix(".txt").write_text("{token} asleep")
    (spec,) = load_manifest(write_csv(tmp_path / "b.csv", rows))
    assert len(spec.images) == 3  # captions are not photos
    assert spec.captions == ["a photo of {token} {class_noun} on a sofa",
                             "a photo of {token} {class_noun}", "{token} asleep"]
    # a glob lists only photos: their captions are found beside them all the same
    glob = [{"subject_id": "dog", "images": str(folder / "*.jpg"), "class": "dog"}]
    (globbed,) = load_manifest(write_csv(tmp_path / "g.csv", glob))
    assert globbed.captions == spec.captions
    # samples are drawn from the captions in turn, filled in
    assert spec.sample_prompts(4) == ["a photo of sks dog on a sofa", "a photo of sks dog",
                                      "sks asleep", "a photo of sks dog on a sofa"]
    assert before.subjects[0].sample_prompts(2) == ["a photo of sks dog"] * 2
    (job,) = group_jobs([spec])
    assert Job.from_dict(job.to_dict()) == job
    assert job.spec_hash({}) != before.spec_hash({})
    (folder / "extra.txt").write_text("a photo of {token} dog")  # no extra.jpg
    third.with_suffix(".txt").write_text("a photo of {thing}")
    text = "\n".join(_problems(write_csv(tmp_path / "c.csv", rows)))
    assert "extra.txt: a caption with no photo of the same name" in text
    (folder / "extra.txt").unlink()
    text = "\n".join(_problems(write_csv(tmp_path / "d.csv", rows)))
    assert f"{third.with_suffix('.txt')}: caption 'a photo of {{thing}}' uses unknown" in text
    third.with_suffix(".txt").write_text("two\nlines")
    text = "\n".join(_problems(write_csv(tmp_path / "e.csv", rows)))
    assert "a caption must be one line of printable text" in text
    third.with_suffix(".txt").write_bytes(b"\xff\xfe{token}")
    text = "\n".join(_problems(write_csv(tmp_path / "f.csv", rows)))
    assert "a caption must be UTF-8 text" in text


def test_header_problems(tmp_path, photos):
    csv = tmp_path / "h.csv"
    csv.write_text(f"subject_id,images,colour,subject_id\nx,{photos},red,y\n")
    text = "\n".join(_problems(csv))
    assert "h.csv:1: column colour: unknown column; allowed: subject_id, images, class" in text
    assert "h.csv:1: column subject_id: appears twice" in text
    assert "h.csv:1: column class: required column is missing" in text


def test_file_level_problems(tmp_path):
    assert "file not found" in _problems(tmp_path / "nope.csv")[0]
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert "no header row" in _problems(empty)[0]
    header_only = tmp_path / "header.csv"
    header_only.write_text("subject_id,images,class\n")
    assert "header.csv:1: no subjects" in _problems(header_only)[0]
    latin = tmp_path / "latin.csv"
    latin.write_bytes("subject_id,images,class\ncaf\xe9,x,y\n".encode("latin-1"))
    assert "not UTF-8" in _problems(latin)[0]
    quoted = tmp_path / "quoted.csv"
    quoted.write_text('subject_id,images,class\n"unterminated,x,y\n')
    assert "malformed CSV" in _problems(quoted)[0] or "fields" in _problems(quoted)[0]


def test_multiline_cells_keep_line_numbers_right(tmp_path, photos):
    csv = tmp_path / "m.csv"
    csv.write_text(f'subject_id,images,class,prompt\nok,{photos},dog,"a photo of\n{{token}}"\n'
                   f"BAD,{photos},dog,\n")
    (problem,) = _problems(csv)
    assert problem.startswith(f"{csv}:4: column subject_id")


def test_groups_train_jointly_and_must_agree(tmp_path, photos):
    csv = tmp_path / "g.csv"
    csv.write_text(
        "subject_id,images,class,token,group,steps\n"
        f"a,{photos},dog,sks,pair,10\n"
        f"b,{photos},dog,zwx,pair,10\n"
        f"c,{photos},dog,,,\n"
    )
    jobs = group_jobs(load_manifest(csv))
    assert [(j.job_id, j.subject_ids) for j in jobs] == [("pair", ["a", "b"]), ("c", ["c"])]
    assert jobs[0].overrides == {"steps": 10}
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "subject_id,images,class,token,group,steps\n"
        f"a,{photos},dog,sks,pair,10\n"
        f"b,{photos},dog,sks,pair,20\n"
    )
    text = "\n".join(_problems(bad))
    assert "bad.csv:3: group 'pair': training overrides {'steps': 20} differ" in text
    clash = tmp_path / "clash.csv"
    clash.write_text(
        "subject_id,images,class,token,group\n"
        f"a,{photos},dog,sks,c\n"
        f"c,{photos},dog,zwx,\n"
    )
    assert "clash.csv:2: column group: group 'c' has the name of the subject on line 3" in (
        _problems(clash)[0])
    assert "bad.csv:3: column token: group 'pair': token 'sks' is already used by line 2" in text


def test_spec_hash_changes_with_settings_and_images(tmp_path, photos):
    csv = tmp_path / "s.csv"
    csv.write_text(f"subject_id,images,class\ndog,{photos},dog\n")
    (job,) = group_jobs(load_manifest(csv))
    same = job.spec_hash({"train": {"steps": 5}})
    assert same == job.spec_hash({"train": {"steps": 5}})
    assert same != job.spec_hash({"train": {"steps": 6}})
    copy_photos("dog", photos, 3)  # a third photo appears
    (job2,) = group_jobs(load_manifest(csv))
    assert job2.spec_hash({"train": {"steps": 5}}) != same
    assert type(job2).from_dict(job2.to_dict()) == job2


def test_rows_are_listed_at_once_and_each_photo_checked_once(tmp_path, photos,
                                                             monkeypatch):
    """A large manifest starts quickly: the rows' `images` cells are listed in threads
    (each distinct cell once) and a photo named by several rows is opened once; a bad
    one is reported on the first row that names it."""
    import threading
    import time

    import pipeline.columns
    import pipeline.manifest

    lister, reader = pipeline.columns.list_images, pipeline.manifest.read_image_bytes
    lock, calls = threading.Lock(), {"now": 0, "max": 0, "listed": [], "read": []}

    def counted_list(raw, *args):
        with lock:
            calls["now"] += 1
            calls["max"] = max(calls["max"], calls["now"])
            calls["listed"].append(raw)
        time.sleep(0.05)  # a round trip to object storage
        with lock:
            calls["now"] -= 1
        return lister(raw, *args)

    def counted_read(uri, *args):
        calls["read"].append(uri)
        return reader(uri, *args)

    monkeypatch.setattr(pipeline.columns, "list_images", counted_list)
    monkeypatch.setattr(pipeline.manifest, "read_image_bytes", counted_read)
    folders = [copy_photos("cat", tmp_path / f"cat{i}", 1) for i in range(30)]
    rows = [f"s{i:02d},{folder},cat" for i, folder in enumerate(folders)]
    rows += [f"dog{i},{photos},dog" for i in range(5)]  # one folder, five rows
    csv = tmp_path / "many.csv"
    csv.write_text("subject_id,images,class\n" + "\n".join(rows) + "\n")
    specs = load_manifest(csv)
    assert [s.subject_id for s in specs] == [r.split(",")[0] for r in rows]
    assert all(len(s.images) == 1 for s in specs[:30])
    assert specs[-1].images == specs[30].images and len(specs[-1].images) == 2
    assert calls["max"] > 1  # listed in parallel, not one row after another
    assert sorted(calls["listed"]) == sorted({str(f) for f in folders} | {str(photos)})
    assert len(calls["read"]) == len(set(calls["read"])) == 32

    bad = photos / "zz-broken.jpg"
    bad.write_bytes(b"not a jpeg")
    problems = _problems(csv)
    assert len(problems) == 1 and ":32: column images: " in problems[0], problems
