"""The capture engine: inventory, exact probabilities, chunking, dtypes, and leaving the model untouched."""

import copy
import types

import pytest
import torch
from conftest import assert_unchanged, state_snapshot
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

import tiny_models
import textmask.capture as capture_module
from textmask.capture import (AttentionCapture, Need, OutputCapture, ProbsStore, QueryStore, attention_probs,
                              find_attention_modules, find_transformer_modules, spatial_size)
from textmask.errors import CaptureError
from textmask.methods.diffcut import encoder_features

BOTH = ("self", "cross")


def run(unet, latent=16, batch=2, seed=0, ctx_len=77):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    ctx = torch.randn(batch, ctx_len, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([300] * batch), encoder_hidden_states=ctx).sample, (x, ctx)


@pytest.fixture(scope="module")
def sd15():
    return tiny_models.unet_sd15_topology()


def test_inventory_matches_sd15_layout(sd15):
    with AttentionCapture(find_attention_modules(sd15), (32, 32)) as cap:
        run(sd15, latent=32, batch=1)
    layers = cap.layers
    assert sum(l.kind == "cross" for l in layers) == 16
    assert sum(l.kind == "self" for l in layers) == 16
    assert [l.ordinal for l in layers] == list(range(1, 33))
    assert [l.kind for l in layers] == ["self", "cross"] * 16  # attn1 then attn2 in every block
    cross = [l for l in layers if l.kind == "cross"]
    assert [l.kind_ordinal for l in cross] == list(range(1, 17))
    # down (2 per level at 32, 16, 8), mid (4), up (3 per level at 8, 16, 32)
    assert [l.size[0] for l in cross] == [32, 32, 16, 16, 8, 8, 4, 8, 8, 8, 16, 16, 16, 32, 32, 32]
    stages = [l.name.split(".")[0] for l in cross]
    assert stages == ["down_blocks"] * 6 + ["mid_block"] + ["up_blocks"] * 9
    assert all(l.name.endswith("attn2") for l in cross)


def _reference_probs(unet):
    """Head-averaged probabilities from diffusers' own eager processor, keyed by module name."""
    ref = copy.deepcopy(unet)
    ref.set_attn_processor(AttnProcessor())
    seen = {}
    for name, mod in find_attention_modules(ref):
        original = mod.get_attention_scores

        def record(q, k, mask=None, _orig=original, _name=name, _mod=mod):
            p = _orig(q, k, mask)
            seen[_name] = p.reshape(-1, _mod.heads, *p.shape[1:]).mean(1)
            return p

        mod.get_attention_scores = record
    run(ref)
    return seen


@pytest.mark.parametrize("processor", [AttnProcessor2_0(), SlicedAttnProcessor(slice_size=2), AttnProcessor()])
def test_probs_equal_eager_softmax(processor):
    unet = tiny_models.unet_sd1()
    reference = _reference_probs(unet)
    unet.set_attn_processor(processor)
    cap = ProbsStore(BOTH)
    with AttentionCapture(find_attention_modules(unet), (16, 16), [cap]):
        run(unet)
    assert set(cap.probs) == set(reference)
    for name, p in cap.probs.items():
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, reference[name], atol=1e-5, rtol=0)
        torch.testing.assert_close(p.sum(-1), torch.ones_like(p[..., 0]), atol=1e-5, rtol=0)


def test_fused_qkv_projections_are_read_like_separate_ones():
    """diffusers' fuse_qkv_projections() makes self-attention call to_qkv and cross-attention to_q and to_kv; the
    capture reads them there, with the same probabilities and queries, and leaves the fused model as it was."""
    unet = tiny_models.unet_sd1()
    reference = _reference_probs(unet)
    unet.fuse_qkv_projections()
    assert any("to_qkv" in m._modules for m in unet.modules()) and any("to_kv" in m._modules for m in unet.modules())
    before = state_snapshot(unet)
    out_before, _ = run(unet)
    store, queries = ProbsStore(BOTH), QueryStore(BOTH)
    with AttentionCapture(find_attention_modules(unet), (16, 16), [store, queries]) as cap:
        out_during, _ = run(unet)
    assert set(store.probs) == set(reference) and len(queries.queries) == len(reference)
    assert {l.kind for l in cap.layers} == {"self", "cross"}
    assert all(l.kind == ("cross" if l.name.endswith("attn2") else "self") for l in cap.layers)
    for name, p in store.probs.items():
        torch.testing.assert_close(p, reference[name], atol=1e-5, rtol=0)
    assert torch.equal(out_before, out_during) and torch.equal(out_before, run(unet)[0])
    assert_unchanged(before, state_snapshot(unet))

    class Boom(Exception):
        pass

    def explode(*_):  # raises inside the fused to_qkv hook path, midway through the forward
        raise Boom()

    handle = unet.mid_block.register_forward_pre_hook(explode)
    with pytest.raises(Boom):
        with AttentionCapture(find_attention_modules(unet), (16, 16), [ProbsStore(BOTH)]):
            run(unet)
    handle.remove()
    assert_unchanged(before, state_snapshot(unet))  # the fused projections' hooks came off too
    assert torch.equal(out_before, run(unet)[0])


def test_chunking_does_not_change_probs():
    q, k = torch.randn(2, 300, 32), torch.randn(2, 77, 32)
    whole = torch.cat([c for _, c in attention_probs(q, k, 4, 0.35)], dim=1)
    chunks = list(attention_probs(q, k, 4, 0.35, max_chunk_bytes=4 * 77 * 4 * 2 * 7))
    assert len(chunks) > 10 and [s for s, _ in chunks][:2] == [0, chunks[0][1].shape[1]]
    torch.testing.assert_close(torch.cat([c for _, c in chunks], dim=1), whole, atol=0, rtol=0)
    manual = torch.stack([(q[..., h * 8:(h + 1) * 8] @ k[..., h * 8:(h + 1) * 8].transpose(1, 2) * 0.35).softmax(-1) for h in range(4)]).mean(0)
    torch.testing.assert_close(whole, manual, atol=1e-6, rtol=0)


def test_only_requested_layers_are_computed():
    unet = tiny_models.unet_sd1()
    calls = []

    class CrossOnly:
        need = Need(kinds=("cross",))

        def __call__(self, layer, start, p):
            calls.append((layer.name, p.shape))

    computed = []
    real = capture_module.attention_probs
    with AttentionCapture(find_attention_modules(unet), (16, 16), [CrossOnly()]) as cap:
        capture_module.attention_probs = lambda q, k, *a: computed.append(k.shape[1]) or real(q, k, *a)
        try:
            run(unet)
        finally:
            capture_module.attention_probs = real
    names = {n for n, _ in calls}
    assert names == {l.name for l in cap.layers if l.kind == "cross"}
    assert all(shape[2] == 77 for _, shape in calls)
    assert computed and set(computed) == {77}  # no self-attention layer was computed


def test_model_untouched_and_bit_identical(sd15):
    before = state_snapshot(sd15)
    out_before, _ = run(sd15, batch=1, seed=3)
    queries = QueryStore(BOTH)
    features = encoder_features(find_attention_modules(sd15), (16, 16))  # DiffCut's
    with AttentionCapture(find_attention_modules(sd15), (16, 16), [ProbsStore(BOTH), queries]), \
            OutputCapture(find_transformer_modules(sd15)) as outputs, features:
        out_during, _ = run(sd15, batch=1, seed=3)
    out_after, _ = run(sd15, batch=1, seed=3)
    assert torch.equal(out_before, out_during)  # hooks only read activations
    assert torch.equal(out_before, out_after)
    assert_unchanged(before, state_snapshot(sd15))
    assert len(queries.queries) == 32 and len(outputs.outputs) == 16
    assert features.output is not None and features.name.startswith("down_blocks")


def test_hooks_removed_after_exception(sd15):
    before = state_snapshot(sd15)
    out_before, _ = run(sd15, batch=1, seed=4)

    class Boom(Exception):
        pass

    class Exploding:
        need = Need(kinds=BOTH)

        def __call__(self, layer, start, probs):
            raise Boom

    with pytest.raises(Boom):
        with AttentionCapture(find_attention_modules(sd15), (16, 16), [Exploding()]):
            run(sd15, batch=1, seed=4)

    class ExplodingPerHead(Exploding):
        need = Need(kinds=("cross",), values="head_probs")  # DAAM's per-head path

    with pytest.raises(Boom):
        with AttentionCapture(find_attention_modules(sd15), (16, 16), [ExplodingPerHead()]):
            run(sd15, batch=1, seed=4)
    with pytest.raises(KeyboardInterrupt):
        with AttentionCapture(find_attention_modules(sd15), (16, 16), [ProbsStore(BOTH)]):
            raise KeyboardInterrupt
    with pytest.raises(Boom):
        with OutputCapture(find_transformer_modules(sd15)):
            raise Boom
    with pytest.raises(KeyboardInterrupt):
        with encoder_features(find_attention_modules(sd15), (16, 16)):
            run(sd15, batch=1, seed=4)
            raise KeyboardInterrupt
    assert_unchanged(before, state_snapshot(sd15))
    out_after, _ = run(sd15, batch=1, seed=4)
    assert torch.equal(out_before, out_after)


def test_bfloat16_model():
    unet32 = tiny_models.unet_sd1()
    unet16 = copy.deepcopy(unet32).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    caps = []
    for unet in (unet32, unet16):
        cap = ProbsStore()
        with AttentionCapture(find_attention_modules(unet), (16, 16), [cap]):
            with torch.no_grad():
                unet(x.to(unet.dtype), torch.tensor([300]), encoder_hidden_states=ctx.to(unet.dtype))
        caps.append(cap)
    for name, p16 in caps[1].probs.items():
        assert p16.dtype == torch.float32 and torch.isfinite(p16).all()
        torch.testing.assert_close(p16.sum(-1), torch.ones_like(p16[..., 0]), atol=1e-5, rtol=0)
        assert (p16 - caps[0].probs[name]).abs().max() < 0.05


def test_ldm_crossattention_modules():
    """Stability's ldm CrossAttention (A1111's model code) shares to_q/to_k/heads and is captured the same way."""
    pytest.importorskip("ldm")
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(image_size=16, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
                     attention_resolutions=[1, 2], channel_mult=(1, 2), num_heads=4, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=32, legacy=False).eval()
    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = unet(x, torch.tensor([10]), context=ctx)
        store = ProbsStore(BOTH)
        with AttentionCapture(find_attention_modules(unet), (16, 16), [store]) as cap:
            during = unet(x, torch.tensor([10]), context=ctx)
        after = unet(x, torch.tensor([10]), context=ctx)
    assert torch.equal(before, during) and torch.equal(before, after)
    kinds = [l.kind for l in cap.layers]
    assert kinds == ["self", "cross"] * 7  # 2 down + 1 mid + 4 up transformer blocks
    for name, p in store.probs.items():
        torch.testing.assert_close(p.sum(-1), torch.ones_like(p[..., 0]), atol=1e-5, rtol=0)
    assert all(n.startswith(("input_blocks", "middle_block", "output_blocks")) for n in store.probs)


def test_spatial_size():
    assert spatial_size(64 * 64, (64, 64)) == (64, 64)
    assert spatial_size(16 * 24, (64, 96)) == (16, 24)
    assert spatial_size(4 * 5, (25, 33)) == (4, 5)  # ceil at each downsampling of an odd latent
    with pytest.raises(CaptureError):
        spatial_size(7, (64, 64))


def test_no_attention_modules():
    with pytest.raises(CaptureError):
        AttentionCapture(find_attention_modules(torch.nn.Linear(2, 2)), (8, 8))


def test_logits_for_chosen_layers():
    unet = tiny_models.unet_sd1()
    probs = ProbsStore(BOTH)
    with AttentionCapture(find_attention_modules(unet), (16, 16), [probs]):
        run(unet)
    self_probs, cross_logits = ProbsStore(("self",)), ProbsStore(("cross",), values="logits")
    with AttentionCapture(find_attention_modules(unet), (16, 16), [self_probs, cross_logits]) as cap:
        run(unet)
    raw = types.SimpleNamespace(probs={**self_probs.probs, **cross_logits.probs})
    for name, p in probs.probs.items():
        if cap.layer(name).kind == "self":
            assert torch.equal(raw.probs[name], p)
        else:
            # logits are head-averaged scores: not normalised, and differ from the probabilities
            assert not torch.allclose(raw.probs[name].sum(-1), torch.ones(1))
    q, k = torch.randn(1, 10, 16), torch.randn(1, 7, 16)
    ((_, lg),) = attention_probs(q, k, 2, 0.25, logits=True)
    manual = torch.stack([(q[..., h * 8:(h + 1) * 8] @ k[..., h * 8:(h + 1) * 8].transpose(1, 2)) * 0.25 for h in range(2)]).mean(0)
    torch.testing.assert_close(lg, manual)


def test_row_selection():
    unet = tiny_models.unet_sd1()
    full = ProbsStore(BOTH)
    with AttentionCapture(find_attention_modules(unet), (16, 16), [full]):
        run(unet, batch=2)
    second_self, cross = ProbsStore(("self",)), ProbsStore(("cross",))
    second_self.need = Need(kinds=("self",), rows=slice(1, 2))
    with AttentionCapture(find_attention_modules(unet), (16, 16), [second_self, cross]) as cap:
        run(unet, batch=2)
    part = {**second_self.probs, **cross.probs}
    for name, p in full.probs.items():
        expected = p[1:2] if cap.layer(name).kind == "self" else p
        torch.testing.assert_close(part[name], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("weighting", ["resolution", "layer"])
@pytest.mark.parametrize("big, small", [((8, 8), (4, 4)), ((6, 4), (3, 2)), ((5, 5), (3, 3))])
def test_self_attention_aggregate_matches_its_definition(big, small, weighting):
    """Keys bilinear to R×R and renormalised, queries nearest onto R×R, over chunks and forwards. ``resolution``
    (DiffSeg's): each size's layers averaged first, sizes weighted side / Σ sides. ``layer``: every layer
    renormalised on its own, weighted ∝ its side."""
    import torch.nn.functional as F

    from textmask.capture import AttentionLayer
    from textmask.methods import SelfAttentionAggregate

    g = torch.Generator().manual_seed(0)
    n = big[0] * big[1]

    def probs(size):
        t = size[0] * size[1]
        return (torch.rand(2, t, t, generator=g) * 4).softmax(-1)

    layers = [("a", big, probs(big)), ("b", small, probs(small)), ("c", big, probs(big)), ("d", small, probs(small)),
              ("e", big, probs(big))]
    agg = SelfAttentionAggregate(weighting=weighting)
    for _ in range(2):  # two forwards: each counts once more
        for name, size, p in layers:
            layer = AttentionLayer(name, "self", 1, 1, size, 2)
            for start in range(0, p.shape[1], 7):
                agg(layer, start, p[:, start : start + 7])

    def onto_big(p, size):
        keys = F.interpolate(p.reshape(-1, 1, *size), size=big, mode="bilinear", align_corners=False).reshape(2, -1, n)
        keys = keys / keys.sum(-1, keepdim=True)
        rows = torch.arange(big[0]) * size[0] // big[0]
        cols = torch.arange(big[1]) * size[1] // big[1]
        return keys[:, (rows[:, None] * size[1] + cols[None, :]).reshape(-1)]

    if weighting == "resolution":
        mean_big = torch.stack([p for _, size, p in layers if size == big]).mean(0)
        mean_small = torch.stack([p for _, size, p in layers if size == small]).mean(0)
        expected = (big[0] * mean_big + small[0] * onto_big(mean_small, small)) / (big[0] + small[0])
    else:
        expected = torch.zeros(2, n, n)
        for name, size, p in layers:
            expected += size[0] * (p if size == big else onto_big(p, size))
        expected /= sum(size[0] for _, size, _ in layers)
    result = agg.result()
    assert torch.allclose(result, expected, atol=1e-6)
    assert torch.allclose(result.sum(-1), torch.ones(2, n), atol=1e-5)
    assert agg.result() is result  # asking again costs nothing


def test_cross_attention_maps_match_their_definition():
    """Each layer's phrase map (the mean over its tokens) bicubic to the largest grid, weighted 1/side, over chunks."""
    import torch.nn.functional as F

    from textmask.capture import AttentionLayer
    from textmask.methods import CrossAttentionMaps
    from textmask.postprocess import normalize

    g = torch.Generator().manual_seed(0)
    groups = [[1, 2], [5]]
    maps = CrossAttentionMaps(groups, heads="mean")
    expected = torch.zeros(2, 2, 8, 8)
    sizes = [(8, 8), (4, 4), (8, 8), (2, 2)]
    for i, size in enumerate(sizes):
        t = size[0] * size[1]
        p = (torch.rand(2, t, 10, generator=g) * 4).softmax(-1)
        layer = AttentionLayer(f"layer{i}", "cross", i + 1, i + 1, size, 2)
        for start in range(0, t, 5):
            maps(layer, start, p[:, start : start + 5])
        m = torch.stack([p[..., group].mean(-1) for group in groups], 1).reshape(2, 2, *size)
        if size != (8, 8):
            m = F.interpolate(m, size=(8, 8), mode="bicubic", align_corners=False)
        expected += m / size[0]
    expected /= sum(1 / size[0] for size in sizes)
    torch.testing.assert_close(maps.aggregate(), normalize(expected.clamp_min(0)), atol=1e-5, rtol=0)


def test_heads_weighed_by_their_information():
    """heads="information": within each layer, each head's phrase map weighted by log N − its entropy over the N
    pixels (a sharp head counts, a uniform one not at all), over chunks of rows; then as the head mean is."""
    import math

    import torch.nn.functional as F

    from textmask.capture import AttentionLayer
    from textmask.methods import CrossAttentionMaps
    from textmask.postprocess import normalize

    g = torch.Generator().manual_seed(1)
    groups = [[1, 2], [5]]
    maps, mean = CrossAttentionMaps(groups), CrossAttentionMaps(groups, heads="mean")
    assert maps.heads == "information" and maps.need.values == "head_probs"  # the default
    expected = torch.zeros(2, 2, 8, 8)
    sizes = [(8, 8), (4, 4)]
    for i, size in enumerate(sizes):
        t = size[0] * size[1]
        p = (torch.rand(2, 3, t, 10, generator=g) * 6).softmax(-1)  # [B, heads, N, keys]
        p[:, 2] = 0.1  # a head that attends everywhere alike carries no information
        layer = AttentionLayer(f"layer{i}", "cross", i + 1, i + 1, size, 3)
        for start in range(0, t, 5):
            maps(layer, start, p[:, :, start : start + 5])
        mean(layer, 0, p.mean(1))
        per_head = torch.stack([p[..., group].mean(-1) for group in groups], -1)  # [B, H, N, P]
        dist = per_head / per_head.sum(2, keepdim=True)
        info = math.log(t) + (dist * dist.log()).sum(2, keepdim=True)
        assert torch.allclose(info[:, 2], torch.zeros(2, 1, 2), atol=1e-5)
        m = ((info * per_head).sum(1) / info.sum(1)).transpose(1, 2).reshape(2, 2, *size)
        if size != (8, 8):
            m = F.interpolate(m, size=(8, 8), mode="bicubic", align_corners=False)
        expected += m / size[0]
    expected /= sum(1 / size[0] for size in sizes)
    torch.testing.assert_close(maps.aggregate(), normalize(expected.clamp_min(0)), atol=1e-5, rtol=0)
    assert not torch.allclose(mean.aggregate(), maps.aggregate(), atol=1e-3)  # the weighing changes the maps


def test_after_one_full_forward_only_the_kinds_read_are_hooked():
    """The first capture on a model hooks every attention module and learns each one's kind and place; later captures
    hook only the kinds their collectors read, with the same layer numbering, the same values, and the model's
    output bit-identical."""
    unet = tiny_models.unet_sd1()
    modules = find_attention_modules(unet)
    first = ProbsStore(BOTH)
    with AttentionCapture(modules, (16, 16), [first]) as cap:
        hooked_all = sum(len(m.to_q._forward_hooks) for _, m in modules)
        out_first, _ = run(unet)
    full = {l.name: l for l in cap.layers}
    cross = ProbsStore(("cross",))
    with AttentionCapture(modules, (16, 16), [cross]) as cap:
        hooked = {n for n, m in modules if m.to_q._forward_hooks}
        out_second, _ = run(unet)
    assert hooked_all == len(modules) and hooked == {n for n, l in full.items() if l.kind == "cross"}
    for layer in cap.layers:  # numbered as in the full forward
        assert (layer.ordinal, layer.kind_ordinal) == (full[layer.name].ordinal, full[layer.name].kind_ordinal)
    for name, p in cross.probs.items():
        assert torch.equal(p, first.probs[name])
    assert torch.equal(out_first, out_second) and torch.equal(out_first, run(unet)[0])
    assert all(not m.to_q._forward_hooks and not m.to_k._forward_hooks for _, m in modules)  # all came off


def test_per_head_probabilities_average_to_the_probabilities_and_change_nothing(sd15):
    """``Need(values="head_probs")`` (DAAM's aggregation): every head's softmax, whose mean is the usual probs; the
    forward is bit-identical during and after, and the hooks come off."""

    class Heads:
        need = Need(kinds=("cross",), values="head_probs")

        def __init__(self):
            self.parts = {}

        def __call__(self, layer, start, p):
            self.parts.setdefault(layer.name, []).append(p)

    before = state_snapshot(sd15)
    out_before, _ = run(sd15, batch=2, seed=5)
    heads, mean = Heads(), ProbsStore(("cross",))
    with AttentionCapture(find_attention_modules(sd15), (16, 16), [heads, mean]) as cap:
        out_during, _ = run(sd15, batch=2, seed=5)
    out_after, _ = run(sd15, batch=2, seed=5)
    assert torch.equal(out_before, out_during) and torch.equal(out_before, out_after)
    assert_unchanged(before, state_snapshot(sd15))
    for layer in (l for l in cap.layers if l.kind == "cross"):
        full = torch.cat(heads.parts[layer.name], dim=2)
        assert full.shape == (2, layer.heads, layer.tokens, 77)
        torch.testing.assert_close(full.sum(-1), torch.ones_like(full.sum(-1)), atol=1e-5, rtol=0)
        torch.testing.assert_close(full.mean(1), mean.probs[layer.name], atol=1e-6, rtol=0)


def test_module_inventory_is_remembered_until_the_model_changes():
    """The attention modules are found once per model (a walk over every module costs a GPU forward's launch
    budget); a replaced top-level block is found again, and a LoRA-style wrapper on ``to_q`` is still read."""
    unet = tiny_models.unet_sd1()
    first = find_attention_modules(unet)
    assert [m for _, m in find_attention_modules(unet)] == [m for _, m in first]
    old = unet.down_blocks
    unet.down_blocks = copy.deepcopy(old)  # a new block: its attention modules are new objects
    again = find_attention_modules(unet)
    assert {id(m) for _, m in again} != {id(m) for _, m in first} and len(again) == len(first)

    class Wrapped(torch.nn.Module):  # as PEFT wraps a projection with a LoRA layer
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x)

    name, module = next((n, m) for n, m in again if "attn2" in n)
    module.to_q = Wrapped(module.to_q)
    store = ProbsStore(("cross",))
    with AttentionCapture(find_attention_modules(unet), (16, 16), [store]):
        run(unet)
    assert name in store.probs
