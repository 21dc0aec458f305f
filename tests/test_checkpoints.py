"""Checkpoint sources: real from_pretrained loading, clear errors for broken layouts, pickle opt-in, node cache."""

from __future__ import annotations

import shutil
import threading

import fsspec
import pytest
import torch

from pipeline import checkpoints
from pipeline.checkpoints import CheckpointError


def test_tiny_checkpoints_load_with_their_own_classes(tiny_models):
    from diffusers import PriorTransformer, UnCLIPScheduler
    from transformers import CLIPModel

    prior = checkpoints.load(tiny_models["unclip"], "unclip", "prior")
    assert isinstance(prior, PriorTransformer)
    assert torch.all(prior.clip_std == 1), "a random prior needs clip_std = 1 or its embeddings collapse"
    assert isinstance(checkpoints.load(tiny_models["unclip"], "unclip", "decoder_scheduler"), UnCLIPScheduler)
    assert type(checkpoints.load(tiny_models["upsampler_1024"], "upsampler_1024", "scheduler")).__name__ == "DDIMScheduler"
    assert isinstance(checkpoints.load(tiny_models["clip"], "clip", "model"), CLIPModel)
    for layout in ("unclip", "upsampler_1024", "clip"):
        checkpoints.validate(tiny_models[layout], layout)


@pytest.fixture
def broken(tiny_models, tmp_path):
    target = tmp_path / "karlo"
    shutil.copytree(tiny_models["unclip"], target)
    return target


def test_missing_weights_name_path_and_part(broken):
    (broken / "decoder" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"karlo/decoder .*missing diffusion_pytorch_model.safetensors"):
        checkpoints.validate(str(broken), "unclip")


def test_missing_folder_and_malformed_config(broken):
    shutil.rmtree(broken / "super_res_last")
    with pytest.raises(CheckpointError, match=r"folder super_res_last/ is missing"):
        checkpoints.validate(str(broken), "unclip")
    shutil.copytree(broken / "super_res_first", broken / "super_res_last")
    (broken / "prior" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"karlo/prior .*config.json is not valid JSON"):
        checkpoints.validate(str(broken), "unclip")


def test_nonexistent_source(tmp_path):
    with pytest.raises(CheckpointError, match=r"does-not-exist does not exist"):
        checkpoints.validate(str(tmp_path / "does-not-exist"), "unclip")


def test_pickle_weights_need_explicit_opt_in(broken):
    from safetensors.torch import load_file

    weights = broken / "prior" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), broken / "prior" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"only pickle weights .*models.allow_pickle=true"):
        checkpoints.validate(str(broken), "unclip")
    checkpoints.validate(str(broken), "unclip", allow_pickle=True)
    prior = checkpoints.load(str(broken), "unclip", "prior", allow_pickle=True)
    assert torch.all(prior.clip_std == 1)


def test_remote_source_is_copied_once_per_node_under_concurrency(tiny_models, monkeypatch, tmp_path):
    memory = fsspec.filesystem("memory")
    memory.put(tiny_models["clip"], "/ckpt/clip", recursive=True)
    monkeypatch.setenv("UNCLIP_RAY_CACHE", str(tmp_path / "cache"))
    downloads = []
    original = type(memory).get_file

    def counting_get_file(self, *args, **kwargs):
        downloads.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(memory), "get_file", counting_get_file)
    results = []
    threads = [threading.Thread(target=lambda: results.append(checkpoints.local_dir("memory://ckpt/clip", "clip")))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and len(results) == 4
    assert len(downloads) == len(set(downloads)), "each file is fetched once"
    assert checkpoints.load(results[0], "clip", "model") is not None
    leftovers = [p.name for p in (tmp_path / "cache" / "models").iterdir() if "partial" in p.name]
    assert leftovers == []


def test_unknown_builtin():
    with pytest.raises(CheckpointError, match="unknown built-in checkpoint tiny://huge"):
        checkpoints.validate("tiny://huge", "unclip")


def counting_downloads(monkeypatch, memory) -> list[str]:
    downloads = []
    original = type(memory).get_file

    def counting_get_file(self, *args, **kwargs):
        downloads.append(args[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(memory), "get_file", counting_get_file)
    return downloads


def test_a_checkpoint_republished_at_the_same_url_is_fetched_again_and_an_unchanged_one_is_not(
        tiny_models, monkeypatch, tmp_path):
    import json
    import uuid

    from safetensors.torch import load_file, save

    memory = fsspec.filesystem("memory")
    root = f"/republished-{uuid.uuid4().hex[:8]}/clip"
    memory.put(tiny_models["clip"], root, recursive=True)
    url = f"memory://{root}"
    monkeypatch.setenv("UNCLIP_RAY_CACHE", str(tmp_path / "cache"))
    downloads = counting_downloads(monkeypatch, memory)

    first = checkpoints.local_dir(url, "clip")
    scale = checkpoints.load(first, "clip", "model").logit_scale.item()
    copied = len(downloads)
    assert copied > 0
    assert checkpoints.local_dir(url, "clip") == first and len(downloads) == copied, "unchanged: no second copy"

    weights = load_file(f"{tiny_models['clip']}/model.safetensors")
    weights["logit_scale"] = torch.tensor(scale + 1.5)  # same size: only the storage's metadata tells it apart
    memory.pipe(f"{root}/model.safetensors", save(weights))
    second = checkpoints.local_dir(url, "clip")
    assert second != first and len(downloads) > copied
    assert checkpoints.load(second, "clip", "model").logit_scale.item() == pytest.approx(scale + 1.5)

    config = json.loads(memory.cat_file(f"{root}/config.json"))
    config["logit_scale_init_value"] = 3.0
    memory.pipe(f"{root}/config.json", json.dumps(config).encode())
    third = checkpoints.local_dir(url, "clip")
    assert third not in (first, second)
    assert checkpoints.load(third, "clip", "model").config.logit_scale_init_value == 3.0
    again = len(downloads)
    assert checkpoints.local_dir(url, "clip") == third and len(downloads) == again


def test_a_local_checkpoint_is_used_in_place(tiny_models, monkeypatch, tmp_path):
    monkeypatch.setenv("UNCLIP_RAY_CACHE", str(tmp_path / "cache"))
    assert checkpoints.local_dir(tiny_models["clip"], "clip") == tiny_models["clip"]
    assert checkpoints.local_dir(f"file://{tiny_models['clip']}", "clip") == tiny_models["clip"]
    assert not (tmp_path / "cache").exists()


def test_max_noise_level_is_read_from_the_checkpoint_wherever_it_is(tiny_models):
    import json
    import uuid

    assert checkpoints.max_noise_level(tiny_models["upsampler_1024"]) == 350
    assert checkpoints.max_noise_level("tiny://upsampler_1024") == 350
    memory = fsspec.filesystem("memory")
    root = f"/noise-{uuid.uuid4().hex[:8]}/x4"
    memory.put(tiny_models["upsampler_1024"], root, recursive=True)
    index = json.loads(memory.cat_file(f"{root}/model_index.json"))
    memory.pipe(f"{root}/model_index.json", json.dumps({**index, "max_noise_level": 100}).encode())
    assert checkpoints.max_noise_level(f"memory://{root}") == 100
    checkpoints.check_noise_level(f"memory://{root}", 100)
    with pytest.raises(CheckpointError, match=r"^stages.upsampler_1024.noise_level=101 is above the maximum 100 of "
                                              r"checkpoint memory://.*/x4 .*set stages.upsampler_1024.noise_level "
                                              r"to at most 100"):
        checkpoints.check_noise_level(f"memory://{root}", 101)
    memory.rm(f"{root}/model_index.json")
    assert checkpoints.max_noise_level(f"memory://{root}") == checkpoints.DEFAULT_MAX_NOISE_LEVEL == 350


def hub_cache(root, repo: str, snapshot_of: str, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face Hub cache on disk, as huggingface_hub lays it out, holding a copy of a local checkpoint."""
    folder = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(snapshot_of, folder / "snapshots" / commit)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return commit


def test_a_hub_repo_id_loads_from_the_hub_cache_offline_and_gives_the_same_images(tiny_models, tmp_path, monkeypatch):
    import dataclasses

    import numpy as np

    from pipeline.config import load_config
    from pipeline.run import pin_model_revisions
    from tests.conftest import FAST_STEPS, run_in_process

    commit = hub_cache(tmp_path / "hub", "tiny-org/karlo", tiny_models["unclip"])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    assert checkpoints.hub_repo("tiny-org/karlo") == ("tiny-org/karlo", "main")
    assert checkpoints.hub_repo("tiny-org/karlo@v1") == ("tiny-org/karlo", "v1")
    assert checkpoints.hub_repo("s3://tiny-org/karlo") is None

    sets = FAST_STEPS + ["models.upsampler_1024=null", "models.clip=null"]
    from_hub = load_config(None, sets + ["models.unclip=tiny-org/karlo"], input_path="u", output_path="u")
    checkpoints.validate(from_hub.models.unclip, "unclip")
    pinned = pin_model_revisions(from_hub)
    assert pinned.models.unclip == f"tiny-org/karlo@{commit}"  # what the run records and every actor loads
    local = dataclasses.replace(from_hub, models=dataclasses.replace(from_hub.models, unclip=tiny_models["unclip"]))
    prompts, seeds = ["a red fox", "a blue bird"], [3, 4]
    assert np.array_equal(run_in_process(pinned, prompts, seeds)["image"], run_in_process(local, prompts, seeds)["image"])

    with pytest.raises(CheckpointError, match=r"checkpoint tiny-org/missing: Hugging Face Hub repo tiny-org/missing at "
                                              r"revision main is not in the local Hub cache .* HF_HUB_OFFLINE is set") as info:
        checkpoints.validate("tiny-org/missing", "unclip")
    assert "\n" not in str(info.value)
