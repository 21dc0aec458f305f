"""The stage registry: every stage name of the config mapped to the actor class that runs it."""

from __future__ import annotations

from actors.base import StageActor
from actors.decoder import DecoderActor
from actors.image_encoder import ImageEncoderActor
from actors.prior import PriorActor
from actors.reranker import RerankerActor
from actors.text_encoder import TextEncoderActor
from actors.upsampler_256 import Upsampler256Actor
from actors.upsampler_1024 import Upsampler1024Actor
from pipeline.config import STAGE_NAMES

STAGE_ACTORS: dict[str, type[StageActor]] = {actor.name: actor for actor in (
    TextEncoderActor, PriorActor, DecoderActor, Upsampler256Actor, Upsampler1024Actor, RerankerActor,
    ImageEncoderActor)}
if tuple(sorted(STAGE_ACTORS)) != tuple(sorted(STAGE_NAMES)):
    raise ImportError(f"stage actors {sorted(STAGE_ACTORS)} do not match the configured stages {sorted(STAGE_NAMES)}")
