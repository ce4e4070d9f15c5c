"""One run, fully resolved: :class:`RunConfig`, and the run id that names its folder by content."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, Field, model_validator

from depthbench.architecture import resolve_block
from depthbench.config.rules import family_problem
from depthbench.config.schema import DatasetConfig, ModelConfig, Section, SuccessConfig, TrainConfig, Version
from depthbench.errors import DepthbenchError
from depthbench.families import FAMILIES, with_defaults


class RunConfig(Section):
    """Everything one training run needs, fully resolved; written to the run's ``config.yaml``."""

    name: str
    version: Version
    depth: int = Field(gt=0)
    seed: int = Field(ge=0)
    dataset: DatasetConfig = DatasetConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    success: SuccessConfig = SuccessConfig()

    @model_validator(mode="before")
    @classmethod
    def _resolve_defaults(cls, data: Any) -> Any:
        # The unit's, the family's and the optimizer's defaults go under what the run wrote; the resolved
        # values are what its config.yaml keeps. Sections given as objects count what was set on them as written.
        if not isinstance(data, dict):
            return data
        data = {k: v.model_dump(exclude_unset=True) if isinstance(v, BaseModel) else v for k, v in data.items()}
        return with_defaults(data)

    @model_validator(mode="after")
    def _fits_its_family(self) -> RunConfig:
        if problem := family_problem(self):
            raise ValueError(problem)
        if self.model.family == "resnet":
            try:
                resolve_block(self.depth, self.model.block)
            except DepthbenchError as err:
                raise ValueError(str(err)) from None
        return self

    @property
    def blocks(self) -> tuple[str, int]:
        """What the run's units are and how many a stage has: (basic | bottleneck, n) for a ResNet,
        (transformer, depth) for a ViT, whose one stage is its ``depth`` blocks."""
        if self.model.family == "vit":
            return "transformer", self.depth
        return resolve_block(self.depth, self.model.block)

    @property
    def unit(self) -> str:
        """The unit this run builds: ``model.unit``, else the one its family's version implies."""
        return FAMILIES[self.model.family].unit_of(self.version, self.model.unit)

    @property
    def run_id(self) -> str:
        # A family other than the first says so in the folder name: runs/ lists what each folder trained.
        family = "" if self.model.family == "resnet" else f"{self.model.family}-"
        return f"{family}{self.version}-d{self.depth}-s{self.seed}-{self.content_hash}"

    @property
    def content_hash(self) -> str:
        """Short hash of every setting that changes what is trained (not where or how it is logged).

        A setting added after run ids existed is hashed only when it differs from the value that means
        what every earlier run did (:data:`ADDED_SETTINGS`), so runs/ folders made before it keep their ids.
        The hash depends on the three sections alone, so runs that share them (a grid's seeds) hash once.
        """
        dataset, model, train = self.dataset, self.model, self.train
        key = (id(dataset), id(model), id(train))
        known = _HASHES.get(key)
        if known is not None and known[0] is dataset and known[1] is model and known[2] is train:
            return known[3]
        digest = self._hash()
        if len(_HASHES) >= _HASHES_KEPT:
            del _HASHES[next(iter(_HASHES))]
        _HASHES[key] = (dataset, model, train, digest)  # holding the sections keeps their ids from being reused
        return digest

    def _hash(self) -> str:
        ident = self.model_dump(mode="json", exclude={"name", "version", "depth", "seed", "success"})
        for key in EXECUTION_KEYS:
            ident["train"].pop(key)
        for key, before in ADDED_SETTINGS.items():
            *parents, last = key.split(".")
            section = ident
            for part in parents:
                section = section[part]
            if section[last] == before:
                del section[last]
        blob = json.dumps(ident, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:8]


# Content hashes by the identity of the sections hashed, oldest first: a sweep's runs share section objects.
_HASHES: dict[tuple[int, int, int], tuple[Any, Any, Any, str]] = {}
_HASHES_KEPT = 4096


# Settings that change where or how a run executes and logs, never what it learns;
# changing them must not orphan finished results, so they stay out of the run id.
EXECUTION_KEYS = (
    "device", "eval_every", "log_every", "eval_batch_size", "checkpoint_every", "keep_checkpoint", "compile",
    "diagnose_steps", "cuda_graph",
)


# Settings added after run ids were first written, with the value (as JSON) that does what runs before
# them did: at that value a setting stays out of the id. A new setting that changes what is trained
# must be added here, or every existing runs/ folder would look unfinished.
ADDED_SETTINGS: dict[str, Any] = {
    "model.family": "resnet", "model.patch": None, "model.heads": None, "model.mlp_ratio": None,
    "model.pool": None, "train.optimizer": "sgd", "train.betas": None, "train.eps": None,
    "train.decay_all": True, "train.clip_grad_norm": None, "train.scalar_lr": 1.0, "train.schedule": "multistep",
    "train.warmup.shape": "constant", "dataset.flip": True, "dataset.val_split": None,
}
