"""The schema of a job's config: pydantic models that reject unknown fields and bad values.

`JobConfig` and the models of its fields (`ModelConfig`, `DataConfig`, `OptimizerConfig` with its
`HypergradConfig` and `SweepOrigin`), and the default job's contenders. A config file holds any
subset of `JobConfig`'s fields; the rest take their defaults, which are the embedded default job
(``metaopt/jobs/default.yaml`` spells them out). Reading files and applying overrides is
``metaopt.jobs.config``'s; the errors' formatting is ``metaopt.jobs.config_errors``'.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from metaopt.family import Betas, Family
from metaopt.hyper import Forward, HyperOptimizer, OneStep, Unrolled
from metaopt.jobs.contenders import (
    TORCH_KINDS,
    ContenderError,
    check_hyperparameters,
    check_names,
    constructor_parameters,
    needs_closure,
    optimizer_class,
    takes,
)
from metaopt.jobs.config_errors import did_you_mean, field_error, joined_errors, nested_errors
from metaopt.jobs.schedule import ScheduleConfig
from metaopt.registry import FamilySource, FamilySpecError, load_family_spec, registered

#: the param groups of the job's GPT with coefficients per group (:meth:`GPT.param_groups`)
GPT_GROUPS = ("embeddings", "blocks", "head")


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
            raise field_error(("n_head",), f"n_head={self.n_head} must divide n_embd={self.n_embd}", self.n_head)
        return self


class DataConfig(_Strict):
    """The text and its split, or a tokenized corpus in nanoGPT's format."""

    path: str | None = Field(None, description="a UTF-8 text file; null: the packaged tiny Shakespeare")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="tail of the text held out for validation")
    eval_seed: int = Field(1234, description="seed of the fixed validation batches (the same for every run)")
    tokens: str | None = Field(
        None, description="a directory with train.bin and val.bin, flat uint16 token ids as nanoGPT's prepare.py "
        "writes them (instead of a text; needs vocab_size)"
    )
    vocab_size: int | None = Field(None, ge=1, le=65536, description="the tokens' vocabulary size (GPT-2's 50257; nanoGPT pads to 50304)")

    @field_validator("path")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).expanduser().is_file():
            raise ValueError(f"no such file: {v}")
        return v

    @field_validator("tokens")
    @classmethod
    def _token_files(cls, v: str | None) -> str | None:
        if v is None:
            return v
        directory = Path(v).expanduser()
        if not directory.is_dir():
            raise ValueError(f"no such directory: {v}")
        for name in ("train.bin", "val.bin"):
            f = directory / name
            if not f.is_file():
                raise ValueError(f"{v} has no {name} (nanoGPT's prepare.py writes train.bin and val.bin)")
            if f.stat().st_size % 2:
                raise ValueError(f"{f} is {f.stat().st_size} bytes, not a whole number of uint16 token ids")
        return str(directory.resolve())

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.tokens is not None and self.path is not None:
            raise field_error(("tokens",), "give a text (path) or token files (tokens), not both", self.tokens)
        if self.tokens is not None and self.vocab_size is None:
            raise field_error(("vocab_size",), "token files need their vocabulary size (GPT-2's tokenizer: 50257)", None)
        if self.tokens is None and self.vocab_size is not None:
            raise field_error(("vocab_size",), "vocab_size applies to token files (tokens:); a text's is its alphabet's size",
                              self.vocab_size)
        return self

    def dump_unset(self) -> dict[str, Any]:
        """The fields a config.yaml leaves out when unset (so a text job's reads as it did before)."""
        return {"tokens": None, "vocab_size": None}


def _bound_or_off(what: str, low: float, high: float | None, low_open: bool) -> PlainValidator:
    """A validator of a bound that may be switched off.

    A number in its range, ``false`` for none (the engine's None), or null (unset).
    """
    span = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")

    def check(v: Any) -> float | Literal[False] | None:
        if v is None or v is False:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{what} must be a number ({span}), or false for none; got {v!r}")
        if (v <= low if low_open else v < low) or (high is not None and v > high):
            raise ValueError(f"{what} must be {span}, or false for none; got {v!r}")
        return float(v)

    return PlainValidator(check)


#: a bound that may be switched off: a number, ``false`` (none, the engine's None) or null (unset:
#: the family's default). TOML has no null, and null already means "unset", hence ``false``.
ClipBound = Annotated[float | Literal[False] | None, _bound_or_off("clip", 0.0, None, low_open=False)]
MoveBound = Annotated[float | Literal[False] | None, _bound_or_off("max_move", 0.0, 1.0, low_open=True)]


class HypergradConfig(_Strict):
    """How a metaopt optimizer learns its coefficients.

    Hyper-optimizer settings left unset (null) take the values of the contender's family's
    default hyper-optimizer (``family.default_hypergrad()``: for MADA, SGD lr 2.5e-3, momentum
    0.5, 50 frozen steps, each hyper-gradient clipped to norm 10), whatever the mode; the mode's
    own settings (``decay``, ``k``, ``first_order``) come from here. ``warmup: 0`` and
    ``clip: false`` switch the default's warm-up and clip off. Validated inside an optimizer's
    entry, every unset setting is filled in (see `OptimizerConfig`), so that a run directory's
    config.yaml holds the values the run used, whatever a family's default becomes later.
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
    clip: ClipBound = Field(None, description="bound on each hyper-gradient; false: no clip")
    clip_style: Literal["value", "norm"] | None = None
    warmup: int | None = Field(None, description="first N steps with frozen coefficients; 0: none")
    lr_scale: Literal["absolute", "box"] | None = Field(None, description="box: lr is a fraction of each coefficient's box")
    max_move: MoveBound = Field(None, description="largest move per hyper-step, a fraction of the box; false: no bound")

    ENGINE_FIELDS: ClassVar[tuple[str, ...]] = (
        "optimizer", "lr", "momentum", "betas", "eps", "clip", "clip_style", "warmup", "lr_scale", "max_move",
    )
    #: engine fields whose ``false`` means the engine's None (switched off)
    OFF_FIELDS: ClassVar[tuple[str, ...]] = ("clip", "max_move")

    @model_validator(mode="after")
    def _check(self) -> HypergradConfig:
        if self.mode != "forward" and self.decay != 1.0:
            raise field_error(("decay",), f"decay applies to mode 'forward' only (mode is {self.mode!r})", self.decay)
        if self.mode != "unrolled":
            for name, default in (("k", 1), ("every", None), ("first_order", False), ("meta_objective", "train")):
                if getattr(self, name) != default:
                    raise field_error((name,), f"{name} applies to mode 'unrolled' only (mode is {self.mode!r})", getattr(self, name))
        elif self.every is not None and self.every < self.k:
            raise field_error(("every",), f"every={self.every} must be at least k={self.k}", self.every)
        self.build(HyperOptimizer())  # the engine's own checks of these values, under these field names
        return self

    @property
    def interval(self) -> int:
        """Steps per hyper-step of the unrolled mode: ``every``, else ``k``."""
        return self.every or self.k

    def build(self, default: HyperOptimizer | None) -> HyperOptimizer | None:
        """The engine's setting: ``OneStep(...)``, ``Forward(...)``, ``Unrolled(...)`` or None.

        Args:
            default: the family's default hyper-optimizer (``family.default_hypergrad()``). Its
                shared hyper-optimizer settings (those of `metaopt.HyperOptimizer`) fill the
                ones left unset here, whatever its mode; the mode and the mode's own settings
                come from this config. None: the engine's bare defaults.

        Returns:
            The hyper-optimizer, or None for mode ``none``.

        Raises:
            pydantic.ValidationError: the engine refuses the merged settings.
        """
        if self.mode == "none":
            return None
        shared = HyperOptimizer.model_fields
        kw = {f: getattr(default, f) for f in shared} if isinstance(default, HyperOptimizer) else {}
        for f in self.ENGINE_FIELDS:
            value = getattr(self, f)
            if value is None:
                continue
            if f in self.OFF_FIELDS and value is False:
                kw[f] = None
                if f == "clip" and self.clip_style is None:
                    kw.pop("clip_style", None)  # no clip: how the default clipped is moot
            else:
                kw[f] = value
        try:
            if self.mode == "one_step":
                return OneStep(**kw)
            if self.mode == "forward":
                return Forward(decay=self.decay, **kw)
            return Unrolled(steps=self.k, first_order=self.first_order, **kw)
        except ValidationError as e:
            raise nested_errors((), e) from None

    def resolved(self, default: HyperOptimizer | None) -> HypergradConfig:
        """This config with every hyper-optimizer setting filled in from ``build(default)``.

        Switched-off bounds read ``false``; a ``none`` mode is returned as it is.

        Args:
            default: the family's default hyper-optimizer, as for `build`.

        Returns:
            An equal setting that no longer depends on ``default``.
        """
        hyper = self.build(default)
        if hyper is None:
            return self
        values = {}
        for f in self.ENGINE_FIELDS:
            v = getattr(hyper, f)
            values[f] = False if v is None and f in self.OFF_FIELDS else v
        return self.model_copy(update=values)


def _finite_number(v: Any) -> float:
    """A coefficient value: a finite int or float (not a bool, a string or NaN)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError("a coefficient value must be a finite number")
    return float(v)


#: a coefficient's value in ``at:`` or ``grid:``
Number = Annotated[float, PlainValidator(_finite_number)]


def format_number(v: float) -> str:
    """A coefficient value as a label shows it: ``0.5``, ``1``, ``1e-05``; the exact float where ``g`` would round it."""
    short = format(v, "g")
    return short if float(short) == v else repr(v)


class SweepOrigin(_Strict):
    """Which sweep entry a contender comes from (``sweep:``; written by the expansion of ``points:`` or ``grid:``).

    A run directory's ``config.yaml`` holds the expanded contenders; this field keeps their
    grid together there, so that a report of the directory (or of several) draws its landscape.
    """

    entry: str = Field(..., min_length=1, description="the label of the entry with points: or grid:")
    by: Literal["points", "grid"] = Field(..., description="which kind of sweep")
    over: list[str] = Field(default_factory=list, description="grid: the coefficients it sweeps, in the grid's order")


class OptimizerConfig(_Strict):
    """One contender: a ``torch.optim.Optimizer`` of any library, or a metaopt family.

    ``kind`` names it: ``adam`` or ``adamw`` (torch's), a registered family (``mada``), or
    ``package.module:Class`` / ``path/to/file.py:Class``, which is a torch optimizer where the
    class subclasses ``torch.optim.Optimizer`` (`metaopt.jobs.contenders.optimizer_class`;
    ``torch.optim:SGD``, ``schedulefree:AdamWScheduleFree``, ``prodigyopt:Prodigy``) and a family
    otherwise (`metaopt.registry.load_family_spec`). A torch optimizer's ``hyperparameters`` are
    checked against its constructor here. Validation stores a file's
    absolute path in ``kind`` (a relative one is taken from the current directory here;
    `read_config_file` first makes a config file's relative paths absolute against the file's
    directory), so that a saved config names the same file from anywhere; and it fills the
    hyper-gradient settings left unset from the family's default hyper-optimizer.
    """

    name: str | None = Field(
        None, min_length=1, description="label in metrics, plots and summary (default: kind, or the class of a kind with ':')"
    )
    kind: str = Field(
        "adam",
        description="'adam' or 'adamw' (torch.optim), a registered family ('mada', ...), or 'package.module:Class' "
        "/ 'path/to/file.py:Class' naming a torch.optim.Optimizer subclass (torch.optim:SGD, "
        "schedulefree:AdamWScheduleFree, prodigyopt:Prodigy) or a metaopt family",
    )
    point: str | None = Field(None, description="named point of the family to start at (e.g. 'adam')")
    at: dict[str, Number] = Field(
        default_factory=dict,
        description="coefficient values to start at, over the point's ({beta3: 0.5}); held there with hypergrad mode none",
    )
    points: list[str] | None = Field(
        None, description="a sweep: one contender per named point, each held fixed there (hyper-gradients off)"
    )
    grid: dict[str, list[Number]] | None = Field(
        None, description="a sweep: one contender per combination of these coefficient values, each held fixed there"
    )
    sweep: SweepOrigin | None = Field(None, description="set by the expansion of points: or grid: (config.yaml)")
    options: dict[str, Any] = Field(default_factory=dict, description="family options, e.g. {second_moment: mean}")
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict,
        description="per-group settings besides lr (eps, weight_decay, ...); a torch optimizer's constructor arguments",
    )
    lr: float | None = Field(None, gt=0.0, description="learning rate, the peak of a schedule (default: the job's lr)")
    schedule: ScheduleConfig = Field(
        default_factory=ScheduleConfig, description="learning-rate schedule: constant, or warm-up then cosine/linear decay"
    )
    hypergrad: HypergradConfig = Field(default_factory=HypergradConfig)
    compile: bool = Field(
        False, description="MetaOptimizer(compile=True): the compiled fast path where the native CPU kernel does not run"
    )
    coefficients: Literal["shared", "per_group"] = Field(
        "shared",
        description="per_group: the GPT as three param groups (embeddings, blocks, head), each learning its own coefficients",
    )

    #: the torch.optim.Optimizer subclass ``kind`` names (None: a metaopt family), found by the validator
    _optimizer_cls: type[torch.optim.Optimizer] | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _check(self) -> OptimizerConfig:
        if self.name is None:
            self.name = default_label(self.kind, self.point)
        try:
            self._optimizer_cls = optimizer_class(self.kind)
        except ContenderError as e:
            raise field_error(("kind",), str(e), self.kind) from None
        if self.is_torch:
            what = f"torch optimizer {self.kind}"
            if self.coefficients != "shared":
                raise field_error(("coefficients",), f"coefficients per group apply to metaopt families, not the {what}",
                             self.coefficients)
            for field in ("point", "compile", "at"):
                if getattr(self, field):
                    raise field_error((field,), f"{field} applies to metaopt families, not the {what}", getattr(self, field))
            for field in ("points", "grid", "sweep"):
                if getattr(self, field) is not None:
                    raise field_error((field,), f"a sweep ({field}:) holds a metaopt family's coefficients at fixed values; "
                                           f"the {what} has no coefficients to hold (sweep its lr with one entry per "
                                           "value, or a family)", getattr(self, field))
            if self.options:
                raise field_error(("options",), f"options apply to metaopt families, not the {what}; its constructor's "
                                           "arguments go in `hyperparameters:`", self.options)
            if self.hypergrad != HypergradConfig():
                raise field_error(("hypergrad",), f"the {what} has no hyper-gradients", None)
            if needs_closure(self.optimizer_cls):
                raise field_error(("kind",), f"{self.optimizer_cls.__name__}.step needs a closure that re-evaluates the "
                                        "loss; the job calls step() after its own backward pass, without one: pick an "
                                        "optimizer whose step takes the gradients as they are", self.kind)
            names, any_name = constructor_parameters(self.optimizer_cls)
            if "lr" not in names and not any_name:
                raise field_error(("kind",), f"{self.optimizer_cls.__name__}'s constructor takes no lr "
                                        f"({', '.join(names)}): the job builds Class(model.parameters(), lr=..., "
                                        "**hyperparameters), so an optimizer that wraps another cannot be built "
                                        "from a config", self.kind)
            try:  # the names now, so that a typo is reported beside the entries' other problems
                check_names(self.optimizer_cls, self.hyperparameters)
            except ContenderError as e:
                raise field_error(("hyperparameters", e.field), str(e), self.hyperparameters[e.field]) from None
            return self
        if ":" not in self.kind:
            names = list(registered())
            if self.kind not in names:
                msg = (
                    f"unknown optimizer kind {self.kind!r}: neither torch's {sorted(TORCH_KINDS)} nor a "
                    f"registered metaopt family {names}"
                )
                hint = did_you_mean(self.kind, [*TORCH_KINDS, *names])
                raise field_error(("kind",), msg + (hint or "; any other optimizer or family by its class: "
                                                       "`package.module:Class` (torch.optim:SGD, prodigyopt:Prodigy) "
                                                       "or `path/to/file.py:Class`"), self.kind)
        self.kind = self.source().target  # a file by its absolute path: the same file from anywhere
        self._check_sweep(self.base_family(betas=None))
        family = self.family(betas=None)
        hp = {**family.defaults(), "lr": self.lr or 1e-3, **self.hyperparameters}
        try:
            family.hyperparameters.model_validate(hp)
        except ValidationError as e:
            raise nested_errors(("hyperparameters",), e) from None
        default = family.default_hypergrad()
        try:
            hyper = self.hypergrad.build(default)
            # every unset setting filled in from the family's default: the saved config keeps its meaning
            self.hypergrad = self.hypergrad.resolved(default)
        except ValidationError as e:
            raise nested_errors(("hypergrad",), e) from None
        if hyper is not None:
            learned = family.space.learned
            if not learned:
                raise field_error(("hypergrad", "mode"), f"{self.kind} learns no coefficient here; use mode 'none'", self.hypergrad.mode)
            for field in ("lr", "momentum"):
                try:
                    hyper.per_coefficient(field, learned)
                except (KeyError, ValueError) as e:
                    raise field_error(("hypergrad", field), str(e).strip("'\""), getattr(self.hypergrad, field)) from None
        return self

    @property
    def is_torch(self) -> bool:
        """Whether this contender is a ``torch.optim.Optimizer`` (of any library), not a metaopt family."""
        return self._optimizer_cls is not None

    @property
    def optimizer_cls(self) -> type[torch.optim.Optimizer]:
        """The ``torch.optim.Optimizer`` subclass of a torch contender.

        Raises:
            TypeError: the contender is a metaopt family.
        """
        if self._optimizer_cls is None:
            raise TypeError(f"optimizer {self.label!r} (kind {self.kind}) is a metaopt family, not a torch optimizer")
        return self._optimizer_cls

    def check_torch_hyperparameters(self, lr: float, betas: tuple[float, float]) -> None:
        """Refuse ``hyperparameters`` the torch optimizer's constructor does not take or refuses.

        Raises:
            pydantic.ValidationError: at ``hyperparameters.<name>`` (or ``hyperparameters``),
                with the constructor's accepted names or its message.
        """
        try:
            check_hyperparameters(self.optimizer_cls, self.hyperparameters, self.lr or lr, betas)
        except ContenderError as e:
            field = getattr(e, "field", None)
            loc = ("hyperparameters",) if field is None else ("hyperparameters", field)
            raise field_error(loc, str(e), self.hyperparameters if field is None else self.hyperparameters[field]) from None

    @property
    def label(self) -> str:
        """The contender's name in metrics, plots and the summary."""
        return self.name or self.kind

    def source(self) -> FamilySource:
        """Where this contender's family comes from (`metaopt.registry.load_family_spec` of ``kind``).

        Raises:
            pydantic.ValidationError: at ``kind``, with the spec's problem and its fix.
        """
        try:
            return load_family_spec(self.kind)
        except FamilySpecError as e:
            raise field_error(("kind",), str(e), self.kind) from None

    def family(self, betas: tuple[float, float] | None) -> Family:
        """The family with its options and starting point: its ``point``, then the values of ``at``.

        ``betas`` (the job's) is passed as the family's ``betas`` option when it has one (a field
        of its options model, or a constructor parameter named ``betas``) and ``options`` does
        not set it.
        """
        family = self.base_family(betas)
        if self.point is not None:
            if self.point not in family.points:
                raise field_error(
                    ("point",), f"{self.kind} has no point {self.point!r}; its points: {sorted(family.points)}", self.point
                )
            family = family.at(self.point)
        if self.at:
            self._check_values(family, ("at",), self.at)
            family = family.at(dict(self.at))
        return family

    def base_family(self, betas: tuple[float, float] | None) -> Family:
        """The family with its options (and the job's ``betas``, as `family` passes them), at its own init."""
        source = self.source()
        options = dict(self.options)
        try:
            family = source.build(**options)
            if betas is not None and "betas" not in options and source.accepts("betas", family):
                family = source.build(**options, betas=tuple(betas))
        except FamilySpecError as e:
            raise field_error(("kind",), str(e), self.kind) from None
        except ValidationError as e:
            raise nested_errors(("options",), e) from None
        except (TypeError, ValueError) as e:
            raise field_error(("options",), f"{self.kind}: {e}", options) from None
        return family

    def _check_values(self, family: Family, loc: tuple, values: Mapping[str, float]) -> None:
        """Refuse a coefficient ``family`` does not have, or a value outside its box, at ``loc + (name,)``."""
        space = family.space
        for n, v in values.items():
            if n not in space:
                hint = did_you_mean(n, list(space.names))
                raise field_error(loc + (n,), f"{self.kind} has no coefficient {n!r}; its coefficients: {list(space.names)}{hint}", n)
            c = space[n]
            if not c.low <= v <= c.high:
                raise field_error(loc + (n,), f"{n}={format_number(v)} lies outside its box [{c.low:g}, {c.high:g}]", v)

    def _check_sweep(self, base: Family) -> None:
        """Refuse a malformed ``points:`` or ``grid:``; hold a sweep's contenders fixed (hypergrad mode none)."""
        if self.points is not None:
            if self.grid is not None:
                raise field_error(("grid",), "an entry sweeps points or a grid, not both: give each its own entry", None)
            if self.point is not None:
                raise field_error(("point",), "points: holds one contender at each of its points; drop point: (or list it "
                                         "in points:)", self.point)
            known = sorted(base.points)
            if not self.points:
                raise field_error(("points",), f"an empty list sweeps nothing: name some of {self.kind}'s points {known}, "
                                          "or drop points:", self.points)
            for j, p in enumerate(self.points):
                if p not in base.points:
                    hint = did_you_mean(p, known)
                    raise field_error(("points", j), f"{self.kind} has no point {p!r}; its points: {known}{hint}", p)
                if p in self.points[:j]:
                    raise field_error(("points", j), f"point {p!r} is listed twice", p)
        if self.grid is not None:
            if not self.grid:
                raise field_error(("grid",), "an empty grid sweeps nothing: give {coefficient: [values, ...]}, e.g. "
                                        f"{{{base.space.names[-1]}: [0.1, 0.5, 1.0]}}", self.grid)
            start = base.at(self.point) if self.point is not None and self.point in base.points else base
            names = list(start.space.names)
            for n, values in self.grid.items():
                if n not in start.space:
                    hint = did_you_mean(n, names)
                    raise field_error(("grid", n), f"{self.kind} has no coefficient {n!r}; its coefficients: {names}{hint}", n)
                if n in self.at:
                    raise field_error(("grid", n), f"{n} is swept here and also set in at: ({format_number(self.at[n])}); "
                                              "drop one", n)
                if not values:
                    raise field_error(("grid", n), f"an empty list: give {n} at least one value, or drop it from the grid", values)
                for j, v in enumerate(values):
                    c = start.space[n]
                    if not c.low <= v <= c.high:
                        raise field_error(("grid", n, j), f"{n}={format_number(v)} lies outside its box [{c.low:g}, {c.high:g}]", v)
                    if v in values[:j]:
                        raise field_error(("grid", n, j), f"{n}={format_number(v)} is listed twice", v)
        if self.points is not None or self.grid is not None:
            if self.sweep is not None:
                raise field_error(("sweep",), f"this contender was expanded from the sweep {self.sweep.entry!r}; it cannot "
                                         "sweep again (change the sweep in the config you ran, not in config.yaml)", None)
            if "hypergrad" in self.model_fields_set and self.hypergrad.mode != "none":
                raise field_error(("hypergrad", "mode"), f"a sweep holds each of its contenders fixed (hyper-gradients off); "
                             f"mode {self.hypergrad.mode!r} would learn from each: leave hypergrad: out (or set mode: "
                             "none), and start a learning entry at a point with point: or at:", self.hypergrad.mode)
            self.hypergrad = HypergradConfig(mode="none")
        elif self.sweep is not None:
            if self.hypergrad.mode != "none":
                raise field_error(("sweep",), f"a contender of the sweep {self.sweep.entry!r} is held fixed: its hypergrad "
                                         f"mode must be 'none', not {self.hypergrad.mode!r}", None)
            missing = [n for n in self.sweep.over if n not in self.at]
            if self.sweep.by == "grid" and missing:
                raise field_error(("sweep", "over"), f"a cell of the grid {self.sweep.entry!r} holds every coefficient the "
                                                f"grid sweeps in at:; {', '.join(missing)} missing", self.sweep.over)

    @property
    def is_sweep(self) -> bool:
        """Whether this entry is a sweep (``points:`` or ``grid:``) that `expanded` turns into contenders."""
        return self.points is not None or self.grid is not None

    def expanded(self) -> list[OptimizerConfig]:
        """The contenders of this entry: itself, or one per point or grid cell of a sweep, each held fixed.

        A contender of ``points: [adam, yogi]`` is this entry at ``point: adam`` (labelled
        ``<label>@adam``, ``<label>@adam[beta1=0.8]`` with ``at: {beta1: 0.8}``); one of ``grid: {beta3: [0, 0.5], rho: [0.1, 1]}`` has ``at:`` the entry's
        ``at`` with that cell's values, over the entry's ``point`` (labelled
        ``<label>[beta3=0.5,rho=0.1]``), the cells in the order of ``itertools.product``. Every
        other field is the entry's.
        """
        if not self.is_sweep:
            return [self]
        base = self.model_dump(mode="json", exclude={"points", "grid", "name", "sweep"})
        entry = self.label
        cells: list[tuple[str, dict[str, Any]]] = []
        if self.points is not None:
            # values of at: move every point: the label says so, so that mada@adam means Adam's point
            moved = f"[{','.join(f'{n}={format_number(v)}' for n, v in self.at.items())}]" if self.at else ""
            for p in self.points:
                cells.append((f"{entry}@{p}{moved}", {"point": p, "sweep": {"entry": entry, "by": "points"}}))
        else:
            assert self.grid is not None
            names = list(self.grid)
            for values in itertools.product(*(self.grid[n] for n in names)):
                cell = dict(zip(names, values))
                label = f"{entry}[{','.join(f'{n}={format_number(v)}' for n, v in cell.items())}]"
                cells.append((label, {"at": {**self.at, **cell}, "sweep": {"entry": entry, "by": "grid", "over": names}}))
        return [OptimizerConfig.model_validate({**base, "name": label, **fields}) for label, fields in cells]

    def takes_betas(self) -> bool:
        """Whether the job's ``betas`` reach this contender.

        True for torch optimizers whose constructor takes ``betas`` and for families with a
        ``betas`` option (``options`` setting it counts as taking it).
        """
        if self.is_torch:
            return takes(self.optimizer_cls, "betas")
        if "betas" in self.options:
            return True
        return self.source().accepts("betas", self.family(betas=None))

    def hyper(self) -> HyperOptimizer | None:
        """The engine's hyper-optimizer of this contender (None: torch's, or mode ``none``)."""
        if self.is_torch:
            return None
        return self.hypergrad.build(self.family(betas=None).default_hypergrad())

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


def default_label(kind: str, point: str | None = None) -> str:
    """A contender's label when its config sets no ``name``.

    The kind (for ``package.module:Class`` or ``path/file.py:Class``, the class), then
    ``@point`` where it starts at a named point.
    """
    base = kind.rsplit(":", 1)[1] if ":" in kind else kind
    return base if point is None else f"{base}@{point}"


#: the default job's schedule, nanoGPT's: its noise floor is far below a constant lr's (docs/study.md)
DEFAULT_SCHEDULE = {"kind": "cosine", "warmup": 100, "final": 0.1}


class LauncherConfig(_Strict):
    """Where a job's runs (one per optimizer and seed) are trained.

    ``inline``: all of them in this process, the runs of a seed interleaved step by step.
    ``local``: each run in a process of its own, ``jobs`` at a time. ``ray``: each run a task
    on a Ray cluster. Where does not change the numbers: every run depends on its config, its
    seed and ``threads`` alone.
    """

    kind: Literal["inline", "local", "ray"] = Field("inline", description="inline (one process), local (processes), ray (a cluster)")
    jobs: int | None = Field(None, ge=1, description="local: runs at a time (default: 1)")
    address: str | None = Field(
        None, description="ray: the cluster's address, as ray.init takes it ('auto', 'ray://head:10001', 'head:6379'); "
        "none: a local Ray instance"
    )
    retries: int = Field(3, ge=0, description="ray: how often a run whose worker died is tried again, from its checkpoint")

    @model_validator(mode="after")
    def _fits_kind(self) -> LauncherConfig:
        if self.jobs is not None and self.kind != "local":
            raise field_error(("jobs",), f"jobs applies to the local launcher, not {self.kind!r} (set kind: local)", self.jobs)
        if self.address is not None and self.kind != "ray":
            raise field_error(("address",), f"address applies to the ray launcher, not {self.kind!r} (set kind: ray)", self.address)
        return self


class DistributedConfig(_Strict):
    """How many processes train each run together, data parallel (`metaopt.jobs.data_parallel`).

    ``nproc`` processes (``metaopt run --nproc N``, or ``torchrun``'s world) each take an equal
    share of every batch; ``strategy`` is how they hold the model: ``ddp`` (a replica each,
    gradients averaged in backward) or ``fsdp2`` (each a shard of every parameter, its gradient
    and its optimizer state: for models one device cannot hold).
    """

    nproc: int = Field(1, ge=1, description="processes that train each run together (the world size); "
                       "`metaopt run --nproc N` starts them under torchrun")
    strategy: Literal["ddp", "fsdp2"] = Field("ddp", description="ddp (a replica per process) or fsdp2 (parameters sharded)")


def parse_shard(v: Any) -> tuple[int, int]:
    """``"I/N"`` as (I, N), 0 <= I < N: the I-th of N shards of a job's runs.

    Raises:
        ValueError: not of that form, or I out of range (the message says which).
    """
    text = str(v).strip()
    head, sep, tail = text.partition("/")
    if not sep or not head.strip().lstrip("-").isdigit() or not tail.strip().lstrip("-").isdigit():
        raise ValueError(f"a shard is I/N (the I-th of N, counting from 0), e.g. 0/4; got {v!r}")
    index, count = int(head), int(tail)
    if count < 1:
        raise ValueError(f"shard {text}: N must be at least 1")
    if not 0 <= index < count:
        raise ValueError(f"shard {text} is out of range: I must be 0..{count - 1} for N = {count}")
    return index, count


def _default_optimizers() -> list[OptimizerConfig]:
    return [
        OptimizerConfig(name="adam", kind="adam", schedule=DEFAULT_SCHEDULE),
        # compile: the engine's compiled fast path on GPUs (numerically the generic path, tested
        # ≤ 1e-6); on a CPU the native kernel runs, which keeps the job in its time budget.
        # One-step hyper-gradients with MADA's default hyper-optimizer (MADA.default_hypergrad,
        # which fills the unset settings) and AVGrad: the study's choice
        OptimizerConfig(name="mada", kind="mada", point="adam", compile=True, options={"second_moment": "mean"},
                        schedule=DEFAULT_SCHEDULE),
    ]


class JobConfig(_Strict):
    """A comparison of optimizers on a character-level GPT. The defaults are the default job."""

    name: str | None = Field(None, description="run name (default: the config file's stem)")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    steps: int = Field(1500, ge=1, description="optimizer steps per run")
    batch_size: int = Field(32, ge=1, description="sequences per batch (per step, over all processes and micro-batches)")
    grad_clip: float | None = Field(
        None, gt=0.0, description="clip the gradient's global norm to this before every step (nanoGPT: 1.0); none: no clip"
    )
    gradient_accumulation: int = Field(
        1, ge=1, description="micro-batches per step in each process: batch_size is split over "
        "distributed.nproc × gradient_accumulation, and the gradients of the parts add up to the batch's"
    )
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
    shard: str | None = Field(
        None, description="I/N: train only every N-th run from the I-th on (runs in seed order, then the optimizers' order), "
        "so that N processes or machines share a job; `metaopt report` joins their run directories"
    )
    launcher: LauncherConfig = Field(default_factory=LauncherConfig, description="where the runs train (`metaopt run --jobs`, `--launcher`)")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="processes per run, data parallel (`metaopt run --nproc`, torchrun)"
    )

    @field_validator("shard")
    @classmethod
    def _shard(cls, v: str | None) -> str | None:
        if v is None:
            return v
        index, count = parse_shard(v)
        return f"{index}/{count}"

    @model_validator(mode="before")
    @classmethod
    def _default_contenders(cls, data: Any) -> Any:
        if isinstance(data, dict) and "optimizers" not in data:  # the default job's, fitted to the steps
            return {**data, "optimizers": default_optimizers(data.get("steps", cls.model_fields["steps"].default))}
        return data

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
        problems: list[ValidationError] = []  # every contender's, reported together
        for i, o in enumerate(self.optimizers):
            if o.label in seen:
                raise field_error(
                    ("optimizers", i, "name"),
                    f"two optimizers are labelled {o.label!r} (#{seen[o.label]} and #{i}); give each a distinct name",
                    o.label,
                )
            seen[o.label] = i
            if o.is_torch:
                try:
                    o.check_torch_hyperparameters(self.lr, self.betas)  # with the job's lr and betas
                except ValidationError as e:
                    problems.append(nested_errors(("optimizers", i), e))
            else:
                o.family(self.betas)  # the options together with the job's betas
            if o.schedule.warmup >= self.steps:
                problems.append(field_error(
                    ("optimizers", i, "schedule", "warmup"),
                    f"warmup={o.schedule.warmup} must be fewer than the job's steps ({self.steps})", o.schedule.warmup,
                ))
        if problems:
            raise joined_errors(problems)
        # the sweeps expanded: from here on every entry is one contender (config.yaml keeps them so)
        contenders: list[OptimizerConfig] = []
        origin: dict[str, int] = {}
        for i, o in enumerate(self.optimizers):
            try:
                expanded = o.expanded()
            except ValidationError as e:
                raise nested_errors(("optimizers", i), e) from None
            for c in expanded:
                if c.label in origin:
                    j = origin[c.label]
                    whose = lambda k: f"#{k}" + (f" (the sweep {self.optimizers[k].label!r})" if self.optimizers[k].is_sweep else "")  # noqa: E731
                    raise field_error(
                        ("optimizers", i, "name"),
                        f"two contenders are labelled {c.label!r} (entries {whose(j)} and {whose(i)}); give each a distinct name",
                        c.label,
                    )
                origin[c.label] = i
            contenders += expanded
        self.optimizers = contenders
        self._check_parallel()
        if self.shard is not None and not self.units():
            total = len(self.optimizers) * len(self.seeds)
            raise field_error(("shard",), f"shard {self.shard} holds no run: the job has only {total} "
                              f"(optimizers × seeds); use N ≤ {total}", self.shard)
        return self

    @property
    def parts(self) -> int:
        """Into how many equal parts each batch is cut: ``distributed.nproc × gradient_accumulation``."""
        return self.distributed.nproc * self.gradient_accumulation

    def _check_parallel(self) -> None:
        """What several processes, or micro-batches, cannot do (the field named)."""
        nproc, parts = self.distributed.nproc, self.parts
        if self.batch_size % parts:
            raise field_error(("batch_size",), f"batch_size {self.batch_size} does not split into distributed.nproc "
                              f"({nproc}) × gradient_accumulation ({self.gradient_accumulation}) = {parts} equal parts; "
                              "use a multiple of that", self.batch_size)
        for i, o in enumerate(self.optimizers):
            if self.grad_clip is not None and not o.is_torch and o.hypergrad.mode == "unrolled":
                raise field_error(("grad_clip",), f"grad_clip with optimizer {o.label!r} in the unrolled mode: its K "
                                  "steps run inside `higher`, where no clip applies; drop grad_clip or use one_step "
                                  "or forward", self.grad_clip)
            if nproc > 1 and self.distributed.strategy == "fsdp2" and not o.is_torch and not o.family(self.betas).elementwise:
                raise field_error(("distributed", "strategy"), f"optimizer {o.label!r}: its family's rule mixes "
                                  "coordinates (elementwise = False), and FSDP2 would run it on one shard of each "
                                  "parameter; use strategy: ddp", self.distributed.strategy)
            if parts > 1 and not o.is_torch and o.hypergrad.mode == "unrolled":
                raise field_error(("optimizers", i, "hypergrad", "mode"), f"optimizer {o.label!r}: the unrolled mode takes "
                                  "whole batches through `higher` in one process; it runs with distributed.nproc 1 and "
                                  "gradient_accumulation 1 (use one_step or forward here)", o.hypergrad.mode)
        if nproc > 1 and self.model.dropout > 0:
            raise field_error(("model", "dropout"), f"dropout {self.model.dropout:g} with distributed.nproc {nproc}: "
                              "the processes would draw one shared dropout stream; set dropout: 0 (GPT-2's "
                              "reproductions train without it) or nproc: 1", self.model.dropout)
        if nproc > 1 and self.launcher.kind != "inline":
            raise field_error(("distributed", "nproc"), f"nproc {nproc} with launcher {self.launcher.kind!r}: a run over "
                              "several processes trains under torchrun, one run after another; fan a job out over "
                              "machines with --shard instead", nproc)
        if nproc > 1 and self.device not in ("auto", "cpu", "cuda"):
            raise field_error(("device",), f"device {self.device!r} names one device, but distributed.nproc is {nproc}: "
                              "use cuda (each process takes the GPU of its local rank) or cpu", self.device)

    def units(self) -> list[tuple[str, int]]:
        """The runs (optimizer label, seed) this config trains, in order.

        Seed by seed, each seed's optimizers in the config's order; with a ``shard`` I/N, every
        N-th of them from the I-th on.
        """
        every = [(o.label, s) for s in self.seeds for o in self.optimizers]
        if self.shard is None:
            return every
        index, count = parse_shard(self.shard)
        return every[index::count]

    def resolved_device(self) -> torch.device:
        """The device the job runs on: ``auto`` is cuda where available, else cpu."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def dump(self) -> dict[str, Any]:
        """Plain data (JSON/YAML-safe) that validates back to an equal config.

        A contender's sweep fields (``at``, ``points``, ``grid``, ``sweep``) are left out where
        unset, so that a config without sweeps reads as it did before they existed.
        """
        data = self.model_dump(mode="json")
        # unset, they are left out too: a config.yaml of a job run in one process reads as before
        if data.get("shard") is None:
            data.pop("shard", None)
        if data.get("launcher") == LauncherConfig().model_dump(mode="json"):
            data.pop("launcher", None)
        if data.get("distributed") == DistributedConfig().model_dump(mode="json"):
            data.pop("distributed", None)
        for key, unset in (("gradient_accumulation", 1), ("grad_clip", None)):
            if data.get(key, unset) == unset:
                data.pop(key, None)
        for key, unset in self.data.dump_unset().items():
            if data["data"].get(key, unset) == unset:
                data["data"].pop(key, None)
        for entry in data["optimizers"]:
            for key, unset in (("at", {}), ("points", None), ("grid", None), ("sweep", None)):
                if entry.get(key, unset) == unset:
                    entry.pop(key, None)
        return data


def default_optimizers(steps: Any) -> list[dict[str, Any]]:
    """The default job's contenders as raw entries, for a config of ``steps`` steps that lists none.

    Their warm-up (100 of the default job's 1500 steps) shrinks in proportion in a shorter job,
    as under ``--quick``, so that a config that sets only ``steps`` runs them.
    """
    full = JobConfig.model_fields["steps"].default
    entries = [o.model_dump(mode="json") for o in _default_optimizers()]
    if isinstance(steps, int) and not isinstance(steps, bool) and 0 < steps < full:
        entries = [scaled_warmup(e, steps, full) for e in entries]
    return entries


def scaled_warmup(entry: Any, new_steps: int, steps: int) -> Any:
    """A raw optimizer entry with its schedule's warm-up scaled from a job of ``steps`` to one of ``new_steps``.

    Rounded down, so that the warm-up takes the same share of the job (``--quick``, a default
    job shortened by ``steps:``).
    """
    schedule = entry.get("schedule") if isinstance(entry, dict) else None
    warmup = schedule.get("warmup") if isinstance(schedule, dict) else None
    if not isinstance(warmup, int) or isinstance(warmup, bool) or not 0 <= warmup < steps:
        return entry  # unset, or a bad value that validation reports as the config gave it
    return {**entry, "schedule": {**schedule, "warmup": warmup * new_steps // steps}}
