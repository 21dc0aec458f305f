"""Cost model: FLOPs and memory counted on meta tensors, the batch-time fit, GPU kinds and JSON profiles."""

from __future__ import annotations

import json

import pytest

from pipeline import costs
from pipeline.config import load_config


# ---------------------------------------------------------------- counting on meta tensors


def test_linear_and_conv_flops_and_memory_match_hand_counts():
    import torch

    with torch.device("meta"):
        linear = torch.nn.Linear(1024, 4096)
        conv = torch.nn.Conv2d(8, 16, kernel_size=3, padding=1)
    count = costs.count_forward(lambda: linear(torch.empty(8, 1024, device="meta")))
    assert count.flops == 2 * 8 * 1024 * 4096  # one multiply-add per weight per row
    # Alive at the peak: the fp32 input and output; the weight is not followed, its transpose is a view.
    assert count.peak_bytes == 4 * (8 * 1024 + 8 * 4096)
    count = costs.count_forward(lambda: conv(torch.empty(2, 8, 32, 32, device="meta")))
    assert count.flops == 2 * (2 * 16 * 32 * 32) * (8 * 3 * 3)


def test_tiny_unet_flops_match_a_per_layer_analytic_count():
    import torch
    from diffusers import UNet2DModel

    config = {"sample_size": 32, "in_channels": 6, "out_channels": 3, "layers_per_block": 1, "add_attention": False,
              "block_out_channels": [32, 64], "down_block_types": ["ResnetDownsampleBlock2D"] * 2,
              "up_block_types": ["ResnetUpsampleBlock2D"] * 2}
    model = costs.ModelConfig(UNet2DModel, config).build("fp32")
    analytic = []

    def hand_count(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            analytic.append(2 * output.numel() * per_output)
        elif isinstance(module, torch.nn.Linear):
            analytic.append(2 * output.numel() * module.in_features)

    for module in model.modules():
        module.register_forward_hook(hand_count)
    count = costs.count_forward(lambda: model(torch.empty(2, 6, 32, 32, device="meta"),
                                              torch.empty((), dtype=torch.long, device="meta")))
    assert count.flops == pytest.approx(sum(analytic), rel=1e-9)
    assert count.kernels > len(analytic)  # convolutions, norms, activations, adds...


def test_attention_is_counted_as_the_memory_efficient_kernel():
    import torch
    import torch.nn.functional as F

    batch, heads, length, width = 1, 8, 4096, 64

    def attend():
        q = torch.empty(batch, heads, length, width, dtype=torch.float16, device="meta")
        return F.scaled_dot_product_attention(q, q, q)

    count = costs.count_forward(attend)
    assert count.flops == 4 * batch * heads * length * length * width  # QK^T and AV
    scores = batch * heads * length * length * 2
    assert count.peak_bytes < scores / 10  # no L x L score matrix, as on the GPU


# ---------------------------------------------------------------- the karlo profile (real configs)


def test_karlo_flops_match_known_counts_and_the_1024_stage_dominates():
    profile = costs.load_profile("karlo")
    models = costs.karlo_models()
    decoder = costs.decoder_unet_work(models["decoder"], "fp16", steps=1, samples=1, context_tokens=77 + 4)
    assert decoder.flops_per_image == pytest.approx(608e9, rel=0.2)  # one decoder forward per image
    flops = profile.flops_per_image
    assert 0.8 <= flops["upsampler_1024"] / sum(flops.values()) <= 0.95
    # Guidance doubles the decoder's 25 forwards; super-res runs 7 unguided ones of ~8.5 TFLOP.
    assert flops["decoder"] == pytest.approx(2 * 25 * 608e9, rel=0.2)
    assert flops["upsampler_256"] == pytest.approx(7 * 8.5e12, rel=0.2)
    # Karlo's fp16 weights: prior 1B, decoder 0.9B, two 0.7B super-res UNets, CLIP ViT-L/14 text: ~6.4 GiB.
    karlo = sum(profile.stages[s].weights_gb for s in ("text_encoder", "prior", "decoder", "upsampler_256"))
    assert 6.0 < karlo < 7.5
    # The x4 VAE decodes a 1024 px image in fp32 in about 3 GiB of activations.
    assert 2.7 < profile.stages["upsampler_1024"].activation_gb_per_image / costs.ACTIVATION_MARGIN < 3.3
    assert profile.gpu == costs.gpu_kind(costs.REFERENCE_GPU)
    assert costs.profile_costs("karlo") == {n: c.seconds_per_image for n, c in profile.stages.items()}


# ---------------------------------------------------------------- time model: the SD table it is fitted to


def test_constants_fit_the_stable_diffusion_table():
    fit = costs.reference_fit()
    assert costs.UTILIZATION == pytest.approx(fit["utilization"], rel=0.02)
    assert costs.KERNEL_OVERHEAD_S == pytest.approx(fit["kernel_overhead_s"], rel=0.02)
    a100 = costs.gpu_kind("a100-40gb")
    predicted = costs.StageCost(
        seconds_per_image=fit["flops_per_image"] / (a100.peak_flops("fp16") * costs.UTILIZATION),
        batch_overhead_s=fit["kernels_per_batch"] * costs.KERNEL_OVERHEAD_S)
    for batch in (1, 64):
        measured = costs.SD_REFERENCE_IMAGES_PER_S[batch]
        assert batch / predicted.batch_seconds(batch) == pytest.approx(measured, rel=0.10)


def test_batch_time_and_memory_arithmetic():
    cost = costs.StageCost(seconds_per_image=0.5, batch_overhead_s=2.0, weights_gb=3.0, activation_gb_per_image=0.25)
    assert cost.batch_seconds(4) == 4.0
    assert cost.seconds_per_image_at(4) == 1.0
    assert cost.memory_gb(8) == 5.0
    a, c = costs.fit_batch_times({1: 1 / 3.0, 4: 4 / 6.0})  # t(1) = 3, t(4) = 6
    assert (a, c) == (pytest.approx(2.0), pytest.approx(1.0))


# ---------------------------------------------------------------- GPU kinds and profiles on them


def test_gpu_kinds_and_scaling_to_another_kind():
    for name in ("t4", "a10g", "l4", "a100-40gb", "a100-80gb", "h100-80gb"):
        assert costs.gpu_kind(name).name == name
    with pytest.raises(ValueError, match="unknown GPU kind 'a100'.*a100-40gb.*h100-80gb"):
        costs.gpu_kind("a100")
    a100, h100 = costs.gpu_kind("a100-40gb"), costs.gpu_kind("h100-80gb")
    cost = costs.StageCost(seconds_per_image=1.0, batch_overhead_s=0.3, weights_gb=2.0, activation_gb_per_image=0.5)
    profile = costs.CostProfile(a100, {"decoder": cost}, "test")
    moved = profile.on(h100)
    assert moved.gpu == h100 and "a100-40gb" in moved.source
    assert moved.stages["decoder"].seconds_per_image == pytest.approx(312 / 989)
    assert moved.stages["decoder"].batch_overhead_s == pytest.approx(0.3 * 312 / 989)
    assert moved.stages["decoder"].memory_gb(4) == cost.memory_gb(4)
    assert moved.on(a100).stages["decoder"].seconds_per_image == pytest.approx(1.0)
    assert profile.on(a100) is profile


# ---------------------------------------------------------------- JSON profiles


def test_json_profile_round_trip(tmp_path):
    profile = costs.CostProfile(costs.gpu_kind("l4"), {
        "prior": costs.StageCost(0.1, 0.2, 1.9, 0.01),
        "upsampler_1024": costs.StageCost(seconds_per_image=20.0, weights_gb=1.7)}, "measured on an L4")
    path = str(tmp_path / "profile.json")
    costs.save_profile(profile, path)
    loaded = costs.load_profile(path)
    assert (loaded.gpu, loaded.stages, loaded.source) == (profile.gpu, profile.stages, profile.source)
    # A device outside GPU_KINDS travels as its fields.
    odd = costs.CostProfile(costs.GpuKind("rtx-4090", 24, 165.0), profile.stages, "measured on a 4090")
    costs.save_profile(odd, path)
    assert costs.load_profile(path).gpu == odd.gpu


def test_json_profile_missing_fields_default_to_zero(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"gpu": "t4", "stages": {"decoder": {"seconds_per_image": 2}}}))
    profile = costs.load_profile(str(path))
    assert profile.stages == {"decoder": costs.StageCost(seconds_per_image=2.0)}
    assert profile.gpu.name == "t4" and str(path) in profile.source


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    (json.dumps([1, 2]), "expected a JSON object"),
    (json.dumps({"gpu": "v100", "stages": {}}), "unknown gpu 'v100'; valid kinds: t4"),
    (json.dumps({"gpu": "t4", "stages": {"decodr": {}}}), "unknown stage 'decodr'; stages are text_encoder"),
    (json.dumps({"gpu": "t4", "stages": {"decoder": {"seconds": 1}}}), "stages.decoder has unknown field 'seconds'"),
    (json.dumps({"gpu": "t4", "stages": {"decoder": {"weights_gb": -1}}}), "stages.decoder.weights_gb must be a num"),
    (json.dumps({"gpu": "t4", "stages": {}, "extra": 1}), "unknown key 'extra'"),
])
def test_json_profile_errors_are_one_line(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as caught:
        costs.load_profile(str(path))
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_unknown_profile_names_and_missing_files():
    with pytest.raises(ValueError, match="unknown cost profile 'dalle3': use one of dalle2, karlo"):
        costs.load_profile("dalle3")
    with pytest.raises(ValueError, match="cannot be read"):
        costs.load_profile("/nonexistent/profile.json")


# ---------------------------------------------------------------- a run's own checkpoints


def test_checkpoint_profile_of_the_tiny_preset(tiny_models):
    def profile(*sets):
        overrides = [f"models.{k}={v}" for k, v in tiny_models.items()] + list(sets)
        return costs.checkpoint_profile(load_config(None, overrides, input_path="in", output_path="out"))

    base = profile()
    assert set(base.stages) == {"text_encoder", "prior", "decoder", "upsampler_256", "upsampler_1024", "reranker"}
    for name, cost in base.stages.items():
        assert cost.seconds_per_image > 0 and cost.batch_overhead_s > 0 and cost.weights_gb > 0, name
    # Guidance is decided once for prior and decoder: the decoder's scale alone keeps the prior guided.
    # best_of samples that many embeddings per image; fp32 doubles the weights' bytes.
    changed = profile("stages.prior.guidance_scale=1", "prior.best_of=3", "stages.decoder.dtype=fp32")
    assert changed.flops_per_image["prior"] == pytest.approx(3 * base.flops_per_image["prior"])
    assert changed.stages["decoder"].weights_gb == pytest.approx(2 * base.stages["decoder"].weights_gb)
    assert not costs.UnclipSettings(prior_guidance_scale=1, decoder_guidance_scale=1).unclip_guidance
    estimated = costs.estimated_costs(load_config(None, [f"models.{k}={v}" for k, v in tiny_models.items()],
                                                  input_path="in", output_path="out"))
    assert estimated.keys() == base.stages.keys() and all(v > 0 for v in estimated.values())


def test_dalle2_models_have_the_papers_sizes():
    models = costs.dalle2_models()

    def billions(*names):
        return sum(costs._params(models[n].build("fp16")) for n in names) / 1e9

    assert billions("prior") == pytest.approx(1.0, rel=0.1)
    assert billions("decoder", "decoder_text") == pytest.approx(3.5, rel=0.1)
    assert billions("upsampler_256") == pytest.approx(0.7, rel=0.1)
    assert billions("upsampler_1024") == pytest.approx(0.3, rel=0.15)
