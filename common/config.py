"""Typed run configuration: one pydantic schema, loaded from TOML, overridden by CLI flags.

A run is described by :class:`RunConfig`. It is validated before anything starts, and a
validation error names the field, where the value came from and the allowed values.
:class:`AppConfig` is what the Flower apps receive: the run config plus the site list.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Generic, Literal, NamedTuple, TypeVar, overload

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedscan.common.errors import FedscanError
from fedscan.common.secagg_numerics import quantization_range

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The names a user can choose. Later issues add to these tuples and to the registries.
TASKS: tuple[str, ...] = ("segmentation", "classification")
MODELS: tuple[str, ...] = ("unet", "segnet", "densenet121", "resnet18", "mil")
STRATEGIES: tuple[str, ...] = (
    "fedavg",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedprox",
    "fedmedian",
    "fedtrimmedavg",
    "fedbn",
)
# aggregators that need every site's own update: no robustness is left on SecAgg+'s single sum
ROBUST_STRATEGIES: tuple[str, ...] = ("fedmedian", "fedtrimmedavg")

# Which models serve which task, and the model a task gets when none is named.
TASK_MODELS: dict[str, tuple[str, ...]] = {
    "segmentation": ("unet", "segnet"),
    "classification": ("densenet121", "resnet18", "mil"),
}
DEFAULT_MODEL: dict[str, str] = {"segmentation": "unet", "classification": "mil"}
# Models that classify whole exams (bags of images) rather than single images.
EXAM_MODELS: tuple[str, ...] = ("mil",)
# Settings a model gets unless the config file or a flag gives them. Tuned on the synthetic
# hospitals for 3 rounds: the exam classifier learns from one label per exam and needs more
# optimizer steps (small batches of exams, more local epochs); the classifiers work at 64 px.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "mil": {"image_size": 64, "batch_size": 2, "local_epochs": 12},
    "densenet121": {"image_size": 64, "batch_size": 16, "local_epochs": 2},
    "resnet18": {"image_size": 64, "batch_size": 16, "local_epochs": 2},
}

# The key under [tool.flwr.app.config] that carries the AppConfig as JSON.
RUN_CONFIG_KEY = "fedscan-config"


class SecAggPlan(NamedTuple):
    """A round's SecAgg+ parameters."""

    shares: int
    threshold: int
    quantization_range: int


def _choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    name = value.strip().lower()
    if name not in allowed:
        raise ValueError(f"unknown {what} '{value}'; allowed: {', '.join(allowed)}")
    return name


_GROUP_CONFIG = ConfigDict(extra="forbid", validate_assignment=True)


class SecureAggregationSettings(BaseModel):
    """Secure aggregation (SecAgg+): flat keys ``secagg`` and ``secagg_<field>``."""

    model_config = _GROUP_CONFIG

    enabled: bool = Field(
        default=False, description="secure aggregation (SecAgg+): the server learns only the sum"
    )
    shares: int | None = Field(
        default=None,
        ge=2,
        le=1024,
        description="SecAgg+: sites each site shares its secrets with (default: all)",
    )
    threshold: int | None = Field(
        default=None,
        ge=2,
        le=1024,
        description="SecAgg+: shares needed to reconstruct (default: a majority of the shares)",
    )
    clipping_range: float = Field(
        default=8.0, gt=0, le=1e6, description="SecAgg+: updates are clipped to +-this"
    )
    quantization_range: int | None = Field(
        default=None,
        ge=2**8,
        le=2**31,
        description="SecAgg+: quantization levels (default: the most the 2^32 modulus allows for the "
        "round's sites)",
    )
    max_weight: float = Field(
        default=10_000.0,
        ge=1,
        description="SecAgg+: above every site's example count (weights are count / max_weight)",
    )
    timeout: float = Field(
        default=600.0,
        gt=0,
        le=7 * 86400,
        description="SecAgg+: seconds each protocol stage waits (the stage that trains waits "
        "round_timeout, if longer)",
    )

    def plan(self, n_sites: int, *, strict: bool = False) -> SecAggPlan:
        """SecAgg+ parameters for a round of ``n_sites``.

        - Shares: with everyone by default. Fewer (Bell et al.'s neighbourhoods) are rounded up
          to an odd number of at least 3, as Flower's neighbourhoods need.
        - Threshold: by default a majority of the shares; one given must be more than half of
          them (Bell et al. 2020 need t > n/2) and, with fewer shares than sites, fewer than them.
        - Quantization: as fine as the sum of ``n_sites`` updates allows. A given level count too
          large for this many sites is lowered to what they allow, or refused when ``strict``.
        """
        if n_sites < 2:
            raise ValueError(
                f"secure aggregation needs at least 2 sites in a round, got {n_sites} "
                "(for a single site, turn it off: --no-secagg or secagg = false)"
            )
        shares = min(self.shares or n_sites, n_sites)
        if shares < n_sites:
            shares = max(3, shares + (1 - shares % 2))  # odd, at least 3
            shares = min(shares, n_sites)
        threshold = self.threshold or max(2, shares // 2 + 1)
        if threshold > shares:
            raise ValueError(
                f"secagg_threshold {threshold} exceeds the {shares} shares of a round of {n_sites} sites"
            )
        if 2 * threshold <= shares:
            raise ValueError(f"secagg_threshold {threshold} must be more than half of the {shares} shares")
        if shares < n_sites and threshold == shares:
            raise ValueError(
                f"secagg_threshold must be below secagg_shares ({shares}) when fewer than all sites share"
            )
        most = quantization_range(n_sites)
        q_range = self.quantization_range or most
        if q_range > most:
            if strict:
                raise ValueError(
                    f"secagg_quantization_range {q_range} is too large for {n_sites} "
                    f"sites: their sum "
                    f"must stay below 2^32, so at most {most}"
                )
            q_range = most
        return SecAggPlan(shares, threshold, q_range)


class AggregationSettings(BaseModel):
    """The server's strategy and how it weights the sites (flat keys: the field names)."""

    model_config = _GROUP_CONFIG

    strategy: str = Field(default="fedavg", description=f"one of: {', '.join(STRATEGIES)}")
    proximal_mu: float = Field(
        default=0.01, ge=0, le=100, description="fedprox: weight µ of the proximal term µ/2·‖w − w_global‖²"
    )
    server_learning_rate: float | None = Field(
        default=None,
        gt=0,
        le=10,
        description="fedavgm, fedadam, fedyogi: server learning rate (default 1.0 "
        "for fedavgm, 0.01 otherwise)",
    )
    server_momentum: float = Field(default=0.9, ge=0, lt=1, description="fedavgm: server momentum")
    server_tau: float = Field(default=1e-3, gt=0, le=1, description="fedadam, fedyogi: adaptivity τ")
    trimmed_fraction: float | None = Field(
        default=None,
        ge=0,
        lt=0.5,
        description="fedtrimmedavg: fraction of the sites' values cut at each end, per coordinate "
        "(default: one site's)",
    )
    quality_weighting: bool = Field(
        default=False,
        description="weight sites by example count x data-quality factor (see quality_snr_reference)",
    )
    quality_snr_reference: float = Field(
        default=30.0, gt=0, le=1e4, description="quality weighting: a site at or above this SNR gets factor 1"
    )
    quality_floor: float = Field(
        default=0.25, gt=0, le=1, description="quality weighting: the lowest quality factor"
    )
    quality_max_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="quality weighting: the largest share of the aggregate one site may hold",
    )

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        return _choice(v, STRATEGIES, "strategy")


class DataSettings(BaseModel):
    """Where a site's data is and how it is read and preprocessed (flat keys: the field names)."""

    model_config = _GROUP_CONFIG

    data_root: Path | None = Field(default=None, description="folder of site folders")
    cache_dir: Path | None = Field(default=None, description="preprocessed-data cache")
    workers: int = Field(
        default=1,
        ge=0,
        le=64,
        description="worker processes that read and preprocess a site's DICOM on a cold "
        "cache "
        "(0: one per core, at most 4); a machine-local setting",
    )
    val_fraction: float = Field(default=0.25, gt=0.0, lt=1.0, description="patients held out")
    image_size: int = Field(default=96, ge=32, le=1024, description="square side, multiple of 16")
    pixel_spacing: float | None = Field(
        default=None,
        gt=0.0,
        le=50.0,
        description="resample in-plane to this spacing (mm), then centre-crop or pad to image_size; "
        "unset: pad to square and resize to image_size",
    )
    ct_window: tuple[float, float] = Field(default=(40.0, 400.0), description="(level, width) HU")
    ct_normalization: Literal["window", "foreground"] = Field(
        default="window",
        description="CT intensities: the HU window, or a z-score over each series' body (foreground), "
        "which undoes differences in scanner calibration between sites",
    )
    intensity_percentiles: tuple[float, float] = Field(
        default=(0.5, 99.5), description="MR and other non-CT series: clip to these percentiles, then z-score"
    )

    @field_validator("image_size")
    @classmethod
    def _image_size(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"must be a multiple of 16, got {v}")
        return v

    @field_validator("ct_window")
    @classmethod
    def _window(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[1] <= 0:
            raise ValueError(f"window width must be positive, got {v[1]}")
        return v

    @field_validator("intensity_percentiles")
    @classmethod
    def _percentiles(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] < v[1] <= 100.0:
            raise ValueError(f"needs 0 <= low < high <= 100, got {list(v)}")
        return v


class NetworkSettings(BaseModel):
    """The model and its architecture (flat keys: the field names)."""

    model_config = _GROUP_CONFIG

    model: str = Field(
        default="unet", description=f"one of: {', '.join(MODELS)}; default: unet or mil by task"
    )
    base_channels: int = Field(default=16, ge=4, le=256, description="U-Net and MIL encoder width")
    unet_depth: int = Field(default=4, ge=1, le=6, description="U-Net pooling stages")
    segnet_width: float = Field(
        default=1.0, gt=0.0, le=2.0, description="SegNet channel multiplier; 1.0 = VGG16"
    )
    num_classes: int = Field(
        default=2, ge=2, le=64, description="classes (for segmentation, background included)"
    )
    mil_chunk_size: int = Field(default=32, ge=1, le=4096, description="images encoded at once per exam")

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return _choice(v, MODELS, "model")


# RunConfig's groups: attribute (and TOML table) name -> settings model
GROUPS: dict[str, type[BaseModel]] = {
    "secure_aggregation": SecureAggregationSettings,
    "aggregation": AggregationSettings,
    "data": DataSettings,
    "network": NetworkSettings,
}
# a flat setting (TOML key, CLI flag, ``cfg.<name>``) -> (group, field); filled by the _InGroup declarations
_GROUP_OF: dict[str, tuple[str, str]] = {}

_T = TypeVar("_T")


class _InGroup(Generic[_T]):
    """A flat setting of :class:`RunConfig` that lives in one of its groups: ``cfg.image_size`` reads
    ``cfg.data.image_size``, the one place the value is kept. The flat name is also the TOML key and
    the CLI flag (``--image-size``), as in the files of runs made before the groups."""

    def __init__(self, group: str, field: str) -> None:
        if field not in GROUPS[group].model_fields:
            raise TypeError(f"{GROUPS[group].__name__} has no field {field}")
        self.group, self.field = group, field

    def __set_name__(self, owner: type, name: str) -> None:
        _GROUP_OF[name] = (self.group, self.field)

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _InGroup[_T]: ...

    @overload
    def __get__(self, obj: object, owner: type | None = None) -> _T: ...

    def __get__(self, obj: object | None, owner: type | None = None) -> _InGroup[_T] | _T:
        if obj is None:
            return self
        value: _T = getattr(getattr(obj, self.group), self.field)
        return value

    def __set__(self, obj: object, value: object) -> None:
        raise AttributeError(
            f"set {self.group}.{self.field}, the group's field, or make a copy with model_copy"
        )


def flat_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as flat keys: a group's table (``[data]``, or a group's dump) becomes its flat keys;
    keys a group does not know stay in its table, for the group to refuse. A setting given both flat
    and in its group is an error."""
    flat: dict[str, Any] = {}
    given_in: dict[str, str] = {}
    for key, value in values.items():
        if key in GROUPS and isinstance(value, (Mapping, BaseModel)):
            table = value.model_dump(exclude_unset=True) if isinstance(value, BaseModel) else value
            unknown = {}
            for field, v in table.items():
                name = _FLAT_NAME.get((key, str(field)))
                if name is None:
                    unknown[field] = v
                    continue
                if name in flat:
                    raise ValueError(f"{name} is given twice: as {name} and as {key}.{field}")
                flat[name], given_in[name] = v, key
            if unknown:
                flat[key] = unknown
        else:
            if key in given_in:
                raise ValueError(f"{key} is given twice: as {key} and in {given_in[key]}")
            flat[key] = value
    return flat


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat settings as RunConfig's fields: each grouped one into its group's table."""
    out: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
    for key, value in flat.items():
        if key in _GROUP_OF:
            group, field = _GROUP_OF[key]
            tables[group][field] = value
        elif key in GROUPS and isinstance(value, Mapping):  # what flat_settings left: unknown keys
            tables[key].update(value)
        else:
            out[key] = value
    return {**out, **tables}


class RunConfig(BaseModel):
    """Everything that defines a federated run.

    The settings come in groups (``secure_aggregation``, ``aggregation``, ``data``, ``network``)
    besides the run-wide ones. Every setting also has a flat name, which is its TOML key, its CLI
    flag and an attribute (``cfg.image_size`` is ``cfg.data.image_size``); a TOML file may give a
    group as a table instead (``[data]`` with ``image_size = 64``). Written configs are flat
    (:meth:`to_toml_dict`), as before the groups.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, ignored_types=(_InGroup,))

    task: str = Field(default="segmentation", description=f"one of: {', '.join(TASKS)}")
    fault_site: str | None = Field(
        default=None, description="simulation only: the site whose updates are made faulty"
    )
    fault_kind: Literal["scale", "nan"] | None = Field(
        default=None,
        description="simulation only: scale (the update times fault_scale) or nan (all values NaN)",
    )
    fault_scale: float = Field(default=100.0, description="simulation only: the factor of a 'scale' fault")
    rounds: int = Field(default=3, ge=1, le=10_000, description="federated rounds")
    local_epochs: int = Field(
        default=6,
        ge=0,
        le=1000,
        description="local epochs per round (0: no training, the sites send the global weights back: "
        "times the protocol alone)",
    )
    learning_rate: float = Field(default=1e-3, gt=0, le=1.0, description="Adam learning rate")
    lr_schedule: Literal["constant", "cosine"] = Field(
        default="constant",
        description="the learning rate over the rounds: constant, or cosine decay to lr_final_fraction",
    )
    lr_final_fraction: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="cosine schedule: the last round's learning rate, as a fraction of learning_rate",
    )
    batch_size: int = Field(default=4, ge=1, le=4096)
    class_weights: list[float] | Literal["balanced"] | None = Field(
        default=None, description="classification loss weights per class, or 'balanced' (per site)"
    )
    explain_scores: bool = Field(
        default=True,
        description="final round: each site also computes the shareable explanation scores "
        "(uncertainty AUROC; Grad-CAM energy in the lesion)",
    )
    amp: bool = Field(default=True, description="mixed precision on CUDA (bf16 where supported)")
    channels_last: bool = Field(default=True, description="channels_last memory layout on CUDA")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    sites: int = Field(
        default=3,
        ge=1,
        le=64,
        description="synthetic hospitals in simulation; in deployment, the sites a run waits for",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output: Path = Field(default=Path("fedscan-out"), description="output folder")
    count_rounding: int = Field(
        default=1,
        ge=1,
        le=10_000,
        description="sites disclose their example count rounded up to a multiple of this",
    )
    wait_timeout: float = Field(
        default=600.0,
        gt=0,
        le=7 * 86400,
        description="seconds to wait for the sites a round needs before failing",
    )
    round_timeout: float = Field(
        default=3600.0, gt=0, le=7 * 86400, description="seconds a round waits for the sites' replies"
    )

    secure_aggregation: SecureAggregationSettings = Field(default_factory=SecureAggregationSettings)
    aggregation: AggregationSettings = Field(default_factory=AggregationSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    network: NetworkSettings = Field(default_factory=NetworkSettings)

    # the grouped settings by their flat names (typed as their group's fields; a unit test checks)
    secagg = _InGroup[bool]("secure_aggregation", "enabled")
    secagg_shares = _InGroup[int | None]("secure_aggregation", "shares")
    secagg_threshold = _InGroup[int | None]("secure_aggregation", "threshold")
    secagg_clipping_range = _InGroup[float]("secure_aggregation", "clipping_range")
    secagg_quantization_range = _InGroup[int | None]("secure_aggregation", "quantization_range")
    secagg_max_weight = _InGroup[float]("secure_aggregation", "max_weight")
    secagg_timeout = _InGroup[float]("secure_aggregation", "timeout")
    strategy = _InGroup[str]("aggregation", "strategy")
    proximal_mu = _InGroup[float]("aggregation", "proximal_mu")
    server_learning_rate = _InGroup[float | None]("aggregation", "server_learning_rate")
    server_momentum = _InGroup[float]("aggregation", "server_momentum")
    server_tau = _InGroup[float]("aggregation", "server_tau")
    trimmed_fraction = _InGroup[float | None]("aggregation", "trimmed_fraction")
    quality_weighting = _InGroup[bool]("aggregation", "quality_weighting")
    quality_snr_reference = _InGroup[float]("aggregation", "quality_snr_reference")
    quality_floor = _InGroup[float]("aggregation", "quality_floor")
    quality_max_share = _InGroup[float]("aggregation", "quality_max_share")
    data_root = _InGroup[Path | None]("data", "data_root")
    cache_dir = _InGroup[Path | None]("data", "cache_dir")
    workers = _InGroup[int]("data", "workers")
    val_fraction = _InGroup[float]("data", "val_fraction")
    image_size = _InGroup[int]("data", "image_size")
    pixel_spacing = _InGroup[float | None]("data", "pixel_spacing")
    ct_window = _InGroup[tuple[float, float]]("data", "ct_window")
    ct_normalization = _InGroup[Literal["window", "foreground"]]("data", "ct_normalization")
    intensity_percentiles = _InGroup[tuple[float, float]]("data", "intensity_percentiles")
    model = _InGroup[str]("network", "model")
    base_channels = _InGroup[int]("network", "base_channels")
    unet_depth = _InGroup[int]("network", "unet_depth")
    segnet_width = _InGroup[float]("network", "segnet_width")
    num_classes = _InGroup[int]("network", "num_classes")
    mil_chunk_size = _InGroup[int]("network", "mil_chunk_size")

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        return _choice(v, TASKS, "task")

    @model_validator(mode="before")
    @classmethod
    def _flat_keys_and_defaults(cls, data: Any) -> Any:
        """Flat keys and group tables both go into the groups. Before that, a model without a task
        gets its task; a task without a model its default model; a model its default settings, for
        the ones not given."""
        if not isinstance(data, Mapping):
            return data
        data = flat_settings(data)
        if data.get("task") is None and isinstance(data.get("model"), str):  # the model's task
            name = data["model"].strip().lower()
            data["task"] = next((t for t, models in TASK_MODELS.items() if name in models), None)
            if data["task"] is None:
                del data["task"]
        if data.get("model") is None and isinstance(data.get("task"), str):
            default = DEFAULT_MODEL.get(data["task"].strip().lower())
            if default:
                data["model"] = default
        if isinstance(data.get("model"), str):
            for key, value in MODEL_DEFAULTS.get(data["model"].strip().lower(), {}).items():
                if data.get(key) is None:
                    data[key] = value
        return _nested(data)

    def secagg_plan(self, n_sites: int, *, strict: bool = False) -> SecAggPlan:
        """SecAgg+ parameters for a round of ``n_sites`` (see :meth:`SecureAggregationSettings.plan`)."""
        return self.secure_aggregation.plan(n_sites, strict=strict)

    @field_validator("class_weights")
    @classmethod
    def _class_weights(cls, v: list[float] | str | None) -> list[float] | str | None:
        if isinstance(v, list) and any(not (w > 0 and w < float("inf")) for w in v):
            raise ValueError(f"class weights must be positive numbers, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.model not in TASK_MODELS[self.task]:
            raise ValueError(
                f"model '{self.model}' does not do {self.task}; for {self.task} choose one of: "
                f"{', '.join(TASK_MODELS[self.task])}"
            )
        factor = {"unet": 2**self.unet_depth, "segnet": 32}.get(self.model, 16)
        if self.image_size % factor:
            raise ValueError(
                f"image_size must be a multiple of {factor} for {self.model} "
                f"(it halves the image {factor.bit_length() - 1} times), got {self.image_size}"
            )
        if self.model == "unet" and self.image_size < 2 * factor:
            raise ValueError(
                f"image_size {self.image_size} is too small for a U-Net of depth {self.unet_depth}: "
                f"its deepest features would be 1 pixel; use at least {2 * factor} or a smaller unet_depth"
            )
        if isinstance(self.class_weights, list) and len(self.class_weights) != self.num_classes:
            raise ValueError(
                f"class_weights has {len(self.class_weights)} values but num_classes is {self.num_classes}"
            )
        if self.strategy == "fedtrimmedavg" and self.sites < 3:
            raise ValueError(f"fedtrimmedavg needs at least 3 sites to cut one at each end, got {self.sites}")
        if (
            self.strategy == "fedtrimmedavg"
            and self.trimmed_fraction is not None
            and int(self.trimmed_fraction * self.sites) == 0
        ):
            raise ValueError(
                f"trimmed_fraction {self.trimmed_fraction:g} cuts no site's values with {self.sites} sites "
                f"(it cuts int(fraction x sites) at each end): use at least {1 / self.sites:.3g}, or "
                f"leave it unset"
            )
        if (self.fault_site is None) != (self.fault_kind is None):
            raise ValueError(
                "fault_site and fault_kind go together: set both to make a site's updates faulty, or neither"
            )
        if self.fault_site is not None and self.secagg:
            raise ValueError(
                "fault injection works on plaintext updates: turn secure aggregation off (--no-secagg)"
            )
        if self.quality_weighting and self.strategy in ROBUST_STRATEGIES:
            raise ValueError(
                f"strategy {self.strategy} does not weight the sites: quality_weighting "
                f"has no effect "
                "with it; turn it off or choose an averaging strategy"
            )
        if self.secagg:  # the explicit SecAgg+ settings must fit the run's (minimum) number of sites
            self.secagg_plan(self.sites, strict=True)
            if self.strategy in ROBUST_STRATEGIES:
                raise ValueError(
                    f"strategy {self.strategy} needs each site's own update, and secure aggregation "
                    f"gives the server "
                    "only their sum: choose another strategy, or turn secure aggregation off (--no-secagg)"
                )
        return self

    def to_toml_dict(self) -> dict[str, Any]:
        """The config as plain flat TOML values (paths as strings, unset values left out): the form of
        run_config.toml, of checkpoints and of runs made before the groups, and what FedBN's run key
        hashes."""
        flat: dict[str, Any] = {}
        for key, value in json.loads(self.model_dump_json(exclude_none=True)).items():
            if key in GROUPS:
                flat.update({_FLAT_NAME[(key, field)]: v for field, v in value.items()})
            else:
                flat[key] = value
        return flat

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> RunConfig:
        """A copy with ``update`` applied, as pydantic's, but taking flat names too
        (``update={"data_root": ...}`` sets ``data.data_root``). Like pydantic's, it does not validate."""
        if not update:
            return super().model_copy(deep=deep)
        top: dict[str, Any] = {}
        tables: dict[str, dict[str, Any]] = {}
        for key, value in update.items():
            if key in _GROUP_OF:
                group, field = _GROUP_OF[key]
                tables.setdefault(group, {})[field] = value
            else:
                top[key] = value
        for group, fields in tables.items():
            base = top.get(group, getattr(self, group))
            top[group] = base.model_copy(update=fields, deep=deep)
        return super().model_copy(update=top, deep=deep)


# (group, field) -> its flat name
_FLAT_NAME: dict[tuple[str, str], str] = {where: name for name, where in _GROUP_OF.items()}
if len(_FLAT_NAME) != sum(len(m.model_fields) for m in GROUPS.values()):  # pragma: no cover
    raise TypeError("every field of RunConfig's groups needs one flat name in RunConfig")
# every setting by its flat name: the TOML keys and CLI flags
SETTINGS: tuple[str, ...] = (*(f for f in RunConfig.model_fields if f not in GROUPS), *_GROUP_OF)


class AppConfig(BaseModel):
    """What the ServerApp and ClientApps receive through Flower's run config."""

    model_config = ConfigDict(extra="forbid")

    run: RunConfig = Field(default_factory=RunConfig)
    site_names: list[str] = Field(default_factory=list)
    # a round's checkpoint (OUT/checkpoints/round-NNN.pt): the run continues after that round
    resume_from: Path | None = None

    def to_run_config(self) -> dict[str, str]:
        return {RUN_CONFIG_KEY: self.model_dump_json()}

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> AppConfig:
        raw = run_config.get(RUN_CONFIG_KEY, "")
        if not raw:
            return cls()
        return cls.model_validate_json(str(raw))


def _format_errors(err: ValidationError, sources: dict[str, str]) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        if len(loc) >= 2 and (loc[0], loc[1]) in _FLAT_NAME:  # a grouped setting: by its flat name
            loc = [_FLAT_NAME[(loc[0], loc[1])], *loc[2:]]
        field = ".".join(loc) or "config"
        top = loc[0] if loc else ""
        src = sources.get(top, "")
        msg = e["msg"].removeprefix("Value error, ")
        where = f" (from {src})" if src else ""
        got = e.get("input")
        shown = "" if isinstance(got, dict) or "unknown" in msg else f" (got {got!r})"
        if e["type"] == "extra_forbidden":
            known = ", ".join(SETTINGS)
            lines.append(f"{field}{where}: not a fedscan setting; known settings: {known}")
        else:
            lines.append(f"{field}{where}: {msg}{shown}")
    return "invalid run configuration:\n  " + "\n  ".join(lines)


def read_toml(path: Path) -> dict[str, Any]:
    """Read a config TOML file, turning a missing or malformed file into a FedscanError."""
    if not path.is_file():
        raise FedscanError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FedscanError(f"config file {path} is not valid TOML: {exc}") from None
    # Accept both `local_epochs` and `local-epochs`; allow an optional [fedscan] table, and a
    # group's settings in its own table ([data], [network], [aggregation], [secure_aggregation]).
    data = data.get("fedscan", data)

    def key(k: object) -> str:
        return str(k).replace("-", "_")

    return {
        key(k): {key(f): x for f, x in v.items()} if key(k) in GROUPS and isinstance(v, dict) else v
        for k, v in data.items()
    }


def load_run_config(
    path: Path | None = None, overrides: dict[str, Any] | None = None, flags: Mapping[str, str] | None = None
) -> RunConfig:
    """Build a RunConfig from an optional TOML file and CLI overrides (None = not given).

    ``flags``: how the command spells the option behind an override, for the error messages
    (default ``--`` and the key with dashes)."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        try:
            from_file = flat_settings(read_toml(path))
        except ValueError as exc:
            raise FedscanError(f"invalid run configuration in {path}: {exc}") from None
        for key, val in from_file.items():
            values[key] = val
            sources[key] = str(path)
    for key, val in (overrides or {}).items():
        if val is None:
            continue
        values[key] = val
        sources[key] = (flags or {}).get(key) or "--" + key.replace("_", "-")
    try:
        return RunConfig.model_validate(values)
    except ValidationError as err:
        raise FedscanError(_format_errors(err, sources)) from None
