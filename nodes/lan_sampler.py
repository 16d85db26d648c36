"""The "LAN Sampler" node: KSampler plus Latent Adaptive Normalization against a reference model.

Two passes from the same noise, one model resident at a time: the reference model's trajectory
is sampled first and the per-channel mean/std of its latent are recorded at every model
evaluation; then the tuned model's trajectory is sampled and, before each evaluation (i.e.
after each sampler step) and once more at the end, its latent's statistics are set to the
recorded ones (``core.lan``). The latent is changed in place in the sampler's own tensor, so
samplers with history (dpmpp_2m) keep it. For samplers with one model evaluation per step
(euler, euler_ancestral, dpmpp_2m, ddim, lms, dpmpp_2m_sde, ...) that is exactly "after every
step"; for those with several evaluations per step (heun, dpm_2, dpmpp_sde ...) the intermediate
points are normalized too. With ``lan_strength`` 0 the tuned pass is KSampler's own computation:
the output equals KSampler's bit for bit.
"""
from __future__ import annotations

from ..core.lan import StatsRecorder, match_channel_stats
from .node_api import io


class _Probe:
    """Stands in for the sampler's model: sees (and may rewrite in place) each latent it is
    asked to denoise, then delegates. Attribute access goes to the wrapped model."""

    def __init__(self, model, on_latent):
        self._model, self._on_latent = model, on_latent

    def __call__(self, x, sigma, **kwargs):
        self._on_latent(x)
        return self._model(x, sigma, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def lan_sampler(base, recorder: StatsRecorder, mode: str, strength: float = 1.0):
    """A KSAMPLER that runs ``base``'s sampler function while recording ("record") or matching
    ("match") the per-evaluation channel statistics."""
    import comfy.samplers

    def sampler_function(model, noise, sigmas, extra_args=None, callback=None, disable=None, **options):
        step = [0]

        def on_latent(x):
            if mode == "record":
                recorder.record(x)
            elif strength > 0:
                x.copy_(recorder.normalize(x, step[0], strength))
            step[0] += 1

        out = base.sampler_function(_Probe(model, on_latent), noise, sigmas, extra_args=extra_args,
                                    callback=callback, disable=disable, **options)
        on_latent(out)  # the final latent too
        return out

    return comfy.samplers.KSAMPLER(sampler_function, base.extra_options, base.inpaint_options)


def _sigmas(model, steps, sampler_name, scheduler, denoise):
    import comfy.samplers

    return comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                   scheduler=scheduler, denoise=denoise, model_options=model.model_options).sigmas


class LANSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import comfy.samplers

        return io.Schema(
            node_id="FairHumanLANSampler", display_name="LAN Sampler", category="HG-DPO", inputs=[
                io.Model.Input("model", tooltip="The tuned model (e.g. with an HG-DPO LoRA applied)."),
                io.Model.Input("reference_model", tooltip="The reference model, usually the same checkpoint without "
                                                          "the LoRA. Its trajectory sets the statistics."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed, shared by both trajectories."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampler steps."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale, for both models."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip="Sampling algorithm."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="Noise schedule."),
                io.Conditioning.Input("positive", tooltip="What to draw."),
                io.Conditioning.Input("negative", tooltip="What to avoid."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="How much of the latent to replace (1: all)."),
                io.Float.Input("lan_strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1: the tuned latent takes the reference's channel mean and std after every "
                                       "step (HG-DPO's LAN); 0: plain KSampler."),
            ],
            outputs=[io.Latent.Output(display_name="LATENT", tooltip="The denoised latent of the tuned model, "
                                                                    "normalized along the reference's trajectory.")],
            description="KSampler with Latent Adaptive Normalization (HG-DPO): samples the reference model first, "
                        "then the tuned model from the same noise, matching its per-channel latent statistics to the "
                        "reference's after every step. Costs about two samplings; one model in memory at a time.")

    @classmethod
    def execute(cls, model, reference_model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                latent_image, denoise=1.0, lan_strength=1.0):
        return io.NodeOutput(sample(model, reference_model, seed, steps, cfg, sampler_name, scheduler, positive,
                                    negative, latent_image, denoise, lan_strength))


def sample(model, reference_model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
           denoise=1.0, lan_strength=1.0) -> dict:
    """The LAN Sampler's LATENT."""
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    import latent_preview

    latent = latent_image["samples"]
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
    noise_mask = latent_image.get("noise_mask")
    disable_pbar = not comfy.utils.PROGRESS_BAR_ENABLED
    base = comfy.samplers.sampler_object(sampler_name)
    recorder = StatsRecorder()
    passes = [(reference_model, "record"), (model, "match")]
    if lan_strength == 0:
        passes = passes[1:]  # nothing to match: the reference pass would be wasted time
    out = None
    for which, mode in passes:
        sampler = lan_sampler(base, recorder, mode, lan_strength)
        # the UI progress bar runs once per pass (reference, then tuned)
        callback = latent_preview.prepare_callback(which, steps)
        out = comfy.sample.sample_custom(
            which, noise, cfg, sampler, _sigmas(which, steps, sampler_name, scheduler, denoise),
            positive, negative, latent, noise_mask=noise_mask, callback=callback,
            disable_pbar=disable_pbar, seed=seed)
    result = latent_image.copy()
    result["samples"] = out
    return result


NODES = [LANSampler]

__all__ = ["LANSampler", "lan_sampler", "match_channel_stats"]
