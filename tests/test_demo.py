"""The bundled Shapes model and `textmask demo`: what a user runs first on a fresh machine."""

import re

from PIL import Image

from textmask.cli import main
from textmask.demo.model import MODEL_DIR, load_demo_masker
from textmask.hosts.diffusers import DiffusersHost

# Regression floors, set from the committed model's measured demo scores (see MODEL_CARD.md) minus a margin.
# Measured on the committed model (4 test scenes, 6 object phrases, 8 relational phrases): attention IoU 0.67,
# attention+refine 0.68, noise-diff 0.49, ld-znet 0.92, named segments (DiffCut) 0.50, ovdiff 0.35, refer 0.79.
FLOORS = {"attention": 0.55, "attention+refine": 0.55, "noise-diff": 0.38, "ld-znet": 0.88,
          "named-segments": 0.38, "ovdiff": 0.25, "refer": 0.65}


def test_bundled_model_loads_through_the_diffusers_host():
    masker = load_demo_masker()
    assert isinstance(masker.host, DiffusersHost)
    assert masker.host.geometry.resolution == 128 and masker.host.geometry.latent_factor == 4
    size = sum(p.stat().st_size for p in MODEL_DIR.rglob("*.safetensors"))
    assert size <= 20 * 2**20
    assert not list(MODEL_DIR.rglob("*.bin")) and not list(MODEL_DIR.rglob("*.ckpt"))  # safetensors only


def test_demo_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TEXTMASK_CACHE", str(tmp_path / "cache"))  # OVDiff's prototypes, built by the demo
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] > 128 * 8
    assert len(list(out.glob("*-mask.png"))) == len(list(out.glob("*-heatmap.png"))) > 0
    for method in ("attention", "ovdiff", "named-segments", "refer"):
        assert list(out.glob(f"*-{method}-mask.png")), method
    assert list((tmp_path / "cache" / "ovdiff").glob("*.safetensors"))
    scores = dict(re.findall(r"^(\S.*?)\s+IoU (\d\.\d\d)", printed, re.M))
    assert set(scores) == set(FLOORS), scores
    for method, floor in FLOORS.items():
        assert float(scores[method]) >= floor, (method, scores[method], floor)


def test_contact_sheet_packs_the_referring_cells_under_the_rows():
    import numpy as np

    from textmask.demo.demo import contact_sheet

    tile = np.zeros((20, 30, 3), np.float32)
    rows = [[tile] * 8 for _ in range(2)]
    cells = [[tile + 0.5] * 3 for _ in range(5)]  # two per row of 8 tiles: three packed rows
    sheet = contact_sheet(rows, [f"c{i}" for i in range(8)], cells, ["image", "target", "refer"])
    header = 16
    assert sheet.shape == (header + 2 * 20 + header + 3 * 20, 8 * 30, 3)
    packed = sheet[header + 40 + header:]
    assert (packed[:40, :180] == 0.5).all() and (packed[:40, 180:] == 1).all()  # cells on the left, blanks on the right
    assert (packed[40:, :90] == 0.5).all() and (packed[40:, 90:] == 1).all()  # the fifth cell alone in the last row
    alone = contact_sheet(rows, [f"c{i}" for i in range(8)], [], [])
    assert alone.shape == (header + 40, 240, 3)


def test_an_unwritable_cache_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """A read-only or missing home: the CLIP vocabulary is built in a passing folder, and the demo's OVDiff cache is
    refused in one line that names TEXTMASK_CACHE, before any work and with nothing written."""
    from textmask import tokenizer

    monkeypatch.setenv("TEXTMASK_CACHE", "/proc/textmask-cache")
    tokenizer.clip_tokenizer.cache_clear()
    try:
        assert tokenizer.clip_tokenizer()("a red car")["input_ids"] == [49406, 320, 736, 1615, 49407]
    finally:
        tokenizer.clip_tokenizer.cache_clear()  # the next test builds it from its own cache again
    monkeypatch.setattr("textmask.demo.demo.load_demo_masker", lambda *a: (_ for _ in ()).throw(AssertionError))
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    said = capsys.readouterr().err.strip()
    assert "prototype cache /proc/textmask-cache/ovdiff" in said and "set TEXTMASK_CACHE" in said
    assert "\n" not in said and not (tmp_path / "demo").exists()
