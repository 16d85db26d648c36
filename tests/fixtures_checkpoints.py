"""Fixtures for the checkpoint and LoRA-format tests: tiny single-file checkpoints in the
original (LDM) layout, a guard that fails any network connection, and a fixed UNet input."""
from __future__ import annotations

import socket

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_single_files(tmp_path_factory, tiny_sd15, tiny_sdxl) -> dict:
    """{"sd15": path, "sdxl": path}: the session's tiny pipelines saved as original-layout
    single-file checkpoints (what ComfyUI / A1111 users have), for ``--base``."""
    from ldm_export import save_single_file

    folder = tmp_path_factory.mktemp("single-files")
    return {
        "sd15": save_single_file(tiny_sd15, folder / "tiny_sd15.safetensors"),
        "sdxl": save_single_file(tiny_sdxl, folder / "tiny_sdxl.safetensors"),
    }


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test that uses this fixture."""

    def refuse(self, address, *args, **kwargs):
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def unet_inputs(unet, seed: int = 0) -> dict:
    """A fixed batch of UNet inputs (latents, timestep, text states, SDXL added conditioning)."""
    g = torch.Generator().manual_seed(seed)
    config = unet.config
    size = config.sample_size
    kwargs = {
        "sample": torch.randn(1, config.in_channels, size, size, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 7, config.cross_attention_dim, generator=g),
    }
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
        }
    return kwargs


@torch.no_grad()
def unet_output(unet, inputs: dict) -> torch.Tensor:
    dtype = next(unet.parameters()).dtype
    cast = {k: v.to(dtype) if k != "timestep" and torch.is_tensor(v) else v for k, v in inputs.items()}
    if "added_cond_kwargs" in cast:
        cast["added_cond_kwargs"] = {k: v.to(dtype) for k, v in cast["added_cond_kwargs"].items()}
    return unet(**cast).sample.float()
