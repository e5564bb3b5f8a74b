"""Previews and index.html: views that show the anatomy the same way whatever the voxel order,
PNGs on disk, and the page opened in a real (headless) Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from test_dicom_seg import bundle, phantom, write_dicom  # noqa: F401 - bundle is a fixture

from pipeline.predict_io import write_report
from pipeline.preview import _views, centre, crop_to_body, index_html, write_index, write_preview

NAMES = ["background", "liver", "kidney", "spleen"]
CHROMIUM = Path("/usr/bin/chromium")


def ras_phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, labels, affine) on a grid whose voxel axes run towards +R, +A, +S (anisotropic):
    label 1 marks the patient's right-anterior-superior corner voxel, label 2 the opposite one,
    label 3 is a larger block."""
    shape = (9, 8, 7)
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    labels = np.zeros(shape, np.uint8)
    labels[-1, -1, -1] = 1  # +R, +A, +S: the patient's right, anterior, superior corner
    labels[0, 0, 0] = 2
    labels[2:6, 2:5, 1:4] = 3
    affine = np.diag([0.8, 1.1, 2.5, 1.0])
    affine[:3, 3] = (-3.0, 7.0, 11.0)
    return image, labels, affine


def reoriented(image: np.ndarray, labels: np.ndarray, affine: np.ndarray, perm: tuple[int, ...],
               flips: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same anatomy stored with voxel axes permuted and flipped (the affine follows)."""
    out_img, out_lab = image.transpose(perm), labels.transpose(perm)
    for j in flips:
        out_img, out_lab = np.flip(out_img, j), np.flip(out_lab, j)
    transform = np.zeros((4, 4))
    transform[3, 3] = 1
    for j, i in enumerate(perm):  # new axis j is old axis i, reversed where j is flipped
        transform[i, j] = -1 if j in flips else 1
        transform[i, 3] = image.shape[i] - 1 if j in flips else 0
    return np.ascontiguousarray(out_img), np.ascontiguousarray(out_lab), affine @ transform


@pytest.mark.parametrize("perm,flips", [((0, 1, 2), (0, 1)), ((2, 0, 1), (1,)), ((1, 2, 0), (0, 2))])
def test_views_show_the_same_anatomy_whatever_the_voxel_order(perm: tuple[int, ...], flips: tuple[int, ...]) -> None:
    image, labels, affine = ras_phantom()
    img2, lab2, aff2 = reoriented(image, labels, affine, perm, flips)
    assert not np.allclose(aff2, affine)
    world = affine @ [*centre(labels), 1]
    at2 = np.rint(np.linalg.inv(aff2) @ world).astype(int)[:3]
    for (name, a, la, asp), (name2, b, lb, asp2) in zip(_views(image, labels, affine, centre(labels)),
                                                        _views(img2, lab2, aff2, at2), strict=True):
        assert name == name2 and asp == pytest.approx(asp2)
        np.testing.assert_array_equal(a, b, err_msg=name)
        np.testing.assert_array_equal(la, lb, err_msg=name)


def test_views_follow_the_radiological_convention() -> None:
    image, labels, affine = ras_phantom()
    views = {name: (img, lab, asp) for name, img, lab, asp in _views(image, labels, affine, (8, 7, 6))}
    # through the corner voxel (+R, +A, +S): the patient's right is on the left, anterior / superior on top
    assert views["axial"][1][0, 0] == 1 and views["coronal"][1][0, 0] == 1
    assert views["sagittal"][1][0, 0] == 1  # anterior on the left, superior on top
    assert views["axial"][1].shape == (8, 9) and views["sagittal"][1].shape == (7, 8)
    assert views["coronal"][2] == pytest.approx(2.5 / 0.8) and views["axial"][2] == pytest.approx(1.1 / 0.8)


def test_a_plane_of_any_volume_turns_as_the_preview_shows_it() -> None:
    """``radiological_plane`` (for pictures of one slice, such as ``segpipe weightmap``'s) gives a
    plane the preview's orientation, whatever the voxel order."""
    from pipeline.preview import radiological_plane

    image, labels, affine = ras_phantom()
    for perm, flips in (((0, 1, 2), ()), ((0, 1, 2), (0, 1)), ((2, 0, 1), (1,))):
        img2, lab2, aff2 = reoriented(image, labels, affine, perm, flips)
        at = np.rint(np.linalg.inv(aff2) @ affine @ [8, 7, 6, 1]).astype(int)[:3]
        views = {name: (lab, asp) for name, _, lab, asp in _views(img2, lab2, aff2, at)}
        for fixed in range(3):
            index = tuple(int(at[i]) if i == fixed else slice(None) for i in range(3))
            name, plane, aspect = radiological_plane(lab2[index], aff2, fixed)
            np.testing.assert_array_equal(plane, views[name][0], err_msg=f"{perm} {flips} {name}")
            assert aspect == pytest.approx(views[name][1])
            assert plane[0, 0] == 1  # through the right-anterior-superior corner: top left in every view


def test_centre_is_in_the_largest_structure() -> None:
    labels = np.zeros((20, 20, 10), np.uint8)
    labels[1:3, 1:3, 1:3] = 2  # small
    labels[10:17, 4:9, 2:7] = 1  # label 1: most voxels
    labels[18:20, 18:20, 8:10] = 1  # a speck of the same label elsewhere
    assert centre(labels) == (13, 6, 4)  # rounded centre of mass of the big block
    assert centre(np.zeros((4, 6, 8), np.uint8)) == (2, 3, 4)


def test_views_are_cut_to_the_body_and_keep_every_label() -> None:
    """A head in a wide CT field of view: the plane is cut to the body plus a margin; a label
    outside the body (in air) stays in the picture; a plane the body fills stays whole."""
    img = np.full((200, 160), -1000.0, np.float32)
    img[60:100, 50:90] = 40.0  # the body
    img[70:80, 60:70] = 1200.0  # bone
    lab = np.zeros(img.shape, np.uint8)
    lab[72:78, 62:68] = 1
    cut, cut_lab = crop_to_body(img, lab, -1000.0, 1200.0)
    assert cut.shape == (40 + 2 * 12, 40 + 2 * 10)  # 6% of 200 and of 160 on each side
    assert int(cut_lab.sum()) == int(lab.sum()) and cut.max() == 1200.0
    lab[150, 20] = 2  # a label in the air below the body: the box reaches it
    cut, cut_lab = crop_to_body(img, lab, -1000.0, 1200.0)
    assert (cut_lab == 2).sum() == 1 and cut.shape == (163 - 48, 100 - 10)  # rows 60..150, columns 20..89
    full = np.full((30, 20), 40.0, np.float32)
    assert crop_to_body(full, np.zeros((30, 20), np.uint8), -1000.0, 1200.0)[0].shape == (30, 20)
    empty = np.full((30, 20), -1000.0, np.float32)
    assert crop_to_body(empty, np.zeros((30, 20), np.uint8), -1000.0, 1200.0)[0].shape == (30, 20)


def _study(folder: Path, sid: str, shift: int = 0) -> tuple[Path, np.ndarray, np.ndarray]:
    image, labels, affine = ras_phantom()
    labels = np.roll(labels, shift, axis=0)
    f = folder / f"{sid}.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), f)
    return f, labels, affine


def test_write_preview_png(tmp_path: Path) -> None:
    f, labels, affine = _study(tmp_path, "a")
    out = write_preview(f, labels, affine, NAMES, {"liver": 0.002, "kidney": 0.002, "spleen": 0.08},
                        tmp_path / "a_preview.png", title="a")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 3 * im.size[1] > 500
        colours = {c for _, c in im.convert("RGB").getcolors(1 << 20)}
    assert len(colours) > 20  # image, overlays and legend drawn
    flat = tmp_path / "flat.nii.gz"  # a 2D image gets one view
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 12)).astype(np.float32), np.eye(4)), flat)
    two_d = write_preview(flat, (np.arange(16 * 12).reshape(16, 12) % 3).astype(np.uint8), np.eye(4), NAMES[:3],
                          {}, tmp_path / "flat_preview.png")
    with Image.open(two_d) as im:
        assert im.size[0] < 500
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_a_study_id_the_font_cannot_draw_is_escaped_in_the_png_and_kept_in_index_html(tmp_path: Path) -> None:
    """A CJK study id was an empty box in the title, with matplotlib's "Glyph ... missing" warning."""
    import warnings

    sid = "患者_001 é"
    f, labels, affine = _study(tmp_path, "cjk")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Glyph 24739 ... missing from font(s) DejaVu Sans"
        write_preview(f, labels, affine, [*NAMES[:3], "脾臓 $x$"], {"liver": 1.0}, tmp_path / "cjk_preview.png",
                      title=sid)
    from pipeline.preview import drawable

    assert drawable(sid) == "\\u60a3\\u8005_001 é" and drawable("case_1") == "case_1"  # DejaVu has é
    page = index_html([{"study_id": sid, "status": "ok"}], NAMES, tmp_path, running=False)
    assert f'data-study="{sid}"' in page


def _batch(out: Path) -> list[str]:
    """An output folder as segpipe predict --preview leaves it: two studies with previews, one failed."""
    out.mkdir()
    rows = []
    for k, sid in enumerate(["case_b", "case_a"]):
        f, labels, affine = _study(out, f"src_{sid}", shift=k)
        png = write_preview(f, labels, affine, NAMES, {"liver": 1.5, "spleen": 20 + k}, out / f"{sid}_preview.png")
        rows.append({"study_id": sid, "input": str(f), "output": str(f), "status": "ok", "error": "",
                     "seconds": 1.0 + k, "ml_liver": 1.5, "ml_kidney": 0.0, "ml_spleen": 20.0 + k, "preview": str(png)})
    rows.append({"study_id": "case_c <x>", "input": "/in/c", "output": "", "status": "failed",
                 "error": "/in/c: truncated: 10 bytes, the header needs 348 & more", "seconds": 0.1})
    write_report(out, rows, NAMES)
    write_index(out, NAMES, running=False)
    return sorted(r["study_id"] for r in rows)


def test_index_lists_every_study_from_the_report(tmp_path: Path) -> None:
    ids = _batch(tmp_path / "out")
    page = (tmp_path / "out" / "index.html").read_text()
    assert re.findall(r'data-study="([^"]*)"', page) == [i.replace("<", "&lt;").replace(">", "&gt;") for i in ids]
    assert 'src="case_a_preview.png"' in page and "needs 348 &amp; more" in page and "<x>" not in page
    assert "3 studies: 2 ok, 0 skipped, 1 failed" in page and 'http-equiv="refresh"' not in page
    assert 'http-equiv="refresh"' in index_html([], NAMES, tmp_path, running=True)


def test_links_are_url_encoded_once_inside_and_outside_the_output_folder(tmp_path: Path) -> None:
    out, other = tmp_path / "out", tmp_path / "other run"
    rows = [{"study_id": "s 1", "status": "ok", "preview": str(out / "s 1#_preview.png"),
             "output": str(other / "s 1.nii.gz"), "seg": ""}]
    page = index_html(rows, NAMES, out, running=False)
    assert 'src="s%201%23_preview.png"' in page  # under the folder: relative, encoded
    assert f'href="{(other / "s 1.nii.gz").as_uri()}"' in page and "%2520" not in page  # outside: one file URI


_CHECK = """<!DOCTYPE html><html><body><pre id="result">pending</pre>
<iframe id="f" src="index.html" width="1400" height="6000"></iframe>
<script>
const frame = document.getElementById('f');
frame.addEventListener('load', () => {
  const doc = frame.contentDocument, t0 = Date.now();
  const ids = () => Array.from(doc.querySelectorAll('tbody tr')).map(r => r.dataset.study);
  (function poll() {
    const imgs = Array.from(doc.querySelectorAll('tbody img'));
    if (imgs.some(i => !i.complete) && Date.now() - t0 < 4000) { setTimeout(poll, 50); return; }
    const before = ids(), header = doc.querySelectorAll('thead th')[1];
    header.click(); const asc = ids(); header.click(); const desc = ids();
    document.getElementById('result').textContent = JSON.stringify({
      rows: before, asc: asc, desc: desc,
      images: imgs.map(i => [i.closest('tr').dataset.study, i.naturalWidth, i.naturalHeight])});
  })();
});
</script></body></html>"""


def open_in_chromium(out: Path, scratch: Path) -> dict:
    """Load ``out/index.html`` in headless Chromium (inside a checking page that waits for the
    thumbnails, then sorts by study id twice) and return what the page saw."""
    check = out / ".check.html"
    check.write_text(_CHECK)
    profile = scratch / "chromium-profile"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom", check.as_uri()]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env={**os.environ, "HOME": str(scratch)})
    finally:
        check.unlink()
        shutil.rmtree(profile, ignore_errors=True)
    m = re.search(r'<pre id="result">([^<]*)</pre>', r.stdout)
    assert m and m.group(1) != "pending", (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    return json.loads(m.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&"))


needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (Debian: apt-get install chromium)")


@needs_chromium
def test_index_loads_in_headless_chromium(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ids = _batch(out)
    got = open_in_chromium(out, tmp_path)
    assert got["rows"] == ids and got["asc"] == ids and got["desc"] == ids[::-1]
    with Image.open(out / "case_a_preview.png") as im:
        size = list(im.size)
    assert sorted(got["images"]) == [["case_a", *size], ["case_b", *size]]  # both thumbnails decoded


def test_predict_preview_follows_the_batch_and_a_resumed_run(bundle: Path, tmp_path: Path,  # noqa: F811
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """segpipe predict --preview: a PNG per segmented study, index.html rewritten as the batch
    goes (here after every study: INDEX_EVERY_S 0; rows only grow), and after a rerun that redoes
    one study every row is there again."""
    import pipeline.predict
    import pipeline.preview
    from pipeline.predict import predict

    monkeypatch.setattr(pipeline.preview, "INDEX_EVERY_S", 0.0)

    inp, out = tmp_path / "in", tmp_path / "out"
    for k, orientation in enumerate(["sagittal", "axial_lps", "oblique"]):
        write_dicom(inp / f"s{k}", phantom((8, 12, 14), seed=k), orientation)
    (inp / "broken.nii.gz").write_bytes(b"not gzip")
    seen: list[int] = []

    def spy(out_dir: Path, names: list[str], running: bool = False) -> Path:
        page = write_index(out_dir, names, running)
        seen.append(page.read_text().count("<tr class="))
        return page

    monkeypatch.setattr(pipeline.predict, "write_index", spy)
    rows = {r["study_id"]: r for r in predict(bundle, inp, out, progress=False, output_format="both", preview=True)}
    assert seen == sorted(seen) and seen[0] == 0 and seen[-1] == 4 and len(seen) >= 5
    assert rows["broken"]["status"] == "failed" and "preview" not in rows["broken"]
    for sid in ("s0", "s1", "s2"):
        assert rows[sid]["status"] == "ok" and Path(rows[sid]["preview"]) == out / f"{sid}_preview.png"
    page = (out / "index.html").read_text()
    assert 'http-equiv="refresh"' not in page and "4 studies: 3 ok, 0 skipped, 1 failed" in page
    (out / "s1_preview.png").unlink()  # as if killed before the preview was written
    again = {r["study_id"]: r["status"] for r in predict(bundle, inp, out, progress=False, output_format="both",
                                                         preview=True)}
    assert again == {"s0": "skipped", "s1": "ok", "s2": "skipped", "broken": "failed"}
    page = (out / "index.html").read_text()
    assert "4 studies: 1 ok, 2 skipped, 1 failed" in page
    assert all(f'src="{sid}_preview.png"' in page for sid in ("s0", "s1", "s2"))
    if CHROMIUM.exists():
        got = open_in_chromium(out, tmp_path)
        assert got["rows"] == ["broken", "s0", "s1", "s2"]
        assert sorted(s for s, w, h in got["images"] if w > 0 and h > 0) == ["s0", "s1", "s2"]


def test_a_running_batch_rewrites_index_html_at_most_every_few_seconds(bundle: Path, tmp_path: Path,  # noqa: F811
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The page is the whole report: rewritten after every study it made a batch quadratic (1.4 s
    a study at 10,000 rows). Within INDEX_EVERY_S it is written at the start and at the end only."""
    import pipeline.predict
    from pipeline.predict import predict

    inp, out = tmp_path / "in", tmp_path / "out"
    for k in range(3):
        write_dicom(inp / f"s{k}", phantom((8, 12, 14), seed=k), "axial_lps")
    seen: list[tuple[int, bool]] = []

    def spy(out_dir: Path, names: list[str], running: bool = False) -> Path:
        page = write_index(out_dir, names, running)
        seen.append((page.read_text().count("<tr class="), running))
        return page

    monkeypatch.setattr(pipeline.predict, "write_index", spy)
    predict(bundle, inp, out, progress=False, preview=True)
    assert seen == [(0, True), (3, False)]


def test_an_interrupted_batch_leaves_a_finished_page_that_says_it_stopped(bundle: Path, tmp_path: Path,  # noqa: F811
                                                                          monkeypatch: pytest.MonkeyPatch,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Ctrl-C (or SIGTERM, or a failure) in the middle of a batch: index.html lists the studies done,
    no longer reloads, and says the batch stopped and how to finish it. Before, it stayed at '0
    studies ... (running, this page reloads every 15 s)' for good. It names the output folder and
    the model of each row (the title was empty for --output .)."""
    import pipeline.predict
    from pipeline.predict import predict

    inp, out = tmp_path / "in", tmp_path / "out"
    for k in range(3):
        write_dicom(inp / f"s{k}", phantom((8, 12, 14), seed=k), "axial_lps")
    real, calls = pipeline.predict.run_model, []

    def interrupted(model: dict, image: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(model, image)

    monkeypatch.setattr(pipeline.predict, "run_model", interrupted)
    with pytest.raises(KeyboardInterrupt), caplog.at_level("WARNING", logger="pipeline.predict"):
        predict(bundle, inp, out, progress=False, preview=True)
    assert "stopped with 2 of 3 studies done" in caplog.text  # the console says it too (the page needs --preview)
    page = (out / "index.html").read_text()
    assert 'http-equiv="refresh"' not in page
    assert "2 studies: 2 ok, 0 skipped, 0 failed" in page
    assert "(stopped before the last study: run the same command again to finish)" in page
    model = json.loads((out / ".segpipe_model.json").read_text())["models"]
    assert page.count(f"<td>{next(iter(model))}</td>") == 2
    monkeypatch.chdir(out)
    write_index(Path("."), ["background", "body", "organ", "bone"])
    assert f"<title>segpipe predict: {out.name}</title>" in (out / "index.html").read_text()
