"""Shared fixtures: tiny models of every family (built once per session; tests must leave them unwrapped)."""

from __future__ import annotations

import functools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from attnkit import testing  # noqa: E402

FAMILIES = testing.FAMILIES  # the newer families (testing.NEW_FAMILIES) use the same fixture


@functools.cache
def _model(family: str, impl: str):
    model = testing.tiny_model(family, attn_implementation=impl)
    model.generation_config.eos_token_id = None  # random models emit EOS at random; run full length
    model.generation_config.pad_token_id = 0
    return model


@functools.cache
def _processor(family: str):
    return testing.tiny_processor(family)


@pytest.fixture
def tiny():
    """``tiny(family, impl="sdpa") -> (model, processor)``, cached for the session."""

    def get(family: str, impl: str = "sdpa"):
        model = _model(family, impl)
        assert getattr(model, "_attnkit_handle", None) is None, "a previous test left the model wrapped"
        return model, _processor(family)

    return get


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine they only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
