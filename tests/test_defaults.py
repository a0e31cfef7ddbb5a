"""Every face starts from the same defaults: the values in ``textmask.defaults``, not copies of them."""

import inspect

import pytest

from textmask import defaults, faces, options
from textmask.cli import build_parser
from textmask.masker import TextMasker
from textmask.methods import refdiff
from textmask.ovdiff import prototypes
from textmask.sampling_capture import SamplingCapture
from textmask.trace import Trace


def keyword_defaults(fn) -> dict:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}


def cli_defaults(argv: list[str]) -> dict:
    return vars(build_parser().parse_args(argv))


@pytest.mark.parametrize("fn, expected", [
    (TextMasker.mask, dict(method=defaults.METHOD, threshold=defaults.THRESHOLD, min_presence=defaults.MIN_PRESENCE,
                           pamr=defaults.PAMR, temporal=defaults.TEMPORAL, batch_size=defaults.BATCH_SIZE)),
    (TextMasker.refer, dict(alpha=defaults.REFER_ALPHA, tau=defaults.TAU, timestep=defaults.REFER_TIMESTEP)),
    (refdiff.refer, dict(alpha=defaults.REFER_ALPHA, tau=defaults.TAU)),
    (TextMasker.build_prototypes, dict(images=defaults.OVDIFF_IMAGES, steps=defaults.OVDIFF_STEPS,
                                       cfg=defaults.OVDIFF_CFG)),
    (prototypes.build_prototypes, dict(images=defaults.OVDIFF_IMAGES, steps=defaults.OVDIFF_STEPS,
                                       cfg=defaults.OVDIFF_CFG, kmeans_parts=defaults.OVDIFF_PARTS)),
    (faces.mask_any, dict(method=defaults.METHOD, threshold=defaults.THRESHOLD, min_presence=defaults.MIN_PRESENCE,
                          ovdiff_images=defaults.OVDIFF_IMAGES)),
    (Trace.mask, dict(threshold=defaults.THRESHOLD, min_presence=defaults.MIN_PRESENCE, pamr=defaults.PAMR)),
    (SamplingCapture.mask, dict(threshold=defaults.THRESHOLD)),
], ids=lambda v: getattr(v, "__qualname__", ""))
def test_api_keywords_start_from_the_defaults(fn, expected):
    got = keyword_defaults(fn)
    assert {k: got.get(k, "(missing)") for k in expected} == expected


def test_ovdiff_settings_start_from_the_defaults():
    s = prototypes.Settings()
    assert (s.images, s.steps, s.cfg, s.kmeans) == (defaults.OVDIFF_IMAGES, defaults.OVDIFF_STEPS, defaults.OVDIFF_CFG,
                                                     defaults.OVDIFF_PARTS)


def test_cli_flags_start_from_the_defaults():
    mask = cli_defaults(["mask", "in.png", "car", "--out", "m.png", "--checkpoint", "x"])
    assert (mask["method"], mask["threshold"], mask["min_presence"], mask["refine"], mask["pamr"]) == (
        defaults.METHOD, defaults.THRESHOLD, defaults.MIN_PRESENCE, defaults.REFINE, defaults.PAMR)
    refer = cli_defaults(["refer", "in.png", "the car on the left", "--out", "m.png", "--checkpoint", "x"])
    assert (refer["alpha"], refer["tau"], refer["timestep"]) == (defaults.REFER_ALPHA, defaults.TAU,
                                                                defaults.REFER_TIMESTEP)
    build = cli_defaults(["prototypes", "build", "cat", "--checkpoint", "x"])
    assert (build["images"], build["steps"], build["cfg"]) == (defaults.OVDIFF_IMAGES, defaults.OVDIFF_STEPS,
                                                               defaults.OVDIFF_CFG)


def test_the_defaults_pass_their_own_checks():
    """A default the bounds refuse would fail every face that never sets it."""
    assert options.tau(defaults.TAU) == defaults.TAU and options.cut(defaults.CUT) == defaults.CUT
    assert options.alpha(defaults.REFER_ALPHA) == defaults.REFER_ALPHA
    assert options.cfg(defaults.OVDIFF_CFG) == defaults.OVDIFF_CFG
    assert options.min_presence(defaults.MIN_PRESENCE) == defaults.MIN_PRESENCE
    assert options.count("images", defaults.OVDIFF_IMAGES, options.MAX_SUPPORT_IMAGES) == defaults.OVDIFF_IMAGES
    assert options.count("steps", defaults.OVDIFF_STEPS, options.MAX_STEPS) == defaults.OVDIFF_STEPS
    for t in (defaults.TIMESTEP, defaults.REFER_TIMESTEP, defaults.LDZNET_TIMESTEP, defaults.OVDIFF_TIMESTEP,
              defaults.DIFFCUT_TIMESTEP):
        assert options.timestep(t) == t
