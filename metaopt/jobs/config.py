"""The configuration of a ``metaopt run`` job.

Pydantic models that reject unknown fields and bad values before anything is trained, and the
loading of YAML/TOML files with overrides.

A config file holds any subset of :class:`JobConfig`'s fields; the rest take their defaults, which
are the embedded default job (``metaopt/jobs/default.yaml`` spells them out).
"""

from __future__ import annotations

import copy
import difflib
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from metaopt.family import Betas, Family
from metaopt.hyper import Forward, HyperOptimizer, OneStep, Unrolled
from metaopt.registry import load_family, registered

#: the param groups of the job's GPT with coefficients per group (:meth:`GPT.param_groups`)
GPT_GROUPS = ("embeddings", "blocks", "head")

#: optimizers of ``torch.optim`` a job can run as baselines (``kind``)
TORCH_KINDS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
#: per-group settings those accept in ``hyperparameters`` (lr and betas come from the job)
TORCH_HYPERPARAMETERS = {"eps", "weight_decay", "amsgrad", "betas"}
PACKAGED_CONFIGS = ("default", "quick")


def _error(loc: tuple, message: str, value: Any) -> ValidationError:
    """A ValidationError with one entry at ``loc``.

    ``loc`` is relative to the model being validated; pydantic prefixes the location of the
    enclosing fields.
    """
    details: InitErrorDetails = {"type": PydanticCustomError("invalid", message), "loc": loc, "input": value}
    return ValidationError.from_exception_data("config", [details])


def _nested(prefix: tuple, err: ValidationError) -> ValidationError:
    """``err``'s entries moved under ``prefix`` (e.g. a family's options under ``options``)."""
    details: list[InitErrorDetails] = [
        {
            "type": PydanticCustomError(
                "invalid", "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
            ),
            "loc": prefix + tuple(e["loc"]),
            "input": e.get("input"),
        }
        for e in err.errors()
    ]
    return ValidationError.from_exception_data("config", details)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelConfig(_Strict):
    """The character-level GPT (nanoGPT's architecture; see :mod:`metaopt.jobs.gpt`)."""

    n_layer: int = Field(4, ge=1, description="transformer blocks")
    n_head: int = Field(4, ge=1, description="attention heads (must divide n_embd)")
    n_embd: int = Field(128, ge=1, description="embedding width")
    block_size: int = Field(64, ge=1, description="context length in characters")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout probability")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise _error(("n_head",), f"n_head={self.n_head} must divide n_embd={self.n_embd}", self.n_head)
        return self


class DataConfig(_Strict):
    """The text and its split."""

    path: str | None = Field(None, description="a UTF-8 text file; null: the packaged tiny Shakespeare")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="tail of the text held out for validation")
    eval_seed: int = Field(1234, description="seed of the fixed validation batches (the same for every run)")

    @field_validator("path")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).expanduser().is_file():
            raise ValueError(f"no such file: {v}")
        return v


class HypergradConfig(_Strict):
    """How a metaopt optimizer learns its coefficients.

    Engine settings left unset (null) keep the engine's defaults (``metaopt.OneStep()``: SGD,
    lr 2.5e-3, momentum 0.5).
    """

    mode: Literal["one_step", "forward", "unrolled", "none"] = Field(
        "one_step",
        description="one_step: OneStep(); forward: Forward(decay=decay), tangents through the optimizer state; "
        "unrolled: Unrolled(steps=k); none: fixed coefficients",
    )
    decay: float = Field(1.0, ge=0.0, le=1.0, description="forward: how much of the carried tangents each step keeps")
    k: int = Field(1, ge=1, description="unrolled: steps per hyper-step (K)")
    every: int | None = Field(
        None, ge=1, description="unrolled: one K-step unrolled hyper-step every this many steps, plain steps between (default k)"
    )
    first_order: bool = Field(False, description="unrolled: drop second-order terms")
    meta_objective: Literal["train", "val"] = Field(
        "train", description="unrolled: score θ_K on the next training batch, or on a validation batch"
    )
    optimizer: Literal["sgd", "adam"] | None = Field(None, description="hyper-optimizer")
    lr: float | dict[str, float] | None = Field(None, description="hyper-learning rate, or {coefficient: lr}")
    momentum: float | dict[str, float] | None = Field(None, description="hyper-SGD momentum, or {coefficient: μ}")
    betas: tuple[float, float] | None = Field(None, description="hyper-Adam betas")
    eps: float | None = Field(None, description="hyper-Adam eps")
    clip: float | None = Field(None, description="bound on each hyper-gradient")
    clip_style: Literal["value", "norm"] | None = None
    warmup: int | None = Field(None, description="first N steps with frozen coefficients")

    ENGINE_FIELDS: ClassVar[tuple[str, ...]] = ("optimizer", "lr", "momentum", "betas", "eps", "clip", "clip_style", "warmup")

    @model_validator(mode="after")
    def _check(self) -> HypergradConfig:
        if self.mode != "forward" and self.decay != 1.0:
            raise _error(("decay",), f"decay applies to mode 'forward' only (mode is {self.mode!r})", self.decay)
        if self.mode != "unrolled":
            for name, default in (("k", 1), ("every", None), ("first_order", False), ("meta_objective", "train")):
                if getattr(self, name) != default:
                    raise _error((name,), f"{name} applies to mode 'unrolled' only (mode is {self.mode!r})", getattr(self, name))
        elif self.every is not None and self.every < self.k:
            raise _error(("every",), f"every={self.every} must be at least k={self.k}", self.every)
        self.build()  # the engine's own checks, reported under these field names
        return self

    @property
    def interval(self) -> int:
        """Steps per hyper-step of the unrolled mode: ``every``, else ``k``."""
        return self.every or self.k

    def build(self) -> HyperOptimizer | None:
        """The engine's setting: ``OneStep(...)``, ``Unrolled(...)`` or None."""
        if self.mode == "none":
            return None
        kw = {f: getattr(self, f) for f in self.ENGINE_FIELDS if getattr(self, f) is not None}
        if self.mode == "one_step":
            return OneStep(**kw)
        if self.mode == "forward":
            return Forward(decay=self.decay, **kw)
        try:
            return Unrolled(steps=self.k, first_order=self.first_order, **kw)
        except ValidationError as e:
            raise _nested((), e) from None


class OptimizerConfig(_Strict):
    """One contender: ``torch.optim.Adam``/``AdamW``, or a registered metaopt family."""

    name: str | None = Field(None, min_length=1, description="label in metrics, plots and summary (default: kind)")
    kind: str = Field("adam", description="'adam' or 'adamw' (torch.optim), or a registered family name ('mada', ...)")
    point: str | None = Field(None, description="named point of the family to start at (e.g. 'adam')")
    options: dict[str, Any] = Field(default_factory=dict, description="family options, e.g. {second_moment: mean}")
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict, description="per-group settings besides lr (eps, weight_decay, ...)"
    )
    lr: float | None = Field(None, gt=0.0, description="learning rate (default: the job's lr)")
    hypergrad: HypergradConfig = Field(default_factory=HypergradConfig)
    compile: bool = Field(
        False, description="MetaOptimizer(compile=True): the compiled fast path where the native CPU kernel does not run"
    )
    coefficients: Literal["shared", "per_group"] = Field(
        "shared",
        description="per_group: the GPT as three param groups (embeddings, blocks, head), each learning its own coefficients",
    )

    @model_validator(mode="after")
    def _check(self) -> OptimizerConfig:
        if self.name is None:
            self.name = self.kind if self.point is None else f"{self.kind}@{self.point}"
        if self.is_torch:
            if self.coefficients != "shared":
                raise _error(("coefficients",), f"coefficients per group apply to metaopt families, not torch's {self.kind}",
                             self.coefficients)
            for field in ("point", "compile"):
                if getattr(self, field):
                    raise _error((field,), f"{field} applies to metaopt families, not torch's {self.kind}", getattr(self, field))
            if self.options:
                raise _error(("options",), f"options apply to metaopt families, not torch's {self.kind}", self.options)
            if self.hypergrad != HypergradConfig():
                raise _error(("hypergrad",), f"torch's {self.kind} has no hyper-gradients", None)
            unknown = sorted(set(self.hyperparameters) - TORCH_HYPERPARAMETERS)
            if unknown:
                raise _error(
                    ("hyperparameters", unknown[0]),
                    f"not a setting of torch.optim.{TORCH_KINDS[self.kind].__name__} here; "
                    f"allowed: {sorted(TORCH_HYPERPARAMETERS)}",
                    self.hyperparameters[unknown[0]],
                )
            return self
        names = list(registered())
        if self.kind not in names:
            msg = (
                f"unknown optimizer kind {self.kind!r}: neither torch's {sorted(TORCH_KINDS)} nor a "
                f"registered metaopt family {names}"
            )
            raise _error(("kind",), msg + _did_you_mean(self.kind, [*TORCH_KINDS, *names]), self.kind)
        family = self.family(betas=None)
        hp = {**family.defaults(), "lr": self.lr or 1e-3, **self.hyperparameters}
        try:
            family.hyperparameters.model_validate(hp)
        except ValidationError as e:
            raise _nested(("hyperparameters",), e) from None
        hyper = self.hypergrad.build()
        if hyper is not None:
            learned = family.space.learned
            if not learned:
                raise _error(("hypergrad", "mode"), f"{self.kind} learns no coefficient here; use mode 'none'", self.hypergrad.mode)
            for field in ("lr", "momentum"):
                try:
                    hyper.per_coefficient(field, learned)
                except (KeyError, ValueError) as e:
                    raise _error(("hypergrad", field), str(e).strip("'\""), getattr(self.hypergrad, field)) from None
        return self

    @property
    def is_torch(self) -> bool:
        """Whether this contender is one of torch's optimizers (not a metaopt family)."""
        return self.kind in TORCH_KINDS

    @property
    def label(self) -> str:
        """The contender's name in metrics, plots and the summary."""
        return self.name or self.kind

    def family(self, betas: tuple[float, float] | None) -> Family:
        """The family with its options and starting point.

        ``betas`` (the job's) is passed as the family's ``betas`` option when it has one and
        ``options`` does not set it.
        """
        factory = _load_family(self.kind)
        options = dict(self.options)
        try:
            family = factory(**options)
            if betas is not None and "betas" not in options and _has_option(family, "betas"):
                family = factory(**options, betas=tuple(betas))
        except ValidationError as e:
            raise _nested(("options",), e) from None
        except (TypeError, ValueError) as e:
            raise _error(("options",), f"{self.kind}: {e}", options) from None
        if not isinstance(family, Family):
            raise _error(("kind",), f"entry point {self.kind!r} did not build a metaopt.Family", self.kind)
        if self.point is not None:
            if self.point not in family.points:
                raise _error(
                    ("point",), f"{self.kind} has no point {self.point!r}; its points: {sorted(family.points)}", self.point
                )
            family = family.at(self.point)
        return family

    def learned(self) -> tuple[str, ...]:
        """Names of the coefficients this contender learns (none for torch's optimizers)."""
        if self.is_torch or self.hypergrad.mode == "none":
            return ()
        return self.family(betas=None).space.learned

    def learned_keys(self) -> tuple[str, ...]:
        """The keys of its learned coefficients in the metrics.

        Their names, or with coefficients per group ``"<group>/<name>"`` for each of the GPT's
        groups.
        """
        if self.coefficients == "per_group":
            return tuple(f"{g}/{n}" for g in GPT_GROUPS for n in self.learned())
        return self.learned()


def _has_option(family: Family, name: str) -> bool:
    options = getattr(family, "options", None)
    return isinstance(options, BaseModel) and name in type(options).model_fields


def _load_family(name: str):
    try:
        return load_family(name)
    except Exception as e:  # a broken plugin: say which, and why
        raise _error(("kind",), f"family {name!r} failed to load: {type(e).__name__}: {e}", name) from None


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _default_optimizers() -> list[OptimizerConfig]:
    return [
        OptimizerConfig(name="adam", kind="adam"),
        # compile: the engine's compiled fast path on GPUs (numerically the generic path, tested
        # ≤ 1e-6); on a CPU the native kernel runs, which keeps the job in its time budget
        # MADA's default hyper-optimizer (MADA.default_hypergrad) and AVGrad: the study's choice
        OptimizerConfig(name="mada", kind="mada", point="adam", compile=True, options={"second_moment": "mean"},
                        hypergrad=HypergradConfig(mode="one_step", warmup=50, clip=10.0, clip_style="norm")),
    ]


class JobConfig(_Strict):
    """A comparison of optimizers on a character-level GPT. The defaults are the default job."""

    name: str | None = Field(None, description="run name (default: the config file's stem)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    steps: int = Field(1500, ge=1, description="optimizer steps per run")
    batch_size: int = Field(32, ge=1, description="sequences per batch")
    eval_interval: int = Field(100, ge=1, description="steps between validation evaluations (also at 0 and the end)")
    eval_batches: int = Field(20, ge=1, description="fixed validation batches per evaluation")
    log_interval: int = Field(10, ge=1, description="steps between read-backs: metrics.jsonl flush, progress bar")
    checkpoint_every: int = Field(
        100, ge=0, description="steps between checkpoints (all runs of a seed in one file) that `metaopt run --resume` continues from; 0: none"
    )
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="seeds; an integer N means 0..N-1")
    lr: float = Field(2e-3, gt=0.0, description="learning rate of every optimizer (unless it sets its own)")
    betas: Betas = Field((0.9, 0.99), description="β1, β2 of Adam and of every family with a betas option")
    optimizers: list[OptimizerConfig] = Field(default_factory=_default_optimizers, min_length=1)
    out_dir: str = Field("runs", description="parent of the run directory <timestamp>-<name>")
    device: str = Field("auto", description="'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    threads: int | None = Field(None, ge=1, description="torch.set_num_threads (default: torch's choice)")

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_count(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            if v < 1:
                raise ValueError(f"a seed count must be at least 1, got {v}")
            return list(range(v))
        return v

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v


    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v != "auto":
            try:
                torch.device(v)
            except (RuntimeError, ValueError):
                raise ValueError(f"not a torch device: {v!r} (try auto, cpu, cuda, cuda:1, mps)") from None
        return v

    @model_validator(mode="after")
    def _check(self) -> JobConfig:
        seen: dict[str, int] = {}
        for i, o in enumerate(self.optimizers):
            if o.label in seen:
                raise _error(
                    ("optimizers", i, "name"),
                    f"two optimizers are labelled {o.label!r} (#{seen[o.label]} and #{i}); give each a distinct name",
                    o.label,
                )
            seen[o.label] = i
            if not o.is_torch:
                o.family(self.betas)  # the options together with the job's betas
        return self

    def resolved_device(self) -> torch.device:
        """The device the job runs on: ``auto`` is cuda where available, else cpu."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def dump(self) -> dict[str, Any]:
        """Plain data (JSON/YAML-safe) that validates back to an equal config."""
        return self.model_dump(mode="json")


# -- files and overrides ----------------------------------------------------------------------


class ConfigFileError(Exception):
    """A config file that cannot be read (missing, bad syntax, wrong extension)."""


def packaged_config_path(name: str) -> Path:
    """The path of a config shipped in the package (``default``, ``quick``)."""
    return Path(str(resources.files("metaopt.jobs").joinpath(f"{name}.yaml")))


def resolve_config_path(spec: str) -> Path:
    """A path, or the name of a packaged config ('default', 'quick')."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if spec in PACKAGED_CONFIGS:
        return packaged_config_path(spec)
    raise ConfigFileError(f"no such config file: {spec} (packaged configs: {', '.join(PACKAGED_CONFIGS)})")


def read_config_file(path: Path) -> dict[str, Any]:
    """The raw mapping of a YAML (.yaml/.yml) or TOML (.toml) file."""
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigFileError(f"cannot read {path}: {e}") from None
    try:
        if suffix in (".yaml", ".yml"):
            raw = yaml.safe_load(text)
        elif suffix == ".toml":
            raw = tomllib.loads(text)
        else:
            raise ConfigFileError(f"{path}: unknown config format {suffix!r}; use .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise ConfigFileError(f"{path}: cannot parse: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigFileError(f"{path}: the top level must be a mapping of config fields, got {type(raw).__name__}")
    return raw


def set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``dotted = "a.b.c"``.

    A list is indexed by position or by an optimizer's name; missing parts are filled from the
    defaults (so ``optimizers.mada.lr`` works on a config that does not list its optimizers).
    """
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigFileError(f"--set {dotted}=...: empty key part")
    defaults = JobConfig().dump()
    node: Any = raw
    default: Any = defaults
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            index = _list_index(node, part, dotted)
            default = default[index] if isinstance(default, list) and index < len(default) else {}
            if last:
                node[index] = value
                return
            node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigFileError(f"--set {dotted}: {'.'.join(parts[:i])} is not a mapping")
        if last:
            node[part] = value
            return
        if part not in node:
            fill = default.get(part) if isinstance(default, dict) else None
            node[part] = copy.deepcopy(fill) if isinstance(fill, (dict, list)) else {}
        default = default.get(part) if isinstance(default, dict) else {}
        node = node[part]


def _list_index(items: list, part: str, dotted: str) -> int:
    if part.lstrip("-").isdigit():
        index = int(part)
        if not -len(items) <= index < len(items):
            raise ConfigFileError(f"--set {dotted}: index {index} out of range (the list has {len(items)} entries)")
        return index % len(items)
    for j, item in enumerate(items):
        if isinstance(item, dict) and (item.get("name") or item.get("kind")) == part:
            return j
    raise ConfigFileError(f"--set {dotted}: no entry named {part!r}")


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"model.n_layer=2"`` → ``("model.n_layer", 2)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigFileError(f"--set expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigFileError(f"--set {text}: cannot parse the value: {e}") from None


def build_config(raw: Mapping[str, Any], *, name: str | None = None) -> JobConfig:
    """Validate ``raw`` (raises :class:`pydantic.ValidationError`); ``name`` fills an unset name."""
    cfg = JobConfig.model_validate(dict(raw))
    if cfg.name is None:
        cfg.name = name or "job"
    return cfg


def format_validation_error(err: ValidationError, raw: Mapping[str, Any] | None = None) -> str:
    """One line per problem.

    Each line gives the field's dotted path (with the optimizer's name where known), the message,
    and the value given.
    """
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        where = ".".join(loc) or "(config)"
        if raw is not None and len(e["loc"]) >= 2 and e["loc"][0] == "optimizers" and isinstance(e["loc"][1], int):
            items = raw.get("optimizers")
            if isinstance(items, list) and e["loc"][1] < len(items) and isinstance(items[e["loc"][1]], dict):
                label = items[e["loc"][1]].get("name") or items[e["loc"][1]].get("kind")
                if label:
                    where += f" (optimizer {label!r})"
        msg = e["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(prefix)
        if e["type"] == "extra_forbidden":
            msg = "unknown field" + _unknown_field_hint(e["loc"])
        elif e["type"] != "invalid" and "input" in e and not isinstance(e["input"], (dict, list)):
            msg += f" (got {e['input']!r})"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def _unknown_field_hint(loc: tuple) -> str:
    """'; did you mean ...' for a misspelt field, from the model the field sits in."""
    model: Any = JobConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        elif inner and isinstance(inner[0], type) and issubclass(inner[0], BaseModel):
            model = inner[0]
        else:
            return ""
    fields = list(getattr(model, "model_fields", {}))
    hint = _did_you_mean(str(loc[-1]), fields)
    return hint or (f"; known fields: {', '.join(fields)}" if fields else "")
