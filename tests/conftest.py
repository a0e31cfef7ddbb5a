import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def sd1_pipe():
    return tiny_models.sd1_pipe()


@pytest.fixture(scope="session")
def sdxl_pipe():
    return tiny_models.sdxl_pipe()


@pytest.fixture(scope="session")
def sd1_masker(sd1_pipe):
    from textmask import TextMasker

    return TextMasker.from_pipe(sd1_pipe, resolution=64)


def state_snapshot(module: torch.nn.Module) -> dict:
    """Everything a hook or patch could leave behind: parameters, buffers and hook dictionaries."""
    hooks = {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), type(m.forward))
        for name, m in module.named_modules()
    }
    tensors = {k: v.clone() for k, v in module.state_dict().items()}
    return {"hooks": hooks, "tensors": tensors}


def assert_unchanged(before: dict, after: dict) -> None:
    assert before["hooks"] == after["hooks"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for k in before["tensors"]:
        assert torch.equal(before["tensors"][k], after["tensors"][k]), k


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny SD1-style single-file checkpoint in the original LDM layout (.safetensors and .ckpt) plus its configs."""
    pytest.importorskip("ldm")
    from safetensors.torch import save_file

    import ldm_checkpoint

    d = tmp_path_factory.mktemp("ckpt")
    sd = ldm_checkpoint.ldm_state_dict()
    save_file(sd, d / "tiny.safetensors")
    torch.save(sd, d / "tiny.ckpt")
    ldm_checkpoint.write_configs(d / "config")
    return d, sd
