"""A test-only ComfyUI node: seeded random CONDITIONING of a given token count and width, with a
pooled vector. It stands in for a DiT's text encoders (T5-XXL alone is 4.7 B parameters) in the
graphs of tests/test_comfyui_dit.py, which test the diffusion model, its LoRA and the samplers,
not text encoding. Copied into a test server's custom_nodes; never shipped."""
import torch


class SeededConditioning:
    CATEGORY = "testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31}),
                             "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
                             "width": ("INT", {"default": 64, "min": 1, "max": 8192}),
                             "pooled_width": ("INT", {"default": 768, "min": 1, "max": 8192}),
                             "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0})}}

    def make(self, seed, tokens, width, pooled_width, guidance):
        g = torch.Generator().manual_seed(seed)
        hidden = torch.randn(1, tokens, width, generator=g)
        pooled = torch.randn(1, pooled_width, generator=g)
        return ([[hidden, {"pooled_output": pooled, "guidance": guidance}]],)


NODE_CLASS_MAPPINGS = {"TestSeededConditioning": SeededConditioning}
