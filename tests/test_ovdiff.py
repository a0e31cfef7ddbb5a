"""OVDiff: prototypes built end to end on tiny models (cache hit, invalidation, corruption), the matching
maths and stuff-filter rules on synthetic features, sampler/forward counts, windows, and the CLI."""


import numpy as np
import pytest
import torch
from conftest import assert_unchanged, state_snapshot
from PIL import Image

import tiny_models
from textmask import TextMasker
from textmask.errors import TextMaskError
from textmask.ovdiff import fingerprint, list_cache
from textmask.ovdiff.classes import is_stuff, parse_class
from textmask.ovdiff.prototypes import ClassPrototypes, Prototypes, kmeans, stuff_filter
from textmask.ovdiff.segmentation import label as segment, match, window_boxes

FAST = dict(images=2, steps=2, kmeans_parts=4)


class Counter:
    """Counts host.sample calls and UNet forwards."""

    def __init__(self, host):
        self.host, self.samples, self.forwards = host, 0, 0
        self._sample = host.sample
        host.sample = self._count_sample
        self.handle = host.unet.register_forward_hook(self._count_forward)

    def _count_sample(self, *a, **k):
        self.samples += 1
        return self._sample(*a, **k)

    def _count_forward(self, *a):
        self.forwards += 1

    def close(self):
        self.handle.remove()
        del self.host.sample


@pytest.fixture
def masker():
    return TextMasker.from_pipe(tiny_models.sd1_pipe(), resolution=64)


def test_build_cache_hit_and_added_class(masker, tmp_path):
    unet = masker.host.unet
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before_out = unet(x, t, encoder_hidden_states=ctx).sample
    before = state_snapshot(unet)
    count = Counter(masker.host)
    try:
        protos = masker.build_prototypes(["cat", "sky"], cache_dir=tmp_path, **{k: v for k, v in FAST.items() if k != "kmeans_parts"})
        assert protos.names == ["cat", "sky"]
        cat, sky = protos.classes
        assert not cat.stuff and sky.stuff
        assert cat.fg["mean"].shape[0] == 1 and cat.fg["instances"].shape[0] == 2 and len(cat.background()) > 0
        assert len(sky.background()) == 0  # stuff classes give no background prototypes
        # One sampler call per class (2 images in one batch); forwards: 2 steps x 1 CFG batch per class, one
        # feature forward per class (its 2 support images in one batch), one fingerprint forward. No second pass
        # for attribution.
        assert count.samples == 2
        assert count.forwards == 2 * 2 + 2 + 1
        count.samples = count.forwards = 0
        again = masker.build_prototypes(["cat", "sky", "dog"], cache_dir=tmp_path, images=2, steps=2)
        assert count.samples == 1  # only the new class
        assert torch.equal(again.classes[0].fg["kmeans"], cat.fg["kmeans"])  # a cache hit equals the first build
        assert len(list(tmp_path.glob("*.safetensors"))) == 3
    finally:
        count.close()
    after = state_snapshot(unet)
    assert after["hooks"] == before["hooks"]
    with torch.no_grad():
        assert torch.equal(before_out, unet(x, t, encoder_hidden_states=ctx).sample)


def test_feature_forwards_in_batches_give_the_prototypes_of_one_image_at_a_time(masker, tmp_path, monkeypatch):
    from textmask.ovdiff import prototypes

    settings = dict(images=5, steps=2, kmeans_parts=4, use_cache=False, cache_dir=tmp_path)
    built = {}
    for name, budget in (("batched", prototypes.AGGREGATE_BUDGET), ("single", 1)):  # 1 byte: one image a forward
        monkeypatch.setattr(prototypes, "AGGREGATE_BUDGET", budget)
        count = Counter(masker.host)
        try:
            built[name] = prototypes.build_prototypes(masker.host, ["cat"], **settings).classes[0]
        finally:
            count.close()
        # sampler: 2 batches (4 + 1 images) x 2 steps; features: 4 + 1 images, or 5 forwards of one; fingerprint
        assert count.forwards == 2 * 2 + (2 if name == "batched" else 5) + 1, name
    for side in ("fg", "bg"):
        for kind in ("mean", "instances", "kmeans"):
            a, b = getattr(built["batched"], side)[kind], getattr(built["single"], side)[kind]
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4), (side, kind)


def test_feature_forwards_fall_back_to_smaller_batches_when_the_gpu_is_full(masker, tmp_path, monkeypatch):
    from textmask.ovdiff import prototypes

    unet = masker.host.unet
    settings = dict(images=4, steps=2, kmeans_parts=4, use_cache=False, cache_dir=tmp_path)
    ref = prototypes.build_prototypes(masker.host, ["cat"], **settings).classes[0]
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before_out = unet(x, t, encoder_hidden_states=ctx).sample
    before = state_snapshot(unet)
    sizes, room = [], [1]
    extract = prototypes.extract

    def small_gpu(module, args):  # out of memory midway through a hooked feature forward of more than `room` images
        sizes.append(args[0].shape[0])
        if args[0].shape[0] > room[0]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    def extract_on_a_small_gpu(*args, **kwargs):  # the sampler's forwards are left alone
        handle = unet.mid_block.register_forward_pre_hook(small_gpu)
        try:
            return extract(*args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(prototypes, "extract", extract_on_a_small_gpu)
    out = prototypes.build_prototypes(masker.host, ["cat"], **settings).classes[0]
    assert sizes == [4, 2, 1, 1, 1, 1]  # halved until the images fit, then one a forward to the end
    for side in ("fg", "bg"):
        for kind in ("mean", "instances", "kmeans"):
            torch.testing.assert_close(getattr(out, side)[kind], getattr(ref, side)[kind], atol=1e-4, rtol=0)
    room[0] = 0
    with pytest.raises(torch.cuda.OutOfMemoryError):  # not even one image fits: the host's error, unchanged
        prototypes.build_prototypes(masker.host, ["cat"], **settings)
    assert_unchanged(before, state_snapshot(unet))  # no hook left behind by the failed forwards
    with torch.no_grad():
        assert torch.equal(before_out, unet(x, t, encoder_hidden_states=ctx).sample)


def test_cache_invalidated_by_model_change_and_corruption(masker, tmp_path):
    masker.build_prototypes(["cat"], cache_dir=tmp_path, images=2, steps=2)
    fp = fingerprint(masker.host)
    # A LoRA-like patch applied through the module call changes the fingerprint and so the cache key.
    handle = masker.host.unet.conv_in.register_forward_hook(lambda m, a, out: out * 1.01)
    try:
        assert fingerprint(masker.host) != fp
        count = Counter(masker.host)
        masker.build_prototypes(["cat"], cache_dir=tmp_path, images=2, steps=2)
        assert count.samples == 1
        count.close()
    finally:
        handle.remove()
    assert fingerprint(masker.host) == fp
    files = sorted(tmp_path.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    assert len(files) == 2
    # Corrupt the first entry's tensor bytes (same size): its checksum fails, so it is rebuilt, not trusted.
    data = bytearray(files[0].read_bytes())
    data[-8:] = b"\x00\x7c" * 4
    files[0].write_bytes(bytes(data))
    assert any(r["status"] != "ok" for r in list_cache(tmp_path))
    count = Counter(masker.host)
    masker.build_prototypes(["cat"], cache_dir=tmp_path, images=2, steps=2)
    count.close()
    assert count.samples == 1
    assert all(r["status"] == "ok" for r in list_cache(tmp_path))
    files[0].write_bytes(b"garbage")
    count = Counter(masker.host)
    masker.build_prototypes(["cat"], cache_dir=tmp_path, images=2, steps=2)
    count.close()
    assert count.samples == 1


def test_interrupt_leaves_no_cache_and_no_hooks(masker, tmp_path):
    calls = []

    class Cancelled(Exception):
        pass

    def interrupt():
        calls.append(1)
        if len(calls) == 3:  # inside the sampler's loop
            raise Cancelled

    before = state_snapshot(masker.host.unet)
    masker.host.check_interrupt = interrupt
    with pytest.raises(Cancelled):
        masker.build_prototypes(["cat"], cache_dir=tmp_path, images=2, steps=4)
    del masker.host.check_interrupt
    assert not list(tmp_path.glob("*.safetensors"))
    assert state_snapshot(masker.host.unet)["hooks"] == before["hooks"]


def test_segment_end_to_end(masker, tmp_path):
    protos = masker.build_prototypes(["cat", "grass"], cache_dir=tmp_path, images=2, steps=2)
    res = masker.ovdiff(torch.rand(2, 50, 70, 3), protos)
    assert res.labels.shape == (2, 50, 70) and res.masks.shape == (2, 2, 50, 70)
    assert res.scores.shape == (2, 3, 50, 70)
    assert torch.equal(res.masks.sum(1) > 0, res.labels > 0)  # masks partition the non-background pixels
    only = masker.ovdiff(torch.rand(1, 40, 40, 3), protos, classes=["grass"])
    assert only.names == ["grass"]
    with pytest.raises(TextMaskError, match="no prototypes for: tree"):
        masker.ovdiff(torch.rand(1, 40, 40, 3), protos, classes=["tree"])


def test_windows_share_forwards_and_change_nothing(masker, tmp_path):
    protos = masker.build_prototypes(["cat", "grass"], cache_dir=tmp_path, images=2, steps=2)
    image = torch.rand(1, 64, 64, 3)  # at the model's 64 px: the full image and 8 windows
    count = Counter(masker.host)
    try:
        one = masker.ovdiff(image, protos, batch_size=1)
        assert count.forwards == 9
        count.forwards = 0
        four = masker.ovdiff(image, protos)  # the default: 4 windows to a forward
        assert count.forwards == 1 + 2
    finally:
        count.close()
    torch.testing.assert_close(four.scores, one.scores, atol=1e-5, rtol=0)
    assert (four.labels == one.labels).float().mean() > 0.999


def test_windows_fall_back_to_smaller_batches_when_the_gpu_is_full(masker, tmp_path):
    unet = masker.host.unet
    protos = masker.build_prototypes(["cat"], cache_dir=tmp_path, images=2, steps=2)
    image = torch.rand(1, 64, 64, 3)
    one = masker.ovdiff(image, protos, batch_size=1)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before_out = unet(x, t, encoder_hidden_states=ctx).sample
    before = state_snapshot(unet)
    sizes, room = [], [2]

    def small_gpu(module, args):  # out of memory midway through a hooked forward of more than `room` windows
        sizes.append(args[0].shape[0])
        if args[0].shape[0] > room[0]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    handle = unet.mid_block.register_forward_pre_hook(small_gpu)
    try:
        out = masker.ovdiff(image, protos, batch_size=8)
        assert sizes == [1, 8, 4, 2, 2, 2, 2]  # the full image, then halved until the windows fit
        room[0] = 0
        with pytest.raises(torch.cuda.OutOfMemoryError):  # not even one window fits: the host's error, unchanged
            masker.ovdiff(image, protos, batch_size=1)
    finally:
        handle.remove()
    torch.testing.assert_close(out.scores, one.scores, atol=1e-5, rtol=0)
    assert_unchanged(before, state_snapshot(unet))  # no hook left behind by the failed forwards
    with torch.no_grad():
        assert torch.equal(before_out, unet(x, t, encoder_hidden_states=ctx).sample)


def test_context_rows_are_found_once_per_context_tensor(monkeypatch):
    from textmask import capture

    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 77, 8, generator=g), torch.randn(1, 77, 8, generator=g)
    rows = capture.context_matcher(cond)
    calls = []
    nonzero = torch.nonzero
    monkeypatch.setattr(torch, "nonzero", lambda *a, **k: calls.append(1) or nonzero(*a, **k))
    batch = torch.cat([uncond, cond, uncond, cond])
    assert rows(batch).tolist() == [1, 3]
    for _ in range(15):  # the other cross-attention layers of the forward: no search, no GPU sync
        assert rows(batch).tolist() == [1, 3]
    assert len(calls) == 1
    assert rows(torch.cat([cond, uncond])).tolist() == [0]  # a new context tensor is searched again
    assert rows(uncond.clone()).numel() == 0 and len(calls) == 3


def test_attribution_sums_tokens_layers_and_forwards():
    import torch.nn.functional as F

    from textmask.capture import AttentionLayer
    from textmask.ovdiff.support import AttributionSum

    g = torch.Generator().manual_seed(0)
    attribution = AttributionSum([1, 3], count=2, size=(8, 8))
    assert torch.equal(attribution.result(), torch.zeros(2, 8, 8))  # nothing captured
    expected = torch.zeros(2, 8, 8)
    for _ in range(2):  # two sampler forwards
        for i, size in enumerate([(8, 8), (4, 4), (2, 2)]):
            t = size[0] * size[1]
            p = torch.rand(2, t, 6, generator=g).softmax(-1)
            layer = AttentionLayer(f"layer{i}", "cross", i + 1, i + 1, size, 2)
            for start in range(0, t, 3):
                attribution(layer, start, p[:, start : start + 3])
            m = p[..., [1, 3]].sum(-1).reshape(2, 1, *size)
            expected += F.interpolate(m, size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(attribution.result(), expected, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="expected 2 conditional rows"):
        attribution(layer, 0, p[:1])


def test_bad_input(masker, tmp_path):
    with pytest.raises(TextMaskError, match="duplicate"):
        masker.build_prototypes(["cat", "Cat"], cache_dir=tmp_path)
    with pytest.raises(TextMaskError, match="at least one"):
        masker.build_prototypes([" "], cache_dir=tmp_path)
    inpaint = TextMasker.from_pipe(tiny_models.sd1_pipe(in_channels=9), resolution=64)
    with pytest.raises(TextMaskError, match="non-inpainting"):
        inpaint.build_prototypes(["cat"], cache_dir=tmp_path)


# ---- maths ----------------------------------------------------------------------------------------------
def proto(name, fg, bg, stuff=False):
    fg, bg = torch.as_tensor(fg, dtype=torch.float32), torch.as_tensor(bg, dtype=torch.float32)
    d = fg.shape[1]
    return ClassPrototypes(name, stuff, {"mean": fg[:1], "instances": fg[1:], "kmeans": torch.zeros(0, d)},
                           {"mean": bg[:1], "instances": bg[1:], "kmeans": torch.zeros(0, d)} if len(bg) else
                           {k: torch.zeros(0, d) for k in ("mean", "instances", "kmeans")})


def test_match_picks_the_nearest_prototype():
    # Three directions in 4-d; pixel (0,0) is class A, (0,1) class B, (1,*) background-like.
    e = torch.eye(4)
    feats = torch.stack([e[0] * 2, e[1], e[3], e[3] + 0.1 * e[0]]).T.reshape(4, 2, 2)
    s = match(feats, [e[:1], e[1:2]], e[3:4])
    assert s.shape == (3, 2, 2)
    assert s.argmax(0).tolist() == [[1, 2], [0, 0]]
    assert s[1, 0, 0] == pytest.approx(1.0) and s[0, 1, 0] == pytest.approx(1.0)  # cosine, scale-free


def test_stuff_filter_rules():
    e = torch.eye(4)
    near = (0.95 * e[2] + 0.2 * e[3]).tolist()  # cos to e[2] ~ 0.98 > 0.85
    far = (e[2] + e[3]).tolist()  # cos to e[2] ~ 0.71 <= 0.85
    cat = proto("cat", [e[0].tolist()], [near, far])
    sky = proto("sky", [e[2].tolist()], [e[1].tolist()], stuff=True)
    bgs = stuff_filter([cat, sky])
    assert len(bgs[0]) == 1 and torch.allclose(bgs[0][0], torch.tensor(far))  # the near one was dropped
    assert len(bgs[1]) == 0  # stuff gives no background prototypes, whatever it holds
    alone = stuff_filter([cat])
    assert len(alone[0]) == 2  # without a stuff class nothing is dropped


def test_segment_with_synthetic_prototypes(masker, monkeypatch):
    # Features = the pixels' own colours (the encoder and extractor are replaced), so the answer is known:
    # windows, the full image and the canvas averaging must still give red pixels label 1 and blue ones 2.
    import torch.nn.functional as F

    import textmask.ovdiff.segmentation as seg

    host = masker.host
    monkeypatch.setattr(host, "encode_images", lambda px: px)
    monkeypatch.setattr(seg, "extract", lambda h, lat, empty, seed, **kw: (F.interpolate(lat, size=(64, 64), mode="nearest"), None))
    e = torch.eye(3)
    protos = Prototypes([proto("red", e[:1], []), proto("blue", e[2:], [])], host)
    image = torch.zeros(1, 60, 90, 3)
    image[:, :, :45, 0] = 1
    image[:, :, 45:, 2] = 1
    res = segment(protos, image)
    assert (res.labels[0, :, :35] == 1).all() and (res.labels[0, :, 55:] == 2).all()
    assert res.masks[0, 0, :, :35].min() == 1 and res.masks[0, 1, :, :35].max() == 0
    gray = torch.full((1, 60, 90, 3), 0.5)
    gray[..., 1] = 1.0  # green: nearer neither prototype than the background's [0, 1, 0]
    protos_bg = Prototypes([proto("red", e[:1], [e[1].tolist()]), proto("blue", e[2:], [])], host)
    assert (segment(protos_bg, gray).labels == 0).all()


def test_clip_prefilter_picks_the_best_combination():
    from textmask.ovdiff.segmentation import clip_select

    class FakeClip:
        """Fixed CLIP probabilities: per class prompt, then per combination prompt."""

        def __init__(self, single, combos):
            self.single, self.combos, self.asked = single, combos, []

        def image_text_probs(self, image, texts):
            self.asked.append(texts)
            if texts[0].startswith("a photo of"):
                return torch.tensor(self.single)
            return torch.tensor([self.combos.get(t, 0.0) for t in texts])

    names = ["cat", "dog", "sky"]
    clip = FakeClip([0.5, 0.3, 0.2], {})  # only cat reaches 1/3: the one combination is [cat]
    assert clip_select(clip, torch.zeros(3, 8, 8), names) == [0]
    clip = FakeClip([0.4, 0.35, 0.25], {"a cat": 0.2, "a dog": 0.1, "a cat and a dog": 0.7})  # cat, dog kept
    assert clip_select(clip, torch.zeros(3, 8, 8), names) == [0, 1]
    assert clip.asked[1] == ["a cat", "a dog", "a cat and a dog"]


def test_kmeans_is_deterministic():
    pts = torch.cat([torch.randn(50, 3) + 5, torch.randn(50, 3) - 5])
    a, b = kmeans(pts, 2, seed=0), kmeans(pts, 2, seed=0)
    assert torch.equal(a, b) and sorted(a[:, 0].round().tolist()) == pytest.approx([-5, 5], abs=1)
    assert kmeans(pts[:3], 32).shape == (3, 3)


def test_kmeans_finds_separated_clusters_and_handles_degenerate_points(monkeypatch):
    from textmask.ovdiff import prototypes

    g = torch.Generator().manual_seed(0)
    means = torch.eye(4, 16) * 20
    pts = means.repeat_interleave(200, 0) + torch.randn(800, 16, generator=g)
    centres = kmeans(pts, 4, seed=3)
    assert torch.cdist(centres, means).min(0).values.max() < 0.5  # each true centre found
    assert torch.equal(kmeans(torch.ones(6, 16), 3), torch.ones(3, 16))  # identical points: no division by zero
    assert kmeans(torch.zeros(0, 16), 4).shape == (0, 16)
    monkeypatch.setattr(prototypes, "MAX_KMEANS_POINTS", 100)  # a deterministic subsample of the points
    sub = kmeans(pts, 4, seed=3)
    assert torch.equal(sub, kmeans(pts, 4, seed=3)) and torch.cdist(sub, means).min(0).values.max() < 2.0  # 25 points a cluster


def test_windows():
    boxes = window_boxes(512, 512, 1.0)
    assert boxes[0] == (0, 0, 512, 512) and len(boxes) == 1 + 4 + 4
    assert {(h, w) for _, _, h, w in boxes[1:]} == {(448, 448), (336, 336)}
    assert all(t + h <= 512 and l + w <= 512 for t, l, h, w in boxes)
    small = window_boxes(300, 400, 1.0)  # windows of 336 and 448 do not fit a 300 px side: the full image only
    assert small == [(0, 0, 300, 400)]
    assert {(h, w) for _, _, h, w in window_boxes(400, 600, 1.0)[1:]} == {(336, 336)}


def test_class_kinds():
    assert parse_class("sky:stuff") == ("sky", True) and parse_class("tree:thing") == ("tree", False)
    assert parse_class(" cat ") == ("cat", None)
    assert is_stuff("sky") and is_stuff("grass") and is_stuff("brick wall") and not is_stuff("cat")
    assert is_stuff("cat", True) and not is_stuff("sky", False)


# ---- CLI -------------------------------------------------------------------------------------------------
def test_cli_build_list_and_segment(tmp_path, tiny_checkpoint, capsys):
    from textmask.cli import main

    d, _ = tiny_checkpoint
    model = ["--checkpoint", str(d / "tiny.safetensors"), "--config", str(d / "config")]
    cache = ["--cache", str(tmp_path / "cache")]
    fast = ["--images", "2", "--steps", "2", "--resolution", "32"]
    assert main(["prototypes", "build", "cat", "sky", *fast, *cache, *model]) == 0
    built = capsys.readouterr().out
    assert "cat:" in built and "sky:" in built and "0 background" in built.split("sky:")[1]
    assert main(["prototypes", "list", *cache]) == 0
    listing = capsys.readouterr().out
    assert "cat" in listing and "sky" in listing and "stuff" in listing
    img = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((31, 45, 3)) * 255).astype(np.uint8)).save(img)
    assert main(["ovdiff", str(img), "--classes", "cat,sky", "--out", str(tmp_path / "out"), *fast, *cache, *model]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != ".textmask.json") == \
        ["cat.png", "labels.png", "sky.png"]
    assert Image.open(tmp_path / "out" / "cat.png").size == (45, 31)
    assert main(["ovdiff", str(img), "--classes", " , ", "--out", str(tmp_path / "o2"), *model]) == 2
