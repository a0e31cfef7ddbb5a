"""The bundled Shapes model and `textmask demo`: what a user runs first on a fresh machine."""


from PIL import Image

from textmask.cli import main
from textmask.demo.model import MODEL_DIR, load_demo_masker
from textmask.hosts.diffusers import DiffusersHost

# Regression floors, set from the committed model's measured demo scores (see MODEL_CARD.md) minus a margin.
# Measured on the committed model (4 test scenes, 6 phrases): attention IoU 0.37, attention+refine 0.46,
# noise-diff 0.25, ld-znet 0.86.
FLOORS = {"attention": 0.29, "attention+refine": 0.36, "noise-diff": 0.17, "ld-znet": 0.76}


def test_bundled_model_loads_through_the_diffusers_host():
    masker = load_demo_masker()
    assert isinstance(masker.host, DiffusersHost)
    assert masker.host.resolution == 128 and masker.host.latent_factor == 4
    size = sum(p.stat().st_size for p in MODEL_DIR.rglob("*.safetensors"))
    assert size <= 20 * 2**20
    assert not list(MODEL_DIR.rglob("*.bin")) and not list(MODEL_DIR.rglob("*.ckpt"))  # safetensors only


def test_demo_command(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] > 128 * 8
    assert len(list(out.glob("*-mask.png"))) == len(list(out.glob("*-heatmap.png"))) > 0
    scores = {}
    for line in printed.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "IoU":
            scores[parts[0]] = float(parts[2])
    for method, floor in FLOORS.items():
        assert scores[method] >= floor, (method, scores[method], floor)
